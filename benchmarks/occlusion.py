"""Occlusion: convlens vs Captum ``Occlusion`` in the same run, same output checked.

AlexNet and ResNet18 (random weights; speed does not depend on the values) at 224x224, window 16, stride 8
(729 windows). Peers: Captum's default (``perturbations_per_eval=1``) and Captum at its best batching
(``--ppe``, 16 by default). convlens: plain batching (``incremental=False``) and with incremental
re-inference (auto cut). Prints seconds and speed-up ratios; asserts max |difference| <= 1e-4.

    python benchmarks/occlusion.py [--models alexnet,resnet18] [--images 1] [--ppe 16] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torchvision

warnings.filterwarnings("ignore")


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    from captum.attr import Occlusion

    from tasks.attribution.occlusion import occlusion, plan_incremental

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="alexnet,resnet18")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--ppe", type=int, default=16, help="Captum perturbations_per_eval for the batched peer")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-default", action="store_true", help="skip Captum's one-per-forward run (slow)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    results = {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        m = getattr(torchvision.models, name)(weights=None).eval().to(dev)
        x = torch.randn(a.images, 3, a.size, a.size, device=dev)
        t = torch.arange(a.images, device=dev) % 1000
        kw = dict(sliding_window_shapes=(3, a.window, a.window), strides=(3, a.stride, a.stride), baselines=0.0, target=t)
        with torch.no_grad():
            m(x)  # warm-up
        r: dict[str, float] = {}
        plan, r["plan_s"] = timed(lambda: plan_incremental(m, (3, a.size, a.size), a.window, a.stride, dev), dev)
        inc, r["convlens_incremental_s"] = timed(lambda: occlusion(m, x, t, a.window, a.stride, 0.0, a.batch_size, plan=plan), dev)
        bat, r["convlens_batched_s"] = timed(lambda: occlusion(m, x, t, a.window, a.stride, 0.0, a.batch_size, incremental=False), dev)
        ref, r["captum_best_s"] = timed(lambda: Occlusion(m).attribute(x, perturbations_per_eval=a.ppe, **kw), dev)
        if not a.skip_default:
            ref1, r["captum_default_s"] = timed(lambda: Occlusion(m).attribute(x, **kw), dev)
            r["max_abs_diff_vs_default"] = float((inc - ref1).abs().max())
        r["max_abs_diff_incremental"] = float((inc - ref).abs().max())
        r["max_abs_diff_batched"] = float((bat - ref).abs().max())
        if max(r["max_abs_diff_incremental"], r["max_abs_diff_batched"]) > 1e-4:
            raise SystemExit(f"{name}: outputs differ from Captum: {r}")
        r["cut"] = plan.cut if plan else None
        r["speedup_vs_captum_best"] = round(r["captum_best_s"] / r["convlens_incremental_s"], 2)
        r["batched_speedup_vs_captum_best"] = round(r["captum_best_s"] / r["convlens_batched_s"], 2)
        if "captum_default_s" in r:
            r["speedup_vs_captum_default"] = round(r["captum_default_s"] / r["convlens_incremental_s"], 2)
        results[name] = {k: (round(v, 3) if isinstance(v, float) and k.endswith("_s") else v) for k, v in r.items()}
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"device": str(dev), "threads": torch.get_num_threads(), "images": a.images, "size": a.size,
                      "window": a.window, "stride": a.stride, "ppe": a.ppe, "batch_size": a.batch_size,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
