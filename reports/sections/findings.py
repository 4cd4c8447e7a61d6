"""Dataset-audit findings grouped by kind: near-duplicate clusters, train/test leaks (pairs), likely label
errors and outliers (single images), each with counts and thumbnails; no hash columns.

Reads a dataset-audit artefact's ``findings`` table (``tasks/index/dataset_audit.py``: ``finding, rank, score, cluster,
image_id, path, label, split, other_image_id, other_path, other_label, other_split, suggested_label, detail``);
its columns are :data:`storage.audits.FINDING_COLUMNS`; older tables may lack optional ones. Thumbnails are
feature rows (``<img data-thumb>``, filled lazily by the page); rows shown are added to ``needed``.

The card also says what "near-copy" meant in that audit (``rule``: the manifest's ``near_copy_rule`` — the
calibrated feature threshold, how many self-made copies it was calibrated on, and the pixel check — or, for an
audit made before calibration existed, its fixed cosine threshold).

Memory: the findings table (bounded by the audit's own limits) + the shown items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import clean_text
from reports.sections.stored import read_verified_table, table_preview
from storage.errors import StoreError

__all__ = ["KIND_ORDER", "findings_view", "near_copy_rule"]

KIND_ORDER = ("leakage", "exact-duplicate", "near-duplicate", "label-disagreement", "outlier")
_TITLES = {"leakage": "Train/test leaks", "exact-duplicate": "Exact duplicates", "near-duplicate": "Near-duplicate clusters",
           "label-disagreement": "Likely label errors", "outlier": "Outliers"}
_EXPLAIN = {
    "leakage": "a test image whose nearest train image is (nearly) the same picture: test scores are inflated",
    "exact-duplicate": "byte-identical or identical-feature images",
    "near-duplicate": "groups of copies of one picture (re-encoded, resized, re-lit or slightly cropped), each pair "
                      "confirmed on the pixels",
    "label-disagreement": "the image's labelled kNN neighbours vote for another label",
    "outlier": "far from everything else (distance to the k-th neighbour, robust z-score)",
}


def _s(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return ""
    return clean_text(v)


def _img(rec: dict[str, Any], prefix: str, path_rows: dict[str, int], needed: set[int]) -> dict[str, Any]:
    path = _s(rec.get(prefix + "path"))
    raw = rec.get(prefix + "path")
    row = path_rows.get(raw) if isinstance(raw, str) else None
    if row is not None:
        needed.add(row)
    return {"path": path, "row": row, "label": _s(rec.get(prefix + "label")), "split": _s(rec.get(prefix + "split")),
            "id": _s(rec.get(prefix + "image_id"))}


def near_copy_rule(m: dict[str, Any]) -> str:
    """What "near-copy" meant in a dataset audit, as one line (empty when the manifest says nothing)."""
    rule = m.get("near_copy_rule")
    if rule:
        return clean_text(rule)
    thr = (m.get("params") or {}).get("dup_threshold")
    if thr is not None and not m.get("calibration"):
        return clean_text(f"near-copy = feature cosine >= {thr} (a fixed threshold, not calibrated for this model and "
                          "not confirmed on the pixels: findings may be distinct images that look alike to the model)")
    return ""


def findings_view(aid: str, m: dict[str, Any], adir: Path, path_rows: dict[str, int], needed: set[int],
                  per_kind: int = 12, per_cluster: int = 12) -> dict[str, Any] | None:
    """Template data for one dataset audit, or None when it has no findings table with a kind column."""
    entry = next((e for e in m.get("files", []) if e.get("role") == "findings"), None)
    if entry is None:
        return None
    view: dict[str, Any] = {"id": clean_text(aid), "title": "dataset audit", "error": None, "groups": [], "raw": None,
                            "params": [(clean_text(k), clean_text(v)) for k, v in (m.get("params") or {}).items()],
                            "rule": near_copy_rule(m)}
    try:
        df = read_verified_table(adir, entry)
    except StoreError as exc:
        view["error"] = clean_text(str(exc))
        return view
    kcol = "finding"
    if kcol not in df.columns or "path" not in df.columns:
        return None
    counts = {str(k): int(v) for k, v in (m.get("counts") or {}).items()}
    for k, v in df[kcol].astype(str).value_counts().items():
        counts.setdefault(str(k), int(v))
    kinds = sorted(counts, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    if "rank" in df.columns:
        df = df.sort_values([kcol, "rank"], kind="stable")
    elif "score" in df.columns:
        df = df.sort_values([kcol, "score"], ascending=[True, False], kind="stable")
    for kind in kinds:
        sub = df[df[kcol].astype(str) == kind]
        recs = sub.to_dict("records")
        explain = _EXPLAIN.get(kind, "")
        if kind == "near-duplicate" and not m.get("calibration"):
            explain = "groups of images closer than the duplicate threshold in feature space"
        group: dict[str, Any] = {"kind": clean_text(kind), "title": clean_text(_TITLES.get(kind, kind)), "count": counts[kind],
                                 "explain": explain, "mode": "singles", "entries": [], "total": 0}
        has_other = "other_path" in sub.columns and sub["other_path"].notna().any()
        clustered = "cluster" in sub.columns and (sub["cluster"].fillna(-1).astype(int) >= 0).any() and kind != "leakage"
        if clustered:
            group["mode"] = "clusters"
            clusters = []
            for cid, g in sub.groupby(sub["cluster"].fillna(-1).astype(int), sort=False):
                members: dict[str, dict[str, Any]] = {}
                for rec in g.to_dict("records"):
                    for prefix in ("", "other_"):
                        p = rec.get(prefix + "path")
                        if isinstance(p, str) and p not in members:
                            members[p] = rec if prefix == "" else {"path": p, "label": rec.get("other_label"),
                                                                   "split": rec.get("other_split"),
                                                                   "image_id": rec.get("other_image_id")}
                size = len(members)
                clusters.append({"cluster": int(cid), "size": size, "score": float(g["score"].max()) if "score" in g else None,
                                 "splits": sorted({_s(v.get("split")) for v in members.values()} - {""}),
                                 "labels": sorted({_s(v.get("label")) for v in members.values()} - {""}),
                                 "members": list(members.values())})
            clusters.sort(key=lambda c: (-c["size"], -(c["score"] or 0)))
            group["total"] = len(clusters)
            for c in clusters[:per_kind]:
                c["shown"] = [_img(v, "", path_rows, needed) for v in c["members"][:per_cluster]]
                c["more"] = max(0, c["size"] - per_cluster)
                del c["members"]
                group["entries"].append(c)
        elif has_other:
            group["mode"] = "pairs"
            seen: set[frozenset] = set()
            pairs = []
            for rec in recs:
                key = frozenset((str(rec.get("path")), str(rec.get("other_path"))))
                if key in seen:
                    continue
                seen.add(key)
                pairs.append(rec)
            group["total"] = len(pairs)
            for rec in pairs[:per_kind]:
                group["entries"].append({"a": _img(rec, "", path_rows, needed), "b": _img(rec, "other_", path_rows, needed),
                                       "score": rec.get("score"), "detail": _s(rec.get("detail"))})
        else:
            group["total"] = len(recs)
            for rec in recs[:per_kind]:
                group["entries"].append({"a": _img(rec, "", path_rows, needed), "score": rec.get("score"),
                                       "suggested": _s(rec.get("suggested_label")), "detail": _s(rec.get("detail"))})
        if kind == "near-duplicate" and group["mode"] != "clusters":
            group["title"] = "Near-duplicates"
        view["groups"].append(group)
    view["raw"] = table_preview(df, entry["name"], path_rows, set(), limit=40, max_cols=12)
    return view
