"""Exact-store indexes built and written as a stream: ``Flat`` and ``…,RFlat`` with the vectors never in memory.

FAISS keeps the vectors of an ``IndexFlat`` (and the exact re-rank store of ``IndexRefineFlat``, the ``RFlat`` of
the ``auto`` factory) in one ``std::vector``: N x D x 4 bytes (2 GB at 1M x 512, 20 GB at 10M) held while rows are
added and while the file is written. FAISS has no API to write an index whose vectors are elsewhere, so this module
writes the same bytes its ``write_index`` writes, by hand, with the vectors in a spool file. Only the small part is
held: the base index of an ``RFlat`` (IVF lists of PQ codes + ids, ~40 B per row for ``PQ64x4fs``).

File layout (``faiss/impl/index_write.cpp``; checked byte for byte against ``faiss.write_index`` by the tests):

- header: ``int32 d, int64 ntotal, int64 1<<20, int64 1<<20, uint8 is_trained, int32 metric_type``
  (+ ``float32 metric_arg`` for metrics > 1, never used here);
- ``IndexFlat``: fourcc ``IxFI`` (inner product) / ``IxF2`` (L2), header, ``uint64 N*D``, ``N*D float32``;
- ``IndexRefineFlat``: fourcc ``IxRF``, header, the base index as FAISS writes it, the ``IndexFlat`` above,
  ``float32 k_factor``.

:class:`StreamedIndex` is a new (trained) index or one opened from such a file for an incremental add: new rows go
to the base index (in memory) and to the spool (an unlinked temp file, so a kill leaves nothing behind); an opened
file's stored vectors are copied into the spool as a stream. Memory O(base index + one batch).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from storage.errors import UsageError
from tasks.core.faiss_index import finalize_index, gpu_available, import_faiss, to_cpu, to_device

__all__ = ["StreamedIndex", "read_vectors", "search_file", "streamable"]

_HEADER = struct.Struct("<iqqqBi")
_DUMMY = 1 << 20
_FLAT_FOURCC = {0: b"IxFI", 1: b"IxF2"}  # METRIC_INNER_PRODUCT, METRIC_L2
_COPY = 16 << 20


def _kind(index) -> str | None:
    """``flat`` / ``rflat`` when ``index`` is a plain ``IndexFlatIP`` / ``IndexFlatL2`` or an ``IndexRefineFlat``
    over one, else None."""
    faiss = import_faiss()
    ix = faiss.downcast_index(index)
    if type(ix) in (faiss.IndexFlatIP, faiss.IndexFlatL2, faiss.IndexFlat) and int(ix.metric_type) in _FLAT_FOURCC:
        return "flat"
    if isinstance(ix, faiss.IndexRefineFlat) and int(ix.metric_type) in _FLAT_FOURCC:
        return "rflat"
    return None


def streamable(index) -> bool:
    """True for the indexes :class:`StreamedIndex` builds: ``Flat`` and ``<base>,RFlat`` (inner product or L2)."""
    return _kind(index) is not None


def _header(d: int, ntotal: int, is_trained: bool, metric_type: int) -> bytes:
    return _HEADER.pack(int(d), int(ntotal), _DUMMY, _DUMMY, 1 if is_trained else 0, int(metric_type))


def _read_header(f: BinaryIO, what: str) -> tuple[bytes, int, int, bool, int]:
    raw = f.read(4 + _HEADER.size)
    if len(raw) != 4 + _HEADER.size:
        raise UsageError(f"{what}: truncated index file")
    d, ntotal, _a, _b, trained, metric = _HEADER.unpack(raw[4:])
    return raw[:4], d, ntotal, bool(trained), metric


class StreamedIndex:
    """A ``Flat`` or ``…,RFlat`` index whose vectors live in a spool file until :meth:`write`.

    ``index``: a new, trained index (:func:`streamable`). ``spool_dir``: where the spool is made (the artefact's
    directory: the same filesystem as the file it becomes). :meth:`open` starts from a written file instead.
    """

    def __init__(self, index, spool_dir: str | os.PathLike[str]) -> None:
        kind = _kind(index)
        if kind is None:
            raise UsageError("only Flat and <base>,RFlat indexes are built as a stream")
        faiss = import_faiss()
        ix = faiss.downcast_index(index)
        base = faiss.downcast_index(ix.base_index) if kind == "rflat" else None
        self._setup(int(ix.d), int(ix.metric_type), base, float(ix.k_factor) if base is not None else None, spool_dir)
        self._owner = index  # owns the base index of an RFlat

    def _setup(self, d: int, metric_type: int, base, k_factor: float | None, spool_dir) -> None:
        self.kind = "flat" if base is None else "rflat"
        self.d = d
        self.metric_type = metric_type
        self.base = base
        self.k_factor = k_factor
        self.device = "cpu"
        self.ntotal = 0
        self._owner = None
        self._spool = tempfile.TemporaryFile(prefix=".tmp-spool-", dir=os.fspath(spool_dir))

    @property
    def is_trained(self) -> bool:
        return bool(self.base.is_trained) if self.base is not None else True

    @classmethod
    def open(cls, path: str | os.PathLike[str], spool_dir: str | os.PathLike[str]) -> StreamedIndex:
        """Continue a file written by :meth:`write` (or by ``faiss.write_index`` for such an index): the base
        index is read into memory, the stored vectors are copied into the spool. Raises ``UsageError`` for any
        other file."""
        lay = _Layout.read(path)
        out = cls.__new__(cls)
        out._setup(lay.d, lay.metric, lay.base, lay.k_factor, spool_dir)
        with open(path, "rb") as f:
            f.seek(lay.vectors_at)
            out._copy_in(f, lay.ntotal * lay.d * 4)
        out.ntotal = lay.ntotal
        return out

    def _copy_in(self, f: BinaryIO, nbytes: int) -> None:
        left = nbytes
        while left:
            chunk = f.read(min(_COPY, left))
            if not chunk:
                raise UsageError("index file ends inside its stored vectors")
            self._spool.write(chunk)
            left -= len(chunk)

    def to_device(self, gpu: str) -> str:
        """Move the base index to a GPU (``auto`` / ``on``, :func:`tasks.core.faiss_index.to_device`); a Flat index
        has nothing to move (its rows are a file write). Returns ``gpu`` or ``cpu``."""
        if self.base is not None and gpu != "off":
            self.base, self.device = to_device(self.base, gpu)
        elif gpu == "on" and not gpu_available():  # the same refusal as for any other index
            to_device(import_faiss().IndexFlatL2(self.d), gpu)
        return self.device

    def add(self, x: np.ndarray) -> None:
        """Append prepared ``(n, D) float32`` rows (:func:`tasks.core.faiss_index.prepare_vectors`)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise UsageError(f"expected (n, {self.d}) vectors, got {x.shape}")
        if self.base is not None:
            self.base.add(x)
        self._spool.write(memoryview(x).cast("B"))
        self.ntotal += len(x)

    def write(self, path: str | os.PathLike[str], nprobe: int | None = None, k_factor: float | None = None) -> None:
        """Write the index file (``nprobe`` set on the base's IVF, ``k_factor`` on the refine) to ``path``."""
        faiss = import_faiss()
        if k_factor:
            self.k_factor = float(k_factor)
        self._spool.flush()
        self._spool.seek(0)
        flat = (_FLAT_FOURCC[self.metric_type] + _header(self.d, self.ntotal, True, self.metric_type)
                + struct.pack("<Q", self.ntotal * self.d))
        with open(path, "wb") as out:
            if self.base is not None:
                base = to_cpu(self.base)
                finalize_index(base, nprobe, None)
                if int(base.ntotal) != self.ntotal:
                    raise UsageError(f"base index holds {base.ntotal} rows, the stored vectors {self.ntotal}")
                out.write(b"IxRF" + _header(self.d, self.ntotal, self.is_trained, self.metric_type))
                faiss.write_index(base, faiss.PyCallbackIOWriter(out.write))
            out.write(flat)
            shutil.copyfileobj(self._spool, out, _COPY)
            if self.base is not None:
                out.write(struct.pack("<f", self.k_factor))

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> StreamedIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Layout:
    """Where things are in a ``Flat`` / ``…,RFlat`` index file: the base index (read into memory), the offset of
    the stored vectors, their shape and metric, the ``k_factor``. Raises ``UsageError`` for any other file."""

    def __init__(self, d: int, ntotal: int, metric: int, base, k_factor: float | None, vectors_at: int) -> None:
        self.d, self.ntotal, self.metric, self.base, self.k_factor, self.vectors_at = d, ntotal, metric, base, k_factor, vectors_at

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> _Layout:
        faiss = import_faiss()
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            fourcc, d, ntotal, _trained, metric = _read_header(f, path.name)
            base = k_factor = None
            if fourcc == b"IxRF":
                flat_at = size - 4 - (4 + _HEADER.size + 8 + ntotal * d * 4)
                if flat_at < 4 + _HEADER.size:
                    raise UsageError(f"{path.name}: not an RFlat index file of {ntotal} x {d}")
                # FAISS reads exactly the base index's bytes from the callback reader: the file position then
                # has to be the refine index's start, which checks the arithmetic above
                base = faiss.read_index(faiss.PyCallbackIOReader(f.read))  # owned here (downcast by SWIG)
                if f.tell() != flat_at:
                    raise UsageError(f"{path.name}: the base index ends at {f.tell()}, expected {flat_at}")
                f.seek(size - 4)
                (k_factor,) = struct.unpack("<f", f.read(4))
            elif fourcc in (b"IxFI", b"IxF2"):
                flat_at = 0
            else:
                raise UsageError(f"{path.name}: not a Flat or RFlat index file (starts {fourcc!r})")
            f.seek(flat_at)
            ffour, fd, fn, _t, fmetric = _read_header(f, path.name)
            (count,) = struct.unpack("<Q", f.read(8))
            if ffour != _FLAT_FOURCC.get(metric) or (fd, fn, fmetric) != (d, ntotal, metric) or count != ntotal * d:
                raise UsageError(f"{path.name}: the stored vectors' header does not match the index ({ntotal} x {d})")
            if base is not None and int(base.ntotal) != ntotal:
                raise UsageError(f"{path.name}: the base index holds {base.ntotal} rows, the stored vectors {ntotal}")
            return cls(d, ntotal, metric, base, k_factor, f.tell())


def search_file(path: str | os.PathLike[str], q: np.ndarray, k: int,
                chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Search a ``Flat`` / ``…,RFlat`` index file for prepared queries ``q`` ``(Q, D) float32`` reading its stored
    vectors as a stream: ``(distances, labels)`` as FAISS's ``search`` returns them (inner product: larger is
    nearer; L2: squared distance; ``-1`` where fewer than ``k`` rows exist).

    For a few thousand queries against a million rows: the vectors are read in order, ``chunk_rows`` at a time,
    through ``read`` (page cache, never mapped into the process, so the search adds O(base + chunk + Q x k x
    k_factor) to the process's memory, where a mapped 1M x 512 file adds 2 GB of resident file pages). ``RFlat``:
    the base index's ``k x k_factor`` candidates, re-ranked exactly as ``IndexRefineFlat`` does (same candidates,
    same exact distances up to float rounding); ``Flat``: an exact scan. For many queries (a kNN graph of every
    row) map the file instead (:func:`tasks.core.faiss_index.read_index_file`)."""
    faiss = import_faiss()
    lay = _Layout.read(path)
    q = np.ascontiguousarray(q, np.float32)
    if q.ndim != 2 or q.shape[1] != lay.d:
        raise UsageError(f"expected (Q, {lay.d}) queries, got {q.shape}")
    nq = len(q)
    ip = lay.metric == 0
    worst = -np.inf if ip else np.inf
    if lay.base is None:  # exact scan merged in a heap (FAISS's heap keeps the smallest values)
        heap = faiss.ResultHeap(nq, k)
        for start, block in _vector_chunks(path, lay, chunk_rows):
            kk = min(k, len(block))
            dist, lab = faiss.knn(q, block, kk, metric=faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
            if kk < k:
                dist = np.hstack([dist, np.full((nq, k - kk), worst, np.float32)])
                lab = np.hstack([lab, np.full((nq, k - kk), -1, np.int64)])
            heap.add_result(np.ascontiguousarray(-dist if ip else dist, np.float32),
                            np.ascontiguousarray(np.where(lab >= 0, lab + start, -1), np.int64))
        heap.finalize()
        return (-heap.D if ip else heap.D), heap.I
    k_base = int(k * (lay.k_factor or 1))
    _, cand = lay.base.search(q, k_base)
    dist = np.full(cand.shape, worst, np.float32)
    flat = cand.reshape(-1)
    pos = np.flatnonzero(flat >= 0)
    pos = pos[np.argsort(flat[pos], kind="stable")]  # candidate pairs in stored-vector order
    rows = flat[pos]
    lo = 0
    for start, block in _vector_chunks(path, lay, chunk_rows):
        hi = int(np.searchsorted(rows, start + len(block)))
        if hi > lo:
            sel = pos[lo:hi]
            vec = block[rows[lo:hi] - start]
            qs = q[sel // k_base]
            dist.reshape(-1)[sel] = (np.einsum("ij,ij->i", qs, vec) if ip else
                                     np.einsum("ij,ij->i", qs - vec, qs - vec))
        lo = hi
    order = np.argsort(-dist if ip else dist, axis=1, kind="stable")[:, :k]
    out_d = np.take_along_axis(dist, order, axis=1)
    out_i = np.take_along_axis(cand, order, axis=1)
    if out_i.shape[1] < k:
        out_d = np.hstack([out_d, np.full((nq, k - out_i.shape[1]), worst, np.float32)])
        out_i = np.hstack([out_i, np.full((nq, k - out_i.shape[1]), -1, np.int64)])
    return out_d, out_i


def read_vectors(path: str | os.PathLike[str], rows: np.ndarray) -> np.ndarray:
    """``(len(rows), D) float32``: the stored vectors of index rows ``rows`` of a ``Flat`` / ``…,RFlat`` file (as
    they were added: normalised for a cosine index), read row by row (never mapped). Raises ``UsageError`` for a
    row out of range or another file."""
    lay = _Layout.read(path)
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= lay.ntotal):
        raise UsageError(f"{Path(path).name}: rows must be in [0, {lay.ntotal})")
    out = np.empty((len(rows), lay.d), np.float32)
    size = lay.d * 4
    with open(path, "rb") as f:
        for j in np.argsort(rows, kind="stable"):  # in file order
            f.seek(lay.vectors_at + int(rows[j]) * size)
            f.readinto(memoryview(out[j]).cast("B"))
    return out


def _vector_chunks(path: str | os.PathLike[str], lay: _Layout, chunk_rows: int):
    """``(first row, (rows, D) float32)`` blocks of the file's stored vectors, read in order."""
    with open(path, "rb") as f:
        f.seek(lay.vectors_at)
        for start in range(0, lay.ntotal, chunk_rows):
            n = min(chunk_rows, lay.ntotal - start)
            buf = np.empty((n, lay.d), np.float32)
            if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                raise UsageError(f"{Path(path).name}: the file ends inside its stored vectors")
            yield start, buf
