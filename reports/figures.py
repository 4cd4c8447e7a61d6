"""Small building blocks of the report: safe text/JSON, thumbnails, colours, tables, 2-d fallbacks.

Everything here is pure (no store access) so it can be unit-tested on hand-made inputs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "clean_text",
    "safe_json",
    "thumbnail",
    "image_data_uri",
    "png_file_data_uri",
    "PALETTE",
    "heat_color",
    "pca2",
    "binary_auc",
    "top_counts",
]

log = logging.getLogger(__name__)

# 20 distinguishable colours (d3 category20-ish), cycled for more categories.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def clean_text(value: Any) -> str:
    """Any value -> valid UTF-8 text. Non-UTF-8 bytes (``bytes`` or surrogate-escaped ``str``) become U+FFFD.

    HTML escaping is the template's job (Jinja2 autoescape); this only guarantees the text can be encoded.
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # surrogate-escaped bytes (os.fsdecode of a non-UTF-8 file name)
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8", "replace")


def _clean(obj: Any) -> Any:
    if isinstance(obj, str) or isinstance(obj, bytes):
        return clean_text(obj)
    if isinstance(obj, dict):
        return {clean_text(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def safe_json(obj: Any) -> str:
    """JSON text that is safe inside ``<script type="application/json">``: ``<``, ``>``, ``&``, U+2028 and
    U+2029 are written as ``\\uXXXX`` escapes, so no string in the data can close the script element or
    break a JS parser; strings are made valid UTF-8 first (:func:`clean_text`); NaN/Inf become ``null``.
    """
    text = json.dumps(_clean(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, rep in _JSON_ESCAPES.items():
        text = text.replace(ch, rep)
    return text


def thumbnail(root: str | Path | None, rel: str, size: int = 64, pixel_size: int = 16, quality: int = 70
              ) -> tuple[str | None, np.ndarray | None]:
    """Decode a stored image once (``root`` + ``rel`` through :func:`tasks.core.images.open_stored_image`: local
    or fsspec URL, EXIF-rotated, alpha on white, FIFO / size / time guarded) and return ``(jpeg data URI of max
    side size px, pixels (pixel_size**2*3,) uint8)``.

    The pixel vector is the image squashed to ``pixel_size x pixel_size`` RGB (for pixel-space neighbours).
    Returns ``(None, None)`` when the file is missing or unreadable (the report shows text instead).
    """
    from PIL import Image

    from tasks.core.images import RejectedImage, open_stored_image

    try:
        im = open_stored_image(root, rel, draft=(size * 2, size * 2))
    except RejectedImage as exc:
        log.debug("no thumbnail for %s: %s", rel, exc)
        return None, None
    pix = np.asarray(im.resize((pixel_size, pixel_size), Image.BILINEAR), dtype=np.uint8).reshape(-1)
    im.thumbnail((size, size), Image.BILINEAR)
    return image_data_uri(im, quality), pix


def image_data_uri(im: Any, quality: int = 70, fmt: str = "JPEG") -> str:
    """A PIL image (or ``(H, W[, 3]) uint8`` array) as a ``data:image/...;base64,`` URI."""
    from PIL import Image

    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
        mime = "image/jpeg"
    else:
        im.save(buf, "PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_file_data_uri(path: str | Path, max_side: int = 512) -> str | None:
    """An image file (e.g. an artefact's PNG) downscaled to ``max_side`` px, as a PNG data URI (None if unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if max(im.size) > max_side:
                im = im.copy()
                im.thumbnail((max_side, max_side), Image.BILINEAR)
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA")
            return image_data_uri(im, fmt="PNG")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.warning("cannot embed %s: %s", path, exc)
        return None


def heat_color(value: float, vmax: float) -> str:
    """White -> dark blue background for a heatmap cell (``value`` in ``[0, vmax]``)."""
    t = 0.0 if vmax <= 0 else max(0.0, min(1.0, value / vmax))
    t = math.sqrt(t)
    r = int(round(255 - t * (255 - 8)))
    g = int(round(255 - t * (255 - 48)))
    b = int(round(255 - t * (255 - 107)))
    return f"rgb({r},{g},{b})"


def pca2(x: np.ndarray, seed: int = 0, fit_rows: int = 50000) -> np.ndarray:
    """2-d PCA of ``x (N, D) float32`` -> ``(N, 2) float32``; fitted on at most ``fit_rows`` sampled rows."""
    from sklearn.decomposition import PCA

    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.float32)
    if n < 3 or x.shape[1] < 2:
        out = np.zeros((n, 2), np.float32)
        out[:, 0] = x[:, 0] if x.shape[1] else 0
        return out
    rng = np.random.default_rng(seed)
    fit = x if n <= fit_rows else x[rng.choice(n, fit_rows, replace=False)]
    p = PCA(n_components=2, random_state=seed).fit(fit)
    return p.transform(x).astype(np.float32)


def binary_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann-Whitney, ties averaged). NaN if one class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def top_counts(values: Iterable[Any], limit: int) -> list[tuple[Any, int]]:
    """The ``limit`` most frequent values with counts (ties by value text)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[:limit]
