"""Top-10 kNN: the ``auto`` approximate index (IVF + fast-scan PQ candidates, exact re-rank) and FAISS exact
(``IndexFlatIP`` on normalised vectors) vs scikit-learn ``NearestNeighbors(algorithm="brute", metric="cosine")``,
all in the same run, plus FAISS GPU when a GPU build sees one.

    python benchmarks/neighbors.py [--n 200000] [--d 1280] [--queries 1000] [--data clustered|random]
                                   [--factory auto] [--graph] [--threads N]

Data (``--data clustered``, default): ``--clusters`` Gaussian clusters in a 64-d subspace embedded in D dimensions
plus isotropic noise, L2-normalised (real-shaped: CNN features are low-rank and clustered); every block is a
deterministic function of its row offset. ``--data random``: i.i.d. Gaussian rows (no structure at all).

Every engine searches the same ``--queries`` rows against all N rows (k=10, self excluded). Printed: seconds per
query of each engine, recall@10 of the approximate index against exact FAISS (and FAISS vs sklearn agreement),
the search-only ratio sklearn / approximate, and with ``--graph`` the all-rows kNN graph through the approximate
index (train + add + N queries, measured) against sklearn's time for N queries (extrapolated linearly from the
measured ``--queries``: the full sklearn graph would take an hour here).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered_block(start: int, n: int, d: int = 1280, clusters: int = 1000, sub: int = 64, spread: float = 1.0,
                    noise: float = 0.04, seed: int = 0) -> np.ndarray:
    """Rows ``start .. start + n`` of the clustered set: ``(n, d) float32``, L2-normalised. Centres ~ N(0, I_sub),
    points = centre + ``spread`` N(0, I_sub) (overlapping clusters), embedded by a fixed orthonormal ``(d, sub)`` basis,
    plus ``noise`` N(0, I_d)."""
    rng0 = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng0.normal(size=(d, sub)))
    centres = rng0.normal(size=(clusters, sub))
    rng = np.random.default_rng([seed, start])
    z = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, sub))
    x = (z @ basis.T + noise * rng.normal(size=(n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(kind: str, n: int, d: int, clusters: int) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    return np.concatenate([clustered_block(s, min(50_000, n - s), d, clusters) for s in range(0, n, 50_000)])


def recall_at(found: np.ndarray, truth: np.ndarray, self_rows: np.ndarray, k: int) -> float:
    """Mean |found ∩ truth| / k over queries, each list cut to its first k non-self ids."""
    out = []
    for f, t, s in zip(found, truth, self_rows):
        f = [v for v in f if v != s and v >= 0][:k]
        t = [v for v in t if v != s][:k]
        out.append(len(set(f) & set(t)) / k)
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--data", choices=["clustered", "random"], default="clustered")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--factory", default="auto", help="approximate factory (default: what `convlens index` picks for N)")
    ap.add_argument("--exact-max-rows", type=int, default=None, help="auto threshold (default: the library's)")
    ap.add_argument("--nprobe", type=int, default=None, help="default: the library's default for the nlist")
    ap.add_argument("--graph", action="store_true", help="also time the all-rows kNN graph through the approximate index")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all)")
    a = ap.parse_args()

    from sklearn.neighbors import NearestNeighbors

    from tasks.core.faiss_index import (
        AUTO_EXACT_MAX_ROWS,
        AUTO_K_FACTOR,
        default_nprobe,
        finalize_index,
        gpu_available,
        import_faiss,
        new_index,
        nlist_of,
        prepare_vectors,
        resolve_factory,
        search_index,
        to_device,
        train_index,
    )

    faiss = import_faiss()
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    t = time.perf_counter()
    x = make_data(a.data, a.n, a.d, a.clusters)
    rng = np.random.default_rng(1)
    qi = np.sort(rng.choice(a.n, size=min(a.queries, a.n), replace=False))
    q = x[qi]
    kk = a.k + 1  # the query row itself is in the set
    print(f"N={a.n} D={a.d} data={a.data} queries={len(q)} k={a.k} faiss={faiss.__version__} "
          f"threads={faiss.omp_get_max_threads()} cores={os.cpu_count()} load={os.getloadavg()[0]:.1f} "
          f"(data made in {time.perf_counter() - t:.1f}s)", flush=True)

    xp = prepare_vectors(x, "cosine")
    t = time.perf_counter()
    flat = new_index(a.d, "Flat", "cosine")
    flat.add(xp)
    build_flat = time.perf_counter() - t
    t = time.perf_counter()
    fi, _fd = search_index(flat, prepare_vectors(q, "cosine"), kk, "cosine")
    t_flat = time.perf_counter() - t
    print(f"faiss Flat (exact):   build {build_flat:.2f}s  search {t_flat:.2f}s = {1e3 * t_flat / len(q):.3f} ms/query", flush=True)
    del flat

    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=kk, algorithm="brute", metric="cosine").fit(x)
    _sd, si = nn.kneighbors(q)
    t_sk = time.perf_counter() - t
    del nn
    print(f"sklearn brute:        fit+search {t_sk:.2f}s = {1e3 * t_sk / len(q):.3f} ms/query  "
          f"(faiss Flat {t_sk / t_flat:.1f}x faster; agreement recall@{a.k} {recall_at(fi, si, qi, a.k):.4f})", flush=True)

    thr = AUTO_EXACT_MAX_ROWS if a.exact_max_rows is None else a.exact_max_rows
    factory = resolve_factory(a.factory, a.n, a.d, thr)
    t = time.perf_counter()
    ix = new_index(a.d, factory, "cosine")
    nlist = nlist_of(ix)
    train_s = 0.0
    if not ix.is_trained:
        sample = xp[rng.choice(a.n, size=min(a.n, 50 * (nlist or 1000)), replace=False)]
        train_index(ix, sample)
        train_s = time.perf_counter() - t
        del sample
    t1 = time.perf_counter()
    ix.add(xp)
    add_s = time.perf_counter() - t1
    nprobe = a.nprobe or (default_nprobe(nlist) if nlist else None)
    finalize_index(ix, nprobe, AUTO_K_FACTOR if factory.endswith(",RFlat") else None)
    t = time.perf_counter()
    ai, _ad = search_index(ix, prepare_vectors(q, "cosine"), kk, "cosine")
    t_ap = time.perf_counter() - t
    rec = recall_at(ai, fi, qi, a.k)
    print(f"approximate {factory} (nprobe {nprobe}, k_factor {AUTO_K_FACTOR if factory.endswith(',RFlat') else '-'}): "
          f"train {train_s:.1f}s add {add_s:.1f}s search {t_ap:.2f}s = {1e3 * t_ap / len(q):.3f} ms/query", flush=True)
    print(f"  recall@{a.k} vs exact = {rec:.4f}   search-only: {t_sk / t_ap:.1f}x sklearn brute, {t_flat / t_ap:.1f}x faiss Flat",
          flush=True)

    if a.graph:
        t = time.perf_counter()
        search_index(ix, xp, kk, "cosine", block=4096)
        graph_s = time.perf_counter() - t
        total = train_s + add_s + graph_s
        sk_graph = t_sk / len(q) * a.n
        flat_graph = t_flat / len(q) * a.n
        print(f"all-rows kNN graph: approximate train+add+search {total:.0f}s (search {graph_s:.0f}s) vs sklearn brute "
              f"{sk_graph:.0f}s (extrapolated) = {sk_graph / total:.1f}x; vs faiss Flat {flat_graph:.0f}s = {flat_graph / total:.1f}x",
              flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    if gpu_available():
        g, _dev = to_device(ix, "on")
        search_index(g, prepare_vectors(q[:10], "cosine"), kk, "cosine")  # warm-up
        t = time.perf_counter()
        gi, _ = search_index(g, prepare_vectors(q, "cosine"), kk, "cosine")
        t_gpu = time.perf_counter() - t
        print(f"faiss gpu {factory}: search {t_gpu:.3f}s -> {t_sk / t_gpu:.1f}x sklearn (recall {recall_at(gi, fi, qi, a.k):.4f})")
    else:
        print("faiss gpu: not available (faiss-cpu build or no GPU)")


if __name__ == "__main__":
    main()
