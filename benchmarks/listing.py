"""Listing + hashing: first run vs a rerun with nothing changed (path + size + mtime + inode cache), same run.

    python benchmarks/listing.py [--n 100000] [--workers 8] [--cold] [--path table|records]

Creates N small files (~1 KiB PNG-named blobs, 100 class folders) in a temp folder, then times the planner's
listing + hashing on a first run (every file hashed) and on a rerun with nothing changed (every file a cache hit,
timed three times: the first and the median are printed), and prints the ratio. ``--path table`` (default) is the planner's columnar path
(``tasks.core.datasets.hash_listing``: the walk's ``stat`` straight into columns, one vectorised cache lookup per
chunk of ``--chunk`` files, ``--workers`` threads hash the misses, the cache journalled per chunk); ``--path
records`` is the record path as it was before (``list_dataset`` + ``hash_records``: one ``ImageRecord`` per file),
the peer for memory. Also printed: the machine (cores, load average before / after), the walk + ``stat`` alone, and
RSS per run (Linux ``VmHWM``, reset before each run): each run's peak, and what the rerun's listing keeps; then
one more rerun under ``tracemalloc`` for the bytes per file kept (Python heap + Arrow's pool) and the heap peak.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last :func:`_reset_peak`) of this process in MiB (Linux); the
    process's peak RSS elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: ``echo 5 > /proc/self/clear_refs``); a no-op where that is missing."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5\n")
    except OSError:
        pass


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
    a = ap.parse_args()
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
        base = _rss_mib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        kept, s1 = plan(data, cache)
        first = time.perf_counter() - t0
        peak1 = _rss_mib("VmHWM")
        del kept
        gc.collect()
        base2 = _rss_mib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        kept, s2 = plan(data, cache)
        rerun = time.perf_counter() - t0
        peak2, held = _rss_mib("VmHWM"), _rss_mib("VmRSS")
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
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
