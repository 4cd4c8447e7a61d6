"""Dataset audits from the feature-space kNN graph: near-duplicates, train/test leakage, kNN label disagreement
(likely label errors) and outliers.

Inputs are the index's id map (``row, image_id, path, label, split``) and its kNN graph (``row, rank, neighbor_row,
distance``; cosine index, so ``similarity = 1 - distance``). Output is one findings table, columns
:data:`FINDING_COLUMNS`, one row per (finding, image):

- ``exact-duplicate``: rows sharing an ``image_id`` (identical bytes at several paths); ``cluster`` groups them,
  ``score`` = 1.0.
- ``near-duplicate``: rows linked by a kNN edge with cosine similarity >= ``dup_threshold`` (exact duplicates
  included), grouped into clusters by connected components (union-find); ``score`` = the highest similarity to
  another member; ``other_*`` = that closest member.
- ``leakage``: a near- or exact-duplicate pair whose two images lie in different (non-null) splits; one row per
  pair, ``score`` = similarity, ``image`` = the pair's non-train side when there is one.
- ``label-disagreement``: a labelled image whose label is not the similarity-weighted plurality of its labelled
  neighbours (cleanlab-style self-confidence ``p(given label)`` from the kNN vote); ``score`` = 1 - p(given),
  ``suggested_label`` = the plurality label.
- ``outlier``: an image whose distance to its k-th neighbour has a robust z-score (median / MAD) >= ``outlier_z``;
  ``score`` = that distance.

``rank`` orders rows within a finding type (1 = most severe). Memory O(N x k) small records.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from storage.audits import FINDING_COLUMNS, FINDING_TYPES
from storage.errors import UsageError

__all__ = ["AuditParams", "audit_knn", "summarise_findings", "run_dataset_audit", "audit_dataset", "summarise"]

log = logging.getLogger(__name__)


@dataclass
class AuditParams:
    """Thresholds of ``convlens audit-dataset``."""

    k: int = 10
    dup_threshold: float = 0.95  # cosine similarity
    outlier_z: float = 3.5
    min_label_votes: int = 3  # labelled neighbours needed before a label is questioned

    def validate(self) -> None:
        if self.k < 1:
            raise UsageError(f"-k must be >= 1, got {self.k}")
        if not -1.0 <= self.dup_threshold <= 1.0:
            raise UsageError(f"--dup-threshold is a cosine similarity in [-1, 1], got {self.dup_threshold}")
        if self.min_label_votes < 1:
            raise UsageError("--min-label-votes must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def audit_knn(idmap: pd.DataFrame, graph: pd.DataFrame, params: AuditParams = AuditParams()) -> pd.DataFrame:
    """Findings (columns :data:`FINDING_COLUMNS`) from an id map and a cosine kNN graph (see module docstring)."""
    params.validate()
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

    # near duplicates: kNN edges above the threshold, plus exact pairs
    m = (sim >= params.dup_threshold) & (q != nb)
    for a, b, s in zip(q[m], nb[m], sim[m]):
        key = (int(min(a, b)), int(max(a, b)))
        pairs[key] = max(pairs.get(key, -1.0), float(s))
    uf = _UnionFind(n)
    best: dict[int, tuple[float, int]] = {}
    for (a, b), s in pairs.items():
        uf.union(a, b)
        for x, y in ((a, b), (b, a)):
            if s > best.get(x, (-2.0, -1))[0]:
                best[x] = (s, y)
    comps: dict[int, list[int]] = {}
    for r in best:
        comps.setdefault(uf.find(r), []).append(r)
    for ci, root in enumerate(sorted(comps)):
        members = sorted(comps[root])
        for r in members:
            s, o = best[r]
            kind = "exact" if ids.iat[r] == ids.iat[o] else "near"
            out.append(_row("near-duplicate", s, recs[r], recs[o], ci,
                            detail=f"cluster of {len(members)}; closest member is an {kind} duplicate"))

    # leakage: duplicate pairs that cross splits
    for (a, b), s in sorted(pairs.items(), key=lambda it: -it[1]):
        sa, sb = _s(recs[a].get("split")), _s(recs[b].get("split"))
        if sa and sb and sa != sb:
            me, other = (recs[b], recs[a]) if sa == "train" else (recs[a], recs[b])
            out.append(_row("leakage", s, me, other, uf.find(a) if a in best else -1,
                            detail=f"{_s(me.get('split'))} image duplicates a {_s(other.get('split'))} image "
                                   f"({'identical bytes' if ids.iat[a] == ids.iat[b] else f'cosine {s:.4f}'})"))

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

    Uses the given cosine feature index, else builds / updates / reuses the exact (Flat, cosine) one, so the
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
        im = build_index(IndexConfig(store=store, artefact=artefact, space="feature", factory="Flat", metric="cosine", gpu=gpu))
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
        findings = audit_knn(idmap, graph, params)
        entry = write_part(adir, Table.from_pandas(findings, preserve_index=False), prefix="findings")
        summary = summarise_findings(findings)
        manifest = {
            "kind": "dataset-audit",
            "artefact_id": aid,
            "source": {"index": aid_i, "index_sha256": im["index_sha256"], "features": im["source"]["artefact_id"],
                       "features_created": im["source"]["created"],
                       "knn_graph": (im.get("knn_graphs") or {}).get(str(params.k), {}).get("file")},
            "params": params.to_dict(),
            "images": int(len(idmap)),
            "rows": int(len(findings)),
            "counts": {t: summary[t]["count"] for t in FINDING_TYPES},
            "summary": summary,
            "files": [dict(entry, role="findings")],
        }
        published = write_manifest(adir, manifest)
    return published


def audit_dataset(store: str, artefact: str | None = None, **params: Any) -> dict[str, Any]:
    """Plain entry point (demo, scripts): run the audit in-process with default thresholds; returns the summary."""
    gpu = params.pop("gpu", "auto")
    index_id = params.pop("index_id", None)
    return summarise(run_dataset_audit(store, artefact, index_id, AuditParams(**params), gpu))


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    """Small record of a published dataset audit (what the CLI prints and flows return)."""
    return {"artefact_id": m["artefact_id"], "index": m["source"]["index"], "features": m["source"]["features"],
            "images": m["images"], "rows": m["rows"], "counts": m["counts"], "params": m["params"],
            "findings_file": m["files"][0]["name"], "summary": m["summary"], "reused": bool(m.get("reused"))}
