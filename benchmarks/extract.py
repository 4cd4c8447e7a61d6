"""Extraction throughput: the convlens pipeline vs a naive per-image loop, same images, same model, same run.

    python benchmarks/extract.py [--n 256] [--model mobilenet_v2] [--device auto] [--batch-size 64]

Writes N JPEGs (real photos + digits from the demo set, varied sizes), then times
(a) a naive loop: PIL open -> torchvision transforms -> model(x[None]) one image at a time, hooked layer;
(b) ``run_extraction`` (DataLoader decode workers, Conv+BN folded, channels_last, micro-batched forward,
Parquet parts, manifest), and on CPU also (c) the same with ``precision="bf16"`` (opt-in on CPU).
Prints images/s of both and the ratio. On a GPU also runs with AMP/channels_last (the pipeline's defaults).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_jpegs(root: Path, n: int) -> list[Path]:
    from tasks.core.demo_data import build_demo_dataset

    demo = root / "demo"
    build_demo_dataset(demo, per_class=10)
    srcs = sorted(demo.rglob("*.png"))
    out = root / "jpegs"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = Image.open(srcs[i % len(srcs)]).convert("RGB")
        side = int(rng.integers(200, 500))
        img = img.resize((side, int(side * rng.uniform(0.7, 1.3))))
        p = out / f"img_{i:06d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def naive(paths: list[Path], model_name: str, device: str) -> float:
    from tasks.core.hooks import capture, resolve_layer
    from tasks.core.models import load_model

    lm = load_model(model_name, "imagenet" if model_name == "mobilenet_v2" else "none")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model = lm.module.to(dev)
    from torchvision import transforms as T

    pre = lm.preprocess
    tf = T.Compose([T.Resize(pre.resize), T.CenterCrop(pre.crop), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    ref = resolve_layer(model, None)
    feats = []
    t0 = time.perf_counter()
    with capture(model, ref) as acts, torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert("RGB"))[None].to(dev)
            model(x)
            feats.append(acts[ref.alias].flatten(1).cpu().numpy())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0)


def pipeline(paths: list[Path], model_name: str, device: str, batch_size: int, workers: int | None,
             precision: str = "auto") -> float:
    from tasks.extract.features import ExtractConfig, run_extraction

    store = Path(tempfile.mkdtemp(prefix="convlens-bench-store-"))
    try:
        t0 = time.perf_counter()
        m = run_extraction(ExtractConfig(data=str(paths[0].parent), store=str(store), model=model_name,
                                         weights="imagenet" if model_name == "mobilenet_v2" else "none",
                                         device=device, batch_size=batch_size, num_workers=workers,
                                         precision=precision, progress=False))
        dt = time.perf_counter() - t0
        if m["rows"] != len(paths):
            raise SystemExit(f"pipeline stored {m['rows']} rows for {len(paths)} images")
        return len(paths) / dt
    finally:
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--naive-n", type=int, default=None, help="images for the naive loop (default: same N)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the CPU --precision bf16 run")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convlens-bench-"))
    try:
        paths = make_jpegs(root, a.n)
        dev = "cuda" if a.device == "auto" and torch.cuda.is_available() else (a.device if a.device != "auto" else "cpu")
        naive_rate = naive(paths[: a.naive_n or a.n], a.model, dev)
        pipe_rate = pipeline(paths, a.model, dev, a.batch_size, a.num_workers)
        bf16_rate = None
        if not dev.startswith("cuda") and not a.no_bf16:
            bf16_rate = pipeline(paths, a.model, dev, a.batch_size, a.num_workers, precision="bf16")
        name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
        print(f"device: {name}; model {a.model}; {a.n} JPEGs (200-500 px) end to end from files")
        print(f"naive per-image loop : {naive_rate:8.1f} img/s")
        print(f"convlens extract     : {pipe_rate:8.1f} img/s   (batch {a.batch_size}, end to end incl. listing, hashing, Parquet, manifest)")
        print(f"ratio                : {pipe_rate / naive_rate:8.2f}x")
        if bf16_rate is not None:
            print(f"convlens --precision bf16: {bf16_rate:8.1f} img/s   ratio {bf16_rate / naive_rate:.2f}x "
                  "(opt-in on CPU: bf16 autocast, features stored float32, ~1e-2 relative difference)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
