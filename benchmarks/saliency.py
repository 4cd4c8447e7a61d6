"""Gradient methods: convlens vs Captum in the same run, same output checked (max |diff| <= 1e-4 relative).

Saliency, GuidedBackprop, Deconvolution, NoiseTunnel(SmoothGrad), IntegratedGradients on AlexNet / ResNet18
(random weights) at 224x224 for a batch of images. Captum runs each method as documented (IG with its default
internal batch = all steps at once); convlens uses its batched engine. Prints seconds and ratios.

    python benchmarks/saliency.py [--models alexnet,resnet18] [--images 4] [--ig-steps 50]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torchvision

warnings.filterwarnings("ignore")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    from captum.attr import Deconvolution, GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    from tasks.attribution import saliency as S

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="alexnet,resnet18")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ig-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    out = {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        m = getattr(torchvision.models, name)(weights=None).eval().to(dev)
        x = torch.randn(a.images, 3, a.size, a.size, device=dev)
        t = torch.arange(a.images, device=dev)
        cases = {
            "saliency": (lambda: S.vanilla_gradient(m, x, t, batch_size=a.batch_size), lambda: Saliency(m).attribute(x, target=t)),
            "guided": (lambda: S.guided_backprop(m, x, t, batch_size=a.batch_size), lambda: GuidedBackprop(m).attribute(x, target=t)),
            "deconvnet": (lambda: S.deconvnet(m, x, t, batch_size=a.batch_size), lambda: Deconvolution(m).attribute(x, target=t)),
            "smoothgrad": (lambda: (torch.manual_seed(5), S.smoothgrad(m, x, t, batch_size=a.batch_size))[1],
                           lambda: (torch.manual_seed(5), NoiseTunnel(Saliency(m)).attribute(x, nt_type="smoothgrad", target=t))[1]),
            "ig": (lambda: S.integrated_gradients(m, x, t, n_steps=a.ig_steps, batch_size=a.batch_size),
                   lambda: IntegratedGradients(m).attribute(x, target=t, n_steps=a.ig_steps)),
        }
        res = {}
        for meth, (mine, peer) in cases.items():
            mine()  # warm-up
            got, tm = timed(mine)
            ref, tp = timed(peer)
            diff = float((got - ref).abs().max())
            scale = float(ref.abs().max())
            if diff > 1e-4 or diff > 1e-4 * scale:
                raise SystemExit(f"{name}/{meth}: differs from Captum by {diff} (scale {scale})")
            res[meth] = {"convlens_s": round(tm, 3), "captum_s": round(tp, 3), "ratio": round(tp / tm, 2),
                         "max_abs_diff": diff}
            print(name, meth, json.dumps(res[meth]), flush=True)
        out[name] = res
    print(json.dumps({"device": str(dev), "threads": torch.get_num_threads(), "images": a.images, "size": a.size,
                      "results": out}, indent=1))


if __name__ == "__main__":
    main()
