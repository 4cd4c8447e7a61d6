"""Build (or incrementally update) a FAISS index artefact over a stored feature table or over pixel space.

``space="feature"`` indexes the feature artefact's vectors; ``space="pixel"`` indexes downsampled raw pixels
(:mod:`tasks.core.pixels`, 32x32x3 by default) of the same images, for the CS231n pixel-vs-feature comparison.

Identity: the artefact id hashes (feature artefact id, space, factory, metric, pixel size, code version). The
manifest records the feature manifest's ``created`` it was built from; when the feature table has been republished
since, a rerun updates the index: **incrementally** (only rows whose ``(path, image_id)`` is new are added) for
Flat / IVF factories when no stored row was removed or changed, else by a full rebuild. Queries compare the two
``created`` stamps and say when an index is older than its features. An update never deletes a file the previous
manifest lists (:func:`storage.index_store.publish_index_manifest`): a reader holding that manifest keeps its files
until the publish after this one.

Factory ``auto`` (the default): exact ``Flat`` up to ``exact_max_rows`` rows
(:data:`tasks.core.faiss_index.AUTO_EXACT_MAX_ROWS`), above it ``IVF<nlist>,PQ<m>x4fs,RFlat`` (fast-scan PQ
candidates, exact re-rank; :func:`tasks.core.faiss_index.resolve_factory`). The artefact is keyed by the *resolved*
factory, so ``auto`` below the threshold and an explicit ``Flat`` share one artefact, and a set that grows past the
threshold (or into another ``nlist``) gets a new, full build. ``--factory Flat`` always forces exact search.

Memory contract: O(train sample x D) for training plus O(batch_rows x D) while streaming rows. ``Flat`` and
``<base>,RFlat`` (the ``auto`` factories) keep their exact vectors in a spool file, not in memory
(:class:`tasks.core.faiss_files.StreamedIndex`; the published file is byte-identical to FAISS's own writer's): the
build holds only the base index of an ``RFlat`` (PQ codes + ids, N x (m/2 + 8) bytes: ~40 MB at 1M rows). The id
map is streamed to its Parquet file in every mode. An incremental update also holds the previous id map and the
feature table's records (path, id, label, split) as Arrow columns, and their ``path NUL image_id`` keys (~300 B
per row in all); the pixel space holds the records as a DataFrame; other factories (IVF-Flat, HNSW, ...) hold
their whole index. Measured at 1M x 512 (``auto``, docs/scaling.md): a full build peaks at 892 MiB (was 3,236 MiB
with the re-rank store in memory) and writes the same index file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from storage.atomic import TMP_PREFIX
from storage.errors import StoreError, UsageError
from storage.features import iter_feature_batches, part_entries, read_feature_table
from storage.index_store import (
    IDMAP_COLUMNS,
    IdmapWriter,
    index_file_path,
    publish_index_file,
    publish_index_manifest,
    read_idmap_table,
)
from storage.locks import artefact_lock
from storage.manifest import CODE_VERSION, MANIFEST_NAME, read_manifest
from storage.paths import Store, artefact_id
from tasks.core.faiss_files import StreamedIndex, streamable
from tasks.core.faiss_index import (
    AUTO_EXACT_MAX_ROWS,
    AUTO_K_FACTOR,
    add_vectors,
    default_nprobe,
    finalize_index,
    index_kind,
    needs_training,
    new_index,
    nlist_of,
    prepare_vectors,
    read_index_file,
    reserve_rows,
    resolve_factory,
    supports_incremental_add,
    to_cpu,
    to_device,
    train_index,
    write_index_file,
)
from tasks.core.pixels import PIXEL_SIZE, pixel_vectors

__all__ = ["IndexConfig", "build_index", "build_default_indexes", "default_metric", "SPACES"]

log = logging.getLogger(__name__)
SPACES = ("feature", "pixel")


def default_metric(space: str) -> str:
    """``cosine`` in feature space, ``l2`` in pixel space (CS231n compares raw pixel distances)."""
    return "cosine" if space == "feature" else "l2"


@dataclass
class IndexConfig:
    """Parameters of ``convlens index`` (CLI flags map 1:1)."""

    store: str = "convlens-store"
    artefact: str | None = None  # feature artefact id (or unique prefix); newest when None
    space: str = "feature"
    factory: str = "auto"  # auto: Flat up to exact_max_rows rows, IVF-PQ fast-scan + exact re-rank above; any FAISS factory
    exact_max_rows: int = AUTO_EXACT_MAX_ROWS
    metric: str | None = None  # default_metric(space)
    gpu: str = "auto"
    train_rows: int = 100_000
    nprobe: int | None = None
    pixel_size: int = PIXEL_SIZE
    rebuild: bool = False
    batch_rows: int = 16384
    seed: int = 0
    progress: bool = False

    def validate(self) -> None:
        if self.space not in SPACES:
            raise UsageError(f"--space must be feature or pixel, got {self.space!r}")
        if self.metric is not None and self.metric not in ("cosine", "l2"):
            raise UsageError(f"--metric must be cosine or l2, got {self.metric!r}")
        if self.gpu not in ("auto", "on", "off"):
            raise UsageError(f"--gpu must be auto, on or off, got {self.gpu!r}")
        if self.train_rows < 1 or self.batch_rows < 1:
            raise UsageError("--train-rows and batch size must be >= 1")
        if not self.factory or not self.factory.strip():
            raise UsageError("--factory is empty; use auto (default), Flat (exact) or e.g. IVF1024,PQ32")
        if self.exact_max_rows < 0:
            raise UsageError(f"--exact-max-rows must be >= 0, got {self.exact_max_rows}")


def _iter_rows(cfg: IndexConfig, fdir: Path, fman: dict[str, Any], meta: pd.DataFrame | None,
               wanted: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, pd.DataFrame, list[tuple[str, str]]]]:
    """Yield ``(feature-table positions, raw vectors, their records, failures)`` for the positions where ``wanted``
    is true. Feature space streams the parts (``meta`` unused, may be None); pixel space reads ``meta``'s paths."""
    if cfg.space == "feature":
        off = 0
        for meta_b, feats in iter_feature_batches(fdir, fman, cfg.batch_rows):
            m = wanted[off:off + len(feats)]
            if len(feats) and off + len(feats) > len(wanted):
                raise StoreError(f"feature artefact {fdir.name} has more rows than its manifest's parts list; "
                                 "run `convlens verify` on it")
            if m.any():
                yield np.flatnonzero(m) + off, feats[m], meta_b[m], []
            off += len(feats)
        if off != len(wanted):
            raise StoreError(f"feature artefact {fdir.name}: read {off} rows, its manifest lists {len(wanted)}; "
                             "run `convlens verify` on it")
        return
    root = fman.get("dataset_root")
    if not root:
        raise StoreError(f"feature artefact {fdir.name} records no dataset_root; the pixel index needs the image files")
    if meta is None:
        raise StoreError("the pixel index reads its images from the feature table's paths; none were given")
    pos = np.flatnonzero(wanted)
    paths = meta["path"].tolist()
    for start in range(0, len(pos), cfg.batch_rows):
        chunk = pos[start:start + cfg.batch_rows]
        vecs, ok, failures = pixel_vectors(root, [paths[i] for i in chunk], cfg.pixel_size, progress=cfg.progress)
        yield chunk[ok], vecs, meta.iloc[chunk[ok]], failures


def _sample_positions(wanted: np.ndarray, n: int, seed: int) -> np.ndarray:
    pos = np.flatnonzero(wanted)
    if len(pos) <= n:
        return wanted.copy()
    rng = np.random.default_rng(seed)
    mask = np.zeros_like(wanted)
    mask[rng.choice(pos, size=n, replace=False)] = True
    return mask


def _add_rows(cfg: IndexConfig, index, metric: str, fdir: Path, fman: dict[str, Any], meta: pd.DataFrame | None,
              wanted: np.ndarray, first_row: int, idmap_out: IdmapWriter) -> tuple[int, list[tuple[str, str]]]:
    """Add the wanted feature-table rows to ``index`` (a FAISS index or a :class:`StreamedIndex`) and their id-map
    rows to ``idmap_out``; return ``(rows added, unreadable files)``."""
    failures: list[tuple[str, str]] = []
    row = first_row
    for pos, vecs, recs, fails in _iter_rows(cfg, fdir, fman, meta, wanted):
        failures.extend(fails)
        if not len(pos):
            continue
        x = prepare_vectors(vecs, metric)
        if isinstance(index, StreamedIndex):
            index.add(x)
        else:
            add_vectors(index, x)
        idmap_out.add(row, recs)
        row += len(pos)
    return row - first_row, failures


def _row_keys(table: pa.Table) -> pa.Array:
    """One string per row, ``path NUL image_id``: what identifies a stored row across updates (Arrow, no Python
    object per row)."""
    cols = [pc.fill_null(table.column(c).cast(pa.string()), "") for c in ("path", "image_id")]
    return pc.binary_join_element_wise(*cols, "\x00").combine_chunks()


def _write_old_rows(idmap_out: IdmapWriter, old: pa.Table, records: pa.Table, count: int, block: int = 65_536) -> None:
    """The previous id map's rows (FAISS rows ``0 .. count - 1``) into ``idmap_out``, their labels and splits
    refreshed from the current feature table by path (they may have been edited), a block at a time."""
    if old.num_rows != count or not np.array_equal(old.column("row").to_numpy(), np.arange(count)):
        raise StoreError(f"the id map lists {old.num_rows} rows, the index {count}; rebuild it with "
                         "`convlens index --rebuild`")
    at = pc.index_in(old.column("path"), value_set=records.column("path"))
    for s in range(0, count, block):
        part = old.slice(s, block)
        where = at.slice(s, block)
        part = part.set_column(part.schema.get_field_index("label"), "label", records.column("label").take(where))
        part = part.set_column(part.schema.get_field_index("split"), "split", records.column("split").take(where))
        idmap_out.add(s, part)


def _feature_rows(fdir: Path, fman: dict[str, Any]) -> int:
    """Rows of the feature artefact from its manifest (each part's entry records its rows)."""
    parts = part_entries(fman)
    if parts and all("rows" in e for e in parts):
        return sum(int(e["rows"]) for e in parts)
    return read_feature_table(fdir, fman, ["image_id"]).num_rows


def build_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build, update or reuse the index artefact for ``cfg``; return its published manifest.

    ``manifest["build"]["mode"]`` says what happened: ``reused`` (up to date), ``incremental`` (rows added) or
    ``full``. Raises ``ValueError`` for a bad factory / metric / too-small training set and :class:`StoreError`
    when the store has no feature artefact.
    """
    cfg.validate()
    metric = cfg.metric or default_metric(cfg.space)
    store = Store(cfg.store)
    faid, fman = store.resolve("features", cfg.artefact)
    fdir = store.artefact_dir("features", faid)
    dim = int(fman.get("dim") or 0) if cfg.space == "feature" else cfg.pixel_size * cfg.pixel_size * 3
    factory = resolve_factory(cfg.factory, int(fman.get("rows") or 0), dim, cfg.exact_max_rows)
    key = {"source": faid, "space": cfg.space, "factory": factory, "metric": metric, "code_version": CODE_VERSION}
    if cfg.space == "pixel":
        key["pixel_size"] = cfg.pixel_size
    readable = f"{cfg.space}-{factory.replace(',', '_')}-{metric}-{faid[:24]}"
    aid = artefact_id(readable, key)
    adir = store.artefact_dir("indexes", aid, create=True)
    t0 = time.perf_counter()
    with artefact_lock(adir):
        old = read_manifest(adir) if (adir / MANIFEST_NAME).is_file() else None
        if old and not cfg.rebuild and old.get("source", {}).get("created") == fman.get("created"):
            index_file_path(adir, old)  # verify: a corrupt index is never reported as up to date
            log.info("index %s is up to date with features %s", aid, faid)
            return {**old, "build": {**old.get("build", {}), "mode": "reused"}}
        # the manifest an incremental update would continue from
        update_of = old if old and not cfg.rebuild and supports_incremental_add(factory) else None
        # the records of every row are read only where they are needed, as Arrow columns: pixel paths, an
        # incremental update's keys and labels; a full feature-space build streams them from the parts
        records = (read_feature_table(fdir, fman, list(IDMAP_COLUMNS[1:]))
                   if cfg.space == "pixel" or update_of is not None else None)
        meta = records.to_pandas() if cfg.space == "pixel" and records is not None else None
        n = records.num_rows if records is not None else _feature_rows(fdir, fman)
        if n == 0:
            raise StoreError(f"feature artefact {faid} has no rows; nothing to index")
        # Flat and <base>,RFlat keep their exact vectors in a spool file, not in memory (tasks.core.faiss_files)
        stream = streamable(new_index(dim, factory, metric))
        mode = "full"
        index: Any = None
        previous: tuple[pa.Table, pa.Table] | None = None  # an update's (previous id map, current records)
        wanted = np.ones(n, bool)
        if update_of is not None and records is not None:
            idmap_old = read_idmap_table(adir, update_of)
            old_keys, new_keys = _row_keys(idmap_old), _row_keys(records)
            if pc.all(pc.is_in(old_keys, value_set=new_keys)).as_py() is not False:
                path = index_file_path(adir, update_of)
                index = StreamedIndex.open(path, adir) if stream else read_index_file(path)
                wanted = ~pc.is_in(new_keys, value_set=old_keys).to_numpy(zero_copy_only=False)
                mode = "incremental"
                previous = (idmap_old, records)
            else:
                log.info("index %s: stored rows were removed or changed; rebuilding from scratch", aid)
            del old_keys, new_keys
        trained_on = (old or {}).get("train_rows") if mode == "incremental" else None
        idmap_out: IdmapWriter | None = None
        tmp = adir / f"{TMP_PREFIX}index-{os.getpid()}.faiss"
        try:
            if index is None:
                index = new_index(dim, factory, metric)
                if needs_training(index):
                    nl = nlist_of(index)
                    rows = cfg.train_rows if factory == cfg.factory or not nl else min(cfg.train_rows, 50 * nl)
                    sample_mask = _sample_positions(wanted, rows, cfg.seed)
                    chunks = [prepare_vectors(v, metric) for _p, v, _r, _f in _iter_rows(cfg, fdir, fman, meta, sample_mask) if len(v)]
                    sample = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
                    del chunks
                    train_index(index, sample)
                    trained_on = int(len(sample))
                    del sample
                if stream:
                    index = StreamedIndex(index, adir)
            if isinstance(index, StreamedIndex):
                device = index.to_device(cfg.gpu)
            else:
                reserve_rows(index, int(index.ntotal) + int(wanted.sum()))
                index, device = _maybe_gpu(index, cfg.gpu, mode)
            first_row = int(index.ntotal)
            idmap_out = IdmapWriter(adir)
            if previous is not None:
                _write_old_rows(idmap_out, *previous, first_row)
                previous = None
            n_added, failures = _add_rows(cfg, index, metric, fdir, fman, meta, wanted, first_row, idmap_out)
            if cfg.space == "feature" and int(index.ntotal) != n:
                raise StoreError(f"index {aid}: holds {int(index.ntotal)} rows after adding {n_added}, the features "
                                 f"{n}; nothing was published. Rebuild it with `convlens index --rebuild`")
            core = index.base if isinstance(index, StreamedIndex) else index  # a streamed Flat has no base
            nlist = nlist_of(core) if core is not None else None
            nprobe = cfg.nprobe or (old or {}).get("nprobe") or (default_nprobe(nlist) if nlist else None)
            k_factor = (old or {}).get("k_factor") or (AUTO_K_FACTOR if factory.replace(" ", "").endswith(",RFlat") else None)
            if isinstance(index, StreamedIndex):
                index.write(tmp, nprobe, k_factor)
            else:
                cpu = to_cpu(index)
                finalize_index(cpu, nprobe, k_factor)
                write_index_file(cpu, tmp)
            idmap_entry = idmap_out.close()
            idmap_out = None
            files = [publish_index_file(adir, tmp), idmap_entry]
        finally:
            tmp.unlink(missing_ok=True)
            if idmap_out is not None:
                idmap_out.abort()
            if isinstance(index, StreamedIndex):
                index.close()
        manifest = {
            "kind": "index",
            "artefact_id": aid,
            "space": cfg.space,
            "source": {"kind": "features", "artefact_id": faid, "created": fman.get("created"), "rows": n,
                       "dim": fman.get("dim"), "dataset_root": fman.get("dataset_root")},
            "factory": factory,
            "factory_requested": cfg.factory,
            "index_kind": index_kind(factory),
            "exact": factory.replace(" ", "") in ("Flat", "IDMap,Flat", "IDMap2,Flat"),
            "metric": metric,
            "distance": "1 - cosine similarity" if metric == "cosine" else "squared L2",
            "dim": int(index.d),
            "rows": int(index.ntotal),
            "nlist": nlist,
            "nprobe": nprobe,
            "k_factor": k_factor,
            "train_rows": trained_on,
            "pixel_size": cfg.pixel_size if cfg.space == "pixel" else None,
            "index_sha256": files[0]["sha256"],
            "skipped": len(failures) + (int((old or {}).get("skipped", 0)) if mode == "incremental" else 0),
            "skipped_examples": [f"{p}: {r}" for p, r in failures[:20]],
            "files": files,
            "build": {"mode": mode, "added": int(n_added), "device": device,
                      "seconds": round(time.perf_counter() - t0, 3), "from_created": (old or {}).get("created"),
                      "streamed": isinstance(index, StreamedIndex)},
        }
        if mode == "incremental" and old:
            manifest["first_built"] = old.get("first_built") or old.get("created")
        published = publish_index_manifest(adir, manifest)
    log.info("index %s: %s build (%s), %d rows (%d added) in %.2fs on %s", aid, mode, factory, published["rows"],
             n_added, published["build"]["seconds"], device)
    return published


def _maybe_gpu(index, gpu: str, mode: str):
    """Adding to a GPU copy is faster for big sets; the stored copy is always serialized back to CPU."""
    if gpu == "off":
        return index, "cpu"
    return to_device(index, gpu)


def build_default_indexes(store: str, artefact: str | None = None, gpu: str = "auto") -> dict[str, Any]:
    """Demo entry point: the exact feature-space (cosine) and pixel-space (l2) indexes of the newest features.

    Returns a small summary ``{"feature": {...}, "pixel": {...}}`` with artefact id, rows, mode and seconds.
    """
    out: dict[str, Any] = {}
    for space in SPACES:
        m = build_index(IndexConfig(store=store, artefact=artefact, space=space, gpu=gpu))
        out[space] = {"artefact_id": m["artefact_id"], "rows": m["rows"], "metric": m["metric"],
                      "factory": m["factory"], "mode": m["build"]["mode"], "seconds": m["build"]["seconds"],
                      "skipped": m.get("skipped", 0)}
    return out
