"""Index artefacts (store kind ``indexes``): a FAISS index file, its id map, optional kNN graphs, a manifest.

Layout of ``<store>/indexes/<artefact_id>/`` (every data file listed in ``manifest.json`` with its sha256):

- ``index-<sha16>.faiss`` (role ``index``): the CPU FAISS index in FAISS's own file format (written by FAISS, or
  for ``Flat`` / ``…,RFlat`` byte-identically by ``tasks.core.faiss_files`` with the vectors streamed). Its sha256 is
  verified before **every** load; a mismatch raises :class:`ChecksumError` naming the file.
- ``idmap-<sha16>.parquet`` (role ``idmap``): one row per FAISS row: ``row`` int64 (FAISS row number),
  ``image_id``, ``path`` (relative to the dataset root), ``label``, ``split`` (strings, nullable).
- ``knn-k<K>-<sha16>.parquet`` (role ``knn``, ``k`` = K): the all-rows kNN graph written by
  ``convlens neighbors --all -k K`` (columns in :data:`KNN_COLUMNS`).

File names carry their content hash, so an update writes new files and publishes a new manifest last. A reader
of the previous manifest keeps valid files until the publish after that one: garbage removal only deletes files
listed by neither the new manifest nor the one it replaced (:func:`publish_index_manifest`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import TMP_PREFIX, fsync_dir, sha256_bytes, sha256_file
from storage.errors import ChecksumError, StoreError
from storage.features import remove_garbage
from storage.manifest import MANIFEST_NAME, read_manifest, safe_member, write_manifest

__all__ = [
    "IDMAP_COLUMNS",
    "KNN_COLUMNS",
    "idmap_schema",
    "knn_schema",
    "load_index_bytes",
    "index_file_path",
    "publish_index_file",
    "read_idmap",
    "read_idmap_table",
    "KnnGraphWriter",
    "IdmapWriter",
    "read_knn_graph",
    "knn_graph_file",
    "file_with_role",
    "publish_index_manifest",
]

IDMAP_COLUMNS = ("row", "image_id", "path", "label", "split")
KNN_COLUMNS = ("row", "image_id", "path", "rank", "neighbor_row", "neighbor_id", "neighbor_path", "distance")


def idmap_schema() -> pa.Schema:
    return pa.schema([("row", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                      ("label", pa.string()), ("split", pa.string())])


def knn_schema() -> pa.Schema:
    """kNN graph: ``rank`` is 1-based; ``distance`` is ``1 - cos`` (cosine index) or squared L2 (l2 index)."""
    return pa.schema([("row", pa.int64()), ("image_id", pa.string()), ("path", pa.string()), ("rank", pa.int32()),
                      ("neighbor_row", pa.int64()), ("neighbor_id", pa.string()), ("neighbor_path", pa.string()),
                      ("distance", pa.float32())])


def _entry(name: str, data_len: int, digest: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bytes": data_len, "sha256": digest, **extra}


def file_with_role(manifest: dict[str, Any], role: str, **match: Any) -> dict[str, Any] | None:
    """The manifest's file entry with ``role`` (and matching extra keys), or None."""
    for e in manifest.get("files", []):
        if e.get("role") == role and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def _verified(adir: Path, entry: dict[str, Any], what: str) -> Path:
    path = safe_member(adir, entry["name"])
    if not path.is_file():
        raise ChecksumError(f"{what} file {path} is listed in the manifest but missing; rebuild with `convlens index --rebuild`")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ChecksumError(
            f"checksum mismatch for {what} file {path}: manifest says sha256 {entry['sha256'][:16]}…, file has "
            f"{digest[:16]}…; the file was modified or corrupted — rebuild it with `convlens index --rebuild`"
        )
    return path


def load_index_bytes(adir: Path, manifest: dict[str, Any]) -> bytes:
    """The index file's bytes after verifying its sha256 against the manifest (:class:`ChecksumError` if not)."""
    entry = file_with_role(manifest, "index")
    if entry is None:
        raise StoreError(f"index artefact {adir} lists no index file; rebuild it with `convlens index --rebuild`")
    path = _verified(Path(adir), entry, "index")
    data = path.read_bytes()
    if sha256_bytes(data) != entry["sha256"]:  # changed between hashing and reading
        raise ChecksumError(f"checksum mismatch for index file {path} (changed while loading); retry or rebuild")
    return data


def index_file_path(adir: Path, manifest: dict[str, Any]) -> Path:
    """The index file's path after verifying its sha256 (streamed: no copy of the index in memory); the caller
    reads it with FAISS (``tasks.core.faiss_index.read_index_file``). :class:`ChecksumError` on a mismatch."""
    entry = file_with_role(manifest, "index")
    if entry is None:
        raise StoreError(f"index artefact {adir} lists no index file; rebuild it with `convlens index --rebuild`")
    return _verified(Path(adir), entry, "index")


def publish_index_file(adir: Path, tmp: Path) -> dict[str, Any]:
    """Name a fully written temp index file ``index-<sha16>.faiss`` (fsync, hash streamed, rename); return its
    manifest entry. Memory O(1)."""
    tmp = Path(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    digest = sha256_file(tmp)
    name = f"index-{digest[:16]}.faiss"
    size = tmp.stat().st_size
    os.replace(tmp, Path(adir) / name)
    fsync_dir(adir)
    return _entry(name, size, digest, role="index")


def read_idmap_table(adir: Path, manifest: dict[str, Any]) -> pa.Table:
    """The verified id map as an Arrow table sorted by ``row`` (no Python object per row)."""
    entry = file_with_role(manifest, "idmap")
    if entry is None:
        raise StoreError(f"index artefact {adir} lists no id map; rebuild it with `convlens index --rebuild`")
    path = _verified(Path(adir), entry, "id map")
    return pq.read_table(path).sort_by("row")


def read_idmap(adir: Path, manifest: dict[str, Any]) -> pd.DataFrame:
    """The verified id map as a DataFrame sorted by ``row``."""
    return read_idmap_table(adir, manifest).to_pandas()


class _ParquetStream:
    """Streams blocks into a temp Parquet file; :meth:`close` fsyncs it and renames it to
    ``<stem>-<sha16>.parquet``, returning its manifest entry. Memory O(block). On error call :meth:`abort` (the temp
    file is removed)."""

    def __init__(self, adir: Path, stem: str, schema: pa.Schema, columns: tuple[str, ...], **entry: Any) -> None:
        self.adir, self.stem, self.schema, self.columns, self.entry = Path(adir), stem, schema, columns, entry
        self.tmp = self.adir / f"{TMP_PREFIX}{stem}-{os.getpid()}.parquet"
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.rows = 0

    def _write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=65536)
        self.rows += table.num_rows

    def close(self) -> dict[str, Any]:
        self.writer.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = sha256_file(self.tmp)
        name = f"{self.stem}-{digest[:16]}.parquet"
        os.replace(self.tmp, self.adir / name)
        fsync_dir(self.adir)
        return _entry(name, (self.adir / name).stat().st_size, digest, **self.entry, rows=self.rows)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class KnnGraphWriter(_ParquetStream):
    """Streams kNN-graph blocks into ``knn-k<K>-<sha16>.parquet`` (:class:`_ParquetStream`). Memory O(block x k)."""

    def __init__(self, adir: Path, k: int) -> None:
        self.k = int(k)
        super().__init__(adir, f"knn-k{self.k}", knn_schema(), KNN_COLUMNS, role="knn", k=self.k)

    def add(self, block: dict[str, Any]) -> None:
        self._write(pa.table({c: block[c] for c in KNN_COLUMNS}, schema=knn_schema()))


class IdmapWriter(_ParquetStream):
    """Streams id-map rows (``row`` + the feature table's ``image_id, path, label, split``) into
    ``idmap-<sha16>.parquet`` while an index is built (:class:`_ParquetStream`): no id map of every row in memory."""

    def __init__(self, adir: Path) -> None:
        super().__init__(adir, "idmap", idmap_schema(), IDMAP_COLUMNS, role="idmap")

    def add(self, first_row: int, meta: pd.DataFrame | pa.Table) -> None:
        """Rows ``first_row, first_row + 1, ...`` for the records of ``meta`` (extra columns are ignored)."""
        tbl = meta if isinstance(meta, pa.Table) else pa.Table.from_pandas(meta, preserve_index=False)
        cols = {"row": pa.array(np.arange(first_row, first_row + tbl.num_rows, dtype=np.int64))}
        for c in IDMAP_COLUMNS[1:]:
            col = tbl.column(c) if c in tbl.column_names else pa.nulls(tbl.num_rows, pa.string())
            cols[c] = col.cast(pa.string())
        self._write(pa.table(cols, schema=idmap_schema()))


def knn_graph_file(adir: Path, manifest: dict[str, Any], k: int | None = None) -> tuple[Path, int]:
    """``(verified path, K)`` of the stored kNN graph with the smallest K >= ``k`` (the largest when ``k`` is None),
    for a reader that streams it (``pyarrow.parquet.ParquetFile.iter_batches``). Raises :class:`StoreError` when
    none is stored."""
    graphs = [e for e in manifest.get("files", []) if e.get("role") == "knn"]
    usable = [e for e in graphs if k is None or int(e.get("k", 0)) >= k]
    if not usable:
        have = ", ".join(str(e.get("k")) for e in graphs) or "none"
        raise StoreError(f"index {Path(adir).name} has no kNN graph with k >= {k} (stored: {have}); "
                         f"run `convlens neighbors --all -k {k or 10} --store ...`")
    entry = min(usable, key=lambda e: int(e["k"])) if k is not None else max(usable, key=lambda e: int(e["k"]))
    return _verified(Path(adir), entry, "kNN graph"), int(entry["k"])


def read_knn_graph(adir: Path, manifest: dict[str, Any], k: int | None = None,
                   columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """A verified kNN graph of the index: the one with exactly ``k`` (or the largest K >= k, cut to ranks <= k).
    ``columns``: read only these (e.g. the numeric ``row, rank, neighbor_row, distance``: ~24 B per edge instead of
    ~400 B with the id and path strings); ``rank`` is read too when a cut is needed.

    Raises :class:`StoreError` when none is stored (build it with ``convlens neighbors --all -k K``).
    """
    path, stored_k = knn_graph_file(adir, manifest, k)
    cut = k is not None and stored_k > k
    cols = None if columns is None else list(dict.fromkeys([*columns, *(["rank"] if cut else [])]))
    df = pq.read_table(path, columns=cols).to_pandas()
    if cut:
        df = df[df["rank"] <= k].reset_index(drop=True)
        if columns is not None and "rank" not in columns:
            df = df.drop(columns="rank")
    return df


def publish_index_manifest(adir: Path, manifest: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """Publish ``manifest`` (atomically, last) and remove the files neither it nor the manifest it replaces
    lists. Caller holds the lock.

    A reader that read the previous manifest just before this publish can still open every file that manifest
    lists: those files stay until the next publish after this one (garbage = listed by neither the new nor the
    previous manifest, plus leftovers of interrupted runs).
    """
    adir = Path(adir)
    previous = _listed_names(adir)
    out = write_manifest(adir, manifest)
    remove_garbage(adir, out, keep=(*keep, *previous))
    return out


def _listed_names(adir: Path) -> list[str]:
    """File names the currently published manifest of ``adir`` lists (none when absent or unreadable)."""
    if not (adir / MANIFEST_NAME).is_file():
        return []
    try:
        return [e["name"] for e in read_manifest(adir).get("files", [])]
    except StoreError:  # unreadable (torn or edited): nobody can be reading it; its files are garbage
        return []

