"""Sections computed from the feature artefact itself: run summary, accuracy / prediction table, drift.

Each builder returns a plain dict the template renders (strings are raw text; Jinja2 autoescapes them).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import pandas as pd

from reports.figures import binary_auc, clean_text, heat_color, top_counts

__all__ = [
    "run_summary",
    "class_mapping",
    "accuracy_section",
    "drift_section",
    "findings_drift",
    "previous_findings",
    "current_findings",
    "drift_rows",
    "top1_names",
]

log = logging.getLogger(__name__)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


def run_summary(fid: str, fman: dict[str, Any], rejects: pd.DataFrame) -> dict[str, Any]:
    """Facts of the feature run: dataset, model, weights hash, layer, counts, rejects by reason, timings, versions."""
    model = fman.get("model", {}) or {}
    run = fman.get("run", {}) or {}
    pre = fman.get("preprocessing", {}) or {}
    facts = [
        ("features artefact", fid),
        ("created", fman.get("created", "")),
        ("dataset", fman.get("data") or fman.get("dataset_root", "")),
        ("model", model.get("arch", "")),
        ("weights", model.get("weights", "")),
        ("weights sha256", model.get("weights_sha256") or "—"),
        ("layer", f"{(fman.get('layer') or {}).get('name', '')} (alias {(fman.get('layer') or {}).get('alias') or '—'}, "
                  f"{(fman.get('layer') or {}).get('side', '')})"),
        ("pooling / dim", f"{fman.get('pool', '')} / {fman.get('dim', '')}"),
        ("preprocessing", ", ".join(f"{k}={v}" for k, v in pre.items())),
        ("rows / unique images", f"{fman.get('rows', 0)} / {fman.get('unique_images', fman.get('rows', 0))}"),
        ("rejects", str(fman.get("rejects", len(rejects)))),
        ("predictions stored", "yes" if fman.get("with_preds") else "no (no classifier head)"),
        ("last run", f"{run.get('extracted', 0)} extracted, {run.get('reused', 0)} reused in "
                     f"{run.get('seconds', 0.0):.1f} s ({run.get('images_per_s', 0.0):.1f} images/s)"),
        ("code version", fman.get("code_version", "")),
        ("library versions", ", ".join(f"{k} {v}" for k, v in (fman.get("library_versions") or {}).items())),
    ]
    labels = fman.get("labels") or {}
    reasons = top_counts(rejects["reason"].tolist(), 50) if len(rejects) else []
    reject_rows = [
        {"path": clean_text(r.path), "reason": clean_text(r.reason), "detail": clean_text(r.detail)}
        for r in rejects.head(200).itertuples()
    ]
    return {
        "facts": [(k, clean_text(v)) for k, v in facts],
        "labels": [(clean_text(k), int(v)) for k, v in sorted(labels.items(), key=lambda kv: -kv[1])[:100]],
        "n_labels": len(labels),
        "reasons": [(clean_text(k), v) for k, v in reasons],
        "rejects": reject_rows,
        "n_rejects": int(len(rejects)),
    }


def top1_names(meta: pd.DataFrame, categories: list[str] | None) -> list[str | None]:
    """Top-1 predicted class name per row (class index as text when there are no names; None without preds)."""
    if "pred_top5" not in meta.columns:
        return [None] * len(meta)
    out: list[str | None] = []
    for p in meta["pred_top5"]:
        if p is None or len(p) == 0:
            out.append(None)
            continue
        c = int(p[0])
        out.append(categories[c] if categories and 0 <= c < len(categories) else str(c))
    return out


def class_mapping(labels: list[Any], categories: list[str] | None, n_classes: int | None) -> dict[str, int] | None:
    """Map label text -> class index when the labels *are* the model's classes, else None.

    Labels match when (after lower-casing, ``_``/``-`` -> space) they equal category names, or when the model
    has no category names and the labels are integer class indices. At least 90 % of the labelled rows must
    map; otherwise accuracy would be meaningless and the report shows the label x prediction table instead.
    """
    present = [str(x) for x in labels if x is not None]
    if not present:
        return None
    uniq = sorted(set(present))
    mapping: dict[str, int] = {}
    if categories:
        by_name = {}
        for i, c in enumerate(categories):
            by_name.setdefault(_norm(c), i)
        for u in uniq:
            if _norm(u) in by_name:
                mapping[u] = by_name[_norm(u)]
    elif n_classes:
        for u in uniq:
            if re.fullmatch(r"\d+", u) and int(u) < n_classes:
                mapping[u] = int(u)
    covered = sum(1 for x in present if x in mapping)
    return mapping if mapping and covered >= 0.9 * len(present) else None


def _matrix_table(row_names: list[str], col_names: list[str], counts: np.ndarray, row_totals: np.ndarray) -> dict[str, Any]:
    vmax = float(counts.max()) if counts.size else 0.0
    rows = []
    for i, name in enumerate(row_names):
        cells = []
        for j in range(len(col_names)):
            v = int(counts[i, j])
            frac = v / row_totals[i] if row_totals[i] else 0.0
            cells.append({"v": v, "bg": heat_color(v, vmax), "dark": v > 0.45 * vmax if vmax else False,
                          "title": f"{name} -> {col_names[j]}: {v} ({frac:.0%})"})
        rows.append({"name": name, "total": int(row_totals[i]), "cells": cells})
    return {"cols": col_names, "rows": rows}


def accuracy_section(meta: pd.DataFrame, categories: list[str] | None, max_classes: int = 30,
                     max_examples: int = 6, seed: int = 0) -> dict[str, Any]:
    """Per-class accuracy + confusion heatmap + top confusions (accuracy mode), or a label x top-1 prediction
    table (distribution mode) when the labels are not the model's classes. ``examples`` hold row indices."""
    rng = np.random.default_rng(seed)
    has_labels = "label" in meta.columns and meta["label"].notna().any()
    has_preds = "pred_top5" in meta.columns and meta["pred_top5"].notna().any()
    if not has_labels or not has_preds:
        return {"present": False, "why": "no labels in the dataset" if not has_labels else
                "the model has no classifier head, so no predictions were stored"}
    labels = meta["label"].astype(object).where(meta["label"].notna(), None).tolist()
    preds = [None if p is None else np.asarray(p, dtype=np.int64) for p in meta["pred_top5"]]
    names = top1_names(meta, categories)
    n_classes = len(categories) if categories else int(max((int(p.max()) for p in preds if p is not None), default=0)) + 1
    mapping = class_mapping(labels, categories, n_classes)
    labelled = [i for i, lab in enumerate(labels) if lab is not None and preds[i] is not None]
    if mapping is None:
        # distribution mode: label x top-1 predicted class
        lab_names = [n for n, _ in top_counts([str(labels[i]) for i in labelled], max_classes)]
        col_names = [n for n, _ in top_counts([names[i] for i in labelled], 12)]
        col_idx = {c: j for j, c in enumerate(col_names)}
        row_idx = {n: i for i, n in enumerate(lab_names)}
        counts = np.zeros((len(lab_names), len(col_names) + 1), np.int64)
        for i in labelled:
            r = row_idx.get(str(labels[i]))
            if r is not None:
                counts[r, col_idx.get(names[i], len(col_names))] += 1
        table = _matrix_table([clean_text(n) for n in lab_names], [clean_text(c) for c in col_names] + ["(other)"],
                              counts, counts.sum(1))
        per_label = []
        for n in lab_names:
            rows_n = [i for i in labelled if str(labels[i]) == n]
            tops = top_counts([names[i] for i in rows_n], 3)
            ex = rng.choice(rows_n, min(max_examples, len(rows_n)), replace=False).tolist() if rows_n else []
            per_label.append({"label": clean_text(n), "n": len(rows_n),
                              "top": [(clean_text(k), v, v / len(rows_n)) for k, v in tops], "examples": sorted(ex)})
        return {"present": True, "mode": "distribution", "table": table, "per_label": per_label,
                "note": "The labels are not the model's classes (e.g. an ImageNet model on another label set), so "
                        "accuracy is undefined; the table shows what the model predicts for each label."}
    # accuracy mode
    true = {i: mapping[str(labels[i])] for i in labelled if str(labels[i]) in mapping}
    top1 = {i: int(preds[i][0]) for i in true}
    classes = sorted(set(true.values()))
    cname = {c: (categories[c] if categories and c < len(categories) else str(c)) for c in set(classes) | set(top1.values())}
    per_class = []
    for c in classes:
        rows_c = [i for i, t in true.items() if t == c]
        ok1 = sum(top1[i] == c for i in rows_c)
        ok5 = sum(c in preds[i][:5] for i in rows_c)
        per_class.append({"cls": c, "name": clean_text(cname[c]), "n": len(rows_c),
                          "acc1": ok1 / len(rows_c), "acc5": ok5 / len(rows_c)})
    per_class.sort(key=lambda r: (r["acc1"], -r["n"]))
    overall1 = sum(top1[i] == t for i, t in true.items()) / len(true)
    overall5 = sum(t in preds[i][:5] for i, t in true.items()) / len(true)
    pairs: dict[tuple[int, int], list[int]] = {}
    for i, t in true.items():
        if top1[i] != t:
            pairs.setdefault((t, top1[i]), []).append(i)
    confusions = []
    for (t, p), rows_tp in sorted(pairs.items(), key=lambda kv: -len(kv[1]))[:12]:
        ex = sorted(rng.choice(rows_tp, min(max_examples, len(rows_tp)), replace=False).tolist())
        confusions.append({"true": clean_text(cname[t]), "pred": clean_text(cname[p]), "n": len(rows_tp), "examples": ex})
    # confusion matrix over the (at most max_classes) classes with most errors, columns = same + other
    err = {c: 0 for c in classes}
    for (t, _p), rows_tp in pairs.items():
        err[t] += len(rows_tp)
    shown = sorted(classes, key=lambda c: (-err[c], c))[:max_classes]
    shown.sort()
    pos = {c: j for j, c in enumerate(shown)}
    counts = np.zeros((len(shown), len(shown) + 1), np.int64)
    for i, t in true.items():
        if t in pos:
            counts[pos[t], pos.get(top1[i], len(shown))] += 1
    table = _matrix_table([clean_text(cname[c]) for c in shown], [clean_text(cname[c]) for c in shown] + ["(other)"],
                          counts, counts.sum(1))
    return {"present": True, "mode": "accuracy", "overall1": overall1, "overall5": overall5, "n": len(true),
            "per_class": per_class, "confusions": confusions, "table": table,
            "truncated": len(classes) > max_classes, "n_classes": len(classes),
            "correct": {i: bool(top1[i] == t) for i, t in true.items()}}


def _per_label_top1(meta: pd.DataFrame, categories: list[str] | None) -> dict[str, dict[str, Any]]:
    names = top1_names(meta, categories)
    labels = meta["label"].tolist() if "label" in meta.columns else [None] * len(meta)
    out: dict[str, dict[str, Any]] = {}
    for lab, nm in zip(labels, names):
        if lab is None or nm is None:
            continue
        d = out.setdefault(str(lab), {"n": 0, "preds": {}})
        d["n"] += 1
        d["preds"][nm] = d["preds"].get(nm, 0) + 1
    return out


def drift_section(cur: tuple[str, dict[str, Any], pd.DataFrame, np.ndarray],
                  prev: tuple[str, dict[str, Any], pd.DataFrame, np.ndarray],
                  categories: list[str] | None, prev_categories: list[str] | None,
                  max_rows: int = 5000, seed: int = 0, max_examples: int = 24, most_different: int = 8,
                  neighbours: int = 4, thumb_px: int = 64) -> dict[str, Any]:
    """Drift of the current feature artefact vs a previous one.

    ``cur``/``prev`` are ``(artefact id, manifest, meta, feats (N, D) float32)``. Returns new/removed image
    counts (by content hash), per-label accuracy (or top-1 agreement) change, mean-embedding cosine distance
    and a domain-classifier AUC (logistic regression, 3-fold, on at most ``max_rows`` sampled rows per side;
    0.5 = indistinguishable), and the images whose top-1 prediction changed (row indices of ``cur``).

    ``most_different``: the new images (same model only) the domain classifier scores as most unlike the
    previous run (its out-of-fold decision value), each with its ``neighbours`` nearest previous images by
    cosine similarity of the features: ``[{"row", "score", "neighbours": [{"row" (a current row, or None for an
    image no longer in the dataset), "uri" (its thumbnail then), "path", "sim"}]}]``.
    """
    cid, cman, cmeta, cfeat = cur
    pid, pman, pmeta, pfeat = prev
    cur_ids, prev_ids = set(cmeta["image_id"]), set(pmeta["image_id"])
    new_ids, removed_ids = cur_ids - prev_ids, prev_ids - cur_ids
    new_rows = [i for i, x in enumerate(cmeta["image_id"]) if x in new_ids]
    removed_paths = sorted({clean_text(p) for p, x in zip(pmeta["path"], pmeta["image_id"]) if x in removed_ids})
    out: dict[str, Any] = {
        "present": True, "previous": pid, "previous_created": pman.get("created", ""),
        "n_cur": len(cmeta), "n_prev": len(pmeta), "n_new": len(new_ids), "n_removed": len(removed_ids),
        "n_common": len(cur_ids & prev_ids), "new_examples": new_rows[:max_examples],
        "removed_paths": removed_paths[:50],
        "same_model": (cman.get("model", {}).get("arch"), cman.get("model", {}).get("weights_sha256"),
                       (cman.get("layer") or {}).get("name")) ==
                      (pman.get("model", {}).get("arch"), pman.get("model", {}).get("weights_sha256"),
                       (pman.get("layer") or {}).get("name")),
    }
    # embedding drift
    if cfeat.shape[1] == pfeat.shape[1] and len(cfeat) and len(pfeat):
        mc, mp = cfeat.mean(0).astype(np.float64), pfeat.mean(0).astype(np.float64)
        denom = np.linalg.norm(mc) * np.linalg.norm(mp)
        out["mean_cosine_distance"] = float(1.0 - mc @ mp / denom) if denom > 0 else float("nan")
        # Same model: shared images have identical features, and identical rows on both sides make the
        # cross-validated classifier anti-correlated (AUC far below 0.5); compare what arrived with what was
        # there instead. Another model / too few new rows: the whole sets.
        new_mask = np.fromiter((x in new_ids for x in cmeta["image_id"]), bool, len(cmeta))
        if out["same_model"] and new_mask.sum() >= 3 and out["n_common"]:
            # the few new rows bound the AUC's precision: 20 previous rows per new one are plenty (and cheap)
            k = min(len(pfeat), max(200, 20 * int(new_mask.sum())))
            pick = np.sort(np.random.default_rng(seed + 1).choice(len(pfeat), k, replace=False))
            a_rows = np.flatnonzero(new_mask)
            out["domain_auc"], picked, scores = _domain_scores(cfeat[new_mask], pfeat[pick], max_rows, seed)
            out["domain_auc_of"] = "new images vs the previous run"
        else:
            a_rows = np.arange(len(cfeat))
            out["domain_auc"], picked, scores = _domain_scores(cfeat, pfeat, max_rows, seed)
            out["domain_auc_of"] = "this run vs the previous run"
        out["most_different"] = []
        if out["same_model"] and most_different > 0 and len(picked):
            rows = a_rows[picked]
            keep = new_mask[rows]
            order = np.argsort(-scores[keep], kind="stable")[:most_different]
            out["most_different"] = _with_old_neighbours(rows[keep][order], scores[keep][order], cfeat, pfeat, cmeta, pmeta,
                                                         pman.get("dataset_root"), neighbours, thumb_px)
    else:
        out["mean_cosine_distance"] = None
        out["domain_auc"] = None
        out["most_different"] = []
        out["embedding_note"] = (f"feature dimensions differ ({cfeat.shape[1]} vs {pfeat.shape[1]}): embeddings "
                                 "of different layers/models are not comparable")
    # per-label change
    cl, pl = _per_label_top1(cmeta, categories), _per_label_top1(pmeta, prev_categories)
    acc_c = accuracy_section(cmeta, categories)
    acc_p = accuracy_section(pmeta, prev_categories)
    rows = []
    if acc_c.get("mode") == "accuracy" and acc_p.get("mode") == "accuracy":
        out["label_mode"] = "accuracy"
        pc = {r["name"]: r for r in acc_p["per_class"]}
        for r in acc_c["per_class"]:
            p = pc.get(r["name"])
            rows.append({"label": r["name"], "n_cur": r["n"], "n_prev": p["n"] if p else 0, "cur": r["acc1"],
                         "prev": p["acc1"] if p else None, "delta": r["acc1"] - p["acc1"] if p else None})
    else:
        out["label_mode"] = "top1"
        for lab in sorted(set(cl) | set(pl)):
            c, p = cl.get(lab), pl.get(lab)
            ctop = max(c["preds"].items(), key=lambda kv: kv[1]) if c else None
            share_c = ctop[1] / c["n"] if c else None
            share_p = (p["preds"].get(ctop[0], 0) / p["n"]) if (p and ctop) else None
            rows.append({"label": clean_text(lab), "n_cur": c["n"] if c else 0, "n_prev": p["n"] if p else 0,
                         "top": clean_text(ctop[0]) if ctop else "", "cur": share_c, "prev": share_p,
                         "delta": (share_c - share_p) if (share_c is not None and share_p is not None) else None})
    rows.sort(key=lambda r: -abs(r["delta"]) if r["delta"] is not None else 0)
    out["per_label"] = rows[:100]
    # changed predictions among images present in both
    changed = []
    if "pred_top5" in cmeta.columns and "pred_top5" in pmeta.columns:
        prev_top: dict[str, int] = {}
        for x, p in zip(pmeta["image_id"], pmeta["pred_top5"]):
            if p is not None and len(p):
                prev_top.setdefault(x, int(p[0]))
        for i, (x, p) in enumerate(zip(cmeta["image_id"], cmeta["pred_top5"])):
            if p is not None and len(p) and x in prev_top and prev_top[x] != int(p[0]):
                a = prev_top[x]
                b = int(p[0])
                changed.append({"row": i,
                                "prev": clean_text(prev_categories[a] if prev_categories and a < len(prev_categories) else a),
                                "cur": clean_text(categories[b] if categories and b < len(categories) else b)})
    out["n_changed"] = len(changed)
    out["changed"] = changed[:max_examples]
    # for the per-image table (not rendered as such): every new image id and every changed prediction
    out["new_ids"] = new_ids
    out["changed_all"] = {c["row"]: (c["prev"], c["cur"]) for c in changed}
    return out


def current_findings(store: Any, fid: str) -> pd.DataFrame | None:
    """The findings table of the newest dataset audit of the features ``fid`` (verified), or None."""
    from storage.audits import read_findings
    from storage.errors import StoreError

    try:
        return read_findings(store, features_id=fid)
    except StoreError:
        return None


def drift_rows(drift: dict[str, Any]) -> set[int]:
    """Current rows the drift section shows as thumbnails (findings drift, most-different images and neighbours)."""
    rows: set[int] = set()
    for k in (drift.get("findings") or {}).get("kinds", []):
        for e in k["new"] + k["resolved"]:
            rows.update(r for r in (e["row"], e["other_row"]) if r is not None)
    for d in drift.get("most_different") or []:
        rows.add(d["row"])
        rows.update(nb["row"] for nb in d["neighbours"] if nb["row"] is not None)
    return rows


def _domain_auc(a: np.ndarray, b: np.ndarray, max_rows: int, seed: int) -> float | None:
    """Cross-validated AUC of a logistic regression telling ``a`` rows from ``b`` rows (0.5 = no drift)."""
    return _domain_scores(a, b, max_rows, seed)[0]


def _domain_scores(a: np.ndarray, b: np.ndarray, max_rows: int, seed: int) -> tuple[float | None, np.ndarray, np.ndarray]:
    """The domain classifier: ``(AUC or None, picked rows of a (K,) int64, their out-of-fold decision values (K,))``.

    A logistic regression (standardised features, C = 0.1) tells ``a`` rows (label 1, e.g. the new images) from
    ``b`` rows, on at most ``max_rows`` sampled rows per side, 3-fold; each ``a`` row's score comes from the fold
    that did not train on it, so a high score means "unlike anything the classifier saw of ``b``"."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    ia = rng.choice(len(a), min(len(a), max_rows), replace=False)
    a = a[ia]
    b = b[rng.choice(len(b), min(len(b), max_rows), replace=False)]
    if len(a) < 3 or len(b) < 3:
        return None, np.zeros(0, np.int64), np.zeros(0)
    x = np.concatenate([a, b]).astype(np.float64)
    y = np.r_[np.ones(len(a), int), np.zeros(len(b), int)]
    scores = np.zeros(len(y))
    for tr, te in StratifiedKFold(n_splits=3, shuffle=True, random_state=seed).split(x, y):
        sc = StandardScaler().fit(x[tr])
        clf = LogisticRegression(max_iter=500, C=0.1).fit(sc.transform(x[tr]), y[tr])
        scores[te] = clf.decision_function(sc.transform(x[te]))
    auc = binary_auc(scores, y)
    return (None if np.isnan(auc) else auc), ia.astype(np.int64), scores[: len(a)]


def _with_old_neighbours(rows: np.ndarray, scores: np.ndarray, cfeat: np.ndarray, pfeat: np.ndarray,
                         cmeta: pd.DataFrame, pmeta: pd.DataFrame, prev_root: str | None, k: int,
                         thumb_px: int) -> list[dict[str, Any]]:
    """Each current row with its ``k`` nearest previous rows (cosine); an old neighbour still in the dataset is
    named by its current row (the page's thumbnail), one that is gone gets its own thumbnail from the previous
    run's dataset root."""
    from reports.figures import thumbnail

    if not len(rows) or not len(pfeat):
        return []
    cur_row = {x: i for i, x in enumerate(cmeta["image_id"])}
    pn = pfeat / np.maximum(np.linalg.norm(pfeat, axis=1, keepdims=True), 1e-12)
    q = cfeat[rows] / np.maximum(np.linalg.norm(cfeat[rows], axis=1, keepdims=True), 1e-12)
    sims = q @ pn.T
    kk = min(k, len(pfeat))
    out = []
    for i, r in enumerate(rows):
        top = np.argsort(-sims[i], kind="stable")[:kk]
        nbs = []
        for j in top:
            iid, path = str(pmeta["image_id"].iloc[j]), str(pmeta["path"].iloc[j])
            row = cur_row.get(iid)
            uri = thumbnail(prev_root, path, thumb_px)[0] if row is None else None
            nbs.append({"row": row, "uri": uri, "path": clean_text(path), "sim": float(sims[i, j])})
        out.append({"row": int(r), "score": float(scores[i]), "neighbours": nbs})
    return out


_FINDING_TITLES = {"leakage": "train/test leaks", "exact-duplicate": "exact duplicates", "near-duplicate": "near-duplicates",
                   "label-disagreement": "likely label errors", "outlier": "outliers"}


def _finding_keys(df: pd.DataFrame | None) -> dict[tuple[str, ...], dict[str, Any]]:
    """One key per finding: ``(kind, image_id)``, or ``(leakage, id_a, id_b)`` (sorted) for a leak pair."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    if df is None or df.empty or not {"finding", "image_id"} <= set(df.columns):
        return out
    for r in df.to_dict("records"):
        kind, iid = str(r["finding"]), str(r.get("image_id"))
        other = r.get("other_image_id")
        other = None if other is None or (isinstance(other, float) and np.isnan(other)) else str(other)
        key = ("leakage", *sorted((iid, other or ""))) if kind == "leakage" else (kind, iid)
        out.setdefault(key, r)
    return out


def findings_drift(cur: pd.DataFrame | None, prev: pd.DataFrame | None, cmeta: pd.DataFrame,
                   max_examples: int = 12) -> dict[str, Any]:
    """New and resolved dataset-audit findings, night over night (tables with :data:`storage.audits.FINDING_COLUMNS`).

    A finding is ``(kind, image_id)`` — the same picture keeps its identity whatever its path — or, for a leak,
    the unordered pair of image ids. Per kind: ``n_prev``, ``n_cur``, ``n_new``, ``n_resolved`` and examples
    (``{"row" (current row or None), "path", "other_row", "other_path", "gone"}``; ``gone``: the image left the
    dataset, which resolved it). ``by_image``: ``{"new": {image_id: [kinds]}, "resolved": {...}}`` for the
    per-image table. ``present`` is False when either side has no dataset audit.
    """
    if cur is None or prev is None:
        return {"present": False, "kinds": [], "by_image": {"new": {}, "resolved": {}},
                "why": "no dataset audit " + ("for this run" if cur is None else "for the previous run")}
    ck, pk = _finding_keys(cur), _finding_keys(prev)
    row_of = {}
    for i, x in enumerate(cmeta["image_id"].astype(str)):
        row_of.setdefault(x, i)
    by_image: dict[str, dict[str, list[str]]] = {"new": {}, "resolved": {}}

    def entry(r: dict[str, Any]) -> dict[str, Any]:
        iid, oid = str(r.get("image_id")), r.get("other_image_id")
        op = r.get("other_path")
        return {"row": row_of.get(iid), "path": clean_text(r.get("path", "")),
                "other_row": row_of.get(str(oid)) if isinstance(oid, str) else None,
                "other_path": clean_text(op) if isinstance(op, str) else "", "gone": iid not in row_of}

    kinds = []
    for kind in ("leakage", "exact-duplicate", "near-duplicate", "label-disagreement", "outlier"):
        new = [k for k in ck if k[0] == kind and k not in pk]
        res = [k for k in pk if k[0] == kind and k not in ck]
        for side, keys in (("new", new), ("resolved", res)):
            for k in keys:
                for iid in k[1:]:
                    if iid:
                        lst = by_image[side].setdefault(iid, [])
                        if kind not in lst:
                            lst.append(kind)
        kinds.append({"kind": kind, "title": _FINDING_TITLES[kind], "n_prev": sum(k[0] == kind for k in pk),
                      "n_cur": sum(k[0] == kind for k in ck), "n_new": len(new), "n_resolved": len(res),
                      "new": [entry(ck[k]) for k in new[:max_examples]],
                      "resolved": [entry(pk[k]) for k in res[:max_examples]]})
    return {"present": True, "kinds": kinds, "by_image": by_image,
            "n_new": sum(k["n_new"] for k in kinds), "n_resolved": sum(k["n_resolved"] for k in kinds)}


def previous_findings(store: Any, pid: str, pdir: Any) -> pd.DataFrame | None:
    """The previous run's dataset-audit findings: the copy a nightly run record keeps beside its features
    snapshot (``pdir`` = ``runs/<run>/<run>``; the live audit is replaced by tonight's), else the newest
    dataset audit built from the features artefact ``pid`` in the store holding ``pdir`` or in ``store``; None
    when there is neither.
    Files are sha256-verified."""
    from pathlib import Path

    from storage.artefacts import artefacts_of
    from storage.errors import StoreError
    from storage.features import read_part
    from storage.manifest import MANIFEST_NAME, read_manifest

    run_dir = Path(pdir).parent
    try:
        if (run_dir / MANIFEST_NAME).is_file():
            rm = read_manifest(run_dir)
            if rm.get("kind") == "nightly-run":
                entry = next((e for e in rm.get("files", []) if e.get("role") == "findings"), None)
                return None if entry is None else read_part(run_dir, entry).to_pandas()
        # a features folder of another store (``--compare OTHER_STORE``): its own store first
        stores = ([Path(pdir).parent.parent] if Path(pdir).parent.name == "features" else []) + [store]
        for st in stores:
            for _, m, adir in artefacts_of(st, "dataset-audit", pid):
                entry = next((e for e in m.get("files", []) if e.get("role") == "findings"), None)
                if entry is not None:
                    return read_part(adir, entry).to_pandas()
    except StoreError as exc:
        log.warning("previous findings unreadable (%s); the drift section shows no findings drift", exc)
    return None
