"""The writer lock (storage/locks.py) under contention and at its edges, the umask of published files
(storage/atomic.py), and symlinked artefact directories (storage/paths.py, storage/verify.py)."""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.errors import LockedError, StoreError
from storage.locks import LOCK_NAME, artefact_lock, assert_owned, read_lock
from storage.manifest import MANIFEST_NAME, file_entry, write_manifest
from storage.paths import Store
from storage.verify import verify_store

REPO = Path(__file__).resolve().parents[1]


# --- stress: exclusive under contention --------------------------------------------------------------------

def _stress_worker(module: str, adir: str, inside: str, seconds: float, start, results) -> None:
    """Take ``adir``'s lock in a loop for ``seconds``; inside, create ``inside`` with O_EXCL (it exists only
    while someone is inside). Reports (pid, acquisitions, overlaps, refusals)."""
    artefact_lock = importlib.import_module(module).artefact_lock
    rng = random.Random(os.getpid())
    got = overlaps = refused = 0
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with artefact_lock(adir):
                got += 1
                try:
                    fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    overlaps += 1  # another holder is inside the locked section right now
                    fd = None
                time.sleep(0.001)
                if fd is not None:
                    os.close(fd)
                    os.unlink(inside)
        except LockedError:
            refused += 1
        time.sleep(rng.uniform(0, 0.002))
    results.put((os.getpid(), got, overlaps, refused))


def run_stress(tmp: Path, module: str = "storage.locks", procs: int = 4, seconds: float = 4.0) -> list[tuple[int, int, int, int]]:
    """Run :func:`_stress_worker` in ``procs`` spawned processes at once; one result tuple per process.
    (``module`` lets the same harness be pointed at another lock implementation by hand.)"""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    adir, inside = tmp / "artefact", tmp / "inside"
    workers = [ctx.Process(target=_stress_worker, args=(module, str(adir), str(inside), seconds, start, results))
               for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(1.0)  # let every interpreter finish importing before the clock starts
    start.set()
    out = [results.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    return out


def test_lock_is_exclusive_under_contention(tmp_path):
    out = run_stress(tmp_path)
    got = [g for _, g, _, _ in out]
    overlaps = sum(o for _, _, o, _ in out)
    assert overlaps == 0, f"{overlaps} of {sum(got)} acquisitions had a second holder inside: {out}"
    assert min(got) >= 3, f"a process hardly ever got the lock: {out}"
    assert not (tmp_path / "artefact" / LOCK_NAME).exists()  # every holder released (unlinked) its lock


# --- edges ----------------------------------------------------------------------------------------------------

def _helper(code: str) -> subprocess.Popen:
    """A Python subprocess (repo on its path) that prints ``ready`` once set up, then waits."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"helper did not start: {line!r}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_empty_lock_file_being_created_is_not_stale(tmp_path):
    """A holder between taking the lock and writing its record (an empty file, just created and locked) is a
    live holder: refused, and its file is neither deleted nor written."""
    d = tmp_path / "art"
    d.mkdir()
    lock = d / LOCK_NAME
    holder = _helper(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("ready", flush=True)
        time.sleep(60)
    """)
    try:
        ino = lock.stat().st_ino
        with pytest.raises(LockedError, match="being locked right now"):
            with artefact_lock(d):
                pass
        assert lock.exists() and lock.stat().st_ino == ino and lock.stat().st_size == 0
    finally:
        _stop(holder)
    with artefact_lock(d) as held:  # its creator gone, nothing written: the lock is free
        assert json.loads(held.read_text())["pid"] == os.getpid()


def test_lock_held_by_live_process_is_not_taken(tmp_path):
    d = tmp_path / "art"
    holder = _helper(f"""
        import time
        from storage.locks import artefact_lock
        with artefact_lock({str(d)!r}, stale_after=0.01):
            print("ready", flush=True)
            time.sleep(60)
    """)
    try:
        before = (d / LOCK_NAME).read_bytes()
        with pytest.raises(LockedError, match=f"PID {holder.pid} on {socket.gethostname()}"):
            with artefact_lock(d):
                pass
        # even when its heartbeat is late (stopped process, slow disk): on this machine flock decides, not clocks
        with pytest.raises(LockedError, match=f"PID {holder.pid} on {socket.gethostname()}"):
            with artefact_lock(d, stale_after=0.0):
                pass
        assert (d / LOCK_NAME).read_bytes() == before
    finally:
        _stop(holder)


def test_stale_lock_of_dead_pid_on_this_host_is_reclaimed(tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # an unversioned record (older convlens / hand-written) naming a dead PID on this host
    (d / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "heartbeat": time.time()}))
    with artefact_lock(d) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert not (d / LOCK_NAME).exists()
    # a real holder killed with SIGKILL (record left behind, flock dropped by the kernel), even one whose
    # forked child (think DataLoader worker) outlives it: reclaimed at once
    pidfile = tmp_path / "child.pid"
    holder = _helper(f"""
        import os, time
        from storage.locks import artefact_lock
        with artefact_lock({str(d)!r}):
            if os.fork() == 0:
                open({str(pidfile)!r}, "w").write(str(os.getpid()))
                time.sleep(60)
                os._exit(0)
            while not os.path.exists({str(pidfile)!r}):
                time.sleep(0.01)
            print("ready", flush=True)
            time.sleep(60)
    """)
    child = None
    try:
        left = read_lock(d / LOCK_NAME)
        assert left["pid"] == holder.pid
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        time.sleep(0.05)
        child = int(pidfile.read_text())
        os.kill(child, 0)  # the forked child is still alive
        with artefact_lock(d) as held:
            info = json.loads(held.read_text())
            assert info["pid"] == os.getpid() and info["token"] != left["token"]
    finally:
        _stop(holder)
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_lock_from_another_host_judged_by_store_clock_not_its_wall_clock(tmp_path):
    """A version-2 record written by another machine whose clock is an hour behind: its heartbeat *time* looks
    an hour old, but the file was just written (store clock), so the lock is held."""
    d = tmp_path / "art"
    d.mkdir()
    record = {"v": 2, "pid": 1, "host": "elsewhere", "kernel": "another-boot-id", "token": "t" * 32,
              "started": time.time() - 3600, "heartbeat": time.time() - 3600}
    (d / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(LockedError, match="PID 1 on elsewhere"):
        with artefact_lock(d, stale_after=120):
            pass
    old = time.time() - 3600
    os.utime(d / LOCK_NAME, (old, old))  # its heartbeat really stopped an hour ago, by the store's clock
    with artefact_lock(d, stale_after=120) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()


def test_check_detects_a_lost_lock_and_heartbeat_never_overwrites_another_holder(tmp_path):
    d = tmp_path / "art"
    with artefact_lock(d, heartbeat=0.05) as held:
        held.check()
        assert assert_owned(d) is held
        write_manifest(d, {"files": []})  # still ours: publishing works
        # someone removes the lock file and another writer takes the artefact
        os.unlink(d / LOCK_NAME)
        foreign = json.dumps({"v": 2, "pid": 4242, "host": "elsewhere", "kernel": "x", "token": "f" * 32,
                              "heartbeat": time.time()})
        (d / LOCK_NAME).write_text(foreign)
        time.sleep(0.3)  # several heartbeats
        assert (d / LOCK_NAME).read_text() == foreign  # not rewritten by our heartbeat
        assert not held.owned()
        with pytest.raises(LockedError, match="lost the writer lock"):
            held.check()
        with pytest.raises(LockedError, match="lost the writer lock"):
            write_manifest(d, {"files": []})  # publishing refused
    assert (d / LOCK_NAME).read_text() == foreign  # release does not delete a lock that is not ours
    with pytest.raises(LockedError, match="does not hold"):
        assert_owned(d)


# --- umask ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["022", "002", "077"])
def test_published_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        write_manifest(tmp_path, {"files": [file_entry(tmp_path, "a.bin")]})
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json", MANIFEST_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# --- symlinked artefact directories ------------------------------------------------------------------------------

def test_symlinked_artefact_directory_refused_by_readers_and_verify(tmp_path):
    store = tmp_path / "store"
    real = store / "features" / "real-000000000000"
    real.mkdir(parents=True)
    (real / "a.bin").write_bytes(b"data")
    write_manifest(real, {"files": [file_entry(real, "a.bin")]})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.bin").write_bytes(b"data")
    write_manifest(outside, {"files": [file_entry(outside, "a.bin")]})
    link = store / "features" / "linked-111111111111"
    link.symlink_to(outside, target_is_directory=True)

    result = verify_store(store)
    assert not result["ok"] and result["problems"] == 1
    (rep,) = [a for a in result["artefacts"] if a["artefact_id"] == link.name]
    assert rep["status"] == "refused" and not rep["ok"] and "symlink" in rep["problems"][0]
    assert [a["ok"] for a in result["artefacts"] if a["artefact_id"] == real.name] == [True]

    s = Store(store)
    with pytest.raises(StoreError, match=f"{link}.*symlink.*replace the link with a real directory"):
        list(s.iter_artefacts("features"))
    with pytest.raises(StoreError, match="replace the link with a real directory"):
        s.resolve("features")
    with pytest.raises(StoreError, match="symlink"):
        s.artefact_dir("features", link.name)
    with pytest.raises(StoreError, match="symlink"):
        s.artefact_dir("features", link.name, create=True)
    link.unlink()
    assert [aid for aid, _ in s.iter_artefacts("features")] == [real.name]
    assert verify_store(store)["ok"]
