"""Static figures of a map: the labelled scatter PNG stored with every map artefact."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

__all__ = ["render_scatter"]


def render_scatter(xy: np.ndarray, labels: Sequence[Any] | None = None, title: str = "",
                   size_px: int = 900, max_legend: int = 20) -> bytes:
    """A scatter of ``xy`` (N, 2) coloured by label (grey for none), PNG bytes; matplotlib Agg, no pyplot state.

    Up to ``max_legend`` labels get a legend; beyond that colours cycle through tab20 without one.
    """
    from matplotlib import colormaps  # noqa: PLC0415
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    xy = np.asarray(xy, np.float64)
    n = len(xy)
    labs = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in (labels if labels is not None else [None] * n)]
    uniq = sorted({v for v in labs if v is not None})
    cmap = colormaps["tab10" if len(uniq) <= 10 else "tab20"]
    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    s = float(np.clip(20000.0 / max(n, 1), 1.0, 30.0))
    lab_arr = np.array(labs, object)
    none_mask = np.array([v is None for v in labs], bool)
    if none_mask.any():
        ax.scatter(xy[none_mask, 0], xy[none_mask, 1], s=s, c="#999999", linewidths=0, alpha=0.7, label="(no label)")
    for j, name in enumerate(uniq):
        m = lab_arr == name
        ax.scatter(xy[m, 0], xy[m, 1], s=s, color=cmap(j % cmap.N), linewidths=0, alpha=0.8, label=name)
    if 0 < len(uniq) <= max_legend:
        ax.legend(loc="best", fontsize=8, markerscale=max(1.0, 6.0 / math.sqrt(s)), frameon=True)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
