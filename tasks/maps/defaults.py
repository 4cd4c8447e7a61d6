"""The default maps of a feature artefact (PCA, t-SNE and the t-SNE image grid) and their summary records."""

from __future__ import annotations

from typing import Any

from tasks.maps.grid import make_grid
from tasks.maps.projection import MapConfig, build_map

__all__ = ["summarise", "make_default_maps"]


def summarise(manifest: dict[str, Any]) -> dict[str, Any]:
    """Small record of a published map (what the CLI prints and flows return)."""
    q = manifest.get("quality") or {}
    pca = manifest.get("pca") or {}
    return {
        "map_id": manifest["artefact_id"], "method": manifest["method"], "dim": manifest["dim"],
        "rows": manifest["rows"], "source": manifest["source"], "reused": bool(manifest.get("reused")),
        "explained_variance_ratio": pca.get("explained_variance_ratio") if manifest["method"] == "pca"
        else pca.get("explained_variance_ratio_total"),
        "effective_perplexity": (manifest.get("tsne") or {}).get("effective_perplexity"),
        "n_neighbors": (manifest.get("umap") or {}).get("effective_n_neighbors"),
        "incremental": manifest.get("incremental"),
        "trustworthiness": q.get("trustworthiness"),
        "knn_label_agreement_map": q.get("knn_label_agreement_map"),
        "knn_label_agreement_full": q.get("knn_label_agreement_full"),
        "seconds": (manifest.get("seconds") or {}).get("total"),
    }


def make_default_maps(store: str, features_id: str | None = None, seed: int = 0, incremental: bool = False
                      ) -> dict[str, Any]:
    """Plain (no Prefect) default maps for the demo and the nightly run: PCA map, t-SNE map and its image grid.

    Returns ``{"pca": summary, "tsne": summary, "grid": grid summary}``; the PNGs are at
    ``result["grid"]["grid_png"]`` and ``result["grid"]["scatter_png"]`` (t-SNE scatter) and in the PCA map's
    directory (``scatter.png``). Reuses maps already published with the same parameters. With ``incremental``
    (the nightly run) each map places the rows new since the newest earlier map of the same features artefact
    into it (``MapConfig(previous="auto")``: old rows keep their coordinates) instead of refitting, unless that
    map's reference holds less than half the rows a refit would fit.
    """
    previous = "auto" if incremental else None
    pca = summarise(build_map(MapConfig(store=store, features_id=features_id, method="pca", seed=seed, previous=previous)))
    tsne = summarise(build_map(MapConfig(store=store, features_id=features_id, method="tsne", seed=seed, previous=previous)))
    grid = make_grid(store, tsne["map_id"])
    return {"pca": pca, "tsne": tsne, "grid": grid}
