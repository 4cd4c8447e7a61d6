"""Sections that render other stages' artefacts: maps (2-d coordinates, t-SNE grid), dataset audits,
attribution audits, neurons. Every file read here is sha256-checked against its manifest first; an artefact
whose files fail the check is reported as broken, never rendered.

The layouts of those artefacts are owned by their stages; this module relies only on the store contract
(manifest ``files`` with ``name``/``sha256``/``role``) plus a few documented conventions (``coords`` role
with ``row, x, y`` columns; PNG files; Parquet tables), and falls back to a generic "artefact card" (facts,
images, table preview) for anything else.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports.figures import clean_text, png_file_data_uri
from storage.artefacts import artefacts_of
from storage.errors import StoreError
from storage.manifest import safe_member, verify_files
from storage.paths import Store

__all__ = [
    "read_verified_table",
    "maps_data",
    "artefact_card",
    "artefacts_for",
    "open_verified_image",
    "table_preview",
    "is_hex_id",
]

log = logging.getLogger(__name__)
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".gif")
_PATH_COLUMNS = ("path", "image_path", "neighbor_path", "path_a", "path_b", "other_path", "query_path",
                 "train_path", "test_path")
_ROW_COLUMNS = ("row", "neighbor_row", "row_a", "row_b")
_HEX_ID = re.compile(r"^[0-9a-f]{32,64}$")


def is_hex_id(v: Any) -> bool:
    """Whether ``v`` is a content hash / image id (32-64 lowercase hex digits): never shown as cell text."""
    return isinstance(v, str) and bool(_HEX_ID.match(v))


def _id_column_target(col: str, cols: list[str]) -> str | None:
    """The path column that carries ``col``'s id as a hover title (``image_id`` -> ``path``, ``other_image_id`` -> ``other_path``)."""
    if not col.endswith("image_id"):
        return None
    prefix = col[: -len("image_id")]
    for cand in (prefix + "path", prefix + "image_path", "path"):
        if cand in cols:
            return cand
    return None


def _verified(adir: Path, entry: dict[str, Any]) -> Path:
    verify_files(adir, {"files": [entry]})
    return safe_member(adir, entry["name"])


def read_verified_table(adir: Path, entry: dict[str, Any]) -> pd.DataFrame:
    """A manifest-listed Parquet file, sha256-verified (raises ChecksumError naming it)."""
    return pd.read_parquet(_verified(adir, entry))


def maps_data(store: Store, fid: str, n_rows: int) -> dict[str, Any]:
    """2-d coordinates of every published map of ``fid`` aligned to feature rows, plus grid images.

    Returns ``{"projections": {name: (N, 2) float32}, "grids": [{title, uri, id}], "maps": [facts],
    "errors": [...]}``. Maps whose row count differs from the feature artefact (stale) are skipped with a note.
    """
    out: dict[str, Any] = {"projections": {}, "grids": [], "maps": [], "errors": []}
    for aid, m, adir in artefacts_of(store, "maps", fid):
        method = str(m.get("method", "map"))
        try:
            for entry in m.get("files", []):
                role = str(entry.get("role", ""))
                name = entry["name"]
                if role == "coords":
                    df = read_verified_table(adir, entry)
                    if not {"x", "y"} <= set(df.columns):
                        continue
                    if "row" in df.columns:
                        rows = df["row"].to_numpy(np.int64)
                    else:
                        rows = np.arange(len(df))
                    if len(df) != n_rows or rows.min(initial=0) < 0 or rows.max(initial=-1) >= n_rows:
                        out["errors"].append(f"map {aid} has {len(df)} rows but the features have {n_rows}; "
                                             f"rebuild it with `convlens project --method {method}`")
                        continue
                    xy = np.zeros((n_rows, 2), np.float32)
                    xy[rows, 0] = df["x"].to_numpy(np.float32)
                    xy[rows, 1] = df["y"].to_numpy(np.float32)
                    label = method.upper() if method.upper() not in out["projections"] else f"{method.upper()} {aid[-6:]}"
                    out["projections"].setdefault(label, xy)
                    q = m.get("quality") or {}
                    out["maps"].append({"id": aid, "method": method, "rows": m.get("rows"),
                                        "trust": q.get("trustworthiness"),
                                        "agree": q.get("knn_label_agreement_map")})
                elif name.lower().endswith(_IMAGE_EXT) and ("grid" in role or "grid" in name):
                    uri = png_file_data_uri(_verified(adir, entry), max_side=1600)
                    if uri:
                        out["grids"].append({"id": aid, "title": f"{method} image grid ({name})", "uri": uri})
        except StoreError as exc:
            out["errors"].append(f"map {aid}: {exc}")
    # grids may also be their own artefacts in maps/ referring to a map of fid; pick up any grid PNG of a map
    return out


def _fact_value(v: Any) -> str | None:
    if isinstance(v, (str, int, float, bool)) or v is None:
        text = clean_text(v if not isinstance(v, float) else f"{v:.4g}")
        return text if len(text) <= 200 else text[:200] + "…"
    if isinstance(v, (list, tuple)) and len(v) <= 8 and all(isinstance(x, (str, int, float, bool)) for x in v):
        return clean_text(", ".join(str(x) for x in v))
    return None


def artefact_card(aid: str, m: dict[str, Any], adir: Path, path_rows: dict[str, int], needed: set[int],
                  max_images: int = 24, max_table_rows: int = 30, image_side: int = 320) -> dict[str, Any]:
    """A generic rendering of one artefact: scalar facts, its images (embedded), previews of its tables.

    Table cells in path/row columns that name a feature row get that row's thumbnail (row added to ``needed``).
    """
    skip = {"files", "library_versions", "code_version", "schema_version", "artefact_id", "kind"}
    facts = []
    for k, v in m.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            for k2, v2 in list(v.items())[:12]:
                fv = _fact_value(v2)
                if fv is not None:
                    facts.append((clean_text(f"{k}.{k2}"), fv))
        else:
            fv = _fact_value(v)
            if fv is not None:
                facts.append((clean_text(k), fv))
    card: dict[str, Any] = {"id": aid, "title": clean_text(m.get("technique") or m.get("method") or m.get("kind") or aid),
                            "facts": facts[:40], "images": [], "tables": [], "error": None}
    try:
        for entry in m.get("files", []):
            name = entry["name"]
            if name.lower().endswith(_IMAGE_EXT) and len(card["images"]) < max_images:
                uri = png_file_data_uri(_verified(adir, entry), max_side=image_side)
                if uri:
                    card["images"].append({"uri": uri, "caption": clean_text(entry.get("caption") or entry.get("role") or name),
                                           "name": clean_text(name)})
            elif name.endswith(".parquet") and len(card["tables"]) < 3:
                df = read_verified_table(adir, entry)
                card["tables"].append(_table_preview(df, name, path_rows, needed, max_table_rows))
    except StoreError as exc:
        card["error"] = clean_text(str(exc))
    return card


def open_verified_image(adir: Path, entry: dict[str, Any]):
    """A manifest-listed image file, sha256-verified, loaded as an RGB PIL image (None if undecodable)."""
    from PIL import Image, UnidentifiedImageError

    path = _verified(adir, entry)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.warning("cannot embed %s: %s", path, exc)
        return None


def table_preview(df: pd.DataFrame, name: str, path_rows: dict[str, int], needed: set[int], limit: int = 30,
                  max_cols: int = 10) -> dict[str, Any]:
    """First ``limit`` rows of a table for display: vector columns dropped; id columns (64-hex ``*image_id``)
    are not shown as text but become the hover title of the matching path cell; path cells that name a feature
    row get its thumbnail (row added to ``needed``)."""
    all_cols = [str(c) for c in df.columns]
    id_for = {c: _id_column_target(c, all_cols) for c in all_cols}
    hidden = {c for c in all_cols if id_for[c] is not None or (c.endswith("_id") and len(df) and is_hex_id(df[c].iloc[0]))}
    cols = [c for c in all_cols if c not in hidden and not _is_vector(df[c])][:max_cols]
    titles = {id_for[c]: c for c in all_cols if id_for[c] in cols}
    rows = []
    for rec in df.head(limit).to_dict("records"):
        cells = []
        for c in cols:
            v = rec[c]
            text = _fmt(v)
            cell: dict[str, Any] = {"text": clean_text(text[:12] + "…" if is_hex_id(text) else text)}
            if is_hex_id(text):
                cell["title"] = text
            if c in titles and isinstance(rec.get(titles[c]), str):
                cell["title"] = clean_text(f"{titles[c]} {rec[titles[c]]}")
            if c in _PATH_COLUMNS and isinstance(v, str) and v in path_rows:
                cell["thumb"] = path_rows[v]
                needed.add(path_rows[v])
            cells.append(cell)
        rows.append(cells)
    return {"name": clean_text(name), "cols": [clean_text(c) for c in cols], "rows": rows, "n": int(len(df))}


_table_preview = table_preview


def _is_vector(s: pd.Series) -> bool:
    return len(s) > 0 and isinstance(s.iloc[0], (list, np.ndarray, dict))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def artefacts_for(store: Store, kind: str, fid: str, select=None, include_unrelated: bool = False,
                  limit: int = 20) -> list[tuple[str, dict[str, Any], Path]]:
    """(id, manifest, dir) of the artefacts whose manifest ``kind`` is ``kind`` and that were built from ``fid``
    (any source with ``include_unrelated``; ``select(manifest)`` filters further), newest first, at most ``limit``."""
    items = artefacts_of(store, kind, None if include_unrelated else fid)
    return [t for t in items if select is None or select(t[1])][:limit]

