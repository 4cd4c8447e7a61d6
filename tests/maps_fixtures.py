"""Helpers for the map tests: synthetic feature artefacts (known clusters) written straight into a store, with
small solid-colour PNGs on disk so grids can load real thumbnails. No model is run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from storage.features import PartWriter
from storage.manifest import write_manifest
from storage.paths import Store

__all__ = ["clusters", "write_features", "CLUSTER_COLOURS"]

CLUSTER_COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (160, 40, 200)]


def clusters(n_per: int = 40, k: int = 4, d: int = 32, spread: float = 12.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well-separated Gaussian clusters in ``d`` dims: ``(x (k*n_per, d) float32, labels (k*n_per,) str)``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    lab = np.repeat(np.arange(k), n_per)
    x = centres[lab] + rng.normal(size=(len(lab), d))
    return x.astype(np.float32), np.array([f"c{i}" for i in lab], object)


def write_features(store: Path, feats: np.ndarray, labels: Sequence[str | None] | None = None,
                   dataset_root: Path | None = None, paths: Sequence[str] | None = None,
                   ids: Sequence[str] | None = None, aid: str = "synthetic-features", images: bool = True) -> str:
    """Publish ``feats`` (N, D) as a feature artefact (3 parts); with ``images`` write a 16 px PNG per row,
    coloured by label, under ``dataset_root``. Returns the artefact id."""
    from PIL import Image

    n, d = feats.shape
    labels = list(labels) if labels is not None else [None] * n
    paths = list(paths) if paths is not None else [f"img/{i:04d}.png" for i in range(n)]
    ids = list(ids) if ids is not None else [f"{i:064x}" for i in range(n)]
    root = Path(dataset_root) if dataset_root is not None else Path(store).parent / "data"
    if images:
        names = sorted({str(v) for v in labels if v is not None})
        for p, lab in zip(paths, labels):
            f = root / p
            f.parent.mkdir(parents=True, exist_ok=True)
            rgb = (128, 128, 128) if lab is None else CLUSTER_COLOURS[names.index(str(lab)) % len(CLUSTER_COLOURS)]
            Image.new("RGB", (16, 16), rgb).save(f)
    adir = Store(store).artefact_dir("features", aid, create=True)
    w = PartWriter(adir, d, False, part_rows=max(1, (n + 2) // 3))
    meta = [{"image_id": ids[i], "path": paths[i], "label": labels[i], "split": None, "width": 16, "height": 16}
            for i in range(n)]
    w.add(meta, np.ascontiguousarray(feats, np.float32))
    files = [dict(e, role="part") for e in w.close()]
    write_manifest(adir, {"kind": "features", "artefact_id": aid, "dataset_root": str(root), "dim": d, "rows": n,
                          "with_preds": False, "extra_columns": [], "model": {"arch": "synthetic", "weights": "none"},
                          "layer": {"alias": None, "name": "synthetic", "side": "output"}, "files": files})
    return aid
