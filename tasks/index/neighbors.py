"""Nearest-neighbour queries over stored indexes (feature space or pixel space) and the all-rows kNN graph.

Query by a stored ``image_id`` (full sha256 or a unique prefix of >= 8 hex digits), by a stored path (relative
to the dataset root, or the file's absolute path), or by a new image file, which is embedded with the feature
artefact's own model, layer, pooling and preprocessing (or downsampled, in pixel space). Results are a DataFrame
``rank, row, image_id, path, label, split, distance, similarity``; ``distance`` is ``1 - cos`` for cosine
indexes (``similarity`` = cos) and squared L2 for l2 indexes (``similarity`` NaN).

An index built from an older feature manifest than the current one still answers, but the result says so
(``df.attrs["stale"]``, a logged warning, and a note on the CLI).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from storage.errors import StoreError, UsageError
from storage.features import iter_feature_batches
from storage.index_store import KnnGraphWriter, index_file_path, publish_index_manifest, read_idmap, read_knn_graph
from storage.locks import artefact_lock
from storage.manifest import read_manifest
from storage.paths import Store
from tasks.core.faiss_index import exact_vectors, prepare_vectors, read_index_file, search_index, set_nprobe, to_device
from tasks.core.images import DecodeLimits, RejectedImage, decode_image, read_file_bytes, stored_image_location
from tasks.core.pixels import load_pixel_vector, pixel_vector

__all__ = [
    "OpenIndex",
    "find_index",
    "open_index",
    "stale_message",
    "neighbors",
    "query_vectors",
    "embed_image_file",
    "knn_graph",
    "ensure_knn_graph",
    "GRAPH_EDGE_COLUMNS",
    "RESULT_COLUMNS",
]

log = logging.getLogger(__name__)
RESULT_COLUMNS = ("rank", "row", "image_id", "path", "label", "split", "distance", "similarity")


@dataclass
class OpenIndex:
    """A loaded, checksum-verified index with its id map and the feature artefact it came from."""

    store: Store
    artefact_id: str
    adir: Path
    manifest: dict[str, Any]
    cpu_index: Any
    index: Any
    device: str
    idmap: pd.DataFrame
    features_id: str
    fdir: Path
    fmanifest: dict[str, Any] | None
    stale: str | None

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def space(self) -> str:
        return self.manifest["space"]


def stale_message(imanifest: dict[str, Any], fmanifest: dict[str, Any] | None) -> str | None:
    """Why an index is out of date with its features, or None when it is current."""
    src = imanifest.get("source", {})
    if fmanifest is None:
        return f"the feature artefact {src.get('artefact_id')} this index was built from is gone"
    if fmanifest.get("created") != src.get("created"):
        return (f"index {imanifest.get('artefact_id')} is older than its features: built from the feature manifest of "
                f"{src.get('created')} ({src.get('rows')} rows), features republished {fmanifest.get('created')} "
                f"({fmanifest.get('rows')} rows); run `convlens index --space {imanifest.get('space')}` to update it")
    return None


def find_index(store: Store, space: str = "feature", index_id: str | None = None,
               artefact: str | None = None, metric: str | None = None) -> tuple[str, dict[str, Any]]:
    """The index artefact to use: ``index_id`` if given, else the newest ``space`` index built from the feature
    artefact ``artefact`` (default: the newest features), optionally of a given ``metric``."""
    if index_id:
        return store.resolve("indexes", index_id)
    faid, _ = store.resolve("features", artefact)
    items = [(a, m) for a, m in store.iter_artefacts("indexes")
             if m.get("kind") == "index" and m.get("space") == space and m.get("source", {}).get("artefact_id") == faid
             and (metric is None or m.get("metric") == metric)]
    if not items:
        raise StoreError(f"no {space}-space index{f' ({metric})' if metric else ''} for features {faid} in {store.root}; "
                         f"run `convlens index --store {store.root}{' --space pixel' if space == 'pixel' else ''}` first")
    return max(items, key=lambda it: (it[1].get("created", ""), it[0]))


def open_index(store: str | Store, space: str = "feature", index_id: str | None = None, artefact: str | None = None,
               gpu: str = "auto", nprobe: int | None = None, metric: str | None = None) -> OpenIndex:
    """Find, verify (sha256 of the index file and id map) and load an index; GPU copy when asked / available."""
    s = store if isinstance(store, Store) else Store(store)
    aid, m = find_index(s, space, index_id, artefact, metric)
    adir = s.artefact_dir("indexes", aid)
    # sha256 streamed, then FAISS maps the file read-only: its vectors stay page cache, not anonymous memory
    cpu = read_index_file(index_file_path(adir, m), mmap=True)
    idmap = read_idmap(adir, m)
    if len(idmap) != cpu.ntotal:
        raise StoreError(f"index {aid} holds {cpu.ntotal} rows but its id map {len(idmap)}; rebuild it with `convlens index --rebuild`")
    faid = m["source"]["artefact_id"]
    fdir = s.artefact_dir("features", faid)
    try:
        fman = read_manifest(fdir)
    except StoreError:
        fman = None
    index, device = to_device(cpu, gpu)
    set_nprobe(index, nprobe or m.get("nprobe"))
    stale = stale_message(m, fman)
    if stale:
        log.warning(stale)
    return OpenIndex(s, aid, adir, m, cpu, index, device, idmap, faid, fdir, fman, stale)


# ------------------------------------------------------------------------------------------------ query vectors


def _row_for_id(oi: OpenIndex, image_id: str) -> int:
    ids = oi.idmap["image_id"]
    hit = oi.idmap.index[ids == image_id]
    if not len(hit) and len(image_id) >= 8:
        hit = oi.idmap.index[ids.str.startswith(image_id)]
        if len(set(ids[hit])) > 1:
            raise UsageError(f"image_id prefix {image_id!r} matches {len(set(ids[hit]))} images; give more digits")
    if not len(hit):
        hint = f" ({oi.stale})" if oi.stale else ""
        raise UsageError(f"unknown image_id {image_id!r}: not in index {oi.artefact_id} ({len(oi.idmap)} images){hint}. "
                         "Pass a stored image_id (sha256 of the file), --path, or --image FILE for a new image")
    return int(oi.idmap.at[int(hit[0]), "row"])


def _row_for_path(oi: OpenIndex, path: str) -> int:
    root = Path(oi.manifest["source"].get("dataset_root") or ".")
    candidates = [path]
    p = Path(path)
    if p.is_absolute():
        for a, b in ((p, root), (p.resolve(), root.resolve())):
            try:
                candidates.append(a.relative_to(b).as_posix())
            except ValueError:
                continue
    paths = oi.idmap["path"]
    for c in candidates:
        hit = oi.idmap.index[paths == c]
        if len(hit):
            return int(oi.idmap.at[int(hit[0]), "row"])
    hint = f" ({oi.stale})" if oi.stale else ""
    raise UsageError(f"path {path!r} is not in index {oi.artefact_id} (paths are relative to {root}){hint}; "
                     "pass a stored path, or --image FILE to embed a new image")


def _vector_for_row(oi: OpenIndex, row: int) -> np.ndarray:
    """The raw (unprepared) vector of index row ``row``, ``(1, D) float32``."""
    if exact_vectors(oi.cpu_index):  # Flat, the approximate index's exact refine store, IVF-Flat
        try:
            return oi.cpu_index.reconstruct(int(row)).reshape(1, -1).astype(np.float32)
        except RuntimeError:
            pass
    path = oi.idmap.at[int(row), "path"]
    if oi.space == "pixel":
        where = stored_image_location(oi.manifest["source"]["dataset_root"], path)
        try:
            return load_pixel_vector(where, int(oi.manifest.get("pixel_size") or 32)).reshape(1, -1)
        except RejectedImage as exc:
            raise UsageError(f"cannot read {where} to query the pixel index: {exc}") from None
    if oi.fmanifest is None:
        raise StoreError(f"feature artefact {oi.features_id} is gone; cannot look up the query vector")
    for meta, feats in iter_feature_batches(oi.fdir, oi.fmanifest):
        hit = np.flatnonzero(meta["path"].to_numpy() == path)
        if len(hit):
            return feats[hit[:1]]
    raise StoreError(f"{path} is in the index but no longer in features {oi.features_id}; run `convlens index` to update it")


def embed_image_file(oi: OpenIndex, file: str | Path, weights: str | None = None, device: str = "auto",
                     model: str | None = None) -> np.ndarray:
    """Embed a new image file into the index's space: ``(1, D) float32`` (raw, unprepared).

    Feature space uses the feature artefact's model, layer, pooling and preprocessing; the model is rebuilt by
    :func:`tasks.core.models.load_model_from_manifest`: a factory / TorchScript model only when the user names it
    (``model``, the ``--model`` flag, or their trust file), a weights file from its recorded path or ``weights``,
    checked by sha256. Raises ``ValueError`` (:class:`UsageError`) when the file is not a decodable image, the
    model is not allowed or the weights do not match.
    """
    file = Path(file)
    try:
        img = decode_image(read_file_bytes(file, DecodeLimits()), file.name, DecodeLimits(strict_extension=False))
    except RejectedImage as exc:
        raise UsageError(f"--image {file} is not a usable image ({exc}); pass a JPEG/PNG/BMP/GIF/WebP/TIFF file") from None
    if oi.space == "pixel":
        return pixel_vector(img, int(oi.manifest.get("pixel_size") or 32)).reshape(1, -1)
    if oi.fmanifest is None:
        raise StoreError(f"feature artefact {oi.features_id} is gone; cannot rebuild its model to embed {file}")
    from tasks.core.forward import embed_images
    from tasks.core.hooks import LayerRef
    from tasks.core.models import Preprocess, load_model_from_manifest

    lm = load_model_from_manifest(oi.fmanifest["model"], user_model=model, user_weights=weights, artefact=oi.features_id)
    pre = oi.fmanifest.get("preprocessing")
    if pre:
        lm = replace(lm, preprocess=Preprocess(int(pre["resize"]), int(pre["crop"]), tuple(pre["mean"]), tuple(pre["std"]),
                                               pre.get("interpolation", "bilinear")))
    layer = oi.fmanifest["layer"]
    ref = LayerRef(layer["alias"], layer["name"], layer.get("side", "output"))
    return embed_images(lm, [img], ref, oi.fmanifest.get("pool", "avg"), device,
                        oi.fmanifest.get("precision", "auto"))


def query_vectors(oi: OpenIndex, vecs: np.ndarray, k: int, exclude_rows: list[int] | None = None) -> list[pd.DataFrame]:
    """Top-``k`` neighbours of each raw query vector ``(Q, D)``; one result DataFrame per query."""
    if k < 1:
        raise UsageError(f"-k must be >= 1, got {k}")
    exclude = set(exclude_rows or [])
    kk = min(int(oi.index.ntotal), k + len(exclude))
    if vecs.shape[1] != oi.index.d:
        raise UsageError(f"query vectors are {vecs.shape[1]}-d but index {oi.artefact_id} is {oi.index.d}-d")
    idx, dist = search_index(oi.index, prepare_vectors(vecs, oi.metric), kk, oi.metric)
    out = []
    for i_row, d_row in zip(idx, dist):
        keep = [(int(i), float(d)) for i, d in zip(i_row, d_row) if i >= 0 and int(i) not in exclude][:k]
        rows = [r for r, _ in keep]
        df = oi.idmap.iloc[rows][["row", "image_id", "path", "label", "split"]].reset_index(drop=True)
        df.insert(0, "rank", np.arange(1, len(df) + 1, dtype=np.int32))
        df["distance"] = np.array([d for _, d in keep], np.float32)
        df["similarity"] = (1.0 - df["distance"]) if oi.metric == "cosine" else np.nan
        out.append(df[list(RESULT_COLUMNS)])
    return out


def neighbors(store: str, *, image_id: str | None = None, path: str | None = None, image: str | None = None,
              k: int = 10, space: str = "feature", index_id: str | None = None, artefact: str | None = None,
              gpu: str = "auto", nprobe: int | None = None, weights: str | None = None,
              model: str | None = None) -> pd.DataFrame:
    """The ``k`` nearest stored images to one query (exactly one of ``image_id``, ``path``, ``image``).

    A stored query image is not its own neighbour (other paths with identical bytes are, at distance 0).
    Returns a DataFrame with :data:`RESULT_COLUMNS`; ``df.attrs`` holds ``index``, ``space``, ``metric``,
    ``query`` and ``stale`` (a message, or None when the index is current). ``weights`` / ``model``: the user's
    ``--weights`` / ``--model`` for an ``image`` query (:func:`embed_image_file`).
    """
    given = [x for x in (image_id, path, image) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of --id IMAGE_ID, --path P or --image FILE")
    oi = open_index(store, space, index_id, artefact, gpu, nprobe)
    exclude: list[int] = []
    if image:
        vec = embed_image_file(oi, image, weights, model=model)
        query = {"image": str(image)}
    else:
        row = _row_for_id(oi, image_id) if image_id else _row_for_path(oi, path)  # type: ignore[arg-type]
        vec = _vector_for_row(oi, row)
        exclude = [row]
        query = {"image_id": oi.idmap.at[row, "image_id"], "path": oi.idmap.at[row, "path"],
                 "label": oi.idmap.at[row, "label"], "split": oi.idmap.at[row, "split"]}
    df = query_vectors(oi, vec, k, exclude)[0]
    df.attrs.update({"index": oi.artefact_id, "space": oi.space, "metric": oi.metric, "query": query,
                     "stale": oi.stale, "device": oi.device, "features": oi.features_id})
    return df


# ------------------------------------------------------------------------------------------------- kNN graph


def _iter_index_vectors(oi: OpenIndex, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(index rows, raw vectors)`` covering every index row. Memory O(block x D): reconstructed from an
    index that stores exact vectors, else streamed from the feature parts (or the images, in pixel space)."""
    n = int(oi.cpu_index.ntotal)
    if exact_vectors(oi.cpu_index):
        try:
            for start in range(0, n, block):
                m = min(block, n - start)
                yield np.arange(start, start + m), oi.cpu_index.reconstruct_n(start, m)
            return
        except RuntimeError:
            pass
    if oi.space == "feature":
        if oi.fmanifest is None:
            raise StoreError(f"feature artefact {oi.features_id} is gone; cannot compute the kNN graph of a non-flat index")
        row_of = dict(zip(oi.idmap["path"], oi.idmap["row"]))
        for meta, feats in iter_feature_batches(oi.fdir, oi.fmanifest, block):
            rows = meta["path"].map(row_of)
            ok = rows.notna().to_numpy()
            if ok.any():
                yield rows[ok].astype(np.int64).to_numpy(), feats[ok]
        return
    from tasks.core.pixels import pixel_vectors

    root = oi.manifest["source"]["dataset_root"]
    size = int(oi.manifest.get("pixel_size") or 32)
    for start in range(0, n, block):
        sub = oi.idmap.iloc[start:start + block]
        vecs, ok, _ = pixel_vectors(root, sub["path"].tolist(), size)
        yield sub["row"].to_numpy()[ok], vecs


def knn_graph(store: str, k: int = 10, space: str = "feature", index_id: str | None = None,
              artefact: str | None = None, gpu: str = "auto", nprobe: int | None = None,
              block: int = 4096, progress: bool = False, metric: str | None = None) -> dict[str, Any]:
    """Write the all-rows kNN graph (self excluded) of an index as a file of the index artefact.

    Columns: ``row, image_id, path, rank (1-based), neighbor_row, neighbor_id, neighbor_path, distance``. The
    index manifest is republished with the file (role ``knn``, ``k``) and ``knn_graphs[str(k)]`` (which also says
    whether the graph is ``exact`` and, when not, the ``factory`` / ``nprobe`` / ``k_factor`` it came from). The
    graph is as exact as the index: a ``Flat`` index gives the exact graph (O(N^2 D) work), the approximate index
    (``IVF…,PQ…x4fs,RFlat``, chosen by ``--factory auto`` above its row threshold) an approximate candidate set
    with exact distances. Query vectors stream block by block (reconstructed from the index when it stores exact
    vectors, else read from the feature parts) and the rows stream into the Parquet file: memory O(block x (D +
    k)) beyond the index and the id map. Returns ``{"index", "k", "rows", "file", "seconds", "stale", ...}``.
    """
    if k < 1:
        raise UsageError(f"-k must be >= 1, got {k}")
    t0 = time.perf_counter()
    oi = open_index(store, space, index_id, artefact, gpu, nprobe, metric)
    n = int(oi.cpu_index.ntotal)
    if n < 2:
        raise UsageError(f"index {oi.artefact_id} holds {n} image(s); a kNN graph needs at least 2")
    k_eff = min(k, n - 1)
    ids = oi.idmap["image_id"].to_numpy(dtype=object)
    paths = oi.idmap["path"].to_numpy(dtype=object)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="kNN graph", unit="img", dynamic_ncols=True)
    with artefact_lock(oi.adir):
        current = read_manifest(oi.adir)
        if current.get("index_sha256") != oi.manifest.get("index_sha256"):
            raise StoreError(f"index {oi.artefact_id} was rebuilt while the kNN graph was starting; rerun")
        writer = KnnGraphWriter(oi.adir, k_eff)
        try:
            for rows, vecs in _iter_index_vectors(oi, block):
                idx, dist = search_index(oi.index, prepare_vectors(vecs, oi.metric), min(n, k_eff + 1), oi.metric)
                not_self = idx != rows[:, None]
                order = np.argsort(~not_self, axis=1, kind="stable")[:, :k_eff]
                idx = np.take_along_axis(idx, order, axis=1)
                dist = np.take_along_axis(dist, order, axis=1)
                valid = idx >= 0
                q = np.repeat(rows, k_eff).reshape(len(rows), k_eff)[valid]
                nb = idx[valid]
                writer.add({
                    "row": q, "image_id": ids[q], "path": paths[q],
                    "rank": np.tile(np.arange(1, k_eff + 1, dtype=np.int32), (len(rows), 1))[valid],
                    "neighbor_row": nb, "neighbor_id": ids[nb], "neighbor_path": paths[nb],
                    "distance": dist[valid].astype(np.float32),
                })
                if bar is not None:
                    bar.update(len(rows))
            entry = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        files = [e for e in current.get("files", []) if not (e.get("role") == "knn" and int(e.get("k", -1)) == k_eff)]
        graphs = dict(current.get("knn_graphs", {}))
        info = {"file": entry["name"], "k": k_eff, "rows": entry["rows"], "index_sha256": current.get("index_sha256"),
                "seconds": round(time.perf_counter() - t0, 3), "device": oi.device,
                "nprobe": nprobe or current.get("nprobe"), "factory": current.get("factory"),
                "exact": bool(current.get("exact", current.get("index_kind") == "flat")),
                "k_factor": current.get("k_factor")}
        graphs[str(k_eff)] = info
        publish_index_manifest(oi.adir, {**current, "files": files + [entry], "knn_graphs": graphs})
    return {"index": oi.artefact_id, "stale": oi.stale, **info}


GRAPH_EDGE_COLUMNS = ("row", "rank", "neighbor_row", "distance")
"""The numeric columns of a kNN graph (24 B per edge): what the dataset audit reads; ids and paths are in the id map."""


def ensure_knn_graph(store: str, k: int = 10, space: str = "feature", index_id: str | None = None,
                     artefact: str | None = None, gpu: str = "auto", metric: str | None = None,
                     columns: tuple[str, ...] | None = GRAPH_EDGE_COLUMNS) -> tuple[str, dict[str, Any], pd.DataFrame]:
    """The stored kNN graph with at least ``k`` neighbours (built when missing). Returns (index id, manifest, graph).

    ``columns``: the graph columns to read (default :data:`GRAPH_EDGE_COLUMNS`: 1M rows x k=10 is ~240 MB instead
    of ~4 GB with the id and path strings of every edge; ``None`` reads all of :data:`storage.index_store.KNN_COLUMNS`)."""
    s = Store(store)
    aid, m = find_index(s, space, index_id, artefact, metric)
    adir = s.artefact_dir("indexes", aid)
    if not any(e.get("role") == "knn" and int(e.get("k", 0)) >= min(k, max(1, int(m.get("rows", 2)) - 1))
               for e in m.get("files", [])):
        knn_graph(store, k, space, aid, gpu=gpu)
        m = read_manifest(adir)
    g_k = min(k, max(1, int(m.get("rows", 2)) - 1))
    return aid, m, read_knn_graph(adir, m, g_k, columns)
