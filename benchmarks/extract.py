"""Extraction throughput: `convlens extract` vs the loop a PyTorch user would write well, same JPEGs, same run.

    python benchmarks/extract.py [--n 600] [--sizes 500x375] [--repeat 2] [--num-workers N] [--json OUT]

Data: ``--n`` JPEGs (quality 90) cut from real photos (scikit-learn's and scikit-image's sample photos: random
crops resized to ``--sizes``, e.g. ``500x375`` ImageNet-like or ``2048x1536`` camera-like; a quarter portrait),
in one class folder per source photo.

Peers, each a separate process started the same way, same environment (threads: torch's default unless
``--threads``; the same ``--num-workers`` DataLoader decode processes), timed wall-clock from start to exit:

- ``loop``: torchvision ``ImageFolder`` + ``DataLoader(batch_size=32, num_workers=N)``, ``Resize`` /
  ``CenterCrop`` / ``ToTensor`` / ``Normalize`` in the workers (the sizes convlens records for the weights),
  MobileNetV2 (real ImageNet weights, fp32) in ``channels_last`` under ``inference_mode``; keeps the 1280-d
  penultimate features and the logits' top 5 and saves the features with ``numpy.save``;
- ``convlens``: ``convlens --no-prefect extract DIR --store FRESH --device cpu`` (listing, sha256 hashing, decode,
  forward, Parquet parts, manifest) with its default decode (``jpeg-draft``), and again with ``--full-decode``.

Each process's CPU time (user + system, its decode workers included) is printed next to its wall time: on a
shared machine the CPU time says more about the work done than the wall clock. Then, in this process: the
model-only forward rate on pre-decoded tensors (convlens's engine as extraction runs it, and the loop's model)
within the same thread budget, so the gap between end to end and the model alone is visible; the feature
difference between the ``jpeg-draft`` and ``full`` decodes (relative L2, cosine) and between the loop and
``--full-decode`` (float rounding: the same pixels go in). ``--naive`` adds the old per-image loop (PIL ->
transforms -> ``model(x[None])``), in process, on up to 256 images. Prints img/s and ratios (goal: convlens
>= 1.5x the loop) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------------- data


def photo_sources() -> list[tuple[str, np.ndarray]]:
    """Real colour photos that ship with scikit-learn / scikit-image (no download): ``(name, (H, W, 3) uint8)``."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out = [(f"sklearn_{i}", img) for i, img in enumerate(load_sample_images().images)]
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        try:
            out.append((name, np.asarray(getattr(skd, name)())))
        except (OSError, ValueError, ModuleNotFoundError):  # an image that needs pooch / a download: skip it
            continue
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().partition("x")
        sizes.append((int(w), int(h)))
    return sizes


def make_photo_jpegs(root: Path, n: int, sizes: list[tuple[int, int]], seed: int = 0, quality: int = 90,
                     portrait: float = 0.25) -> list[Path]:
    """``n`` JPEGs in ``root/<source>/`` cut from real photos: a random crop (at least half the source's side,
    with the target aspect ratio) resized (bicubic) to a size from ``sizes`` (cycled; a ``portrait`` fraction
    turned to portrait), saved at ``quality``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    srcs = photo_sources()
    paths = []
    for i in range(n):
        name, src = srcs[i % len(srcs)]
        w, h = sizes[i % len(sizes)]
        if rng.random() < portrait:
            w, h = h, w
        sh, sw = src.shape[:2]
        ch = int(rng.integers(max(8, sh // 2), sh + 1))
        cw = min(sw, int(round(ch * w / h)))
        ch = min(sh, int(round(cw * h / w)))
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        img = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:06d}.jpg"
        img.save(p, quality=quality)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------ the peer (own process)


def peer_loop(data: str, out: str, batch_size: int, workers: int) -> None:
    """The well-written PyTorch loop (run with ``--peer-run``): prints one JSON line with its timings."""
    t_start = time.perf_counter()
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    from tasks.core.models import load_model

    lm = load_model("mobilenet_v2", "imagenet")
    model = lm.module.eval().to(memory_format=torch.channels_last)
    pre = lm.preprocess  # the same resize / crop / normalisation convlens records for these weights
    tf = T.Compose([T.Resize(pre.resize), T.CenterCrop(pre.crop), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    ds = datasets.ImageFolder(data, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False)
    feats, tops = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _y in loader:
            x = x.contiguous(memory_format=torch.channels_last)
            f = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model.features(x), 1), 1)
            logits = model.classifier(f)
            feats.append(f.numpy())
            tops.append(torch.topk(torch.softmax(logits, 1), 5, 1).indices.numpy())
    loop_s = time.perf_counter() - t0
    np.save(out, np.concatenate(feats))
    Path(out).with_suffix(".paths.json").write_text(json.dumps([os.path.relpath(p, data) for p, _ in ds.samples]))
    print(json.dumps({"images": len(ds), "loop_s": round(loop_s, 3), "setup_s": round(t0 - t_start, 3),
                      "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------------- timing


def timed_process(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``cmd``; returns (wall seconds, CPU seconds of it and its children (user + system), stdout)."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), proc.stdout


def convlens_cmd(data: Path, store: Path, workers: int | None, extra: list[str]) -> list[str]:
    exe = REPO / ".venv" / "bin" / "convlens"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    cmd = base + ["--no-prefect", "extract", str(data), "--store", str(store), "--device", "cpu", "--json"]
    if workers is not None:
        cmd += ["--num-workers", str(workers)]
    return cmd + extra


def read_features(store: Path) -> tuple[dict[str, int], np.ndarray, dict]:
    from storage.features import load_features
    from storage.paths import Store

    s = Store(store)
    aid, m = s.resolve("features", None)
    meta, feats = load_features(s.artefact_dir("features", aid), m)
    return {p: i for i, p in enumerate(meta["path"])}, feats, m


def feature_difference(a: tuple[dict[str, int], np.ndarray], b: tuple[dict[str, int], np.ndarray]) -> dict[str, float]:
    """Per image (joined on path): relative L2 ``|a - b| / |b|`` and cosine of ``a`` vs ``b``; summary stats."""
    common = sorted(set(a[0]) & set(b[0]))
    fa = a[1][[a[0][p] for p in common]].astype(np.float64)
    fb = b[1][[b[0][p] for p in common]].astype(np.float64)
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fb, axis=1), 1e-12)
    cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)
    return {"images": len(common), "rel_l2_mean": float(rel.mean()), "rel_l2_p95": float(np.quantile(rel, 0.95)),
            "rel_l2_max": float(rel.max()), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "changed": int((rel > 0).sum())}


def model_only(threads: int, n: int = 256) -> dict[str, float]:
    """Forward-only img/s on pre-decoded, normalised ``(n, 3, 224, 224)`` float32 batches, fp32, within a budget of
    ``threads`` threads: convlens's engine as extraction runs it (Conv+BN folded, channels_last, micro-batches of
    8 on :func:`tasks.core.forward.cpu_streams_plan` streams) and the loop's model (channels_last, batch 32,
    ``threads`` intra-op threads)."""
    import torch

    from tasks.core.forward import CpuStreams, cpu_streams_plan, forward_batch, prepare_module
    from tasks.core.hooks import resolve_layer
    from tasks.core.models import load_model

    lm = load_model("mobilenet_v2", "imagenet")
    x = torch.randn(n, 3, 224, 224)
    ref = resolve_layer(lm.module, None)
    dev = torch.device("cpu")
    module = prepare_module(lm.module, dev, ref)
    n_streams, per_stream = cpu_streams_plan(64, threads)
    torch.set_num_threads(per_stream)
    with CpuStreams(module, n_streams) as streams:
        forward_batch(module, x[:32], ref, "avg", dev, True, "fp32", streams)
        t0 = time.perf_counter()
        for s in range(0, n, 64):
            forward_batch(module, x[s:s + 64], ref, "avg", dev, True, "fp32", streams)
        ours = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    model = lm.module.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x[:32].contiguous(memory_format=torch.channels_last))
        t0 = time.perf_counter()
        for s in range(0, n, 32):
            model(x[s:s + 32].contiguous(memory_format=torch.channels_last))
        loop = n / (time.perf_counter() - t0)
    return {"threads": threads, "convlens_streams": n_streams, "convlens_engine_img_s": round(ours, 1),
            "loop_model_img_s": round(loop, 1)}


def naive_loop(paths: list[Path]) -> float:
    """The old peer: PIL open -> transforms -> ``model(x[None])`` one image at a time (img/s, in process)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from tasks.core.hooks import capture, resolve_layer
    from tasks.core.models import load_model

    lm = load_model("mobilenet_v2", "imagenet")
    pre = lm.preprocess
    tf = T.Compose([T.Resize(pre.resize), T.CenterCrop(pre.crop), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    ref = resolve_layer(lm.module, None)
    t0 = time.perf_counter()
    with capture(lm.module, ref) as acts, torch.no_grad():
        for p in paths:
            lm.module(tf(Image.open(p).convert("RGB"))[None])
            acts[ref.alias].flatten(1).numpy()
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--sizes", default="500x375", help="comma-separated WxH photo sizes, cycled (default 500x375)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the three processes this many times; best kept")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="DataLoader decode processes for both (default: convlens's own choice, one per 2 cores)")
    ap.add_argument("--batch-size", type=int, default=32, help="the loop's batch size (convlens keeps its default)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both processes (default: unset)")
    ap.add_argument("--naive", action="store_true", help="also time the old naive per-image loop (in process)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--keep", default=None, help="build the JPEGs here and keep them")
    ap.add_argument("--peer-run", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--peer-workers", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_run:
        peer_loop(a.peer_run[0], a.peer_run[1], a.batch_size, a.peer_workers)
        return
    workers = a.num_workers if a.num_workers is not None else max(1, min(4, (os.cpu_count() or 2) // 2))
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="convlens-bench-"))
    try:
        data = root / "jpegs"
        if data.exists():
            paths = sorted(data.rglob("*.jpg"))
        else:
            paths = make_photo_jpegs(data, a.n, parse_sizes(a.sizes))
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        times: dict[str, list[float]] = {"loop": [], "convlens": [], "convlens_full": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        peer_info: dict = {}
        for r in range(a.repeat):
            out = root / f"loop-{r}.npy"
            dt, cs, stdout = timed_process([sys.executable, __file__, "--peer-run", str(data), str(out),
                                            "--batch-size", str(a.batch_size), "--peer-workers", str(workers)], env)
            times["loop"].append(dt)
            cpu["loop"].append(cs)
            peer_info = json.loads(stdout.strip().splitlines()[-1])
            for key, extra in (("convlens", []), ("convlens_full", ["--full-decode"])):
                store = root / f"store-{key}-{r}"
                dt, cs, stdout = timed_process(convlens_cmd(data, store, workers, extra), env)
                times[key].append(dt)
                cpu[key].append(cs)
                summary = json.loads(stdout)
                if summary["rows"] != len(paths):
                    raise SystemExit(f"{key} stored {summary['rows']} rows for {len(paths)} images")
        best = {k: min(v) for k, v in times.items()}
        rate = {k: len(paths) / v for k, v in best.items()}
        draft = read_features(root / "store-convlens-0")
        full = read_features(root / "store-convlens_full-0")
        loop_feats = np.load(root / "loop-0.npy")
        loop_paths = json.loads((root / "loop-0.paths.json").read_text())
        loop = ({p: i for i, p in enumerate(loop_paths)}, loop_feats)
        res = {
            "machine": f"{os.cpu_count()} CPU cores, threads {peer_info.get('threads')}, DataLoader workers {workers}",
            "images": len(paths), "sizes": a.sizes, "mean_jpeg_kb": round(mb, 1),
            "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
            "cpu_seconds": {k: [round(t, 2) for t in v] for k, v in cpu.items()},
            "ratio_cpu_time_vs_loop": round(min(cpu["loop"]) / min(cpu["convlens"]), 2),
            "img_s": {k: round(v, 1) for k, v in rate.items()},
            "ratio_vs_loop": round(rate["convlens"] / rate["loop"], 2),
            "ratio_full_decode_vs_loop": round(rate["convlens_full"] / rate["loop"], 2),
            "loop_inner_s": peer_info.get("loop_s"), "loop_setup_s": peer_info.get("setup_s"),
            "convlens_decode_record": (draft[2].get("preprocessing") or {}).get("decode"),
            "feature_diff_draft_vs_full": feature_difference(draft[:2], full[:2]),
            "feature_diff_loop_vs_full": feature_difference(loop, full[:2]),
        }
        res["model_only"] = model_only(a.threads or peer_info.get("threads") or (os.cpu_count() or 1))
        if a.naive:
            res["naive_img_s"] = round(naive_loop(paths[: min(len(paths), 256)]), 1)
        print(f"{res['machine']}; {len(paths)} JPEGs {a.sizes} (mean {mb:.0f} KB), each peer its own process, "
              f"best of {a.repeat}")
        print(f"PyTorch loop (ImageFolder+DataLoader, batch {a.batch_size}) : {rate['loop']:7.1f} img/s  "
              f"({best['loop']:.2f} s; model+loop {peer_info.get('loop_s')} s)")
        print(f"convlens extract (decode {res['convlens_decode_record']})       : {rate['convlens']:7.1f} img/s  "
              f"({best['convlens']:.2f} s)  ratio {res['ratio_vs_loop']:.2f}x  (goal >= 1.5x)")
        print(f"convlens extract --full-decode            : {rate['convlens_full']:7.1f} img/s  "
              f"({best['convlens_full']:.2f} s)  ratio {res['ratio_full_decode_vs_loop']:.2f}x")
        print(f"CPU seconds (user+sys, with children)     : loop {min(cpu['loop']):.1f}, convlens {min(cpu['convlens']):.1f}, "
              f"--full-decode {min(cpu['convlens_full']):.1f}  (work ratio {res['ratio_cpu_time_vs_loop']:.2f}x)")
        mo = res["model_only"]
        print(f"model only, pre-decoded tensors, {mo['threads']} thr : convlens engine {mo['convlens_engine_img_s']} img/s "
              f"({mo['convlens_streams']} streams), the loop's model {mo['loop_model_img_s']} img/s")
        d = res["feature_diff_draft_vs_full"]
        print(f"features jpeg-draft vs full ({d['changed']}/{d['images']} changed): rel L2 mean {d['rel_l2_mean']:.4f} "
              f"p95 {d['rel_l2_p95']:.4f} max {d['rel_l2_max']:.4f}; cosine min {d['cosine_min']:.5f}")
        d = res["feature_diff_loop_vs_full"]
        print(f"features loop vs --full-decode: rel L2 max {d['rel_l2_max']:.2e}")
        if a.naive:
            print(f"naive per-image loop (in process)         : {res['naive_img_s']:7.1f} img/s")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
