"""convlens t-SNE (openTSNE on an exact FAISS kNN graph) vs ``sklearn.manifold.TSNE``, same data, same run.

Data: ``--n`` points (default 20,000) in ``--d`` dims (default 50, i.e. PCA-50 features) drawn from 20 Gaussian
clusters of different spreads, some of them overlapping. Both methods: 2-d, perplexity 30, PCA init, seed 0,
all cores. Quality: scikit-learn trustworthiness (k=10) on the same 5,000-point sample for both, and kNN label
agreement (k=10, in 2-d). Prints a table and one JSON line; goals: time ratio >= 10x, trustworthiness within 0.02.

    python benchmarks/tsne.py [--n 20000] [--d 50] [--skip-sklearn]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def make_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = 20
    centres = rng.normal(size=(k, d)) * 4.0
    centres[10:15] = centres[:5] + rng.normal(size=(5, d)) * 1.0  # five clusters overlap their partners
    spreads = rng.uniform(0.5, 1.5, size=k)
    lab = rng.integers(0, k, n)
    x = centres[lab] + rng.normal(size=(n, d)) * spreads[lab, None]
    return x.astype(np.float32), lab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=50)
    ap.add_argument("--sample", type=int, default=5_000, help="trustworthiness sample")
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args(argv)

    from sklearn.manifold import TSNE, trustworthiness

    from tasks.maps.projection import knn_label_agreement, tsne_embed

    jobs = os.cpu_count() or 1
    x, lab = make_data(args.n, args.d)
    sample = np.sort(np.random.default_rng(1).choice(args.n, min(args.n, args.sample), replace=False))
    results: dict[str, dict] = {}

    t0 = time.perf_counter()
    ours = tsne_embed(x, dim=2, perplexity=30, seed=0, n_jobs=jobs)
    results["convlens"] = {"seconds": time.perf_counter() - t0, "coords": ours.coords,
                           "detail": ours.info["seconds"]}
    if not args.skip_sklearn:
        t0 = time.perf_counter()
        ref = TSNE(n_components=2, perplexity=30, init="pca", learning_rate="auto", random_state=0,
                   n_jobs=jobs).fit_transform(x)
        results["sklearn"] = {"seconds": time.perf_counter() - t0, "coords": ref.astype(np.float32)}

    for r in results.values():
        r["trustworthiness"] = float(trustworthiness(x[sample], r["coords"][sample], n_neighbors=10))
        r["knn_label_agreement"] = knn_label_agreement(r["coords"], lab, k=10)
    full_agree = knn_label_agreement(x, lab, k=10)

    print(f"t-SNE of {args.n} x {args.d} points, {jobs} CPU threads (trustworthiness on {len(sample)} points, k=10)")
    print(f"{'method':<10} {'seconds':>9} {'trustworthiness':>16} {'kNN label agreement':>20}")
    for name, r in results.items():
        print(f"{name:<10} {r['seconds']:>9.1f} {r['trustworthiness']:>16.4f} {r['knn_label_agreement']:>20.4f}")
    print(f"{'(input)':<10} {'':>9} {'':>16} {full_agree:>20.4f}")
    summary = {"n": args.n, "d": args.d, "threads": jobs,
               "convlens_s": round(results["convlens"]["seconds"], 2),
               "convlens_detail_s": results["convlens"]["detail"],
               "convlens_trustworthiness": round(results["convlens"]["trustworthiness"], 4),
               "convlens_knn_agreement": round(results["convlens"]["knn_label_agreement"], 4),
               "input_knn_agreement": round(full_agree, 4)}
    if "sklearn" in results:
        s, c = results["sklearn"], results["convlens"]
        summary.update({"sklearn_s": round(s["seconds"], 2),
                        "sklearn_trustworthiness": round(s["trustworthiness"], 4),
                        "sklearn_knn_agreement": round(s["knn_label_agreement"], 4),
                        "speedup": round(s["seconds"] / c["seconds"], 2),
                        "trustworthiness_gap": round(s["trustworthiness"] - c["trustworthiness"], 4)})
        print(f"speed-up convlens vs sklearn: {summary['speedup']:.1f}x (goal >= 10x); "
              f"trustworthiness gap {summary['trustworthiness_gap']:+.4f} (goal |gap| <= 0.02)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
