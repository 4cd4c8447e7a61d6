"""The dataset audit's pixel path at scale: candidate search + confirmation of ``find_near_copies``, exact vs auto.

    python benchmarks/near_copy_scale.py [--images 50000] [--copies 200] [--knn-rows 100000] [--dir DIR]

1. **Images** (``--images``): distinct 32 x 32 uniform-noise pictures (PNG) plus ``--copies`` planted near-copies of
   random ones (5 % crop, JPEG q80, brightness x1.1, 0.9x resize). Each variant runs
   :func:`tasks.index.dataset_audit.find_near_copies` in its own child process (peak RSS = the child's
   ``ru_maxrss``) on the same id map and a feature kNN graph (every image's 10 "feature" neighbours: a planted copy
   is linked to its source, the rest are random rows below the feature threshold):

   - ``exact``: the old search, thumbnails in memory and an exact all-vs-all 16x16 kNN (``pixel_exact_max_rows`` and
     ``spill_rows`` set above N) — what the audit did for every N before;
   - ``auto``: the approximate ``auto`` FAISS index (IVF-PQ fast-scan + exact re-rank) and thumbnails spilled to a
     temp file (thresholds set below N, as they are above 100k / 65,536 images by default).

   Printed per variant: seconds (thumbnails / candidates / confirm, from the record), peak RSS, candidate pairs,
   recall of the planted pairs and pairs found that were not planted.
2. **Candidate kNN alone** (``--knn-rows``, 0 to skip): ``--knn-rows`` generated thumbnails (no images; see
   :func:`bench_knn`): exact ``knn_search`` vs the ``auto`` index as :func:`find_near_copies` builds it, seconds and
   recall@10 of the approximate neighbours against the exact ones (all, and those at correlation >= PREFILTER).

Ratios are against the exact peer measured in the same run. No network.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(root: Path, n: int, copies: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n - copies`` noise pictures + ``copies`` near-copies under ``root``; returns the planted (source, copy) rows."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    distinct = n - copies
    sub = root / "img"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub / f"{i:07d}.png", compress_level=1)
    planted = []
    sources = rng.choice(distinct, copies, replace=False)
    for j, src in enumerate(sources.tolist()):
        with Image.open(sub / f"{src:07d}.png") as im:
            img = im.convert("RGB")
        how = j % 4
        if how == 0:
            img = img.crop((1, 1, 31, 31))
        elif how == 1:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        elif how == 2:
            img = ImageEnhance.Brightness(img).enhance(1.1)
        else:
            img = img.resize((29, 29), Image.BILINEAR)
        img.save(sub / f"{distinct + j:07d}.png", compress_level=1)
        planted.append((int(src), distinct + j))
    return planted


def tables(n: int, planted: list[tuple[int, int]], k: int = 10, seed: int = 1):
    """Id map and a feature kNN graph (numeric columns) for ``n`` images."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    idmap = pd.DataFrame({"row": np.arange(n), "image_id": [f"{i:064x}" for i in range(n)],
                          "path": [f"img/{i:07d}.png" for i in range(n)], "label": None, "split": "train"})
    nb = rng.integers(0, n, (n, k))
    dist = np.sort(rng.uniform(0.2, 0.6, (n, k)).astype(np.float32), axis=1)
    for s, c in planted:  # the copy and its source are each other's first feature neighbour
        nb[s, 0], nb[c, 0] = c, s
        dist[s, 0] = dist[c, 0] = 0.01
    graph = pd.DataFrame({"row": np.repeat(np.arange(n), k), "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
                          "neighbor_row": nb.ravel(), "distance": dist.ravel()})
    return idmap, graph


def child_variant(work: Path, variant: str, n: int) -> dict:
    """Run find_near_copies once (in this process) and return its record + what it found."""
    from tasks.index.dataset_audit import AuditParams, find_near_copies

    planted = json.loads((work / "planted.json").read_text())
    idmap, graph = tables(n, [tuple(p) for p in planted])
    big = 10 ** 12
    kw = ({"pixel_exact_max_rows": big, "spill_rows": big} if variant == "exact"
          else {"pixel_exact_max_rows": 1000, "spill_rows": 1000, "spill_dir": str(work / "spill")})
    t0 = time.perf_counter()
    near = find_near_copies(idmap, graph, str(work / "data"), AuditParams(k=10), 0.9, lambda a, b: float("nan"), **kw)
    secs = time.perf_counter() - t0
    truth = {(min(a, b), max(a, b)) for a, b in planted}
    found = set(near.pairs)
    rec = near.record
    return {"variant": variant, "seconds": round(secs, 1), "steps": rec.get("seconds"),
            "candidates": rec["candidates"], "confirmed": rec["confirmed_pairs"],
            "planted_recall": round(len(found & truth) / max(1, len(truth)), 4), "not_planted": len(found - truth),
            "thumbnails_spilled": rec.get("thumbnails_spilled")}


def bench_knn(rows: int, k: int = 10, seed: int = 2, scenes: int = 2000, exact: bool = True) -> dict:
    """Exact vs auto 16x16 kNN on ``rows`` generated thumbnails (no images): each is one of ``scenes`` random 8x8
    grey layouts plus its own variation (unaligned correlation with a same-scene thumbnail ~0.8, ~0 across scenes),
    blown up to 64x64. Recall@10 of the auto neighbours against the exact ones, overall and for the exact neighbours
    at correlation >= PREFILTER (those that become candidates). ``exact=False`` skips the exact peer (O(N^2): hours
    at 1M here) and the recall; thumbnails are spilled above ``SPILL_ROWS`` as in the audit."""
    from tasks.core.faiss_index import knn_search
    from tasks.index import near_copy as nc
    from tasks.index.dataset_audit import _pixel_knn

    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(scenes, 8, 8))
    store = nc.ThumbStore(rows)
    for start in range(0, rows, 8192):
        m = min(8192, rows - start)
        g = proto[rng.integers(0, scenes, m)] + 0.5 * rng.normal(size=(m, 8, 8))
        g = np.repeat(np.repeat(g, 8, axis=1), 8, axis=2)
        store.write(start, np.clip(128 + 40 * g, 0, 255).astype(np.uint8))
    struct = np.arange(rows)
    if exact:
        coarse = np.concatenate([nc.coarse_vectors(store.read(s, s + 8192)) for s in range(0, rows, 8192)])
        t0 = time.perf_counter()
        ex_idx, ex_dist = knn_search(coarse, k, "cosine")
        t_exact = time.perf_counter() - t0
        del coarse
    saved = nc.PREFILTER
    nc.PREFILTER = -2.0  # keep every neighbour the auto index returns, to measure its recall
    try:
        t0 = time.perf_counter()
        a, b, record, _ = _pixel_knn(store, struct, k, None, 0)
        t_auto = time.perf_counter() - t0
    finally:
        nc.PREFILTER = saved
    store.close()
    if not exact:
        return {"rows": rows, "auto_s": round(t_auto, 1), "auto_index": record, "pairs_returned": int(len(a))}
    got = {(int(x), int(y)) for x, y in zip(a.tolist(), b.tolist())}
    sample = rng.choice(rows, min(rows, 5000), replace=False)
    pairs = [(int(i), int(j), 1.0 - float(d)) for i in sample for j, d in zip(ex_idx[i], ex_dist[i])]
    close = [(i, j) for i, j, s in pairs if s >= saved]
    return {"rows": rows, "exact_s": round(t_exact, 1), "auto_s": round(t_auto, 1),
            "exact_over_auto": round(t_exact / max(t_auto, 1e-9), 2),
            "recall_at_10": round(sum((i, j) in got for i, j, _ in pairs) / max(1, len(pairs)), 4),
            "recall_candidates": round(sum(p in got for p in close) / max(1, len(close)), 4),
            "auto_index": record}


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; returns (its RESULT record, peak RSS MiB)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    out = proc.stdout.read() if proc.stdout else ""
    _pid, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed:\n{out[-3000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:]), round(ru.ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--knn-rows", type=int, default=100_000)
    ap.add_argument("--knn-skip-exact", action="store_true", help="candidate kNN: time the auto index only (for 1M)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed after)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_work", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child == "knn":
        print("RESULT " + json.dumps(bench_knn(a.knn_rows, exact=not a.knn_skip_exact)))
        return 0
    if a._child:
        print("RESULT " + json.dumps(child_variant(a._work, a._child, a.images)))
        return 0
    print(f"machine: {os.cpu_count()} cores, load average {tuple(round(v, 2) for v in os.getloadavg())}", flush=True)
    tmp = None
    work = a.dir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="near-copy-scale-")
        work = Path(tmp.name)
    try:
        if a.images:
            t0 = time.perf_counter()
            planted = make_images(work / "data", a.images, a.copies)
            (work / "planted.json").write_text(json.dumps(planted))
            print(f"wrote {a.images} images ({a.copies} planted copies) in {time.perf_counter() - t0:.1f}s", flush=True)
            res = {}
            for variant in ("exact", "auto"):
                rec, rss = run_child(["--_child", variant, "--_work", str(work), "--images", str(a.images)])
                rec["peak_rss_mib"] = rss
                res[variant] = rec
                print(json.dumps(rec), flush=True)
            e, o = res["exact"], res["auto"]
            print(f"auto / exact: seconds {o['seconds'] / max(e['seconds'], 1e-9):.2f}, candidate step "
                  f"{(o['steps'] or {}).get('candidates', 0) / max((e['steps'] or {}).get('candidates', 0), 1e-9):.2f}, "
                  f"peak RSS {o['peak_rss_mib'] / e['peak_rss_mib']:.2f}", flush=True)
        if a.knn_rows:
            rec, rss = run_child(["--_child", "knn", "--knn-rows", str(a.knn_rows)]
                                 + (["--knn-skip-exact"] if a.knn_skip_exact else []))
            rec["peak_rss_mib"] = rss
            print(json.dumps(rec), flush=True)
        print(f"load average after: {tuple(round(v, 2) for v in os.getloadavg())}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
