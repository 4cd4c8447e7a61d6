"""Measure the per-unit costs that docs/scaling.md extrapolates to 10M images.

Sections (each prints its measured figures and a ratio against a peer measured in the same run):
  decode   JPEG decode + shorter-side resize 256 (antialiased) + centre crop 224 with the extraction path
           (tasks.core.images.decode_image + tasks.core.forward.preprocess_uint8), one thread; peer: PIL ``draft``
           (DCT-domain downscale while decoding) + the same resize/crop, which a GPU-less decode tier could use.
  ivfpq    FAISS IVF-PQ on synthetic clustered float32 vectors (D = 1280, MobileNetV2 penultimate): train,
           add, search (nprobe 8/16/32), recall@10 vs exact flat search, bytes per vector; peer: exact Flat.
  tsne     openTSNE via tasks.maps.projection.tsne_embed on PCA-50-like clustered data: fit on a sample, place the
           rest with ``transform``; peer: fitting all points.
  publish  write + sha256-verified read of one 8192 x 1280 feature part (the serial publish re-reads parts);
           peer: the same read unverified.
  shards   ``convlens extract`` flow, local runner vs a 2-process Dask LocalCluster (shards), same images;
           skipped unless ``--shards`` (it starts an ephemeral Prefect API and worker processes).

Usage: python benchmarks/scaling.py [--only decode,ivfpq,publish,tsne] [--shards] [--quick]
Nothing is downloaded: images and vectors are generated here. Absolute numbers depend on the machine (and on
other load on it); ratios are within one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` synthetic photos-ish JPEGs (smooth gradients + noise + shapes), 400-640 px wide, quality 90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0, 0.4)) % 256,
                         (yy * rng.uniform(0.2, 0.6)) % 256, np.full((h, w), rng.uniform(0, 255))], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse([x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 160))],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_decode(n: int) -> dict:
    import torch
    from PIL import Image

    from tasks.core.forward import preprocess_uint8
    from tasks.core.images import decode_image
    from tasks.core.models import Preprocess

    torch.set_num_threads(1)
    data = _jpegs(n)
    pre = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")
    t0 = time.perf_counter()
    for b in data:
        preprocess_uint8(decode_image(b, "x.jpg"), pre)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in data:
        img = Image.open(io.BytesIO(b))
        img.draft("RGB", (256, 256))  # JPEG DCT scaling: decode at >= 1/2, 1/4 or 1/8 size, never below 256
        preprocess_uint8(img.convert("RGB"), pre)
    draft = time.perf_counter() - t0
    kb = sum(map(len, data)) / len(data) / 1024
    r = {"images": n, "mean_jpeg_kb": round(kb, 1), "decode_resize_img_s_1core": round(n / ours, 1),
         "draft_decode_resize_img_s_1core": round(n / draft, 1), "ratio_draft_vs_full": round(ours / draft, 2)}
    print(f"decode: {r}")
    return r


def _clustered(n: int, d: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, len(centers), n)
    x = centers[lab] + rng.normal(0, 0.35, (n, d)).astype(np.float32)
    return np.maximum(x, 0).astype(np.float32)  # post-ReLU features are non-negative


def bench_ivfpq(n_train: int, n_add: int, n_query: int, d: int = 1280, nlist: int = 1024, m: int = 64,
                polysemous_peer: bool = True) -> dict:
    """One FAISS thread (per-core figures): coarse k-means rate, IVF-PQ train / add / search, bytes, recall."""
    from tasks.core.faiss_index import add_vectors, import_faiss, new_index, prepare_vectors, search_index, set_nprobe, train_index

    faiss = import_faiss()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    centers = (rng.gamma(0.6, 1.0, (2000, d)) * (rng.random((2000, d)) < 0.3)).astype(np.float32)
    train = prepare_vectors(_clustered(n_train, d, 1, centers), "cosine")
    base = prepare_vectors(_clustered(n_add, d, 2, centers), "cosine")
    queries = prepare_vectors(_clustered(n_query, d, 3, centers), "cosine")
    km = faiss.Kmeans(d, nlist, niter=10, seed=1, max_points_per_centroid=10**9)
    t0 = time.perf_counter()
    km.train(train)
    t_km = time.perf_counter() - t0
    gflops = 2.0 * n_train * nlist * d * 10 / t_km / 1e9
    factory = f"IVF{nlist},PQ{m}"
    idx = new_index(d, factory, "cosine")
    t_train_poly = float("nan")
    if polysemous_peer:
        t0 = time.perf_counter()
        train_index(idx, train)  # index_factory's IVFPQ default: polysemous training on (a fixed ~minutes cost)
        t_train_poly = time.perf_counter() - t0
    idx = new_index(d, factory, "cosine")
    faiss.downcast_index(faiss.extract_index_ivf(idx)).do_polysemous_training = False
    t0 = time.perf_counter()
    train_index(idx, train)
    t_train = time.perf_counter() - t0
    fixed = len(faiss.serialize_index(idx))
    t0 = time.perf_counter()
    for s in range(0, n_add, 50_000):
        add_vectors(idx, base[s:s + 50_000])
    t_add = time.perf_counter() - t0
    nbytes = len(faiss.serialize_index(idx))
    flat = new_index(d, "Flat", "cosine")
    flat.add(base)
    t0 = time.perf_counter()
    gt, _ = search_index(flat, queries, 10, "cosine")
    t_flat = time.perf_counter() - t0
    res = {"factory": factory, "dim": d, "faiss_threads": 1, "train_vectors": n_train, "indexed": n_add,
           "queries": n_query, "coarse_kmeans10_s": round(t_km, 2), "coarse_kmeans_gflops": round(gflops, 1),
           "train_s_default_polysemous": round(t_train_poly, 2), "train_s": round(t_train, 2), "add_vec_s": round(n_add / t_add),
           "fixed_bytes": fixed,
           "bytes_per_vector": round((nbytes - fixed) / n_add, 1), "flat_query_ms": round(1000 * t_flat / n_query, 3),
           "search": []}
    for nprobe in (8, 16, 32, 64):
        set_nprobe(idx, nprobe)
        t0 = time.perf_counter()
        ids, _ = search_index(idx, queries, 10, "cosine")
        dt = time.perf_counter() - t0
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt)]))
        ids100, _ = search_index(idx, queries, 100, "cosine")  # what an exact re-rank of 100 candidates recovers
        recall_rerank = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids100, gt)]))
        scanned = nprobe / nlist * n_add
        res["search"].append({"nprobe": nprobe, "query_ms": round(1000 * dt / n_query, 3), "recall_at_10": round(recall, 3),
                              "recall_at_10_in_top100": round(recall_rerank, 3), "codes_scanned_per_query": int(scanned),
                              "ns_per_code": round(1e9 * dt / n_query / max(scanned, 1), 2),
                              "speedup_vs_flat": round(t_flat / dt, 1)})
    print(f"ivfpq: {json.dumps(res)}")
    return res


def bench_tsne(n: int, sample: int) -> dict:
    from tasks.maps.projection import tsne_embed

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (20, 50))
    x = (centers[rng.integers(0, 20, n)] + rng.normal(0, 1, (n, 50))).astype(np.float32)
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    part = tsne_embed(x, max_fit=sample, n_jobs=cores)
    t_part = time.perf_counter() - t0
    t0 = time.perf_counter()
    tsne_embed(x, max_fit=n, n_jobs=cores)
    t_full = time.perf_counter() - t0
    sec = part.info.get("seconds", {}) if hasattr(part, "info") else {}
    rest = n - sample
    r = {"points": n, "fitted": sample, "transformed": rest, "cores": cores, "sample_total_s": round(t_part, 1),
         "sample_fit_s": sec.get("fit"), "sample_affinities_s": sec.get("affinities"), "transform_s": sec.get("transform"),
         "transform_pts_s": round(rest / sec["transform"]) if sec.get("transform") else None,
         "full_fit_total_s": round(t_full, 1), "ratio_full_vs_sample": round(t_full / t_part, 2)}
    print(f"tsne: {r}")
    return r


def bench_publish(rows: int = 8192, d: int = 1280) -> dict:
    """Write + verified read of one feature part (one default shard at D=1280): the per-part cost of the serial
    publish, which today re-reads every listed part; peer: the same read without the sha256 check."""
    import pyarrow as pa

    from storage.features import feature_schema, read_part, write_part

    rng = np.random.default_rng(0)
    feats = np.maximum(rng.normal(0, 1, (rows, d)), 0).astype(np.float32)
    tbl = pa.table({"image_id": [f"{i:064x}" for i in range(rows)], "path": [f"img/{i}.jpg" for i in range(rows)],
                    "label": ["a"] * rows, "split": [None] * rows, "width": [500] * rows, "height": [375] * rows,
                    "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d)})
    tbl = tbl.cast(feature_schema(d, False)) if set(feature_schema(d, False).names) == set(tbl.column_names) else tbl
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        e = write_part(Path(tmp), tbl)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_part(Path(tmp), e)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_part(Path(tmp), e, verify=False)
        t_noverify = time.perf_counter() - t0
    raw = rows * d * 4 / 1e6
    r = {"rows": rows, "dim": d, "part_mb": round(e["bytes"] / 1e6, 1), "raw_mb": round(raw, 1), "write_s": round(t_write, 2),
         "verified_read_s": round(t_read, 2), "read_s_no_verify": round(t_noverify, 2),
         "verified_read_mb_s": round(raw / t_read), "ratio_verify_vs_not": round(t_read / max(t_noverify, 1e-9), 2)}
    print(f"publish: {r}")
    return r


def bench_shards(n: int) -> dict:
    """Extraction of ``n`` generated PNGs: local runner vs Dask LocalCluster (2 worker processes x 1 thread)."""
    from flows.extract_features import extract_features
    from flows.runners import make_task_runner
    from tasks.extract.features import ExtractConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_color_dataset  # noqa: PLC0415

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_color_dataset(Path(tmp) / "data", per_class=max(1, n // 6), size=(96, 80))
        # decode in-process in both runs: Dask worker processes are daemonic (no DataLoader workers)
        kw = dict(data=str(data), model="mobilenet_v3_small", weights="none", batch_size=32, num_workers=0)
        t0 = time.perf_counter()
        local = extract_features(ExtractConfig(store=str(Path(tmp) / "a"), **kw))
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        dask = extract_features.with_options(task_runner=make_task_runner("dask", workers=2))(ExtractConfig(store=str(Path(tmp) / "b"), **kw))
        t_dask = time.perf_counter() - t0
    r = {"images": local["rows"], "local_s": round(t_local, 1), "dask_2proc_s": round(t_dask, 1),
         "local_img_s": local["images_per_s"], "dask_img_s_parallel_section": dask["images_per_s"],
         "ratio_dask_vs_local_wall": round(t_dask / t_local, 2)}
    print(f"shards: {r}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="decode,ivfpq,publish,tsne")
    ap.add_argument("--shards", action="store_true", help="also time local vs Dask extraction (slow to start)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--no-polysemous-peer", action="store_true", help="skip timing FAISS's default polysemous training")
    a = ap.parse_args()
    q = a.quick
    out = {"cpu_count": os.cpu_count()}
    parts = set(a.only.split(","))
    if "decode" in parts:
        out["decode"] = bench_decode(40 if q else 200)
    if "ivfpq" in parts:
        out["ivfpq"] = bench_ivfpq(10_000 if q else 40_000, 50_000 if q else 200_000, 200 if q else 1000,
                                   nlist=256 if q else 1024, polysemous_peer=not a.no_polysemous_peer)
        out["rss_mb_after_ivfpq"] = round(_rss_mb())
    if "publish" in parts:
        out["publish"] = bench_publish()
    if "tsne" in parts:
        out["tsne"] = bench_tsne(4000 if q else 20_000, 1000 if q else 5000)
    if a.shards:
        out["shards"] = bench_shards(60 if q else 240)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
