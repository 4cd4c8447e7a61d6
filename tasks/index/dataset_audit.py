"""Dataset audits from the feature-space kNN graph: near-duplicates, train/test leakage, kNN label disagreement
(likely label errors) and outliers.

Inputs are the index's id map (``row, image_id, path, label, split``) and its kNN graph (``row, rank, neighbor_row,
distance``; cosine index, so ``similarity = 1 - distance``). Output is one findings table, columns
:data:`FINDING_COLUMNS`, one row per (finding, image):

- ``exact-duplicate``: rows sharing an ``image_id`` (identical bytes at several paths); ``cluster`` groups them,
  ``score`` = 1.0.
- ``near-duplicate``: pairs of images that are *the same picture* (re-encoded, resized, re-lit or slightly cropped
  copies), exact duplicates included, grouped into clusters by connected components (union-find); ``score`` = the
  feature cosine of the closest member, ``other_*`` = that member, ``detail`` = the evidence.
- ``leakage``: a near- or exact-duplicate pair whose two images lie in different (non-null) splits; one row per
  pair, ``score`` = feature cosine, ``image`` = the pair's non-train side when there is one.
- ``label-disagreement``: a labelled image whose label is not the similarity-weighted plurality of its labelled
  neighbours (cleanlab-style self-confidence ``p(given label)`` from the kNN vote); ``score`` = 1 - p(given),
  ``suggested_label`` = the plurality label.
- ``outlier``: an image whose distance to its k-th neighbour has a robust z-score (median / MAD) >= ``outlier_z``;
  ``score`` = that distance.

How "the same picture" is decided (``confirm="pixels"``, the default): a fixed feature-cosine threshold means
something different in every feature space (upscaled 8x8 digits sit at cosine 0.95-0.98 in MobileNetV2's
penultimate space; 50k distinct noise images under a random-weight ResNet-18 all sit above 0.95), so

1. *candidates* come from two places: kNN edges with feature cosine >= a threshold **calibrated per store**
   (:func:`calibrate_feature_threshold`: ``calibration_sample`` of the dataset's own images are re-encoded,
   resized, re-lit and cropped, embedded with the features' own model / layer / preprocessing, and the threshold
   is the lowest copy-to-original cosine), plus the images' nearest neighbours in a 16x16 grey pixel
   space (catches copies the model moves far, e.g. a re-lit digit under MobileNetV2);
2. each candidate pair is *confirmed* on the stored pixels by :mod:`tasks.index.near_copy` (aligned low-resolution
   match within each image's own self-copy tolerance), which does not depend on the model.

``confirm="none"`` (and an explicit ``dup_threshold``) gives the plain feature-threshold audit, for stores whose
images are not readable (e.g. synthetic features). The calibration and the counts of candidates / confirmed /
unverifiable pairs are recorded in the audit manifest (``calibration``).

``rank`` orders rows within a finding type (1 = most severe). Memory and work (N id-map rows, E = N x k graph
edges, U unique images): the findings are computed on NumPy arrays of the edges (label vote: one sort of the E
(row, label) keys, no dense N x labels matrix), with Python objects only per finding / candidate pair; the pixel
check keeps U grey thumbnails (4 KiB each) in memory up to :data:`~tasks.index.near_copy.SPILL_ROWS`, else in a temp
file under the store's ``cache/``, and U 16x16 vectors (1 KiB each); its 16x16 neighbour search is exact up to
:data:`~tasks.core.faiss_index.AUTO_EXACT_MAX_ROWS` images and the ``auto`` FAISS index (IVF-PQ + exact re-rank) above,
so no step is quadratic in N.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from storage.audits import FINDING_COLUMNS, FINDING_TYPES
from storage.errors import ConvlensError, UsageError

__all__ = ["AuditParams", "NearCopies", "audit_knn", "label_votes", "find_near_copies", "calibrate_feature_threshold",
           "summarise_findings", "run_dataset_audit", "audit_dataset", "summarise", "calibration_line"]

log = logging.getLogger(__name__)

CONFIRM_MODES = ("pixels", "none")
COPY_QUANTILE = 0.0  # feature threshold = this quantile of self-made copies' cosine to their original (0 = the lowest)


@dataclass
class AuditParams:
    """Thresholds of ``convlens audit-dataset``.

    ``dup_threshold``: feature cosine for duplicate candidates; ``None`` (default) calibrates it per store from
    self-made copies. ``confirm``: ``pixels`` (default) confirms every candidate pair on the stored images;
    ``none`` trusts the feature threshold alone (needs an explicit ``dup_threshold``).
    """

    k: int = 10
    dup_threshold: float | None = None  # cosine similarity; None = calibrated
    outlier_z: float = 3.5
    min_label_votes: int = 3  # labelled neighbours needed before a label is questioned
    confirm: str = "pixels"
    calibration_sample: int = 12  # images whose self-made copies calibrate the feature threshold

    def validate(self) -> None:
        if self.k < 1:
            raise UsageError(f"-k must be >= 1, got {self.k}")
        if self.dup_threshold is not None and not -1.0 <= self.dup_threshold <= 1.0:
            raise UsageError(f"--dup-threshold is a cosine similarity in [-1, 1], got {self.dup_threshold}")
        if self.min_label_votes < 1:
            raise UsageError("--min-label-votes must be >= 1")
        if self.confirm not in CONFIRM_MODES:
            raise UsageError(f"--confirm {self.confirm!r}: use one of {', '.join(CONFIRM_MODES)}")
        if self.confirm == "none" and self.dup_threshold is None:
            raise UsageError("--confirm none trusts the feature threshold alone: give it with --dup-threshold X")
        if self.calibration_sample < 1:
            raise UsageError(f"--calibration-sample must be >= 1, got {self.calibration_sample}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NearCopies:
    """Confirmed near-copy pairs of id-map rows ``(a < b) -> (feature cosine, evidence text)`` and the record of how
    they were found (goes into the manifest's ``calibration``)."""

    pairs: dict[tuple[int, int], tuple[float, str]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.p = np.arange(n)

    def find(self, a: int) -> int:
        p = self.p
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return int(a)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def _s(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else str(v)


class _Records:
    """Id-map rows as small dicts, made on demand: one per *finding* row, never one per image (at 1M rows
    ``idmap.to_dict("records")`` held ~0.5-1 GB of dicts). ``rec[r]`` -> ``{image_id, path, label, split}`` of row
    position ``r``."""

    _COLS = ("image_id", "path", "label", "split")

    def __init__(self, idmap: pd.DataFrame) -> None:
        self._cols = {c: idmap[c] for c in self._COLS if c in idmap.columns}

    def __getitem__(self, r: int | np.integer) -> dict[str, Any]:
        return {c: s.iat[int(r)] for c, s in self._cols.items()}


def _row(finding: str, score: float, me: dict, other: dict | None = None, cluster: int = -1,
         suggested: str | None = None, detail: str = "") -> dict[str, Any]:
    o = other or {}
    return {"finding": finding, "rank": 0, "score": float(score), "cluster": int(cluster),
            "image_id": me["image_id"], "path": me["path"], "label": _s(me.get("label")), "split": _s(me.get("split")),
            "other_image_id": o.get("image_id"), "other_path": o.get("path"), "other_label": _s(o.get("label")),
            "other_split": _s(o.get("split")), "suggested_label": suggested, "detail": detail}


def _id_codes(ids: pd.Series) -> np.ndarray:
    """``image_id`` column ``(N,)`` -> ``(N,) int64`` codes, equal codes = equal ids (a missing id is its own code)."""
    codes, uniq = pd.factorize(ids, sort=False)
    codes = np.asarray(codes, np.int64)
    missing = codes < 0
    if missing.any():
        codes = codes.copy()
        codes[missing] = len(uniq) + np.arange(int(missing.sum()))
    return codes


def _same_id_groups(codes: np.ndarray) -> list[np.ndarray]:
    """Rows that share a code, for codes held by >= 2 rows only: a list of ``(m,) int64`` sorted row arrays,
    ordered by first row. O(N) NumPy, Python work only per group."""
    if not len(codes):
        return []
    cnt = np.bincount(codes)
    rows = np.flatnonzero(cnt[codes] > 1)
    if not len(rows):
        return []
    rows = rows[np.argsort(codes[rows], kind="stable")]  # by code, rows ascending inside each code
    cuts = np.flatnonzero(np.diff(codes[rows])) + 1
    return sorted(np.split(rows.astype(np.int64), cuts), key=lambda r: int(r[0]))


def _edges(graph: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The graph's edges with ``rank <= k``: ``(row (E,) int64, neighbor_row (E,) int64, distance (E,) float32,
    similarity (E,) float64)``, as NumPy arrays (no filtered copy of the DataFrame when every edge qualifies)."""
    q = graph["row"].to_numpy(np.int64)
    nb = graph["neighbor_row"].to_numpy(np.int64)
    dist = graph["distance"].to_numpy()
    m = graph["rank"].to_numpy() <= k
    if not m.all():
        q, nb, dist = q[m], nb[m], dist[m]
    return q, nb, dist, 1.0 - dist.astype(np.float64)


def label_votes(q: np.ndarray, nb: np.ndarray, sim: np.ndarray, label_codes: np.ndarray, n_labels: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Similarity-weighted kNN label vote on the edge arrays, without a dense N x labels matrix.

    ``q``, ``nb`` ``(E,) int64`` rows of the edges, ``sim`` ``(E,) float64`` cosine similarity, ``label_codes``
    ``(N,) int64`` (-1 = no label; codes in sorted-label order), ``n_labels`` = number of codes. A vote is an edge
    between two labelled, different rows, weighted ``max(sim, 0) + 1e-6``. Returns, for the rows that got >= 1 vote
    (ascending), ``(rows (R,) int64, votes (R,) int64, p_given (R,) float64, top_code (R,) int64, p_top (R,)
    float64)``: ``p_*`` = share of the row's vote weight; ``top_code`` = the heaviest label (ties: the smallest
    code). Memory O(E) (one sort of the (row, label) keys); no Python loop.
    """
    ok = (label_codes[q] >= 0) & (label_codes[nb] >= 0) & (q != nb)
    qq = q[ok]
    w = np.clip(sim[ok], 0.0, None) + 1e-6
    if not len(qq):
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0), z, np.zeros(0)
    key = qq * np.int64(max(n_labels, 1)) + label_codes[nb[ok]]
    ukey, inv = np.unique(key, return_inverse=True)
    vsum = np.bincount(inv.ravel(), weights=w)  # weight per (row, label), rows then labels ascending
    uq, uc = ukey // max(n_labels, 1), ukey % max(n_labels, 1)
    rows, first = np.unique(uq, return_index=True)
    totals = np.add.reduceat(vsum, first)
    votes = np.bincount(qq)[rows]
    order = np.lexsort((uc, -vsum, uq))  # per row: heaviest first, smallest code on ties
    starts = np.searchsorted(uq[order], rows)
    top_code, top_w = uc[order][starts], vsum[order][starts]
    given = uc == label_codes[uq]
    g_w = np.zeros(len(rows))
    g_w[np.searchsorted(rows, uq[given])] = vsum[given]
    return rows, votes, g_w / totals, top_code, top_w / totals


def audit_knn(idmap: pd.DataFrame, graph: pd.DataFrame, params: AuditParams = AuditParams(),
              near: NearCopies | None = None) -> pd.DataFrame:
    """Findings (columns :data:`FINDING_COLUMNS`) from an id map and a cosine kNN graph (see module docstring).

    ``near``: the confirmed near-copy pairs (:func:`find_near_copies`); without it, near-duplicates are the kNN
    edges with cosine >= ``params.dup_threshold`` (which must then be given). Memory: O(N + E) NumPy arrays for N
    id-map rows and E graph edges (the label vote sorts one int64 key per edge); Python objects only per finding.
    """
    params.validate()
    if near is None and params.dup_threshold is None:
        raise UsageError("audit_knn without confirmed pairs needs an explicit dup_threshold")
    if not idmap["row"].is_monotonic_increasing:
        idmap = idmap.sort_values("row", kind="stable")
    n = len(idmap)
    if n and not (idmap["row"].to_numpy() == np.arange(n)).all():
        raise UsageError("id map rows must be 0..N-1")
    recs = _Records(idmap)
    q, nb, dist, sim = _edges(graph, params.k)
    out: list[dict[str, Any]] = []

    # exact duplicates: same bytes (image_id) at several paths
    pairs: dict[tuple[int, int], float] = {}
    evidence: dict[tuple[int, int], str] = {}
    codes = _id_codes(idmap["image_id"])
    for ci, rows in enumerate(_same_id_groups(codes)):
        for r in rows:
            other = rows[0] if r != rows[0] else rows[1]
            out.append(_row("exact-duplicate", 1.0, recs[r], recs[other], ci, detail=f"{len(rows)} paths with identical bytes"))
        for a in rows:
            for b in rows:
                if a < b:
                    pairs[(int(a), int(b))] = 1.0
                    evidence[(int(a), int(b))] = "identical bytes"

    # near duplicates: confirmed same-picture pairs (or kNN edges above a given threshold), plus exact pairs
    if near is not None:
        for key, (cos, why) in near.pairs.items():
            if key not in evidence:
                pairs[key] = float(cos)
                evidence[key] = why
    else:
        m = (sim >= float(params.dup_threshold)) & (q != nb)
        if m.any():  # best similarity per unordered pair in NumPy (pairs in order of first edge); Python per pair
            lo, hi, s_m = np.minimum(q[m], nb[m]), np.maximum(q[m], nb[m]), sim[m]
            key = lo * np.int64(max(n, 1)) + hi
            _, first, inv = np.unique(key, return_index=True, return_inverse=True)
            top = np.full(len(first), -np.inf)
            np.maximum.at(top, inv.ravel(), s_m)
            for j in np.argsort(first, kind="stable").tolist():
                a, b = int(lo[first[j]]), int(hi[first[j]])
                if (a, b) not in evidence or evidence[(a, b)] != "identical bytes":
                    pairs[(a, b)] = max(pairs.get((a, b), -1.0), float(top[j]))
                    evidence[(a, b)] = f"feature cosine {pairs[(a, b)]:.4f} >= {params.dup_threshold}"
    uf = _UnionFind(n)
    best: dict[int, tuple[float, int]] = {}
    for (a, b), s in pairs.items():
        uf.union(a, b)
        for x, y in ((a, b), (b, a)):
            if s > best.get(x, (-3.0, -1))[0]:
                best[x] = (s, y)
    comps: dict[int, list[int]] = {}
    for r in best:
        comps.setdefault(uf.find(r), []).append(r)
    split_of: dict[int, str | None] = {}

    def split(r: int) -> str | None:
        if r not in split_of:
            split_of[r] = _s(recs[r].get("split"))
        return split_of[r]

    for ci, root in enumerate(sorted(comps)):
        members = sorted(comps[root])
        for r in members:
            s, o = best[r]
            kind = "an exact" if codes[r] == codes[o] else "a near"
            out.append(_row("near-duplicate", s, recs[r], recs[o], ci,
                            detail=f"cluster of {len(members)}; closest member is {kind} duplicate "
                                   f"({evidence[(min(r, o), max(r, o))]})"))

    # leakage: duplicate pairs that cross splits
    leaked: set[int] = set()
    for (a, b), s in sorted(pairs.items(), key=lambda it: -it[1]):
        sa, sb = split(a), split(b)
        if sa and sb and sa != sb:
            (me_r, other_r) = (b, a) if sa == "train" else (a, b)
            me, other = recs[me_r], recs[other_r]
            leaked.add(me_r)
            if sb != "train" and sa != "train":
                leaked.add(other_r)  # val vs test: one row for the pair, not one more from the cluster pass
            out.append(_row("leakage", s, me, other, uf.find(a) if a in best else -1,
                            detail=f"{_s(me.get('split'))} image duplicates a {_s(other.get('split'))} image "
                                   f"({evidence[(a, b)]})"))
    # ... and a non-train image whose only cross-split copies are reached through its cluster (a copy of the same
    # picture that is itself a copy, e.g. two edits of one source filed in train and test)
    for root in sorted(comps):
        members = sorted(comps[root])
        for r in members:
            sr = split(r)
            if not sr or sr == "train" or r in leaked:
                continue
            others = [o for o in members if split(o) not in (None, sr)]
            if not others:
                continue
            o = min(others, key=lambda x: (split(x) != "train", x))
            leaked.add(r)
            out.append(_row("leakage", best[r][0], recs[r], recs[o], root,
                            detail=f"{sr} image is in a near-copy cluster of {len(members)} with a "
                                   f"{split(o)} image (linked through other copies of the same picture)"))

    # kNN label disagreement (cleanlab-style self-confidence from a similarity-weighted kNN vote), on the (N, k)
    # edge arrays: no dense N x labels matrix, no per-row pandas
    if "label" in idmap.columns:
        lcodes, luniq = pd.factorize(idmap["label"], sort=True)
        lcodes = np.asarray(lcodes, np.int64)
        if (lcodes >= 0).any():
            rows, votes, p_given, top, p_top = label_votes(q, nb, sim, lcodes, len(luniq))
            flag = (votes >= params.min_label_votes) & (top != lcodes[rows]) & (p_given < 0.5)
            for r, pg, t, pt, v in zip(rows[flag].tolist(), p_given[flag].tolist(), top[flag].tolist(),
                                       p_top[flag].tolist(), votes[flag].tolist()):
                name = str(luniq[t])
                out.append(_row("label-disagreement", 1.0 - pg, recs[r], cluster=-1, suggested=name,
                                detail=f"p(given)={pg:.3f}, p({name})={pt:.3f} over {int(v)} labelled neighbours"))

    # outliers: far from their k-th neighbour
    if len(q):
        kth = pd.Series(dist).groupby(q).max()
        med = float(kth.median())
        mad = float((kth - med).abs().median()) * 1.4826
        scale = mad if mad > 1e-12 else max(float(kth.std()), 1e-12)
        z = (kth - med) / scale
        for r, zz in z[z >= params.outlier_z].items():
            out.append(_row("outlier", float(kth[r]), recs[int(r)], detail=f"distance to neighbour k={params.k} is "
                            f"{float(kth[r]):.4f} (median {med:.4f}, robust z {float(zz):.1f})"))

    res = pd.DataFrame(out, columns=list(FINDING_COLUMNS))
    if len(res):
        res["_order"] = res["finding"].map({t: i for i, t in enumerate(FINDING_TYPES)})
        res = res.sort_values(["_order", "score", "path"], ascending=[True, False, True], kind="stable")
        res["rank"] = res.groupby("finding").cumcount() + 1
        res = res.drop(columns="_order").reset_index(drop=True)
    res["rank"] = res["rank"].astype(np.int32)
    res["score"] = res["score"].astype(np.float64)
    res["cluster"] = res["cluster"].astype(np.int64)
    return res


# ------------------------------------------------------------------------------------------------ near copies


def _unique_rows(idmap: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Rows by image: ``reps`` ``(U,) int64`` the first row of each image_id (ascending), ``rep_of`` ``(N,) int64``
    each row's first row, and ``{first row: (m,) int64 sorted rows}`` for the image_ids held by >= 2 rows only.
    O(N) NumPy; Python objects only per repeated image_id."""
    codes = _id_codes(idmap["image_id"])
    if not len(codes):
        z = np.zeros(0, np.int64)
        return z, z, {}
    _, first = np.unique(codes, return_index=True)  # first row of each code
    first = first.astype(np.int64)
    return np.sort(first), first[codes], {int(g[0]): g for g in _same_id_groups(codes)}


def calibrate_feature_threshold(fmanifest: dict[str, Any], root: str | None, idmap: pd.DataFrame, sample: int,
                                device: str = "cpu", seed: int = 0,
                                stored: Callable[[int], np.ndarray | None] | None = None) -> dict[str, Any]:
    """Where "same picture" lies in this store's feature space.

    ``sample`` distinct images (seeded choice) are opened, four near-copies of each are made
    (:func:`tasks.index.near_copy.self_copies`: JPEG q75, 0.9x resize, +-10 % brightness, 5 % crop), originals
    and copies are embedded with the feature artefact's own model, layer, pooling and preprocessing
    (:func:`tasks.core.forward.embed_images`), and the threshold is the :data:`COPY_QUANTILE` quantile of the
    copies' cosine to their original (0: the lowest; the pixel check, not this threshold, decides). Returns the
    record for the manifest (``threshold`` None with ``reason`` when the model cannot be rebuilt or no image can be
    opened). ``stored(row)`` gives an original's stored
    feature vector (then it is not re-embedded; a copy is compared with what the index holds). Cost: ``4 x sample``
    forward passes (``5 x`` without ``stored``).
    """
    from dataclasses import replace

    from tasks.core.forward import embed_images
    from tasks.core.hooks import LayerRef
    from tasks.core.images import RejectedImage, open_stored_image
    from tasks.core.models import Preprocess, load_model_from_manifest
    from tasks.index.near_copy import self_copies

    rec: dict[str, Any] = {"method": "self-copies", "quantile": COPY_QUANTILE, "threshold": None}
    reps = _unique_rows(idmap)[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(reps))
    originals, copies, owner, rows = [], [], [], []
    failed = 0
    for i in order:
        if len(originals) >= sample or failed >= 4 * sample:  # never one failed open per image of a big store
            break
        r = int(reps[i])
        try:
            img = open_stored_image(root, str(idmap.at[r, "path"]))
        except (RejectedImage, OSError, ValueError):
            failed += 1
            continue
        for _, c in self_copies(img, 7919 * (r + 1) + seed):
            copies.append(c)
            owner.append(len(originals))
        originals.append(img)
        rows.append(r)
    if not originals:
        rec["reason"] = "no stored image could be opened"
        return rec
    try:
        lm = load_model_from_manifest(fmanifest["model"], artefact=fmanifest.get("artefact_id"))
    except (ConvlensError, KeyError, OSError) as exc:
        rec["reason"] = f"the features' model cannot be rebuilt here ({exc})"
        return rec
    pre = fmanifest.get("preprocessing")
    if pre:
        lm = replace(lm, preprocess=Preprocess(int(pre["resize"]), int(pre["crop"]), tuple(pre["mean"]), tuple(pre["std"]),
                                               str(pre.get("interpolation", "bilinear"))))
    layer = fmanifest["layer"]
    ref = LayerRef(layer["alias"], layer["name"], layer.get("side", "output"))
    pool, precision = fmanifest.get("pool", "avg"), fmanifest.get("precision", "auto")
    kept = [stored(r) for r in rows] if stored is not None else [None] * len(rows)
    todo = [im for im, v in zip(originals, kept) if v is None] + copies
    feats = [embed_images(lm, todo[start:start + 64], ref, pool, device, precision) for start in range(0, len(todo), 64)]
    f = np.concatenate(feats).astype(np.float64)
    n_emb = len(todo) - len(copies)
    emb_o, fc = iter(f[:n_emb]), f[n_emb:]
    fo = np.stack([np.asarray(v, np.float64).ravel() if v is not None else next(emb_o) for v in kept])
    fo /= np.maximum(np.linalg.norm(fo, axis=1, keepdims=True), 1e-12)
    fc /= np.maximum(np.linalg.norm(fc, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("ij,ij->i", fc, fo[np.array(owner)])
    thr = float(np.quantile(cos, COPY_QUANTILE))
    rec.update(threshold=round(thr, 6), sample=len(originals), copies=len(copies),
               copy_cosine={"min": round(float(cos.min()), 6), "median": round(float(np.median(cos)), 6)},
               copy_cosine_by_transform={name: round(float(cos[j::4].min()), 6)
                                         for j, name in enumerate(("jpeg-q75", "resize-0.9", "brightness-10%", "crop-5%"))})
    rec["_copies"] = (originals, copies, owner, cos)
    return rec


def find_near_copies(idmap: pd.DataFrame, graph: pd.DataFrame, root: str | None, params: AuditParams,
                     feature_threshold: float | None, cosine: Callable[[int, int], float],
                     calibration: dict[str, Any] | None = None, *, pixel_exact_max_rows: int | None = None,
                     spill_dir: str | os.PathLike[str] | None = None, spill_rows: int | None = None) -> NearCopies:
    """Confirmed same-picture pairs of id-map rows (see the module docstring).

    Candidates: kNN edges (rank <= k) with cosine >= ``feature_threshold`` (every edge when None) whose unaligned
    16x16 grey correlation is >= :data:`~tasks.index.near_copy.PREFILTER`, plus each image's ``k`` nearest
    neighbours in that 16x16 space with correlation >= the same :data:`~tasks.index.near_copy.PREFILTER`. Each candidate
    is confirmed by :func:`tasks.index.near_copy.match` + :func:`~tasks.index.near_copy.is_near_copy` against both
    images' self-copy tolerance. ``cosine(a, b)`` gives the feature cosine of rows not joined by a kNN edge.
    Exact duplicates (same ``image_id``) are left to :func:`audit_knn`.

    The 16x16 neighbour search is exact (``Flat``) up to ``pixel_exact_max_rows`` structured images (default
    :data:`~tasks.core.faiss_index.AUTO_EXACT_MAX_ROWS`) and above it the ``auto`` FAISS index
    (:func:`~tasks.core.faiss_index.resolve_factory`: IVF-PQ fast-scan + exact re-rank), so no step is quadratic in
    N. Memory: U unique images' grey thumbnails (4 KiB each) in memory up to ``spill_rows`` (default
    :data:`~tasks.index.near_copy.SPILL_ROWS`), else in a temp file in ``spill_dir``; the 16x16 vectors (1 KiB each,
    held once: in memory on the exact path, as the index's re-rank store above it); O(N) int64 row maps; O(E)
    NumPy arrays for the E graph edges; Python objects per candidate pair only.
    """
    from tasks.core.faiss_index import AUTO_EXACT_MAX_ROWS
    from tasks.core.images import RejectedImage, open_stored_image
    from tasks.index import near_copy as nc

    exact_max = AUTO_EXACT_MAX_ROWS if pixel_exact_max_rows is None else int(pixel_exact_max_rows)
    if not idmap["row"].is_monotonic_increasing:
        idmap = idmap.sort_values("row", kind="stable")
    path_col = idmap["path"]
    reps, rep_of, multi = _unique_rows(idmap)
    n, u = len(idmap), len(reps)
    rep_paths = path_col.to_numpy(dtype=object)[reps]
    q, nb, _, sim = _edges(graph, params.k)
    keep = q != nb
    if feature_threshold is not None:
        keep &= sim >= feature_threshold
    q, nb, sim = q[keep], nb[keep], sim[keep]
    # probe a few images first: a store whose images are all gone (or never existed, e.g. synthetic features)
    # must not cost one failed open per image
    probe = np.random.default_rng(0).permutation(u)[:32]
    _, probe_ok, probe_fail = nc.load_thumbs(root, [rep_paths[i] for i in probe])
    if len(probe) and not probe_ok.any():
        out = NearCopies()
        differ = rep_of[q] != rep_of[nb]
        n_unv = int(len(np.unique(np.minimum(q, nb)[differ] * np.int64(max(n, 1)) + np.maximum(q, nb)[differ])))
        out.record = {"candidates": {"feature_knn_edges": int(len(q)), "pixel_knn_edges": 0, "pairs": n_unv},
                      "confirmed_pairs": 0, "rejected_pairs": 0, "unverified_pairs": n_unv, "unreadable_images": u,
                      "unreadable_reason": f"none of {len(probe)} probed images could be opened (e.g. {probe_fail[0][0]}: "
                                           f"{probe_fail[0][1]}); no near-copy is reported without its pixels — pass "
                                           "--confirm none --dup-threshold X to trust the features alone",
                      "tolerances_computed": 0, "pixel_rule": nc.rule_record()}
        log.warning("near-copy check skipped: %s", out.record["unreadable_reason"])
        return out
    slot = np.full(n, -1, np.int64)
    slot[reps] = np.arange(u)
    row_slot = slot[rep_of]  # id-map row -> slot of its image's first row (reps ascending, so slots keep row order)
    del slot
    t0 = time.perf_counter()
    with nc.ThumbStore(u, spill_dir, spill_rows) as thumbs:
        _, ok, failures = nc.load_thumbs(root, rep_paths, out=thumbs)
        del rep_paths
        keep_coarse = u <= exact_max
        coarse = np.zeros((u, 16 * 16), np.float32) if keep_coarse else None
        has_struct = np.zeros(u, bool)
        for start in range(0, u, _BLOCK):
            c = nc.coarse_vectors(thumbs.read(start, start + _BLOCK))
            has_struct[start:start + len(c)] = ok[start:start + len(c)] & (np.abs(c).sum(axis=1) > 0)
            if coarse is not None:
                coarse[start:start + len(c)] = c
        struct = np.flatnonzero(has_struct)
        t1 = time.perf_counter()

        # the 16x16 pixel-space kNN over the structured images: exact up to exact_max, the auto FAISS index above
        kk = min(params.k, len(struct) - 1)
        pix_a, pix_b, pix_index, vec_of = _pixel_knn(thumbs, struct, kk, coarse, exact_max)

        # feature kNN edges -> slot pairs, dropped when both images have structure and their unaligned 16x16
        # correlation is below the prefilter (no near-copy measured so far sits that far apart unaligned)
        ia, ib = row_slot[q], row_slot[nb]
        m = ia != ib
        ia, ib, s_f = ia[m], ib[m], sim[m]
        both = np.flatnonzero(has_struct[ia] & has_struct[ib])
        drop = np.zeros(len(ia), bool)
        for start in range(0, len(both), 65_536):
            e = both[start:start + 65_536]
            drop[e] = np.einsum("ij,ij->i", vec_of(ia[e]), vec_of(ib[e])) < nc.PREFILTER
        ia, ib, s_f = ia[~drop], ib[~drop], s_f[~drop]  # unreadable images stay: counted as unverified
        n_feat, n_pix = int(len(ia)), int(len(pix_a))

        # one candidate per unordered slot pair: how it was found (1 feature kNN, 2 pixel kNN) and its best cosine
        lo = np.concatenate([np.minimum(ia, ib), np.minimum(pix_a, pix_b)])
        hi = np.concatenate([np.maximum(ia, ib), np.maximum(pix_a, pix_b)])
        via = np.concatenate([np.ones(n_feat, np.int8), np.full(n_pix, 2, np.int8)])
        cos_e = np.concatenate([s_f, np.full(n_pix, np.nan)])
        del ia, ib, s_f, pix_a, pix_b
        key = lo * np.int64(max(u, 1)) + hi
        order = np.argsort(key, kind="stable")
        key, via, cos_e = key[order], via[order], cos_e[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
        c_lo, c_hi = key[starts] // max(u, 1), key[starts] % max(u, 1)
        c_via = np.bitwise_or.reduceat(via, starts) if len(starts) else via
        c_cos = np.fmax.reduceat(cos_e, starts) if len(starts) else cos_e
        del key, via, cos_e, order, lo, hi
        t2 = time.perf_counter()

        def tol(r: int) -> tuple[float, float] | None:
            try:
                img = open_stored_image(root, str(path_col.iat[r]), draft=(4 * nc.THUMB, 4 * nc.THUMB))
                return nc.tolerance(img)
            except (RejectedImage, OSError, ValueError) as exc:
                log.warning("cannot reopen %s for its self-copy tolerance: %s", path_col.iat[r], exc)
                return None

        # aligned matches, then the self-copy tolerance of every image a surviving pair needs; OpenCV and NumPy release
        # the GIL, so a small thread pool runs them on every core (fed in blocks: bounded queued work)
        readable = np.flatnonzero(ok[c_lo] & ok[c_hi])
        unverified = len(c_lo) - len(readable)
        corr = np.full(len(c_lo), -2.0)
        resid = np.full(len(c_lo), np.inf)
        workers = min(4, os.cpu_count() or 1)
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(readable), _BLOCK):
                js = readable[start:start + _BLOCK].tolist()
                for j, (cr, rs) in zip(js, pool.map(lambda j: nc.match(thumbs.get(c_lo[j]), thumbs.get(c_hi[j])), js)):
                    corr[j], resid[j] = cr, rs
            alive = readable[corr[readable] >= nc.CORR_FLOOR]
            need = np.unique(np.concatenate([reps[c_lo[alive]], reps[c_hi[alive]]])).tolist()
            tol_cache: dict[int, tuple[float, float] | None] = {}
            for start in range(0, len(need), _BLOCK):
                tol_cache.update(zip(need[start:start + _BLOCK], pool.map(tol, need[start:start + _BLOCK])))
    out = NearCopies()
    aligned_below_floor = len(readable) - len(alive)
    rejected = 0
    for j in alive.tolist():
        a, b = int(reps[c_lo[j]]), int(reps[c_hi[j]])
        cr, rs = float(corr[j]), float(resid[j])
        ta, tb = tol_cache[a], tol_cache[b]
        if ta is None or tb is None:
            unverified += 1
            continue
        if not nc.is_near_copy(cr, rs, ta, tb):
            rejected += 1
            continue
        cos = float(c_cos[j]) if c_via[j] & 1 else cosine(a, b)
        if cos != cos:  # not reconstructable from this index kind: rank by the pixel evidence instead
            cos = cr
        tol_r = nc.MARGIN * max(ta[1], tb[1], nc.MIN_RESID_TOL)
        found = " + ".join(name for bit, name in ((1, "feature kNN"), (2, "pixel kNN")) if c_via[j] & bit)
        why = (f"same picture: aligned pixel correlation {cr:.4f}, residual {rs:.2f} <= {tol_r:.2f} "
               f"(self-copy tolerance x {nc.MARGIN:g}), feature cosine {cos:.4f}; found by {found}")
        for ra in multi.get(a, (a,)):
            for rb in multi.get(b, (b,)):
                out.pairs[(int(min(ra, rb)), int(max(ra, rb)))] = (float(cos), why)
    out.record = {"candidates": {"feature_knn_edges": n_feat, "pixel_knn_edges": n_pix, "pairs": int(len(c_lo)),
                                 "pixel_index": pix_index},
                  "confirmed_pairs": int(sum(1 for _ in out.pairs)), "rejected_pairs": rejected + aligned_below_floor,
                  "unverified_pairs": int(unverified), "unreadable_images": len(failures),
                  "tolerances_computed": len(tol_cache), "thumbnails_spilled": bool(thumbs.spilled),
                  "seconds": {"thumbnails": round(t1 - t0, 3), "candidates": round(t2 - t1, 3),
                              "confirm": round(time.perf_counter() - t2, 3)},
                  "pixel_rule": nc.rule_record()}
    if calibration and calibration.get("_copies"):
        originals, copies, owner, cos = calibration["_copies"]
        thumbs_o = [nc.grey_thumb(im) for im in originals]
        tols_o = [nc.tolerance(im) for im in originals]
        hit = 0
        for img_c, o, s in zip(copies, owner, cos):
            t_o, t_c = thumbs_o[o], nc.grey_thumb(img_c)
            v = nc.coarse_vectors(np.stack([t_o, t_c]))
            proposed = feature_threshold is None or s >= feature_threshold or float(v[0] @ v[1]) >= nc.PREFILTER
            corr_c, resid_c = nc.match(t_o, t_c)
            hit += bool(proposed and nc.is_near_copy(corr_c, resid_c, tols_o[o], tols_o[o]))
        out.record["self_copy_recall"] = round(hit / max(1, len(copies)), 4)
    return out


_BLOCK = 4096  # images / pairs per block in the near-copy search


def _pixel_knn(thumbs: Any, struct: np.ndarray, k: int, coarse: np.ndarray | None, exact_max: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
    """The ``k`` nearest neighbours of every structured image in the 16x16 grey space, kept when their correlation is
    >= :data:`~tasks.index.near_copy.PREFILTER`.

    ``thumbs``: the :class:`~tasks.index.near_copy.ThumbStore` of the U unique images; ``struct`` ``(S,) int64``
    their slots with structure; ``coarse`` ``(U, 256) float32`` their 16x16 vectors when held in memory (else they
    are computed from ``thumbs`` block by block). Exact (``knn_search``, the 16x16 vectors of ``struct`` in memory:
    S x 1 KiB) for ``S <= exact_max``; above it the ``auto`` FAISS index (:func:`~tasks.core.faiss_index.resolve_factory`:
    ``IVF<nlist>,PQ64x4fs,RFlat``, trained on a seeded sample, nprobe and re-rank factor as ``convlens index`` sets
    them), searched block by block (memory: the index, S x ~1.05 KiB, + O(block x k)). Returns ``(a (P,) int64, b
    (P,) int64)`` slot pairs (query, neighbour), the record of the search and ``vec_of(slots) -> (m, 256) float32``
    (the 16x16 vector of structured slots, for the feature edges' prefilter).
    """
    from tasks.core.faiss_index import (
        AUTO_K_FACTOR,
        add_vectors,
        default_nprobe,
        finalize_index,
        knn_search,
        needs_training,
        new_index,
        nlist_of,
        prepare_vectors,
        reserve_rows,
        resolve_factory,
        search_index,
        train_index,
    )
    from tasks.index import near_copy as nc

    s_n = len(struct)
    empty = np.zeros(0, np.int64)
    pos = np.full(len(thumbs), -1, np.int64)
    pos[struct] = np.arange(s_n)

    def coarse_of(slots: np.ndarray) -> np.ndarray:
        if coarse is not None:
            return coarse[slots]
        out = np.empty((len(slots), 16 * 16), np.float32)
        for start in range(0, len(slots), _BLOCK):  # contiguous runs read in one go when slots are sorted
            part = slots[start:start + _BLOCK]
            if len(part) and int(part[-1]) - int(part[0]) + 1 == len(part):
                out[start:start + len(part)] = nc.coarse_vectors(thumbs.read(int(part[0]), int(part[-1]) + 1))
            else:
                out[start:start + len(part)] = nc.coarse_vectors(thumbs.take(part))
        return out

    if s_n <= exact_max or s_n < 2:
        sv = coarse[struct] if coarse is not None else coarse_of(struct)

        def vec_exact(slots: np.ndarray) -> np.ndarray:
            return coarse[slots] if coarse is not None else sv[pos[slots]]

        if s_n < 2:
            return empty, empty, {"factory": "Flat", "exact": True, "rows": int(s_n)}, vec_exact
        pidx, pdist = knn_search(sv, k, "cosine")
        hit = (pidx >= 0) & (1.0 - pdist.astype(np.float64) >= nc.PREFILTER)
        a = np.repeat(struct, k).reshape(s_n, k)[hit]
        return a, struct[pidx[hit]], {"factory": "Flat", "exact": True, "rows": int(s_n)}, vec_exact

    factory = resolve_factory("auto", s_n, 16 * 16, exact_max)
    index = new_index(16 * 16, factory, "cosine")
    nlist = nlist_of(index)
    if needs_training(index):
        rows = min(s_n, 100_000, 50 * nlist) if nlist else min(s_n, 100_000)
        sample = np.sort(np.random.default_rng(0).choice(s_n, rows, replace=False))
        train_index(index, prepare_vectors(coarse_of(struct[sample]), "cosine"))
    reserve_rows(index, s_n)
    for start in range(0, s_n, _BLOCK):
        add_vectors(index, prepare_vectors(coarse_of(struct[start:start + _BLOCK]), "cosine"))
    nprobe = default_nprobe(nlist) if nlist else None
    finalize_index(index, nprobe, AUTO_K_FACTOR)
    kq = min(s_n, k + 1)
    a_parts, b_parts = [], []
    for start in range(0, s_n, _BLOCK):
        rows = np.arange(start, min(s_n, start + _BLOCK))
        idx, dist = search_index(index, prepare_vectors(coarse_of(struct[rows]), "cosine"), kq, "cosine")
        order = np.argsort(idx == rows[:, None], axis=1, kind="stable")[:, :k]  # self out, first k others kept
        idx, dist = np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)
        hit = (idx >= 0) & (idx != rows[:, None]) & (1.0 - dist.astype(np.float64) >= nc.PREFILTER)
        a_parts.append(struct[np.repeat(rows, k).reshape(len(rows), k)[hit]])
        b_parts.append(struct[idx[hit]])

    def vec_index(slots: np.ndarray) -> np.ndarray:
        return index.reconstruct_batch(pos[slots]) if len(slots) else np.zeros((0, 16 * 16), np.float32)

    record = {"factory": factory, "exact": False, "rows": int(s_n), "nprobe": nprobe, "k_factor": AUTO_K_FACTOR}
    return np.concatenate(a_parts), np.concatenate(b_parts), record, vec_index


def calibration_line(cal: dict[str, Any] | None) -> str:
    """One line saying what "near-copy" meant in an audit (CLI and report)."""
    if not cal:
        return ""
    if cal.get("unreadable_reason"):
        return f"near-copy check skipped: {cal['unreadable_reason']}"
    if cal.get("confirm") == "none":
        return f"near-copy = feature cosine >= {cal.get('feature_threshold')} (given; not confirmed on the pixels)"
    ft = cal.get("feature_threshold")
    fc = cal.get("feature") or {}
    if fc.get("source") == "calibrated":
        feat = (f"kNN feature cosine >= {ft:.4f} (calibrated on {fc.get('copies')} self-made copies of {fc.get('sample')} "
                f"images) or a 16x16 pixel-space neighbour")
    elif fc.get("source") == "given":
        feat = f"kNN feature cosine >= {ft} (given) or a 16x16 pixel-space neighbour"
    else:
        feat = f"any kNN feature neighbour ({fc.get('reason', 'feature threshold not calibrated')}) or a 16x16 pixel-space neighbour"
    rule = cal.get("pixel_rule") or {}
    line = (f"near-copy = {feat}, confirmed on the pixels: aligned {rule.get('thumb_px', 64)}-px grey match within "
            f"{rule.get('margin', 1.5):g}x the image's own self-copy tolerance (corr >= {rule.get('corr_floor', 0.8):g})")
    if cal.get("self_copy_recall") is not None:
        line += f"; {cal['self_copy_recall']:.0%} of the self-made copies recovered"
    if cal.get("unverified_pairs"):
        line += f"; {cal['unverified_pairs']} candidate pairs unverifiable (images unreadable)"
    return line


def summarise_findings(findings: pd.DataFrame, top: int = 3) -> dict[str, Any]:
    """Counts per finding type (+ clusters for duplicates) and the top rows of each, as small records."""
    out: dict[str, Any] = {}
    for t in FINDING_TYPES:
        sub = findings[findings["finding"] == t]
        rec: dict[str, Any] = {"count": int(len(sub))}
        if t in ("exact-duplicate", "near-duplicate"):
            rec["clusters"] = int(sub["cluster"].nunique())
        rec["top"] = [{k: (None if isinstance(v, float) and np.isnan(v) and k != "score" else v) for k, v in r.items()
                       if k in ("rank", "score", "path", "image_id", "label", "split", "other_path", "suggested_label", "detail")}
                      for r in sub.head(top).to_dict("records")]
        out[t] = rec
    return out


# --------------------------------------------------------------------------------------- stored audit artefact


def run_dataset_audit(store: str, artefact: str | None = None, index_id: str | None = None,
                      params: AuditParams | None = None, gpu: str = "auto") -> dict[str, Any]:
    """Audit the newest (or given) feature artefact; returns the published ``audits`` manifest.

    Uses the given cosine feature index, else builds / updates / reuses the ``auto`` cosine one (exact up to its row threshold), so the
    audit never reads a stale index; reuses the index's kNN graph when it has >= k neighbours. The artefact
    (kind ``audits``, id ``dataset-audit-...``) is keyed by the index file's sha256 + parameters + code version,
    so a rerun on unchanged features reuses it.
    """
    from pyarrow import Table

    from storage.features import write_part
    from storage.index_store import read_idmap
    from storage.locks import artefact_lock
    from storage.manifest import CODE_VERSION, MANIFEST_NAME, read_manifest, write_manifest
    from storage.paths import Store, artefact_id
    from tasks.index.build import IndexConfig, build_index
    from tasks.index.neighbors import ensure_knn_graph, stale_message

    params = params or AuditParams()
    params.validate()
    s = Store(store)
    if index_id:
        aid_i, im = s.resolve("indexes", index_id)
        if im.get("space") != "feature" or im.get("metric") != "cosine":
            raise UsageError(f"index {aid_i} is a {im.get('space')}-space {im.get('metric')} index; the dataset audit "
                             "needs a feature-space cosine index (omit --index to use / build the exact one)")
        fman = read_manifest(s.artefact_dir("features", im["source"]["artefact_id"]))
        stale = stale_message(im, fman)
        if stale:
            raise UsageError(f"{stale} (the audit refuses a stale index)")
    else:
        im = build_index(IndexConfig(store=store, artefact=artefact, space="feature", factory="auto", metric="cosine", gpu=gpu))
        aid_i = im["artefact_id"]
    aid_i, im, graph = ensure_knn_graph(store, params.k, "feature", aid_i, gpu=gpu)
    key = {"index": aid_i, "index_sha256": im["index_sha256"], "params": params.to_dict(), "code_version": CODE_VERSION}
    aid = artefact_id(f"dataset-audit-{im['source']['artefact_id'][:24]}", key)
    adir = s.artefact_dir("audits", aid, create=True)
    with artefact_lock(adir):
        if (adir / MANIFEST_NAME).is_file():
            old = read_manifest(adir, verify=True)
            return {**old, "reused": True}
        idmap = read_idmap(s.artefact_dir("indexes", aid_i), im)
        near, calibration = _near_copies(s, im, aid_i, idmap, graph, params, gpu)
        findings = audit_knn(idmap, graph, params, near)
        entry = write_part(adir, Table.from_pandas(findings, preserve_index=False), prefix="findings")
        summary = summarise_findings(findings)
        manifest = {
            "kind": "dataset-audit",
            "artefact_id": aid,
            "source": {"index": aid_i, "index_sha256": im["index_sha256"], "features": im["source"]["artefact_id"],
                       "features_created": im["source"]["created"],
                       "knn_graph": (im.get("knn_graphs") or {}).get(str(params.k), {}).get("file")},
            "params": params.to_dict(),
            "calibration": calibration,
            "near_copy_rule": calibration_line(calibration),
            "images": int(len(idmap)),
            "rows": int(len(findings)),
            "counts": {t: summary[t]["count"] for t in FINDING_TYPES},
            "summary": summary,
            "files": [dict(entry, role="findings")],
        }
        published = write_manifest(adir, manifest)
    return published


def _near_copies(s: Any, im: dict[str, Any], aid_i: str, idmap: pd.DataFrame, graph: pd.DataFrame, params: AuditParams,
                 gpu: str) -> tuple[NearCopies | None, dict[str, Any]]:
    """Calibrate (unless ``dup_threshold`` is given) and confirm near-copies; returns the pairs (None with
    ``confirm="none"``) and the manifest's ``calibration`` record."""
    from storage.errors import StoreError
    from storage.manifest import read_manifest
    from tasks.index.neighbors import open_index

    if params.confirm == "none":
        return None, {"confirm": "none", "feature_threshold": params.dup_threshold}
    fid = im["source"]["artefact_id"]
    try:
        fman = read_manifest(s.artefact_dir("features", fid))
    except StoreError as exc:
        raise StoreError(f"feature artefact {fid} of index {aid_i} is unreadable ({exc}); the near-copy check needs its "
                         "dataset_root — re-extract, or pass --confirm none --dup-threshold X") from None
    root = fman.get("dataset_root")
    device = "cpu" if gpu == "off" else "auto"
    oi = open_index(s, "feature", aid_i, gpu="off")

    def stored(row: int) -> np.ndarray | None:
        try:
            return np.asarray(oi.cpu_index.reconstruct(int(row)), np.float32)
        except RuntimeError:
            return None

    if params.dup_threshold is not None:
        fcal: dict[str, Any] = {"source": "given", "threshold": params.dup_threshold}
        threshold: float | None = params.dup_threshold
    else:
        fcal = calibrate_feature_threshold(fman, root, idmap, params.calibration_sample, device, stored=stored)
        threshold = fcal.get("threshold")
        fcal["source"] = "calibrated" if threshold is not None else "uncalibrated"
        if threshold is None:
            log.warning("feature threshold not calibrated (%s): every kNN edge is a candidate", fcal.get("reason"))

    def cosine(a: int, b: int) -> float:
        try:
            va, vb = oi.cpu_index.reconstruct(int(a)), oi.cpu_index.reconstruct(int(b))
        except RuntimeError:
            return float("nan")
        return float(np.dot(va, vb) / max(float(np.linalg.norm(va) * np.linalg.norm(vb)), 1e-12))

    near = find_near_copies(idmap, graph, root, params, threshold, cosine, fcal, spill_dir=s.kind_dir("cache"))
    fcal.pop("_copies", None)
    cal = {"confirm": "pixels", "feature_threshold": threshold, "feature": fcal, **near.record}
    return near, cal


def audit_dataset(store: str, artefact: str | None = None, **params: Any) -> dict[str, Any]:
    """Plain entry point (demo, scripts): run the audit in-process with default thresholds; returns the summary."""
    gpu = params.pop("gpu", "auto")
    index_id = params.pop("index_id", None)
    return summarise(run_dataset_audit(store, artefact, index_id, AuditParams(**params), gpu))


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    """Small record of a published dataset audit (what the CLI prints and flows return)."""
    return {"artefact_id": m["artefact_id"], "index": m["source"]["index"], "features": m["source"]["features"],
            "images": m["images"], "rows": m["rows"], "counts": m["counts"], "params": m["params"],
            "calibration": m.get("calibration"), "near_copy_rule": m.get("near_copy_rule", ""),
            "findings_file": m["files"][0]["name"], "summary": m["summary"], "reused": bool(m.get("reused"))}
