"""Helpers for the index / neighbours / dataset-audit tests: synthetic feature artefacts written straight into a
store (no model), so the maths can be checked against NumPy on known vectors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from conftest import make_color_dataset
from storage.features import PartWriter
from storage.manifest import write_manifest
from storage.paths import Store

__all__ = ["write_feature_artefact", "clustered", "build_planted_dataset"]


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


def build_planted_dataset(root: Path) -> Path:
    """Colour classes (train/test) plus planted cases: an exact duplicate, a resized copy, a cross-split copy,
    a label flip (a red image filed as green) and a checkerboard / shifted (inverted) checkerboard / flat grey trio."""
    make_color_dataset(root, per_class=4, size=(48, 40))
    shutil.copy(root / "train/red/red_train_0.png", root / "train/red/dup_copy.png")
    Image.open(root / "train/green/green_train_1.png").resize((96, 80), Image.BILINEAR).save(root / "train/green/resized_copy.png")
    shutil.copy(root / "train/blue/blue_train_2.png", root / "test/blue/leak_copy.png")
    rng = np.random.default_rng(7)
    arr = np.clip(np.array([200, 30, 30]) + rng.integers(-25, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(root / "train/green/flip.png")
    yy, xx = np.mgrid[0:48, 0:48]
    a = (((yy // 8) + (xx // 8)) % 2 * 255).astype(np.uint8)
    (root / "test/pattern").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([a] * 3, -1)).save(root / "test/pattern/checker.png")
    Image.fromarray(np.stack([255 - a] * 3, -1)).save(root / "test/pattern/checker_shifted.png")
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(root / "test/pattern/grey.png")
    return root
