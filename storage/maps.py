"""Reader of ``maps`` artefacts (PCA / t-SNE / UMAP coordinates written by :mod:`tasks.maps.projection`).

A map holds ``coords.parquet`` (role ``coords``) and, since map format 2, ``reference.npz`` (role ``reference``:
what placing new rows into the map needs; read by :mod:`tasks.maps.projection`)."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from storage.artefacts import artefacts_of, newest_of
from storage.atomic import sha256_file
from storage.errors import ChecksumError, StoreError
from storage.manifest import read_manifest, safe_member
from storage.paths import Store

__all__ = ["COORDS_NAME", "REFERENCE_NAME", "resolve_map", "read_coords"]

COORDS_NAME = "coords.parquet"
REFERENCE_NAME = "reference.npz"


def resolve_map(store: str | os.PathLike[str], map_id: str | None = None, method: str | None = None) -> tuple[str, dict[str, Any]]:
    """A published map: ``map_id`` (or unique prefix), else the newest one (of ``method`` when given)."""
    s = Store(store)
    if map_id:
        aid, m, _ = newest_of(s, "maps", map_id)
        return aid, m
    items = [(aid, m) for aid, m, _ in artefacts_of(s, "maps") if method is None or m.get("method") == method]
    if not items:
        what = f"{method} map" if method else "map"
        raise StoreError(f"no published {what} in store {s.root}; run `convlens project --store {store} "
                         f"--method {method or 'tsne'}` first")
    return items[0]


def read_coords(map_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> pd.DataFrame:
    """The map's coordinate table (checksum verified): ``row, image_id, path, label, x, y[, z]``."""
    manifest = manifest or read_manifest(map_dir)
    entry = next((f for f in manifest.get("files", []) if f.get("role") == "coords"), None)
    if entry is None:
        raise StoreError(f"map {map_dir} lists no coords file; rebuild it with `convlens project`")
    path = safe_member(map_dir, entry["name"])
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise ChecksumError(f"{path} is missing or does not match its manifest sha256; rebuild the map "
                            "with `convlens project ... --force`")
    return pq.read_table(path).to_pandas()
