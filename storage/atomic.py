"""Atomic file writes and content hashes.

Every published file goes through :func:`atomic_write_bytes` / :func:`atomic_write_json`: a temp file in
the same directory, ``fsync``, ``os.replace``, then an ``fsync`` of the directory, so a crash leaves either
the old file or the new one, never a torn one.

Temp files are created by :func:`create_temp_file` with mode ``0o666`` filtered by the process umask (and any
default ACL of the directory), like any ``open()``: published files are ``0644`` under umask ``022`` and
``0664`` under ``002``, so a store shared by a group stays readable (``tempfile.mkstemp`` would make them
``0600``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "sha256_bytes",
    "sha256_file",
    "sha256_stream",
    "TMP_PREFIX",
    "create_temp_file",
    "raise_if_disk_full",
]

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(fh: BinaryIO) -> str:
    """Hex sha256 of a binary stream read in 1 MiB chunks (memory O(1))."""
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, streamed."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def raise_if_disk_full(exc: BaseException, path: str | os.PathLike[str]) -> None:
    """Re-raise an out-of-space ``OSError`` as :class:`~storage.errors.DiskFullError` saying what happened."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        from storage.errors import DiskFullError

        raise DiskFullError(
            f"disk full while writing {path} ({exc.strerror or exc}): the write was abandoned and its temp file "
            "removed; the previously published manifest and its files are intact. Free space on that "
            "filesystem and rerun (finished work is resumed)"
        ) from exc


def create_temp_file(directory: str | os.PathLike[str], prefix: str = TMP_PREFIX, suffix: str = "") -> tuple[int, str]:
    """Create a new, empty temp file in ``directory``; return ``(fd, path)`` like ``tempfile.mkstemp``.

    The mode is ``0o666`` less the umask (the kernel applies it, and a default ACL where there is one), not
    mkstemp's ``0o600``: the file keeps these permissions when it is renamed into place. The descriptor is
    write-only and not inherited by subprocesses.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for _attempt in range(100):
        path = os.path.join(os.fspath(directory), f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused temp file name in {directory} after 100 tries")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp + fsync + replace). The temp file is removed on error;
    running out of space raises :class:`~storage.errors.DiskFullError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp_file(path.parent)
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise_if_disk_full(exc, path)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as pretty, key-sorted JSON atomically."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")
    atomic_write_bytes(path, data + b"\n")
