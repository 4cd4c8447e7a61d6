"""One writer per artefact: ``fcntl.flock`` on ``<dir>/.lock``, plus an owner record inside that file.

Exclusivity comes from the kernel's ``flock``, never from reading the file and deciding:

1. ``open(<dir>/.lock, O_RDWR | O_CREAT | O_NOFOLLOW)`` — never ``O_EXCL``, never truncating, never deleting a
   file someone else may hold — then ``flock(LOCK_EX | LOCK_NB)``. Refused: another open file holds it, so a
   live process does; :class:`~storage.errors.LockedError` names it. Its record may still be empty (it is
   between ``flock`` and writing the record); the file is left alone either way.
2. Granted: if the path no longer names the inode just locked (the previous holder unlinked it on release
   between our ``open`` and ``flock``), close and start again on the current file.
3. Read the record in the file (see below); unless it names a live holder that does not use this protocol,
   write our record (``{"v": 2, "pid", "host", "kernel", "token", "started", "heartbeat"}``, JSON padded to a
   fixed size) in place through the locked descriptor. A heartbeat thread rewrites it in place every
   ``heartbeat`` seconds, after checking the path is still our inode and the record still carries our token
   (it stops, and the lock counts as lost, when not).
4. Release: check ownership, ``unlink`` while still holding ``flock``, then close (dropping ``flock``). A holder
   killed with SIGKILL leaves its file behind, but the kernel drops its ``flock`` with the process, so the next
   writer on this machine takes the lock at once whatever PID the record names (PID reuse cannot keep a dead
   lock alive). Children forked while the lock is held close their inherited descriptor (an at-fork hook),
   so a forked worker outliving a killed parent does not keep the lock; subprocesses never inherit it
   (``O_CLOEXEC``).

A record found in a file whose ``flock`` was granted:

- empty or unreadable: free (a live writer of this protocol would hold ``flock``);
- version 2 from this kernel (same Linux ``boot_id``, i.e. the same machine, containers included): its holder
  is gone (it would hold ``flock``) — reclaimed;
- version 2 from another kernel: held, unless its heartbeat is older than ``stale_after`` by the store's clock
  (this includes a record written on this machine before it rebooted: at most ``stale_after`` of waiting);
- no version (written by convlens before this protocol, or by hand): the former rule — reclaimed when its PID
  is dead on this host or its ``heartbeat`` time is more than ``stale_after`` seconds old; held otherwise.

**Cross-host rule.** ``flock`` excludes the processes of one kernel: it is reliable on a local filesystem.
On NFS it excludes writers on different hosts only where the client maps ``flock`` to NFS byte-range locks
(Linux NFSv4, or NFSv3 with lockd — not with ``local_lock=flock`` / ``local_lock=all`` / ``nolock``); on other
network filesystems not at all. A store shared between machines must therefore have all its *writers* on
one machine (readers and ``convlens verify`` may run anywhere), or live on an NFS mount with working locks.
On such a mount a lock may be met whose record was written by another machine (after that machine's NFS
lease expired, e.g. it crashed): its age is never found by comparing that machine's wall clock with ours.
It is the lock file's mtime (set by the heartbeat's write) measured against the mtime of a probe file created
now in the same directory — both stamped by the filesystem holding the store, one clock. A writer whose
lock was taken over (or whose lock file was removed) finds out through :meth:`HeldLock.check`, which
publishing code calls right before writing the manifest (:func:`storage.manifest.write_manifest` calls
:func:`check_if_held` itself).

All writers of a store must use this protocol (convlens with lock record version 2); an older convlens
writing the same artefact at the same moment is not excluded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from storage.atomic import TMP_PREFIX, raise_if_disk_full
from storage.errors import LockedError, StoreError

__all__ = ["artefact_lock", "assert_owned", "check_if_held", "HeldLock", "LOCK_NAME", "RECORD_VERSION", "read_lock"]

LOCK_NAME = ".lock"
RECORD_VERSION = 2
_RECORD_BYTES = 512  # records are padded to this size, so a heartbeat rewrite never changes the file's length
_ATTEMPTS = 50  # open/flock rounds lost to holders releasing (unlinking) under us before giving up
log = logging.getLogger(__name__)

_registry_guard = threading.Lock()
_held: dict[str, "HeldLock"] = {}  # realpath of the artefact directory -> the lock this process holds on it
_fork_hook_installed = False


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The owner record of a lock file as a dict, or None when absent, empty or not (yet) valid JSON.

    Informational only (``convlens verify``, error messages): whether a lock is held is decided by ``flock``.
    """
    try:
        info = json.loads(Path(path).read_text("utf-8"))
    except (FileNotFoundError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


@functools.lru_cache(maxsize=1)
def _kernel_id() -> str:
    """Identity of the running kernel (Linux ``boot_id``; the host name elsewhere): processes sharing it share
    ``flock`` on a local filesystem."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text("ascii").strip()
    except OSError:
        return "host:" + socket.gethostname()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, 0) would probe a process group / every process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _store_clock_age(lock_mtime_ns: int, directory: Path) -> float | None:
    """Seconds since the lock file was last written, by the clock of the filesystem holding ``directory``:
    its mtime against that of a probe file created now beside it. None when the probe cannot be written."""
    probe = directory / f"{TMP_PREFIX}lockclock-{secrets.token_hex(8)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        os.write(fd, b"0")
        os.fsync(fd)
        now_ns = os.fstat(fd).st_mtime_ns
    except OSError:
        return None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return (now_ns - lock_mtime_ns) / 1e9


def _record_age(info: dict[str, Any], mtime_ns: int | None, directory: Path) -> float | None:
    """Heartbeat age in seconds of a record, measured without comparing two machines' wall clocks where the
    record says which machine wrote it (see the module docstring). None when unknown."""
    if info.get("kernel") == _kernel_id():
        return time.time() - float(info.get("heartbeat", 0) or 0)  # written by this machine: one clock
    if info.get("v") == RECORD_VERSION:
        return None if mtime_ns is None else _store_clock_age(mtime_ns, directory)
    return time.time() - float(info.get("heartbeat", 0) or 0)  # unversioned record: the former rule


def _stale(info: dict[str, Any], mtime_ns: int | None, directory: Path, stale_after: float) -> tuple[bool, float | None]:
    """Whether the record of a lock file whose ``flock`` we were granted names no live holder (and its age)."""
    if info.get("v") == RECORD_VERSION and info.get("kernel") == _kernel_id():
        return True, _record_age(info, mtime_ns, directory)  # a live holder on this machine would hold flock
    if info.get("v") is None and info.get("host") == socket.gethostname():
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        if not _pid_alive(pid):
            return True, _record_age(info, mtime_ns, directory)
    age = _record_age(info, mtime_ns, directory)
    return (age is not None and age > stale_after), age


def _describe(info: dict[str, Any], age: float | None) -> str:
    beat = "heartbeat age unknown" if age is None else f"heartbeat {age:.0f}s ago"
    return f"PID {info.get('pid')} on {info.get('host')} ({beat})"


def _read_record(fd: int) -> dict[str, Any] | None:
    """The record in the locked file, read through its descriptor; None when empty or unreadable."""
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        info = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("lock record is not valid JSON (ignored: whether the lock is held is decided by flock)")
        return None
    return info if isinstance(info, dict) else None


def _write_record(fd: int, record: dict[str, Any]) -> None:
    """Overwrite the record in place (same inode, so ``flock`` stays with it), padded to a fixed size."""
    data = json.dumps(record, sort_keys=True).encode("utf-8")
    size = max(_RECORD_BYTES, len(data) + 1)
    data = data.ljust(size - 1) + b"\n"
    view = memoryview(data)
    done = 0
    while done < size:
        done += os.pwrite(fd, view[done:], done)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
    os.fsync(fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _busy_error(directory: Path, path: Path) -> LockedError:
    """The error for a lock whose ``flock`` another open file holds (read without the lock: best effort)."""
    info = read_lock(path)
    if not info:
        return LockedError(
            f"{directory} is being locked right now by another process (its lock record {path} is not written "
            "yet): another convlens run is starting to write this artefact; wait for it to finish"
        )
    try:
        mtime_ns: int | None = path.stat().st_mtime_ns
    except OSError:
        mtime_ns = None
    return LockedError(
        f"{directory} is locked by {_describe(info, _record_age(info, mtime_ns, directory))}: another convlens "
        "run is writing this artefact; wait for it to finish (the lock is released when that process exits)"
    )


def _after_fork_in_child() -> None:
    """In a forked child: close inherited lock descriptors (the parent keeps its ``flock``), forget them."""
    global _registry_guard
    _registry_guard = threading.Lock()  # the parent's may have been held by another thread at fork time
    for held in list(_held.values()):
        held._forget_after_fork()
    _held.clear()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_installed = True


def _key(directory: str | os.PathLike[str]) -> str:
    return os.path.realpath(directory)


class HeldLock(os.PathLike):
    """The writer lock of one artefact directory, as yielded by :func:`artefact_lock`.

    Path-like: ``os.fspath(held)`` and Path attributes (``read_text``, ``exists``, ``name``, ...) are those of
    the lock file ``held.path``. Call :meth:`check` right before publishing: it raises
    :class:`~storage.errors.LockedError` when the lock is no longer this writer's.
    """

    def __init__(self, directory: Path, path: Path, fd: int, ident: os.stat_result, record: dict[str, Any]) -> None:
        self.directory = directory
        self.path = path
        self.token: str = record["token"]
        self._fd: int | None = fd
        self._ident = ident
        self._record = record
        self._pid = os.getpid()
        self._lost: str | None = None
        self._io = threading.Lock()  # the heartbeat thread and release share the descriptor

    def __getattr__(self, name: str) -> Any:
        if name == "path":  # not set yet (during __init__): avoid recursing
            raise AttributeError(name)
        return getattr(self.path, name)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"HeldLock({str(self.path)!r}, pid={self._pid}, token={self.token[:8]}…)"

    def problem(self) -> str | None:
        """Why this writer no longer owns the lock, or None while it does (callers hold ``self._io``)."""
        if self._lost is not None:
            return self._lost
        if self._fd is None or self._pid != os.getpid():
            return "the lock was released (or this is a forked child of its holder)"
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return f"{self.path} was removed while the lock was held"
        except OSError as exc:
            return f"{self.path} cannot be checked ({exc})"
        if not _same_file(current, self._ident):
            info = read_lock(self.path) or {}
            return f"{self.path} was replaced by another lock file (now held by PID {info.get('pid')} on {info.get('host')})"
        info = _read_record(self._fd) or {}
        if info.get("token") != self.token:
            return f"the lock was taken over by PID {info.get('pid')} on {info.get('host')}"
        return None

    def owned(self) -> bool:
        """Whether this writer still holds the lock (same lock file, same token)."""
        with self._io:  # never read the record while the heartbeat rewrites it
            return self.problem() is None

    def check(self) -> None:
        """Raise :class:`~storage.errors.LockedError` unless this writer still holds the lock. Call it right
        before publishing a manifest."""
        with self._io:  # never read the record while the heartbeat rewrites it
            why = self.problem()
        if why is not None:
            raise LockedError(
                f"lost the writer lock of {self.directory}: {why}; publishing was refused so as not to overwrite "
                "another writer's result — rerun once the other writer has finished"
            )

    def _beat(self, stop: threading.Event, every: float) -> None:
        while not stop.wait(every):
            with self._io:
                if self._fd is None:
                    return
                why = self.problem()
                if why is not None:
                    self._lost = why
                    log.warning("writer lock of %s lost: %s (heartbeat stopped)", self.directory, why)
                    return
                self._record["heartbeat"] = time.time()
                try:
                    _write_record(self._fd, self._record)
                except OSError as exc:  # e.g. disk full: the lock stays, with an older heartbeat
                    log.debug("heartbeat write failed: %s", exc)

    def _release(self) -> None:
        with self._io:
            if self._fd is None or self._pid != os.getpid():
                return
            try:
                why = self.problem()
                if why is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # still under flock: nobody can be between flock and record on it
                else:
                    log.warning("not removing %s on release: %s", self.path, why)
            finally:
                os.close(self._fd)
                self._fd = None

    def _forget_after_fork(self) -> None:
        self._io = threading.Lock()  # the parent's heartbeat thread may have held it at fork time
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._lost = "inherited by a forked child process, which does not hold the lock"


def assert_owned(directory: str | os.PathLike[str]) -> HeldLock:
    """Raise :class:`~storage.errors.LockedError` unless this process holds the writer lock of ``directory``
    and it is still its own; return the lock."""
    with _registry_guard:
        held = _held.get(_key(directory))
    if held is None:
        raise LockedError(f"this process does not hold the writer lock of {directory}; take it with "
                          "`with artefact_lock(directory):` around the writes and the publish")
    held.check()
    return held


def check_if_held(directory: str | os.PathLike[str]) -> None:
    """Where this process holds the writer lock of ``directory``, raise :class:`~storage.errors.LockedError`
    if it is no longer its own; do nothing where it holds none (tools and tests publishing without a lock)."""
    with _registry_guard:
        held = _held.get(_key(directory))
    if held is not None:
        held.check()


def _acquire(directory: Path, path: Path, stale_after: float) -> HeldLock:
    for _attempt in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{path} is a symlink; a lock file must be a regular file — remove {path}") from None
            raise_if_disk_full(exc, path)
            raise
        keep = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy_error(directory, path) from None
            except OSError as exc:
                if exc.errno == errno.ENOLCK:
                    raise StoreError(
                        f"the filesystem holding {directory} does not support file locks (ENOLCK): mount it with "
                        "locking enabled, or keep the store on a local disk (docs/reliability.md, cross-host rule)"
                    ) from None
                raise
            ident = os.fstat(fd)
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue  # its holder unlinked it on release between our open and flock: start again
            if not _same_file(current, ident):
                continue
            info = _read_record(fd)
            if info is not None:
                stale, age = _stale(info, ident.st_mtime_ns, directory, stale_after)
                if not stale:
                    raise LockedError(
                        f"{directory} is locked by {_describe(info, age)}: another convlens run is writing this "
                        f"artefact; wait for it to finish, or remove {path} if that process is not a convlens writer"
                    )
                log.warning("reclaiming stale lock %s (holder %s)", path, _describe(info, age))
            now = time.time()
            record = {"v": RECORD_VERSION, "pid": os.getpid(), "host": socket.gethostname(), "kernel": _kernel_id(),
                      "token": secrets.token_hex(16), "started": now, "heartbeat": now}
            try:
                _write_record(fd, record)
            except BaseException as exc:  # disk full, Ctrl-C, SIGTERM: leave no lock behind (we hold flock on it)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                raise_if_disk_full(exc, path)
                raise
            keep = True
            return HeldLock(directory, path, fd, ident, record)
        finally:
            if not keep:
                os.close(fd)
    raise LockedError(f"could not acquire {path}: it changed hands {_ATTEMPTS} times while trying; retry")


@contextlib.contextmanager
def artefact_lock(directory: str | os.PathLike[str], stale_after: float = 120.0, heartbeat: float = 10.0) -> Iterator[HeldLock]:
    """Hold the writer lock of ``directory`` (created if missing) for the block; released in ``finally``.

    Raises :class:`~storage.errors.LockedError` naming the holder when another writer holds it (no waiting).
    ``stale_after`` (seconds) only matters for records this machine cannot check with ``flock`` (another
    machine's, or an older convlens's); ``heartbeat`` is the record's refresh interval in seconds. Yields a
    :class:`HeldLock`: call ``held.check()`` right before publishing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    _install_fork_hook()
    held = _acquire(directory, path, stale_after)
    key = _key(directory)
    with _registry_guard:
        _held[key] = held
    stop = threading.Event()
    thread = threading.Thread(target=held._beat, args=(stop, heartbeat), name="convlens-lock-heartbeat", daemon=True)
    try:
        thread.start()
        yield held
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        with _registry_guard:
            if _held.get(key) is held:
                del _held[key]
        held._release()
