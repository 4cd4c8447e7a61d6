"""Attribution gallery: one row per audited (image, target), one overlay per method with its deletion /
insertion AUC, worst-explained rows first, plus a per-method summary ("which method to believe").

Reads an attribution artefact (``tasks/attribution/audit.py``, docs/attribution.md): ``scores`` Parquet parts
(``image_id, path, label, method, target, target_kind, target_name, prob, deletion_auc, insertion_auc,
overlay, ...``) and the ``overlay`` PNGs they name (original | 50/50 JET blend, side by side). Every file is
sha256-checked first. Returns None for an artefact without that layout (the caller falls back to a generic card).

Memory: the scores table (one small row per image x method x target) + at most ``max_rows x methods`` overlay
thumbnails.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports.figures import clean_text, image_data_uri
from reports.sections.stored import open_verified_image, read_verified_table, table_preview
from storage.errors import StoreError

__all__ = ["METHOD_ORDER", "attribution_view", "method_summary", "fmt_auc", "sanity_view", "attach_sanity"]

log = logging.getLogger(__name__)
METHOD_ORDER = ("occlusion", "saliency", "smoothgrad", "integrated_gradients", "guided", "deconvnet", "gradcam",
                "guided_gradcam")
_NEEDED = {"method", "deletion_auc", "insertion_auc"}


def fmt_auc(v: Any) -> str:
    """An AUC (probability x fraction, in [0, 1]) for display: 3 decimals, small values in scientific notation."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(f):
        return "—"
    return f"{f:.3f}" if f == 0 or abs(f) >= 0.001 else f"{f:.1e}"


def _method_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def method_summary(df: pd.DataFrame, best: pd.Series) -> list[dict[str, Any]]:
    """Per (target kind, method): n, mean deletion / insertion AUC, mean gap (insertion - deletion), and how many
    rows the method explains best. ``best`` maps each (image, target) group key to its best method."""
    out = []
    wins = best.value_counts() if len(best) else pd.Series(dtype=int)
    kinds = df["target_kind"].fillna("target").astype(str) if "target_kind" in df.columns else pd.Series("target", index=df.index)
    for kind in sorted(kinds.unique(), key=lambda k: (k != "pred", k)):
        sub = df[kinds == kind]
        bk = best[best.index.isin(sub["_key"].unique())] if len(best) else best
        kwins = bk.value_counts() if len(bk) else wins.iloc[:0]
        rows = []
        for method, g in sub.groupby("method", sort=False):
            rows.append({"target_kind": clean_text(kind), "method": clean_text(method), "n": int(len(g)),
                         "deletion": float(g["deletion_auc"].mean()), "insertion": float(g["insertion_auc"].mean()),
                         "gap": float((g["insertion_auc"] - g["deletion_auc"]).mean()),
                         "wins": int(kwins.get(method, 0)), "believe": False, "sanity_flagged": False})
        rows.sort(key=lambda r: _method_key(r["method"]))
        if rows:
            top = max(rows, key=lambda r: (r["gap"] if math.isfinite(r["gap"]) else -np.inf))
            top["believe"] = True
        out += rows
    return out


def _split_overlay(im) -> tuple[Any, Any]:
    """An overlay PNG (original | blend, side by side) -> (original, blend); (None, whole) for other shapes."""
    w, h = im.size
    if w == 2 * h:
        return im.crop((0, 0, h, h)), im.crop((h, 0, w, h))
    return None, im


def attribution_view(aid: str, m: dict[str, Any], adir: Path, path_rows: dict[str, int], needed: set[int],
                     max_rows: int = 24, quality: int = 82) -> dict[str, Any] | None:
    """Template data for one attribution artefact, or None when it lacks a scores table with method and AUCs.

    Rows: one per (image, target), sorted ascending by the *best* method's insertion - deletion AUC (the image
    that no method explains well comes first); the first ``max_rows`` get their overlays embedded (JPEG).
    """
    files = m.get("files", [])
    score_entries = [e for e in files if e.get("role") == "scores" and e["name"].endswith(".parquet")]
    if not score_entries:
        score_entries = [e for e in files if e["name"].endswith(".parquet") and "score" in e["name"]]
    if not score_entries:
        return None
    view: dict[str, Any] = {"id": clean_text(aid), "title": clean_text(m.get("technique") or m.get("kind") or "attribution"),
                            "error": None, "rows": [], "methods": [], "summary": [], "believe": None, "n_rows": 0,
                            "raw": None, "faith": "", "facts": [], "sanity": None, "believe_flagged": False}
    try:
        df = pd.concat([read_verified_table(adir, e) for e in score_entries], ignore_index=True)
    except StoreError as exc:
        view["error"] = clean_text(str(exc))
        return view
    if not _NEEDED <= set(df.columns) or not ({"path", "image_id"} & set(df.columns)) or df.empty:
        return None
    df = df.copy()
    ident = "image_id" if "image_id" in df.columns else "path"
    tcol = next((c for c in ("target", "target_name", "target_kind") if c in df.columns), None)
    df["_key"] = df[ident].astype(str) + "\x00" + (df[tcol].astype(str) if tcol else "")
    df["_gap"] = df["insertion_auc"].astype(float) - df["deletion_auc"].astype(float)
    methods = sorted({str(x) for x in df["method"]}, key=_method_key)
    # best method per (image, target): the largest insertion - deletion
    finite = df[np.isfinite(df["_gap"])]
    best_idx = finite.groupby("_key")["_gap"].idxmax() if len(finite) else pd.Series(dtype=int)
    best = finite.loc[best_idx.values].set_index("_key")["method"].astype(str) if len(best_idx) else pd.Series(dtype=str)
    best_gap = finite.groupby("_key")["_gap"].max() if len(finite) else pd.Series(dtype=float)
    keys = list(dict.fromkeys(df["_key"]))
    keys.sort(key=lambda k: (0, float(best_gap[k])) if k in best_gap.index else (1, 0.0))
    view["summary"] = method_summary(df, best)
    view["methods"] = [clean_text(x) for x in methods]
    view["n_rows"] = len(keys)
    believe = next((r for r in view["summary"] if r.get("believe")), None)
    view["believe"] = believe
    faith = m.get("faithfulness") or {}
    if faith:
        view["faith"] = clean_text(
            f"Deletion: remove pixels in the map's order (most important first) towards {faith.get('deletion_baseline', 'the baseline')}; "
            f"insertion: add them back, starting from {faith.get('insertion_start', 'a blurred image')}; "
            f"score = {faith.get('score', 'prob')} of the target, {faith.get('steps', '?')} steps. "
            "Lower deletion AUC and higher insertion AUC mean a more faithful map.")
    overlays = {e["name"]: e for e in files if e.get("role") == "overlay" or e["name"].lower().endswith(".png")}
    by_key = {k: g for k, g in df.groupby("_key", sort=False)}
    for i, k in enumerate(keys):
        g = by_key[k]
        first = g.iloc[0]
        path = str(first.get("path", "") or "")
        row: dict[str, Any] = {
            "path": clean_text(path), "id": clean_text(first.get(ident, "")),
            "label": clean_text(first.get("label", "")) if "label" in g.columns and pd.notna(first.get("label")) else "",
            "target_kind": clean_text(first.get("target_kind", "")) if "target_kind" in g.columns else "",
            "target_name": clean_text(first.get("target_name", first.get("target", ""))) if tcol else "",
            "prob": float(first["prob"]) if "prob" in g.columns and pd.notna(first.get("prob")) else None,
            "best_method": clean_text(best.get(k, "")) if k in best.index else "",
            "best_gap": float(best_gap[k]) if k in best_gap.index else None,
            "original": None, "cells": [], "row": path_rows.get(path),
        }
        embed = i < max_rows
        per_method = {str(r["method"]): r for r in g.to_dict("records")}
        for method in methods:
            r = per_method.get(method)
            if r is None:
                row["cells"].append({"method": clean_text(method), "missing": True})
                continue
            cell = {"method": clean_text(method), "missing": False, "deletion": fmt_auc(r["deletion_auc"]),
                    "insertion": fmt_auc(r["insertion_auc"]), "gap": fmt_auc(r["_gap"]), "uri": None,
                    "best": method == row["best_method"]}
            oname = str(r.get("overlay") or "")
            if embed and oname in overlays:
                try:
                    im = open_verified_image(adir, overlays[oname])
                except StoreError as exc:
                    view["error"] = clean_text(str(exc))
                    im = None
                if im is not None:
                    orig, blend = _split_overlay(im)
                    cell["uri"] = image_data_uri(blend, quality=quality)
                    if row["original"] is None and orig is not None:
                        row["original"] = image_data_uri(orig, quality=quality)
            row["cells"].append(cell)
        if row["original"] is None and row["row"] is not None and embed:
            needed.add(row["row"])  # fall back to the feature row's thumbnail
        row["embedded"] = embed
        view["rows"].append(row)
    raw = df.drop(columns=[c for c in ("_key", "_gap", "map_file", "map_index", "params_hash", "created", "runtime_s")
                           if c in df.columns])
    raw = raw.assign(_g=df["_gap"]).sort_values("_g").drop(columns="_g")
    view["raw"] = table_preview(raw, score_entries[0]["name"], path_rows, set(), limit=60, max_cols=12)
    run = m.get("last_run") or {}
    view["facts"] = [(k, clean_text(v)) for k, v in (("images", m.get("images")), ("rows", m.get("rows")),
                                                      ("Grad-CAM layer", m.get("gradcam_layer")),
                                                      ("selected by", run.get("select")),
                                                      ("device", run.get("device"))) if v is not None]
    return view


def sanity_view(store: str | Path, attribution_id: str) -> dict[str, Any] | None:
    """Template data of the newest sanity check (kind ``attribution-sanity``, :mod:`tasks.attribution.sanity`) of
    the attribution audit ``attribution_id``, or None when it has none.

    ``{"id", "rule", "layers", "depth", "images", "flagged": [methods], "methods": [{"method", "rho", "ssim",
    "flagged", "verdict", "line" (sparkline of median Spearman vs layers randomised)}], "error"}``."""
    from reports.sections.neurons import sparkline
    from storage.audits import read_sanity

    try:
        found = read_sanity(store, attribution_id)
    except StoreError as exc:
        return {"id": "", "error": clean_text(str(exc)), "methods": [], "flagged": [], "rule": "", "layers": None,
                "depth": None, "images": None}
    if found is None:
        return None
    _, m = found
    ver = m.get("verdicts") or {}
    methods = []
    for name in sorted(ver, key=_method_key):
        v = ver[name]
        curve = v.get("curve") or []
        # x: cascade step (0 = the trained model, whose map matches itself), evenly spaced; y: median Spearman
        line = sparkline(list(range(len(curve) + 1)), [1.0] + [c[1] for c in curve], width=160, height=48, pad=4)
        methods.append({"method": clean_text(name), "rho": fmt_auc(v.get("median_spearman")),
                        "ssim": fmt_auc(v.get("median_ssim")), "flagged": bool(v.get("flagged")),
                        "verdict": clean_text(v.get("verdict", "")), "line": line,
                        "curve": [(int(c[0]), fmt_auc(c[1])) for c in curve]})
    return {"id": clean_text(m.get("artefact_id", "")), "rule": clean_text(m.get("rule", "")), "layers": m.get("layers"),
            "depth": m.get("verdict_depth"), "images": m.get("images"), "error": None, "methods": methods,
            "flagged": [x["method"] for x in methods if x["flagged"]]}


def attach_sanity(cards: list[dict[str, Any]], store: str | Path) -> None:
    """Add each attribution view's sanity check (``card["sanity"]``, None without one) and mark the flagged
    methods in its per-method summary (``sanity_flagged``) and verdict (``believe_flagged``); in place."""
    for card in cards:
        if card.get("view") != "attribution":
            continue
        san = sanity_view(store, card["id"])
        card["sanity"] = san
        flagged = set(san["flagged"]) if san else set()
        for r in card.get("summary", []):
            r["sanity_flagged"] = r["method"] in flagged
        believe = card.get("believe")
        card["believe_flagged"] = bool(believe and believe.get("method") in flagged)
