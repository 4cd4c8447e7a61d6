"""One writer per artefact: a lock file holding PID, host and a heartbeat.

``with artefact_lock(dir):`` creates ``<dir>/.lock`` with ``O_EXCL``. A second writer gets
:class:`LockedError` naming the holder. A lock whose PID is dead (same host) or whose heartbeat is older
than ``stale_after`` seconds is reclaimed. A daemon thread refreshes the heartbeat while the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from storage.errors import LockedError

__all__ = ["artefact_lock", "LOCK_NAME", "read_lock"]

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(info: dict | None, stale_after: float) -> bool:
    if info is None:
        return True  # unreadable / half-written lock: its writer died while creating it
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return True
    return time.time() - float(info.get("heartbeat", 0)) > stale_after


@contextlib.contextmanager
def artefact_lock(directory: str | os.PathLike[str], stale_after: float = 120.0, heartbeat: float = 10.0) -> Iterator[Path]:
    """Hold the writer lock of ``directory`` for the duration of the block (released in ``finally``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "heartbeat": time.time()}
    for _attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_lock(path)
            if _is_stale(info, stale_after):
                log.warning("reclaiming stale lock %s (holder %s)", path, info)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            raise LockedError(
                f"{directory} is locked by PID {info.get('pid')} on {info.get('host')} "
                f"(heartbeat {time.time() - float(info.get('heartbeat', 0)):.0f}s ago): another convlens run is "
                f"writing this artefact; wait for it to finish, or remove {path} if that process is gone"
            ) from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        except OSError as exc:  # e.g. disk full: leave no half-written lock behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            from storage.atomic import raise_if_disk_full

            raise_if_disk_full(exc, path)
            raise
        break
    else:
        raise LockedError(f"could not acquire {path} after reclaiming a stale lock; retry")

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat):
            me["heartbeat"] = time.time()
            tmp = path.with_name(f".lock-{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(me), "utf-8")
                os.replace(tmp, path)
            except OSError as exc:  # e.g. disk full: the lock stays with an older heartbeat
                log.debug("heartbeat write failed: %s", exc)

    thread = threading.Thread(target=beat, name="convlens-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(timeout=5)
        info = read_lock(path)
        if info is None or (info.get("pid") == me["pid"] and info.get("host") == me["host"]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
