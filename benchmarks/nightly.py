"""Nightly audit: full run vs incremental run with ``--new`` (default 1%) new images, same process, same data.

Generates ``--n`` distinct noisy PNGs (``--size`` px) in a temporary folder, runs the nightly audit once
(full: every stage computes), adds ``--new`` x n new images and runs it again (incremental). The peer is the
full run measured in the same process; prints per-stage seconds of both runs, the ratio incremental / full
(goal <= 0.05) and one JSON line. Also prints the ratio for a third, unchanged run.

Model: ``--model`` (default ``mobilenet_v2 --weights none``: real MobileNetV2 compute, random weights, no
download). Stages: extract, index, dataset audit, maps (PCA + t-SNE + grid), attribution on at most
``--audit-n`` new images (saliency + Grad-CAM), report with drift.

    python benchmarks/nightly.py [--n 2000] [--new 0.01] [--size 96] [--model mobilenet_v2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128), (200, 200, 40), (40, 200, 200)]


def make_images(root: Path, n: int, start: int, size: int) -> None:
    from PIL import Image

    for i in range(start, start + n):
        rgb = CLASSES[i % len(CLASSES)]
        rng = np.random.default_rng(10_000 + i)
        arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-60, 60, (size, size, 3)), 0, 255).astype(np.uint8)
        d = root / f"class{i % len(CLASSES)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"img_{i:06d}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--new", type=float, default=0.01, help="fraction of new images for the incremental run")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--audit-n", type=int, default=16)
    ap.add_argument("--no-maps", action="store_true", help="leave the maps stage out of both runs")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.basicConfig(level=logging.WARNING)

    from tasks.nightly.stages import NightlyConfig, run_nightly

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="convlens-nightly-bench-"))
    data, store = work / "data", work / "store"
    try:
        t0 = time.perf_counter()
        make_images(data, args.n, 0, args.size)
        print(f"generated {args.n} images ({args.size}px) in {time.perf_counter() - t0:.1f}s under {work}")
        cfg = NightlyConfig(data=str(data), store=str(store), model=args.model, weights=args.weights, device="cpu",
                            n=args.audit_n, methods=("saliency", "gradcam"), maps=not args.no_maps)
        full = run_nightly(cfg, say=lambda s: None)
        n_new = max(1, round(args.new * args.n))
        make_images(data, n_new, args.n, args.size)
        inc = run_nightly(cfg, say=lambda s: None)
        same = run_nightly(cfg, say=lambda s: None)
        stages = [k for k in full["seconds"] if k != "total"]
        print(f"\n{'stage':<14}{'full s':>10}{f'+{n_new} new s':>14}{'unchanged s':>14}")
        for k in stages + ["total"]:
            print(f"{k:<14}{full['seconds'].get(k, 0):>10.2f}{inc['seconds'].get(k, 0):>14.2f}{same['seconds'].get(k, 0):>14.2f}")
        ratio = inc["seconds"]["total"] / full["seconds"]["total"]
        ratio_same = same["seconds"]["total"] / full["seconds"]["total"]
        e = inc["stages"]["extract"]
        print(f"\nincremental: {e['extracted']} extracted, {e['reused']} reused; attribution "
              f"{inc['stages']['attribution']['selected']} images; drift {inc['drift']['n_new']} new / "
              f"{inc['drift']['n_removed']} removed")
        fixed = ("attribution",)  # capped at --audit-n images per run, in both runs: not a per-dataset cost
        ratio_wo = (inc["seconds"]["total"] - sum(inc["seconds"].get(k, 0) for k in fixed)) / \
            (full["seconds"]["total"] - sum(full["seconds"].get(k, 0) for k in fixed))
        print(f"incremental / full = {ratio:.3f} (goal <= 0.05: {'met' if ratio <= 0.05 else 'NOT met'}); "
              f"without the attribution stage = {ratio_wo:.3f}; unchanged / full = {ratio_same:.3f}")
        print(json.dumps({"bench": "nightly", "n": args.n, "new": n_new, "size": args.size, "model": args.model,
                          "cpus": os.cpu_count(), "full_s": full["seconds"], "incremental_s": inc["seconds"],
                          "unchanged_s": same["seconds"], "ratio": round(ratio, 4), "ratio_without_attribution": round(ratio_wo, 4),
                          "ratio_unchanged": round(ratio_same, 4),
                          "audited": [full["stages"]["attribution"]["selected"], inc["stages"]["attribution"]["selected"]]}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
