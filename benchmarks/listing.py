"""Listing + hashing: first run vs a rerun with nothing changed (path + size + mtime + inode cache), same run.

    python benchmarks/listing.py [--n 100000] [--workers 8] [--cold] [--path table|records]
    python benchmarks/listing.py --end-to-end [--n 100000] [--size 32] [--cold]
    python benchmarks/listing.py --n 300000 --spill-rows 0   # + the kept listing's anonymous RSS, spilled vs not

Creates N small files (~1 KiB PNG-named blobs, 100 class folders) in a temp folder, then times the planner's
listing + hashing on a first run (every file hashed) and on a rerun with nothing changed (every file a cache hit,
timed three times: the first and the median are printed), and prints the ratio. ``--path table`` (default) is the planner's columnar path
(``tasks.core.datasets.hash_listing``: the walk's ``stat`` straight into columns, one vectorised cache lookup per
chunk of ``--chunk`` files, ``--workers`` threads hash the misses, the cache journalled per chunk); ``--path
records`` is the record path as it was before (``list_dataset`` + ``hash_records``: one ``ImageRecord`` per file),
the peer for memory. Also printed: the machine (cores, load average before / after), the walk + ``stat`` alone, and
RSS per run (Linux ``VmHWM``, reset before each run): each run's peak, and what the rerun's listing keeps; then
one more rerun under ``tracemalloc`` for the bytes per file kept (Python heap + Arrow's pool) and the heap peak.
``--spill-rows R`` (:func:`_anon_kept`): then one more rerun in a fresh process each, the listing kept in memory vs
spilled past R rows to memory-mapped temp files (``tasks.core.datasets.RecordTableBuilder``), printing what each
keeps as anonymous RSS (``RssAnon``) and as file-backed RSS (``RssFile``), the path sort order of ``locate``
included: what dropping the table gives back; and the same for the loaded hash cache (:func:`_anon_cache`,
``HashCache`` in memory vs spilled past R rows), with its load peak and time.

``--end-to-end`` (:func:`end_to_end`): N real ``--size`` px PNGs (a colour per class + noise, 100 class folders), then
``convlens --no-prefect extract DIR --store STORE --device cpu --json`` (the default model a user gets: MobileNetV2,
its embedded ImageNet weights, no download) from nothing, then rerun with nothing changed 3x, each its own process
timed start to exit (``--cold``: page cache dropped before the first run); prints rerun / first (first rerun and
median), each run's CPU time and peak RSS, and the start-up peers ``python -c pass`` and ``convlens --no-prefect extract --help``. Fails
loudly when a rerun was not a no-op (rows extracted, another artefact id, or a features manifest rewritten).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Sequence

import pyarrow as pa
from memtools import reset_peak, rss_mib, trim


def _anon_kept(data: str, cache: str, workers: int, chunk: int, spill_rows: int) -> tuple[float, float, float, bool]:
    """In a fresh (spawned) process: a no-op rerun of the planner's listing kept with ``spill_rows``, plus
    ``locate``'s sort order; returns (RssAnon MiB, RssFile MiB, seconds, spilled), the RSS being what dropping the
    kept table gives back (after ``malloc_trim`` and Arrow's ``release_unused``, so that heap the allocators keep
    from hashing is not counted)."""

    from tasks.core.datasets import hash_listing, open_listing

    t0 = time.perf_counter()
    table, _, _ = hash_listing(open_listing(data), Path(cache), workers=workers, chunk_size=chunk,
                               spill_rows=spill_rows)
    table.locate(table.paths.slice(0, 1))
    secs = time.perf_counter() - t0
    spilled = table.spilled
    trim()
    anon, file_ = rss_mib("RssAnon"), rss_mib("RssFile")
    del table
    trim()
    return anon - rss_mib("RssAnon"), file_ - rss_mib("RssFile"), secs, spilled


def _anon_cache(cache: str, spill_rows: int) -> tuple[float, float, float, float, bool]:
    """In a fresh (spawned) process: load the hash cache at ``cache`` (``tasks.core.datasets.HashCache``) with
    ``spill_rows``; returns (RssAnon MiB, RssFile MiB held by the loaded cache, peak RSS MiB while loading, load
    seconds, spilled), trimmed as in :func:`_anon_kept`, after one row group's ``src`` was read (Arrow's first-use
    allocations). Not counted: the Parquet file in the page cache."""

    import pyarrow.parquet as pq

    from tasks.core.datasets import HashCache

    with pq.ParquetFile(cache) as pf:  # warm up: Arrow / Parquet's first-use allocations are not the cache's
        pf.read_row_group(0, columns=["src"])
    trim()
    anon0, file0 = rss_mib("RssAnon"), rss_mib("RssFile")
    reset_peak()
    base = rss_mib("VmRSS")
    t0 = time.perf_counter()
    c = HashCache(Path(cache), spill_rows=spill_rows)
    secs = time.perf_counter() - t0
    peak = rss_mib("VmHWM") - base
    trim()
    anon, file_ = rss_mib("RssAnon") - anon0, rss_mib("RssFile") - file0
    return anon, file_, peak, secs, c.spilled



# ------------------------------------------------------------------------------------------- end to end (--end-to-end)

REPO = Path(__file__).resolve().parent.parent


def _write_images(data: Path, n: int, size: int, seed: int = 0) -> int:
    """Write ``n`` decodable ``size`` x ``size`` RGB PNGs into 100 class folders ``data/class_CCC/img_IIIIIII.png``:
    a colour per class plus uniform noise (+-40 per channel, uint8), so every file's bytes differ. Returns the bytes
    written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for c in range(100):
        (data / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % 100
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], np.int16)
        arr = np.clip(colour + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        path = data / f"class_{c:03d}" / f"img_{i:07d}.png"
        Image.fromarray(arr).save(path)
        total += path.stat().st_size
    return total


def _drop_page_cache() -> str:
    """Drop the OS page cache (Linux, root; ``sync`` first); returns a note for the printout saying whether it did."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:  # 1 = page cache only
            fh.write("1\n")
        return "cold page cache"
    except OSError as exc:
        return f"warm page cache (could not drop it: {exc.strerror})"


def _timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run ``cmd`` (cwd the repo) as its own process; returns (wall s from start to exit, CPU s user + system, peak
    RSS MiB of the process or its largest waited-for descendant, stdout). ``os.wait4`` gives this child's own
    rusage, so each run's peak is its own; on Linux it is never below this process's RSS at the fork (the child
    starts as a copy). Exits with the command's stderr tail when it fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, stdout


def _features_state(store: Path) -> dict[str, tuple[str, int]]:
    """Every features artefact's ``manifest.json`` in ``store``: {artefact id: (sha256 hex, mtime ns)}."""
    import hashlib

    state = {}
    for m in sorted((store / "features").glob("*/manifest.json")):
        state[m.parent.name] = (hashlib.sha256(m.read_bytes()).hexdigest(), m.stat().st_mtime_ns)
    return state


def end_to_end(n: int, size: int, cold: bool, reruns: int = 3, extract_args: Sequence[str] = ()) -> None:
    """``convlens --no-prefect extract DIR --store STORE --device cpu --json [extract_args]`` (by default the default
    model: MobileNetV2 with its embedded ImageNet weights, penultimate layer; the issue's own baseline used
    ``--model resnet18 --weights none --resize 32 --crop 32``) on ``n`` generated ``size`` px PNGs, from nothing, then
    ``reruns`` times with nothing changed, each its own process timed start to exit; prints the ratio (first rerun and
    median / first run), each run's peak RSS and CPU time, and the process start-up peers (``python -c pass``,
    ``convlens --no-prefect extract --help``). Raises SystemExit when a rerun was not a no-op (extracted rows, another artefact id, or a
    features manifest rewritten)."""
    exe = REPO / ".venv" / "bin" / "convlens"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    root = Path(tempfile.mkdtemp(prefix="convlens-e2e-"))
    try:
        data, store = root / "data", root / "store"
        t0 = time.perf_counter()
        nbytes = _write_images(data, n, size)
        print(f"wrote {n} {size}x{size} PNGs ({nbytes / n:.0f} B mean, 100 class folders) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        cmd = [*base, "--no-prefect", "extract", str(data), "--store", str(store), "--device", "cpu", "--json",
               *extract_args]
        print("command: " + " ".join(cmd[len(base):]), flush=True)
        cache_note = _drop_page_cache() if cold else "warm page cache (images just written; --cold drops it)"
        load0 = os.getloadavg()
        first, cpu1, rss1, out1 = _timed(cmd)
        m1 = json.loads(out1)
        before = _features_state(store)
        print(f"first run ({cache_note}): {first:.1f} s, CPU {cpu1:.1f} s, peak RSS {rss1:.0f} MiB, "
              f"{m1['extracted']} extracted, {m1['rows']} rows, artefact {m1['artefact_id']}", flush=True)
        if m1["rows"] != n or m1["extracted"] != n:
            raise SystemExit(f"FAILED: the first run stored {m1['rows']} rows ({m1['extracted']} extracted), not {n}")
        runs = []
        for k in range(reruns):
            wall, cpu, rss, out = _timed(cmd)
            m = json.loads(out)
            after = _features_state(store)
            if m["extracted"] != 0 or m["artefact_id"] != m1["artefact_id"] or after != before:
                raise SystemExit(f"FAILED: rerun {k + 1} was not a no-op: extracted {m['extracted']}, artefact "
                                 f"{m['artefact_id']} (first {m1['artefact_id']}), features manifests "
                                 f"{'unchanged' if after == before else f'changed: {before} -> {after}'}")
            runs.append((wall, cpu, rss))
            print(f"rerun {k + 1}: {wall:.2f} s, CPU {cpu:.2f} s, peak RSS {rss:.0f} MiB (no-op: 0 extracted, same "
                  f"artefact, manifest bytes and mtime unchanged)", flush=True)
        peers = {}
        # the CLI imports only the module of the command it runs, so the start-up peer is `extract --help`
        for name, peer in (("python -c pass", [sys.executable, "-c", "pass"]),
                           ("convlens --no-prefect extract --help", [*base, "--no-prefect", "extract", "--help"])):
            times = sorted(_timed(peer)[:3] for _ in range(3))
            peers[name] = times[1]
        median = sorted(r[0] for r in runs)[len(runs) // 2]
        help_s = peers["convlens --no-prefect extract --help"][0]
        print(f"{n} images end to end: first run {first:.1f} s; rerun {runs[0][0]:.2f} s (first), {median:.2f} s "
              f"(median of {len(runs)})")
        print(f"rerun / first = {runs[0][0] / first:.2%} (first rerun), {median / first:.2%} (median)  (goal <= 5%)")
        print(f"start-up peers (median of 3; peak RSS floor {rss_mib('VmRSS'):.0f} MiB = this process at the fork): " + "; ".join(
            f"{k} {v[0]:.2f} s, CPU {v[1]:.2f} s, peak RSS {v[2]:.0f} MiB" for k, v in peers.items())
              + f"; so {help_s / median:.0%} of the median rerun is starting `convlens` (interpreter + CLI imports), "
              f"{max(median - help_s, 0.0):.2f} s the no-op work")
        print(f"machine {os.cpu_count()} cores, load average {load0[0]:.1f} before / {os.getloadavg()[0]:.1f} after "
              f"(shared machine)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=None, help="files per hashing chunk (default: the library's)")
    ap.add_argument("--path", choices=("table", "records"), default="table",
                    help="table: the planner's columnar path (default); records: list_dataset + hash_records")
    ap.add_argument("--cold", action="store_true",
                    help="drop the OS page cache before the first run (Linux, root), so the first run reads the files "
                         "from disk as a first audit of an unread dataset does; metadata stays cached for both runs")
    ap.add_argument("--end-to-end", action="store_true",
                    help="time `convlens --no-prefect extract DIR --store STORE --device cpu` (default model) on N "
                         "generated PNGs from nothing vs rerun with nothing changed (3x), each its own process")
    ap.add_argument("--size", type=int, default=32, help="--end-to-end: image side in px (default 32)")
    ap.add_argument("--extract-args", default="",
                    help="--end-to-end: more `convlens extract` flags, e.g. '--model resnet18 --weights none "
                         "--resize 32 --crop 32' (the issue's baseline setting)")
    ap.add_argument("--spill-rows", type=int, default=None,
                    help="also measure the kept listing's anonymous RSS spilled past this many rows vs in memory")
    a = ap.parse_args()
    if a.end_to_end:
        end_to_end(a.n, a.size, a.cold, extract_args=shlex.split(a.extract_args))
        return
    from tasks.core.datasets import HASH_CHUNK, hash_listing, hash_records, list_dataset, open_listing

    chunk = a.chunk or HASH_CHUNK

    def plan(data: Path, cache: Path) -> tuple[object, dict[str, int]]:
        if a.path == "table":
            table, _, stats = hash_listing(open_listing(data), cache, workers=a.workers, chunk_size=chunk)
            return table, stats
        recs, _, _ = list_dataset(data)
        hashed, _, stats = hash_records(recs, cache, workers=a.workers, chunk_size=chunk)
        return hashed, stats

    root = Path(tempfile.mkdtemp(prefix="convlens-listing-"))
    try:
        data = root / "data"
        for c in range(100):
            (data / f"class_{c:03d}").mkdir(parents=True)
        for i in range(a.n):
            (data / f"class_{i % 100:03d}" / f"img_{i:07d}.png").write_bytes(os.urandom(1024))
        cache = root / "hashes.parquet"
        cold = ""
        if a.cold:
            os.sync()
            try:
                with open("/proc/sys/vm/drop_caches", "w") as fh:  # 1 = page cache only
                    fh.write("1\n")
                cold = " (first run from a cold page cache)"
            except OSError as exc:
                cold = f" (--cold: could not drop the page cache: {exc.strerror}; first run from a warm cache)"
        load0 = os.getloadavg()
        base = rss_mib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        kept, s1 = plan(data, cache)
        first = time.perf_counter() - t0
        peak1 = rss_mib("VmHWM")
        del kept
        gc.collect()
        base2 = rss_mib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        kept, s2 = plan(data, cache)
        rerun = time.perf_counter() - t0
        peak2, held = rss_mib("VmHWM"), rss_mib("VmRSS")
        # the rerun's phases, timed apart once more: walk + stat alone (no cache), then the whole rerun
        t0 = time.perf_counter()
        listing = open_listing(data)
        walked = sum(len(b.names) for b in listing.batches) if listing.batches is not None else len(list(listing.records))
        walk = time.perf_counter() - t0
        again = []  # the same no-op rerun twice more: a shared machine's load moves single timings a lot
        for _ in range(2):
            del kept
            t0 = time.perf_counter()
            kept, _ = plan(data, cache)
            again.append(time.perf_counter() - t0)
        median = sorted([rerun, *again])[1]
        print(f"{a.n} files, --path {a.path}{cold}: first run {first:.2f} s ({s1['hashed']} hashed), "
              f"rerun {rerun:.2f} s ({s2['cached']} from cache, {s2['hashed']} hashed), then again "
              f"{again[0]:.2f} s, {again[1]:.2f} s; walk + stat alone {walk:.2f} s ({walked} files)")
        print(f"rerun / first = {rerun / first:.1%} (the first rerun), {median / first:.1%} (median of 3)  (goal <= 5%); "
              f"machine {os.cpu_count()} cores, load average {load0[0]:.1f} before / {os.getloadavg()[0]:.1f} after "
              f"(shared machine)")
        print(f"RSS: {base:.0f} MiB before the first run (imports, files written), its peak {peak1:.0f} MiB; "
              f"{base2:.0f} MiB before the rerun, its peak {peak2:.0f} MiB (+{(peak2 - base2) * 1048576 / a.n:.0f} B per "
              f"file), {held:.0f} MiB holding its listing (+{(held - base2) * 1048576 / a.n:.0f} B per file); "
              f"process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        # RSS moves in allocator-sized steps (freed memory is kept by malloc / Arrow's pool): one more rerun, traced
        del kept
        gc.collect()
        arrow0 = pa.total_allocated_bytes()
        tracemalloc.start()
        kept, _ = plan(data, cache)
        gc.collect()
        now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"traced rerun: kept {(now + pa.total_allocated_bytes() - arrow0) / a.n:.0f} B per file (Python heap + "
              f"Arrow), Python heap peak {peak / a.n:.0f} B per file (the cache's Arrow columns, ~130 B per file, "
              f"not included)")
        if a.spill_rows is not None:  # each in a fresh process: freed heap kept by the allocator would blur it
            import concurrent.futures as cf
            import multiprocessing as mp

            res = {}
            for name, rows in (("in memory", a.n + 1), (f"spilled past {a.spill_rows} rows", a.spill_rows)):
                with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                    res[name] = ex.submit(_anon_kept, str(data), str(cache), a.workers, chunk, rows).result()
                anon, file_, secs, spilled = res[name]
                print(f"kept listing {name}: RssAnon +{anon:.1f} MiB (+{anon * 1048576 / a.n:.0f} B per file), RssFile "
                      f"+{file_:.1f} MiB, rerun + sort order {secs:.2f} s, spilled={spilled}")
            (m, _, tm, _), (s_, _, ts, _) = res.values()
            print(f"spilled / in memory: RssAnon {s_ / m if m > 0 else float('nan'):.1%}, time {ts / tm:.2f}x")
            cres = {}
            for name, rows in (("in memory", a.n + 1), (f"spilled past {a.spill_rows} rows", a.spill_rows)):
                with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                    cres[name] = ex.submit(_anon_cache, str(cache), rows).result()
                anon, file_, peak, secs, spilled = cres[name]
                print(f"hash cache {name}: RssAnon +{anon:.1f} MiB (+{anon * 1048576 / a.n:.0f} B per entry), RssFile "
                      f"+{file_:.1f} MiB, load peak +{peak:.1f} MiB, load {secs:.2f} s, spilled={spilled}")
            (m, _, _, tm, _), (s_, _, _, ts, _) = cres.values()
            print(f"hash cache spilled / in memory: RssAnon {s_ / m if m > 0 else float('nan'):.1%}, "
                  f"load time {ts / tm:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
