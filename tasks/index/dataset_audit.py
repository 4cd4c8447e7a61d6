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

``rank`` orders rows within a finding type (1 = most severe). Memory O(N x k) small records + O(N x 4 KiB) grey
thumbnails for the pixel check.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from storage.audits import FINDING_COLUMNS, FINDING_TYPES
from storage.errors import ConvlensError, UsageError

__all__ = ["AuditParams", "NearCopies", "audit_knn", "find_near_copies", "calibrate_feature_threshold",
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


def _row(finding: str, score: float, me: dict, other: dict | None = None, cluster: int = -1,
         suggested: str | None = None, detail: str = "") -> dict[str, Any]:
    o = other or {}
    return {"finding": finding, "rank": 0, "score": float(score), "cluster": int(cluster),
            "image_id": me["image_id"], "path": me["path"], "label": _s(me.get("label")), "split": _s(me.get("split")),
            "other_image_id": o.get("image_id"), "other_path": o.get("path"), "other_label": _s(o.get("label")),
            "other_split": _s(o.get("split")), "suggested_label": suggested, "detail": detail}


def audit_knn(idmap: pd.DataFrame, graph: pd.DataFrame, params: AuditParams = AuditParams(),
              near: NearCopies | None = None) -> pd.DataFrame:
    """Findings (columns :data:`FINDING_COLUMNS`) from an id map and a cosine kNN graph (see module docstring).

    ``near``: the confirmed near-copy pairs (:func:`find_near_copies`); without it, near-duplicates are the kNN
    edges with cosine >= ``params.dup_threshold`` (which must then be given).
    """
    params.validate()
    if near is None and params.dup_threshold is None:
        raise UsageError("audit_knn without confirmed pairs needs an explicit dup_threshold")
    idmap = idmap.sort_values("row").reset_index(drop=True)
    n = len(idmap)
    if n and not (idmap["row"].to_numpy() == np.arange(n)).all():
        raise UsageError("id map rows must be 0..N-1")
    recs = idmap.to_dict("records")
    g = graph[graph["rank"] <= params.k]
    q = g["row"].to_numpy(np.int64)
    nb = g["neighbor_row"].to_numpy(np.int64)
    sim = 1.0 - g["distance"].to_numpy(np.float64)
    out: list[dict[str, Any]] = []

    # exact duplicates: same bytes (image_id) at several paths
    pairs: dict[tuple[int, int], float] = {}
    evidence: dict[tuple[int, int], str] = {}
    ids = idmap["image_id"]
    exact_groups = [np.sort(rows) for rows in idmap.groupby("image_id", sort=False).indices.values() if len(rows) > 1]
    for ci, rows in enumerate(sorted(exact_groups, key=lambda r: r[0])):
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
        for a, b, s in zip(q[m], nb[m], sim[m]):
            key = (int(min(a, b)), int(max(a, b)))
            if key not in evidence or evidence[key] != "identical bytes":
                pairs[key] = max(pairs.get(key, -1.0), float(s))
                evidence[key] = f"feature cosine {pairs[key]:.4f} >= {params.dup_threshold}"
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
    for ci, root in enumerate(sorted(comps)):
        members = sorted(comps[root])
        for r in members:
            s, o = best[r]
            kind = "an exact" if ids.iat[r] == ids.iat[o] else "a near"
            out.append(_row("near-duplicate", s, recs[r], recs[o], ci,
                            detail=f"cluster of {len(members)}; closest member is {kind} duplicate "
                                   f"({evidence[(min(r, o), max(r, o))]})"))

    # leakage: duplicate pairs that cross splits
    leaked: set[int] = set()
    for (a, b), s in sorted(pairs.items(), key=lambda it: -it[1]):
        sa, sb = _s(recs[a].get("split")), _s(recs[b].get("split"))
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
            sr = _s(recs[r].get("split"))
            if not sr or sr == "train" or r in leaked:
                continue
            others = [o for o in members if _s(recs[o].get("split")) not in (None, sr)]
            if not others:
                continue
            o = min(others, key=lambda x: (_s(recs[x].get("split")) != "train", x))
            leaked.add(r)
            out.append(_row("leakage", best[r][0], recs[r], recs[o], root,
                            detail=f"{sr} image is in a near-copy cluster of {len(members)} with a "
                                   f"{_s(recs[o].get('split'))} image (linked through other copies of the same picture)"))

    # kNN label disagreement (cleanlab-style self-confidence from a similarity-weighted kNN vote)
    labels = idmap["label"].to_numpy(dtype=object)
    has = np.array([_s(v) is not None for v in labels])
    if has.any():
        w = np.clip(sim, 0.0, None) + 1e-6
        lab_nb = labels[nb]
        ok = has[q] & has[nb] & (q != nb)
        df = pd.DataFrame({"q": q[ok], "lab": lab_nb[ok], "w": w[ok]})
        votes = df.groupby(["q", "lab"])["w"].sum().unstack(fill_value=0.0)
        counts = df.groupby("q").size()
        totals = votes.sum(axis=1)
        for r in votes.index:
            if counts[r] < params.min_label_votes:
                continue
            given = labels[r]
            p = votes.loc[r] / totals[r]
            p_given = float(p.get(given, 0.0))
            top = str(p.idxmax())
            if top != given and p_given < 0.5:
                out.append(_row("label-disagreement", 1.0 - p_given, recs[r], cluster=-1, suggested=top,
                                detail=f"p(given)={p_given:.3f}, p({top})={float(p[top]):.3f} over {int(counts[r])} labelled neighbours"))

    # outliers: far from their k-th neighbour
    if len(g):
        kth = g.groupby("row")["distance"].max()
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


def _unique_rows(idmap: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """First row of each image_id ``(U,) int64`` and every image_id's rows."""
    groups = {str(k): np.sort(v) for k, v in idmap.groupby("image_id", sort=False).indices.items()}
    reps = np.array(sorted(int(v[0]) for v in groups.values()), np.int64)
    return reps, groups


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
    reps, _ = _unique_rows(idmap)
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
                     calibration: dict[str, Any] | None = None) -> NearCopies:
    """Confirmed same-picture pairs of id-map rows (see the module docstring).

    Candidates: kNN edges (rank <= k) with cosine >= ``feature_threshold`` (every edge when None) whose unaligned
    16x16 grey correlation is >= :data:`~tasks.index.near_copy.PREFILTER`, plus each image's ``k`` nearest
    neighbours in that 16x16 space with correlation >= the same :data:`~tasks.index.near_copy.PREFILTER`. Each candidate
    is confirmed by :func:`tasks.index.near_copy.match` + :func:`~tasks.index.near_copy.is_near_copy` against both
    images' self-copy tolerance. ``cosine(a, b)`` gives the feature cosine of rows not joined by a kNN edge.
    Exact duplicates (same ``image_id``) are left to :func:`audit_knn`. Memory O(N x 4 KiB) thumbnails.
    """
    from tasks.core.faiss_index import knn_search
    from tasks.core.images import RejectedImage, open_stored_image
    from tasks.index import near_copy as nc

    reps, groups = _unique_rows(idmap)
    ids = idmap["image_id"].astype(str).to_numpy()
    rep_of = {k: int(v[0]) for k, v in groups.items()}
    rep_paths = [str(p) for p in idmap["path"].to_numpy()[reps]]
    g = graph[(graph["rank"] <= params.k) & (graph["row"] != graph["neighbor_row"])]
    sim = 1.0 - g["distance"].to_numpy(np.float64)
    keep = np.ones(len(g), bool) if feature_threshold is None else sim >= feature_threshold
    # probe a few images first: a store whose images are all gone (or never existed, e.g. synthetic features)
    # must not cost one failed open per image
    probe = np.random.default_rng(0).permutation(len(reps))[:32]
    _, probe_ok, probe_fail = nc.load_thumbs(root, [rep_paths[i] for i in probe])
    if len(probe) and not probe_ok.any():
        out = NearCopies()
        ends = set(zip(g["row"].to_numpy()[keep].tolist(), g["neighbor_row"].to_numpy()[keep].tolist()))
        n_unv = len({(min(a, b), max(a, b)) for a, b in ends if ids[a] != ids[b]})
        out.record = {"candidates": {"feature_knn_edges": int(keep.sum()), "pixel_knn_edges": 0, "pairs": n_unv},
                      "confirmed_pairs": 0, "rejected_pairs": 0, "unverified_pairs": n_unv, "unreadable_images": len(reps),
                      "unreadable_reason": f"none of {len(probe)} probed images could be opened (e.g. {probe_fail[0][0]}: "
                                           f"{probe_fail[0][1]}); no near-copy is reported without its pixels — pass "
                                           "--confirm none --dup-threshold X to trust the features alone",
                      "tolerances_computed": 0, "pixel_rule": nc.rule_record()}
        log.warning("near-copy check skipped: %s", out.record["unreadable_reason"])
        return out
    thumbs, ok, failures = nc.load_thumbs(root, rep_paths)
    slot = {int(r): i for i, r in enumerate(reps)}
    coarse = nc.coarse_vectors(thumbs)
    has_struct = ok & (np.abs(coarse).sum(axis=1) > 0)

    cands: dict[tuple[int, int], dict[str, Any]] = {}

    def add(a: int, b: int, via: str, cos: float | None = None) -> None:
        a, b = rep_of[ids[a]], rep_of[ids[b]]
        if a == b:
            return
        key = (min(a, b), max(a, b))
        c = cands.setdefault(key, {"via": set(), "cos": None})
        c["via"].add(via)
        if cos is not None:
            c["cos"] = max(cos, c["cos"]) if c["cos"] is not None else cos

    q, nb = g["row"].to_numpy(np.int64)[keep], g["neighbor_row"].to_numpy(np.int64)[keep]
    n_feat = 0
    for a, b, s in zip(q, nb, sim[keep]):
        ia, ib = slot[rep_of[ids[a]]], slot[rep_of[ids[b]]]
        if ia == ib:
            continue
        if has_struct[ia] and has_struct[ib] and float(coarse[ia] @ coarse[ib]) < nc.PREFILTER:
            continue  # not worth aligning: no near-copy measured so far sits this far apart unaligned
        add(int(a), int(b), "feature kNN", float(s))  # unreadable images land here too: counted as unverified
        n_feat += 1
    struct = np.flatnonzero(has_struct)
    n_pix = 0
    if len(struct) > 1:
        kk = min(params.k, len(struct) - 1)
        pidx, pdist = knn_search(coarse[struct], kk, "cosine")
        for i, (row_i, row_d) in enumerate(zip(pidx, pdist)):
            for j, d in zip(row_i, row_d):
                if j >= 0 and 1.0 - float(d) >= nc.PREFILTER:
                    add(int(reps[struct[i]]), int(reps[struct[j]]), "pixel kNN")
                    n_pix += 1

    def tol(r: int) -> tuple[float, float] | None:
        try:
            img = open_stored_image(root, str(idmap.at[r, "path"]), draft=(4 * nc.THUMB, 4 * nc.THUMB))
            return nc.tolerance(img)
        except (RejectedImage, OSError, ValueError) as exc:
            log.warning("cannot reopen %s for its self-copy tolerance: %s", idmap.at[r, "path"], exc)
            return None

    # aligned matches, then the self-copy tolerance of every image a surviving pair needs; OpenCV and NumPy release
    # the GIL, so a small thread pool runs them on every core
    readable = [key for key in sorted(cands) if ok[slot[key[0]]] and ok[slot[key[1]]]]
    unverified = len(cands) - len(readable)
    workers = min(4, os.cpu_count() or 1)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        scores = dict(zip(readable, pool.map(lambda key: nc.match(thumbs[slot[key[0]]], thumbs[slot[key[1]]]), readable)))
        alive = [key for key in readable if scores[key][0] >= nc.CORR_FLOOR]
        need = sorted({r for key in alive for r in key})
        tol_cache = dict(zip(need, pool.map(tol, need)))
    out = NearCopies()
    aligned_below_floor = len(readable) - len(alive)
    rejected = 0
    for a, b in alive:
        c = cands[(a, b)]
        corr, resid = scores[(a, b)]
        ta, tb = tol_cache[a], tol_cache[b]
        if ta is None or tb is None:
            unverified += 1
            continue
        if not nc.is_near_copy(corr, resid, ta, tb):
            rejected += 1
            continue
        cos = c["cos"] if c["cos"] is not None else cosine(a, b)
        if cos != cos:  # not reconstructable from this index kind: rank by the pixel evidence instead
            cos = corr
        tol_r = nc.MARGIN * max(ta[1], tb[1], nc.MIN_RESID_TOL)
        why = (f"same picture: aligned pixel correlation {corr:.4f}, residual {resid:.2f} <= {tol_r:.2f} "
               f"(self-copy tolerance x {nc.MARGIN:g}), feature cosine {cos:.4f}; found by {' + '.join(sorted(c['via']))}")
        for ra in groups[ids[a]]:
            for rb in groups[ids[b]]:
                out.pairs[(int(min(ra, rb)), int(max(ra, rb)))] = (float(cos), why)
    out.record = {"candidates": {"feature_knn_edges": n_feat, "pixel_knn_edges": n_pix, "pairs": len(cands)},
                  "confirmed_pairs": int(sum(1 for _ in out.pairs)), "rejected_pairs": rejected + aligned_below_floor,
                  "unverified_pairs": unverified, "unreadable_images": len(failures),
                  "tolerances_computed": len(tol_cache), "pixel_rule": nc.rule_record()}
    if calibration and calibration.get("_copies"):
        originals, copies, owner, cos = calibration["_copies"]
        thumbs_o = [nc.grey_thumb(im) for im in originals]
        tols_o = [nc.tolerance(im) for im in originals]
        hit = 0
        for img_c, o, s in zip(copies, owner, cos):
            t_o, t_c = thumbs_o[o], nc.grey_thumb(img_c)
            v = nc.coarse_vectors(np.stack([t_o, t_c]))
            proposed = feature_threshold is None or s >= feature_threshold or float(v[0] @ v[1]) >= nc.PREFILTER
            corr, resid = nc.match(t_o, t_c)
            hit += bool(proposed and nc.is_near_copy(corr, resid, tols_o[o], tols_o[o]))
        out.record["self_copy_recall"] = round(hit / max(1, len(copies)), 4)
    return out


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

    near = find_near_copies(idmap, graph, root, params, threshold, cosine, fcal)
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
