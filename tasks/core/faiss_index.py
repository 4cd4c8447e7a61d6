"""FAISS behind one module: every FAISS import in convlens goes through :func:`import_faiss`.

Two layers:

- :func:`knn_search`: exact all-vs-all kNN of an in-memory matrix (``IndexFlatIP`` on L2-normalised vectors for
  cosine, ``IndexFlatL2``) with block iteration, so memory is O(block x k) beyond the index itself.
- Index building / querying for stored indexes: :func:`new_index` (any FAISS index-factory string; ``Flat`` is
  exact, ``IVF<n>,PQ<m>`` etc. are trained on a sample by :func:`train_index`), :func:`add_vectors`,
  :func:`search_index` (blocked, optional GPU, ``nprobe``), :func:`serialize_index` / :func:`deserialize_index`.

Above :data:`AUTO_EXACT_MAX_ROWS` rows the ``auto`` factory (:func:`resolve_factory`) is approximate:
``IVF<nlist>,PQ<m>x4fs,RFlat``, an inverted file whose lists hold 4-bit fast-scan PQ codes, followed by an exact
re-rank (``IndexRefineFlat``) of the top ``k x`` :data:`AUTO_K_FACTOR` candidates against the stored vectors, so
returned distances are exact and only the candidate set is approximate. Polysemous training is always turned off
for PQ indexes (:func:`new_index`: it cost 5.6x the training time for a search mode convlens never uses).
Indexes go to and come from files directly (:func:`write_index_file`, :func:`read_index_file`): no bytes copy of
an index in memory.

Distances everywhere: for ``cosine`` the "distance" is ``1 - cosine similarity`` (vectors L2-normalised before
they enter the index, inner-product metric); for ``l2`` the *squared* Euclidean distance (FAISS convention).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import numpy as np

from storage.errors import UsageError

__all__ = [
    "import_faiss",
    "knn_search",
    "METRICS",
    "prepare_vectors",
    "new_index",
    "needs_training",
    "train_index",
    "add_vectors",
    "search_index",
    "set_nprobe",
    "to_device",
    "gpu_available",
    "serialize_index",
    "deserialize_index",
    "supports_incremental_add",
    "index_kind",
    "AUTO_EXACT_MAX_ROWS",
    "AUTO_K_FACTOR",
    "auto_nlist",
    "default_nprobe",
    "resolve_factory",
    "nlist_of",
    "exact_vectors",
    "finalize_index",
    "write_index_file",
    "read_index_file",
    "to_cpu",
    "reserve_rows",
]

log = logging.getLogger(__name__)
METRICS = ("cosine", "l2")


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
        raise UsageError(f"expected a (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UsageError("features contain NaN or Inf; fix the feature artefact (convlens verify) before searching")
    n = x.shape[0]
    kk = k + 1 if exclude_self else k
    if kk > n:
        raise UsageError(f"k={k} is too large for {n} points")
    if metric == "cosine":
        x = x.copy()
        faiss.normalize_L2(x)
        index = faiss.IndexFlatIP(x.shape[1])
    elif metric == "l2":
        index = faiss.IndexFlatL2(x.shape[1])
    else:
        raise UsageError(f"metric must be 'cosine' or 'l2', got {metric!r}")
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


# --------------------------------------------------------------------------------------------- stored indexes


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """``(N, D)`` -> contiguous float32 ready for the index (L2-normalised copy for ``cosine``).

    Raises ``ValueError`` on a wrong shape or NaN / Inf (say which rows).
    """
    _check_metric(metric)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UsageError(f"expected a (N, D) matrix, got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UsageError(f"{int(bad.sum())} vectors contain NaN or Inf (first row {int(np.flatnonzero(bad)[0])}); "
                         "fix the feature artefact (`convlens verify`) before indexing")
    if metric == "cosine":
        x = x.copy()
        import_faiss().normalize_L2(x)
    return x


def new_index(dim: int, factory: str = "Flat", metric: str = "cosine"):
    """An empty CPU index from a FAISS index-factory string (``Flat``, ``IVF1024,PQ32``, ``HNSW32`` ...).

    Cosine uses the inner-product metric on normalised vectors. Raises ``ValueError`` for a string FAISS rejects.
    """
    _check_metric(metric)
    faiss = import_faiss()
    mt = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if dim < 1:
        raise UsageError(f"cannot index {dim}-d vectors")
    try:
        index = faiss.index_factory(int(dim), factory, mt)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "rejected"
        raise UsageError(f"FAISS rejected the index factory string {factory!r} for D={dim}: {first}. "
                         "Use e.g. 'Flat' (exact) or 'IVF1024,PQ32' (D must be divisible by the PQ size)") from None
    _no_polysemous(index)
    return index


def _inner(index) -> list[Any]:
    """``index`` and every index nested in it (pre-transform, refine base and refine, id map), downcast."""
    faiss = import_faiss()
    out, todo = [], [index]
    while todo:
        ix = faiss.downcast_index(todo.pop())
        out.append(ix)
        for attr in ("index", "base_index", "refine_index"):
            sub = getattr(ix, attr, None)
            if sub is not None and hasattr(sub, "ntotal") and not isinstance(sub, (int, float)):
                todo.append(sub)
    return out


def _no_polysemous(index) -> None:
    """Turn polysemous training off in every PQ inside ``index`` (FAISS's factory turns it on for ``IVF…,PQ…``
    and ``PQ…``: measured 117.8 s vs 21.1 s for an ``IVF1024,PQ64`` training on 40k x 1280, for polysemous
    search, which convlens never uses)."""
    faiss = import_faiss()
    for ix in _inner(index):
        if hasattr(ix, "do_polysemous_training"):
            ix.do_polysemous_training = False
        try:
            ivf = faiss.extract_index_ivf(ix)
        except RuntimeError:
            continue
        inner = faiss.downcast_index(ivf)
        if hasattr(inner, "do_polysemous_training"):
            inner.do_polysemous_training = False


AUTO_EXACT_MAX_ROWS = 100_000
"""``auto`` factory: exact (``Flat``) up to this many rows, approximate above. At the threshold an exact all-rows
kNN graph of 1280-d vectors costs ~1.3e13 multiply-adds (~10 minutes on 2 cores); the approximate graph of 200k
rows takes a fraction of that (docs/neighbors.md)."""
AUTO_K_FACTOR = 10
"""``auto`` factory: candidates re-ranked exactly per neighbour asked (``k_factor`` of ``IndexRefineFlat``)."""


def auto_nlist(n: int) -> int:
    """Inverted lists for ``n`` rows: the power of two nearest ``2 sqrt(n)``, in [64, 65536] (200k -> 1024,
    1M -> 2048, 10M -> 8192): ~100-500 vectors per list, coarse assignment cheap next to the list scan."""
    return int(min(65536, max(64, 2 ** round(math.log2(max(1.0, 2.0 * math.sqrt(max(n, 1))))))))


def default_nprobe(nlist: int) -> int:
    """Lists probed by default: ``max(16, nlist / 64)`` (1.6 % of the lists), at most ``nlist``."""
    return int(min(nlist, max(16, nlist // 64)))


def _pq_m(dim: int) -> int | None:
    """Sub-quantisers for the ``auto`` PQ: the largest divisor of ``dim`` in [8, 64] (None when there is none)."""
    for m in range(min(64, dim), 7, -1):
        if dim % m == 0:
            return m
    return None


def resolve_factory(factory: str, n: int, dim: int, exact_max_rows: int = AUTO_EXACT_MAX_ROWS) -> str:
    """The FAISS factory string for ``factory`` over ``n`` rows of ``dim``-d vectors: any string but ``auto`` is
    returned as given; ``auto`` is ``Flat`` (exact) for ``n <= exact_max_rows`` and above it
    ``IVF<auto_nlist(n)>,PQ<m>x4fs,RFlat`` (``m``: the largest divisor of ``dim`` in [8, 64]; ``IVF<nlist>,Flat``
    when ``dim`` has none)."""
    f = factory.replace(" ", "")
    if f.lower() != "auto":
        return factory
    if exact_max_rows < 0:
        raise UsageError(f"--exact-max-rows must be >= 0, got {exact_max_rows}")
    if n <= exact_max_rows:
        return "Flat"
    nlist = auto_nlist(n)
    m = _pq_m(dim)
    return f"IVF{nlist},PQ{m}x4fs,RFlat" if m else f"IVF{nlist},Flat"


def nlist_of(index) -> int | None:
    """Inverted lists of an IVF index (through any wrapper), else None."""
    ivf = _ivf(index)
    return int(ivf.nlist) if ivf is not None else None


def exact_vectors(index) -> bool:
    """True when ``index.reconstruct`` returns the stored vectors exactly (Flat, a refine index, IVF-Flat with a
    direct map, HNSW over Flat storage); False for PQ / SQ codes."""
    faiss = import_faiss()
    ix = faiss.downcast_index(index)
    if isinstance(ix, faiss.IndexRefine):
        return isinstance(faiss.downcast_index(ix.refine_index), faiss.IndexFlat)
    if isinstance(ix, faiss.IndexFlat):
        return True
    if isinstance(ix, faiss.IndexIVFFlat):
        return ix.direct_map.type != faiss.DirectMap.NoMap
    if isinstance(ix, faiss.IndexHNSWFlat):
        return True
    return False


def finalize_index(index, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Settings stored with the index file: ``nprobe``, the refine ``k_factor``, and a direct map on an IVF-Flat
    index (so rows can be reconstructed exactly, e.g. as queries of the kNN graph)."""
    faiss = import_faiss()
    if nprobe:
        set_nprobe(index, nprobe)
    for ix in _inner(index):
        if k_factor and isinstance(ix, faiss.IndexRefine):
            ix.k_factor = float(k_factor)
        if isinstance(ix, faiss.IndexIVFFlat) and ix.direct_map.type == faiss.DirectMap.NoMap:
            ix.make_direct_map()


def to_cpu(index):
    """``index`` itself on the CPU, or a CPU copy of a GPU index."""
    if type(index).__name__.startswith("Gpu"):
        return import_faiss().index_gpu_to_cpu(index)
    return index


def reserve_rows(index, rows: int) -> None:
    """Pre-size the flat vector store(s) inside ``index`` (``Flat``, the refine store of ``…,RFlat``) for ``rows``
    rows, so adding block by block never reallocates: a growing ``std::vector`` doubles and copies, which made a
    1M x 512 build peak at ~1.5x its final store (measured 992 vs 586 MiB for 300k x 512)."""
    faiss = import_faiss()
    for ix in _inner(index):
        if not isinstance(ix, faiss.IndexFlatCodes) or not ix.codes.is_owned:
            continue
        have = int(ix.ntotal) * int(ix.code_size)
        want = int(rows) * int(ix.code_size)
        if want > have:
            ix.codes.resize(want)  # capacity for every row (new bytes zeroed, touched once) ...
            ix.codes.resize(have)  # ... and back to the rows held: std::vector keeps the capacity


def write_index_file(index, path: str | os.PathLike[str]) -> None:
    """Write ``index`` (a CPU copy when it lives on a GPU) to ``path`` with FAISS's own writer: streamed to the
    file, no in-memory copy of the index."""
    import_faiss().write_index(to_cpu(index), os.fspath(path))


def read_index_file(path: str | os.PathLike[str], mmap: bool = False):
    """Read an index written by :func:`write_index_file`. Raises ``UsageError`` for a file FAISS cannot read.

    ``mmap``: memory-map the index's bulk data read-only (FAISS ``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``: the
    stored vectors of ``Flat`` / ``RFlat`` / HNSW indexes and the IVF lists) instead of copying it into memory, for
    searching: its pages are page cache the kernel can evict, not anonymous memory (the ``auto`` index's exact
    re-rank store is N x D x 4 B: 2 GB at 1M x 512). Search results are identical (tested). The index can then not
    be added to; files are published by rename, so a rebuild never changes a mapped file under a reader."""
    faiss = import_faiss()
    try:
        if mmap:
            return faiss.read_index(os.fspath(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        return faiss.read_index(os.fspath(path))
    except RuntimeError as exc:
        raise UsageError(f"not a readable FAISS index: {str(exc).strip().splitlines()[-1][:200]}") from None


def index_kind(factory: str) -> str:
    """``flat`` | ``ivf`` | ``other``: what an incremental add is allowed for."""
    f = factory.replace(" ", "")
    if re.fullmatch(r"(IDMap2?,)?Flat", f):
        return "flat"
    if re.match(r"(OPQ\d+(_\d+)?,|PCAR?\d+,)?IVF\d+", f):
        return "ivf"
    return "other"


def supports_incremental_add(factory: str) -> bool:
    """Flat and IVF indexes take new rows without a rebuild (their coarse quantiser / codebooks stay valid)."""
    return index_kind(factory) in ("flat", "ivf")


def needs_training(index) -> bool:
    return not bool(index.is_trained)


def train_index(index, sample: np.ndarray) -> None:
    """Train ``index`` (IVF centroids, PQ codebooks) on ``sample`` ``(S, D) float32`` already prepared.

    Raises ``ValueError`` when the sample is too small for the factory (e.g. fewer rows than IVF lists).
    """
    ivf = _ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 0
    if nlist and len(sample) < nlist:
        raise UsageError(f"cannot train IVF{nlist} on {len(sample)} vectors: use fewer lists (e.g. IVF{max(1, len(sample) // 39)}) "
                         "or the exact 'Flat' factory for a set this small")
    if nlist and len(sample) < 39 * nlist:
        log.warning("training IVF%d on %d vectors (< 39 per list); recall may suffer", nlist, len(sample))
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    except RuntimeError as exc:
        raise UsageError(f"FAISS could not train the index on {len(sample)} vectors: {str(exc).strip().splitlines()[-1][:200]}") from None


def _ivf(index):
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def add_vectors(index, x: np.ndarray) -> None:
    """Append prepared ``(n, D) float32`` rows; they get the next consecutive row numbers."""
    index.add(np.ascontiguousarray(x, dtype=np.float32))


def set_nprobe(index, nprobe: int | None) -> None:
    """Set ``nprobe`` on an IVF index (no-op for others). Works for CPU and GPU indexes."""
    if not nprobe:
        return
    faiss = import_faiss()
    if _ivf(index) is None and not hasattr(index, "nprobe"):
        return
    gpu = hasattr(faiss, "GpuParameterSpace") and type(index).__name__.startswith("Gpu")
    ps = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    ps.set_index_parameter(index, "nprobe", int(nprobe))


def gpu_available() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU."""
    faiss = import_faiss()
    return hasattr(faiss, "get_num_gpus") and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_device(index, gpu: str = "auto") -> tuple[Any, str]:
    """Move ``index`` to GPU 0 when ``gpu`` is ``on``, or ``auto`` and a GPU FAISS is present.

    Returns ``(index, "gpu"|"cpu")``. ``gpu="on"`` without a GPU build raises ``ValueError``. Results are the same
    (up to float rounding) on either device.
    """
    if gpu not in ("auto", "on", "off"):
        raise UsageError(f"--gpu must be auto, on or off, got {gpu!r}")
    if gpu == "off":
        return index, "cpu"
    if not gpu_available():
        if gpu == "on":
            raise UsageError("--gpu on, but this FAISS has no GPU support or sees no GPU (faiss-cpu is installed); "
                             "install faiss-gpu on a CUDA machine or use --gpu auto/off")
        return index, "cpu"
    faiss = import_faiss()
    res = faiss.StandardGpuResources()
    try:
        gindex = faiss.index_cpu_to_gpu(res, 0, index)
    except RuntimeError as exc:  # e.g. an index type FAISS cannot run on GPU
        if gpu == "on":
            raise UsageError(f"this index cannot run on the GPU: {str(exc).strip().splitlines()[-1][:200]}") from None
        log.warning("index stays on CPU: %s", str(exc).strip().splitlines()[-1][:200])
        return index, "cpu"
    gindex.referenced_resources = res  # keep the resources alive as long as the index
    return gindex, "gpu"


def search_index(index, q: np.ndarray, k: int, metric: str, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Search prepared queries ``(Q, D) float32`` -> ``(indices (Q, k) int64, distances (Q, k) float32)``.

    Distances use the module convention (``1 - cos`` or squared L2). Missing hits (fewer than ``k`` candidates
    probed) are ``-1`` with distance ``inf``. Memory O(block x k).
    """
    _check_metric(metric)
    n = len(q)
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        d, i = index.search(np.ascontiguousarray(q[start:start + block], dtype=np.float32), k)
        if metric == "cosine":
            d = 1.0 - d
        d = np.where(i < 0, np.inf, d)
        idx[start:start + len(d)] = i
        dist[start:start + len(d)] = d
    return idx, dist


def serialize_index(index) -> bytes:
    """A CPU copy of ``index`` as bytes (FAISS's own format)."""
    faiss = import_faiss()
    if type(index).__name__.startswith("Gpu"):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes):
    """Inverse of :func:`serialize_index`. Raises ``ValueError`` for bytes FAISS cannot read."""
    faiss = import_faiss()
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise UsageError(f"not a readable FAISS index: {str(exc).strip().splitlines()[-1][:200]}") from None
