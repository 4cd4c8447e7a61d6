"""Dataset listing and content hashing.

DATA is an image folder (class sub-folders become ``label``; a ``train``/``val``/``test`` level becomes
``split``) or a CSV / Parquet list with a ``path`` column and optional ``label``, ``split`` and any extra
columns (kept). Relative list paths resolve against the list's folder (or ``root``); entries that escape it
are rejected unless ``allow_outside`` is set. The same rule holds in a folder: a symlinked file or directory
whose target lies outside the folder is a reject row (``outside-root``) unless ``allow_outside`` is set (then a
linked directory is walked too, each real directory at most once through links).

A list may not carry a column the feature table computes (:data:`storage.features.COMPUTED_COLUMNS`, in any
letter case) nor a case variant of ``path`` / ``label`` / ``split``: :class:`UsageError` at listing time, before
any model work. A list's size is capped before it is read (:class:`ListLimits`: file bytes, rows, and for
Parquet the uncompressed size its metadata states and the decoded size while reading). An entry listed twice
(the same normalised path) is kept once; the repeat is a ``duplicate-entry`` reject row.

Listing streams: :func:`open_listing` checks DATA (and reads a list, capped) up front, then yields records
directory by directory (a folder) or row by row (a list); :func:`list_dataset` collects them.

Hashing (``image_id`` = sha256 of the file's bytes) streams too: :func:`iter_hashed` takes records in chunks of
``chunk_size``, worker threads ``stat`` and hash them, and the caller gets each chunk back in listing order. A
cache keyed by path, size, mtime and inode (:class:`HashCache`) skips files that did not change; it is written
incrementally (an append-only journal per run next to the cache file, flushed after every chunk), so a killed
first run resumes from the files it had hashed, and compacted into one Parquet file when a run completes.

The planner's path is columnar (:func:`iter_hashed_tables`, :func:`hash_listing`): a folder's walk ``stat`` goes
straight into a :class:`RecordTable` (Arrow / numpy columns, no Python object per file) and each chunk is looked
up in the cache in one vectorised step; only files to hash become :class:`ImageRecord` s.

Memory: O(chunk) records inside the hashing machinery. What stays O(number of files): what the caller keeps — a
:class:`RecordTable` (97 B per file with a 25-character path, measured) or a list of :class:`ImageRecord` (slotted:
~500 B each hashed) — and, while hashing, the hash cache, held as Arrow columns plus a sorted 8-byte key per entry
(~170 B each with a 47-character file path). Stored image ids are compared as 32-byte digests
(:func:`image_digests`, :class:`DigestSet`), never as a set of Python strings. Past :data:`SPILL_ROWS` rows a
collected table (:class:`RecordTableBuilder`: :func:`hash_listing`, :meth:`RecordTable.concat`, the planner), a
:class:`DigestSet` and a loaded :class:`HashCache` (entries) live in unlinked, memory-mapped temp files instead:
file-backed pages the kernel can evict, not anonymous memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import logging
import mmap
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import atomic_write_bytes, create_temp_file, fsync_dir, raise_if_disk_full, sha256_stream
from storage.errors import UsageError
from storage.features import COMPUTED_COLUMNS
from tasks.core.images import EXTENSION_FORMATS, UNSUPPORTED_IMAGE_EXTENSIONS, RejectedImage, open_regular_file, os_error_reason

__all__ = [
    "ImageRecord",
    "Reject",
    "ListLimits",
    "LIST_COLUMNS",
    "RESERVED_COLUMNS",
    "SPLIT_NAMES",
    "Listing",
    "open_listing",
    "list_dataset",
    "check_list_columns",
    "HASH_CHUNK",
    "HashCache",
    "iter_hashed",
    "hash_records",
    "RecordTable",
    "RecordTableBuilder",
    "SPILL_ROWS",
    "iter_hashed_tables",
    "hash_listing",
    "image_digests",
    "DigestSet",
    "display_path",
    "is_url",
]

log = logging.getLogger(__name__)
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_LIST_SUFFIXES = {".csv", ".parquet", ".pq"}
LIST_COLUMNS = ("path", "label", "split")
"""Columns of an image list with a meaning (``path`` required); any other column is kept as a string column."""
RESERVED_COLUMNS = COMPUTED_COLUMNS
"""Column names an image list may not use (any letter case): the feature table computes them."""
_CSV_CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class ListLimits:
    """Caps on a CSV / Parquet image list, checked before (and while) it is read.

    ``max_rows``: entries; ``max_bytes``: the list file's size in bytes and, for Parquet, both the uncompressed
    size its metadata states and the Arrow size of what is decoded (a small, highly compressed file cannot expand
    to gigabytes in memory). Memory of a refused list: O(one CSV chunk or Parquet batch).
    """

    max_rows: int = 10_000_000
    max_bytes: int = 2 << 30

    def validate(self) -> None:
        if self.max_rows < 1:
            raise UsageError(f"--max-list-rows must be >= 1, got {self.max_rows}")
        if self.max_bytes < 1:
            raise UsageError(f"--max-list-bytes must be >= 1, got {self.max_bytes}")


class _NoExtras(Mapping):
    """The shared, immutable empty ``extras`` of a record listed from a folder (a dict per record costs 64 B)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self) -> str:
        return "NO_EXTRAS"


NO_EXTRAS = _NoExtras()


@dataclass(slots=True)
class ImageRecord:
    """One listed image. ``path`` is relative to the dataset root (display form); ``src`` opens it. Slotted: a
    hashed record with a 25-character path takes ~500 B (a :class:`RecordTable` row: ~100 B)."""

    path: str
    src: str
    label: str | None = None
    split: str | None = None
    extras: Mapping[str, Any] = NO_EXTRAS
    image_id: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    ino: int | None = None  # inode (local files): a file replaced by another of the same size and mtime is re-hashed


@dataclass
class Reject:
    path: str
    reason: str
    detail: str = ""


def display_path(p: str) -> str:
    """A path as a valid UTF-8 string (undecodable bytes shown as ``\\xNN``)."""
    if p.isascii():  # fast path: most paths (and the rerun of a 100k-file listing calls this 3x per file)
        return p
    return p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_url(text: str) -> bool:
    """True for an fsspec URL other than a plain local path (``s3://``, ``gs://``, ``memory://``, ...)."""
    return "://" in text and not text.startswith("file://")


def _split_label(parts: Sequence[str]) -> tuple[str | None, str | None]:
    split = None
    label_parts = list(parts)
    if parts and parts[0].lower() in SPLIT_NAMES:
        split = SPLIT_NAMES[parts[0].lower()]
        label_parts = list(parts[1:])
    return split, (display_path(label_parts[-1]) if label_parts else None)


def _url_mtime_ns(info: dict[str, Any]) -> int:
    """Best-effort modification time of an fsspec object in ns (-1 when the backend has none: never cached)."""
    import datetime as dt

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return int(float(v) * 1e9)
        if isinstance(v, dt.datetime):
            return int(v.timestamp() * 1e9)
        try:
            return int(dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            continue
    return -1


def check_list_columns(columns: Iterable[Any], where: str) -> None:
    """Refuse an image list whose columns collide with the feature table's own (:class:`UsageError` naming the
    column and saying to rename it). Compared in any letter case: DuckDB reads ``Width`` and ``width`` as one name."""
    for col in columns:
        name = str(col)
        low = name.lower()
        if low in RESERVED_COLUMNS:
            raise UsageError(
                f"{where}: column {name!r} is reserved: the feature table computes {low!r} itself "
                f"(reserved: {', '.join(RESERVED_COLUMNS)}, in any letter case); rename that column (e.g. to "
                f"'list_{low}') and rerun — nothing was extracted")
        if low in LIST_COLUMNS and name != low:
            raise UsageError(
                f"{where}: column {name!r} differs from the list column {low!r} only in letter case (DuckDB reads "
                f"them as one name); rename it to {low!r} if it holds the {low}, else give it another name")


def _too_big(where: str, what: str, limit: int, flag: str) -> UsageError:
    return UsageError(f"the image list {where} is too large: {what}, over the limit of {limit:,} ({flag}); nothing "
                      f"was read further. Split the list, or raise {flag} if the machine has the memory for it")


def _read_parquet_capped(source: Any, where: str, limits: ListLimits) -> pd.DataFrame:
    """Read a Parquet list after checking its metadata (rows, uncompressed bytes); decode in batches and stop as
    soon as the rows or the decoded size pass ``limits``; then check the column names. ``source``: a path or a
    binary file."""
    pf = pq.ParquetFile(source)
    md = pf.metadata
    if md.num_rows > limits.max_rows:
        raise _too_big(where, f"{md.num_rows:,} rows (its metadata)", limits.max_rows, "--max-list-rows")
    stated = 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        chunks = sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns))
        stated += max(rg.total_byte_size, chunks)
    if stated > limits.max_bytes:
        raise _too_big(where, f"{stated:,} bytes uncompressed (its metadata)", limits.max_bytes, "--max-list-bytes")
    batches, rows, decoded = [], 0, 0
    for batch in pf.iter_batches(batch_size=65536):
        rows += batch.num_rows
        decoded += batch.nbytes
        if rows > limits.max_rows:
            raise _too_big(where, f"{rows:,}+ rows", limits.max_rows, "--max-list-rows")
        if decoded > limits.max_bytes:
            raise _too_big(where, f"{decoded:,}+ bytes decoded", limits.max_bytes, "--max-list-bytes")
        batches.append(batch)
    df = pa.Table.from_batches(batches, schema=pf.schema_arrow).to_pandas()
    check_list_columns(df.columns, where)  # after to_pandas: a stored pandas index is not a column
    return df


def _read_csv_capped(source: Any, where: str, limits: ListLimits) -> pd.DataFrame:
    """Read a CSV list in chunks (all columns as strings), stopping once it passes ``limits.max_rows`` rows."""
    chunks = []
    rows = 0
    with pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[""], chunksize=_CSV_CHUNK_ROWS) as reader:
        for chunk in reader:
            if not chunks:
                check_list_columns(chunk.columns, where)
            rows += len(chunk)
            if rows > limits.max_rows:
                raise _too_big(where, f"{rows:,}+ rows", limits.max_rows, "--max-list-rows")
            chunks.append(chunk)
    if not chunks:  # pandas yields one empty chunk for a header-only file; nothing at all is not a list
        return pd.DataFrame()
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


def _list_url(url: str, limits: ListLimits = ListLimits()) -> tuple[list[ImageRecord], list[Reject], str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise UsageError(f"dataset {url!r} does not exist")
    proto = url.split("://", 1)[0]
    if not fs.isdir(root):
        suffix = Path(root).suffix.lower()
        if suffix not in _LIST_SUFFIXES:
            raise UsageError(f"dataset {url!r} is a file but not a .csv or .parquet list")
        size = int(fs.info(root).get("size") or 0)
        if size > limits.max_bytes:
            raise _too_big(url, f"{size:,} bytes", limits.max_bytes, "--max-list-bytes")
        with fs.open(root, "rb") as fh:
            df = _read_csv_capped(fh, url, limits) if suffix == ".csv" else _read_parquet_capped(fh, url, limits)
        base = root.rsplit("/", 1)[0]
        records, rejects = [], []
        if "path" not in df.columns:
            raise UsageError(f"{url} has no 'path' column")
        extra_cols = [c for c in df.columns if c not in LIST_COLUMNS]
        listed: dict[str, int] = {}
        for n, row in enumerate(df.to_dict("records")):
            rel = str(row["path"])
            if rel.startswith("/") or ".." in rel.split("/") or "://" in rel:
                rejects.append(Reject(rel, "outside-root", f"list entries must be relative paths under {base}"))
                continue
            if rel in listed:  # object-store keys are literal strings: compared as given
                rejects.append(_duplicate(rel, listed[rel], n))
                continue
            listed[rel] = n
            records.append(ImageRecord(path=rel, src=f"{proto}://{base}/{rel}",
                                       label=None if pd.isna(row.get("label")) else str(row.get("label")) if "label" in row else None,
                                       split=None if pd.isna(row.get("split")) else str(row.get("split")) if "split" in row else None,
                                       extras={c: row[c] for c in extra_cols} or NO_EXTRAS))
        return records, rejects, f"{proto}://{base}"
    root = root.rstrip("/")
    records = []
    for full in sorted(fs.find(root)):
        rel = full[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")) or not _is_candidate(rel):
            continue
        parts = rel.split("/")[:-1]
        split, label = _split_label(parts)
        records.append(ImageRecord(path=rel, src=f"{proto}://{full}", label=label, split=split))
    return records, [], f"{proto}://{root}"


_CANDIDATE_SUFFIXES = frozenset(EXTENSION_FORMATS) | UNSUPPORTED_IMAGE_EXTENSIONS
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _is_candidate(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _CANDIDATE_SUFFIXES  # same as splitext: a leading dot is no suffix


def _duplicate(path: str, first: int, again: int) -> Reject:
    return Reject(display_path(path), "duplicate-entry",
                  f"listed again at row {again + 1} (first at row {first + 1}); only the first entry is kept")


@dataclass(slots=True)
class _DirBatch:
    """One directory's listed candidates, in sorted order: ``names`` (raw, as the OS gives them), and for a plain
    regular file its ``size`` (bytes), ``mtime_ns`` and inode from the listing's ``stat``; ``-1`` when not stat-ed
    (a symlink, a directory named like an image, an unknown type or a failed stat: stat-ed when hashed)."""

    dirpath: str  # the directory as walked: a file's source is f"{dirpath}{os.sep}{name}"
    prefix: str  # its path relative to the root, raw, with a trailing separator ("" for the root)
    label: str | None
    split: str | None
    names: list[str]
    sizes: list[int]
    mtimes: list[int]
    inos: list[int]


def _walk_folder(root: Path, allow_outside: bool, out: Listing) -> Iterator[_DirBatch]:
    """Walk ``root`` (a resolved directory) in sorted, depth-first order, yielding each directory's candidates
    (:class:`_DirBatch`); hidden names are skipped. Rejects go to ``out.rejects``, the count of non-image files to
    ``out.skipped``.

    A symlink (file or directory) whose target lies outside ``root`` becomes an ``outside-root`` reject row
    unless ``allow_outside``, when a linked directory is walked too (each real directory at most once through
    links, so link cycles end). A symlinked directory inside ``root`` is not walked: its files are listed at
    their real path. Memory: one directory's entries plus the stack of directories still to walk.
    """
    rejects = out.rejects
    root_s = str(root)
    under = root_s.rstrip(os.sep) + os.sep

    def inside(real: str) -> bool:
        return real == root_s or real.startswith(under)

    walked_links: set[str] = set()
    stack: list[tuple[str, str]] = [(root_s, "")]  # (directory to scan, its path relative to root; "" = root)
    while stack:
        dirpath, rel_s = stack.pop()
        try:  # scandir on a directory fd: entry.stat() is then an fstatat relative to it (no path walk per file)
            dfd = os.open(dirpath, _DIR_FLAGS)
        except OSError as err:
            rejects.append(Reject(display_path(rel_s or "."), "unreadable", f"cannot list directory: {err.strerror}"))
            continue
        try:
            batch = _scan_directory(dfd, dirpath, rel_s, root_s, inside, allow_outside, walked_links, stack, out)
        finally:
            os.close(dfd)
        if batch is not None:
            yield batch


def _scan_directory(dfd: int, dirpath: str, rel_s: str, root_s: str, inside: Any, allow_outside: bool,
                    walked_links: set[str], stack: list[tuple[str, str]], out: Listing) -> _DirBatch | None:
    """One directory of :func:`_walk_folder` (open as ``dfd``): its candidates (``None`` when it has none); pushes
    its sub-directories.

    A plain regular file gets its ``size`` / ``mtime_ns`` / inode here (``stat`` relative to ``dfd``), so hashing
    does not ``stat`` it again; anything else (a symlink, an unknown type) is ``stat``-ed when it is hashed."""
    rejects = out.rejects
    sep = os.sep
    try:
        with os.scandir(dfd) as it:
            entries = list(it)
    except OSError as err:
        rejects.append(Reject(display_path(rel_s or "."), "unreadable", f"cannot list directory: {err.strerror}"))
        return None
    parts = tuple(rel_s.split(sep)) if rel_s else ()
    split, label = _split_label(parts)
    prefix = rel_s + sep if rel_s else ""
    rows: list[tuple[str, int, int, int]] = []  # (name, size, mtime_ns, inode); -1s: stat-ed when hashed
    dirs: list[str] = []  # walked below
    dir_names: list[str] = []  # every sub-directory, walked or not (a directory named like an image is listed)
    suffixes = _CANDIDATE_SUFFIXES
    is_reg = stat.S_ISREG
    skipped = 0
    for entry in entries:  # hot loop over 100k files on a rerun: d_type, then one fstatat per candidate file
        name = entry.name
        if name[:1] == ".":
            continue  # hidden file or directory
        if entry.is_file(follow_symlinks=False):  # a regular file (d_type; no syscall)
            dot = name.rfind(".")
            if dot <= 0 or name[dot:].lower() not in suffixes:
                skipped += 1
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                rows.append((name, -1, -1, -1))  # stat-ed (and rejected with its reason) when hashed
                continue
            if is_reg(st.st_mode):
                rows.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
            else:
                rows.append((name, -1, -1, -1))
            continue
        if entry.is_symlink():
            full = f"{dirpath}{sep}{name}"
            real = os.path.realpath(full)
            try:
                is_dir = entry.is_dir()  # follows the link
            except OSError:
                is_dir = False
            if not inside(real):
                if not allow_outside:
                    if is_dir or _is_candidate(name):
                        rejects.append(Reject(display_path(prefix + name), "outside-root",
                                              f"a symlink to {display_path(real)}, outside "
                                              f"{display_path(root_s)}; pass --allow-outside-root to permit"))
                    else:
                        skipped += 1
                    continue
                if is_dir:
                    dir_names.append(name)
                    if real not in walked_links:
                        walked_links.add(real)
                        dirs.append(name)
                    continue
            elif is_dir:
                dir_names.append(name)  # listed at its real path; not walked twice
                continue
        else:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                dir_names.append(name)
                dirs.append(name)
                continue
        # a symlink to a file, or a FIFO / socket / device: stat-ed (and judged) when hashed
        if _is_candidate(name):
            rows.append((name, -1, -1, -1))
        else:
            skipped += 1
    out.skipped += skipped
    rows.sort()  # by name (names are unique in a directory)
    # A sub-directory named like an image is listed so it becomes a reject row, not silently lost.
    rows.extend((name, -1, -1, -1) for name in sorted(d for d in dir_names if _is_candidate(d)))
    for name in sorted(dirs, reverse=True):  # popped in sorted order: depth-first, like os.walk
        stack.append((f"{dirpath}{sep}{name}", prefix + name))
    if not rows:
        return None
    names, sizes, mtimes, inos = map(list, zip(*rows))
    return _DirBatch(dirpath, prefix, label, split, names, sizes, mtimes, inos)


def _batch_records(batch: _DirBatch) -> list[ImageRecord]:
    """A directory's candidates as :class:`ImageRecord` s (size / mtime / inode filled where the listing stat-ed)."""
    sep = os.sep
    records = []
    for name, size, mtime, ino in zip(batch.names, batch.sizes, batch.mtimes, batch.inos):
        rel = batch.prefix + name
        rec = ImageRecord(rel if rel.isascii() else display_path(rel), f"{batch.dirpath}{sep}{name}", batch.label, batch.split)
        if size >= 0:
            rec.size, rec.mtime_ns, rec.ino = size, mtime, ino
        records.append(rec)
    return records


def _read_list(path: Path, limits: ListLimits) -> pd.DataFrame:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UsageError(f"cannot read the image list {path}: {exc.strerror or exc}") from None
    if size > limits.max_bytes:
        raise _too_big(str(path), f"{size:,} bytes", limits.max_bytes, "--max-list-bytes")
    try:
        if path.suffix.lower() == ".csv":
            return _read_csv_capped(path, str(path), limits)
        return _read_parquet_capped(path, str(path), limits)
    except UsageError:
        raise
    except (OSError, ValueError) as exc:  # unreadable, or not CSV / Parquet (pandas' and pyarrow's parse errors)
        raise UsageError(f"cannot read the image list {path}: {str(exc)[:300]}; give a CSV or Parquet file "
                         "with a 'path' column") from None


def _list_table(list_path: Path, root: Path | None, allow_outside: bool,
                limits: ListLimits = ListLimits()) -> tuple[Path, Iterator[tuple[ImageRecord | None, Reject | None]]]:
    """Read (capped) and check a CSV / Parquet list now; return its base folder and a lazy iterator over its rows,
    each an ``(ImageRecord, None)`` or ``(None, Reject)``."""
    df = _read_list(list_path, limits)
    if "path" not in df.columns:
        raise UsageError(
            f"{list_path} has no 'path' column (columns: {', '.join(map(str, df.columns))}); "
            "a list needs a 'path' column and may have 'label', 'split' and extra columns"
        )
    base = (root or list_path.parent).resolve()
    return base, _table_rows(df, base, allow_outside)


def _table_rows(df: pd.DataFrame, base: Path, allow_outside: bool) -> Iterator[tuple[ImageRecord | None, Reject | None]]:
    extra_cols = [c for c in df.columns if c not in LIST_COLUMNS]
    listed: dict[str, int] = {}
    for n, values in enumerate(zip(*(df[c] for c in df.columns))):
        row = dict(zip(df.columns, values))
        raw = row["path"]
        if raw is None or (isinstance(raw, float) and pd.isna(raw)) or str(raw) == "":
            yield None, Reject("", "bad-list-entry", "empty path")
            continue
        raw = str(raw)
        full = Path(raw) if os.path.isabs(raw) else base / raw
        try:
            resolved = full.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # symlink loop
            reason = os_error_reason(exc) if isinstance(exc, OSError) else "symlink-loop"
            yield None, Reject(display_path(raw), reason, str(exc))
            continue
        inside = resolved == base or base in resolved.parents
        if not inside and not allow_outside:
            yield None, Reject(display_path(raw), "outside-root",
                               f"resolves outside {display_path(str(base))}; pass --allow-outside-root to permit")
            continue
        rel = os.path.relpath(full, base) if not os.path.isabs(raw) else raw
        key = os.path.normpath(rel)  # "a.png", "./a.png" and "x/../a.png" are one entry
        if key in listed:
            yield None, _duplicate(raw, listed[key], n)  # as the list spells it, to find it there
            continue
        listed[key] = n
        label = row.get("label")
        split = row.get("split")
        extras = {c: row[c] for c in extra_cols}
        yield ImageRecord(
            path=display_path(rel), src=str(full),
            label=None if label is None or (isinstance(label, float) and pd.isna(label)) else str(label),
            split=None if split is None or (isinstance(split, float) and pd.isna(split)) else str(split),
            extras=extras if extras else NO_EXTRAS,
        ), None


@dataclass
class Listing:
    """A dataset being listed: ``root`` (a ``Path``, or the root URL for fsspec data) is known at once;
    ``records`` is a lazy iterator of :class:`ImageRecord` in listing order. ``rejects`` and ``skipped``
    (non-image files in a folder) fill up while ``records`` is consumed; they are complete once it is exhausted."""

    root: Path | str
    records: Iterator[ImageRecord] = field(default_factory=lambda: iter(()))
    rejects: list[Reject] = field(default_factory=list)
    skipped: int = 0
    batches: Iterator[_DirBatch] | None = None  # a folder: the walk itself, one directory at a time (``records``
    # reads it too: consume one or the other)


def _rows_to_records(rows: Iterator[tuple[ImageRecord | None, Reject | None]], out: Listing) -> Iterator[ImageRecord]:
    for rec, rej in rows:
        if rej is not None:
            out.rejects.append(rej)
        else:
            yield rec  # type: ignore[misc]


def _folder_records(batches: Iterator[_DirBatch], root: Path, out: Listing) -> Iterator[ImageRecord]:
    for batch in batches:
        yield from _batch_records(batch)
    if out.skipped:
        log.info("skipped %d non-image files in %s", out.skipped, root)


def open_listing(data: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                 allow_outside: bool = False, limits: ListLimits = ListLimits()) -> Listing:
    """Start listing DATA (local path or fsspec URL): everything that can fail for the dataset as a whole (it does
    not exist, is not a folder / CSV / Parquet list, is over ``limits``, has a reserved column
    (:data:`RESERVED_COLUMNS`)) raises :class:`UsageError` (a ``ValueError``) here, before any record is read.
    Records then stream (:class:`Listing`): a folder directory by directory, a list row by row.

    ``allow_outside``: accept list entries and folder symlinks that resolve outside the root (else each is an
    ``outside-root`` reject). Memory: one directory's entries for a folder; a list is read whole (capped by
    ``limits``) and its rows become records one at a time.
    """
    limits.validate()
    data = str(data)
    if data.startswith("file://"):
        data = data[len("file://"):]
    if is_url(data):
        records, rejects, url_root = _list_url(data, limits)
        return Listing(url_root, iter(records), list(rejects))
    path = Path(data).expanduser()
    if not path.exists():
        raise UsageError(f"dataset {data!r} does not exist; pass an image folder or a CSV/Parquet list with a 'path' column")
    if path.is_dir():
        root_path = path.resolve()
        out = Listing(root_path)
        out.batches = _walk_folder(root_path, allow_outside, out)
        out.records = _folder_records(out.batches, root_path, out)
        return out
    if path.suffix.lower() in _LIST_SUFFIXES:
        base, rows = _list_table(path.resolve(), Path(root).resolve() if root else None, allow_outside, limits)
        out = Listing(base)
        out.records = _rows_to_records(rows, out)
        return out
    raise UsageError(f"dataset {data!r} is a file but not a .csv or .parquet list; pass a folder or a list")


def list_dataset(data: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                 allow_outside: bool = False, limits: ListLimits = ListLimits()) -> tuple[list[ImageRecord], list[Reject], Path | str]:
    """List DATA whole (:func:`open_listing`, collected). Returns ``(records, rejects, dataset_root)`` — a ``Path``
    for local data, the root URL string for fsspec data. Raises :class:`UsageError` as :func:`open_listing` does.
    Memory: O(files) records."""
    listing = open_listing(data, root, allow_outside, limits)
    records = list(listing.records)
    return records, listing.rejects, listing.root


_CACHE_SCHEMA = pa.schema([("src", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("image_id", pa.string()),
                           ("ino", pa.int64())])


def _as_cache(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """A cache table or journal batch in :data:`_CACHE_SCHEMA`; one written before inodes were recorded gets
    ``ino = -1`` (unknown: matched on size and mtime alone, and filled in by the next complete run)."""
    if "ino" not in data.schema.names:
        data = data.append_column("ino", pa.array(np.full(data.num_rows, -1, np.int64)))
    return data.select(_CACHE_SCHEMA.names).cast(_CACHE_SCHEMA)
HASH_CHUNK = 4096
"""Records per hashing chunk (:func:`iter_hashed`): what the planner holds in flight, and how often the cache
journal is flushed."""


def _src_keys(srcs: Any) -> np.ndarray:
    """64-bit keys (SipHash, :func:`pandas.util.hash_array`) of source strings: ``(n,) uint64``."""
    arr = srcs if isinstance(srcs, np.ndarray) else np.asarray(list(srcs), dtype=object)
    if not len(arr):
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(arr, categorize=False)


class HashCache:
    """``src -> (size, mtime_ns, image_id, ino)`` for one dataset root: ``<cache>.parquet`` plus the journals of runs
    that did not finish (``<cache>.journal-*.arrows``, Arrow IPC streams, read up to their last whole batch).

    Lookup is vectorised per chunk: a sorted array of 64-bit keys of the ``src`` strings (the strings of each hit
    are compared too, so a key collision is never a hit). New hashes are appended to this run's journal and
    flushed after every chunk (:meth:`add`); :meth:`close` with ``complete`` rewrites the Parquet file with exactly
    the entries this run used or added (atomically) and removes the journals it read. A cache written before
    inodes were recorded is read with ``ino = -1`` (matched on size and mtime) and gets the inodes on its next
    complete run. Memory: the entries as Arrow columns plus 25 B of key, order, inode copy and used flag each:
    ~170 B per entry with a 47-character file path.

    Past ``spill_rows`` entries (default :data:`SPILL_ROWS`, read at call time) the cache spills (:attr:`spilled`):
    the Parquet file is read one row group at a time and the journals (memory-mapped) batch by batch, and the
    columns (``src`` as int64 offsets + bytes, size, mtime, inode, ``image_id`` as 32-byte digests when every id is
    64 lowercase hex digits, else as offsets + bytes too), the sorted keys and their order go to unlinked temp files
    in the cache's own folder, memory-mapped read-only (:func:`_spill_file`, :func:`_map_file`): file-backed pages the kernel can
    evict. The inodes are a copy-on-write map (``mmap.ACCESS_COPY``: only the pages of filled-in inodes become
    anonymous memory); ``used`` stays anonymous (1 B per entry). Loading sorts the keys with one ``np.argsort``
    (8 B per entry transient, ~80 MB at 10M entries; the sorted keys and order are written block by block).
    Transient besides: one row group of the Parquet file (the in-memory writer makes row groups of up to ~1M rows,
    the spilled one of :attr:`_SPILL_BATCH`).
    :meth:`close` then writes the new Parquet file streaming (kept rows slice by slice, then the new ones) to a temp
    file in the same folder and renames it into place. A run's new hashes are held in memory up to ``spill_rows``
    rows, then read back from its journal on :meth:`close`.
    """

    _SPILL_BATCH = 1 << 16
    """Rows per Parquet batch read and per slice written when spilled."""

    def __init__(self, path: Path | None, *, spill_rows: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        limit = SPILL_ROWS if spill_rows is None else int(spill_rows)
        if limit < 0:
            raise UsageError(f"spill_rows must be >= 0, got {spill_rows}")
        self.spill_rows = limit
        self._journal_paths: list[Path] = []
        self._writer: Any = None
        self._fh: Any = None
        self._own: Path | None = None
        self._new: list[pa.RecordBatch] = []
        self._new_rows = 0
        self._new_in_journal = False  # past spill_rows new rows: read back from this run's journal on close
        self._spilled = False
        journals: list[list[pa.RecordBatch]] = []
        if self.path is not None and self.path.parent.is_dir():
            for j in sorted(self.path.parent.glob(self.path.stem + ".journal-*.arrows")):
                journals.append(_read_journal(j))
                self._journal_paths.append(j)
        rows = sum(b.num_rows for bs in journals for b in bs)
        if self.path is not None and self.path.is_file():
            rows += _parquet_rows(self.path)
        if rows > limit:
            self._load_spilled([b for bs in journals for b in bs])
            return
        tables = []
        if self.path is not None and self.path.is_file():
            try:
                tables.append(_as_cache(pq.read_table(self.path)))
            except (OSError, pa.ArrowException) as exc:
                log.warning("ignoring unreadable hash cache %s: %s", self.path, exc)
        for batches in journals:
            if batches:
                tables.append(pa.Table.from_batches(batches, _CACHE_SCHEMA))
        table = pa.concat_tables(tables) if tables else _CACHE_SCHEMA.empty_table()
        self.table = table.combine_chunks()
        self._src = self.table.column("src")
        self._size = self.table.column("size").to_numpy(zero_copy_only=False)
        self._mtime = self.table.column("mtime_ns").to_numpy(zero_copy_only=False)
        self._ino = np.array(self.table.column("ino").to_numpy(zero_copy_only=False), np.int64)  # writable: filled
        self._ino_filled = False
        keys = np.concatenate([_src_keys(self._src.slice(i, 1 << 20).to_numpy(zero_copy_only=False))
                               for i in range(0, len(self.table), 1 << 20)]) if len(self.table) else np.zeros(0, np.uint64)
        order = np.argsort(keys, kind="stable")
        skeys = keys[order]
        last = np.ones(len(skeys), bool)  # the same src twice (a journal re-hashed it): the later entry wins
        if len(skeys) > 1:
            last[:-1] = skeys[:-1] != skeys[1:]
        self._keys, self._order = skeys[last], order[last]
        self.used = np.zeros(len(self.table), bool)
        self.entries = int(last.sum())

    def __len__(self) -> int:
        return self.entries

    def lookup_rows(self, keys: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray,
                    inos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised lookup of ``(src, size, mtime_ns, inode)``: ``keys`` ``(n,) object`` (display ``src``
        strings), the rest ``(n,) int64``. Returns ``(hits, rows)``, both ``(h,) int64``: the query positions that
        hit and their cache rows (for :meth:`digests`). A hit needs the same src string, size and mtime
        (``mtime_ns < 0`` never hits) and the same inode (an entry written before inodes were recorded, ``-1``,
        matches any and takes this one). Marks hits used. Memory: O(n)."""
        none = np.zeros(0, np.int64)
        if not len(self._keys) or not len(keys):
            return none, none
        q = _src_keys(keys)
        pos = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
        rows = self._order[pos]
        sz = np.asarray(sizes, np.int64)
        mt = np.asarray(mtimes, np.int64)
        ino = np.asarray(inos, np.int64)
        cino = self._ino[rows]
        cand = np.flatnonzero((self._keys[pos] == q) & (self._size[rows] == sz) & (self._mtime[rows] == mt) & (mt >= 0)
                              & ((cino == ino) | (cino < 0)))
        if not len(cand):
            return none, none
        names = self._src.take(pa.array(rows[cand]))
        same = pc.equal(names, pa.array(keys[cand], names.type)).to_numpy(zero_copy_only=False)
        hits = cand[same.astype(bool)]
        hit_rows = rows[hits]
        self.used[hit_rows] = True
        legacy = np.flatnonzero(self._ino[hit_rows] < 0)
        if len(legacy) and (ino[hits[legacy]] >= 0).any():
            self._ino[hit_rows[legacy]] = ino[hits[legacy]]
            self._ino_filled = True
        return hits.astype(np.int64), hit_rows.astype(np.int64)

    def digests(self, rows: np.ndarray) -> np.ndarray:
        """The ``(n,) S32`` image digests of cache ``rows`` (from :meth:`lookup_rows`)."""
        if self._spilled and self._id_digests is not None:
            return self._id_digests[np.asarray(rows, np.int64)]
        return image_digests(self._id_strings(rows))

    def _id_strings(self, rows: np.ndarray) -> pa.Array:
        """The ``image_id`` strings of cache ``rows`` (``(n,) int64``), as an Arrow array."""
        idx = pa.array(rows, pa.int64())
        if not self._spilled:
            return self.table.column("image_id").take(idx)
        if self._id_digests is not None:
            return _hex_strings(self._id_digests[np.asarray(rows, np.int64)])
        return self._ids.take(idx).cast(pa.string())

    @property
    def spilled(self) -> bool:
        """True when the columns live in memory-mapped temp files (more than ``spill_rows`` entries loaded)."""
        return self._spilled

    def _load_spilled(self, journal: list[pa.RecordBatch]) -> None:
        """Load the Parquet file (by row groups) and the ``journal`` batches into mapped temp files (see the class
        docstring); an unreadable Parquet file is ignored (logged), as in memory."""
        try:
            self._spill(self.path if self.path is not None and self.path.is_file() else None, journal)
        except (OSError, pa.ArrowException) as exc:
            log.warning("ignoring unreadable hash cache %s: %s", self.path, exc)
            self._spill(None, journal)

    def _spill(self, parquet: Path | None, journal: list[pa.RecordBatch]) -> None:
        """Write the entries of ``parquet`` (when given) then ``journal`` to temp files in the cache's folder and map
        them (a first pass over the ``image_id`` column decides digests or strings)."""
        spill_dir = self.path.parent if self.path is not None else None

        def batches(columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
            if parquet is not None:
                with pq.ParquetFile(parquet) as pf:
                    names = set(pf.schema_arrow.names)
                    cols = None if columns is None else [c for c in columns if c in names]
                    for rg in range(pf.num_row_groups):  # one at a time: a reader over all of them keeps
                        for b in pf.iter_batches(self._SPILL_BATCH, [rg], cols, use_threads=False):  # buffers
                            yield _as_cache(b) if columns is None else b
            for b in journal:
                yield b if columns is None else b.select(columns)

        hex_ids = all(_hex_digests(b.column(0)) is not None for b in batches(["image_id"]))
        names = ["src_offsets", "src_data", "size", "mtime", "ino", "keys"]
        names += ["ids"] if hex_ids else ["id_offsets", "id_data"]
        files: dict[str, Any] = {}
        maps: dict[str, Any] = {}
        try:
            for name in names:
                files[name] = _spill_file(spill_dir)
            n, src_pos, id_pos = 0, 0, 0
            _write_array(files["src_offsets"], np.zeros(1, np.int64))
            if not hex_ids:
                _write_array(files["id_offsets"], np.zeros(1, np.int64))
            for b in batches():
                src = b.column(0)
                src_pos = _write_strings(files["src_offsets"], files["src_data"], src, src_pos)
                _write_array(files["size"], b.column(1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
                _write_array(files["mtime"], b.column(2).to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
                _write_array(files["ino"], b.column(4).to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
                for i in range(0, len(src), HASH_CHUNK):  # a chunk of Python strings at a time
                    _write_array(files["keys"], _src_keys(src.slice(i, HASH_CHUNK).to_numpy(zero_copy_only=False)))
                if hex_ids:
                    _write_array(files["ids"], _hex_digests(b.column(3)))
                else:
                    id_pos = _write_strings(files["id_offsets"], files["id_data"], b.column(3), id_pos)
                n += b.num_rows
            for name in names:
                if name == "ino":  # writable, copy-on-write: filled-in inodes become private pages
                    fh = files.pop(name)
                    try:
                        fh.flush()
                        size = fh.seek(0, os.SEEK_END)
                        maps[name] = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) if size else bytearray()
                    finally:
                        fh.close()
                else:
                    maps[name] = _map_file(files.pop(name))
        finally:
            for fh in files.values():
                fh.close()
        self.table = None
        self._src = _mapped_strings(maps["src_offsets"], maps["src_data"], n)
        self._size = np.frombuffer(maps["size"], np.int64, n)
        self._mtime = np.frombuffer(maps["mtime"], np.int64, n)
        self._ino = np.frombuffer(maps["ino"], np.int64, n)
        self._ino_filled = False
        self._id_digests = np.frombuffer(maps["ids"], "S32", n) if hex_ids else None
        self._ids = None if hex_ids else _mapped_strings(maps["id_offsets"], maps["id_data"], n)
        self._keys, self._order = _sorted_keys(np.frombuffer(maps.pop("keys"), np.uint64, n), spill_dir)
        self.used = np.zeros(n, bool)
        self.entries = len(self._keys)
        self._spilled = True
        log.info("hash cache of %d entries spilled to memory-mapped temp files in %s", n, spill_dir)

    def lookup(self, srcs: list[str], sizes: Sequence[int], mtimes: Sequence[int],
               inos: Sequence[int] | None = None) -> list[str | None]:
        """The cached ``image_id`` for each ``(src, size, mtime_ns, inode)`` (``None`` on a miss; see
        :meth:`lookup_rows`; ``inos`` ``None``: all unknown, ``-1``); a hit marks its entry used."""
        out: list[str | None] = [None] * len(srcs)
        keys = np.empty(len(srcs), object)
        keys[:] = srcs
        hits, rows = self.lookup_rows(keys, np.asarray(sizes, np.int64), np.asarray(mtimes, np.int64),
                                      np.full(len(srcs), -1, np.int64) if inos is None else np.asarray(inos, np.int64))
        ids = self._id_strings(rows).to_pylist()
        for i, iid in zip(hits.tolist(), ids):
            out[i] = iid
        return out

    def add(self, srcs: list[str], sizes: list[int], mtimes: list[int], ids: list[str],
            inos: list[int] | None = None) -> None:
        """Record new hashes (``inos``: ``-1`` where unknown, e.g. an object store): appended to this run's journal
        and flushed (a killed run keeps them)."""
        if not srcs:
            return
        batch = pa.record_batch([pa.array(srcs, pa.string()), pa.array(sizes, pa.int64()), pa.array(mtimes, pa.int64()),
                                 pa.array(ids, pa.string()),
                                 pa.array([-1] * len(srcs) if inos is None else inos, pa.int64())], schema=_CACHE_SCHEMA)
        self._new_rows += len(srcs)
        if self.path is None:  # nothing to write on close
            return
        if not self._new_in_journal:
            self._new.append(batch)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._own = self.path.with_name(f"{self.path.stem}.journal-{os.getpid()}-{secrets.token_hex(4)}.arrows")
            self._fh = open(self._own, "wb")  # noqa: SIM115 - closed in close()
            self._writer = pa.ipc.new_stream(self._fh, _CACHE_SCHEMA)
        self._writer.write_batch(batch)
        self._fh.flush()
        if self._new_rows > self.spill_rows and not self._new_in_journal:
            self._new, self._new_in_journal = [], True  # bounded: close() reads them back from the journal

    @property
    def dirty(self) -> bool:
        """True when the Parquet file would change: new hashes, entries not used this run, or journals to fold in."""
        return bool(self._new_rows) or bool(self._journal_paths) or self._ino_filled or not bool(self.used.all())

    def close(self, complete: bool) -> None:
        """End the run: with ``complete`` (every record was looked up) write the compacted cache when it changed and
        remove the journals; else keep this run's journal for the next run."""
        if self._writer is not None:
            self._writer.close()
            self._fh.close()
            self._writer = self._fh = None
        if not complete or self.path is None:
            return
        if self.dirty and (self._spilled or self._new_in_journal):
            self._write_streaming()
        elif self.dirty:
            table = self.table
            if self._ino_filled:
                table = table.set_column(table.schema.get_field_index("ino"), "ino", pa.array(self._ino))
            kept = table.filter(pa.array(self.used))
            table = pa.concat_tables([kept, pa.Table.from_batches(self._new, _CACHE_SCHEMA)]) if self._new else kept
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            atomic_write_bytes(self.path, sink.getvalue().to_pybytes())
        for j in self._journal_paths + ([self._own] if self._own is not None else []):
            try:
                j.unlink()
            except FileNotFoundError:
                pass

    def _kept_batches(self) -> Iterator[pa.Table]:
        """The entries used this run (with filled-in inodes), in row order, as tables of at most
        :attr:`_SPILL_BATCH` rows: slices of the old rows, each ``take`` n of its used rows."""
        n = len(self.used)
        for start in range(0, n, self._SPILL_BATCH):
            idx = np.flatnonzero(self.used[start:start + self._SPILL_BATCH]) + start
            if not len(idx):
                continue
            if not self._spilled:
                yield self.table.take(pa.array(idx)).set_column(4, "ino", pa.array(self._ino[idx]))
                continue
            take = pa.array(idx, pa.int64())
            yield pa.table([self._src.take(take).cast(pa.string()), pa.array(self._size[idx]),
                            pa.array(self._mtime[idx]), self._id_strings(idx), pa.array(self._ino[idx])],
                           schema=_CACHE_SCHEMA)

    def _write_streaming(self) -> None:
        """Write the compacted cache (kept rows, then this run's new ones) batch by batch with a
        :class:`pyarrow.parquet.ParquetWriter` to a temp file in the cache's folder, then ``os.replace`` it into
        place (``fsync`` of the file and the folder, like :func:`storage.atomic.atomic_write_bytes`). Memory: one
        batch; the new rows come from this run's journal when they are no longer held."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = create_temp_file(self.path.parent)
        except OSError as exc:
            raise_if_disk_full(exc, self.path)
            raise
        try:
            with os.fdopen(fd, "wb") as fh:
                with pq.ParquetWriter(fh, _CACHE_SCHEMA) as writer:
                    for t in self._kept_batches():
                        writer.write_table(t)
                    new = _read_journal(self._own) if self._new_in_journal and self._own is not None else self._new
                    for start in range(0, len(new), 16):
                        writer.write_table(pa.Table.from_batches(new[start:start + 16], _CACHE_SCHEMA))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise_if_disk_full(exc, self.path)
            raise
        fsync_dir(self.path.parent)


def _sorted_keys(keys: np.ndarray, spill_dir: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Sort ``keys`` (``(n,) uint64``) and keep the last row of each run of equal keys (the same src twice: the
    later entry wins). Returns ``(sorted unique keys (m,) uint64, their rows (m,) int64)``, both read-only views of
    mapped temp files in ``spill_dir``. Memory: the ``np.argsort`` order (8 B per key, freed on return) plus one
    block of :data:`_CONTAINS_BLOCK` keys; the rest is written block by block."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    files = [_spill_file(spill_dir), _spill_file(spill_dir)]
    try:
        for start in range(0, n, _CONTAINS_BLOCK):
            stop = min(start + _CONTAINS_BLOCK, n)
            k = keys[order[start:min(stop + 1, n)]]  # one more key: is the block's last the last of its run?
            keep = np.ones(stop - start, bool)
            keep[:len(k) - 1] = k[:-1] != k[1:]
            _write_array(files[0], k[:stop - start][keep])
            _write_array(files[1], order[start:stop][keep])
        del order
        maps = [_map_file(files.pop(0)), _map_file(files.pop(0))]
    finally:
        for fh in files:
            fh.close()
    m = len(maps[0]) // 8
    return np.frombuffer(maps[0], np.uint64, m), np.frombuffer(maps[1], np.int64, m)


def _parquet_rows(path: Path) -> int:
    """Rows the Parquet file at ``path`` says it holds (0 when its footer cannot be read)."""
    try:
        with pq.ParquetFile(path) as pf:
            return int(pf.metadata.num_rows)
    except (OSError, pa.ArrowException):
        return 0


def _write_strings(offsets_fh: Any, data_fh: Any, arr: pa.Array | pa.ChunkedArray, pos: int) -> int:
    """Append string array ``arr`` (nulls as "") to a spilled string column: its end offsets (int64, shifted by
    ``pos``, the bytes written so far) to ``offsets_fh`` and its bytes to ``data_fh``. Returns the new ``pos``."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = arr.fill_null("")
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], np.int64, len(arr) + 1, arr.offset * 8)
    start, stop = int(offs[0]), int(offs[-1])
    _write_array(offsets_fh, offs[1:] - start + pos)
    if stop > start:
        data_fh.write(memoryview(bufs[2])[start:stop])
    return pos + stop - start


def _mapped_strings(offsets: Any, data: Any, n: int) -> pa.Array:
    """A ``large_string`` array of ``n`` values over mapped int64 ``offsets`` (``n + 1``) and ``data`` (zero copy)."""
    return pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


_LOWER_HEX = np.zeros(256, bool)
_LOWER_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = True
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _hex_digests(arr: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """``(n,) S32`` digests of ``image_id`` strings when every one is exactly 64 lowercase hex digits (so
    :func:`_hex_strings` gives the same strings back), else ``None``."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, "S32")
    if arr.null_count:
        return None
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    if (np.diff(offsets) != 64).any():
        return None
    data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    if not _LOWER_HEX[data].all():
        return None
    return _decode_hex(data.reshape(n, 64))


def _hex_strings(digests: np.ndarray) -> pa.Array:
    """``(n,) S32`` digests -> their 64-digit lowercase hex strings, an Arrow ``string`` array (vectorised)."""
    raw = np.ascontiguousarray(digests, "S32").view(np.uint8).reshape(-1, 32)
    n = len(raw)
    out = np.empty((n, 64), np.uint8)
    out[:, 0::2] = _HEX_CHARS[raw >> 4]
    out[:, 1::2] = _HEX_CHARS[raw & 15]
    offsets = np.arange(0, 64 * n + 1, 64, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(out)])


def _read_journal(path: Path) -> list[pa.RecordBatch]:
    """The whole batches of a cache journal (a run killed mid-write leaves a torn last batch: dropped)."""
    batches: list[pa.RecordBatch] = []
    try:
        with pa.memory_map(str(path)) as src, pa.ipc.open_stream(src) as reader:
            while True:
                try:
                    batches.append(_as_cache(reader.read_next_batch()))
                except StopIteration:
                    break
    except (OSError, pa.ArrowException) as exc:
        log.info("hash cache journal %s: read %d whole batches (%s)", path.name, len(batches), str(exc)[:120])
    return batches


def _stat_local(rec: ImageRecord) -> Reject | None:
    """``stat`` one local file: fills ``size`` / ``mtime_ns``, or says why it cannot be an image."""
    try:
        st = os.stat(rec.src)
    except OSError as exc:
        return Reject(rec.path, os_error_reason(exc), exc.strerror or str(exc))
    if stat.S_ISDIR(st.st_mode):
        return Reject(rec.path, "not-a-file", "is a directory")
    if not stat.S_ISREG(st.st_mode):
        return Reject(rec.path, "not-a-file", "not a regular file (FIFO, socket or device)")
    if st.st_size == 0:
        return Reject(rec.path, "empty-file", "0 bytes")
    rec.size, rec.mtime_ns, rec.ino = st.st_size, st.st_mtime_ns, st.st_ino
    return None


def _stat_url(rec: ImageRecord) -> Reject | None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(rec.src)
        info = fs.info(path)
    except OSError as exc:  # FileNotFoundError for an object gone since the listing: "missing"
        return Reject(rec.path, os_error_reason(exc), str(exc)[:300])
    except ValueError as exc:
        return Reject(rec.path, "unreadable", str(exc)[:300])
    if info.get("type") == "directory":
        return Reject(rec.path, "not-a-file", "is a directory")
    rec.size, rec.mtime_ns = int(info.get("size") or 0), _url_mtime_ns(info)
    if rec.size == 0:
        return Reject(rec.path, "empty-file", "0 bytes")
    return None


def _stat_many(recs: list[ImageRecord]) -> list[Reject | None]:
    return [_stat_url(r) if is_url(r.src) else _stat_local(r) for r in recs]


def _digest(rec: ImageRecord) -> Reject | None:
    """sha256 of one file's bytes into ``rec.image_id``, or why it could not be read."""
    if is_url(rec.src):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(rec.src)
            with fs.open(path, "rb") as fh:
                rec.image_id = sha256_stream(fh)
        except OSError as exc:
            return Reject(rec.path, os_error_reason(exc), str(exc)[:300])
        except ValueError as exc:
            return Reject(rec.path, "unreadable", str(exc)[:300])
        return None
    try:
        with open_regular_file(rec.src) as fh:  # never blocks, even if a FIFO replaced the file since the stat
            rec.image_id = sha256_stream(fh)
    except RejectedImage as exc:
        return Reject(rec.path, exc.reason, exc.detail)
    except OSError as exc:
        return Reject(rec.path, os_error_reason(exc), exc.strerror or str(exc))
    return None


def _digest_many(recs: list[ImageRecord]) -> list[Reject | None]:
    return [_digest(r) for r in recs]


def _digest_parallel(pool: cf.ThreadPoolExecutor, recs: list[ImageRecord], workers: int) -> list[Reject | None]:
    """:func:`_digest` over ``recs`` in ``pool`` (contiguous pieces, one thread task each), in order."""
    res: list[Reject | None] = []
    for part in pool.map(_digest_many, _split(recs, 4 * max(1, workers), 8)):
        res.extend(part)
    return res


def _stat_parallel(pool: cf.ThreadPoolExecutor, recs: list[ImageRecord], workers: int) -> list[Reject | None]:
    """``stat`` of ``recs`` in ``pool`` (:func:`_stat_local` / :func:`_stat_url`), in order."""
    res: list[Reject | None] = []
    for part in pool.map(_stat_many, _split(recs, max(1, workers))):
        res.extend(part)
    return res


def _cache_add(cache: HashCache, done: list[ImageRecord]) -> None:
    cache.add([display_path(r.src) for r in done], [int(r.size or 0) for r in done],
              [int(r.mtime_ns if r.mtime_ns is not None else -1) for r in done], [str(r.image_id) for r in done],
              [-1 if r.ino is None else int(r.ino) for r in done])


def _split(items: list[Any], parts: int, min_size: int = 64) -> list[list[Any]]:
    """``items`` cut into at most ``parts`` contiguous pieces of at least ``min_size`` (one thread task each)."""
    n = max(1, min(parts, len(items) // max(1, min_size)))
    step = -(-len(items) // n)
    return [items[i:i + step] for i in range(0, len(items), step)]


def iter_hashed(records: Iterable[ImageRecord], cache_path: Path | None = None, workers: int = 8,
                progress: bool = False, chunk_size: int = HASH_CHUNK,
                stats: dict[str, int] | None = None) -> Iterator[tuple[list[ImageRecord], list[Reject]]]:
    """Stream ``records`` in chunks of ``chunk_size``: fill each record's ``image_id`` (from the cache by path +
    size + mtime + inode, else hashed) and yield ``(hashed, rejects)`` per chunk, records in input order.

    Worker threads (``workers``) ``stat`` and hash; this generator merges their results in order. ``stats`` (when
    given) is updated in place: ``{"hashed": n, "cached": m}``. The cache (:class:`HashCache`) journals every
    chunk's new hashes as it goes and is compacted when the stream is exhausted; a stream abandoned half-way (an
    error, a kill) keeps its journal, so the next run does not hash those files again. Memory: O(chunk_size)
    records in flight, plus the cache.
    """
    it = iter(records)

    def chunks() -> Iterator[list[ImageRecord]]:
        while chunk := list(itertools.islice(it, chunk_size)):
            yield chunk

    return _hash_stream(chunks(), _hash_record_chunk, cache_path, workers, progress, chunk_size, stats)


def _hash_stream(chunks: Iterator[Any], hash_chunk: Callable[..., tuple[Any, list[Reject], int]],
                 cache_path: Path | None, workers: int, progress: bool, chunk_size: int,
                 stats: dict[str, int] | None) -> Iterator[tuple[Any, list[Reject]]]:
    """What :func:`iter_hashed` and :func:`iter_hashed_tables` share: the stats, the :class:`HashCache`, the worker
    pool and the progress bar. ``hash_chunk(chunk, cache, pool, workers, stats) -> (hashed, rejects, files
    hashed)`` per chunk of ``chunks``; yields ``(hashed, rejects)``. The cache is compacted only when ``chunks`` is
    exhausted (a stream abandoned half-way keeps its journal)."""
    if chunk_size < 1:
        raise UsageError(f"chunk size must be >= 1, got {chunk_size}")
    stats = stats if stats is not None else {}
    stats.setdefault("hashed", 0)
    stats.setdefault("cached", 0)
    cache = HashCache(cache_path)
    bar = None
    complete = False
    with cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="convlens-hash") as pool:
        try:
            for chunk in chunks:
                ok, rejects, tried = hash_chunk(chunk, cache, pool, workers, stats)
                if tried and progress:
                    if bar is None:
                        from tqdm.auto import tqdm

                        bar = tqdm(desc="hash", unit="file", leave=False)
                    bar.update(tried)
                yield ok, rejects
            complete = True
        finally:
            if bar is not None:
                bar.close()
            cache.close(complete)


def _hash_record_chunk(chunk: list[ImageRecord], cache: HashCache, pool: cf.ThreadPoolExecutor, workers: int,
                       stats: dict[str, int]) -> tuple[list[ImageRecord], list[Reject], int]:
    """One chunk of :func:`iter_hashed`: ``(records with image_id, rejects, files hashed)``, records in order."""
    rejects: list[Reject] = []
    # a plain file listed from a folder was stat-ed by the listing; anything else is stat-ed here
    todo = [r for r in chunk if r.size is None or r.mtime_ns is None]
    bad: dict[int, Reject] = {}
    if todo:
        for part_recs, part in zip(parts := _split(todo, max(1, workers)), pool.map(_stat_many, parts)):
            bad.update((id(r), rej) for r, rej in zip(part_recs, part) if rej is not None)
    ok = []
    for r in chunk:
        rej = bad.get(id(r)) if bad else None
        if rej is None and r.size == 0:
            rej = Reject(r.path, "empty-file", "0 bytes")
        if rej is None:
            ok.append(r)
        else:
            rejects.append(rej)
    hits = cache.lookup([r.src if r.src.isascii() else display_path(r.src) for r in ok],
                        [r.size for r in ok], [r.mtime_ns for r in ok],
                        [-1 if r.ino is None else r.ino for r in ok])
    misses = []
    for r, iid in zip(ok, hits):
        if iid is None:
            misses.append(r)
        else:
            r.image_id = iid
    stats["cached"] += len(ok) - len(misses)
    failed: set[int] = set()
    if misses:
        res = _digest_parallel(pool, misses, workers)
        done = []
        for r, rej in zip(misses, res):
            if rej is not None:
                rejects.append(rej)
                failed.add(id(r))
            else:
                done.append(r)
        stats["hashed"] += len(done)
        _cache_add(cache, done)
    return ([r for r in ok if id(r) not in failed] if failed else ok), rejects, len(misses)


def hash_records(records: Iterable[ImageRecord], cache_path: Path | None = None, workers: int = 8,
                 progress: bool = False, chunk_size: int = HASH_CHUNK) -> tuple[list[ImageRecord], list[Reject], dict[str, int]]:
    """Fill ``image_id`` for each record (:func:`iter_hashed`, collected). Returns ``(hashed, rejects, stats)`` with
    stats ``{"hashed": n, "cached": m}``; the cache is rewritten atomically when it changed. Order of ``hashed``
    follows ``records``. Memory: O(records)."""
    stats: dict[str, int] = {}
    hashed: list[ImageRecord] = []
    rejects: list[Reject] = []
    for ok, rej in iter_hashed(records, cache_path, workers, progress, chunk_size, stats):
        hashed.extend(ok)
        rejects.extend(rej)
    return hashed, rejects, stats


# --------------------------------------------------------------------------------------------- columnar listing

SPILL_ROWS = 1_000_000
"""Rows above which the planner's kept columns (:class:`RecordTableBuilder`, :class:`DigestSet`) move out of
anonymous memory into unlinked, memory-mapped temp files (tests and benchmarks pass ``spill_rows`` instead)."""
_SPILL_PREFIX = "convlens-spill-"


def _spill_file(spill_dir: str | os.PathLike[str] | None) -> Any:
    """A new binary temp file for spilled columns, in ``spill_dir`` (created if missing; the system temp dir when
    ``None`` or not writable). ``tempfile.TemporaryFile``: on POSIX it has no name from the start, so nothing is
    left behind on disk after an exception or a kill; its space is freed when the file and every map of it close."""
    if spill_dir is not None:
        try:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            return tempfile.TemporaryFile(prefix=_SPILL_PREFIX, dir=spill_dir)
        except OSError as exc:
            log.warning("cannot spill to %s (%s); using the system temp dir", spill_dir, exc)
    return tempfile.TemporaryFile(prefix=_SPILL_PREFIX)


def _map_file(fh: Any) -> Any:
    """Map everything written to ``fh`` read-only (``mmap.ACCESS_READ``) and close ``fh``: the map alone keeps the
    file. An empty file maps to ``b""`` (``mmap`` refuses length 0)."""
    try:
        fh.flush()
        size = fh.seek(0, os.SEEK_END)
        return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) if size else b""
    finally:
        fh.close()


def _write_array(fh: Any, arr: np.ndarray) -> None:
    """Append the raw bytes of ``arr`` (C order) to ``fh`` without another copy when it is contiguous."""
    fh.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def _is_mapped(arr: np.ndarray) -> bool:
    """True when ``arr``'s memory belongs to an ``mmap`` (a :func:`_mapped` array or a view of one)."""
    base: Any = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps a memoryview of the buffer it was given
        base = base.obj
    return isinstance(base, mmap.mmap)


def _mapped(arr: np.ndarray, spill_dir: str | os.PathLike[str] | None) -> np.ndarray:
    """A read-only copy of ``arr`` (same dtype and shape) whose bytes live in a memory-mapped, unlinked temp file
    (:func:`_spill_file`): file-backed pages the kernel can write back and evict, not anonymous memory."""
    fh = _spill_file(spill_dir)
    try:
        _write_array(fh, arr)
    except BaseException:
        fh.close()
        raise
    return np.frombuffer(_map_file(fh), arr.dtype, arr.size).reshape(arr.shape)



class RecordTable(SequenceABC):
    """Listed images as columns: a read-only ``Sequence`` of :class:`ImageRecord` (each built on access) that
    holds no Python object per file.

    Columns, row ``i`` = one image in listing order: ``paths`` (Arrow ``large_string``, display form, relative to
    ``root``), ``label_codes`` / ``split_codes`` (``(n,) int32`` into ``labels`` / ``splits``, code 0 = ``None``),
    ``sizes`` (bytes), ``mtimes`` (ns), ``inos`` (``(n,) int64``; ``-1`` = unknown / not stat-ed yet; a size of
    ``-1`` means the row has not been stat-ed), ``digests`` (``(n,) S32`` sha256 of the bytes; zeros before
    hashing). A row's source is ``root + sep + path`` unless ``srcs`` holds it (an undecodable name, a list entry
    spelled otherwise, an absolute entry); ``extras`` (a list's extra columns) is one mapping per row or ``None``.
    Memory: ~80 B + the path's length per row (a list of :class:`ImageRecord` takes ~475 B + strings), in
    anonymous memory; a table collected past :data:`SPILL_ROWS` rows (:class:`RecordTableBuilder`, :meth:`concat`,
    :func:`hash_listing`) is :attr:`spilled`: its columns are read-only views of memory-mapped temp files.
    """

    __slots__ = ("root", "sep", "paths", "srcs", "label_codes", "labels", "split_codes", "splits", "extras",
                 "sizes", "mtimes", "inos", "digests", "_order", "_spill_dir", "_spilled")

    def __init__(self, root: Path | str, paths: pa.Array, srcs: dict[int, str], label_codes: np.ndarray,
                 labels: list[str | None], split_codes: np.ndarray, splits: list[str | None],
                 extras: list[Mapping[str, Any]] | None, sizes: np.ndarray, mtimes: np.ndarray, inos: np.ndarray,
                 digests: np.ndarray) -> None:
        self.root = root
        self.sep = "/" if isinstance(root, str) and is_url(root) else os.sep
        self.paths = paths
        self.srcs = srcs
        self.label_codes, self.labels = label_codes, labels
        self.split_codes, self.splits = split_codes, splits
        self.extras = extras
        self.sizes, self.mtimes, self.inos, self.digests = sizes, mtimes, inos, digests
        self._order: np.ndarray | None = None  # rows sorted by path (locate), built on first use
        self._spilled = False  # columns are views of memory-mapped temp files (RecordTableBuilder)
        self._spill_dir: str | os.PathLike[str] | None = None

    @property
    def spilled(self) -> bool:
        """True when the columns are read-only views of memory-mapped temp files (:class:`RecordTableBuilder`), not
        anonymous memory; :meth:`locate`'s sort order is then spilled too."""
        return self._spilled

    # -- construction

    @classmethod
    def empty(cls, root: Path | str) -> RecordTable:
        z = np.zeros(0, np.int64)
        return cls(root, pa.array([], pa.large_string()), {}, np.zeros(0, np.int32), [None], np.zeros(0, np.int32),
                   [None], None, z, z.copy(), z.copy(), np.zeros(0, "S32"))

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord], root: Path | str) -> RecordTable:
        """The columns of ``records`` (``image_id`` ``None`` anywhere: digests left zero)."""
        n = len(records)
        if not n:
            return cls.empty(root)
        prefix = str(root) + ("/" if isinstance(root, str) and is_url(root) else os.sep)
        paths = [r.path for r in records]
        srcs = {i: r.src for i, r in enumerate(records) if r.src != prefix + r.path}
        lab: dict[str | None, int] = {None: 0}
        spl: dict[str | None, int] = {None: 0}
        label_codes = np.fromiter((lab.setdefault(r.label, len(lab)) for r in records), np.int32, n)
        split_codes = np.fromiter((spl.setdefault(r.split, len(spl)) for r in records), np.int32, n)
        extras = [r.extras for r in records] if any(r.extras for r in records) else None
        sizes = np.fromiter((-1 if r.size is None else r.size for r in records), np.int64, n)
        mtimes = np.fromiter((-1 if r.mtime_ns is None else r.mtime_ns for r in records), np.int64, n)
        inos = np.fromiter((-1 if r.ino is None else r.ino for r in records), np.int64, n)
        ids = [r.image_id for r in records]
        digests = image_digests(ids) if all(i is not None for i in ids) else np.zeros(n, "S32")
        return cls(root, pa.array(paths, pa.large_string()), srcs, label_codes, list(lab), split_codes, list(spl),
                   extras, sizes, mtimes, inos, digests)

    @classmethod
    def _from_batches(cls, batches: list[_DirBatch], root: Path) -> RecordTable:
        """The columns of folder batches (:func:`_walk_folder`), not hashed."""
        paths: list[str] = []
        srcs: dict[int, str] = {}
        lab: dict[str | None, int] = {None: 0}
        spl: dict[str | None, int] = {None: 0}
        lcodes, scodes, sizes, mtimes, inos = [], [], [], [], []
        sep = os.sep
        for b in batches:
            n0 = len(paths)
            prefix = b.prefix
            if prefix.isascii() and all(name.isascii() for name in b.names):
                paths.extend([prefix + name for name in b.names])
            else:
                for k, name in enumerate(b.names):
                    rel = prefix + name
                    disp = display_path(rel)
                    paths.append(disp)
                    if disp != rel:
                        srcs[n0 + k] = f"{b.dirpath}{sep}{name}"
            lcodes.append(np.full(len(b.names), lab.setdefault(b.label, len(lab)), np.int32))
            scodes.append(np.full(len(b.names), spl.setdefault(b.split, len(spl)), np.int32))
            sizes.extend(b.sizes)
            mtimes.extend(b.mtimes)
            inos.extend(b.inos)
        n = len(paths)
        return cls(root, pa.array(paths, pa.large_string()), srcs, np.concatenate(lcodes) if lcodes else np.zeros(0, np.int32),
                   list(lab), np.concatenate(scodes) if scodes else np.zeros(0, np.int32), list(spl), None,
                   np.asarray(sizes, np.int64), np.asarray(mtimes, np.int64), np.asarray(inos, np.int64), np.zeros(n, "S32"))

    @classmethod
    def concat(cls, tables: Sequence[RecordTable], root: Path | str, spill_rows: int | None = None,
               spill_dir: str | os.PathLike[str] | None = None) -> RecordTable:
        """One table of ``tables`` in order (labels and splits re-coded into one dictionary each); past
        ``spill_rows`` rows (default :data:`SPILL_ROWS`) its columns are memory-mapped temp files in ``spill_dir``
        (:class:`RecordTableBuilder`)."""
        with RecordTableBuilder(root, spill_rows, spill_dir) as builder:
            for t in tables:
                builder.append(t)
            return builder.finish()

    @classmethod
    def _concat_in_memory(cls, tables: Sequence[RecordTable], root: Path | str) -> RecordTable:
        """:meth:`concat` in anonymous memory (numpy / Arrow concatenation)."""
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty(root)
        if len(tables) == 1:
            return tables[0]

        def recode(which: str) -> tuple[np.ndarray, list[str | None]]:
            values: dict[str | None, int] = {None: 0}
            out = []
            for t in tables:
                vals = t.labels if which == "label" else t.splits
                codes = t.label_codes if which == "label" else t.split_codes
                remap = np.array([values.setdefault(v, len(values)) for v in vals], np.int32)
                out.append(remap[codes])
            return np.concatenate(out), list(values)

        lc, labels = recode("label")
        sc, splits = recode("split")
        srcs: dict[int, str] = {}
        extras: list[Mapping[str, Any]] | None = None
        offset = 0
        if any(t.extras is not None for t in tables):
            extras = []
        for t in tables:
            srcs.update((offset + i, s) for i, s in t.srcs.items())
            if extras is not None:
                extras.extend(t.extras if t.extras is not None else [NO_EXTRAS] * len(t))
            offset += len(t)
        paths = pa.chunked_array([t.paths for t in tables], pa.large_string()).combine_chunks()
        return cls(root, paths, srcs, lc, labels, sc, splits, extras,
                   np.concatenate([t.sizes for t in tables]), np.concatenate([t.mtimes for t in tables]),
                   np.concatenate([t.inos for t in tables]), np.concatenate([t.digests for t in tables]))

    def take(self, idx: np.ndarray) -> RecordTable:
        """The rows ``idx`` (``(k,) int``, in that order) as a new table."""
        idx = np.asarray(idx, np.int64)
        pos = {int(i): k for k, i in enumerate(idx)} if self.srcs else {}
        srcs = {pos[i]: s for i, s in self.srcs.items() if i in pos}
        extras = [self.extras[i] for i in idx.tolist()] if self.extras is not None else None
        return RecordTable(self.root, self.paths.take(pa.array(idx)), srcs, self.label_codes[idx], self.labels,
                           self.split_codes[idx], self.splits, extras, self.sizes[idx], self.mtimes[idx],
                           self.inos[idx], self.digests[idx])

    # -- reading

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} records")
        return next(self._records(i, i + 1))

    def __iter__(self) -> Iterator[ImageRecord]:
        for start in range(0, len(self), 8192):
            yield from self._records(start, min(len(self), start + 8192))

    def _records(self, start: int, stop: int) -> Iterator[ImageRecord]:
        paths = self.paths.slice(start, stop - start).to_pylist()
        hexes = self.digests[start:stop].tobytes().hex()
        zero = "0" * 64
        prefix = str(self.root) + self.sep
        for k, path in enumerate(paths):
            i = start + k
            size = int(self.sizes[i])
            iid = hexes[64 * k:64 * k + 64]
            ino = int(self.inos[i])
            yield ImageRecord(path, self.srcs.get(i) or prefix + path, self.labels[self.label_codes[i]],
                              self.splits[self.split_codes[i]], self.extras[i] if self.extras is not None else NO_EXTRAS,
                              None if iid == zero else iid, None if size < 0 else size,
                              None if size < 0 else int(self.mtimes[i]), None if ino < 0 else ino)

    def keys(self, idx: np.ndarray) -> np.ndarray:
        """``(k,) object``: the hash-cache key (the display form of the source) of rows ``idx``."""
        prefix = display_path(str(self.root)) + self.sep
        paths = self.paths.take(pa.array(np.asarray(idx, np.int64))).to_pylist()
        out = np.empty(len(paths), object)
        out[:] = [prefix + p for p in paths]
        if self.srcs:
            for k, i in enumerate(np.asarray(idx).tolist()):
                s = self.srcs.get(i)
                if s is not None:
                    out[k] = display_path(s)
        return out

    def locate(self, paths: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """``(k,) int64``: the row of each of ``paths`` (``k`` strings, display form) in this table, the first listed
        row where a path is listed twice; ``-1`` where a path is not listed (or null).

        The first call sorts the rows by path once (``pyarrow.compute.sort_indices``, kept: 4 B per row while the
        table has < 2**31 rows, in a memory-mapped temp file when the table is :attr:`spilled`; ~12 B per row
        transient while sorting); each call is then a vectorised binary search (byte-wise order, as Arrow sorts and
        compares strings): O(k log n) time, O(k) memory, no Python object per row."""
        q = paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths
        q = q.cast(pa.large_string())
        k, n = len(q), len(self)
        if not k or not n:
            return np.full(k, -1, np.int64)
        if self._order is None:
            order = pc.sort_indices(self.paths).to_numpy()
            order = order.astype(np.int32 if n < 2**31 else np.int64)
            self._order = _mapped(order, self._spill_dir) if self._spilled else order
        order = self._order
        lo = np.zeros(k, np.int64)
        hi = np.full(k, n, np.int64)
        active = np.arange(k)
        while len(active):  # lower bound of each query in the sorted rows
            mid = (lo[active] + hi[active]) // 2
            below = pc.less(self.paths.take(pa.array(order[mid])), q.take(pa.array(active)))
            below = below.fill_null(False).to_numpy(zero_copy_only=False)
            lo[active[below]] = mid[below] + 1
            hi[active[~below]] = mid[~below]
            active = active[lo[active] < hi[active]]
        pos = order[np.minimum(lo, n - 1)].astype(np.int64)
        hit = pc.equal(self.paths.take(pa.array(pos)), q).fill_null(False).to_numpy(zero_copy_only=False)
        return np.where((lo < n) & hit, pos, -1)

    def extra_columns(self) -> list[str]:
        """The names of the extra list columns any row carries, sorted."""
        names: set[str] = set()
        for e in self.extras or ():
            if e:
                names.update(e)
        return sorted(names)

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns (Arrow + numpy; the ``srcs`` / ``extras`` Python objects not counted)."""
        return int(self.paths.nbytes + self.label_codes.nbytes + self.split_codes.nbytes + self.sizes.nbytes
                   + self.mtimes.nbytes + self.inos.nbytes + self.digests.nbytes)


class RecordTableBuilder:
    """Collects :class:`RecordTable` chunks, in order, into one table (:meth:`append`, then :meth:`finish`).

    Up to ``spill_rows`` rows (default :data:`SPILL_ROWS`) the chunks are kept and concatenated in memory. Past that
    the table spills: every column is appended chunk by chunk (labels / splits re-coded into one dictionary each)
    to its own temp file in ``spill_dir`` (default: the system temp dir), and the finished table's columns are
    zero-copy, read-only views of those files memory-mapped: ``paths`` an Arrow ``large_string`` array over the
    mapped offsets (int64) and bytes, the rest ``np.frombuffer`` arrays (``int32`` codes, ``int64`` size / mtime /
    inode, ``S32`` digests). Their resident pages are file-backed page cache that the kernel can write back and
    evict, not anonymous memory (on a tmpfs ``spill_dir`` they are shared memory, swap-backed: spill to a disk).
    The files are unlinked from the start on POSIX (``tempfile.TemporaryFile``): nothing is left on disk after an
    exception or a kill, and the space is freed when the table is dropped.

    Memory while collecting: up to ``spill_rows`` rows, then one chunk at a time. Still O(files) after a spill:
    ``srcs`` (a dict entry per row whose source is not ``root + sep + path``) and ``extras`` (one mapping per row
    of a list with extra columns). Use it as a context manager (or call :meth:`close`) so that an abandoned
    collection closes its files at once."""

    _FILES = ("offsets", "data", "label_codes", "split_codes", "sizes", "mtimes", "inos", "digests")

    def __init__(self, root: Path | str, spill_rows: int | None = None,
                 spill_dir: str | os.PathLike[str] | None = None) -> None:
        limit = SPILL_ROWS if spill_rows is None else int(spill_rows)
        if limit < 0:
            raise UsageError(f"spill_rows must be >= 0, got {spill_rows}")
        self.root = root
        self.spill_rows = limit
        self.spill_dir = spill_dir
        self._files: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._pending: list[RecordTable] = []
        self._rows = 0
        self._data = 0  # bytes of path text written so far: the next path's offset
        self._labels: dict[str | None, int] = {None: 0}
        self._splits: dict[str | None, int] = {None: 0}
        self._srcs: dict[int, str] = {}
        self._extras: list[Mapping[str, Any]] | None = None

    def __enter__(self) -> RecordTableBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._rows

    @property
    def spilling(self) -> bool:
        """True once the rows went past ``spill_rows`` and are written to temp files."""
        return self._files is not None

    def append(self, table: RecordTable) -> None:
        """Add ``table``'s rows after those added so far (the builder does not keep ``table`` once spilling)."""
        if not len(table):
            return
        if self._files is not None:
            self._write(table)
            return
        self._pending.append(table)
        self._rows += len(table)
        if self._rows > self.spill_rows:
            self._start_spill()

    def _start_spill(self) -> None:
        files: dict[str, Any] = {}
        try:
            for name in self._FILES:
                files[name] = _spill_file(self.spill_dir)
            _write_array(files["offsets"], np.zeros(1, np.int64))
        except BaseException:
            for fh in files.values():
                fh.close()
            raise
        self._files = files
        pending, self._pending, self._rows = self._pending, [], 0
        for t in pending:
            self._write(t)

    def _write(self, t: RecordTable) -> None:
        files = self._files
        if files is None:
            raise RuntimeError("RecordTableBuilder._write called while not spilling")
        n0 = self._rows
        self._data = _write_strings(files["offsets"], files["data"], t.paths, self._data)
        for name, values, vals, codes in (("label_codes", self._labels, t.labels, t.label_codes),
                                          ("split_codes", self._splits, t.splits, t.split_codes)):
            remap = np.array([values.setdefault(v, len(values)) for v in vals], np.int32)
            _write_array(files[name], remap[codes])
        _write_array(files["sizes"], np.asarray(t.sizes, np.int64))
        _write_array(files["mtimes"], np.asarray(t.mtimes, np.int64))
        _write_array(files["inos"], np.asarray(t.inos, np.int64))
        _write_array(files["digests"], np.asarray(t.digests, "S32"))
        self._srcs.update((n0 + i, s) for i, s in t.srcs.items())
        if t.extras is not None and self._extras is None:
            self._extras = [NO_EXTRAS] * n0
        if self._extras is not None:
            self._extras.extend(t.extras if t.extras is not None else [NO_EXTRAS] * len(t))
        self._rows += len(t)

    def finish(self) -> RecordTable:
        """The collected table (:attr:`RecordTable.spilled` when it went past ``spill_rows``); the builder is empty
        afterwards."""
        if self._files is None:
            pending, self._pending, self._rows = self._pending, [], 0
            return RecordTable._concat_in_memory(pending, self.root)
        files, self._files = self._files, None
        maps: dict[str, Any] = {}
        try:
            for name in self._FILES:
                maps[name] = _map_file(files.pop(name))
        finally:
            for fh in files.values():
                fh.close()
        n = self._rows
        paths = pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(maps["offsets"]),
                                                             pa.py_buffer(maps["data"])])
        table = RecordTable(self.root, paths, self._srcs, np.frombuffer(maps["label_codes"], np.int32, n),
                            list(self._labels), np.frombuffer(maps["split_codes"], np.int32, n), list(self._splits),
                            self._extras, np.frombuffer(maps["sizes"], np.int64, n),
                            np.frombuffer(maps["mtimes"], np.int64, n), np.frombuffer(maps["inos"], np.int64, n),
                            np.frombuffer(maps["digests"], "S32", n))
        table._spilled, table._spill_dir = True, self.spill_dir
        log.info("listing of %d files spilled to memory-mapped temp files (%.1f MiB) in %s", n, table.nbytes / 2**20,
                 self.spill_dir or tempfile.gettempdir())
        self._reset()
        return table

    def close(self) -> None:
        """Drop what was collected and close the temp files (their space is freed; nothing was left on disk)."""
        files, self._files = self._files, None
        for fh in (files or {}).values():
            fh.close()
        self._reset()


def _table_chunks(listing: Listing, chunk_size: int) -> Iterator[RecordTable]:
    """``listing`` cut into unhashed :class:`RecordTable` s of ``chunk_size`` rows (the last may be shorter). A
    folder goes straight from its directory batches to columns; a list / URL listing from its records."""
    if listing.batches is None:
        it = iter(listing.records)
        while chunk := list(itertools.islice(it, chunk_size)):
            yield RecordTable.from_records(chunk, listing.root)
        return
    root = listing.root
    pending: list[_DirBatch] = []
    count = 0
    for b in listing.batches:
        while b.names:
            room = chunk_size - count
            if len(b.names) <= room:
                pending.append(b)
                count += len(b.names)
                break
            pending.append(_DirBatch(b.dirpath, b.prefix, b.label, b.split, b.names[:room], b.sizes[:room],
                                     b.mtimes[:room], b.inos[:room]))
            b = _DirBatch(b.dirpath, b.prefix, b.label, b.split, b.names[room:], b.sizes[room:], b.mtimes[room:],
                          b.inos[room:])
            count = chunk_size
            yield RecordTable._from_batches(pending, root)  # type: ignore[arg-type]
            pending, count = [], 0
        if count >= chunk_size:
            yield RecordTable._from_batches(pending, root)  # type: ignore[arg-type]
            pending, count = [], 0
    if pending:
        yield RecordTable._from_batches(pending, root)  # type: ignore[arg-type]
    if listing.skipped:
        log.info("skipped %d non-image files in %s", listing.skipped, root)


def _hash_table(tab: RecordTable, cache: HashCache, pool: cf.ThreadPoolExecutor, workers: int,
                stats: dict[str, int]) -> tuple[RecordTable, list[Reject], int]:
    """Fill ``tab.digests`` in place: cache hits by a vectorised lookup, the rest stat-ed (rows the listing did
    not stat) and hashed in ``pool``. Returns ``(rows that hashed, rejects, files hashed now)``."""
    n = len(tab)
    bad = np.zeros(n, bool)
    early: list[tuple[int, Reject]] = []
    unknown = np.flatnonzero(tab.sizes < 0)
    if len(unknown):
        recs = list(tab.take(unknown))  # in bulk: one Arrow slice, not one per row
        for i, r, rej in zip(unknown.tolist(), recs, _stat_parallel(pool, recs, workers)):
            if rej is not None:
                bad[i] = True
                early.append((i, rej))
            else:
                tab.sizes[i], tab.mtimes[i] = int(r.size or 0), int(r.mtime_ns if r.mtime_ns is not None else -1)
                tab.inos[i] = -1 if r.ino is None else r.ino
    empty = np.flatnonzero((tab.sizes == 0) & ~bad)
    if len(empty):
        bad[empty] = True
        early.extend((int(i), Reject(tab.paths[int(i)].as_py(), "empty-file", "0 bytes")) for i in empty)
    early.sort(key=lambda t: t[0])
    rejects = [r for _, r in early]
    ok = np.flatnonzero(~bad)
    hits, rows = cache.lookup_rows(tab.keys(ok), tab.sizes[ok], tab.mtimes[ok], tab.inos[ok])
    if len(hits):
        tab.digests[ok[hits]] = cache.digests(rows)
    stats["cached"] += len(hits)
    hit_mask = np.zeros(len(ok), bool)
    hit_mask[hits] = True
    miss = ok[~hit_mask]
    hashed = 0
    if len(miss):
        recs = list(tab.take(miss))
        done = []
        done_idx = []
        for i, r, rej in zip(miss.tolist(), recs, _digest_parallel(pool, recs, workers)):
            if rej is not None:
                bad[i] = True
                rejects.append(rej)
            else:
                done.append(r)
                done_idx.append(i)
        if done:
            tab.digests[np.asarray(done_idx, np.int64)] = image_digests([str(r.image_id) for r in done])
            _cache_add(cache, done)
        hashed = len(done)
        stats["hashed"] += hashed
    return (tab.take(np.flatnonzero(~bad)) if bad.any() else tab), rejects, len(miss)


def iter_hashed_tables(listing: Listing, cache_path: Path | None = None, workers: int = 8, progress: bool = False,
                       chunk_size: int = HASH_CHUNK,
                       stats: dict[str, int] | None = None) -> Iterator[tuple[RecordTable, list[Reject]]]:
    """Stream ``listing`` (:func:`open_listing`) in chunks of ``chunk_size`` rows as hashed
    :class:`RecordTable` s: yields ``(hashed rows, rejects)`` per chunk, in listing order (``listing.rejects`` fills
    up as it goes, as it does for :func:`iter_hashed`).

    The columnar twin of :func:`iter_hashed` (same cache, journal, stats and rejects): a folder's rows go from the
    walk's ``stat`` (size, mtime, inode) to columns and one vectorised cache lookup per chunk, with no Python
    object per file; only files to ``stat`` again or to hash become :class:`ImageRecord` s, in worker threads.
    A file whose size, mtime or inode changed is hashed again. Memory: O(chunk_size) in flight, plus the cache and
    whatever the caller keeps (a :class:`RecordTable`: ~80 B + the path per row)."""
    return _hash_stream(_table_chunks(listing, chunk_size), _hash_table, cache_path, workers, progress, chunk_size,
                        stats)


def hash_listing(listing: Listing, cache_path: Path | None = None, workers: int = 8, progress: bool = False,
                 chunk_size: int = HASH_CHUNK, spill_rows: int | None = None,
                 spill_dir: str | os.PathLike[str] | None = None) -> tuple[RecordTable, list[Reject], dict[str, int]]:
    """Hash a whole listing into one :class:`RecordTable` (:func:`iter_hashed_tables`, collected chunk by chunk by
    a :class:`RecordTableBuilder`). Returns ``(table, rejects, stats)``: rejects of hashing only (the listing's own
    are in ``listing.rejects``), stats ``{"hashed": n, "cached": m}``.

    Memory: the cache, plus the table (~80 B + the path per row) up to ``spill_rows`` rows (default
    :data:`SPILL_ROWS`); past that the table is written chunk by chunk to memory-mapped temp files in ``spill_dir``
    (default: next to ``cache_path``, else the system temp dir) and holds O(chunk) anonymous memory."""
    if spill_dir is None and cache_path is not None:
        spill_dir = Path(cache_path).parent
    stats: dict[str, int] = {}
    rejects: list[Reject] = []
    with RecordTableBuilder(listing.root, spill_rows, spill_dir) as builder:
        for ok, rej in iter_hashed_tables(listing, cache_path, workers, progress, chunk_size, stats):
            builder.append(ok)
            rejects.extend(rej)
        return builder.finish(), rejects, stats


# --------------------------------------------------------------------------------------------- image digests

_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
del _i, _c


def image_digests(ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``image_id`` strings -> ``(n,) S32`` raw 32-byte digests (a 64-hex-digit id is decoded; any other string,
    e.g. a hand-made id in a test store, is mapped to the sha256 of its text). Vectorised: O(n) bytes, no Python
    object per id for well-formed ids given as an Arrow array."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        arr = arr.cast(pa.string())
        n = len(arr)
        if n == 0:
            return np.zeros(0, "S32")
        lengths = pc.binary_length(arr) if arr.null_count == 0 else None
        if lengths is not None and pc.all(pc.equal(lengths, 64)).as_py():
            offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
            data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
            digests = _decode_hex(data.reshape(n, 64))
            if digests is not None:
                return digests
        ids = arr.to_pylist()
    ids = ["" if v is None else str(v) for v in ids]
    if not ids:
        return np.zeros(0, "S32")
    if all(len(v) == 64 for v in ids):
        try:
            data = np.frombuffer("".join(ids).encode("ascii"), np.uint8).reshape(len(ids), 64)
        except UnicodeEncodeError:
            data = None
        if data is not None:
            digests = _decode_hex(data)
            if digests is not None:
                return digests
    out = np.empty(len(ids), "S32")
    for i, v in enumerate(ids):
        try:
            raw = bytes.fromhex(v) if len(v) == 64 else b""
        except ValueError:
            raw = b""
        out[i] = raw if len(raw) == 32 else hashlib.sha256(("id:" + v).encode("utf-8", "surrogateescape")).digest()
    return out


def _decode_hex(data: np.ndarray) -> np.ndarray | None:
    nib = _HEX[data]
    if (nib == 255).any():
        return None
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return np.ascontiguousarray(raw).view("S32").ravel()


_CONTAINS_BLOCK = 1 << 20


def _dedup_sorted_in_place(arr: np.ndarray, block: int = 1 << 16) -> int:
    """Move the distinct values of the sorted ``arr`` to its front, in order, a block at a time (O(block)
    memory); return how many there are."""
    w = 0
    prev = None
    for s in range(0, len(arr), block):
        part = arr[s:s + block].copy()
        keep = np.empty(len(part), bool)
        keep[0] = prev is None or part[0] != prev
        keep[1:] = part[1:] != part[:-1]
        prev = part[-1]
        k = int(keep.sum())
        arr[w:w + k] = part[keep]
        w += k
    return w


class DigestSet:
    """A set of 32-byte image digests as one sorted ``(n,) S32`` array (32 B per id; a Python ``set`` of hex
    strings costs ~180 B per id). Membership is ``np.searchsorted``: O(log n) per id, vectorised, in blocks of
    :data:`_CONTAINS_BLOCK` queries (~40 B per query in a block transient).

    Past ``spill_rows`` ids (default :data:`SPILL_ROWS`) the sorted array is moved to a memory-mapped, unlinked
    temp file in ``spill_dir`` (system temp dir by default): read-only, file-backed pages, no anonymous memory
    held: the digests are written there as given and sorted and de-duplicated in place. :meth:`from_chunks` builds
    part by part: past the threshold the chunks go to the temp file as they come (anonymous memory O(chunk))."""

    __slots__ = ("digests", "_spill_rows", "_spill_dir")

    def __init__(self, digests: np.ndarray | None = None, *, spill_rows: int | None = None,
                 spill_dir: str | os.PathLike[str] | None = None) -> None:
        d = np.zeros(0, "S32") if digests is None else np.asarray(digests, "S32")
        self._spill_rows, self._spill_dir = spill_rows, spill_dir
        if len(d) > (SPILL_ROWS if spill_rows is None else spill_rows):  # sorted in place in the spill file
            self.digests = DigestSet.from_chunks([d], spill_rows=spill_rows, spill_dir=spill_dir).digests
        else:
            self.digests = np.unique(d)

    @classmethod
    def from_chunks(cls, chunks: Iterable[np.ndarray], *, spill_rows: int | None = None,
                    spill_dir: str | os.PathLike[str] | None = None) -> DigestSet:
        """The set of every digest in ``chunks`` (``S32`` arrays), the same as ``DigestSet(concatenate(chunks))``
        without the concatenation: up to ``spill_rows`` ids in memory, past it written chunk by chunk to the spill
        file, which is then sorted and deduplicated in place through a writable map."""
        limit = SPILL_ROWS if spill_rows is None else int(spill_rows)
        held: list[np.ndarray] = []
        n = 0
        fh = None
        try:
            for chunk in chunks:
                c = np.asarray(chunk, "S32")
                n += len(c)
                if fh is not None:
                    _write_array(fh, c)
                    continue
                held.append(c)
                if n > limit:
                    fh = _spill_file(spill_dir)
                    for h in held:
                        _write_array(fh, h)
                    held = []
            if fh is None:
                return cls(np.concatenate(held) if held else None, spill_rows=spill_rows, spill_dir=spill_dir)
            fh.flush()
            mm = mmap.mmap(fh.fileno(), n * 32, access=mmap.ACCESS_WRITE)
        finally:
            if fh is not None:
                fh.close()  # the map keeps the (unlinked) file
        arr = np.frombuffer(mm, "S32", n)
        arr.sort(kind="quicksort")  # in place on the mapped pages (NumPy's string sort needs no copy)
        kept = _dedup_sorted_in_place(arr)
        out = cls.__new__(cls)
        out._spill_rows, out._spill_dir = spill_rows, spill_dir
        out.digests = arr[:kept]
        out.digests.flags.writeable = False
        return out

    @classmethod
    def of(cls, ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> DigestSet:
        return cls(image_digests(ids))

    def __len__(self) -> int:
        return len(self.digests)

    @property
    def nbytes(self) -> int:
        return int(self.digests.nbytes)

    @property
    def spilled(self) -> bool:
        """True when the digests are a read-only view of a memory-mapped temp file."""
        return _is_mapped(self.digests)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """``(n,) bool``: which of ``digests`` (``S32``) are in the set."""
        q = np.asarray(digests, "S32")
        out = np.zeros(len(q), bool)
        if not len(self.digests) or not len(q):
            return out
        last = len(self.digests) - 1
        for start in range(0, len(q), _CONTAINS_BLOCK):
            part = q[start:start + _CONTAINS_BLOCK]
            pos = np.minimum(np.searchsorted(self.digests, part), last)
            out[start:start + _CONTAINS_BLOCK] = self.digests[pos] == part
        return out

    def union(self, other: DigestSet | np.ndarray) -> DigestSet:
        more = other.digests if isinstance(other, DigestSet) else np.asarray(other, "S32")
        return DigestSet.from_chunks([self.digests, more], spill_rows=self._spill_rows, spill_dir=self._spill_dir)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str):
            return False
        return bool(self.contains(image_digests([image_id]))[0])
