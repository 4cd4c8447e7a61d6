"""Top-10 kNN over random features: FAISS exact (IndexFlatIP on normalised vectors) vs scikit-learn
``NearestNeighbors(algorithm="brute", metric="cosine")`` in the same run, plus FAISS GPU when a GPU build sees one.

    python benchmarks/neighbors.py [--n 50000] [--d 1024] [--queries 2000] [--threads N]

Both engines search the same ``--queries`` query rows against all N rows (k=10) and report seconds and the ratio;
results are checked to agree (recall of FAISS vs sklearn). ``--all`` times the full N x N graph instead.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all)")
    ap.add_argument("--all", action="store_true", help="query every row (full kNN graph)")
    ap.add_argument("--ivf", default=None, help="also time an approximate factory, e.g. IVF256,Flat (trained on 20k rows)")
    ap.add_argument("--nprobe", type=int, default=16)
    a = ap.parse_args()

    from sklearn.neighbors import NearestNeighbors

    from tasks.core.faiss_index import gpu_available, import_faiss, new_index, prepare_vectors, search_index, to_device

    faiss = import_faiss()
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, a.d), dtype=np.float32)
    q = x if a.all else x[rng.choice(a.n, size=min(a.queries, a.n), replace=False)]
    print(f"N={a.n} D={a.d} queries={len(q)} k={a.k} faiss={faiss.__version__} threads={faiss.omp_get_max_threads()}")

    t = time.perf_counter()
    index = new_index(a.d, "Flat", "cosine")
    index.add(prepare_vectors(x, "cosine"))
    build = time.perf_counter() - t
    t = time.perf_counter()
    fi, _fd = search_index(index, prepare_vectors(q, "cosine"), a.k, "cosine")
    t_faiss = time.perf_counter() - t
    print(f"faiss cpu Flat:   build {build:.3f}s  search {t_faiss:.3f}s  ({len(q) / t_faiss:,.0f} queries/s)")

    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=a.k, algorithm="brute", metric="cosine").fit(x)
    _sd, si = nn.kneighbors(q)
    t_sk = time.perf_counter() - t
    print(f"sklearn brute:    fit+search {t_sk:.3f}s  ({len(q) / t_sk:,.0f} queries/s)")
    recall = np.mean([len(set(a_) & set(b_)) / a.k for a_, b_ in zip(fi, si)])
    print(f"ratio sklearn / faiss cpu = {t_sk / t_faiss:.1f}x   (agreement recall@{a.k} = {recall:.4f})")

    if a.ivf:
        from tasks.core.faiss_index import set_nprobe, train_index

        t = time.perf_counter()
        ivf = new_index(a.d, a.ivf, "cosine")
        xp = prepare_vectors(x, "cosine")
        train_index(ivf, xp[rng.choice(a.n, size=min(a.n, 20_000), replace=False)])
        ivf.add(xp)
        build_ivf = time.perf_counter() - t
        set_nprobe(ivf, a.nprobe)
        t = time.perf_counter()
        ii, _ = search_index(ivf, prepare_vectors(q, "cosine"), a.k, "cosine")
        t_ivf = time.perf_counter() - t
        rec = np.mean([len(set(a_) & set(b_)) / a.k for a_, b_ in zip(ii, fi)])
        print(f"faiss cpu {a.ivf} nprobe={a.nprobe}: build {build_ivf:.3f}s  search {t_ivf:.3f}s  -> {t_sk / t_ivf:.1f}x sklearn, "
              f"recall@{a.k} vs exact {rec:.4f}")

    if gpu_available():
        g, dev = to_device(index, "on")
        search_index(g, prepare_vectors(q[:10], "cosine"), a.k, "cosine")  # warm-up
        t = time.perf_counter()
        gi, _ = search_index(g, prepare_vectors(q, "cosine"), a.k, "cosine")
        t_gpu = time.perf_counter() - t
        print(f"faiss gpu Flat:   search {t_gpu:.3f}s  -> {t_faiss / t_gpu:.1f}x faiss cpu, {t_sk / t_gpu:.1f}x sklearn "
              f"(agreement {np.mean([len(set(a_) & set(b_)) / a.k for a_, b_ in zip(gi, fi)]):.4f})")
    else:
        print("faiss gpu: not available (faiss-cpu build or no GPU)")


if __name__ == "__main__":
    main()
