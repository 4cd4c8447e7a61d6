"""The sections of ``benchmarks/gpu.sh``, one sub-command each; every one writes one JSON file.

    python benchmarks/gpu_bench.py env        --device cuda --out env.json
    python benchmarks/gpu_bench.py extract    --device cuda --n 20000 --out extract.json [--work DIR]
    python benchmarks/gpu_bench.py occlusion  --device cuda --out occlusion.json [-- occlusion.py args]
    python benchmarks/gpu_bench.py knn        --device cuda --n 1000000 --d 1280 --out knn.json
    python benchmarks/gpu_bench.py summary    --dir OUTDIR

``--device cpu`` is the dry run (tiny sizes chosen by gpu.sh): the same code paths, the GPU-only parts either run
their CPU twin (``--decode gpu`` on a CPU device decodes with torchvision's CPU decoder) or are recorded as
skipped. Nothing is installed or downloaded: the model is MobileNetV2 with the embedded ImageNet weights, the
JPEGs are cut from the sample photos scikit-learn and scikit-image ship, the kNN vectors are random.

Each JSON has ``section``, ``device``, ``status`` (``ok`` / ``skipped`` / ``failed``) and, on CUDA,
``peak_gpu_mem_mb`` (``torch.cuda.max_memory_allocated`` over the section's process).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import runpy
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _peak_mb(device: str) -> float | None:
    import torch

    if _cuda(device) and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def _reset_peak(device: str) -> None:
    import torch

    if _cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: str) -> None:
    import torch

    if _cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize()


def _write(out: str, res: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, default=str), flush=True)


# --------------------------------------------------------------------------------------------------- env


def section_env(a: argparse.Namespace) -> dict:
    import torch
    import torchvision

    res: dict = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                 "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
                 "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res.update({"gpu": p.name, "gpu_mem_gb": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                    "nvjpeg_op": hasattr(torch.ops.image, "decode_jpegs_cuda")})
    try:
        import faiss

        res["faiss"] = faiss.__version__
        res["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as exc:
        res["faiss"] = f"not importable: {exc}"
    res["status"] = "ok" if (torch.cuda.is_available() or not _cuda(a.device)) else "failed"
    if res["status"] == "failed":
        res["error"] = "--device cuda but torch sees no CUDA device"
    return res


# ------------------------------------------------------------------------------------------------ extract


_SOURCES: list[tuple[str, np.ndarray]] = []


def _load_sources() -> None:
    from extract import photo_sources

    if not _SOURCES:
        _SOURCES.extend(photo_sources())


def _make_one(args: tuple) -> None:
    from PIL import Image

    _load_sources()
    path, k, w, h, seed = args
    src = _SOURCES[k][1]
    rng = np.random.default_rng(seed)
    sh, sw = src.shape[:2]
    ch = int(rng.integers(max(8, sh // 2), sh + 1))
    cw = min(sw, int(round(ch * w / h)))
    ch = min(sh, int(round(cw * h / w)))
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC).save(path, quality=90)


def make_jpegs_parallel(root: Path, n: int, sizes: list[tuple[int, int]], workers: int) -> int:
    """``n`` JPEGs (q90) cut from the shipped sample photos, sizes cycled (a quarter portrait), written by a
    process pool (each worker loads the photos once); returns the total bytes."""
    from concurrent.futures import ProcessPoolExecutor

    _load_sources()
    jobs = []
    for i in range(n):
        k = i % len(_SOURCES)
        w, h = sizes[i % len(sizes)]
        if i % 4 == 3:
            w, h = h, w
        d = root / _SOURCES[k][0]
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"img_{i:06d}.jpg", k, w, h, i))
    if workers <= 1 or n < 256:
        for job in jobs:
            _make_one(job)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_load_sources) as ex:
            list(ex.map(_make_one, jobs, chunksize=64))
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


def _features(store: Path, manifest: dict) -> tuple[dict[str, int], np.ndarray]:
    from storage.features import load_features
    from storage.paths import Store

    meta, feats = load_features(Store(store).artefact_dir("features", manifest["artefact_id"]), manifest)
    return {p: i for i, p in enumerate(meta["path"])}, feats


def _rel_l2(a: tuple[dict[str, int], np.ndarray], b: tuple[dict[str, int], np.ndarray]) -> dict:
    common = sorted(set(a[0]) & set(b[0]))
    fa = a[1][[a[0][p] for p in common]].astype(np.float64)
    fb = b[1][[b[0][p] for p in common]].astype(np.float64)
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fb, axis=1), 1e-12)
    cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)
    return {"images": len(common), "rel_l2_mean": round(float(rel.mean()), 5), "rel_l2_max": round(float(rel.max()), 5),
            "cosine_min": round(float(cos.min()), 6)}


def _model_only(device: str, batch: int, precision: str, reps: int) -> float:
    """Forward-only img/s of MobileNetV2 on pre-decoded ``(batch, 3, 224, 224)`` tensors already on ``device``."""
    import torch

    from tasks.core.forward import forward_batch, pick_device, prepare_module
    from tasks.core.hooks import resolve_layer
    from tasks.core.models import load_model

    lm = load_model("mobilenet_v2", "imagenet")
    dev = pick_device(device)
    ref = resolve_layer(lm.module, None)
    module = prepare_module(lm.module, dev, ref)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    forward_batch(module, x, ref, "avg", dev, True, precision)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        forward_batch(module, x, ref, "avg", dev, True, precision)
    _sync(device)
    return batch * reps / (time.perf_counter() - t0)


def section_extract(a: argparse.Namespace) -> dict:
    from extract import parse_sizes

    from tasks.extract.features import ExtractConfig, run_extraction

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="convlens-gpu-bench-"))
    data = work / "jpegs"
    t0 = time.perf_counter()
    if not data.exists() or sum(1 for _ in data.rglob("*.jpg")) != a.n:
        shutil.rmtree(data, ignore_errors=True)
        nbytes = make_jpegs_parallel(data, a.n, parse_sizes(a.sizes), a.gen_workers or (os.cpu_count() or 1))
    else:
        nbytes = sum(p.stat().st_size for p in data.rglob("*.jpg"))
    res: dict = {"images": a.n, "sizes": a.sizes, "mean_jpeg_kb": round(nbytes / a.n / 1024, 1),
                 "generate_s": round(time.perf_counter() - t0, 1), "batch_size": a.batch_size,
                 "precision": a.precision, "runs": {}}
    runs = [("gpu_decode", {"decode": "gpu"}), ("cpu_decode", {"decode": "cpu"}),
            ("cpu_full_decode", {"decode": "cpu", "full_decode": True})]
    feats = {}
    try:
        for name, kw in runs:
            store = work / f"store-{name}"
            shutil.rmtree(store, ignore_errors=True)
            _reset_peak(a.device)
            t0 = time.perf_counter()
            m = run_extraction(ExtractConfig(data=str(data), store=str(store), device=a.device, batch_size=a.batch_size,
                                             precision=a.precision, num_workers=a.num_workers, progress=False, **kw))
            _sync(a.device)
            dt = time.perf_counter() - t0
            if m["rows"] != a.n:
                raise RuntimeError(f"{name}: {m['rows']} rows stored for {a.n} images ({m['rejects']} rejects)")
            res["runs"][name] = {"seconds": round(dt, 2), "img_s": round(a.n / dt, 1),
                                 "loop_img_s": m["run"].get("images_per_s"), "decode": m["preprocessing"]["decode"],
                                 "peak_gpu_mem_mb": _peak_mb(a.device)}
            feats[name] = _features(store, m)
            shutil.rmtree(store, ignore_errors=True)
        r = res["runs"]
        res["ratio_gpu_vs_cpu_decode"] = round(r["gpu_decode"]["img_s"] / r["cpu_decode"]["img_s"], 2)
        res["ratio_draft_vs_full_cpu_decode"] = round(r["cpu_decode"]["img_s"] / r["cpu_full_decode"]["img_s"], 2)
        res["feature_diff_gpu_vs_full"] = _rel_l2(feats["gpu_decode"], feats["cpu_full_decode"])
        res["feature_diff_draft_vs_full"] = _rel_l2(feats["cpu_decode"], feats["cpu_full_decode"])
        _reset_peak(a.device)
        res["model_only_img_s"] = round(_model_only(a.device, a.batch_size, a.precision, a.model_reps), 1)
        res["model_only_peak_gpu_mem_mb"] = _peak_mb(a.device)
        res["status"] = "ok"
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------- occlusion


def section_occlusion(a: argparse.Namespace) -> dict:
    """benchmarks/occlusion.py (convlens vs Captum, outputs checked) on ``--device``, its JSON kept whole."""
    try:
        import captum  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "captum is not installed (the 'test' extra)"}
    argv = ["occlusion.py", "--device", a.device, *a.rest]
    old = sys.argv
    buf = io.StringIO()
    _reset_peak(a.device)
    error = None
    try:
        sys.argv = argv
        with contextlib.redirect_stdout(buf):
            runpy.run_path(str(HERE / "occlusion.py"), run_name="__main__")
    except SystemExit as exc:  # occlusion.py exits non-zero when outputs differ from Captum's
        if exc.code not in (None, 0):
            error = str(exc.code)
    finally:
        sys.argv = old
    text = buf.getvalue()
    start = text.rfind("\n{\n")
    result = json.loads(text[start + 1:] if start >= 0 else text[text.index("{"):])
    return {"status": "failed" if error else "ok", **({"error": error} if error else {}), "args": argv[1:],
            "result": result, "peak_gpu_mem_mb": _peak_mb(a.device)}


# ---------------------------------------------------------------------------------------------------- knn


def section_knn(a: argparse.Namespace) -> dict:
    """Exact kNN graph (k neighbours of every row, cosine) of ``n x d`` random float32 with FAISS: all ``n``
    queries on the GPU; on the CPU ``--cpu-queries`` of them (the rate is per query, so the CPU time for all
    ``n`` is extrapolated). Skipped unless this FAISS sees a GPU (``--device cpu`` runs the CPU half only)."""
    from tasks.core.faiss_index import add_vectors, gpu_available, import_faiss, new_index, search_index, to_device

    faiss = import_faiss()
    has_gpu = gpu_available()
    res: dict = {"n": a.n, "d": a.d, "k": a.k, "metric": "cosine", "faiss": faiss.__version__,
                 "faiss_gpus": int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0}
    if _cuda(a.device) and not has_gpu:
        res.update({"status": "skipped", "reason": "this FAISS build sees no GPU (faiss-cpu installed; see the 'gpu' "
                                                    "extra in pyproject.toml)"})
        return res
    t0 = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((a.n, a.d), dtype=np.float32)
    faiss.normalize_L2(x)
    res["generate_s"] = round(time.perf_counter() - t0, 1)
    q = min(a.cpu_queries, a.n)
    cpu = new_index(a.d, "Flat", "cosine")
    add_vectors(cpu, x)
    t0 = time.perf_counter()
    ci, _ = search_index(cpu, x[:q], a.k + 1, "cosine")
    cpu_s = time.perf_counter() - t0
    res["cpu"] = {"threads": faiss.omp_get_max_threads(), "queries": q, "seconds": round(cpu_s, 2),
                  "queries_per_s": round(q / cpu_s, 1), "graph_seconds_extrapolated": round(cpu_s * a.n / q, 1)}
    if not has_gpu:
        res["gpu"] = {"status": "skipped", "reason": "no GPU FAISS"}
        res["status"] = "ok"
        return res
    _reset_peak(a.device)
    gindex, where = to_device(new_index(a.d, "Flat", "cosine"), "on")
    t0 = time.perf_counter()
    add_vectors(gindex, x)
    gi, _ = search_index(gindex, x, a.k + 1, "cosine", block=a.gpu_block)
    gpu_s = time.perf_counter() - t0
    agree = float(np.mean([len(set(ci[r]) & set(gi[r])) / (a.k + 1) for r in range(q)]))
    res["gpu"] = {"where": where, "queries": a.n, "seconds_incl_add": round(gpu_s, 2), "queries_per_s": round(a.n / gpu_s, 1),
                  "agreement_with_cpu_at_k": round(agree, 4)}
    res["ratio_gpu_vs_cpu_graph"] = round(res["cpu"]["graph_seconds_extrapolated"] / gpu_s, 1)
    res["peak_gpu_mem_mb_torch"] = _peak_mb(a.device)  # FAISS allocates outside torch: see nvidia-smi in env.json
    res["status"] = "ok"
    return res


# ------------------------------------------------------------------------------------------------ summary


def section_summary(a: argparse.Namespace) -> dict:
    out: dict = {"sections": {}}
    peaks = []
    for name in ("env", "extract", "occlusion", "knn"):
        p = Path(a.dir) / f"{name}.json"
        if not p.is_file():
            out["sections"][name] = "missing"
            continue
        d = json.loads(p.read_text())
        out["sections"][name] = d.get("status", "?")
        for k, v in _walk(d):
            if "peak_gpu_mem_mb" in k and isinstance(v, (int, float)):
                peaks.append(v)
    env = json.loads((Path(a.dir) / "env.json").read_text()) if (Path(a.dir) / "env.json").is_file() else {}
    ext = json.loads((Path(a.dir) / "extract.json").read_text()) if (Path(a.dir) / "extract.json").is_file() else {}
    occ = json.loads((Path(a.dir) / "occlusion.json").read_text()) if (Path(a.dir) / "occlusion.json").is_file() else {}
    knn = json.loads((Path(a.dir) / "knn.json").read_text()) if (Path(a.dir) / "knn.json").is_file() else {}
    out["device"] = env.get("gpu") or "cpu (dry run)"
    out["extract_img_s"] = {k: v.get("img_s") for k, v in ext.get("runs", {}).items()}
    out["ratio_gpu_vs_cpu_decode"] = ext.get("ratio_gpu_vs_cpu_decode")
    out["occlusion_speedups"] = {m: {k: v for k, v in r.items() if "vs_captum" in k or "speedup" in k}
                                 for m, r in (occ.get("result") or {}).get("results", {}).items()}
    out["knn_ratio_gpu_vs_cpu"] = knn.get("ratio_gpu_vs_cpu_graph")
    out["knn_status"] = knn.get("status") if knn.get("status") != "ok" else (knn.get("gpu") or {}).get("status", "ok")
    out["peak_gpu_mem_mb"] = max(peaks) if peaks else None
    out["status"] = "ok" if all(v in ("ok", "skipped") for v in out["sections"].values()) else "failed"
    return out


def _walk(d, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, d


SECTIONS = {"env": section_env, "extract": section_extract, "occlusion": section_occlusion, "knn": section_knn,
            "summary": section_summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON file to write (summary: DIR/summary.json)")
    ap.add_argument("--dir", default=".", help="summary: the folder with the sections' JSON files")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cpu-queries", type=int, default=10000)
    ap.add_argument("--gpu-block", type=int, default=16384)
    ap.add_argument("--sizes", default="500x375,640x480,1024x768,1600x1200")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--gen-workers", type=int, default=None)
    ap.add_argument("--model-reps", type=int, default=20)
    ap.add_argument("--work", default=None, help="extract: keep the JPEGs (and reuse them) here")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []  # occlusion: arguments for benchmarks/occlusion.py
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.rest = rest
    out = a.out or (str(Path(a.dir) / "summary.json") if a.section == "summary" else f"{a.section}.json")
    t0 = time.perf_counter()
    try:
        res = SECTIONS[a.section](a)
    except Exception as exc:  # a benchmark section that breaks is recorded, and the script goes on
        res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    res = {"section": a.section, "device": a.device, **res, "section_seconds": round(time.perf_counter() - t0, 1)}
    if a.section != "summary":
        res.setdefault("peak_gpu_mem_mb", _peak_mb(a.device))
    _write(out, res)
    return 0 if res.get("status") in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
