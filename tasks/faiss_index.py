"""FAISS behind one module: every FAISS import in convlens goes through :func:`import_faiss`.

Exact search (``IndexFlatIP`` for cosine on L2-normalised vectors, ``IndexFlatL2``) with block iteration,
so memory is O(block x k) beyond the index itself.
"""

from __future__ import annotations

import numpy as np

__all__ = ["import_faiss", "knn_search"]


def import_faiss():
    """Import faiss (CPU build by default; GPU build when installed)."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("faiss is not installed; run `make setup` (installs faiss-cpu)") from exc
    return faiss


def knn_search(x: np.ndarray, k: int, metric: str = "cosine", exclude_self: bool = True,
               block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of every row of ``x`` ``(N, D) float32`` among the rows of ``x``.

    Returns ``(indices (N, k) int64, distances (N, k) float32)``; for ``cosine`` the "distance" is
    ``1 - cosine similarity``, for ``l2`` the squared L2 distance. With ``exclude_self`` a row is not its own
    neighbour. Raises ``ValueError`` on NaN/Inf input or ``k >= N``.
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf; fix the feature artefact (convlens verify) before searching")
    n = x.shape[0]
    kk = k + 1 if exclude_self else k
    if kk > n:
        raise ValueError(f"k={k} is too large for {n} points")
    if metric == "cosine":
        x = x.copy()
        faiss.normalize_L2(x)
        index = faiss.IndexFlatIP(x.shape[1])
    elif metric == "l2":
        index = faiss.IndexFlatL2(x.shape[1])
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    index.add(x)
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        q = x[start:start + block]
        d, i = index.search(q, kk)
        if metric == "cosine":
            d = 1.0 - d
        if exclude_self:
            rows = np.arange(start, start + len(q))[:, None]
            mask = i != rows
            # keep the first k non-self hits per row (self may be missing if duplicates tie)
            order = np.argsort(~mask, axis=1, kind="stable")[:, :k]
            i = np.take_along_axis(i, order, axis=1)
            d = np.take_along_axis(d, order, axis=1)
        idx[start:start + len(q)] = i[:, :k]
        dist[start:start + len(q)] = d[:, :k]
    return idx, dist
