"""Helpers for the index / neighbours / dataset-audit tests: synthetic feature artefacts written straight into a
store (no model), so the maths can be checked against NumPy on known vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from storage.features import PartWriter
from storage.manifest import write_manifest
from storage.paths import Store

__all__ = ["write_feature_artefact", "clustered"]


def write_feature_artefact(store: Path, feats: np.ndarray, labels: Sequence[str | None] | None = None,
                           splits: Sequence[str | None] | None = None, ids: Sequence[str] | None = None,
                           paths: Sequence[str] | None = None, aid: str = "synthetic-features",
                           dataset_root: str = "/nonexistent", created: str | None = None) -> str:
    """Publish ``feats`` (N, D) as a feature artefact; returns its id."""
    n, d = feats.shape
    s = Store(store)
    adir = s.artefact_dir("features", aid, create=True)
    labels = list(labels) if labels is not None else [None] * n
    splits = list(splits) if splits is not None else [None] * n
    ids = list(ids) if ids is not None else [f"{i:064x}" for i in range(n)]
    paths = list(paths) if paths is not None else [f"img/{i:05d}.png" for i in range(n)]
    w = PartWriter(adir, d, False, part_rows=max(1, (n + 2) // 3))
    meta = [{"image_id": ids[i], "path": paths[i], "label": labels[i], "split": splits[i], "width": 8, "height": 8}
            for i in range(n)]
    w.add(meta, feats.astype(np.float32))
    entries = w.close()
    m = {"kind": "features", "artefact_id": aid, "dataset_root": dataset_root, "dim": d, "rows": n,
         "with_preds": False, "extra_columns": [], "pool": "avg",
         "model": {"arch": "synthetic", "weights": "none"}, "layer": {"alias": "x", "name": "x", "side": "output"},
         "files": [dict(e, role="part") for e in entries]}
    if created:
        m["created"] = created
    write_manifest(adir, m)
    return aid


def clustered(n: int, d: int, centers: int, spread: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: ``(features (n, d) float32, cluster (n,) int)``."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    lab = rng.integers(0, centers, size=n)
    x = c[lab] + spread * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), lab
