"""Render the model-review report: one self-contained, offline HTML file.

:func:`build_report` gathers every section from the store (sha256-verified), :func:`render_html` fills the
Jinja2 template (autoescape on) and :func:`write_report` writes the file atomically. Data for the interactive
parts is embedded as JSON in ``<script type="application/json">`` elements via :func:`reports.figures.safe_json`;
images are small JPEG/PNG data URIs; plotly.js is inlined from ``reports/static`` (vendored from the plotly
package). The page makes no network request (a Content-Security-Policy forbids any).

Memory: O(N x D) for the features (they are loaded once) + O(N x 768) bytes for the pixel-space vectors +
the embedded thumbnails (bounded by ``thumb_budget_bytes``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from reports.figures import PALETTE, clean_text, pca2, safe_json, thumbnail
from reports.scatter_data import encode_scatter, scatter_json
from reports.sections import core, per_image, stored
from reports.sections.attribution import attach_sanity, attribution_view, fmt_auc
from reports.sections.findings import findings_view
from reports.sections.neurons import attach_channel_viz, neuron_view
from reports.streamed import feature_knn, feature_rows, pixel_knn
from storage.artefacts import artefacts_of, features_source
from storage.atomic import atomic_write_bytes
from storage.errors import StoreError, UsageError
from storage.features import load_features, part_entries, read_meta, read_part
from storage.manifest import CODE_VERSION, read_manifest, safe_member, utc_now, verify_files
from storage.paths import Store

__all__ = ["ReportOptions", "build_report", "render_html", "write_report", "resolve_compare", "default_report_path"]

log = logging.getLogger(__name__)

MISSING = {
    "accuracy": "needs labels and a model with a classifier head (`convlens extract DATA` on a labelled folder)",
    "tsne_grid": "run `convlens project --store STORE --method tsne` (with the image grid) to create it",
    "audit": "run `convlens dataset-audit --store STORE` to find duplicates, leaks, label errors and outliers",
    "attribution": "run `convlens audit --store STORE` to compute occlusion / saliency / Grad-CAM galleries",
    "neurons": "run `convlens neurons ... --store STORE` (filters, max-activating patches, class visualisation, ...)",
    "drift": "pass `--compare PREVIOUS` (a features artefact id, a store path or an artefact folder)",
    "images": "the feature artefact has no rows",
}


@dataclass
class ReportOptions:
    """Knobs of the report. Sizes in pixels / bytes."""

    thumb_px: int = 64                   # max side of embedded thumbnails
    thumb_quality: int = 70              # JPEG quality of thumbnails
    thumb_budget_bytes: int = 12_000_000  # total base64 bytes of thumbnails; sampled above it
    pixel_px: int = 16                   # pixel-space neighbour vectors are pixel_px^2 x 3
    k: int = 6                           # neighbours shown per clicked point
    examples: int = 6                    # example images per label / confusion
    max_neighbor_queries: int = 20_000   # points whose neighbours are embedded (others: sampled)
    max_points: int = 2_000_000          # points in the scatter (sampled above; binary payload, WebGL: scatter.js)
    workers: int = 4                     # decode threads for thumbnails
    seed: int = 0
    title: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


DECODE_ALL_WARN_ROWS = 20_000
"""Above this many rows a report without a stored pixel index says that it decodes every image, and what to do."""


def default_report_path(store: str | Path, fid: str) -> Path:
    return Store(store).kind_dir("reports") / f"report-{fid}.html"


def resolve_compare(store: Store, compare: str) -> tuple[str, dict[str, Any], Path]:
    """``--compare`` value -> (id, manifest, dir) of a features artefact.

    Accepts a features artefact id (or prefix) in ``store``, a path to another store (its newest features
    artefact) or a path to a features artefact folder.
    """
    p = Path(compare).expanduser()
    if p.is_dir():
        if (p / "manifest.json").is_file():
            m = read_manifest(p)
            if m.get("kind", "features") != "features":
                raise UsageError(f"--compare {compare}: {p} is a {m.get('kind')} artefact, not a features artefact")
            return p.name, m, p
        other = Store(p)
        aid, m = other.resolve("features", None)
        return aid, m, other.artefact_dir("features", aid)
    try:
        aid, m = store.resolve("features", compare)
    except StoreError as exc:
        raise UsageError(f"--compare {compare!r} is neither a features artefact id in {store.root} nor a folder: {exc}") from None
    return aid, m, store.artefact_dir("features", aid)


def _categories(fdir: Path, fman: dict[str, Any]) -> list[str] | None:
    entry = next((f for f in fman.get("files", []) if f.get("role") == "categories"), None)
    if entry is None:
        return None
    verify_files(fdir, {"files": [entry]})
    return [str(c) for c in json.loads(safe_member(fdir, entry["name"]).read_text("utf-8"))]


def _rejects(fdir: Path, fman: dict[str, Any]) -> pd.DataFrame:
    frames = [read_part(fdir, e).to_pandas() for e in part_entries(fman, "rejects")]
    if not frames:
        return pd.DataFrame(columns=["path", "reason", "detail"])
    return pd.concat(frames, ignore_index=True)


def _knn_rows(x: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Top-``k`` neighbours (row indices, self excluded) of ``x[queries]`` among all rows of ``x``. Exact FAISS."""
    from tasks.core.faiss_index import import_faiss, knn_search

    n = len(x)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((len(queries), 0), np.int64)
    if len(queries) == n:
        idx, _ = knn_search(x, k, metric=metric)
        return idx
    faiss = import_faiss()
    x = np.ascontiguousarray(x, np.float32)
    if metric == "cosine":
        x = x.copy()
        faiss.normalize_L2(x)
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), 4096):
        q = queries[s:s + 4096]
        _, i = index.search(x[q], k + 1)
        keep = i != q[:, None]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        out[s:s + len(q)] = np.take_along_axis(i, order, axis=1)
    return out


def _index_label(m: dict[str, Any]) -> str:
    """How exact a stored index's answers are, for the report's neighbour captions."""
    f = str(m.get("factory", "?"))
    if m.get("exact"):
        return f"exact, {f}"
    return f"approximate: {f}" + (" candidates, exact re-rank" if f.replace(" ", "").endswith(",RFlat") else "")


def _fresh_indexes(store: Store, fid: str, fman: dict[str, Any], space: str) -> list[tuple[str, dict[str, Any], Path]]:
    """Published ``space`` indexes of ``fid`` built from these very features (same ``created``): exact ones first,
    then the newest."""
    return [(aid, m, adir) for aid, m, adir in sorted(artefacts_of(store, "index", fid), key=lambda t: not t[1].get("exact"))
            if m.get("space", "feature") == space and (m.get("source") or {}).get("created") == fman.get("created")]


def _table_neighbours(hits: np.ndarray, to_table: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Index search hits ``(Q, >k)`` -> the first ``k`` feature-table rows per query: FAISS rows mapped through
    ``to_table``, the query itself and rows the table no longer has dropped, ``-1`` where fewer remain."""
    t = np.where(hits >= 0, to_table[np.maximum(hits, 0)], -1)
    t = np.where(t == queries[:, None], -1, t)
    order = np.argsort(t < 0, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(t, order, axis=1)


def _stored_index_knn(store: Store, fid: str, fman: dict[str, Any], fdir: Path, path_rows: dict[str, int],
                      queries: np.ndarray, k: int) -> tuple[np.ndarray, str] | None:
    """Feature-space neighbours of ``queries`` searched in a published cosine feature index of ``fid`` that is up
    to date with it (built from the same ``created``, every row), its rows mapped to feature-table rows through its
    id map. ``Flat`` / ``RFlat`` files are searched with their vectors read as a stream
    (:func:`tasks.core.faiss_files.search_file`), others through a read-only map of the file. A million-row table's exact search costs minutes
    (20k queries x 1M x 512: ~400 s on 2 cores), the index a few seconds. Returns ``((len(queries), k) rows,
    label)`` or None when no such index answers every query with ``k`` neighbours."""
    from storage.index_store import index_file_path
    from tasks.core.faiss_files import search_file
    from tasks.core.faiss_index import import_faiss, read_index_file

    n = len(path_rows)
    kk = min(k, n - 1)
    q = None
    for aid, m, adir in _fresh_indexes(store, fid, fman, "feature"):
        if m.get("metric") != "cosine" or int(m.get("rows") or 0) != n:
            continue
        try:
            path = index_file_path(adir, m)
            to_table = _index_to_table(adir, m, path_rows)
        except (StoreError, ValueError, RuntimeError) as exc:
            log.warning("cannot use the index %s: %s", aid, exc)
            continue
        if q is None:  # read once, whichever index answers
            q = feature_rows(fdir, fman, queries)
            import_faiss().normalize_L2(q)
        try:  # Flat / RFlat (the auto factories): the stored vectors streamed, not mapped (2 GB at 1M x 512)
            _, i = search_file(path, q, kk + 1)
        except ValueError:  # another factory: FAISS's own search of the mapped file
            _, i = read_index_file(path, mmap=True).search(q, kk + 1)
        out = _table_neighbours(i, to_table, queries, kk)
        if (out < 0).any():
            log.warning("index %s does not answer every query with %d neighbours; computing them instead", aid, kk)
            continue
        log.info("feature neighbours searched in the stored index %s", aid)
        return out, f"stored index ({_index_label(m)})"
    return None


def _pixel_index(store: Store, fid: str, fman: dict[str, Any]) -> tuple[str, dict[str, Any], Path] | None:
    """A published pixel-space index of ``fid`` up to date with it (same ``created``) whose stored vectors can be
    read back (``Flat`` or ``…,RFlat``, the ``auto`` factories), exact first; else None."""
    for aid, m, adir in _fresh_indexes(store, fid, fman, "pixel"):
        f = str(m.get("factory", "")).replace(" ", "")
        if f == "Flat" or f.endswith(",RFlat"):
            return aid, m, adir
    return None


def _stored_pixel_knn(found: tuple[str, dict[str, Any], Path], path_rows: dict[str, int], queries: np.ndarray,
                      k: int) -> tuple[np.ndarray, str] | None:
    """Pixel-space neighbours of ``queries`` from a stored pixel index (:func:`_pixel_index`): each query's own
    stored pixel vector searched in the file with the vectors read as a stream. A query the index does not hold
    (its image did not decode when the index was built) gets none (``-1``). Returns ``(rows, caption)``, or None
    when the index cannot be read."""
    from storage.index_store import index_file_path
    from tasks.core.faiss_files import read_vectors, search_file

    aid, m, adir = found
    try:
        path = index_file_path(adir, m)
        to_table = _index_to_table(adir, m, path_rows)
    except (StoreError, ValueError) as exc:
        log.warning("cannot use the pixel index %s: %s", aid, exc)
        return None
    n = len(path_rows)
    to_index = np.full(n, -1, np.int64)
    to_index[to_table[to_table >= 0]] = np.flatnonzero(to_table >= 0)
    out = np.full((len(queries), k), -1, np.int64)
    held = np.flatnonzero(to_index[queries] >= 0)
    if len(held) and k > 0:
        q = read_vectors(path, to_index[queries[held]])
        _, i = search_file(path, q, k + 1)
        out[held] = _table_neighbours(i, to_table, queries[held], k)
    px = m.get("pixel_size") or "?"
    what = "L2" if m.get("metric") == "l2" else "cosine"
    log.info("pixel neighbours searched in the stored pixel index %s", aid)
    return out, f"stored pixel index: {what} on {px}×{px} RGB, {_index_label(m)}"


def _stored_knn(store: Store, fid: str, fman: dict[str, Any], path_rows: dict[str, int], queries: np.ndarray,
                k: int) -> tuple[np.ndarray, str] | None:
    """Feature-space neighbours from a published kNN graph of a feature-space index built on ``fid`` and up to
    date with it (same ``created``).

    The graph is streamed a row group at a time, numeric columns only (``row, rank, neighbor_row``: the 10M edges
    of a 1M-row graph as pandas strings took 6.5 GB), keeping the queries' edges; FAISS rows are mapped to
    feature-table rows through the index's id map. Returns ``((len(queries), k) rows, label)``, or None when no
    graph covers every query with ``k`` neighbours.
    """
    import pyarrow.parquet as pq

    from storage.index_store import knn_graph_file

    n = len(path_rows)
    kk = min(k, n - 1)
    for aid, m, adir in _fresh_indexes(store, fid, fman, "feature"):
        if not any(e.get("role") == "knn" and int(e.get("k", 0)) >= kk for e in m.get("files", [])):
            continue
        try:
            path, _k = knn_graph_file(adir, m, kk)
            to_table = _index_to_table(adir, m, path_rows)
            pf = pq.ParquetFile(path)
        except (StoreError, ValueError, OSError) as exc:
            log.warning("cannot use the kNN graph of %s: %s", aid, exc)
            continue
        if not {"row", "rank", "neighbor_row"} <= set(pf.schema_arrow.names):
            continue
        to_table_rows = np.full(len(to_table), -1, np.int64)  # FAISS row -> position among the queries
        held = to_table >= 0
        qpos = np.full(n, -1, np.int64)
        qpos[queries] = np.arange(len(queries))
        to_table_rows[held] = qpos[to_table[held]]
        out = np.full((len(queries), kk), -1, np.int64)
        for batch in pf.iter_batches(batch_size=1 << 20, columns=["row", "rank", "neighbor_row"]):
            r = batch.column(0).to_numpy()
            rank = batch.column(1).to_numpy()
            nb = batch.column(2).to_numpy()
            ok = (r >= 0) & (r < len(to_table)) & (rank >= 1) & (rank <= kk) & (nb >= 0) & (nb < len(to_table))
            r, rank, nb = r[ok], rank[ok], nb[ok]
            at = to_table_rows[r]
            sel = at >= 0
            out[at[sel], rank[sel] - 1] = to_table[nb[sel]]
        if (out < 0).any():
            log.warning("kNN graph of %s does not cover every image (stale?); computing neighbours instead", aid)
            continue
        log.info("feature neighbours from the stored kNN graph of %s", aid)
        return out, f"stored kNN graph ({_index_label(m)})"
    return None


def _index_to_table(adir: Path, m: dict[str, Any], path_rows: dict[str, int]) -> np.ndarray:
    """``(index rows,) int64``: the feature-table row of each FAISS row of an index (by its id map's paths), -1
    for a row whose path the table no longer has."""
    from storage.index_store import read_idmap_table

    idmap = read_idmap_table(adir, m)
    rows = idmap.column("path").to_pandas().map(path_rows)
    ok = rows.notna().to_numpy()
    ids = idmap.column("row").to_numpy()
    to_table = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, np.int64)
    to_table[ids[ok]] = rows[ok].astype(np.int64).to_numpy()
    return to_table


def _decode_all(root: str | None, paths: list[str], order: np.ndarray, opts: ReportOptions, must: set[int],
                all_rows: bool = True) -> tuple[dict[int, str], np.ndarray | None, np.ndarray]:
    """Decode images (``root`` + ``paths[i]``) once in a thread pool: thumbnails within the byte budget and, with
    ``all_rows``, every image for its pixel vector (the report's own pixel-space search).

    ``order`` is the priority order of rows; rows in ``must`` always get a thumbnail. Without ``all_rows`` (a
    stored pixel index answers the pixel-space search) decoding stops once the budget is spent and every ``must``
    row is done: a thumbnail budget's worth of images, not every image of a million-row table. Returns
    ``(thumbs {row: data uri}, pixels (N, P) uint8 or None, has_pixels (N,) bool)``.
    """
    n = len(paths)
    pdim = opts.pixel_px * opts.pixel_px * 3
    pixels = np.zeros((n, pdim), np.uint8) if all_rows else None
    has = np.zeros(n, bool)
    thumbs: dict[int, str] = {}
    used = 0
    todo_must = len(must)
    budget_hit = False

    def work(i: int) -> tuple[int, str | None, np.ndarray | None]:
        uri, pix = thumbnail(root, paths[i], opts.thumb_px, opts.pixel_px, opts.thumb_quality)
        return i, uri, pix

    # in windows: ThreadPoolExecutor.map submits everything at once, and a million futures holding their results
    # were most of a 1M-row report's peak memory
    step = 4096 if all_rows else max(16, 4 * max(1, opts.workers))
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        for start in range(0, len(order), step):
            for i, uri, pix in pool.map(work, order[start:start + step].tolist()):
                todo_must -= i in must
                if pix is not None:
                    has[i] = True
                    if pixels is not None:
                        pixels[i] = pix
                if uri is not None and (i in must or used + len(uri) <= opts.thumb_budget_bytes):
                    thumbs[i] = uri
                    used += len(uri)
                elif uri is not None:
                    budget_hit = True
            if not all_rows and todo_must <= 0 and budget_hit:
                break
    return thumbs, pixels, has


def _colorings(meta: pd.DataFrame, names: list[str | None], acc: dict[str, Any], flags: dict[int, list[str]]
               ) -> dict[str, dict[str, Any]]:
    def encode(values: list[Any]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        cats = sorted(counts, key=lambda c: (-counts[c], c))
        pos = {c: i for i, c in enumerate(cats)}
        return {"cats": [clean_text(c) for c in cats], "counts": [counts[c] for c in cats], "idx": [pos[v] for v in values]}

    n = len(meta)
    out = {}
    if "label" in meta.columns:
        out["label"] = encode(["(none)" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in meta["label"]])
    if any(x is not None for x in names):
        out["prediction"] = encode(["(none)" if x is None else x for x in names])
    if "split" in meta.columns and meta["split"].notna().any():
        out["split"] = encode(["(none)" if v is None else str(v) for v in meta["split"]])
    if acc.get("mode") == "accuracy":
        corr = acc["correct"]
        out["correct"] = encode(["correct" if corr.get(i) else ("wrong" if i in corr else "(unlabelled)") for i in range(n)])
    if flags:
        out["audit flag"] = encode([",".join(sorted(flags[i])) if i in flags else "ok" for i in range(n)])
    return out


def _audit_flags(cards: list[dict[str, Any]], store: Store, fid: str, path_rows: dict[str, int]) -> dict[int, list[str]]:
    """Per-row audit flags from dataset-audit tables that have a ``path``/``row`` column and a flag column."""
    flags: dict[int, list[str]] = {}
    for aid, m, adir in artefacts_of(store, "dataset-audit", fid):
        for entry in m.get("files", []):
            if entry.get("role") != "findings":
                continue
            try:
                df = stored.read_verified_table(adir, entry)
            except StoreError:
                continue
            for rec in df.head(200_000).itertuples(index=False):
                d = rec._asdict()
                row = d.get("row")
                if row is None and isinstance(d.get("path"), str):
                    row = path_rows.get(d["path"])
                if row is None or not (0 <= int(row) < len(path_rows)):
                    continue
                flags.setdefault(int(row), [])
                f = str(d.get("finding"))
                if f not in flags[int(row)]:
                    flags[int(row)].append(f)
    return flags


def build_report(store: str | Path, features_id: str | None = None, compare: str | None = None,
                 options: ReportOptions | None = None) -> dict[str, Any]:
    """Gather everything the report shows; returns the template context (plain data, JSON strings for scripts).

    Raises :class:`StoreError` when the store has no features artefact (run ``convlens extract`` first) and
    :class:`ChecksumError` when a file of the feature artefact does not match its manifest.
    """
    opts = options or ReportOptions()
    t0 = time.perf_counter()
    s = Store(store)
    fid, fman = s.resolve("features", features_id)
    fdir = s.artefact_dir("features", fid)
    # the features themselves are streamed (reports/streamed.py) or loaded only where a section needs them all
    meta = read_meta(fdir, fman, verify=True)
    n = len(meta)
    loaded: list[np.ndarray] = []

    def all_feats() -> np.ndarray:
        """(N, D) float32, loaded once on first use (drift, the PCA fallback). Memory O(N x D)."""
        if not loaded:
            loaded.append(load_features(fdir, fman, verify=False)[1])
        return loaded[0]

    categories = _categories(fdir, fman)
    rejects = _rejects(fdir, fman)
    root = fman.get("dataset_root")
    paths_text = [str(p) for p in meta["path"]]
    path_rows = {p: i for i, p in enumerate(paths_text)}
    needed: set[int] = set()
    timings: dict[str, float] = {}

    summary = core.run_summary(fid, fman, rejects)
    acc = core.accuracy_section(meta, categories, max_examples=opts.examples, seed=opts.seed)
    names = core.top1_names(meta, categories)
    for key in ("confusions", "per_label"):
        for item in acc.get(key, []):
            needed.update(item["examples"])
    timings["summary+accuracy"] = time.perf_counter() - t0

    # other stages' artefacts
    t1 = time.perf_counter()
    maps = stored.maps_data(s, fid, n)
    audit_cards = _views(s, "dataset-audit", fid, path_rows, needed, findings_view)
    attr_cards = _views(s, "attribution", fid, path_rows, needed, attribution_view)
    _sort_attribution([c for c in attr_cards if c["view"] == "card"])
    attach_sanity(attr_cards, s)  # the model-randomisation verdicts (tasks/attribution/sanity.py)
    arch = (fman.get("model") or {}).get("arch")
    neuron_cards = _views(s, "neurons", fid, path_rows, needed, neuron_view, include_unrelated=True, limit=40,
                          select=lambda m: _same_model(m, fid, arch))
    neuron_cards.sort(key=lambda c: c.get("order", 99))
    attach_channel_viz(neuron_cards)  # each channel's visualisation beside its max-activating patches
    flags = _audit_flags(audit_cards, s, fid, path_rows)
    timings["stored artefacts"] = time.perf_counter() - t1

    # drift
    drift: dict[str, Any] = {"present": False}
    prev_info = None
    if compare:
        t2 = time.perf_counter()
        pid, pman, pdir = resolve_compare(s, compare)
        pmeta, pfeats = load_features(pdir, pman, verify=True)
        drift = core.drift_section((fid, fman, meta, all_feats()), (pid, pman, pmeta, pfeats), categories,
                                   _categories(pdir, pman), seed=opts.seed)
        needed.update(drift["new_examples"])
        needed.update(c["row"] for c in drift["changed"])
        drift["findings"] = core.findings_drift(core.current_findings(s, fid), core.previous_findings(s, pid, pdir), meta)
        needed.update(core.drift_rows(drift))
        prev_info = pid
        timings["drift"] = time.perf_counter() - t2

    # one row per image, every finding joined; stored as an image-table artefact (reports/sections/per_image.py)
    t6 = time.perf_counter()
    images = per_image.report_view(s, fid, fman, meta, categories, drift, needed)
    timings["per-image table"] = time.perf_counter() - t6

    # scatter points (sampled above max_points)
    rng = np.random.default_rng(opts.seed)
    if n > opts.max_points:
        shown = np.sort(rng.choice(n, opts.max_points, replace=False))
    else:
        shown = np.arange(n)
    projections = dict(maps["projections"])
    if not projections and n:
        t3 = time.perf_counter()
        projections["PCA (computed for this report)"] = pca2(all_feats(), seed=opts.seed)
        timings["pca2"] = time.perf_counter() - t3

    # thumbnails + pixel vectors (one decode per image), needed rows first
    t4 = time.perf_counter()
    order = np.r_[np.array(sorted(needed), np.int64), rng.permutation(n)]
    _, first = np.unique(order, return_index=True)
    order = order[np.sort(first)]
    # a stored pixel index up to date with the features answers the pixel-space search: decode a thumbnail
    # budget's worth of images then, not every image (a million decodes per report)
    pix_index = _pixel_index(s, fid, fman) if opts.k > 0 and n > 1 else None
    if pix_index is None and n > DECODE_ALL_WARN_ROWS:
        log.warning("no pixel index is up to date with features %s: decoding all %d images for the pixel-space "
                    "neighbours. `convlens index --space pixel --artefact %s` builds one (the nightly flow keeps it "
                    "updated); later reports then decode only their thumbnails", fid, n, fid)
    thumbs, pixels, has_pix = _decode_all(root, paths_text, order, opts, needed, all_rows=pix_index is None)
    timings["thumbnails"] = time.perf_counter() - t4

    # neighbours: feature space (stored kNN graph or exact FAISS) and pixel space (exact L2 on pixel vectors)
    t5 = time.perf_counter()
    thumbed = np.array(sorted(thumbs), np.int64)
    if n <= opts.max_neighbor_queries:
        queries = np.arange(n)
    else:
        queries = thumbed[:opts.max_neighbor_queries] if len(thumbed) else rng.choice(n, opts.max_neighbor_queries, replace=False)
        queries = np.sort(queries)
    k = min(opts.k, max(n - 1, 0))
    nbr_feat = nbr_pix = np.zeros((len(queries), 0), np.int64)
    knn_source = "none"
    pix_source = "exact L2 on 16×16 RGB thumbnails"
    if k > 0:
        # a stored kNN graph, else a stored index up to date with these features, else an exact streamed search
        stored_nb = _stored_knn(s, fid, fman, path_rows, queries, k) or _stored_index_knn(s, fid, fman, fdir, path_rows, queries, k)
        if stored_nb is not None:
            nbr_feat, knn_source = stored_nb
        else:
            nbr_feat, knn_source = feature_knn(fdir, fman, queries, k), "exact cosine kNN (FAISS, computed for this report)"
        stored_pix = _stored_pixel_knn(pix_index, path_rows, queries, k) if pix_index is not None else None
        if stored_pix is not None:
            nbr_pix, pix_source = stored_pix
        else:
            if pixels is None:  # the pixel index could not be read after all: decode every image
                _, pixels, has_pix = _decode_all(root, paths_text, order, opts, needed)
            nbr_pix = pixel_knn(pixels, has_pix, queries, k)  # unreadable images never appear as neighbours
    timings["neighbours"] = time.perf_counter() - t5

    colorings = _colorings(meta, names, acc, flags)
    labels_txt = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else clean_text(v) for v in meta["label"]]
    # every shown point as uint16 coordinates + uint8 colour codes, drawn by static/scatter.js (reports/scatter_data.py)
    scatter = encode_scatter(projections, colorings, shown if len(shown) < n else None)
    points = {
        "n": int(n), "shown": shown.tolist() if len(shown) < n else None, "bin": True,
        "proj": {name: None for name in projections},
        "color": {name: {"cats": c["cats"], "counts": c["counts"]} for name, c in colorings.items()},
        "palette": list(PALETTE),
        "q": queries.tolist(), "k": int(nbr_feat.shape[1]) if nbr_feat.ndim == 2 else 0,
        "nf": nbr_feat.reshape(-1).tolist(), "np": nbr_pix.reshape(-1).tolist(), "knn_source": knn_source,
        "pix_source": pix_source,
    }
    sections = _sections(summary, acc, maps, audit_cards, attr_cards, neuron_cards, drift, flags, images)
    timings["total"] = time.perf_counter() - t0
    return {
        "title": clean_text(opts.title or f"convlens model review — {fid}"),
        "fid": clean_text(fid), "generated": utc_now(), "code_version": CODE_VERSION,
        "compare": clean_text(prev_info) if prev_info else None,
        "sections": sections, "summary": summary, "acc": acc, "maps": maps, "audit_cards": audit_cards,
        "attr_cards": attr_cards, "neuron_cards": neuron_cards, "drift": drift, "missing": MISSING, "images": images,
        "n_points": int(n), "n_shown": int(len(shown)), "n_thumbs": len(thumbs), "n_queries": int(len(queries)),
        "knn_source": knn_source,
        "points_json": safe_json(points),
        # every point's path, label and prediction: a script element of its own that the page parses on first use
        # (hover, a gallery caption), after the map's first paint (~45 MB of JSON at 1M points)
        "points_text_json": safe_json({"path": [clean_text(p) for p in paths_text], "label": labels_txt,
                                       "pred": [clean_text(x) if x is not None else "" for x in names]}),
        "scatter_json": scatter_json(scatter),
        "thumbs_json": safe_json({str(i): u for i, u in thumbs.items()}),
        "timings": {k_: round(v, 3) for k_, v in timings.items()},
        "projections": list(projections),
    }


def _same_model(m: dict[str, Any], fid: str, arch: str | None) -> bool:
    if features_source(m) == fid:
        return True
    src = m.get("source") or {}
    return bool(arch) and isinstance(src, dict) and (src.get("model") or {}).get("arch") == arch


def _views(s: Store, kind: str, fid: str, path_rows: dict[str, int], needed: set[int], build: Callable[..., Any],
           **kw: Any) -> list[dict[str, Any]]:
    """Curated views (``build(aid, manifest, dir, path_rows, needed)``) of the artefacts of ``kind`` built from
    ``fid``; an artefact ``build`` does not understand (returns None) falls back to the generic card. Each item
    has ``view``: the builder's name without ``_view``, or ``card``."""
    out = []
    name = build.__name__.removesuffix("_view")
    seen: set[str] = set()
    for aid, m, adir in stored.artefacts_for(s, kind, fid, **kw):  # newest first
        if kind == "neurons":
            # A rerun of a technique after the features were republished makes a new artefact with the same
            # technique, parameters and model: show only the newest one.
            src = m.get("source") or {}
            same = json.dumps([m.get("technique"), m.get("params"), src.get("model") if isinstance(src, dict) else src],
                              sort_keys=True, default=str)
            if same in seen:
                continue
            seen.add(same)
        v = build(aid, m, adir, path_rows, needed)
        if v is None:
            v = dict(stored.artefact_card(aid, m, adir, path_rows, needed), view="card")
        else:
            v["view"] = name
        out.append(v)
    return out


def _sort_attribution(cards: list[dict[str, Any]]) -> None:
    """Worst-explained first: tables with a deletion/insertion AUC column are sorted in place."""
    for card in cards:
        for t in card["tables"]:
            cols = [c.lower() for c in t["cols"]]
            key = next((j for j, c in enumerate(cols) if "insertion" in c and "auc" in c), None)
            if key is None:
                continue

            def val(row: list[dict[str, Any]]) -> float:
                try:
                    return float(row[key]["text"])
                except ValueError:
                    return float("inf")

            t["rows"].sort(key=val)


def _sections(summary, acc, maps, audit_cards, attr_cards, neuron_cards, drift, flags, images) -> list[dict[str, Any]]:
    return [
        {"id": "summary", "title": "Run summary", "present": True},
        {"id": "accuracy", "title": "Accuracy" if acc.get("mode") != "distribution" else "Predictions per label",
         "present": bool(acc.get("present")), "missing": acc.get("why", "") + " — " + MISSING["accuracy"]},
        {"id": "map", "title": "Feature map", "present": True},
        {"id": "tsne_grid", "title": "t-SNE image grid", "present": bool(maps["grids"]), "missing": MISSING["tsne_grid"]},
        {"id": "audit", "title": "Dataset audit", "present": bool(audit_cards), "missing": MISSING["audit"]},
        {"id": "attribution", "title": "Attribution galleries", "present": bool(attr_cards), "missing": MISSING["attribution"]},
        {"id": "images", "title": "One row per image", "present": bool(images.get("present")), "missing": MISSING["images"]},
        {"id": "neurons", "title": "Inside the network", "present": bool(neuron_cards), "missing": MISSING["neurons"]},
        {"id": "drift", "title": "Drift vs previous run", "present": bool(drift.get("present")), "missing": MISSING["drift"]},
    ]


def _static(name: str) -> str:
    """A vendored asset from ``reports/static`` (plotly.min.js falls back to the installed plotly package)."""
    try:
        return resources.files("reports").joinpath("static", name).read_text("utf-8")
    except FileNotFoundError:
        if name == "plotly.min.js":
            try:
                return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_text("utf-8")
            except (ModuleNotFoundError, FileNotFoundError):
                pass
        raise StoreError(f"report asset {name} is missing from reports/static; reinstall convlens") from None


def _inline_js(text: str) -> str:
    # a literal "</script" inside inlined code would end the element early; "<\/" means the same in JS
    return text.replace("</script", "<\\/script").replace("<!--", "<\\!--")


def render_html(ctx: dict[str, Any]) -> str:
    """Fill ``reports/templates/report.html`` (Jinja2, autoescape on) with a :func:`build_report` context."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("reports", "templates"), autoescape=select_autoescape(["html"], default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * float(v):.1f}%"
    env.filters["num"] = lambda v, d=3: "—" if v is None else f"{float(v):.{d}f}"
    env.filters["auc"] = fmt_auc
    template = env.get_template("report.html")
    return template.render(
        **ctx,
        plotly_js=Markup(_inline_js(_static("plotly.min.js"))),
        report_js=Markup(_inline_js(_static("report.js"))),
        scatter_js=Markup(_inline_js(_static("scatter.js"))),
        scatter_script=Markup(ctx.get("scatter_json", "null")),
        report_css=Markup(_static("report.css").replace("</style", "<\\/style")),
        points_script=Markup(ctx["points_json"]),
        points_text_script=Markup(ctx["points_text_json"]),
        thumbs_script=Markup(ctx["thumbs_json"]),
    )


def write_report(store: str | Path, out: str | Path | None = None, features_id: str | None = None,
                 compare: str | None = None, options: ReportOptions | None = None) -> str:
    """Build and write the report for ``features_id`` (default: newest) of ``store``; returns its path.

    ``out`` defaults to ``<store>/reports/report-<features id>.html``. ``compare`` adds the drift section
    (a features artefact id, another store's path or an artefact folder). Written atomically.
    """
    t0 = time.perf_counter()
    ctx = build_report(store, features_id, compare, options)
    html = render_html(ctx)
    target = Path(out) if out else default_report_path(store, ctx["fid"])
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, html.encode("utf-8", "replace"))
    os.chmod(target, 0o644)  # a document to share, not a secret
    log.info("report %s written (%.1f MB, %d points, %d thumbnails) in %.1f s", target, target.stat().st_size / 1e6,
             ctx["n_points"], ctx["n_thumbs"], time.perf_counter() - t0)
    return str(target.absolute())
