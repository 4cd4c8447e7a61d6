"""The t-SNE image grid and the label-coloured scatter of a map.

- :func:`assign_grid` — each cell of a ``rows x cols`` grid laid over the map's (min-max normalised) 2-d
  coordinates gets one distinct image: optimal linear assignment (``scipy.optimize.linear_sum_assignment``
  on squared distances, over the union of every cell's nearest candidates when N is large) or greedy
  nearest. With N >= rows x cols every cell is filled.
- :func:`render_grid` — thumbnails (centre-cropped squares) pasted into one RGB image of
  ``(cols x thumb, rows x thumb)`` pixels; an image file that is missing or cannot be decoded becomes a grey
  cell and a log warning, never a crash.
- :func:`render_scatter` — a plain matplotlib (Agg) scatter coloured by label, as PNG bytes.
- :func:`make_grid` — the store-level command: adds ``grid-<R>x<C>.png`` and ``grid-<R>x<C>.parquet`` (the
  cell -> image table) to a map artefact and republishes its manifest. Layout in ``docs/maps.md``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from storage.errors import UsageError

__all__ = [
    "GRID_BACKGROUND",
    "MISSING_GREY",
    "parse_size",
    "default_size",
    "assign_grid",
    "load_thumbnail",
    "render_grid",
    "grid_names",
    "make_grid",
]

log = logging.getLogger(__name__)

GRID_BACKGROUND = (255, 255, 255)   # empty cells (only when the map has fewer images than cells)
MISSING_GREY = (128, 128, 128)      # cells whose image file is missing or unreadable
_DENSE_LAP_MAX = 4_000_000          # cells x points above this: LAP over each cell's nearest candidates only


def parse_size(size: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"32x32"`` / ``"32"`` / ``(rows, cols)`` -> ``(rows, cols)``; ``None`` / ``"auto"`` -> None."""
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
        return None
    if isinstance(size, str):
        parts = size.lower().replace("×", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--size must look like 32x32 (rows x cols), got {size!r}") from None
        if len(vals) == 1:
            vals = vals * 2
    else:
        vals = [int(v) for v in size]
    if len(vals) != 2 or min(vals) < 1 or max(vals) > 512:
        raise UsageError(f"--size must be ROWSxCOLS with 1..512 each, got {size!r}")
    return vals[0], vals[1]


def default_size(n: int, limit: int = 32) -> tuple[int, int]:
    """Largest square grid that ``n`` images fill completely, at most ``limit x limit``."""
    side = max(1, min(limit, int(math.isqrt(max(n, 1)))))
    return side, side


def _normalise(xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, np.float64)[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (xy - lo) / span
    out[:, hi <= lo] = 0.5
    return out


def _cell_centres(rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 2) centres in map units; row 0 is the top (largest y), as in the scatter."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([(c.ravel() + 0.5) / cols, 1.0 - (r.ravel() + 0.5) / rows], axis=1)


def assign_grid(xy: np.ndarray, rows: int, cols: int, method: str = "auto",
                candidates: int = 16) -> tuple[np.ndarray, float]:
    """Assign map points to grid cells. ``xy`` (N, 2) float; returns ``(cell_to_row (rows*cols,) int64, mean cost)``.

    ``cell_to_row[r * cols + c]`` is the row index of the image in cell (r, c), or -1 when N < cells (then
    every point gets a cell). ``method``: ``lap`` (optimal; dense up to 4M cell-point pairs, otherwise over the
    union of each cell's ``candidates`` nearest points), ``greedy`` (closest free pairs first), ``auto`` (lap
    up to 4096 cells). Cost = squared distance in the unit square, averaged over filled cells.
    """
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415
    from scipy.spatial import cKDTree  # noqa: PLC0415

    xy = np.asarray(xy)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise UsageError(f"expected (N, 2) map coordinates, got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise UsageError("map coordinates contain NaN or Inf; rebuild the map with `convlens project --force`")
    if method not in ("auto", "lap", "greedy"):
        raise UsageError(f"assignment must be auto, lap or greedy, got {method!r}")
    n_cells = rows * cols
    n = len(xy)
    out = np.full(n_cells, -1, np.int64)
    if n == 0:
        return out, 0.0
    pts = _normalise(xy)  # the map's extremes land on the outer cells' centres
    pts = np.stack([0.5 / cols + pts[:, 0] * (1 - 1 / cols), 0.5 / rows + pts[:, 1] * (1 - 1 / rows)], axis=1)
    centres = _cell_centres(rows, cols)
    if method == "auto":
        method = "lap" if n_cells <= 4096 else "greedy"

    if n <= n_cells:  # every point gets its own cell
        cost = ((pts[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        ri, ci = linear_sum_assignment(cost)
        out[ci] = ri
        return out, float(cost[ri, ci].mean())

    tree = cKDTree(pts)
    if method == "lap":
        if n * n_cells <= _DENSE_LAP_MAX:
            cand = np.arange(n)
        else:
            kk = min(n, max(candidates, 1))
            _d, nb = tree.query(centres, k=kk)
            cand = np.unique(np.asarray(nb).reshape(-1))
            if len(cand) < n_cells:  # clumped map: add the nearest other points until a full matching exists
                extra = np.setdiff1d(np.arange(n), cand)
                dist = np.min(((pts[extra][:, None, :] - centres[None, :, :]) ** 2).sum(-1), axis=1)
                cand = np.union1d(cand, extra[np.argsort(dist, kind="stable")[:n_cells - len(cand)]])
        cost = ((centres[:, None, :] - pts[cand][None, :, :]) ** 2).sum(-1)
        ri, ci = linear_sum_assignment(cost)
        out[ri] = cand[ci]
        return out, float(cost[ri, ci].mean())

    # greedy: all (cell, candidate) pairs by increasing distance; take a pair when both are still free
    kk = min(n, max(candidates, 1))
    dist, nb = tree.query(centres, k=kk)
    dist, nb = np.asarray(dist).reshape(n_cells, -1), np.asarray(nb).reshape(n_cells, -1)
    order = np.argsort(dist.reshape(-1), kind="stable")
    used = np.zeros(n, bool)
    total = 0.0
    for flat in order:
        cell, j = divmod(int(flat), nb.shape[1])
        p = int(nb[cell, j])
        if out[cell] < 0 and not used[p]:
            out[cell], used[p] = p, True
            total += float(dist[cell, j]) ** 2
    for cell in np.flatnonzero(out < 0):  # cells whose candidates were all taken: nearest free point
        free = np.flatnonzero(~used)
        d2 = ((pts[free] - centres[cell]) ** 2).sum(-1)
        p = int(free[np.argmin(d2)])
        out[cell], used[p] = p, True
        total += float(d2.min())
    return out, total / n_cells


def load_thumbnail(root: str | os.PathLike[str] | None, rel: str, size: int):
    """A ``size x size`` RGB thumbnail (centre crop) of the stored image ``root`` + ``rel``, or ``None`` (logged)
    if unusable."""
    from PIL import Image, ImageOps

    from tasks.core.images import RejectedImage, open_stored_image

    try:
        img = open_stored_image(root, rel)
        return ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
    except RejectedImage as exc:
        log.warning("grid: cannot use %s (%s); leaving its cell grey", rel, exc)
    return None


def render_grid(cell_to_row: np.ndarray, paths: Sequence[str], dataset_root: str | os.PathLike[str] | None,
                rows: int, cols: int, thumb: int = 48, progress: bool = False) -> tuple[bytes, np.ndarray]:
    """Paste thumbnails into a ``(rows * thumb) x (cols * thumb)`` RGB PNG.

    ``paths[i]`` is resolved against ``dataset_root`` (absolute paths are used as they are). Returns
    ``(png bytes, missing (rows*cols,) bool)`` where ``missing`` marks cells left grey. Memory: the canvas
    (3 x rows x cols x thumb^2 bytes) plus one decoded image.
    """
    from PIL import Image  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    if thumb < 4 or thumb > 512:
        raise UsageError(f"thumbnail size must be 4..512 px, got {thumb}")
    canvas = Image.new("RGB", (cols * thumb, rows * thumb), GRID_BACKGROUND)
    missing = np.zeros(rows * cols, bool)
    for cell in tqdm(range(rows * cols), desc="grid: thumbnails", unit="cell", disable=not progress):
        i = int(cell_to_row[cell])
        if i < 0:
            continue
        tile = load_thumbnail(dataset_root, paths[i], thumb)
        r, c = divmod(cell, cols)
        if tile is None:
            missing[cell] = True
            tile = Image.new("RGB", (thumb, thumb), MISSING_GREY)
        canvas.paste(tile, (c * thumb, r * thumb))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), missing


def grid_names(rows: int, cols: int) -> tuple[str, str]:
    """File names of a grid inside its map artefact: ``(grid-RxC.png, grid-RxC.parquet)``."""
    return f"grid-{rows}x{cols}.png", f"grid-{rows}x{cols}.parquet"


def _cells_table(cell_to_row: np.ndarray, missing: np.ndarray, coords, cols: int) -> bytes:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    cells = np.arange(len(cell_to_row))
    filled = cell_to_row >= 0
    idx = np.where(filled, cell_to_row, 0)

    def col(name):
        vals = coords[name].to_numpy()[idx]
        return [None if not f else (None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
                for v, f in zip(vals, filled)]

    table = pa.table({
        "cell_row": pa.array(cells // cols, pa.int32()),
        "cell_col": pa.array(cells % cols, pa.int32()),
        "row": pa.array(np.where(filled, cell_to_row, -1), pa.int64()),
        "image_id": pa.array(col("image_id"), pa.string()),
        "path": pa.array(col("path"), pa.string()),
        "label": pa.array(col("label"), pa.string()),
        "missing": pa.array(missing, pa.bool_()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def make_grid(store: str | os.PathLike[str], map_id: str | None = None, size: str | Sequence[int] | None = None,
              thumb: int = 48, assignment: str = "auto", out: str | os.PathLike[str] | None = None,
              scatter_out: str | os.PathLike[str] | None = None, force: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Add the image grid of a map (default: the newest t-SNE map) to that map artefact; return a summary.

    ``size`` ``"ROWSxCOLS"`` (default: the largest square <= 32x32 the map's images fill). Writes
    ``grid-RxC.png`` and ``grid-RxC.parquet`` into the map directory, lists them in its manifest (role
    ``grid`` / ``grid-cells``) and records the grid under ``manifest["grids"]["RxC"]``. An identical grid
    already published is reused unless ``force``. ``out`` / ``scatter_out`` additionally copy the grid /
    the map's scatter PNG there.
    """
    from storage.atomic import atomic_write_bytes  # noqa: PLC0415
    from storage.errors import StoreError  # noqa: PLC0415
    from storage.locks import artefact_lock  # noqa: PLC0415
    from storage.manifest import file_entry, read_manifest, safe_member, utc_now, verify_files, write_manifest  # noqa: PLC0415
    from storage.maps import read_coords, resolve_map  # noqa: PLC0415
    from storage.paths import Store  # noqa: PLC0415

    aid, manifest = resolve_map(store, map_id, method=None if map_id else "tsne")
    adir = Store(store).artefact_dir("maps", aid)
    coords = read_coords(adir, manifest)
    n = len(coords)
    rows, cols = parse_size(size) or default_size(n)
    if n < rows * cols:
        log.warning("map %s has %d images for a %dx%d grid: %d cells stay empty", aid, n, rows, cols, rows * cols - n)
    png_name, cells_name = grid_names(rows, cols)
    grid_key = f"{rows}x{cols}"
    t0 = time.perf_counter()
    with artefact_lock(adir):
        manifest = read_manifest(adir)
        rec = (manifest.get("grids") or {}).get(grid_key)
        reuse = False
        if rec and not force and rec.get("thumb") == thumb and rec.get("assignment_requested") == assignment:
            try:
                verify_files(adir, {"files": [f for f in manifest["files"] if f["name"] in (png_name, cells_name)]})
                reuse = len([f for f in manifest["files"] if f["name"] in (png_name, cells_name)]) == 2
            except StoreError as exc:
                log.warning("rebuilding grid %s of %s: %s", grid_key, aid, exc)
        if not reuse:
            method = assignment if assignment != "auto" else ("lap" if rows * cols <= 4096 else "greedy")
            xy = coords[["x", "y"]].to_numpy(np.float64)
            cell_to_row, cost = assign_grid(xy, rows, cols, method)
            root = manifest.get("dataset_root") or (manifest.get("source_manifest") or {}).get("dataset_root")
            png, missing = render_grid(cell_to_row, coords["path"].tolist(), root, rows, cols, thumb, progress)
            atomic_write_bytes(adir / png_name, png)
            atomic_write_bytes(adir / cells_name, _cells_table(cell_to_row, missing, coords, cols))
            files = [f for f in manifest.get("files", []) if f["name"] not in (png_name, cells_name)]
            files += [file_entry(adir, png_name, role="grid", size=grid_key),
                      file_entry(adir, cells_name, role="grid-cells", size=grid_key)]
            rec = {"rows": rows, "cols": cols, "thumb": thumb, "assignment_requested": assignment,
                   "assignment": method, "mean_cost": cost, "filled": int((cell_to_row >= 0).sum()),
                   "missing_images": int(missing.sum()), "png": png_name, "cells": cells_name,
                   "pixels": [cols * thumb, rows * thumb], "seconds": round(time.perf_counter() - t0, 3)}
            grids = dict(manifest.get("grids") or {})
            grids[grid_key] = rec
            manifest = write_manifest(adir, dict(manifest, files=files, grids=grids, updated=utc_now()))
    png_path = safe_member(adir, png_name)
    scatter = next((f["name"] for f in manifest.get("files", []) if f.get("role") == "scatter"), None)
    if out:
        atomic_write_bytes(Path(out), png_path.read_bytes())
    if scatter_out and scatter:
        atomic_write_bytes(Path(scatter_out), safe_member(adir, scatter).read_bytes())
    return {"map_id": aid, "method": manifest.get("method"), "size": grid_key, "grid_png": str(png_path),
            "scatter_png": str(safe_member(adir, scatter)) if scatter else None, "out": str(out) if out else None,
            "reused": reuse, **{k: rec[k] for k in ("filled", "missing_images", "assignment", "mean_cost", "pixels")}}
