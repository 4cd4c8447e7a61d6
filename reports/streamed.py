"""Neighbour searches of the report that stream instead of holding N x D floats (million-row reports).

- :func:`feature_knn` — exact cosine kNN of some feature rows among all rows, read part by part from the
  feature artefact and merged in a FAISS ``ResultHeap``: memory O(queries x (D + k) + batch x D).
- :func:`pixel_knn` — exact L2 kNN of some rows' 16 x 16 RGB pixel vectors among all rows, converting the
  ``(N, P) uint8`` matrix to float32 one block at a time (the whole matrix as float32 would be 3 GB at 1M).

Both return the same neighbours as an exact search over the full matrix (ties aside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from storage.features import iter_feature_batches

__all__ = ["feature_knn", "feature_rows", "pixel_knn"]

_BLOCK = 65_536


def _merge(faiss: Any, heap: Any, q: np.ndarray, base: np.ndarray, ids: np.ndarray, k1: int, metric: str) -> None:
    """Search ``base`` (whose rows are the table rows ``ids``) for ``q`` and add the hits to ``heap``."""
    kk = min(k1, len(base))
    if metric == "ip":
        d, i = faiss.knn(q, base, kk, metric=faiss.METRIC_INNER_PRODUCT)
        d = -d  # the heap keeps the smallest values
    else:
        d, i = faiss.knn(q, base, kk)
    if kk < k1:
        d = np.hstack([d, np.full((len(q), k1 - kk), np.inf, np.float32)])
        i = np.hstack([i, np.full((len(q), k1 - kk), -1, np.int64)])
    i = np.where(i >= 0, ids[np.maximum(i, 0)], -1).astype(np.int64)
    heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i))


def _drop_self(i: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    keep = i != queries[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(i, order, axis=1)


def feature_rows(fdir: Path, fman: dict[str, Any], rows: np.ndarray) -> np.ndarray:
    """``(len(rows), D) float32``: the feature vectors of table rows ``rows`` (any order), read part by part.
    Memory O(rows x D + batch x D)."""
    rows = np.asarray(rows, np.int64)
    q = np.zeros((len(rows), int(fman["dim"])), np.float32)
    ordered = bool(np.all(np.diff(rows) >= 0))
    start = 0
    for _meta, feats in iter_feature_batches(fdir, fman, batch_rows=_BLOCK, verify=False):
        if ordered:
            lo, hi = np.searchsorted(rows, [start, start + len(feats)])
            q[lo:hi] = feats[rows[lo:hi] - start]
        else:
            sel = (rows >= start) & (rows < start + len(feats))
            q[sel] = feats[rows[sel] - start]
        start += len(feats)
    return q


def feature_knn(fdir: Path, fman: dict[str, Any], queries: np.ndarray, k: int) -> np.ndarray:
    """``(len(queries), k) int64`` rows: the ``k`` nearest rows (cosine, self excluded) of each query row among
    all rows of the feature artefact, streamed twice (once for the queries' vectors, once to search)."""
    from tasks.core.faiss_index import import_faiss

    faiss = import_faiss()
    queries = np.asarray(queries, np.int64)
    q = feature_rows(fdir, fman, queries)
    faiss.normalize_L2(q)
    heap = faiss.ResultHeap(len(queries), k + 1)
    start = 0
    for _meta, feats in iter_feature_batches(fdir, fman, batch_rows=_BLOCK, verify=False):
        base = np.ascontiguousarray(feats, np.float32)
        faiss.normalize_L2(base)
        _merge(faiss, heap, q, base, np.arange(start, start + len(base)), k + 1, "ip")
        start += len(feats)
    heap.finalize()
    return _drop_self(heap.I, queries, k)


def pixel_knn(pixels: np.ndarray, usable: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``(len(queries), k) int64``: exact L2 neighbours of ``pixels[queries]`` among the rows of ``pixels``
    ``(N, P) uint8`` (scaled to [0, 1]), self excluded. Only ``usable`` rows (a decoded image) are searched and
    only usable queries get neighbours (``-1`` elsewhere, as when fewer than ``k`` images are usable): an
    unreadable image has no pixels to compare, and a store without images costs nothing here (it cost a full
    N x queries search of placeholder vectors). Memory O(block x P) floats."""
    from tasks.core.faiss_index import import_faiss

    faiss = import_faiss()
    queries = np.asarray(queries, np.int64)
    usable = np.asarray(usable, bool)
    out = np.full((len(queries), k), -1, np.int64)
    rows = np.flatnonzero(usable)
    asked = np.flatnonzero(usable[queries]) if len(queries) else np.zeros(0, np.int64)
    if not len(rows) or not len(asked) or k < 1:
        return out
    q = pixels[queries[asked]].astype(np.float32) / 255.0
    heap = faiss.ResultHeap(len(asked), k + 1)
    for s in range(0, len(rows), _BLOCK):
        block = rows[s:s + _BLOCK]
        base = pixels[block].astype(np.float32) / 255.0
        _merge(faiss, heap, q, base, block, k + 1, "l2")
    heap.finalize()
    out[asked] = _drop_self(heap.I, queries[asked], k)
    return out
