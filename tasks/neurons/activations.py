"""Activation maps of any layer for chosen images.

For each image: the input crop and the ``max_channels`` most active channels of the layer (ranked by the
channel's spatial mean for that image, or the channels you name), each map upsampled to the crop size and
min-max normalised per map, shown in a grid with the crop first. The table keeps the raw numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.neurons.common import (
    Source,
    forward_to,
    label_strip,
    load_images,
    open_source,
    publish,
    select_rows,
    tile_grid,
    to_uint8,
    write_png,
    write_table,
)

__all__ = ["activation_maps", "colormap", "activation_panel", "run_activations"]


def activation_maps(model: torch.nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Activation of ``layer`` for pixel-space ``x`` ``(N,3,H,W)`` through a :class:`Normalised` model:
    ``(N, C, h, w) float32`` (a 2-d output ``(N, D)`` is returned as ``(N, D, 1, 1)``)."""
    with torch.no_grad():
        a = forward_to(model, x, layer).float()
    if a.dim() == 2:
        a = a[:, :, None, None]
    if a.dim() != 4:
        raise UsageError(f"layer {layer!r} outputs shape {tuple(a.shape)}; activation maps need (N, C, h, w)")
    return a


def colormap(m: np.ndarray) -> np.ndarray:
    """``(h, w)`` in [0,1] -> ``(h, w, 3) uint8`` with a perceptual dark-blue -> yellow ramp (viridis-like)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)
    t = np.clip(m, 0, 1) * (len(stops) - 1)
    i = np.clip(np.floor(t).astype(int), 0, len(stops) - 2)
    f = (t - i)[..., None]
    return np.clip(stops[i] * (1 - f) + stops[i + 1] * f, 0, 255).astype(np.uint8)


def activation_panel(image: torch.Tensor, act: torch.Tensor, channels: Sequence[int], ncol: int = 8) -> np.ndarray:
    """Grid: the image ``(3,H,W)`` then each channel of ``act`` ``(C,h,w)`` upsampled (nearest) to H x W."""
    h, w = image.shape[1:]
    tiles = [label_strip(to_uint8(image), "input")]
    for c in channels:
        m = act[c][None, None]
        m = F.interpolate(m, size=(h, w), mode="nearest")[0, 0]
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
        tiles.append(label_strip(colormap(m.numpy()), f"ch {c} max {hi:.2g}"))
    return tile_grid(tiles, ncol, pad=2)


def run_activations(store: str | Path, layer: str, features_id: str | None = None, images: Sequence[str] | None = None,
                    n_images: int = 4, channels: Sequence[int] | None = None, max_channels: int = 15,
                    model: str | None = None, weights: str | None = None, device: str = "auto",
                    source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Publish activation-map panels of ``layer`` for images of a feature artefact (``images`` = their
    dataset-relative paths, else ``n_images`` spread over it), or for image files when ``model`` is given.

    Files: ``act-<k>.png`` per image, ``activations.parquet`` with one row per (image, channel):
    image_id, path, layer, channel, mean, max, argmax_y, argmax_x (unit coordinates), height, width (map size).
    """
    src = source or open_source(store, features_id, model, weights)
    dev = pick_device(device)
    net = src.wrapped(dev)
    if src.features_dir is not None:
        rows = select_rows(src.meta(), n_images, images)
        files_in = [src.image_file(p) for p in rows["path"]]
        ids, paths = list(rows["image_id"]), list(rows["path"])
    else:
        if not images:
            raise UsageError("pass image files with --image when no feature artefact is used")
        files_in = [Path(p) for p in images]
        ids, paths = [None] * len(files_in), [str(p) for p in files_in]
    params = {"layer": layer, "images": paths, "channels": list(channels) if channels else None, "max_channels": max_channels}

    def build(adir: Path):
        x = load_images(files_in, src.preprocess)
        acts = torch.cat([activation_maps(net, x[i:i + 8].to(dev), layer).cpu() for i in range(0, len(x), 8)])
        files, recs, pngs = [], [], []
        for k in range(len(x)):
            a = acts[k]
            means = a.mean(dim=(1, 2))
            chans = list(channels) if channels else [int(c) for c in torch.argsort(means, descending=True)[:max_channels]]
            bad = [c for c in chans if not 0 <= c < a.shape[0]]
            if bad:
                raise UsageError(f"channel {bad[0]} out of range: layer {layer} has {a.shape[0]} channels")
            name = f"act-{k:03d}.png"
            files.append(write_png(adir, name, activation_panel(x[k], a, chans), image_id=ids[k], path=paths[k]))
            pngs.append(name)
            flat = a.reshape(a.shape[0], -1)
            amax = flat.argmax(dim=1)
            for c in range(a.shape[0]):
                recs.append({"image_id": ids[k], "path": paths[k], "layer": layer, "channel": c, "mean": float(means[c]),
                             "max": float(flat[c, amax[c]]), "argmax_y": int(amax[c]) // a.shape[2],
                             "argmax_x": int(amax[c]) % a.shape[2], "height": a.shape[1], "width": a.shape[2],
                             "shown": c in chans})
        files.append(write_table(adir, "activations.parquet", pd.DataFrame(recs)))
        return files, {"layer": layer, "images": pngs, "channels": int(acts.shape[1]), "map_size": list(acts.shape[2:])}

    return publish(store, "activations", src.readable, {**src.key, "params": params}, build, force)
