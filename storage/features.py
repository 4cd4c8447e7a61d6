"""The Parquet feature store: bounded parts, a rejects table, a journal for resumable runs, a manifest.

Feature table columns (one row per listed path; ``image_id`` may repeat for identical files):
``image_id`` string (sha256 of the bytes), ``path`` string (relative to the dataset root), ``label`` string?,
``split`` string?, ``width`` / ``height`` int32 (pixels, after EXIF rotation), ``feature``
``fixed_size_list<float32>[D]``, ``pred_top5`` ``fixed_size_list<int32>[5]``?, ``prob_top5``
``fixed_size_list<float32>[5]``?, then any extra list columns (as strings).

Parts are named after their content hash (``part-<sha16>.parquet``), written atomically; a part becomes
trusted only when a manifest lists it. While a run is in progress, finished parts are recorded in
``journal.json`` so a killed run resumes without redoing them; readers never look at the journal.
:class:`PartWriter` also records in each part's entry what the publish's quality gate needs (``nonfinite``
rows, ``nonzero``), so a publish never re-reads a part it keeps.

Cheap re-checks (:class:`FileStamps`): a full sha256 of every listed file on every run is O(store bytes). A stamp
records, per listed file, the ``(size, mtime_ns, inode)`` it had when its sha256 was last known to match the
manifest (a full check, or the writer's own bytes); while the file still has that stamp it is trusted without
re-reading it, and a file whose stamp changed is hashed in full. A file modified within
:data:`STAMP_RACY_NS` of being stamped is hashed again (mtime granularity: the "racy git" rule). What a stamp cannot
see is a change that keeps size, mtime and inode (bit rot on the medium, or a deliberate rewrite that restores the
mtime): ``convlens verify`` (full sha256 of everything) finds those, and any read that fails to parse drops the
part just the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
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
    "COMPUTED_COLUMNS",
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
    "STAMP_RACY_NS",
    "FileStamps",
    "part_gate",
    "read_part_columns",
]

log = logging.getLogger(__name__)
META_COLUMNS = ("image_id", "path", "label", "split", "width", "height")
# Columns the extraction computes (every feature_schema column except the listed path / label / split): an image
# list may not carry a column of one of these names (tasks.core.datasets refuses it, in any letter case).
COMPUTED_COLUMNS = ("image_id", "width", "height", "feature", "pred_top5", "prob_top5")
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
    # Same name = same content: keep an existing file only if its bytes really are these (a corrupted file of the
    # same size must be rewritten, or a repair would list it again under the right checksum).
    if not (path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == digest):
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
        head = feats[:n]
        nonfinite = int((~np.isfinite(head)).any(axis=1).sum()) if n else 0
        nonzero = bool(np.any(head != 0))
        self._feats = [rest_feats] if len(rest_feats) else []
        self._n -= n
        entry = write_part(self.directory, table)
        entry.update(nonfinite=nonfinite, nonzero=nonzero)  # the publish's quality gate reads these, not the part
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


def read_part_columns(directory: Path, entry: dict[str, Any], columns: Sequence[str]) -> pa.Table:
    """Some columns of a part, without its checksum (the caller trusts it: a :class:`FileStamps` check or the
    manifest it is listed in). Columns the part lacks are left out. Raises :class:`StoreError` when the file is
    gone or does not parse. Memory O(rows x the columns asked)."""
    path = safe_member(directory, entry["name"])
    try:
        pf = pq.ParquetFile(path)
        have = set(pf.schema_arrow.names)
        return pf.read(columns=[c for c in columns if c in have])
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def part_gate(directory: Path, entry: dict[str, Any], rows: Sequence[int] | None = None) -> tuple[int, bool]:
    """``(rows with a NaN / Inf feature, any feature value != 0)`` of a part's ``rows`` (all when None): from the
    entry when :class:`PartWriter` recorded them and all rows are meant, else read from the ``feature`` column."""
    if rows is None and "nonfinite" in entry and "nonzero" in entry:
        return int(entry["nonfinite"]), bool(entry["nonzero"])
    t = read_part_columns(directory, entry, ["feature"])
    col = t.column("feature").combine_chunks()
    feats = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
    if rows is not None:
        feats = feats[np.asarray(rows, np.int64)]
    if not len(feats):
        return 0, False
    return int((~np.isfinite(feats)).any(axis=1).sum()), bool(np.any(feats != 0))


STAMP_RACY_NS = 2_000_000_000
"""A file whose mtime lies within this long before it was stamped may still change within the same mtime tick
(coarse kernel clocks, 1-2 s on some filesystems): it is hashed in full next time and stamped again."""


class FileStamps:
    """Per artefact: for each listed file name, the ``(bytes, mtime_ns, inode, sha256, stamped_ns)`` it had when its
    content was last known to match ``sha256``. Stored as JSON at ``path`` (in the store's ``cache/``, outside
    every artefact, so ``convlens verify`` and readers never see it); written atomically by :meth:`save`.

    :meth:`check` trusts a file whose stamp is current and not racy, else hashes it in full (raising
    :class:`ChecksumError` on a mismatch, :class:`StoreError` when it is missing) and stamps it. Stamps are an
    optimisation: a missing or unreadable stamp file only means full hashes. Memory O(listed files).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.data: dict[str, list[Any]] = {}
        self.changed = False
        self.hashed = 0
        if self.path is not None and self.path.is_file():
            try:
                raw = json.loads(self.path.read_text("utf-8"))
                self.data = {str(k): list(v) for k, v in raw.get("files", {}).items() if isinstance(v, list) and len(v) == 5}
            except (OSError, ValueError, AttributeError):
                log.warning("ignoring unreadable stamp file %s (files are hashed in full)", self.path)

    def trusted(self, directory: Path, entry: dict[str, Any]) -> bool:
        """True when ``entry``'s file has the stamp recorded for its ``sha256`` and the stamp is not racy."""
        stamp = self.data.get(entry["name"])
        if stamp is None or stamp[3] != entry.get("sha256"):
            return False
        try:
            st = os.stat(safe_member(directory, entry["name"]))
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns, st.st_ino) == tuple(stamp[:3]) and st.st_mtime_ns < int(stamp[4]) - STAMP_RACY_NS

    def record(self, directory: Path, entry: dict[str, Any]) -> None:
        """Stamp ``entry``'s file as holding ``entry["sha256"]`` now (the caller just hashed or wrote it)."""
        try:
            st = os.stat(safe_member(directory, entry["name"]))
        except OSError:
            return
        self.data[entry["name"]] = [st.st_size, st.st_mtime_ns, st.st_ino, entry.get("sha256"), time.time_ns()]
        self.changed = True

    def check(self, directory: Path, entry: dict[str, Any]) -> None:
        """Make sure ``entry``'s file holds its ``sha256``: by its stamp, else by hashing it in full (then stamped)."""
        if self.trusted(directory, entry):
            return
        path = safe_member(directory, entry["name"])
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise ChecksumError(f"{path} is listed in the manifest but missing; rebuild the artefact") from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        self.hashed += 1
        if digest != entry.get("sha256"):
            raise ChecksumError(f"checksum mismatch for {path}: the file was modified or corrupted")
        self.record(directory, entry)

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget stamps of files no longer listed."""
        keep = set(names)
        gone = [n for n in self.data if n not in keep]
        for n in gone:
            del self.data[n]
        self.changed = self.changed or bool(gone)

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": 1, "files": self.data})
            self.changed = False
        except OSError as exc:  # an optimisation only: the next run hashes in full
            log.warning("could not write the stamp file %s: %s", self.path, exc)
