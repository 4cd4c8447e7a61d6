"""Memory of the extract no-op check and of a no-change publish over N listed files (convlens issue 19).

    python benchmarks/publish_memory.py [--n 100000] [--part-rows 65536]

Builds a synthetic store in a temp folder: a plan over N listed files (a columnar ``RecordTable``, 25-character
paths, 10 labels, 2 splits) whose artefact already holds exactly those N rows (4-d features, parts of
``--part-rows``). Then measures, each call in turn, the Python heap peak (``tracemalloc``, numpy included; Arrow's
pool is not in it) and the RSS growth (Linux ``VmHWM`` after the call minus ``VmRSS`` before) of
``unchanged_manifest(plan)`` and of ``publish_features(plan, [], [], {})`` (nothing new: every part kept). The peer,
measured in the same run, is the dict-per-path no-op check as it was before (``{path: (image_id, label, split)}``
over the listing, then each part's meta columns as Python lists); the ratio is printed. Run the same script in a
checkout of the code as it was to see the publish before (it has no peer in this file).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from memtools import reset_peak, rss_mib


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """``(result, heap peak MiB, RSS growth MiB, seconds)`` of one call."""
    gc.collect()
    reset_peak()
    rss0 = rss_mib("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, peak / 2**20, max(0.0, rss_mib("VmHWM") - rss0), dt


def _dict_noop_check(plan: Any) -> bool:
    """The no-op check as it was: one dict entry per listed path, each part's meta columns as Python lists."""
    from storage.features import part_entries, read_part_columns
    from storage.manifest import read_manifest

    old = read_manifest(plan.artefact_dir)
    listed = {r.path: (r.image_id, r.label, r.split) for r in plan.records}
    seen: set[str] = set()
    for e in part_entries(old):
        t = read_part_columns(plan.artefact_dir, e, ["path", "image_id", "label", "split"]).to_pydict()
        for p, i, lab, sp in zip(t["path"], t["image_id"], t["label"], t["split"]):
            if p in seen or listed.get(p) != (i, lab, sp):
                return False
            seen.add(p)
    return len(seen) == len(listed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--part-rows", type=int, default=65536)
    args = ap.parse_args()

    from PIL import Image

    from storage.features import feature_schema, rejects_schema, write_part
    from storage.manifest import write_manifest
    from tasks.core.datasets import RecordTable, image_digests
    from tasks.extract import features as fx

    n = args.n
    print(f"machine: {os.cpu_count()} cores, load average before {os.getloadavg()[0]:.2f}; n={n}")
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        small.mkdir()
        Image.new("RGB", (40, 40), (200, 30, 30)).save(small / "a.png")
        store = Path(tmp) / "store"
        plan, _ = fx.plan_extraction(fx.ExtractConfig(data=str(small), store=str(store), model="resnet18",
                                                      weights="none", progress=False))

        def table() -> RecordTable:
            paths = pa.array([f"cls{i % 10}/img_{i:08d}.jpg" for i in range(n)], pa.large_string())
            ids = image_digests([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)])
            z = np.full(n, 100, np.int64)
            return RecordTable(small, paths, {}, (np.arange(n) % 10 + 1).astype(np.int32),
                               [None, *[f"cls{k}" for k in range(10)]], (np.arange(n) % 2 + 1).astype(np.int32),
                               [None, "train", "test"], None, z, z.copy(), z.copy(), ids)

        adir = store / "features" / "synthetic"
        adir.mkdir(parents=True)
        t = table()
        files = []
        for s in range(0, n, args.part_rows):
            k = min(args.part_rows, n - s)
            part = t.take(np.arange(s, s + k))
            files.append(write_part(adir, pa.table({
                "image_id": [r.image_id for r in part], "path": part.paths.cast(pa.string()),
                "label": [r.label for r in part], "split": [r.split for r in part],
                "width": np.full(k, 8, np.int32), "height": np.full(k, 8, np.int32),
                "feature": pa.FixedSizeListArray.from_arrays(np.ones(4 * k, np.float32), 4),
            }, schema=feature_schema(4, False))))
        rej = write_part(adir, pa.table({"path": [], "reason": [], "detail": [], "image_id": []},
                                        schema=rejects_schema()), prefix="rejects")
        write_manifest(adir, {"kind": "features", "artefact_id": "synthetic", "dim": 4, "with_preds": False,
                              "rows": n, "rejects": 0,
                              "files": [dict(e, role="part", nonfinite=0, nonzero=True) for e in files]
                              + [dict(rej, role="rejects")]})
        del t, part
        base = replace(plan, artefact_id="synthetic", artefact_dir=adir, dataset_root=small, todo=[], rejects=[],
                       repaired=[], donors=[], stamps_path=None)

        p = replace(base, records=table())
        ok, heap_d, rss_d, dt_d = _measure(lambda: _dict_noop_check(p))
        p = replace(base, records=table())
        same, heap_c, rss_c, dt_c = _measure(lambda: fx.unchanged_manifest(p))
        print(f"no-op check, dict per path (peer): heap peak {heap_d:7.1f} MiB ({heap_d * 2**20 / n:5.0f} B/file), "
              f"RSS +{rss_d:6.1f} MiB, {dt_d:.2f} s, unchanged={ok}")
        print(f"no-op check, unchanged_manifest:   heap peak {heap_c:7.1f} MiB ({heap_c * 2**20 / n:5.0f} B/file), "
              f"RSS +{rss_c:6.1f} MiB, {dt_c:.2f} s, unchanged={same is not None}")
        print(f"ratio heap peak peer / unchanged_manifest: {heap_d / max(heap_c, 1e-9):.1f}x")
        p = replace(base, records=table())
        m, heap_p, rss_p, dt_p = _measure(lambda: fx.publish_features(p, [], [], {}))
        print(f"no-change publish_features:        heap peak {heap_p:7.1f} MiB ({heap_p * 2**20 / n:5.0f} B/file), "
              f"RSS +{rss_p:6.1f} MiB, {dt_p:.2f} s, rows={m['rows']}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
