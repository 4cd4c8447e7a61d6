"""The feature-map scatter's binary payload: every point, compact enough for a million-image report.

Coordinates are quantised per axis to uint16 (``q = round((v - lo) / (hi - lo) * 65535)``, error <= half a
step = (hi - lo) / 131070), x and y interleaved, little-endian; colourings are uint8 category codes (uint16
above 256 categories). Each array is base64 in one JSON document (``<script type="application/json"
id="cl-scatter-bin">``) that ``reports/static/scatter.js`` decodes into typed arrays and uploads to WebGL as is.
Size: 4 bytes per point per projection + 1 byte per point per colouring, x 4/3 for base64 (a million points,
3 projections and 5 colourings: 22.7 MB).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

__all__ = ["QUANT_LEVELS", "quantise", "dequantise", "encode_scatter", "scatter_json"]

QUANT_LEVELS = 65535


def quantise(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xy`` (n, 2) float -> ``(q (n, 2) uint16, lo (2,) float64, hi (2,) float64)``. Non-finite values map to
    ``lo`` (maps never hold them; the report's own PCA fallback neither)."""
    xy = np.asarray(xy, np.float64)
    finite = np.isfinite(xy)
    clean = np.where(finite, xy, np.nan)
    lo = np.nan_to_num(np.nanmin(clean, axis=0), nan=0.0) if len(xy) else np.zeros(2)
    hi = np.nan_to_num(np.nanmax(clean, axis=0), nan=0.0) if len(xy) else np.zeros(2)
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.rint((np.where(finite, xy, lo) - lo) / span * QUANT_LEVELS)
    return np.clip(q, 0, QUANT_LEVELS).astype(np.uint16), lo, hi


def dequantise(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantise` as the page computes it: ``lo + q * (hi - lo) / 65535`` (``hi == lo``: ``lo``)."""
    span = np.where(np.asarray(hi) > np.asarray(lo), np.asarray(hi) - np.asarray(lo), 0.0)
    return np.asarray(lo, np.float64) + np.asarray(q, np.float64) / QUANT_LEVELS * span


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii")


def encode_scatter(projections: dict[str, np.ndarray], colorings: dict[str, dict[str, Any]],
                   shown: np.ndarray | None = None) -> dict[str, Any]:
    """The payload for ``scatter.js``: ``projections`` ``{name: (N, 2) float}`` (all feature rows), ``colorings``
    ``{name: {"idx": N category codes, ...}}``; ``shown`` the rows drawn (default: every row).

    Returns ``{"n", "rows", "proj": {name: {"b64", "lo", "hi", "step"}}, "color": {name: {"b64", "bytes"}}}``.
    Memory: O(n) per array (the base64 text is ~4/3 of the bytes).
    """
    rows = None if shown is None else np.asarray(shown, np.int64)
    out: dict[str, Any] = {"n": 0, "rows": None, "proj": {}, "color": {}}
    n = None
    for name, xy in projections.items():
        xy = np.asarray(xy)
        sel = xy if rows is None else xy[rows]
        q, lo, hi = quantise(sel)
        n = len(sel)
        out["proj"][name] = {"b64": _b64(q.reshape(-1)), "lo": lo.tolist(), "hi": hi.tolist(),
                             "step": ((hi - lo) / QUANT_LEVELS).tolist()}
    for name, c in colorings.items():
        idx = np.asarray(c["idx"], np.int64)
        if rows is not None:
            idx = idx[rows]
        n = len(idx) if n is None else n
        dtype = np.uint8 if (idx.max(initial=0) < 256) else np.uint16
        out["color"][name] = {"b64": _b64(np.clip(idx, 0, np.iinfo(dtype).max).astype(dtype)),
                              "bytes": int(np.dtype(dtype).itemsize)}
    out["n"] = int(n or 0)
    if rows is not None:
        out["rows"] = _b64(rows.astype(np.uint32))
    return out


def scatter_json(payload: dict[str, Any]) -> str:
    """The payload as JSON safe inside a ``<script>`` element (names may hold ``<`` or ``&``)."""
    from reports.figures import safe_json

    return safe_json(payload)
