"""The Parquet feature store: bounded parts, a rejects table, a journal for resumable runs, a manifest.

Feature table columns (one row per listed path; ``image_id`` may repeat for identical files):
``image_id`` string (sha256 of the bytes), ``path`` string (relative to the dataset root), ``label`` string?,
``split`` string?, ``width`` / ``height`` int32 (pixels, after EXIF rotation), ``feature``
``fixed_size_list<float32>[D]``, ``pred_top5`` ``fixed_size_list<int32>[5]``?, ``prob_top5``
``fixed_size_list<float32>[5]``?, then any extra list columns (as strings).

Parts are named after their content hash (``part-<sha16>.parquet``), written atomically; a part becomes
trusted only when a manifest lists it. While a run is in progress, finished parts are recorded in
``journal.json`` so a killed run resumes without redoing them; readers never look at the journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import TMP_PREFIX, atomic_write_json, fsync_dir, sha256_bytes, sha256_file
from storage.errors import ChecksumError, StoreError, UsageError
from storage.locks import LOCK_NAME
from storage.manifest import MANIFEST_NAME, read_manifest, safe_member

__all__ = [
    "META_COLUMNS",
    "JOURNAL_NAME",
    "feature_schema",
    "rejects_schema",
    "write_part",
    "PartWriter",
    "read_journal",
    "write_journal",
    "read_part",
    "part_entries",
    "read_feature_table",
    "read_meta",
    "load_features",
    "iter_feature_batches",
    "remove_garbage",
]

log = logging.getLogger(__name__)
META_COLUMNS = ("image_id", "path", "label", "split", "width", "height")
JOURNAL_NAME = "journal.json"
_KEEP = {MANIFEST_NAME, LOCK_NAME, JOURNAL_NAME}


def feature_schema(dim: int, with_preds: bool, extra_columns: Sequence[str] = ()) -> pa.Schema:
    """Arrow schema of a feature part with ``dim``-d features."""
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("feature", pa.list_(pa.float32(), dim), nullable=False),
    ]
    if with_preds:
        fields += [pa.field("pred_top5", pa.list_(pa.int32(), 5)), pa.field("prob_top5", pa.list_(pa.float32(), 5))]
    fields += [pa.field(c, pa.string()) for c in extra_columns]
    return pa.schema(fields)


def rejects_schema() -> pa.Schema:
    return pa.schema([("path", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("image_id", pa.string())])


def _fixed_list(arr: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    arr = np.ascontiguousarray(arr)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), type=dtype), arr.shape[1])


def write_part(directory: Path, table: pa.Table, prefix: str = "part") -> dict[str, Any]:
    """Write ``table`` as ``<prefix>-<sha16>.parquet`` atomically; return its manifest entry."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=8192)
    data = sink.getvalue().to_pybytes()
    digest = sha256_bytes(data)
    name = f"{prefix}-{digest[:16]}.parquet"
    path = directory / name
    if not (path.is_file() and path.stat().st_size == len(data)):
        from storage.atomic import atomic_write_bytes

        atomic_write_bytes(path, data)
    return {"name": name, "rows": table.num_rows, "bytes": len(data), "sha256": digest}


class PartWriter:
    """Buffers extracted rows and writes a part every ``part_rows`` rows. Memory O(part_rows x D).

    ``on_part`` is called with each new entry (the extraction records it in the journal).
    """

    def __init__(self, directory: Path, dim: int, with_preds: bool, extra_columns: Sequence[str] = (),
                 part_rows: int = 16384, on_part=None) -> None:
        self.directory = Path(directory)
        self.schema = feature_schema(dim, with_preds, extra_columns)
        self.dim = dim
        self.with_preds = with_preds
        self.extra_columns = list(extra_columns)
        self.part_rows = max(1, part_rows)
        self.on_part = on_part
        self.entries: list[dict[str, Any]] = []
        self._meta: list[dict[str, Any]] = []
        self._feats: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._n = 0

    def add(self, meta: list[dict[str, Any]], feats: np.ndarray, preds: np.ndarray | None = None,
            probs: np.ndarray | None = None) -> None:
        """Add rows: ``meta`` dicts with META_COLUMNS (+ extras), ``feats`` (n, D) float32."""
        if feats.shape != (len(meta), self.dim):
            raise UsageError(f"features of shape {feats.shape} do not match {len(meta)} rows x D={self.dim}")
        self._meta.extend(meta)
        self._feats.append(feats.astype(np.float32, copy=False))
        if self.with_preds:
            self._preds.append(preds.astype(np.int32, copy=False))
            self._probs.append(probs.astype(np.float32, copy=False))
        self._n += len(meta)
        while self._n >= self.part_rows:
            self._flush(self.part_rows)

    def close(self) -> list[dict[str, Any]]:
        if self._n:
            self._flush(self._n)
        return self.entries

    def _flush(self, n: int) -> None:
        feats = np.concatenate(self._feats) if len(self._feats) > 1 else self._feats[0]
        meta, self._meta = self._meta[:n], self._meta[n:]
        rest_feats = feats[n:]
        cols: dict[str, Any] = {c: [m.get(c) for m in meta] for c in META_COLUMNS}
        cols["feature"] = _fixed_list(feats[:n], pa.float32())
        if self.with_preds:
            preds = np.concatenate(self._preds)
            probs = np.concatenate(self._probs)
            cols["pred_top5"] = _fixed_list(preds[:n], pa.int32())
            cols["prob_top5"] = _fixed_list(probs[:n], pa.float32())
            self._preds, self._probs = ([preds[n:]], [probs[n:]]) if len(preds) > n else ([], [])
        for c in self.extra_columns:
            cols[c] = [None if m.get(c) is None else str(m.get(c)) for m in meta]
        table = pa.table(cols, schema=self.schema)
        self._feats = [rest_feats] if len(rest_feats) else []
        self._n -= n
        entry = write_part(self.directory, table)
        self.entries.append(entry)
        if self.on_part is not None:
            self.on_part(entry)


def read_journal(directory: Path) -> dict[str, Any]:
    path = Path(directory) / JOURNAL_NAME
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("ignoring unreadable journal %s (interrupted write)", path)
        return {}


def write_journal(directory: Path, journal: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / JOURNAL_NAME, journal)


def read_part(directory: Path, entry: dict[str, Any], columns: Sequence[str] | None = None,
              verify: bool = True) -> pa.Table:
    """Read one part; with ``verify`` its sha256 is checked first (raises :class:`ChecksumError` naming it)."""
    path = safe_member(directory, entry["name"])
    if verify:
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise ChecksumError(f"{path} is listed in the manifest but missing; rebuild the artefact") from None
        if digest != entry["sha256"]:
            raise ChecksumError(
                f"checksum mismatch for {path}: manifest says sha256 {entry['sha256'][:16]}…, file has "
                f"{digest[:16]}…; the file was modified or corrupted — rebuild the artefact (`convlens verify` checks a store)"
            )
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def part_entries(manifest: dict[str, Any], role: str = "part") -> list[dict[str, Any]]:
    return [f for f in manifest.get("files", []) if f.get("role", "part") == role]


def read_feature_table(directory: Path, manifest: dict[str, Any] | None = None,
                       columns: Sequence[str] | None = None, verify: bool = True) -> pa.Table:
    """All parts listed by the manifest, concatenated. Memory O(rows x selected columns)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    tables = [read_part(directory, e, columns, verify) for e in part_entries(manifest)]
    if not tables:
        schema = feature_schema(int(manifest.get("dim", 1)), bool(manifest.get("with_preds")), manifest.get("extra_columns", []))
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


def read_meta(directory: Path, manifest: dict[str, Any] | None = None, verify: bool = True) -> pd.DataFrame:
    """Every column except ``feature`` as a DataFrame (one row per stored path)."""
    manifest = manifest or read_manifest(directory)
    schema_cols = ["image_id", "path", "label", "split", "width", "height"]
    if manifest.get("with_preds"):
        schema_cols += ["pred_top5", "prob_top5"]
    schema_cols += list(manifest.get("extra_columns", []))
    return read_feature_table(directory, manifest, schema_cols, verify).to_pandas()


def load_features(directory: Path, manifest: dict[str, Any] | None = None, verify: bool = True) -> tuple[pd.DataFrame, np.ndarray]:
    """``(meta, features)`` with features ``(N, D) float32`` in the same row order. Memory O(N x D)."""
    manifest = manifest or read_manifest(directory)
    metas, feats = [], []
    for batch_meta, batch_feats in iter_feature_batches(directory, manifest, verify=verify):
        metas.append(batch_meta)
        feats.append(batch_feats)
    dim = int(manifest.get("dim", 0))
    if not metas:
        return read_meta(directory, manifest, verify), np.zeros((0, dim), np.float32)
    return pd.concat(metas, ignore_index=True), np.concatenate(feats)


def iter_feature_batches(directory: Path, manifest: dict[str, Any] | None = None, batch_rows: int = 16384,
                         verify: bool = True) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Stream ``(meta, features)`` blocks of at most ``batch_rows`` rows. Memory O(batch_rows x D)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    dim = int(manifest["dim"])
    for entry in part_entries(manifest):
        path = safe_member(directory, entry["name"])
        read_part(directory, entry, columns=["image_id"], verify=verify)  # checksum once per part
        pf = pq.ParquetFile(path)
        for rb in pf.iter_batches(batch_size=batch_rows):
            tbl = pa.Table.from_batches([rb])
            feat_col = tbl.column("feature").combine_chunks()
            feats = feat_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
            meta = tbl.drop(["feature"]).to_pandas()
            yield meta, feats


def remove_garbage(directory: Path, manifest: dict[str, Any], keep: Iterable[str] = ()) -> list[str]:
    """Delete files not listed in the manifest (leftovers of interrupted runs). Returns removed names."""
    listed = {f["name"] for f in manifest.get("files", [])} | _KEEP | set(keep)
    removed = []
    for child in Path(directory).iterdir():
        if child.name in listed or child.is_dir():
            continue
        if child.name.startswith(TMP_PREFIX) or child.suffix in (".parquet", ".json", ".npz", ".png", ".faiss", ".tmp", ".npy"):
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
            removed.append(child.name)
    if removed:
        fsync_dir(directory)
    return removed
