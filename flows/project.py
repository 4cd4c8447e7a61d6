"""Flow: maps of feature space — PCA / t-SNE / UMAP coordinates of a feature artefact, plus the t-SNE image grid.

Parameters mirror ``convlens project`` and ``convlens grid``. Steps (tasks pass store paths and ids):
project (stream features -> PCA -> t-SNE / UMAP on a sample, the other rows placed into it -> quality numbers
-> publish a ``maps`` artefact with ``coords.parquet`` + ``reference.npz`` + ``scatter.png``; with
``--previous`` only the new rows are placed into an earlier map) -> grid (thumbnails of the images nearest each
grid cell, added to the map artefact). A rerun with the same source and parameters reuses the published map.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, get_run_logger, task

from tasks.maps.defaults import summarise
from tasks.maps.grid import make_grid
from tasks.maps.projection import MapConfig, build_map

__all__ = [
    "project_task",
    "grid_task",
    "project_flow",
    "grid_flow",
    "maps_flow",
    "register",
]


@task(name="project-map", retries=0)
def project_task(cfg: MapConfig) -> dict[str, Any]:
    """Build (or reuse) one map under its artefact lock; returns the summary."""
    return summarise(build_map(cfg))


@task(name="tsne-grid", retries=0)
def grid_task(store: str, map_id: str | None, size: str | None, thumb: int, assignment: str,
              out: str | None, scatter_out: str | None, force: bool) -> dict[str, Any]:
    """Render (or reuse) a map's image grid; returns the grid summary."""
    return make_grid(store, map_id, size, thumb, assignment, out, scatter_out, force)


@flow(name="project", log_prints=False)
def project_flow(cfg: MapConfig) -> dict[str, Any]:
    """One PCA, t-SNE or UMAP map of a feature artefact (``cfg.features_id``, default: the newest)."""
    summary = project_task(cfg)
    get_run_logger().info("map %(map_id)s (%(method)s, %(rows)d rows), trustworthiness %(trustworthiness)s", summary)
    return summary


@flow(name="grid", log_prints=False)
def grid_flow(store: str = "convlens-store", map_id: str | None = None, size: str | None = None, thumb: int = 48,
              assignment: str = "auto", out: str | None = None, scatter_out: str | None = None,
              force: bool = False) -> dict[str, Any]:
    """The image grid of a map (default: the newest t-SNE map)."""
    summary = grid_task(store, map_id, size, thumb, assignment, out, scatter_out, force)
    get_run_logger().info("grid %(size)s of %(map_id)s: %(filled)d cells, %(missing_images)d missing images", summary)
    return summary


@flow(name="maps", log_prints=False)
def maps_flow(store: str = "convlens-store", features_id: str | None = None, seed: int = 0) -> dict[str, Any]:
    """PCA map + t-SNE map + t-SNE grid of a feature artefact, with default parameters."""
    pca = project_task(MapConfig(store=store, features_id=features_id, method="pca", seed=seed))
    tsne = project_task(MapConfig(store=store, features_id=features_id, method="tsne", seed=seed))
    grid = grid_task(store, tsne["map_id"], None, 48, "auto", None, None, False)
    return {"pca": pca, "tsne": tsne, "grid": grid}


# ---------------------------------------------------------------------------------------------------- CLI


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _project_cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    cfg = MapConfig(store=args.store, features_id=args.artefact, method=args.method, dim=args.dim,
                    pca_first=args.pca_first, perplexity=args.perplexity, n_neighbors=args.n_neighbors,
                    min_dist=args.min_dist, seed=args.seed, pca_solver=args.pca_solver, max_fit=args.max_fit,
                    n_jobs=args.n_jobs, force=args.force, previous=args.previous)
    cfg.validate()
    result = run_stage(args, project_flow, lambda: summarise(build_map(cfg, progress=True)), cfg=cfg)
    evr = result["explained_variance_ratio"]
    evr_txt = ", ".join(f"{v:.3f}" for v in evr) if isinstance(evr, list) else _fmt(evr)
    emit(result, args.json, (
        f"map {result['map_id']}{' (reused)' if result['reused'] else ''}: {result['method']} {result['dim']}-d of "
        f"{result['source']}, {result['rows']} rows\n"
        f"explained variance ratio: {evr_txt}"
        + (f"; perplexity {_fmt(result['effective_perplexity'])}" if result["effective_perplexity"] else "") + "\n"
        + (f"placed into {result['incremental']['previous']}: {result['incremental']['kept']} rows kept, "
           f"{result['incremental']['placed']} placed, {result['incremental']['dropped']} dropped\n"
           if result.get("incremental") else "") +
        f"trustworthiness {_fmt(result['trustworthiness'])}, kNN label agreement map {_fmt(result['knn_label_agreement_map'])}"
        f" vs full space {_fmt(result['knn_label_agreement_full'])}"))
    return 0


def _grid_cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage
    from tasks.maps.grid import parse_size

    parse_size(args.size)  # fail fast on a bad --size
    result = run_stage(args, grid_flow,
                       lambda: make_grid(args.store, args.map, args.size, args.thumb, args.assignment, args.out,
                                         args.scatter_out, args.force, progress=True),
                       store=args.store, map_id=args.map, size=args.size, thumb=args.thumb,
                       assignment=args.assignment, out=args.out, scatter_out=args.scatter_out, force=args.force)
    emit(result, args.json, (
        f"grid {result['size']} of map {result['map_id']}{' (reused)' if result['reused'] else ''}: "
        f"{result['filled']} cells filled, {result['missing_images']} missing images ({result['assignment']})\n"
        f"grid: {result['grid_png']}\nscatter: {result['scatter_png']}"
        + (f"\ncopied to {result['out']}" if result["out"] else "")))
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("project", help="PCA / t-SNE / UMAP map of a feature artefact (coordinates + scatter)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_argument(p)
    p.add_argument("--artefact", default=None, help="feature artefact id or prefix (default: the newest)")
    p.add_argument("--method", choices=["pca", "tsne", "umap"], default="tsne")
    p.add_argument("--dim", type=int, default=2, choices=[2, 3], help="map dimensions (default 2)")
    p.add_argument("--pca-first", type=int, default=50, help="t-SNE / UMAP input: PCA to this many dims first (0 = off)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (clamped to (N-1)/3)")
    p.add_argument("--n-neighbors", type=int, default=15, help="UMAP neighbours (clamped to N-1)")
    p.add_argument("--min-dist", type=float, default=0.1, help="UMAP min_dist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pca-solver", choices=["auto", "exact", "randomized"], default="auto")
    p.add_argument("--max-fit", type=int, default=200_000,
                   help="t-SNE / UMAP: fit on a sample of this many rows, place the rest into it (transform)")
    p.add_argument("--previous", default=None, metavar="MAP_ID|auto",
                   help="place only the rows new since this earlier map (same method and parameters) into it; old "
                        "rows keep their coordinates. 'auto': the newest such map of this features artefact")
    p.add_argument("--n-jobs", type=int, default=1, help="t-SNE threads (part of the map's identity)")
    p.add_argument("--force", action="store_true", help="recompute even if an identical map is published")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_project_cli)

    g = sub.add_parser("grid", help="t-SNE image grid (+ label scatter) of a map, as PNG")
    add_store_argument(g)
    g.add_argument("--map", default=None, help="map artefact id or prefix (default: the newest t-SNE map)")
    g.add_argument("--size", default=None, help="ROWSxCOLS (default: largest square <= 32x32 the images fill)")
    g.add_argument("--thumb", type=int, default=48, help="thumbnail side in pixels (default 48)")
    g.add_argument("--assignment", choices=["auto", "lap", "greedy"], default="auto")
    g.add_argument("--out", default=None, help="also copy the grid PNG to this file")
    g.add_argument("--scatter-out", default=None, help="also copy the map's scatter PNG to this file")
    g.add_argument("--force", action="store_true", help="re-render even if this grid is published")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_grid_cli)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["project", *sys.argv[1:]]))
