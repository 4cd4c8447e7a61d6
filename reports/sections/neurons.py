""""Inside the network", curated per technique (layouts: docs/neurons.md).

Each neurons artefact becomes a view ``{id, title, technique, summary, blocks, raw, error}``; ``blocks`` are
figure kinds the template knows: ``pixelated`` (filters, scaled up without smoothing), ``channels`` (max-
activating patches sliced out of the stored grid, one labelled row per channel, image path on hover),
``figures`` (large images with captions), ``spark`` (an inline-SVG line, e.g. class score vs step) and
``table`` (a small clean table). Unknown techniques get ``figures`` of their images. Every file is sha256-checked.

Memory: one artefact's images and tables at a time.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from reports.figures import clean_text, image_data_uri
from reports.sections.stored import open_verified_image, read_verified_table, table_preview
from storage.errors import StoreError

__all__ = ["neuron_view", "sparkline", "attach_channel_viz", "TECHNIQUE_TITLES"]

log = logging.getLogger(__name__)
TECHNIQUE_TITLES = {
    "filters": "First-layer filters", "activations": "Activation maps", "max_activations": "Max-activating patches",
    "class_viz": "Class visualisation", "channel_viz": "Channel visualisation",
    "adversarial": "Adversarial examples", "invariance": "Invariance curves",
    "evolution": "Feature evolution across checkpoints", "inversion": "Feature inversion", "deepdream": "DeepDream",
    "style": "Style transfer", "compare": "Frozen vs fine-tuned (transfer) comparison",
}
_ORDER = tuple(TECHNIQUE_TITLES)


def sparkline(xs: list[float], ys: list[float], width: int = 320, height: int = 90, pad: int = 6) -> dict[str, Any]:
    """Polyline points (SVG user units) for ``ys`` vs ``xs`` plus axis labels; non-finite values are dropped."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(x)) and math.isfinite(float(y))]
    if not pts:
        return {"points": "", "width": width, "height": height}
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    text = " ".join(f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in pts)
    return {"points": text, "width": width, "height": height, "x0": f"{x0:g}", "x1": f"{x1:g}",
            "y0": f"{y0:.3g}", "y1": f"{y1:.3g}"}


def _images(m: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in m.get("files", []) if e["name"].lower().endswith((".png", ".jpg", ".jpeg", ".webp"))]


def _table(m: dict[str, Any], adir: Path) -> pd.DataFrame | None:
    e = next((e for e in m.get("files", []) if e["name"].endswith(".parquet")), None)
    return None if e is None else read_verified_table(adir, e)


def _fig(adir: Path, e: dict[str, Any], caption: str, max_side: int = 900, scale_to: int | None = None,
         fmt: str = "PNG") -> dict[str, Any] | None:
    im = open_verified_image(adir, e)
    if im is None:
        return None
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    w, h = im.size
    if scale_to and max(w, h) < scale_to:
        f = scale_to / max(w, h)
        w, h = int(round(w * f)), int(round(h * f))
    return {"uri": image_data_uri(im, fmt=fmt, quality=85), "caption": clean_text(caption), "width": w, "height": h,
            "name": clean_text(e["name"])}


def _figures(adir: Path, entries: list[dict[str, Any]], caption=lambda e: e.get("caption") or e["name"], limit: int = 12,
             **kw) -> dict[str, Any]:
    items = [f for f in (_fig(adir, e, caption(e), **kw) for e in entries[:limit]) if f]
    return {"type": "figures", "entries": items}


def _num(v: Any, d: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return f"{f:.{d}g}" if math.isfinite(f) else "—"


def _filters(m, adir, df):
    blocks, summary = [], []
    layer_png = {v: k for k, v in (m.get("images") or {}).items()} if isinstance(m.get("images"), dict) else {}
    for e in _images(m):
        im = open_verified_image(adir, e)
        if im is None:
            continue
        w, h = im.size
        scale = max(1, min(8, 640 // max(w, h)))
        layer = e.get("layer") or layer_png.get(e["name"], "")
        shape = e.get("shape")
        cap = f"{layer}: {shape[0]} filters, {shape[1]}×{shape[2]}×{shape[3]}" if isinstance(shape, list) and len(shape) == 4 else layer or e["name"]
        blocks.append({"type": "pixelated", "uri": image_data_uri(im, fmt="PNG"), "width": w * scale, "height": h * scale,
                       "caption": clean_text(f"{cap} (each pixel shown ×{scale}, no smoothing)")})
    if df is not None and {"l2_norm", "layer"} <= set(df.columns):
        for layer, g in df.groupby("layer", sort=False):
            norms = g["l2_norm"].astype(float)
            weak = int((norms < 0.1 * norms.max()).sum())
            summary.append(f"{layer}: {len(g)} filters, L2 norm {norms.min():.3g}–{norms.max():.3g}; "
                           f"{weak} near-dead (norm < 10% of the largest).")
    return blocks, summary


def _max_acts(m, adir, df):
    blocks, summary = [], []
    k = int(m.get("k") or (m.get("params") or {}).get("k") or 0)
    p = int((m.get("params") or {}).get("patch_px") or 64)
    rf = m.get("receptive_field") or {}
    summary.append(f"Layer {m.get('layer', '?')}: the {k} strongest patches per channel over {m.get('images_scanned', '?')} "
                   f"images; patch = the unit's receptive field ({'×'.join(str(x) for x in rf.get('size', [])) or '?'} px of the "
                   f"{m.get('crop', '?')} px crop). {m.get('channels', '?')} channels scanned, those below shown.")
    rows = []
    for e in _images(m):
        chans = e.get("channels")
        im = open_verified_image(adir, e)
        if im is None:
            continue
        w, h = im.size
        ok = isinstance(chans, list) and k > 0 and w == (k + 1) * p + (k + 2) * 2 and h == len(chans) * p + (len(chans) + 1) * 2
        if not ok or df is None or not {"channel", "rank"} <= set(df.columns):
            blocks.append(_figures(adir, [e], lambda e: f"channels {e.get('channels', '')}"))
            continue
        for r, ch in enumerate(chans):
            hits = df[df["channel"] == ch].sort_values("rank")
            patches = []
            for c, rec in enumerate(hits.head(k).to_dict("records")):
                y, x = 2 + r * (p + 2), 2 + (c + 1) * (p + 2)
                tile = im.crop((x, y, x + p, y + p))
                patches.append({"uri": image_data_uri(tile, quality=85),
                                "title": clean_text(f"{rec.get('path', '')}\nactivation {_num(rec.get('activation'))}"
                                                    f"{' · label ' + str(rec['label']) if rec.get('label') is not None else ''}")})
            top = float(hits["activation"].max()) if "activation" in hits and len(hits) else float("nan")
            rows.append({"label": f"ch {ch}", "sub": f"max {_num(top)}", "patches": patches, "channel": int(ch),
                         "layer": str(m.get("layer", "")), "viz": None})
    if rows:
        blocks.insert(0, {"type": "channels", "rows": rows, "size": max(96, p), "layer": str(m.get("layer", "")),
                          "with_viz": False})
    return blocks, summary


def _class_viz(m, adir, df):
    blocks, summary = [], []
    classes = m.get("classes") or []
    per = {int(e["class_index"]): e for e in _images(m) if e.get("class_index") is not None}
    figs = []
    for c in classes:
        idx = int(c.get("class_index", -1))
        e = per.get(idx)
        fig = _fig(adir, e, "", scale_to=256) if e else None
        line = None
        if df is not None and {"class_index", "step", "score"} <= set(df.columns):
            g = df[df["class_index"] == idx].sort_values("step")
            line = sparkline(g["step"].tolist(), g["score"].tolist(), width=256, height=80)
        rob = c.get("robust") or {}
        figs.append({"fig": fig, "name": clean_text(c.get("class_name", idx)), "index": idx,
                     "start": _num(c.get("score_start")), "end": _num(c.get("score_end")),
                     "prob": _num(c.get("prob_end")), "line": line,
                     "robust": (f"top-1 under {rob['hits']} of {rob['n']} random small shifts / zooms / rotations"
                                if rob.get("n") else "")})
    if figs:
        blocks.append({"type": "classviz", "entries": figs})
        params = m.get("params") or {}
        steps = params.get("steps")
        if params.get("param", "pixel") == "fourier":
            summary.append(f"Gradient ascent on the class score, {steps} steps, over a colour-decorrelated Fourier "
                           f"image with random jitter, scale and rotation at every step (transformation robustness): what "
                           f"the model thinks each class looks like, as an image it still recognises when moved a little.")
        else:
            summary.append(f"Gradient ascent on the class score from a {params.get('init', '?')} image, {steps} steps "
                           f"(L2 {params.get('l2', '?')}, blur and small-value clipping): what the model "
                           f"thinks each class looks like.")
    else:
        blocks.append(_figures(adir, _images(m)))
    return blocks, summary


def _adversarial(m, adir, df):
    params = m.get("params") or {}
    n_img = m.get("images", "?")
    summary = [f"{n_img} image{'' if n_img == 1 else 's'} attacked with {str(params.get('method', '?')).upper()} "
               f"(eps ≤ {_num(float(params.get('eps_max', float('nan'))) * 255)}/255): {m.get('flipped', '?')} flipped "
               f"(flip rate {_num(float(m.get('flip_rate', float('nan'))) * 100)}%), median smallest flipping eps "
               f"{_num(m.get('median_eps_255'))}/255."]
    by_path = {}
    if df is not None and "path" in df.columns:
        by_path = {r["path"]: r for r in df.to_dict("records")}

    def cap(e):
        r = by_path.get(e.get("path"))
        if not r:
            return e.get("path") or e["name"]
        return (f"{r['path']}: {r.get('orig_class')} ({_num(r.get('orig_prob'))}) → {r.get('adv_class')} "
                f"({_num(r.get('adv_prob'))}) at eps {_num(r.get('eps_255'))}/255 — original, perturbation (amplified), adversarial")
    blocks = [_figures(adir, _images(m), cap, limit=8)]
    if df is not None and {"path", "orig_class", "adv_class"} <= set(df.columns):
        t = df[[c for c in ("path", "label", "orig_class", "orig_prob", "adv_class", "adv_prob", "flipped", "eps_255")
                if c in df.columns]]
        blocks.append({"type": "table", "cols": list(t.columns),
                       "rows": [[clean_text(_num(v) if isinstance(v, float) else v) for v in r] for r in t.head(30).itertuples(index=False)]})
    return blocks, summary


def _invariance(m, adir, df):
    summary = []
    if df is not None and {"transform", "top1_changed"} <= set(df.columns):
        for t, g in df.groupby("transform", sort=False):
            vals = g["value"].astype(float) if "value" in g else pd.Series(dtype=float)
            summary.append(f"{t}: top-1 changes in {100 * g['top1_changed'].astype(float).mean():.0f}% of transformed images "
                           f"(values {vals.min():g}…{vals.max():g}); mean feature distance {g['distance'].astype(float).mean():.3g}.")
    return [_figures(adir, _images(m), limit=2)], summary


def _evolution(m, adir, df):
    ims = _images(m)
    combined = [e for e in ims if e["name"] == "evolution.png"] or ims
    cps = m.get("checkpoints") or []
    return [_figures(adir, combined, limit=6)], [f"{len(cps)} checkpoints ({', '.join(map(str, cps[:8]))}) of layer "
                                                 f"{m.get('filter_layer') or m.get('layer', '?')}: one row per checkpoint."]


def _inversion(m, adir, df):
    summary = []
    if df is not None and {"layer", "step", "feature_distance"} <= set(df.columns):
        last = df.sort_values("step").groupby(["layer"] + (["path"] if "path" in df else []), sort=False).tail(1)
        for layer, g in last.groupby("layer", sort=False):
            summary.append(f"{layer}: final relative feature distance {g['feature_distance'].astype(float).mean():.3g}.")
    return [_figures(adir, _images(m))], ["Reconstructions of the input from each layer's features (feature match + total variation)."] + summary


def _deepdream(m, adir, df):
    return [_figures(adir, _images(m))], [f"DeepDream on layer {m.get('layer', '?')}: original, then the dream (amplified activations)."]


def _style(m, adir, df):
    ims = [e for e in _images(m) if e["name"] == "style.png"] or _images(m)
    return [_figures(adir, ims, lambda e: "content, style, result")], [
        f"Gram-matrix style loss {_num(m.get('style_loss_start'))} → {_num(m.get('style_loss_end'))} "
        f"(content layer {m.get('content_layer', '?')}, style layers {', '.join(map(str, m.get('style_layers') or []))})."]


def _compare(m, adir, df):
    blocks = [_figures(adir, _images(m))]
    if df is not None and {"metric", "value"} <= set(df.columns):
        t = df[[c for c in ("metric", "space", "value", "detail") if c in df.columns]]
        blocks.append({"type": "table", "cols": list(t.columns),
                       "rows": [[clean_text(_num(v) if isinstance(v, float) else v) for v in r] for r in t.itertuples(index=False)]})
    return blocks, [f"features {m.get('features_a', '?')} ({m.get('layer_a', '?')}) vs {m.get('features_b', '?')} "
                    f"({m.get('layer_b', '?')}) on {m.get('shared_images', '?')} shared images."]


def _activations(m, adir, df):
    return [_figures(adir, _images(m), lambda e: e.get("path") or e["name"])], [
        f"Layer {m.get('layer', '?')}: each image, then its most active channels (per-map min–max)."]


def _channel_viz(m, adir, df):
    """Per channel: its visualisation (also attached to the max-activations rows by :func:`attach_channel_viz`)."""
    entries = [e for e in _images(m) if e.get("channel") is not None]
    by_channel = {}
    for e in entries:
        f = _fig(adir, e, f"ch {e['channel']}", scale_to=128)
        if f:
            by_channel[int(e["channel"])] = f
    block = {"type": "figures", "entries": list(by_channel.values()), "channel_viz": {
        "layer": str(m.get("layer", "")), "uris": {c: f["uri"] for c, f in by_channel.items()}}}
    return [block], [f"Layer {m.get('layer', '?')}: for each channel, the image that maximises its mean activation (the "
                     "class visualisation's optimiser: decorrelated Fourier image, random jitter / scale / rotation). "
                     "Shown again beside each channel's max-activating patches."]


_BUILDERS = {"filters": _filters, "max_activations": _max_acts, "class_viz": _class_viz, "channel_viz": _channel_viz, "adversarial": _adversarial,
             "invariance": _invariance, "evolution": _evolution, "inversion": _inversion, "deepdream": _deepdream,
             "style": _style, "compare": _compare, "transfer": _compare, "activations": _activations}


def neuron_view(aid: str, m: dict[str, Any], adir: Path, path_rows: dict[str, int], needed: set[int]) -> dict[str, Any]:
    """Template data for one neurons artefact (any technique; unknown ones show their images and table)."""
    tech = str(m.get("technique") or m.get("method") or "neurons")
    view: dict[str, Any] = {"id": clean_text(aid), "technique": clean_text(tech),
                            "title": clean_text(TECHNIQUE_TITLES.get(tech, tech.replace("_", " "))),
                            "summary": [], "blocks": [], "raw": None, "error": None,
                            "order": _ORDER.index(tech) if tech in _ORDER else len(_ORDER)}
    try:
        df = _table(m, adir)
        build = _BUILDERS.get(tech)
        if build is None:
            blocks, summary = [_figures(adir, _images(m))], []
        else:
            blocks, summary = build(m, adir, df)
        view["blocks"] = [b for b in blocks if b.get("type") != "figures" or b["entries"]]
        view["summary"] = [clean_text(s) for s in summary]
        if df is not None:
            name = next(e["name"] for e in m.get("files", []) if e["name"].endswith(".parquet"))
            view["raw"] = table_preview(df, name, path_rows, set(), limit=60, max_cols=12)
    except StoreError as exc:
        view["error"] = clean_text(str(exc))
    except (KeyError, ValueError, TypeError) as exc:  # a layout this version does not know: say so, keep the report
        log.warning("neurons artefact %s: unexpected layout: %s", aid, exc)
        view["error"] = clean_text(f"unexpected layout ({exc}); showing what could be read")
    return view


def attach_channel_viz(cards: list[dict[str, Any]]) -> None:
    """Put each channel's visualisation (from a ``channel_viz`` view of the same layer) at the start of its
    max-activating patches row (``row["viz"]``), in place. The newest channel_viz view of a layer wins."""
    by_layer: dict[str, dict[int, str]] = {}
    for c in cards:
        for b in c.get("blocks", []):
            cv = b.get("channel_viz")
            if cv and cv["layer"] not in by_layer:
                by_layer[cv["layer"]] = cv["uris"]
    for c in cards:
        for b in c.get("blocks", []):
            if b.get("type") != "channels":
                continue
            uris = by_layer.get(b.get("layer", ""), {})
            for r in b["rows"]:
                r["viz"] = uris.get(r.get("channel"))
            b["with_viz"] = any(r["viz"] for r in b["rows"])
