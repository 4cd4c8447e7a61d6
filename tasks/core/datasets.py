"""Dataset listing and content hashing.

DATA is an image folder (class sub-folders become ``label``; a ``train``/``val``/``test`` level becomes
``split``) or a CSV / Parquet list with a ``path`` column and optional ``label``, ``split`` and any extra
columns (kept). Relative list paths resolve against the list's folder (or ``root``); entries that escape it
are rejected unless ``allow_outside`` is set.

Hashing (``image_id`` = sha256 of the file's bytes) is parallel and incremental: a cache keyed by path,
size and mtime skips files that did not change. Memory: O(number of files) small records.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_write_bytes, sha256_stream
from storage.errors import UsageError
from tasks.core.images import EXTENSION_FORMATS, UNSUPPORTED_IMAGE_EXTENSIONS, RejectedImage, open_regular_file, os_error_reason

__all__ = [
    "ImageRecord",
    "Reject",
    "SPLIT_NAMES",
    "list_dataset",
    "hash_records",
    "display_path",
    "is_url",
]

log = logging.getLogger(__name__)
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_LIST_SUFFIXES = {".csv", ".parquet", ".pq"}


@dataclass
class ImageRecord:
    """One listed image. ``path`` is relative to the dataset root (display form); ``src`` opens it."""

    path: str
    src: str
    label: str | None = None
    split: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    image_id: str | None = None
    size: int | None = None
    mtime_ns: int | None = None


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


def _list_url(url: str) -> tuple[list[ImageRecord], list[Reject], str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise UsageError(f"dataset {url!r} does not exist")
    proto = url.split("://", 1)[0]
    if not fs.isdir(root):
        suffix = Path(root).suffix.lower()
        if suffix not in _LIST_SUFFIXES:
            raise UsageError(f"dataset {url!r} is a file but not a .csv or .parquet list")
        with fs.open(root, "rb") as fh:
            df = pd.read_csv(fh, dtype=str, keep_default_na=False, na_values=[""]) if suffix == ".csv" else pq.read_table(fh).to_pandas()
        base = root.rsplit("/", 1)[0]
        records, rejects = [], []
        if "path" not in df.columns:
            raise UsageError(f"{url} has no 'path' column")
        extra_cols = [c for c in df.columns if c not in ("path", "label", "split")]
        for row in df.to_dict("records"):
            rel = str(row["path"])
            if rel.startswith("/") or ".." in rel.split("/") or "://" in rel:
                rejects.append(Reject(rel, "outside-root", f"list entries must be relative paths under {base}"))
                continue
            records.append(ImageRecord(path=rel, src=f"{proto}://{base}/{rel}",
                                       label=None if pd.isna(row.get("label")) else str(row.get("label")) if "label" in row else None,
                                       split=None if pd.isna(row.get("split")) else str(row.get("split")) if "split" in row else None,
                                       extras={c: row[c] for c in extra_cols}))
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


def _is_candidate(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _CANDIDATE_SUFFIXES  # same as splitext: a leading dot is no suffix


def _list_folder(root: Path) -> tuple[list[ImageRecord], list[Reject], int]:
    records: list[ImageRecord] = []
    rejects: list[Reject] = []
    skipped = 0

    def onerror(err: OSError) -> None:
        rel = os.path.relpath(err.filename, root) if err.filename else "?"
        rejects.append(Reject(display_path(rel), "unreadable", f"cannot list directory: {err.strerror}"))

    root_s = str(root)
    for dirpath, dirnames, filenames in os.walk(root_s, onerror=onerror, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_s = os.path.relpath(dirpath, root_s)
        parts = () if rel_s == "." else tuple(rel_s.split(os.sep))
        split, label = _split_label(parts)
        prefix = "" if not parts else rel_s + os.sep
        # A sub-directory named like an image is listed so it becomes a reject row, not silently lost.
        names = sorted(filenames) + sorted(d for d in dirnames if _is_candidate(d))
        sep = os.sep
        for name in names:  # hot loop (a rerun over 100k files is mostly this and one stat per file): inlined
            if name[:1] == ".":
                continue  # hidden file
            dot = name.rfind(".")
            if dot < 0 or name[dot:].lower() not in _CANDIDATE_SUFFIXES:
                skipped += 1
                continue
            records.append(ImageRecord(path=display_path(prefix + name), src=f"{dirpath}{sep}{name}", label=label, split=split))
    return records, rejects, skipped


def _read_list(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        return pq.read_table(path).to_pandas()
    except (OSError, ValueError) as exc:  # unreadable, or not CSV / Parquet (pandas' and pyarrow's parse errors)
        raise UsageError(f"cannot read the image list {path}: {str(exc)[:300]}; give a CSV or Parquet file "
                         "with a 'path' column") from None


def _list_table(list_path: Path, root: Path | None, allow_outside: bool) -> tuple[list[ImageRecord], list[Reject], Path]:
    df = _read_list(list_path)
    if "path" not in df.columns:
        raise UsageError(
            f"{list_path} has no 'path' column (columns: {', '.join(map(str, df.columns))}); "
            "a list needs a 'path' column and may have 'label', 'split' and extra columns"
        )
    base = (root or list_path.parent).resolve()
    extra_cols = [c for c in df.columns if c not in ("path", "label", "split")]
    records: list[ImageRecord] = []
    rejects: list[Reject] = []
    for row in df.itertuples(index=False):
        row = row._asdict()
        raw = row["path"]
        if raw is None or (isinstance(raw, float) and pd.isna(raw)) or str(raw) == "":
            rejects.append(Reject("", "bad-list-entry", "empty path"))
            continue
        raw = str(raw)
        full = Path(raw) if os.path.isabs(raw) else base / raw
        try:
            resolved = full.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # symlink loop
            reason = os_error_reason(exc) if isinstance(exc, OSError) else "symlink-loop"
            rejects.append(Reject(display_path(raw), reason, str(exc)))
            continue
        inside = resolved == base or base in resolved.parents
        if not inside and not allow_outside:
            rejects.append(Reject(display_path(raw), "outside-root",
                                  f"resolves outside {display_path(str(base))}; pass --allow-outside-root to permit"))
            continue
        rel = os.path.relpath(full, base) if not os.path.isabs(raw) else raw
        label = row.get("label")
        split = row.get("split")
        extras = {c: row[c] for c in extra_cols}
        records.append(ImageRecord(
            path=display_path(rel), src=str(full),
            label=None if label is None or (isinstance(label, float) and pd.isna(label)) else str(label),
            split=None if split is None or (isinstance(split, float) and pd.isna(split)) else str(split),
            extras=extras,
        ))
    return records, rejects, base


def list_dataset(data: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                 allow_outside: bool = False) -> tuple[list[ImageRecord], list[Reject], Path | str]:
    """List DATA (local path or fsspec URL). Returns ``(records, rejects, dataset_root)`` — a ``Path`` for
    local data, the root URL string for fsspec data.

    Raises ``ValueError`` when DATA does not exist or is not a folder / CSV / Parquet list.
    """
    data = str(data)
    if data.startswith("file://"):
        data = data[len("file://"):]
    if is_url(data):
        return _list_url(data)  # type: ignore[return-value]
    path = Path(data).expanduser()
    if not path.exists():
        raise UsageError(f"dataset {data!r} does not exist; pass an image folder or a CSV/Parquet list with a 'path' column")
    if path.is_dir():
        root_path = path.resolve()
        records, rejects, skipped = _list_folder(root_path)
        if skipped:
            log.info("skipped %d non-image files in %s", skipped, root_path)
        return records, rejects, root_path
    if path.suffix.lower() in _LIST_SUFFIXES:
        records, rejects, base = _list_table(path.resolve(), Path(root).resolve() if root else None, allow_outside)
        return records, rejects, base
    raise UsageError(f"dataset {data!r} is a file but not a .csv or .parquet list; pass a folder or a list")


_CACHE_SCHEMA = pa.schema([("src", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("image_id", pa.string())])


def _load_cache(cache_path: Path | None) -> dict[str, tuple[int, int, str]]:
    if cache_path is None or not cache_path.is_file():
        return {}
    try:
        t = pq.read_table(cache_path)
    except (OSError, pa.ArrowInvalid) as exc:
        log.warning("ignoring unreadable hash cache %s: %s", cache_path, exc)
        return {}
    d = t.to_pydict()
    return {s: (z, m, i) for s, z, m, i in zip(d["src"], d["size"], d["mtime_ns"], d["image_id"])}


def _hash_url(rec: ImageRecord, cache: dict[str, tuple[int, int, str]]) -> tuple[ImageRecord, Reject | None, bool]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(rec.src)
        info = fs.info(path)
        if info.get("type") == "directory":
            return rec, Reject(rec.path, "not-a-file", "is a directory"), False
        rec.size, rec.mtime_ns = int(info.get("size") or 0), _url_mtime_ns(info)
        if rec.size == 0:
            return rec, Reject(rec.path, "empty-file", "0 bytes"), False
        hit = cache.get(rec.src)
        if hit and rec.mtime_ns >= 0 and hit[0] == rec.size and hit[1] == rec.mtime_ns:
            rec.image_id = hit[2]
            return rec, None, True
        with fs.open(path, "rb") as fh:
            rec.image_id = sha256_stream(fh)
    except (OSError, ValueError) as exc:
        return rec, Reject(rec.path, "unreadable", str(exc)[:300]), False
    return rec, None, False


def _hash_one(rec: ImageRecord, cache: dict[str, tuple[int, int, str]]) -> tuple[ImageRecord, Reject | None, bool]:
    if is_url(rec.src):
        return _hash_url(rec, cache)
    try:
        st = os.stat(rec.src)
    except OSError as exc:
        return rec, Reject(rec.path, os_error_reason(exc), exc.strerror or str(exc)), False
    if stat.S_ISDIR(st.st_mode):
        return rec, Reject(rec.path, "not-a-file", "is a directory"), False
    if not stat.S_ISREG(st.st_mode):
        return rec, Reject(rec.path, "not-a-file", "not a regular file (FIFO, socket or device)"), False
    if st.st_size == 0:
        return rec, Reject(rec.path, "empty-file", "0 bytes"), False
    rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
    hit = cache.get(display_path(rec.src))
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        rec.image_id = hit[2]
        return rec, None, True
    try:
        with open_regular_file(rec.src) as fh:  # never blocks, even if a FIFO replaced the file since the stat
            rec.image_id = sha256_stream(fh)
    except RejectedImage as exc:
        return rec, Reject(rec.path, exc.reason, exc.detail), False
    except OSError as exc:
        return rec, Reject(rec.path, os_error_reason(exc), exc.strerror or str(exc)), False
    return rec, None, False


def _stat_local(rec: ImageRecord, cache: dict[str, tuple[int, int, str]]) -> tuple[Reject | None, bool]:
    """Serial fast path: stat + cache lookup. Returns ``(reject, cache_hit)``; no hit means hash it."""
    try:
        st = os.stat(rec.src)
    except OSError as exc:
        return Reject(rec.path, os_error_reason(exc), exc.strerror or str(exc)), False
    if stat.S_ISDIR(st.st_mode):
        return Reject(rec.path, "not-a-file", "is a directory"), False
    if not stat.S_ISREG(st.st_mode):
        return Reject(rec.path, "not-a-file", "not a regular file (FIFO, socket or device)"), False
    if st.st_size == 0:
        return Reject(rec.path, "empty-file", "0 bytes"), False
    rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
    hit = cache.get(display_path(rec.src))
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        rec.image_id = hit[2]
        return None, True
    return None, False


def hash_records(records: Iterable[ImageRecord], cache_path: Path | None = None, workers: int = 8,
                 progress: bool = False) -> tuple[list[ImageRecord], list[Reject], dict[str, int]]:
    """Fill ``image_id`` for each record (cached by path + size + mtime; misses hashed in parallel threads).

    Returns ``(hashed, rejects, stats)`` with stats ``{"hashed": n, "cached": m}``; the cache is rewritten
    atomically when given. Order of ``hashed`` follows ``records``.
    """
    records = list(records)
    cache = _load_cache(cache_path)
    rejects: list[Reject] = []
    stats = {"hashed": 0, "cached": 0}
    ok: list[ImageRecord] = []
    misses: list[ImageRecord] = []
    for rec in records:
        if is_url(rec.src):
            misses.append(rec)
            ok.append(rec)
            continue
        rej, hit = _stat_local(rec, cache)
        if rej is not None:
            rejects.append(rej)
        else:
            ok.append(rec)
            if hit:
                stats["cached"] += 1
            else:
                misses.append(rec)
    bar = None
    if progress and misses:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(misses), desc="hash", unit="file", leave=False)
    failed: set[int] = set()
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for rec, rej, from_cache in pool.map(lambda r: _hash_one(r, cache), misses, chunksize=64):
            if bar is not None:
                bar.update(1)
            if rej is not None:
                rejects.append(rej)
                failed.add(id(rec))
                continue
            stats["cached" if from_cache else "hashed"] += 1
    if bar is not None:
        bar.close()
    hashed = [r for r in ok if id(r) not in failed]
    unchanged = stats["hashed"] == 0 and stats["cached"] == len(hashed) == len(cache)
    if cache_path is not None and not unchanged:  # nothing new, nothing gone: the stored cache is current
        table = pa.table(
            {"src": [display_path(r.src) for r in hashed], "size": [r.size for r in hashed],
             "mtime_ns": [r.mtime_ns for r in hashed], "image_id": [r.image_id for r in hashed]},
            schema=_CACHE_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(cache_path, sink.getvalue().to_pybytes())
    return hashed, rejects, stats
