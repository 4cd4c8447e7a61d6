"""PCA, t-SNE and UMAP maps of a feature artefact (the seeds' "FC7 in 2-d" pictures), stored as ``maps`` artefacts.

Array-level functions (no store):

- :func:`fit_pca` / :class:`PCAAccumulator` — exact PCA from a streamed float64 covariance (one pass over
  feature batches, memory O(D^2)), or scikit-learn's randomized PCA fitted on a row sample. Components are
  sign-normalised like scikit-learn's (largest-|.| entry of each component positive).
- :func:`tsne_embed` — openTSNE with affinities from a FAISS kNN graph (``PrecomputedNeighbors``; exact up to
  :data:`KNN_EXACT_MAX_ROWS` fitted rows, IVF-Flat above: :func:`knn_spec`),
  PCA initialisation, openTSNE's recommended optimisation (early exaggeration 12 for 250 iterations, then 500
  iterations, learning rate N / exaggeration, exaggeration 4 in the second phase above 100k fitted points).
  Above ``max_fit`` rows the map is fitted on a sample and the rest placed into it (:func:`place_points`).
- :func:`umap_embed` — umap-learn fed the same kind of FAISS kNN graph (``precomputed_knn``), PCA
  initialisation; the same sample + placement path above ``max_fit``.
- :class:`MapReference` / :func:`place_points` — what placing new points into a fitted map needs (the fitted
  rows' reduced inputs and coordinates, the PCA, the method's parameters) and the placement itself: openTSNE's
  ``prepare_partial`` + ``optimize`` (what ``TSNEEmbedding.transform`` does) on an embedding re-created from
  the stored reference, or UMAP's ``transform`` steps on the same kNN. The build places the rows outside the
  fit sample with it, and an incremental build (``MapConfig.previous``) places a night's new rows into
  yesterday's map with it, so both give the same coordinates for the same inputs.
- :func:`knn_label_agreement`, :func:`trustworthiness_sample` — map quality numbers.

Store level: :func:`build_map` streams a feature artefact, reduces it (PCA to ``pca_first`` dims for t-SNE /
UMAP, to ``dim`` for a PCA map), embeds it and publishes ``<store>/maps/<id>/`` with ``coords.parquet`` (one
row per feature-table row, written batch by batch), ``reference.npz`` (the placement reference), ``scatter.png``
and a manifest holding parameters, explained variance and quality numbers. The layout is documented in
``docs/maps.md``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from storage.atomic import atomic_write_bytes, create_temp_file, fsync_dir, sha256_file
from storage.errors import ChecksumError, StoreError, UsageError
from storage.features import iter_feature_batches
from storage.locks import artefact_lock
from storage.manifest import CODE_VERSION, MANIFEST_NAME, file_entry, read_manifest, safe_member, write_manifest
from storage.maps import COORDS_NAME, REFERENCE_NAME, resolve_map
from storage.paths import Store, artefact_id

__all__ = [
    "MAP_FORMAT",
    "METHODS",
    "COORDS_NAME",
    "REFERENCE_NAME",
    "SCATTER_NAME",
    "PCAResult",
    "PCAAccumulator",
    "fit_pca",
    "choose_pca_solver",
    "check_finite",
    "clamp_perplexity",
    "TSNEResult",
    "tsne_embed",
    "umap_embed",
    "umap_available",
    "KNN_EXACT_MAX_ROWS",
    "knn_spec",
    "MapReference",
    "place_points",
    "row_keys",
    "knn_label_agreement",
    "trustworthiness_sample",
    "MapConfig",
    "map_key",
    "build_map",
]

log = logging.getLogger(__name__)

MAP_FORMAT = 2  # bump when the stored layout or the maths behind it changes (part of every map's cache key)
METHODS = ("pca", "tsne", "umap")
SCATTER_NAME = "scatter.png"
_AXES = ("x", "y", "z")
_EXACT_PCA_MAX_DIM = 4096          # exact (covariance) PCA up to this D: the D x D float64 matrix is <= 128 MiB
_EXACT_PCA_MAX_FLOPS = 2e12        # ... and while N * D^2 stays around a minute of CPU BLAS
_RANDOMIZED_FIT_ROWS = 20_000      # randomized PCA is fitted on at most this many rows
_LARGE_N_EXAGGERATION = 100_000    # above this many fitted points the second phase uses exaggeration 4
_SCATTER_MAX_POINTS = 200_000      # the static scatter PNG draws a seeded sample above this many rows
_TSNE_PLACE_PERPLEXITY = 5.0       # openTSNE's transform defaults (perplexity 5, 250 iterations, lr 0.1, ...)
_TSNE_PLACE_ITER = 250
_UMAP_PLACE_EPOCHS = 30            # umap-learn's transform uses 30 epochs for more than 10k new points
_BATCH_ROWS = 16_384               # feature rows per streamed batch (= rows placed per placement call)


# --------------------------------------------------------------------------------------------------- checks


def check_finite(x: np.ndarray, what: str = "features", paths: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` if ``x`` (N, D) has NaN/Inf, naming how many rows and the first bad one."""
    bad = ~np.isfinite(x).all(axis=1) if x.ndim == 2 else ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        where = f" (first: {paths[first]!r})" if paths is not None else f" (first: row {first})"
        raise UsageError(
            f"{int(bad.sum())} of {len(x)} {what} rows contain NaN or Inf{where}; a map cannot be computed from them. "
            "Re-extract the features (check the model/weights, e.g. fp16 overflow) or drop those images"
        )


def clamp_perplexity(perplexity: float, n: int) -> tuple[float, int]:
    """``(effective perplexity, k neighbours)`` for ``n`` points: perplexity <= (n - 1) / 3, k = min(n - 1, 3 P)."""
    if not perplexity > 0:
        raise UsageError(f"perplexity must be > 0, got {perplexity}")
    if n < 4:
        raise UsageError(f"t-SNE needs at least 4 points, got {n}; use --method pca for so few images")
    eff = min(float(perplexity), (n - 1) / 3.0)
    k = int(min(n - 1, max(1, int(3 * eff))))
    return eff, k


# ----------------------------------------------------------------------------------------------------- PCA


@dataclass
class PCAResult:
    """A fitted PCA. ``components`` (k, D) float64 with unit rows; variances in squared feature units (ddof=1)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    total_variance: float
    n_samples: int
    solver: str

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project ``x`` (n, D) to ``(n, k) float32``."""
        return ((np.asarray(x, np.float64) - self.mean) @ self.components.T).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """Small JSON record for a manifest."""
        return {
            "solver": self.solver,
            "n_components": int(self.components.shape[0]),
            "fitted_rows": int(self.n_samples),
            "explained_variance": [float(v) for v in self.explained_variance],
            "explained_variance_ratio": [float(v) for v in self.explained_variance_ratio],
            "explained_variance_ratio_total": float(self.explained_variance_ratio.sum()),
            "total_variance": float(self.total_variance),
        }


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """scikit-learn's convention (``svd_flip(u_based_decision=False)``): largest-|.| entry of each row positive."""
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


class PCAAccumulator:
    """Exact PCA from batches: a shifted float64 scatter matrix, one pass, memory O(D^2) (+ one batch).

    ``add(batch (n, D))`` any number of times, then ``result(k)``. The shift (mean of the first batch) keeps
    the ``sum(x x^T) - n mu mu^T`` update free of cancellation when the features have a large mean.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(self.dim, np.float64)
        self.s2 = np.zeros((self.dim, self.dim), np.float64)

    def add(self, batch: np.ndarray) -> None:
        b = np.asarray(batch, np.float64)
        if b.ndim != 2 or b.shape[1] != self.dim:
            raise UsageError(f"expected a (n, {self.dim}) batch, got shape {b.shape}")
        if not len(b):
            return
        if self.shift is None:
            self.shift = b.mean(axis=0)
        b = b - self.shift
        self.s1 += b.sum(axis=0)
        self.s2 += b.T @ b
        self.n += len(b)

    def result(self, n_components: int) -> PCAResult:
        if self.n < 2:
            raise UsageError(f"PCA needs at least 2 rows, got {self.n}")
        k = int(n_components)
        if not 1 <= k <= min(self.n, self.dim):
            raise UsageError(f"n_components={k} must be between 1 and min(rows, dim) = {min(self.n, self.dim)}")
        from scipy.linalg import eigh  # noqa: PLC0415

        m = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        cov = (cov + cov.T) / 2
        total = float(np.trace(cov))
        vals, vecs = eigh(cov, subset_by_index=[self.dim - k, self.dim - 1])
        order = np.argsort(vals)[::-1]
        vals = np.maximum(vals[order], 0.0)
        comps = _flip_signs(vecs[:, order].T)
        ratio = vals / total if total > 0 else np.zeros_like(vals)
        return PCAResult(mean=self.shift + m, components=comps, explained_variance=vals,
                         explained_variance_ratio=ratio, total_variance=total, n_samples=self.n, solver="exact")


def _randomized_pca(x: np.ndarray, k: int, seed: int, n_total: int | None = None) -> PCAResult:
    from sklearn.decomposition import PCA  # noqa: PLC0415

    if len(x) < 2:
        raise UsageError(f"PCA needs at least 2 rows, got {len(x)}")
    k = min(k, len(x), x.shape[1])
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(np.asarray(x, np.float64))
    total = float(np.var(np.asarray(x, np.float64), axis=0, ddof=1).sum())
    return PCAResult(mean=pca.mean_.astype(np.float64), components=_flip_signs(pca.components_.astype(np.float64)),
                     explained_variance=pca.explained_variance_.astype(np.float64),
                     explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
                     total_variance=total, n_samples=len(x), solver="randomized")


def choose_pca_solver(solver: str, n: int, d: int) -> str:
    """``exact`` for D <= 4096 while N * D^2 stays moderate, else ``randomized`` (on a row sample)."""
    if solver not in ("auto", "exact", "randomized"):
        raise UsageError(f"PCA solver must be auto, exact or randomized, got {solver!r}")
    if solver != "auto":
        return solver
    return "exact" if d <= _EXACT_PCA_MAX_DIM and float(n) * d * d <= _EXACT_PCA_MAX_FLOPS else "randomized"


def fit_pca(x: np.ndarray, n_components: int, solver: str = "exact", seed: int = 0) -> PCAResult:
    """PCA of ``x`` (N, D) (any float dtype; NaN refused). ``solver`` exact | randomized | auto.

    Exact matches ``sklearn.decomposition.PCA`` (components up to floating error, same signs). Memory:
    exact O(D^2 + block x D); randomized O(N x D).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise UsageError(f"expected a (N, D) matrix, got shape {x.shape}")
    check_finite(x)
    solver = choose_pca_solver(solver, *x.shape)
    if solver == "randomized":
        return _randomized_pca(x, n_components, seed)
    acc = PCAAccumulator(x.shape[1])
    for start in range(0, len(x), 8192):
        acc.add(x[start:start + 8192])
    return acc.result(n_components)


# ------------------------------------------------------------------------------------------ kNN + reference


KNN_EXACT_MAX_ROWS = 100_000
"""t-SNE / UMAP: up to this many fitted rows every kNN of a map (the fit's graph, the placement's queries) is
exact (FAISS ``IndexFlatL2``); above it an IVF-Flat index over the fitted rows (:func:`knn_spec`), which keeps
exact distances for the candidates it scans. Measured on the 200k x 50 fitted rows of the 1M synthetic map
(20 clusters of isotropic noise, the hard case for IVF): recall@15 0.9999 at nprobe = nlist / 16, 5x faster
than exact."""


def knn_spec(m: int, exact_max_rows: int | None = None) -> dict[str, Any] | None:
    """How a map with ``m`` fitted rows finds neighbours: ``None`` (exact) up to ``exact_max_rows`` (default
    :data:`KNN_EXACT_MAX_ROWS`), else
    ``{"kind": "ivf-flat", "nlist", "nprobe", "seed"}``: ``nlist`` = :func:`auto_nlist` (1024 at 200k), ``nprobe``
    = max(16, nlist / 16) lists, k-means seeded (FAISS's training is then the same for any thread count).
    Stored in the map's reference, so placing rows later uses the search the map was fitted with."""
    if m <= (KNN_EXACT_MAX_ROWS if exact_max_rows is None else exact_max_rows):
        return None
    from tasks.core.faiss_index import auto_nlist  # noqa: PLC0415

    nlist = auto_nlist(m)
    return {"kind": "ivf-flat", "nlist": int(nlist), "nprobe": int(min(nlist, max(16, nlist // 16))), "seed": 1234}


def knn_description(spec: dict[str, Any] | None) -> str:
    """The manifest's words for a :func:`knn_spec`."""
    if spec is None:
        return "faiss exact L2"
    return f"faiss IVF{spec['nlist']},Flat L2, nprobe {spec['nprobe']} (exact distances of the scanned lists)"


class _L2Search:
    """FAISS L2 search among ``reference`` (m, d) float32, built once: exact (``spec`` None) or the IVF-Flat of a
    :func:`knn_spec`. ``query(x, k) -> (idx int64, dist float64)`` with Euclidean (not squared) distances;
    ``self_knn(k)`` the k nearest other fitted rows of every fitted row. A query the IVF probe leaves short of
    ``k`` hits is answered exactly. Memory: one copy of the reference (+ its IVF lists)."""

    def __init__(self, reference: np.ndarray, spec: dict[str, Any] | None = None) -> None:
        from tasks.core.faiss_index import import_faiss  # noqa: PLC0415

        self.faiss = import_faiss()
        self.reference = np.ascontiguousarray(reference, np.float32)
        self.spec = spec
        d = self.reference.shape[1]
        self._flat = None
        if spec is None:
            self.index = self._exact()
        else:
            if spec.get("kind") != "ivf-flat":
                raise UsageError(f"unknown kNN kind {spec.get('kind')!r} in a map reference; rebuild the map "
                                 "with this version of convlens (convlens project --force)")
            quantizer = self.faiss.IndexFlatL2(d)
            index = self.faiss.IndexIVFFlat(quantizer, d, int(spec["nlist"]))
            index.cp.seed = int(spec["seed"])
            index.train(self.reference)
            index.add(self.reference)
            index.nprobe = int(spec["nprobe"])
            self.index, self._quantizer = index, quantizer  # the quantizer lives as long as the index

    def _exact(self):
        if self._flat is None:
            self._flat = self.faiss.IndexFlatL2(self.reference.shape[1])
            self._flat.add(self.reference)
        return self._flat

    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances float32, idx int64) of ``k`` hits, short IVF probes redone exactly."""
        x = np.ascontiguousarray(x, np.float32)
        d, i = self.index.search(x, k)
        if self.spec is not None:
            short = np.flatnonzero((i < 0).any(axis=1))
            if len(short):
                d[short], i[short] = self._exact().search(x[short], k)
        return d, i

    def query(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(min(k, len(self.reference)))
        d, i = self._search(x, k)
        return i.astype(np.int64), np.sqrt(np.maximum(d, 0.0)).astype(np.float64)

    def self_knn(self, k: int, block: int = _BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """``(idx (m, k) int64, squared distances (m, k) float32)``: each fitted row's k nearest *other* fitted
        rows (itself dropped; if duplicates tie it out of the hits, the first k others are kept)."""
        m = len(self.reference)
        if self.spec is None:  # exact: the module's all-vs-all search, as every exact map has used
            from tasks.core.faiss_index import knn_search  # noqa: PLC0415

            return knn_search(self.reference, k, metric="l2")
        if not 0 < k < m:
            raise UsageError(f"k={k} is too large for {m} points")
        idx = np.empty((m, k), np.int64)
        dist = np.empty((m, k), np.float32)
        for s in range(0, m, block):
            d, i = self._search(self.reference[s:s + block], k + 1)
            rows = np.arange(s, s + len(i))[:, None]
            order = np.argsort(i == rows, axis=1, kind="stable")[:, :k]
            idx[s:s + len(i)] = np.take_along_axis(i, order, axis=1)
            dist[s:s + len(i)] = np.take_along_axis(d, order, axis=1)
        return idx, dist


def _faiss_neighbors_class():
    """``PrecomputedNeighbors`` that can also be queried (the map's :class:`_L2Search`), so openTSNE's
    ``transform`` works."""
    from openTSNE.nearest_neighbors import PrecomputedNeighbors  # noqa: PLC0415

    class FaissNeighbors(PrecomputedNeighbors):
        def __init__(self, neighbors: np.ndarray, distances: np.ndarray, search: _L2Search) -> None:
            super().__init__(neighbors, distances)
            self._search = search

        def query(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return self._search.query(query, k)

    return FaissNeighbors


@dataclass
class MapReference:
    """Everything placing new rows into a fitted map needs; stored as ``reference.npz`` in the map artefact.

    ``fit_x`` (m, d) float32: the fitted rows' inputs (after the map's PCA); ``fit_y`` (m, dim) float64: their
    map coordinates (t-SNE: centred, as openTSNE's ``transform`` centres its reference); ``fit_rows`` (m,) int64:
    their rows in the map that fitted them; ``pca_mean`` (D,) / ``pca_components`` (k, D) float64 or None (no
    PCA: raw features are the input). ``params``: the method's placement parameters (JSON). A PCA map's
    reference holds only the PCA (``fit_x`` / ``fit_y`` empty).
    """

    method: str
    fit_x: np.ndarray
    fit_y: np.ndarray
    fit_rows: np.ndarray
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def reduce(self, feats: np.ndarray) -> np.ndarray:
        """Raw features (n, D) -> the map's input space (n, d) float32 (the stored PCA, or unchanged)."""
        if self.pca_components is None:
            return np.ascontiguousarray(feats, np.float32)
        return ((np.asarray(feats, np.float64) - self.pca_mean) @ self.pca_components.T).astype(np.float32)

    def to_bytes(self) -> bytes:
        """``.npz`` bytes (uncompressed; no pickles)."""
        arrays: dict[str, np.ndarray] = {
            "method": np.array(self.method), "params": np.array(json.dumps(self.params, sort_keys=True)),
            "fit_x": np.ascontiguousarray(self.fit_x, np.float32), "fit_y": np.ascontiguousarray(self.fit_y, np.float64),
            "fit_rows": np.asarray(self.fit_rows, np.int64)}
        if self.pca_components is not None:
            arrays["pca_mean"] = np.asarray(self.pca_mean, np.float64)
            arrays["pca_components"] = np.asarray(self.pca_components, np.float64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "MapReference":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            has_pca = "pca_components" in z.files
            return cls(method=str(z["method"]), fit_x=z["fit_x"], fit_y=z["fit_y"], fit_rows=z["fit_rows"],
                       pca_mean=z["pca_mean"] if has_pca else None,
                       pca_components=z["pca_components"] if has_pca else None,
                       params=json.loads(str(z["params"])))


def _reference_affinities(fit_x: np.ndarray, n_jobs: int, knn: dict[str, Any] | None = None):
    """An openTSNE ``Affinities`` that only knows how to relate *new* points to ``fit_x`` (what
    ``prepare_partial`` needs): perplexity-based affinities on the FAISS L2 kNN among the fitted rows (exact, or
    the map's :func:`knn_spec`), exactly as ``PerplexityBasedNN.to_new`` computes them."""
    import scipy.sparse as sp  # noqa: PLC0415
    from openTSNE.affinity import Affinities, joint_probabilities_nn  # noqa: PLC0415

    class ReferenceAffinities(Affinities):
        def __init__(self) -> None:
            super().__init__()
            self._m = len(fit_x)
            self.n_jobs = n_jobs
            self.knn_index = _L2Search(fit_x, knn)
            self.P = sp.csr_matrix((self._m, self._m))  # never used by prepare_partial

        def to_new(self, data: np.ndarray, perplexity: float = _TSNE_PLACE_PERPLEXITY, return_distances: bool = False):
            k = int(min(self._m, 3 * perplexity))
            eff = perplexity if perplexity <= k else k / 3.0
            neighbors, distances = self.knn_index.query(data, k)
            P = joint_probabilities_nn(neighbors, distances, [eff], symmetrize=False, normalization="point-wise",
                                       n_reference_samples=self._m, n_jobs=self.n_jobs)
            return (P, neighbors, distances) if return_distances else P

    return ReferenceAffinities()


class _Placer:
    """Places batches of new rows (already in the map's input space) into a fitted map. Built once per map
    (the FAISS index over the fitted rows, openTSNE's interpolation grid), then ``place(x (n, d)) -> (n, dim)
    float32``. Each new point is placed against the fitted rows only, never against other new points, so a
    row's coordinates do not depend on which other rows are placed with it (up to the batch's shared
    optimiser step sizes)."""

    def __init__(self, ref: MapReference, n_jobs: int = 1, seed: int = 0) -> None:
        self.ref, self.n_jobs, self.seed = ref, n_jobs, seed
        self._emb = None
        self._shift = None
        self._knn: _L2Search | None = None

    def place(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        dim = self.ref.fit_y.shape[1]
        if not len(x):
            return np.zeros((0, dim), np.float32)
        if self.ref.method == "tsne":
            return self._place_tsne(x)
        if self.ref.method == "umap":
            return self._place_umap(x)
        raise UsageError(f"a {self.ref.method} map places rows by projection, not with a placer")

    def _place_tsne(self, x: np.ndarray) -> np.ndarray:
        from openTSNE import TSNEEmbedding  # noqa: PLC0415

        p = self.ref.params
        if self._emb is None:
            y = np.array(self.ref.fit_y, np.float64)
            # openTSNE's transform (and its interpolation grid) centre the reference in place: do it first and
            # shift the placed points back, so they land in the stored frame of the fitted rows
            self._shift = (y.max(axis=0) + y.min(axis=0)) / 2
            method = "fft" if y.shape[1] <= 2 else "bh"
            self._emb = TSNEEmbedding(y - self._shift, _reference_affinities(self.ref.fit_x, self.n_jobs,
                                                                             p.get("knn")),
                                      negative_gradient_method=method, random_state=self.seed, n_jobs=self.n_jobs,
                                      theta=0.5, verbose=False)
        part = self._emb.prepare_partial(x, initialization="median", k=25,
                                         perplexity=float(p.get("place_perplexity", _TSNE_PLACE_PERPLEXITY)))
        part.optimize(n_iter=int(p.get("place_iter", _TSNE_PLACE_ITER)), learning_rate=0.1, exaggeration=1.5,
                      momentum=0.8, inplace=True, max_grad_norm=0.25)
        return (np.asarray(part, np.float64) + self._shift).astype(np.float32)

    def _place_umap(self, x: np.ndarray) -> np.ndarray:
        """umap-learn's ``UMAP.transform`` steps (membership strengths to the k nearest fitted rows, weighted-mean
        initialisation, ``n_epochs`` of SGD against the fixed fitted embedding) on the map's FAISS kNN (exact,
        or the IVF-Flat of its :func:`knn_spec`)."""
        import scipy.sparse as sp  # noqa: PLC0415
        from umap.layouts import optimize_layout_euclidean  # noqa: PLC0415
        from umap.umap_ import (  # noqa: PLC0415
            INT32_MAX,
            INT32_MIN,
            compute_membership_strengths,
            make_epochs_per_sample,
            smooth_knn_dist,
        )

        p = self.ref.params
        tail = np.ascontiguousarray(self.ref.fit_y, np.float32)
        m = len(tail)
        if self._knn is None:
            self._knn = _L2Search(self.ref.fit_x, p.get("knn"))
        k = int(min(p["n_neighbors"], m))
        idx, dist = self._knn.query(x, k)
        dists = dist.astype(np.float32, order="C")
        sigmas, rhos = smooth_knn_dist(dists, float(k), local_connectivity=0.0)
        rows, cols, vals, _ = compute_membership_strengths(idx.astype(np.int32), dists, sigmas, rhos, bipartite=True)
        graph = sp.coo_matrix((vals, (rows, cols)), shape=(len(x), m))
        csr = graph.tocsr()
        csr.eliminate_zeros()
        emb = _init_graph_transform(csr, tail)
        n_epochs = int(p.get("place_epochs", _UMAP_PLACE_EPOCHS))
        if graph.data.size:
            graph.data[graph.data < (graph.data.max() / float(n_epochs))] = 0.0
        graph.eliminate_zeros()
        eps = make_epochs_per_sample(graph.data, n_epochs)
        rng_state = np.random.RandomState(self.seed).randint(INT32_MIN, INT32_MAX, 3).astype(np.int64)
        emb = optimize_layout_euclidean(emb, tail.copy(), graph.row, graph.col, n_epochs, m, eps, float(p["a"]),
                                        float(p["b"]), rng_state, 1.0, 0.25, 5.0, parallel=False, verbose=False,
                                        tqdm_kwds={"disable": True})
        return np.asarray(emb, np.float32)


_INIT_GRAPH_KERNEL = None


def _init_graph_kernel():
    """The numba kernel of :func:`_init_graph_transform`, compiled on first use."""
    global _INIT_GRAPH_KERNEL
    if _INIT_GRAPH_KERNEL is None:
        import numba  # noqa: PLC0415

        @numba.njit(nogil=True)
        def pairwise_sum(a, lo, n):  # pragma: no cover - compiled
            # numpy's float32 pairwise summation (numpy/_core/src/umath/loops_utils.h.src), so a row's sum is
            # bit for bit what scipy's ``row.sum()`` gives umap-learn
            if n < 8:
                res = np.float32(0.0)
                for i in range(n):
                    res += a[lo + i]
                return res
            if n <= 128:
                r = a[lo:lo + 8].copy()
                i = 8
                while i < n - (n % 8):
                    for j in range(8):
                        r[j] += a[lo + i + j]
                    i += 8
                res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
                while i < n:
                    res += a[lo + i]
                    i += 1
                return res
            n2 = n // 2
            n2 -= n2 % 8
            return pairwise_sum(a, lo, n2) + pairwise_sum(a, lo + n2, n - n2)

        @numba.njit(nogil=True)
        def kernel(indptr, indices, data, embedding, result):  # pragma: no cover - compiled
            for r in range(len(indptr) - 1):
                lo, hi = indptr[r], indptr[r + 1]
                if hi == lo:
                    result[r, :] = np.nan
                    continue
                row_sum = pairwise_sum(data, lo, hi - lo)
                for t in range(lo, hi):
                    if data[t] == 1:
                        result[r, :] = embedding[indices[t], :]
                        break
                    w = data[t] / row_sum
                    for c in range(embedding.shape[1]):
                        result[r, c] += w * embedding[indices[t], c]

        _INIT_GRAPH_KERNEL = kernel
    return _INIT_GRAPH_KERNEL


def _init_graph_transform(csr: Any, tail: np.ndarray) -> np.ndarray:
    """umap-learn's ``init_graph_transform`` (each new row at the membership-weighted mean of its fitted
    neighbours' coordinates; at a neighbour's coordinates when a weight is exactly 1; NaN with no neighbour) for
    ``csr`` (n, m) float32 and ``tail`` (m, dim) float32 -> (n, dim) float32, with the same float32 operations in
    the same order: bit-identical (tested). umap-learn loops in Python over scipy row slices (1-2 s per 16,384
    rows here, a quarter of a UMAP placement); this is the same loop compiled with numba (a umap-learn
    dependency), ~5 ms."""
    data = np.ascontiguousarray(csr.data, np.float32)
    tail = np.ascontiguousarray(tail, np.float32)
    result = np.zeros((csr.shape[0], tail.shape[1]), np.float32)
    _init_graph_kernel()(np.asarray(csr.indptr, np.int64), np.asarray(csr.indices, np.int64), data, tail, result)
    return result


def place_points(ref: MapReference, x: np.ndarray, n_jobs: int = 1, seed: int = 0,
                 chunk: int = _BATCH_ROWS) -> np.ndarray:
    """Place new rows ``x`` (n, d) float32 — already in the map's input space (``ref.reduce`` of raw features)
    — into the fitted map of ``ref``; returns ``(n, dim) float32``. Chunks of ``chunk`` rows: memory
    O(reference + chunk x k)."""
    placer = _Placer(ref, n_jobs=n_jobs, seed=seed)
    out = np.empty((len(x), ref.fit_y.shape[1]), np.float32)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = placer.place(x[s:s + chunk])
    return out


# --------------------------------------------------------------------------------------------------- t-SNE


@dataclass
class TSNEResult:
    """``coords`` (N, dim) float32; ``info`` the effective parameters (for the manifest); ``reference`` the
    placement reference of the fitted rows (``fit_x`` in the input space given)."""

    coords: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    reference: MapReference | None = None


class _KLStop:
    """openTSNE callback: stop a phase once the KL divergence falls by less than ``tol`` (relative) between two
    checks ``EVERY`` iterations apart, after at least ``min_iter`` iterations. Deterministic for fixed inputs."""

    EVERY = 10

    def __init__(self, tol: float, min_iter: int = 50) -> None:
        self.tol, self.min_iter = tol, min_iter
        self.prev: float | None = None
        self.iterations = 0

    def __call__(self, iteration: int, error: float, embedding: Any) -> bool:
        prev, self.prev, self.iterations = self.prev, float(error), int(iteration)
        return bool(iteration >= self.min_iter and prev is not None
                    and (prev - error) / max(abs(prev), 1e-12) < self.tol)


def _pca_init(xf: np.ndarray, dim: int, init: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """(m, dim) float64 initial positions: ``init`` rows, else the first PCA coordinates of ``xf``; padded with
    tiny seeded noise when there are fewer input dims than map dims, jittered when degenerate."""
    if init is None:
        init_full = fit_pca(xf, min(dim, xf.shape[1]), solver="exact").transform(xf).astype(np.float64)
    else:
        init_full = np.asarray(init, np.float64)
    if init_full.shape[1] < dim:
        init_full = np.hstack([init_full, rng.normal(0, 1e-4, (len(xf), dim - init_full.shape[1]))])
    if np.std(init_full[:, 0]) == 0:
        init_full = init_full + rng.normal(0, 1e-4, init_full.shape)
    return init_full


def _fit_tsne(xf: np.ndarray, init: np.ndarray | None, dim: int, perplexity: float, seed: int, n_jobs: int,
              exaggeration: float | None, n_iter: int, early_exaggeration_iter: int, negative_gradient_method: str,
              auto_stop: bool, stop_tol: tuple[float, float], knn: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit openTSNE on ``xf`` (m, d) float32 with the kNN of ``knn`` (:func:`knn_spec`; None = exact); returns
    ``(coords (m, dim) float64 centred, info)``."""
    from openTSNE import TSNE  # noqa: PLC0415
    from openTSNE.affinity import PerplexityBasedNN  # noqa: PLC0415
    from openTSNE.initialization import rescale  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    eff, k = clamp_perplexity(perplexity, len(xf))
    if eff < perplexity:
        log.info("perplexity %.1f clamped to %.2f for %d points", perplexity, eff, len(xf))
    t0 = time.perf_counter()
    search = _L2Search(xf, knn)
    nbr, d2 = search.self_knn(k)
    neighbors = _faiss_neighbors_class()(nbr, np.sqrt(np.maximum(d2, 0.0)).astype(np.float64), search)
    affinities = PerplexityBasedNN(perplexity=eff, knn_index=neighbors, n_jobs=n_jobs, random_state=seed)
    t_aff = time.perf_counter() - t0
    init_fit = rescale(_pca_init(xf, dim, init, rng), target_std=1e-4)
    if exaggeration is None:
        exaggeration = 4.0 if len(xf) > _LARGE_N_EXAGGERATION else 1.0
    tsne = TSNE(n_components=dim, perplexity=eff, learning_rate="auto", early_exaggeration=12,
                early_exaggeration_iter=early_exaggeration_iter, n_iter=n_iter, exaggeration=exaggeration,
                initial_momentum=0.5, final_momentum=0.8, n_jobs=n_jobs, random_state=seed,
                negative_gradient_method=negative_gradient_method)
    t1 = time.perf_counter()
    stops = [_KLStop(stop_tol[0]), _KLStop(stop_tol[1])] if auto_stop else [None, None]
    emb = tsne.prepare_initial(affinities=affinities, initialization=init_fit)
    for (iters, exag, mom), stop in zip(((early_exaggeration_iter, 12.0, 0.5), (n_iter, exaggeration, 0.8)), stops):
        if iters <= 0:
            continue
        extra = {"callbacks": [stop], "callbacks_every_iters": _KLStop.EVERY} if stop is not None else {}
        emb = emb.optimize(n_iter=iters, exaggeration=exag, momentum=mom, inplace=True, **extra)
    ran = [s.iterations if s is not None and s.iterations else it
           for s, it in zip(stops, (early_exaggeration_iter, n_iter))]
    t_fit = time.perf_counter() - t1
    kl = float(getattr(emb, "kl_divergence", float("nan")) or float("nan"))
    y = np.array(emb, np.float64)
    y -= (y.max(axis=0) + y.min(axis=0)) / 2  # centred, as openTSNE's transform would leave it
    info = {
        "perplexity": float(perplexity), "effective_perplexity": float(eff), "k_neighbors": int(k),
        "knn": knn_description(knn), "fitted_rows": int(len(xf)),
        "early_exaggeration": 12.0, "early_exaggeration_iter": int(early_exaggeration_iter),
        "exaggeration": float(exaggeration), "n_iter": int(n_iter), "learning_rate": "auto (N / exaggeration)",
        "auto_stop": bool(auto_stop), "stop_tol": list(stop_tol) if auto_stop else None,
        "iterations_run": [int(v) for v in ran],
        "negative_gradient_method": negative_gradient_method, "initialization": "pca" if init is None else "given",
        "n_jobs": int(n_jobs), "kl_divergence": kl if np.isfinite(kl) else None,
        "placement": {"how": "openTSNE prepare_partial + optimize against the fitted rows (= TSNEEmbedding.transform)",
                      "perplexity": _TSNE_PLACE_PERPLEXITY, "n_iter": _TSNE_PLACE_ITER, "learning_rate": 0.1,
                      "exaggeration": 1.5, "initialization": "median of 25 nearest fitted rows"},
        "seconds": {"affinities": round(t_aff, 3), "fit": round(t_fit, 3)},
    }
    return y, info


def _fit_sample(n: int, max_fit: int, seed: int) -> np.ndarray:
    """Sorted rows fitted for ``n`` points: all of them up to ``max_fit``, else a seeded sample of ``max_fit``."""
    if n <= max_fit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))


def _embed_with_sample(method: str, x: np.ndarray, dim: int, seed: int, init: np.ndarray | None, n_jobs: int,
                       max_fit: int, chunk: int, fit) -> TSNEResult:
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2:
        raise UsageError(f"expected a (N, d) matrix, got shape {x.shape}")
    check_finite(x, f"{method} input")
    if dim < 1:
        raise UsageError(f"dim must be >= 1, got {dim}")
    n = len(x)
    fit_idx = _fit_sample(n, max_fit, seed)
    xf = x[fit_idx]
    if init is not None:
        init = np.asarray(init, np.float64)
        if init.shape != (n, dim):
            raise UsageError(f"init must have shape {(n, dim)}, got {init.shape}")
        init = init[fit_idx]
    y, info, params = fit(xf, init)
    ref = MapReference(method=method, fit_x=xf, fit_y=y, fit_rows=fit_idx, params=params)
    coords = np.empty((n, dim), np.float32)
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    t2 = time.perf_counter()
    if len(rest):
        log.info("%s fitted on %d of %d points; placing the other %d", method, len(xf), n, len(rest))
        coords[rest] = place_points(ref, x[rest], n_jobs=n_jobs, seed=seed, chunk=chunk)
    coords[fit_idx] = y.astype(np.float32)
    info["transformed_rows"] = int(len(rest))
    info.setdefault("seconds", {})["transform"] = round(time.perf_counter() - t2, 3)
    return TSNEResult(coords=coords, info=info, reference=ref)


def _tsne_place_params(knn: dict[str, Any] | None) -> dict[str, Any]:
    """A t-SNE reference's placement parameters (``knn`` only when approximate: exact maps' references are as
    they were)."""
    params: dict[str, Any] = {"place_perplexity": _TSNE_PLACE_PERPLEXITY, "place_iter": _TSNE_PLACE_ITER}
    if knn is not None:
        params["knn"] = knn
    return params


def tsne_embed(x: np.ndarray, dim: int = 2, perplexity: float = 30.0, seed: int = 0,
               init: np.ndarray | None = None, n_jobs: int = 1, exaggeration: float | None = None,
               max_fit: int = 200_000, transform_chunk: int = _BATCH_ROWS, n_iter: int = 500,
               early_exaggeration_iter: int = 250, negative_gradient_method: str = "auto",
               auto_stop: bool = True, stop_tol: tuple[float, float] = (1e-2, 2e-3),
               knn_exact_max_rows: int | None = None) -> TSNEResult:
    """t-SNE of ``x`` (N, d) float32 (typically PCA-50 coordinates) to ``(N, dim) float32``.

    Affinities: perplexity-based (clamped to (N - 1) / 3 for small N) on the FAISS L2 kNN graph with
    k = 3 x perplexity: exact up to ``knn_exact_max_rows`` fitted rows, IVF-Flat above (:func:`knn_spec`; the
    placement uses the same search). Initialisation: ``init`` (N, dim) (e.g. the first PCA coordinates) rescaled to std 1e-4,
    else PCA of ``x``. Optimisation as openTSNE recommends: 250 iterations at exaggeration 12 (momentum 0.5),
    then ``n_iter`` at ``exaggeration`` (default 1, or 4 when more than 100k points are fitted), learning rate
    N / exaggeration. The fitted coordinates are centred (midrange 0). With N > ``max_fit`` a seeded sample of
    ``max_fit`` rows is fitted and the rest placed with :func:`place_points` (openTSNE's ``transform``
    procedure: perplexity 5, 250 iterations, learning rate 0.1) in chunks of ``transform_chunk``.
    ``auto_stop`` (opt-SNE style, Belkina et al. 2019): each phase ends early once the KL divergence, checked
    every 10 iterations, falls by less than ``stop_tol`` (relative; early-exaggeration phase, main phase) —
    the iteration counts above become maxima. Measured here on 20k x 50: 310 instead of 750 iterations,
    trustworthiness 0.9790 vs 0.9799 (scikit-learn's TSNE: 0.9797). The counts run are in ``info``.
    Same inputs + seed + n_jobs -> identical coordinates. Memory O(max_fit x (d + k) + chunk x k).
    """
    def fit(xf: np.ndarray, init_f: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        knn = knn_spec(len(xf), knn_exact_max_rows)
        y, info = _fit_tsne(xf, init_f, dim, perplexity, seed, n_jobs, exaggeration, n_iter, early_exaggeration_iter,
                            negative_gradient_method, auto_stop, stop_tol, knn)
        return y, info, _tsne_place_params(knn)

    return _embed_with_sample("tsne", x, dim, seed, init, n_jobs, max_fit, transform_chunk, fit)


# ---------------------------------------------------------------------------------------------------- UMAP


def umap_available() -> bool:
    """True when umap-learn can be imported (it is a dependency; a broken install is reported, not hidden)."""
    try:
        import umap  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _require_umap() -> None:
    if not umap_available():
        raise UsageError("--method umap needs umap-learn (a dependency of convlens): reinstall with "
                         "`pip install -e .` (or `pip install umap-learn`), or use --method tsne / pca")


def _fit_umap(xf: np.ndarray, init: np.ndarray | None, dim: int, n_neighbors: int, min_dist: float, seed: int,
              knn: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Fit umap-learn on ``xf`` (m, d) float32 with a FAISS L2 kNN graph (exact, or the IVF-Flat of ``knn``:
    :func:`knn_spec`) given as ``precomputed_knn`` (self first, as UMAP expects), PCA initialisation, a fixed
    ``random_state`` (single-threaded, reproducible). Returns ``(coords (m, dim) float64, info, placement params)``."""
    _require_umap()
    m = len(xf)
    if m < 4:
        raise UsageError(f"UMAP needs at least 4 points, got {m}; use --method pca for so few images")
    k = int(min(n_neighbors, m - 1))
    if k < 2:
        raise UsageError(f"--n-neighbors must be >= 2, got {n_neighbors}")
    t0 = time.perf_counter()
    nbr, d2 = _L2Search(xf, knn).self_knn(k - 1)
    knn_i = np.hstack([np.arange(m, dtype=np.int64)[:, None], nbr]).astype(np.int32)
    knn_d = np.hstack([np.zeros((m, 1), np.float32), np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)])
    t_knn = time.perf_counter() - t0
    init_f = _pca_init(xf, dim, init, np.random.default_rng(seed))
    import umap  # noqa: PLC0415

    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no NNDescent search index" and "n_jobs overridden by random_state"
        model = umap.UMAP(n_components=dim, n_neighbors=k, min_dist=min_dist, metric="euclidean", init=init_f,
                          random_state=seed, transform_seed=seed, precomputed_knn=(knn_i, knn_d, None),
                          force_approximation_algorithm=True, n_jobs=1, verbose=False)
        y = np.asarray(model.fit_transform(xf), np.float64)
    t_fit = time.perf_counter() - t1
    params = {"n_neighbors": k, "min_dist": float(min_dist), "a": float(model._a), "b": float(model._b),
              "place_epochs": _UMAP_PLACE_EPOCHS}
    if knn is not None:
        params["knn"] = knn
    info = {"n_neighbors": int(n_neighbors), "effective_n_neighbors": k, "min_dist": float(min_dist),
            "knn": knn_description(knn) + " (precomputed_knn)", "fitted_rows": int(m), "a": params["a"], "b": params["b"],
            "n_epochs": int(model.n_epochs) if model.n_epochs else "umap default (200 above 10k points, else 500)",
            "initialization": "pca" if init is None else "given", "umap_version": _umap_version(),
            "placement": {"how": "umap-learn's transform steps on the same FAISS kNN of the fitted rows",
                          "n_epochs": _UMAP_PLACE_EPOCHS},
            "seconds": {"knn": round(t_knn, 3), "fit": round(t_fit, 3)}}
    return y, info, params


def _umap_version() -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("umap-learn")
    except Exception:  # noqa: BLE001 - metadata is informational
        return None


def umap_embed(x: np.ndarray, dim: int = 2, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
               init: np.ndarray | None = None, max_fit: int = 200_000, chunk: int = _BATCH_ROWS,
               knn_exact_max_rows: int | None = None) -> TSNEResult:
    """UMAP of ``x`` (N, d) float32 to ``(N, dim) float32`` (umap-learn, FAISS kNN as ``precomputed_knn``: exact up
    to ``knn_exact_max_rows`` fitted rows, IVF-Flat above, :func:`knn_spec`,
    PCA initialisation, ``random_state=seed``: reproducible and single-threaded). Above ``max_fit`` rows a seeded
    sample is fitted and the rest placed with :func:`place_points` (UMAP's transform: 30 epochs). Raises
    :class:`UsageError` when umap-learn is not installed. Memory O(max_fit x (d + k) + chunk x k)."""
    _require_umap()

    def fit(xf: np.ndarray, init_f: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        return _fit_umap(xf, init_f, dim, n_neighbors, min_dist, seed, knn_spec(len(xf), knn_exact_max_rows))

    return _embed_with_sample("umap", x, dim, seed, init, 1, max_fit, chunk, fit)


# ------------------------------------------------------------------------------------------------- quality


def _knn_of_queries(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices (q, k) of the k nearest rows of ``base`` to ``base[queries]`` (self excluded), exact L2."""
    from tasks.core.faiss_index import import_faiss  # noqa: PLC0415

    faiss = import_faiss()
    base = np.ascontiguousarray(base, np.float32)
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    _d, i = index.search(base[queries], k + 1)
    return _drop_self(i, queries, k)


def _drop_self(i: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    mask = i != np.asarray(queries)[:, None]
    order = np.argsort(~mask, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(i, order, axis=1)


def knn_label_agreement(x: np.ndarray, labels: Sequence[Any], k: int = 10,
                        queries: np.ndarray | None = None, neighbors: np.ndarray | None = None) -> float | None:
    """Mean fraction of each labelled query's k nearest neighbours (exact L2 in ``x``) that share its label.

    ``queries`` are row indices (default all rows); ``neighbors`` (q, k) may be given precomputed. Rows with
    a missing label are not queries; a missing neighbour label counts as disagreement. ``None`` if no query
    has a label.
    """
    x = np.asarray(x, np.float32)
    lab = np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in labels], object)
    n = len(x)
    if n < 2:
        return None
    queries = np.arange(n) if queries is None else np.asarray(queries, np.int64)
    k = int(min(k, n - 1))
    if neighbors is None:
        neighbors = _knn_of_queries(x, queries, k)
    neighbors = neighbors[:, :k]
    has = np.array([lab[q] is not None for q in queries], bool)
    if not has.any():
        return None
    qlab = lab[queries][has]
    nlab = lab[neighbors[has]]
    agree = (nlab == qlab[:, None])
    return float(agree.mean())


def trustworthiness_sample(high: np.ndarray, low: np.ndarray, n_neighbors: int = 10) -> float | None:
    """scikit-learn trustworthiness of ``low`` (s, dim) w.r.t. ``high`` (s, D) (a row sample); None if s < 4."""
    from sklearn.manifold import trustworthiness  # noqa: PLC0415

    s = len(high)
    nn = int(min(n_neighbors, (s - 1) // 2))
    if s < 4 or nn < 1:
        return None
    return float(trustworthiness(np.asarray(high, np.float64), np.asarray(low, np.float64), n_neighbors=nn))


# ---------------------------------------------------------------------------------------------- artefacts


@dataclass(frozen=True)
class MapConfig:
    """Parameters of one map. ``pca_first`` / ``max_fit`` matter for t-SNE and UMAP, ``perplexity`` for t-SNE,
    ``n_neighbors`` / ``min_dist`` for UMAP.

    ``previous``: place this feature artefact's rows into an earlier map instead of fitting a new one — a map
    id (or unique prefix) of the same method and parameters, or ``"auto"`` (the newest such map of the same
    features artefact built from an earlier publication of it, when its fitted reference still holds at least
    half as many rows as a refit would fit; otherwise a full fit). Rows of the earlier map (same ``path`` and
    ``image_id``) keep their coordinates bit for bit; the others are placed with the stored reference.
    """

    store: str
    features_id: str | None = None
    method: str = "tsne"
    dim: int = 2
    pca_first: int = 50
    perplexity: float = 30.0
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0
    pca_solver: str = "auto"
    max_fit: int = 200_000
    quality_sample: int = 2000
    quality_k: int = 10
    n_jobs: int = 1
    scatter: bool = True
    force: bool = False
    previous: str | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dim not in (2, 3):
            raise UsageError(f"--dim must be 2 or 3 for a map, got {self.dim}")
        if self.pca_first < 0:
            raise UsageError(f"--pca-first must be >= 0 (0 = no PCA before t-SNE / UMAP), got {self.pca_first}")
        if self.method != "pca" and 0 < self.pca_first < self.dim:
            raise UsageError(f"--pca-first {self.pca_first} is smaller than --dim {self.dim}")
        if not self.perplexity > 0:
            raise UsageError(f"--perplexity must be > 0, got {self.perplexity}")
        if self.n_neighbors < 2:
            raise UsageError(f"--n-neighbors must be >= 2, got {self.n_neighbors}")
        if not 0 <= self.min_dist <= 1:
            raise UsageError(f"--min-dist must be in [0, 1], got {self.min_dist}")
        if self.max_fit < 10:
            raise UsageError(f"max_fit must be >= 10, got {self.max_fit}")
        if self.quality_sample < 0 or self.quality_k < 1:
            raise UsageError("quality_sample must be >= 0 and quality_k >= 1")
        choose_pca_solver(self.pca_solver, 1, 1)
        if self.method == "umap":
            _require_umap()


def _params(cfg: MapConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"method": cfg.method, "dim": cfg.dim, "seed": cfg.seed, "pca_solver": cfg.pca_solver,
                              "quality_sample": cfg.quality_sample, "quality_k": cfg.quality_k}
    if cfg.method == "tsne":
        params.update({"pca_first": cfg.pca_first, "perplexity": float(cfg.perplexity), "max_fit": cfg.max_fit,
                       "n_jobs": cfg.n_jobs})
    elif cfg.method == "umap":
        params.update({"pca_first": cfg.pca_first, "n_neighbors": int(cfg.n_neighbors),
                       "min_dist": float(cfg.min_dist), "max_fit": cfg.max_fit})
    return params


def map_key(cfg: MapConfig, source_id: str, source_manifest: dict[str, Any],
            previous: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything that defines a map's content (its artefact id hashes this). An incremental map's key names the
    map it was placed into (id and created time)."""
    key = {"source": source_id, "source_created": source_manifest.get("created"), "params": _params(cfg),
           "map_format": MAP_FORMAT, "code_version": CODE_VERSION}
    if cfg.method in ("tsne", "umap"):
        # the approximate kNN above KNN_EXACT_MAX_ROWS fitted rows is part of the map (exact maps keep their keys)
        spec = knn_spec(min(int(source_manifest.get("rows", 0)), cfg.max_fit))
        if spec is not None:
            key["knn"] = spec
    if previous is not None:
        key["previous"] = {"map": previous[0], "created": previous[1].get("created")}
    return key


def row_keys(paths: Sequence[Any], image_ids: Sequence[Any]) -> np.ndarray:
    """(n,) uint64 identity of each row for incremental maps: a hash of (``path``, ``image_id``), so a file
    whose bytes changed under the same path counts as new. 64-bit: a collision between two different rows has
    probability ~ n_old * n_new / 2^64 (5e-8 for a million old and a million new rows)."""
    from pandas.util import hash_array  # noqa: PLC0415

    a = hash_array(np.asarray(paths, dtype=object).astype(str).astype(object))
    b = hash_array(np.asarray(image_ids, dtype=object).astype(str).astype(object))
    with np.errstate(over="ignore"):
        return a ^ (b * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))


def _published(adir: Path) -> dict[str, Any] | None:
    if not (adir / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(adir, verify=True)
    except StoreError as exc:
        log.warning("rebuilding map %s: %s", adir.name, exc)
        return None


class _Labels:
    """Label of every row as int32 codes (-1 = none) + the category names: O(N) ints, not N Python strings."""

    def __init__(self, n: int) -> None:
        self.codes = np.full(n, -1, np.int32)
        self.names: list[str] = []
        self._pos: dict[str, int] = {}

    def add(self, start: int, values: Sequence[Any]) -> None:
        local, uniques = pd.factorize(pd.Series(list(values), dtype=object), use_na_sentinel=True)
        lut = np.empty(len(uniques) + 1, np.int32)
        lut[-1] = -1
        for j, v in enumerate(uniques):
            name = str(v)
            if name not in self._pos:
                self._pos[name] = len(self.names)
                self.names.append(name)
            lut[j] = self._pos[name]
        self.codes[start:start + len(local)] = lut[local]

    def objects(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(n,) object array of label strings (None for no label), sharing one str per category."""
        table = np.array([None, *self.names], dtype=object)
        codes = self.codes if rows is None else self.codes[rows]
        return table[codes + 1]


class _QualityHeap:
    """Exact full-space L2 kNN of the quality sample rows ``qfeats`` (q, D) over all N rows, merged batch by batch
    in a FAISS ``ResultHeap``: memory O(q x k + batch x D)."""

    def __init__(self, qfeats: np.ndarray, quality_idx: np.ndarray, k: int, n: int) -> None:
        from tasks.core.faiss_index import import_faiss  # noqa: PLC0415

        self.faiss = import_faiss()
        self.k = int(min(k, n - 1))
        self.quality_idx = quality_idx
        self.q = np.ascontiguousarray(qfeats, np.float32)
        self.heap = self.faiss.ResultHeap(len(quality_idx), self.k + 1) if len(quality_idx) and self.k >= 1 else None

    def add(self, feats: np.ndarray, start: int) -> None:
        if self.heap is None:
            return
        k1 = self.k + 1
        kk = min(k1, len(feats))
        d, i = self.faiss.knn(self.q, np.ascontiguousarray(feats, np.float32), kk)
        if kk < k1:  # a short block: pad so the heap always sees (nq, k + 1)
            d = np.hstack([d, np.full((len(self.q), k1 - kk), np.inf, np.float32)])
            i = np.hstack([i, np.full((len(self.q), k1 - kk), -1, np.int64)])
        i = np.where(i >= 0, i + start, -1).astype(np.int64)
        self.heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i))

    def result(self) -> np.ndarray | None:
        if self.heap is None:
            return None
        self.heap.finalize()
        return _drop_self(self.heap.I, self.quality_idx, self.k)


class _CoordsWriter:
    """``coords.parquet`` written batch by batch (one row group per batch) into a temp file, renamed into place
    on :meth:`close`: memory O(batch)."""

    def __init__(self, adir: Path, dim: int) -> None:
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        self.pa, self.adir, self.dim = pa, adir, dim
        fields = [("row", pa.int64()), ("image_id", pa.string()), ("path", pa.string()), ("label", pa.string())]
        self.schema = pa.schema(fields + [(a, pa.float32()) for a in _AXES[:dim]])
        fd, self.tmp = create_temp_file(adir, suffix=".parquet")
        self.fh = os.fdopen(fd, "wb")
        self.writer = pq.ParquetWriter(self.fh, self.schema, compression="zstd")

    def add(self, start: int, meta: pd.DataFrame, coords: np.ndarray) -> None:
        pa = self.pa
        cols = [pa.array(np.arange(start, start + len(meta), dtype=np.int64)),
                pa.array(meta["image_id"].astype(str).tolist(), pa.string()),
                pa.array(meta["path"].astype(str).tolist(), pa.string()),
                pa.array([None if pd.isna(v) else str(v) for v in meta["label"]], pa.string())]
        cols += [pa.array(np.ascontiguousarray(coords[:, j], np.float32)) for j in range(self.dim)]
        self.writer.write_table(pa.Table.from_arrays(cols, schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.adir / COORDS_NAME)
        fsync_dir(self.adir)

    def abort(self) -> None:
        try:
            self.writer.close()
            self.fh.close()
        except Exception:  # noqa: BLE001 - best effort on an error path; the original error is re-raised
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _batches(fdir: Path, fman: dict[str, Any], verify: bool) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    return iter_feature_batches(fdir, fman, batch_rows=_BATCH_ROWS, verify=verify)


def _bar(n: int, desc: str, progress: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=n, desc=desc, unit="row", disable=not progress)


def _pass_stats(fdir: Path, fman: dict[str, Any], n: int, quality_idx: np.ndarray, acc: PCAAccumulator | None,
                rand_idx: np.ndarray | None, progress: bool) -> tuple[_Labels, np.ndarray, np.ndarray | None]:
    """Pass 1 (sha256-verified): NaN check, label codes, the quality sample's full features, PCA accumulation /
    randomized-PCA sample. Memory O(batch x D + D^2 + quality_sample x D + N int32)."""
    labels = _Labels(n)
    qfeats, rfeats = [], []
    start = 0
    with _bar(n, "map: read features", progress) as bar:
        for meta, feats in _batches(fdir, fman, verify=True):
            check_finite(feats, "feature", meta["path"].tolist())
            stop = start + len(feats)
            if stop > n:
                break
            labels.add(start, meta["label"].tolist())
            qfeats.append(feats[quality_idx[(quality_idx >= start) & (quality_idx < stop)] - start])
            if acc is not None:
                acc.add(feats)
            if rand_idx is not None:
                rfeats.append(feats[rand_idx[(rand_idx >= start) & (rand_idx < stop)] - start])
            start = stop
            bar.update(len(feats))
    if start != n:
        raise StoreError(f"feature artefact {fdir.name} has {start}+ rows but its manifest says {n}; "
                         "run `convlens verify` and re-extract")
    qf = np.concatenate(qfeats) if qfeats else np.zeros((0, int(fman["dim"])), np.float32)
    rf = np.concatenate(rfeats) if rand_idx is not None and rfeats else None
    return labels, qf, rf


def _pca_coords(y: np.ndarray, dim: int) -> np.ndarray:
    """First ``dim`` PCA coordinates, zero-padded when D or N gave fewer components."""
    c = np.asarray(y[:, :dim], np.float32)
    if c.shape[1] < dim:
        c = np.hstack([c, np.zeros((len(c), dim - c.shape[1]), np.float32)])
    return c


def _pass_sample(fdir: Path, fman: dict[str, Any], n: int, ref: MapReference, fit_idx: np.ndarray,
                 heap: _QualityHeap, progress: bool) -> np.ndarray:
    """Pass 2 (t-SNE / UMAP): project every batch, keep the fitted rows' inputs ``(len(fit_idx), d) float32``,
    feed the quality heap. Memory O(batch x D + fit rows x d)."""
    fit_x: np.ndarray | None = None
    start = 0
    with _bar(n, "map: project", progress) as bar:
        for _meta, feats in _batches(fdir, fman, verify=False):
            stop = start + len(feats)
            heap.add(feats, start)
            lo, hi = np.searchsorted(fit_idx, [start, stop])
            if hi > lo:
                y = ref.reduce(feats[fit_idx[lo:hi] - start])
                if fit_x is None:
                    fit_x = np.empty((len(fit_idx), y.shape[1]), np.float32)
                fit_x[lo:hi] = y
            start = stop
            bar.update(len(feats))
    if fit_x is None:
        raise StoreError(f"feature artefact {fdir.name} yielded no rows on the second pass; run `convlens verify`")
    return fit_x


def _pass_write(fdir: Path, fman: dict[str, Any], n: int, dim: int, adir: Path, coords_of, heap: _QualityHeap | None,
                progress: bool) -> np.ndarray:
    """Final pass: ``coords_of(start, meta, feats) -> (b, dim) float32`` for every batch, written to
    ``coords.parquet`` as it goes; feeds ``heap`` when given. Returns all coordinates (N, dim) float32 (the
    quality numbers and the scatter need them: 8 bytes a row in 2-d). Memory O(batch x D + N x dim)."""
    coords = np.empty((n, dim), np.float32)
    writer = _CoordsWriter(adir, dim)
    start = 0
    try:
        with _bar(n, "map: place + write", progress) as bar:
            for meta, feats in _batches(fdir, fman, verify=False):
                stop = start + len(feats)
                if heap is not None:
                    heap.add(feats, start)
                c = coords_of(start, meta, feats)
                coords[start:stop] = c
                writer.add(start, meta, c)
                start = stop
                bar.update(len(feats))
        if start != n:
            raise StoreError(f"feature artefact {fdir.name} changed during the map build ({start} rows, manifest {n})")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return coords


def _reference_entry(manifest: dict[str, Any]) -> dict[str, Any] | None:
    return next((f for f in manifest.get("files", []) if f.get("role") == "reference"), None)


def _load_reference(adir: Path, manifest: dict[str, Any]) -> MapReference:
    """The map's placement reference (sha256-verified)."""
    entry = _reference_entry(manifest)
    if entry is None:
        raise UsageError(f"map {adir.name} has no placement reference (built before MAP_FORMAT {MAP_FORMAT}); "
                         "refit it without --previous")
    path = safe_member(adir, entry["name"])
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise ChecksumError(f"{path} is missing or does not match its manifest sha256; refit the map with --force")
    return MapReference.from_bytes(path.read_bytes())


def _previous_coords(pdir: Path, pman: dict[str, Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The earlier map's rows as ``(sorted keys (M,) uint64, coords (M, dim) float32)`` (sha256-verified),
    read one row group at a time."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    entry = next((f for f in pman.get("files", []) if f.get("role") == "coords"), None)
    if entry is None:
        raise StoreError(f"map {pdir.name} lists no coords file; refit it without --previous")
    path = safe_member(pdir, entry["name"])
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise ChecksumError(f"{path} is missing or does not match its manifest sha256; refit the map with --force")
    keys, xy = [], []
    for rb in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=["path", "image_id", *_AXES[:dim]]):
        t = rb.to_pydict()
        keys.append(row_keys(t["path"], t["image_id"]))
        xy.append(np.stack([np.asarray(t[a], np.float32) for a in _AXES[:dim]], axis=1))
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    c = np.concatenate(xy) if xy else np.zeros((0, dim), np.float32)
    order = np.argsort(k, kind="stable")
    return k[order], c[order]


def _find_previous(store: Store, cfg: MapConfig, fid: str, fman: dict[str, Any]
                   ) -> tuple[str, dict[str, Any], Path] | tuple[str, dict[str, Any], None] | None:
    """Resolve ``cfg.previous``: ``(id, manifest, dir)`` of the map to place into; ``(id, manifest, None)`` when
    ``"auto"`` finds a map of this very publication with these parameters (reuse it); ``None`` when ``"auto"``
    finds nothing usable (fit a new map). An explicit id that does not fit raises :class:`UsageError`."""
    want = _params(cfg)

    def same_params(m: dict[str, Any]) -> bool:
        return m.get("method") == cfg.method and m.get("params") == want

    if cfg.previous != "auto":
        pid, pman = resolve_map(store.root, cfg.previous)
        pdir = store.artefact_dir("maps", pid)
        if not same_params(pman):
            raise UsageError(f"--previous {pid}: its parameters {pman.get('params')} differ from this map's {want}; "
                             "an incremental map must use the same method and parameters")
        src_dim = (pman.get("source_manifest") or {}).get("dim")
        if src_dim is not None and int(src_dim) != int(fman.get("dim", 0)):
            raise UsageError(f"--previous {pid} was built from {src_dim}-d features, these are {fman.get('dim')}-d")
        if _reference_entry(pman) is None:
            raise UsageError(f"--previous {pid} has no placement reference (an older map); refit without --previous")
        return pid, pman, pdir
    from storage.artefacts import artefacts_of  # noqa: PLC0415

    for pid, pman, pdir in artefacts_of(store, "maps", fid):
        if not same_params(pman) or _reference_entry(pman) is None:
            continue
        if (pman.get("source_manifest") or {}).get("created") == fman.get("created"):
            return pid, pman, None
        ref = pman.get("reference") or {}
        n = int(fman.get("rows", 0))
        refit_rows = n if cfg.method == "pca" else min(cfg.max_fit, n)
        held = int(pman.get("rows", 0)) if cfg.method == "pca" else int(ref.get("fitted_rows", 0))
        if 2 * held < refit_rows:
            log.info("map %s: its reference holds %d rows, a refit would fit %d; refitting", pid, held, refit_rows)
            return None
        return pid, pman, pdir
    return None


def build_map(cfg: MapConfig, progress: bool = False) -> dict[str, Any]:
    """Compute (or reuse) one map of a feature artefact and publish it; returns the map's manifest.

    Full build: streams the feature parts (pass 1: checks, labels, PCA; t-SNE / UMAP pass 2: the fit sample's
    reduced rows; final pass: coordinates of every batch — fitted rows from the fit, the others placed into it —
    written to ``coords.parquet`` batch by batch). Incremental build (``cfg.previous``): pass 1, then a final
    pass that copies the earlier map's coordinates for its rows and places only the new ones with its stored
    reference. Memory: O(batch x D + D^2) for exact PCA, O(max_fit x (d + k)) for the fit, O(N x dim) for the
    coordinates, O(quality_sample x D) for the quality sample — never O(N x D).
    A published map with the same key is reused (``manifest["reused"] = True`` in the returned copy) unless
    ``cfg.force``. Raises ``ValueError`` for bad parameters or NaN/Inf features, :class:`StoreError` for a
    missing source.
    """
    cfg.validate()
    store = Store(cfg.store)
    fid, fman = store.resolve("features", cfg.features_id)
    fdir = store.artefact_dir("features", fid)
    n = int(fman.get("rows", 0))
    d = int(fman.get("dim", 0))
    min_rows = 2 if cfg.method == "pca" else 4
    if n < min_rows:
        raise UsageError(f"feature artefact {fid} has {n} rows; a {cfg.method} map needs at least {min_rows}")
    prev = _find_previous(store, cfg, fid, fman) if cfg.previous else None
    if prev is not None and prev[2] is None and not cfg.force:
        log.info("map %s already covers this publication of %s; reusing it", prev[0], fid)
        return dict(prev[1], reused=True)
    if prev is not None and prev[2] is None:
        prev = None
    key = map_key(cfg, fid, fman, (prev[0], prev[1]) if prev else None)
    aid = artefact_id(f"{cfg.method}{cfg.dim}d-{fid}", key)
    adir = store.artefact_dir("maps", aid)
    if not cfg.force:
        old = _published(adir)
        if old is not None:
            log.info("map %s is up to date; reusing it", aid)
            return dict(old, reused=True)
    adir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with artefact_lock(adir):
        if prev is not None:
            body = _build_incremental(cfg, fdir, fman, n, adir, prev, progress)
        else:
            body = _build_full(cfg, fdir, fman, n, d, aid, adir, progress)
        coords, labels, files = body.pop("coords"), body.pop("labels"), body.pop("files")
        if cfg.scatter:
            from tasks.maps.plots import render_scatter  # noqa: PLC0415

            rows = (np.sort(np.random.default_rng(cfg.seed).choice(n, _SCATTER_MAX_POINTS, replace=False))
                    if n > _SCATTER_MAX_POINTS else np.arange(n))
            title = f"{cfg.method.upper()} of {fman.get('model', {}).get('arch', '?')} {fman.get('layer', {}).get('name', '')}"
            shown = f"{n} images" if len(rows) == n else f"{len(rows)} of {n} images"
            png = render_scatter(coords[rows, :2], labels.objects(rows).tolist(), title=f"{title} ({shown})")
            atomic_write_bytes(adir / SCATTER_NAME, png)
            files.append(file_entry(adir, SCATTER_NAME, role="scatter"))
        body["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        manifest: dict[str, Any] = {
            "kind": "maps",
            "artefact_id": aid,
            "source": fid,
            "source_manifest": {
                "kind": "features", "artefact_id": fid, "created": fman.get("created"),
                "dataset_root": fman.get("dataset_root"), "model": fman.get("model", {}).get("arch"),
                "weights": fman.get("model", {}).get("weights"), "layer": fman.get("layer", {}).get("name"),
                "dim": d, "rows": n,
            },
            "dataset_root": fman.get("dataset_root"),
            "method": cfg.method,
            "dim": cfg.dim,
            "columns": ["row", "image_id", "path", "label", *_AXES[:cfg.dim]],
            "rows": n,
            "seed": cfg.seed,
            "params": key["params"],
            **body,
            "files": files,
        }
        published = write_manifest(adir, manifest)
    log.info("published map %s (%s, %d rows) in %.1fs", aid, cfg.method, n, time.perf_counter() - t0)
    return dict(published, reused=False)


def _quality_setup(cfg: MapConfig, n: int) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    if not cfg.quality_sample:
        return np.zeros(0, np.int64)
    return np.sort(rng.choice(n, min(n, cfg.quality_sample), replace=False))


def _write_reference(adir: Path, ref: MapReference) -> dict[str, Any]:
    atomic_write_bytes(adir / REFERENCE_NAME, ref.to_bytes())
    return file_entry(adir, REFERENCE_NAME, role="reference", rows=int(len(ref.fit_rows)))


def _reference_record(ref: MapReference, built_by: str) -> dict[str, Any]:
    return {"name": REFERENCE_NAME, "method": ref.method, "fitted_rows": int(len(ref.fit_rows)),
            "input_dim": int(ref.fit_x.shape[1]) if ref.fit_x.ndim == 2 and len(ref.fit_x) else None,
            "pca": ref.pca_components is not None, "params": ref.params, "built_by": built_by}


def _build_full(cfg: MapConfig, fdir: Path, fman: dict[str, Any], n: int, d: int, aid: str, adir: Path,
                progress: bool) -> dict[str, Any]:
    """Fit a new map (see :func:`build_map`); returns the manifest body + ``coords`` / ``labels`` / ``files``."""
    t0 = time.perf_counter()
    quality_idx = _quality_setup(cfg, n)
    rng = np.random.default_rng(cfg.seed + 1)
    if cfg.method == "pca":
        n_comp = min(cfg.dim, d, n)
    else:
        n_comp = min(cfg.pca_first, d, n) if cfg.pca_first and cfg.pca_first < d else 0
    solver = choose_pca_solver(cfg.pca_solver, n, d) if n_comp else None
    acc = PCAAccumulator(d) if solver == "exact" else None
    rand_idx = np.sort(rng.choice(n, min(n, _RANDOMIZED_FIT_ROWS), replace=False)) if solver == "randomized" else None
    labels, qfeats, rfeats = _pass_stats(fdir, fman, n, quality_idx, acc, rand_idx, progress)
    pca: PCAResult | None = None
    if solver == "exact":
        pca = acc.result(n_comp)
    elif solver == "randomized":
        pca = _randomized_pca(rfeats, n_comp, cfg.seed)
        pca.n_samples = len(rfeats)
    t_pca = time.perf_counter() - t0
    heap = _QualityHeap(qfeats, quality_idx, cfg.quality_k, n)
    info: dict[str, Any] | None = None
    seconds: dict[str, Any] = {"pca": round(t_pca, 3)}
    pca_ref = MapReference(method=cfg.method, fit_x=np.zeros((0, 0), np.float32), fit_y=np.zeros((0, cfg.dim)),
                           fit_rows=np.zeros(0, np.int64), pca_mean=pca.mean if pca is not None else None,
                           pca_components=pca.components if pca is not None else None)
    if cfg.method == "pca":
        ref = pca_ref

        def coords_of(start: int, meta: pd.DataFrame, feats: np.ndarray) -> np.ndarray:
            return _pca_coords(ref.reduce(feats), cfg.dim)
    else:
        fit_idx = _fit_sample(n, cfg.max_fit, cfg.seed)
        t1 = time.perf_counter()
        fit_x = _pass_sample(fdir, fman, n, pca_ref, fit_idx, heap, progress)  # completes the quality kNN
        seconds["sample"] = round(time.perf_counter() - t1, 3)
        init = fit_x[:, :cfg.dim].astype(np.float64) if pca is not None and fit_x.shape[1] >= cfg.dim else None
        knn = knn_spec(len(fit_x))  # as map_key decided it
        if cfg.method == "tsne":
            y, info = _fit_tsne(fit_x, init, cfg.dim, cfg.perplexity, cfg.seed, cfg.n_jobs, None, 500, 250, "auto",
                                True, (1e-2, 2e-3), knn)
            params = _tsne_place_params(knn)
        else:
            y, info, params = _fit_umap(fit_x, init, cfg.dim, cfg.n_neighbors, cfg.min_dist, cfg.seed, knn)
        ref = MapReference(method=cfg.method, fit_x=fit_x, fit_y=y, fit_rows=fit_idx, pca_mean=pca_ref.pca_mean,
                           pca_components=pca_ref.pca_components, params=params)
        placer = _Placer(ref, n_jobs=cfg.n_jobs, seed=cfg.seed)
        fit_y32 = y.astype(np.float32)

        def coords_of(start: int, meta: pd.DataFrame, feats: np.ndarray) -> np.ndarray:
            stop = start + len(feats)
            lo, hi = np.searchsorted(fit_idx, [start, stop])
            out = np.empty((len(feats), cfg.dim), np.float32)
            fitted = np.zeros(len(feats), bool)
            fitted[fit_idx[lo:hi] - start] = True
            out[fitted] = fit_y32[lo:hi]
            if (~fitted).any():
                out[~fitted] = placer.place(ref.reduce(feats[~fitted]))
            return out

    t2 = time.perf_counter()
    coords = _pass_write(fdir, fman, n, cfg.dim, adir, coords_of, heap if cfg.method == "pca" else None, progress)
    seconds["place_and_write" if cfg.method != "pca" else "project_and_write"] = round(time.perf_counter() - t2, 3)
    full_nbrs = heap.result()
    if info is not None:
        info["transformed_rows"] = int(n - len(ref.fit_rows))
        info["seconds"]["transform"] = seconds.get("place_and_write")
    files = [file_entry(adir, COORDS_NAME, role="coords", rows=n), _write_reference(adir, ref)]
    quality = _quality(coords, qfeats, quality_idx, full_nbrs, labels.objects(), cfg.quality_k)
    return {"coords": coords, "labels": labels, "files": files,
            "pca": pca.summary() if pca is not None else None,
            "tsne": info if cfg.method == "tsne" else None,
            "umap": info if cfg.method == "umap" else None,
            "reference": _reference_record(ref, aid), "incremental": None,
            "quality": quality, "seconds": seconds}


def _build_incremental(cfg: MapConfig, fdir: Path, fman: dict[str, Any], n: int, adir: Path,
                       prev: tuple[str, dict[str, Any], Path], progress: bool) -> dict[str, Any]:
    """Place this publication's new rows into the earlier map ``prev`` (see :func:`build_map`)."""
    pid, pman, pdir = prev
    t0 = time.perf_counter()
    ref = _load_reference(pdir, pman)
    prev_keys, prev_xy = _previous_coords(pdir, pman, cfg.dim)
    quality_idx = _quality_setup(cfg, n)
    labels, qfeats, _ = _pass_stats(fdir, fman, n, quality_idx, None, None, progress)
    heap = _QualityHeap(qfeats, quality_idx, cfg.quality_k, n)
    placer = _Placer(ref, n_jobs=cfg.n_jobs, seed=cfg.seed) if cfg.method != "pca" else None
    counts = {"kept": 0, "placed": 0}
    t_read = time.perf_counter() - t0

    def coords_of(start: int, meta: pd.DataFrame, feats: np.ndarray) -> np.ndarray:
        keys = row_keys(meta["path"].tolist(), meta["image_id"].tolist())
        pos = np.minimum(np.searchsorted(prev_keys, keys), max(len(prev_keys) - 1, 0))
        old = (prev_keys[pos] == keys) if len(prev_keys) else np.zeros(len(keys), bool)
        out = np.empty((len(feats), cfg.dim), np.float32)
        out[old] = prev_xy[pos[old]]
        new = ~old
        if new.any():
            y = ref.reduce(feats[new])
            out[new] = _pca_coords(y, cfg.dim) if placer is None else placer.place(y)
        counts["kept"] += int(old.sum())
        counts["placed"] += int(new.sum())
        return out

    t1 = time.perf_counter()
    coords = _pass_write(fdir, fman, n, cfg.dim, adir, coords_of, heap, progress)
    t_place = time.perf_counter() - t1
    # the reference travels with the map (hard link: the earlier map may be pruned tomorrow)
    src = safe_member(pdir, _reference_entry(pman)["name"])
    tmp_fd, tmp = create_temp_file(adir, suffix=".npz")
    os.close(tmp_fd)
    os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, adir / REFERENCE_NAME)
    fsync_dir(adir)
    files = [file_entry(adir, COORDS_NAME, role="coords", rows=n),
             file_entry(adir, REFERENCE_NAME, role="reference", rows=int(len(ref.fit_rows)))]
    quality = _quality(coords, qfeats, quality_idx, heap.result(), labels.objects(), cfg.quality_k)
    rec = dict(pman.get("reference") or _reference_record(ref, pid))
    return {"coords": coords, "labels": labels, "files": files, "pca": pman.get("pca"),
            "tsne": pman.get("tsne"), "umap": pman.get("umap"), "reference": rec,
            "incremental": {"previous": pid, "previous_created": pman.get("created"),
                            "previous_rows": int(len(prev_keys)), "kept": counts["kept"], "placed": counts["placed"],
                            "dropped": int(len(prev_keys) - counts["kept"])},
            "quality": quality, "seconds": {"read_previous": round(t_read, 3), "place_and_write": round(t_place, 3)}}


def _quality(coords: np.ndarray, qfeats: np.ndarray, quality_idx: np.ndarray, full_nbrs: np.ndarray | None,
             labels: list[Any], k: int) -> dict[str, Any]:
    """Trustworthiness on the sample + kNN label agreement (map vs full feature space) of the sample rows."""
    n = len(coords)
    out: dict[str, Any] = {"sample_rows": int(len(quality_idx)), "k": int(min(k, max(n - 1, 1))),
                           "space": "source features (full D), exact L2", "trustworthiness": None,
                           "trustworthiness_k": None, "knn_label_agreement_map": None,
                           "knn_label_agreement_full": None}
    if len(quality_idx) >= 4:
        out["trustworthiness"] = trustworthiness_sample(qfeats, coords[quality_idx], k)
        out["trustworthiness_k"] = int(min(k, (len(quality_idx) - 1) // 2))
    if len(quality_idx) and full_nbrs is not None:
        kk = full_nbrs.shape[1]
        map_nbrs = _knn_of_queries(coords, quality_idx, kk)
        out["knn_label_agreement_map"] = knn_label_agreement(coords, labels, kk, quality_idx, map_nbrs)
        out["knn_label_agreement_full"] = knn_label_agreement(coords, labels, kk, quality_idx, full_nbrs)
    return out

