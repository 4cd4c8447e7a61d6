"""One row per image: every finding about an image joined into one table, stored and shown.

:func:`build_image_table` joins, per row of the feature table (one row per stored path; columns
:data:`storage.audits.IMAGE_TABLE_COLUMNS`):

- the prediction and its confidence (``pred``, ``pred_index``, ``prob``; ``correct`` where the labels are the
  model's classes, else null);
- the dataset audit's findings (by path): ``findings`` (the kinds), ``duplicate_group`` / ``duplicate_of`` (exact
  or near-duplicate cluster and its closest member), ``leak_partner`` / ``leak_partner_split`` (both sides of a
  train/test pair), ``label_issue_score`` / ``suggested_label`` (kNN label disagreement), ``outlier_score``;
- the attribution audit (by image content hash): ``faithfulness`` (one ``{method, target_kind, target_name,
  deletion_auc, insertion_auc}`` per stored map), ``best_method`` / ``best_gap`` (largest insertion − deletion
  on the predicted class);
- the sanity check: ``sanity`` (per method, this image's Spearman at the verdict depth when it was checked) and
  ``unreliable_methods`` (methods with a map of this image that the check flags for the whole audit);
- the comparison with the previous run (null without one): ``new_image``, ``pred_changed``, ``new_findings``,
  ``resolved_findings`` and a readable ``since_last_run``.

:func:`publish_image_table` stores it as an ``audits`` artefact of kind ``image-table`` (one per feature
artefact, republished with each report; read it back with :func:`storage.audits.read_image_table`), and
:func:`image_table_view` turns it into the compact JSON the report's sortable, filterable table draws.

Memory: O(N) small records for N feature rows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from reports.figures import clean_text, safe_json
from storage.audits import IMAGE_TABLE_COLUMNS

__all__ = ["build_image_table", "image_table_schema", "publish_image_table", "image_table_view", "needed_rows",
           "report_view", "PRESETS"]

log = logging.getLogger(__name__)

#: named filters the report offers as buttons: (label, filter state the page applies)
PRESETS = (
    ("Suspected label errors whose Grad-CAM is off the object",
     {"finding": "label-disagreement", "method": "gradcam", "ins_max": 0.2}),
    ("Explanations that fail the sanity check", {"unreliable": True}),
    ("New or changed since the last run", {"since": True}),
    ("Train/test leaks", {"finding": "leakage"}),
    ("Confident and wrong", {"wrong": True, "sort": "prob", "desc": True}),
)


def image_table_schema():
    """The Parquet schema of the per-image table (``pyarrow.Schema``), column order :data:`IMAGE_TABLE_COLUMNS`."""
    import pyarrow as pa

    faith = pa.struct([("method", pa.string()), ("target_kind", pa.string()), ("target_name", pa.string()),
                       ("deletion_auc", pa.float64()), ("insertion_auc", pa.float64())])
    sanity = pa.struct([("method", pa.string()), ("spearman", pa.float64()), ("ssim", pa.float64()),
                        ("flagged", pa.bool_())])
    types = {
        "row": pa.int64(), "image_id": pa.string(), "path": pa.string(), "label": pa.string(), "split": pa.string(),
        "pred": pa.string(), "pred_index": pa.int64(), "prob": pa.float64(), "correct": pa.bool_(),
        "findings": pa.list_(pa.string()), "duplicate_group": pa.int64(), "duplicate_of": pa.string(),
        "leak_partner": pa.string(), "leak_partner_split": pa.string(), "label_issue_score": pa.float64(),
        "suggested_label": pa.string(), "outlier_score": pa.float64(), "faithfulness": pa.list_(faith),
        "best_method": pa.string(), "best_gap": pa.float64(), "sanity": pa.list_(sanity),
        "unreliable_methods": pa.list_(pa.string()), "new_image": pa.bool_(), "pred_changed": pa.bool_(),
        "new_findings": pa.list_(pa.string()), "resolved_findings": pa.list_(pa.string()), "since_last_run": pa.string(),
    }
    return pa.schema([(c, types[c]) for c in IMAGE_TABLE_COLUMNS])


_LIST_COLUMNS = ("findings", "faithfulness", "sanity", "unreliable_methods", "new_findings", "resolved_findings")


def _s(v: Any) -> str | None:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v)


def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _findings_by_path(findings: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if findings is None or findings.empty or not {"finding", "path"} <= set(findings.columns):
        return out

    def rec(path: str) -> dict[str, Any]:
        return out.setdefault(path, {"findings": []})

    for r in findings.to_dict("records"):
        kind, path = _s(r.get("finding")), _s(r.get("path"))
        if kind is None or path is None:
            continue
        d = rec(path)
        if kind not in d["findings"]:
            d["findings"].append(kind)
        other = _s(r.get("other_path"))
        if kind in ("exact-duplicate", "near-duplicate"):
            cl = r.get("cluster")
            if cl is not None and not (isinstance(cl, float) and math.isnan(cl)) and int(cl) >= 0:
                # a near-duplicate cluster includes the exact duplicates: prefer it
                if d.get("duplicate_group") is None or kind == "near-duplicate":
                    d["duplicate_group"] = int(cl)
            if other and (d.get("duplicate_of") is None or kind == "near-duplicate"):
                d["duplicate_of"] = other
        elif kind == "leakage":
            d["leak_partner"], d["leak_partner_split"] = other, _s(r.get("other_split"))
            if other:
                o = rec(other)
                if "leakage" not in o["findings"]:
                    o["findings"].append("leakage")
                o.setdefault("leak_partner", path)
                o.setdefault("leak_partner_split", _s(r.get("split")))
        elif kind == "label-disagreement":
            d["label_issue_score"], d["suggested_label"] = _f(r.get("score")), _s(r.get("suggested_label"))
        elif kind == "outlier":
            d["outlier_score"] = _f(r.get("score"))
    return out


def _attribution_by_id(scores: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if scores is None or scores.empty or not {"image_id", "method", "deletion_auc", "insertion_auc"} <= set(scores.columns):
        return out
    for r in scores.to_dict("records"):
        iid = _s(r.get("image_id"))
        if iid is None:
            continue
        d = out.setdefault(iid, {"faithfulness": [], "best": None})
        kind = _s(r.get("target_kind")) or "pred"
        dele, ins = _f(r.get("deletion_auc")), _f(r.get("insertion_auc"))
        d["faithfulness"].append({"method": str(r["method"]), "target_kind": kind,
                                  "target_name": _s(r.get("target_name")), "deletion_auc": dele, "insertion_auc": ins})
        if kind.startswith("pred") and dele is not None and ins is not None:
            gap = ins - dele
            if d["best"] is None or gap > d["best"][1]:
                d["best"] = (str(r["method"]), gap)
    return out


def _sanity_by_id(sanity: tuple[pd.DataFrame, dict[str, Any]] | None) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    if sanity is None:
        return {}, set()
    table, m = sanity
    ver = m.get("verdicts") or {}
    flagged = {k for k, v in ver.items() if v.get("flagged")}
    out: dict[str, list[dict[str, Any]]] = {}
    if table is None or table.empty:
        return out, flagged
    depth = m.get("verdict_depth")
    at = table[table["depth"] == depth] if depth is not None else table
    for r in at.to_dict("records"):
        out.setdefault(str(r["image_id"]), []).append(
            {"method": str(r["method"]), "spearman": _f(r.get("spearman")), "ssim": _f(r.get("ssim")),
             "flagged": str(r["method"]) in flagged})
    return out, flagged


def build_image_table(meta: pd.DataFrame, categories: Sequence[str] | None = None, findings: pd.DataFrame | None = None,
                      scores: pd.DataFrame | None = None, sanity: tuple[pd.DataFrame, dict[str, Any]] | None = None,
                      drift: dict[str, Any] | None = None) -> pd.DataFrame:
    """The per-image table (module docstring) for a feature table's ``meta`` (``image_id, path, label, split,
    pred_top5, prob_top5``; rows in feature order, ``row`` = position).

    ``findings``: a dataset audit's findings table; ``scores``: an attribution audit's scores table; ``sanity``:
    ``(table, manifest)`` of its sanity check; ``drift``: ``{"new_ids": set, "changed": {row: (prev, cur)},
    "new_findings": {image_id: [kinds]}, "resolved_findings": {image_id: [kinds]}}`` (None: no previous run).
    Returns a DataFrame with columns :data:`IMAGE_TABLE_COLUMNS`.
    """
    from reports.sections.core import class_mapping, top1_names

    n = len(meta)
    ids = meta["image_id"].astype(str).tolist()
    paths = meta["path"].astype(str).tolist()
    names = top1_names(meta, list(categories) if categories else None)
    labels = [_s(v) for v in meta["label"]] if "label" in meta.columns else [None] * n
    splits = [_s(v) for v in meta["split"]] if "split" in meta.columns else [None] * n
    pred_idx: list[int | None] = [None] * n
    probs: list[float | None] = [None] * n
    if "pred_top5" in meta.columns:
        prob5 = meta["prob_top5"].tolist() if "prob_top5" in meta.columns else [None] * n
        for i, (p, q) in enumerate(zip(meta["pred_top5"].tolist(), prob5)):
            if p is not None and len(p):
                pred_idx[i] = int(p[0])
                probs[i] = _f(q[0]) if q is not None and len(q) else None
    n_classes = len(categories) if categories else (max((p for p in pred_idx if p is not None), default=-1) + 1)
    mapping = class_mapping(labels, list(categories) if categories else None, n_classes or None)
    correct: list[bool | None] = [None] * n
    if mapping is not None:
        correct = [None if lab not in mapping or p is None else mapping[lab] == p for lab, p in zip(labels, pred_idx)]
    cols: dict[str, list[Any]] = {
        "row": list(range(n)), "image_id": ids, "path": paths, "label": labels, "split": splits, "pred": names,
        "pred_index": pred_idx, "prob": probs, "correct": correct,
    }
    for c in IMAGE_TABLE_COLUMNS:
        if c not in cols:
            cols[c] = [[] for _ in range(n)] if c in _LIST_COLUMNS else [None] * n
    # sparse joins: only the rows something was found about are touched (O(N) lists + O(findings) work)
    rows_of_path = {p: i for i, p in enumerate(paths)}
    rows_of_id: dict[str, list[int]] = {}
    for i, x in enumerate(ids):
        rows_of_id.setdefault(x, []).append(i)
    for path, f in _findings_by_path(findings).items():
        i = rows_of_path.get(path)
        if i is not None:
            for k, v in f.items():
                cols[k][i] = list(v) if k == "findings" else v
    san, flagged = _sanity_by_id(sanity)
    for iid, a in _attribution_by_id(scores).items():
        methods = {x["method"] for x in a["faithfulness"]}
        for i in rows_of_id.get(iid, []):
            cols["faithfulness"][i] = a["faithfulness"]
            if a.get("best"):
                cols["best_method"][i], cols["best_gap"][i] = a["best"]
            cols["unreliable_methods"][i] = sorted(methods & flagged)
    for iid, lst in san.items():
        for i in rows_of_id.get(iid, []):
            cols["sanity"][i] = lst
    if drift is not None:
        new_ids = set(drift.get("new_ids") or ())
        changed = drift.get("changed") or {}
        new_f = drift.get("new_findings") or {}
        res_f = drift.get("resolved_findings") or {}
        cols["new_image"] = [x in new_ids for x in ids]
        cols["pred_changed"] = [i in changed for i in range(n)]
        cols["since_last_run"] = [""] * n
        touched = {i for x in set(new_ids) | set(new_f) | set(res_f) for i in rows_of_id.get(x, [])} | set(changed)
        for i in touched:
            notes = []
            cols["new_findings"][i] = list(new_f.get(ids[i], []))
            cols["resolved_findings"][i] = list(res_f.get(ids[i], []))
            if cols["new_image"][i]:
                notes.append("new image")
            if i in changed:
                prev, cur = changed[i]
                notes.append(f"prediction {prev} → {cur}")
            if cols["new_findings"][i]:
                notes.append("new finding: " + ", ".join(cols["new_findings"][i]))
            if cols["resolved_findings"][i]:
                notes.append("resolved: " + ", ".join(cols["resolved_findings"][i]))
            cols["since_last_run"][i] = "; ".join(notes)
    return pd.DataFrame({c: cols[c] for c in IMAGE_TABLE_COLUMNS}, columns=list(IMAGE_TABLE_COLUMNS))


def publish_image_table(store: str | Path, features_id: str, fman: dict[str, Any], table: pd.DataFrame,
                        sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store ``table`` as ``audits/images-<features>-<hash>/`` (kind ``image-table``, one Parquet part, role
    ``images``), replacing the previous one of ``features_id`` under its writer lock. ``sources`` names the
    artefacts joined (recorded in the manifest). Returns the manifest."""
    import pyarrow as pa

    from storage.features import remove_garbage, write_part
    from storage.locks import artefact_lock
    from storage.manifest import CODE_VERSION, write_manifest
    from storage.paths import Store, artefact_id

    s = store if isinstance(store, Store) else Store(store)
    aid = artefact_id(f"images-{features_id[:40]}", {"features": features_id, "code_version": CODE_VERSION,
                                                      "kind": "image-table"})
    adir = s.artefact_dir("audits", aid, create=True)
    tbl = pa.Table.from_pandas(table[list(IMAGE_TABLE_COLUMNS)], schema=image_table_schema(), preserve_index=False)
    with artefact_lock(adir):
        entry = write_part(adir, tbl, prefix="images")
        manifest = {"kind": "image-table", "artefact_id": aid,
                    "features": {"id": features_id, "created": fman.get("created")},
                    "rows": int(len(table)), "columns": list(IMAGE_TABLE_COLUMNS), "sources": sources or {},
                    "files": [dict(entry, role="images")]}
        published = write_manifest(adir, manifest)
        remove_garbage(adir, published)
    return published


def _t(v: Any) -> str:
    """Display text of a cell: '' for None / NaN (pandas' string columns turn None into NaN)."""
    return clean_text(_s(v) or "")


def _b(v: Any) -> bool | None:
    return None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else bool(v)


def _num(v: Any, d: int = 3) -> float | None:
    f = _f(v)
    return None if f is None else round(f, d)


def image_table_view(table: pd.DataFrame, stored_as: str | None = None, max_rows: int = 20_000) -> dict[str, Any]:
    """Template data for the per-image section: counts, the filter choices and the rows as compact JSON
    (``{"rows": [{...}], ...}``: short keys, empty values left out, strings cleaned; the page sorts, filters and
    pages them). At most ``max_rows`` rows are embedded: those with a finding, a map, news since the last run or
    a wrong prediction first, then the rest in feature order (the stored table has them all)."""
    if table is None or table.empty:
        return {"present": False}
    kinds = sorted({k for ks in table["findings"] for k in ks})
    methods = sorted({x["method"] for fs in table["faithfulness"] for x in fs})
    has_drift = bool(table["new_image"].notna().any())
    keep = _priority(table)[:max_rows]
    rows = []
    for r in table.iloc[np.sort(keep)].to_dict("records"):
        faith: dict[str, list[float | None]] = {}
        for x in r["faithfulness"]:
            if x["method"] not in faith or str(x.get("target_kind") or "").startswith("pred"):
                faith[x["method"]] = [_num(x["deletion_auc"]), _num(x["insertion_auc"])]
        full = {
            "r": int(r["row"]), "p": _t(r["path"]), "l": _t(r["label"]), "s": _t(r["split"]), "pr": _t(r["pred"]),
            "c": _num(r["prob"]), "ok": _b(r["correct"]), "f": [clean_text(k) for k in r["findings"]],
            "dup": _t(r["duplicate_of"]), "g": None if _f(r["duplicate_group"]) is None else int(r["duplicate_group"]),
            "lk": _t(r["leak_partner"]), "ls": _num(r["label_issue_score"]), "sg": _t(r["suggested_label"]),
            "o": _num(r["outlier_score"]), "a": faith, "b": _t(r["best_method"]), "bg": _num(r["best_gap"]),
            "sa": {x["method"]: _num(x["spearman"]) for x in r["sanity"]},
            "u": [clean_text(m) for m in r["unreliable_methods"]], "nw": _b(r["new_image"]), "ch": _b(r["pred_changed"]),
            "nf": [clean_text(k) for k in r["new_findings"]], "rf": [clean_text(k) for k in r["resolved_findings"]],
            "sl": _t(r["since_last_run"]),
        }
        rows.append({k: v for k, v in full.items() if k in ("r", "p") or v not in (None, "", [], {})})
    counts = {k: int(sum(k in ks for ks in table["findings"])) for k in kinds}
    presets = [{"label": lab, "state": st} for lab, st in PRESETS]
    return {
        "present": True, "n": int(len(table)), "shown": len(rows), "kinds": [clean_text(k) for k in kinds],
        "counts": counts, "methods": [clean_text(m) for m in methods], "has_drift": has_drift,
        "n_attr": int(sum(bool(fs) for fs in table["faithfulness"])),
        "n_new": int(sum(bool(v) for v in table["new_image"] if v is not None and not pd.isna(v))) if has_drift else 0,
        "stored_as": clean_text(stored_as or ""), "presets": presets,
        "json": safe_json({"rows": rows, "methods": methods, "presets": presets, "n": int(len(table))}),
    }


def _priority(table: pd.DataFrame) -> np.ndarray:
    """Row positions, the interesting ones (a finding, a map, news, a wrong prediction) first, each group in order."""
    hot = ((table["findings"].map(len) > 0) | (table["faithfulness"].map(len) > 0)
           | (table["since_last_run"].fillna("").astype(str) != "") | (table["correct"].map(lambda v: v is False)))
    hot = hot.to_numpy(bool)
    return np.r_[np.flatnonzero(hot), np.flatnonzero(~hot)]


def needed_rows(table: pd.DataFrame, limit: int = 2000) -> list[int]:
    """Rows worth a thumbnail in the table: those with a finding, a map or news since the last run (first ``limit``)."""
    if table is None or table.empty:
        return []
    mask = ((table["findings"].map(len) > 0) | (table["faithfulness"].map(len) > 0)
            | (table["since_last_run"].fillna("").astype(str) != ""))
    return [int(r) for r in np.asarray(table.loc[mask, "row"])[:limit]]


def report_view(store: Any, fid: str, fman: dict[str, Any], meta: pd.DataFrame, categories: Sequence[str] | None,
                drift: dict[str, Any] | None, needed: set[int], publish: bool = True) -> dict[str, Any]:
    """Build the per-image table for the report from the store's newest dataset audit, attribution audit and
    its sanity check of ``fid`` (+ ``drift`` when the report compares with a previous run), publish it
    (``publish``; a store that cannot be written is logged and the report goes on) and return the view.
    Rows worth a thumbnail are added to ``needed``."""
    from reports.sections.core import current_findings
    from storage.artefacts import artefacts_of
    from storage.audits import load_scores, read_sanity
    from storage.errors import ConvlensError

    findings = current_findings(store, fid)
    scores, sanity, sources = None, None, {}
    attr = artefacts_of(store, "attribution", fid)
    try:
        if attr:
            aid, am, adir = attr[0]
            scores, sources["attribution"] = load_scores(adir, am), aid
            sanity = read_sanity(store, aid)
            if sanity is not None:
                sources["sanity"] = sanity[1].get("artefact_id")
    except ConvlensError as exc:
        log.warning("per-image table without attribution scores: %s", exc)
    da = artefacts_of(store, "dataset-audit", fid)
    if da and findings is not None:
        sources["dataset_audit"] = da[0][0]
    d = None
    if drift and drift.get("present"):
        fd = drift.get("findings") or {}
        d = {"new_ids": drift.get("new_ids") or set(), "changed": drift.get("changed_all") or {},
             "new_findings": (fd.get("by_image") or {}).get("new", {}),
             "resolved_findings": (fd.get("by_image") or {}).get("resolved", {})}
        sources["compared_with"] = drift.get("previous")
    table = build_image_table(meta, categories, findings, scores, sanity, d)
    stored_as = None
    if publish:
        try:
            stored_as = publish_image_table(store, fid, fman, table, sources)["artefact_id"]
        except (OSError, ConvlensError) as exc:
            log.warning("per-image table not stored (%s); the report still shows it", exc)
    needed.update(needed_rows(table))
    return image_table_view(table, stored_as)
