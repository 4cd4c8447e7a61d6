"""First-layer filters as an RGB image grid, and any conv layer's filters as per-channel grey grids.

A first-layer kernel ``(3, kh, kw)`` is shown as a colour tile, min-max normalised per filter (so weak and
strong filters are both visible; the table keeps the true norms). A deeper kernel ``(C_in, kh, kw)`` is shown as
a row of ``C_in`` grey tiles (one per input channel), normalised per filter, for the first ``max_filters``
filters and ``max_in_channels`` input channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from storage.errors import UsageError
from tasks.neurons.common import Source, normalise_each, open_source, publish, tile_grid, to_uint8, write_png, write_table

__all__ = ["first_conv_layer", "conv_weight", "filter_tiles", "filter_grid", "channel_grid", "filter_stats", "run_filters"]


def first_conv_layer(model: nn.Module) -> str:
    """Name of the first ``Conv2d`` (in definition order) that reads 3 input channels."""
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return n
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return n
    raise UsageError("the model has no Conv2d layer")


def conv_weight(model: nn.Module, layer: str) -> torch.Tensor:
    """Weight ``(C_out, C_in/groups, kh, kw) float32`` of Conv2d ``layer`` (a container resolves to its first conv)."""
    mods = dict(model.named_modules())
    if layer not in mods:
        raise UsageError(f"unknown layer {layer!r}; pass a Conv2d module name (e.g. {first_conv_layer(model)})")
    m = mods[layer]
    if not isinstance(m, nn.Conv2d):
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        if not convs:
            raise UsageError(f"layer {layer!r} is a {type(m).__name__}, not a Conv2d, and holds none")
        m = convs[0]
    return m.weight.detach().float().cpu()


def filter_tiles(weight: torch.Tensor, upscale: int = 0) -> list[np.ndarray]:
    """``(O, 3, kh, kw)`` -> O RGB tiles ``(kh*u, kw*u, 3) uint8``, min-max normalised per filter."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise UsageError(f"an RGB filter grid needs weights (O, 3, kh, kw), got {tuple(weight.shape)}; use channel_grid")
    w = normalise_each(weight)
    u = upscale or max(1, 32 // max(weight.shape[2:]))
    w = w.repeat_interleave(u, dim=2).repeat_interleave(u, dim=3)
    return [to_uint8(t) for t in w]


def filter_grid(weight: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """All first-layer filters as one ``(H, W, 3) uint8`` grid (per-filter normalisation)."""
    tiles = filter_tiles(weight)
    return tile_grid(tiles, ncol or int(np.ceil(np.sqrt(len(tiles)))), pad=2)


def channel_grid(weight: torch.Tensor, max_filters: int = 32, max_in_channels: int = 32) -> np.ndarray:
    """Rows = filters, columns = input channels: grey tiles of ``(O, C_in, kh, kw)`` normalised per filter."""
    w = weight[:max_filters, :max_in_channels]
    w = normalise_each(w)
    u = max(1, 16 // max(w.shape[2:]))
    w = w.repeat_interleave(u, dim=2).repeat_interleave(u, dim=3)
    tiles = [to_uint8(w[o, c]) for o in range(w.shape[0]) for c in range(w.shape[1])]
    return tile_grid(tiles, w.shape[1], pad=1)


def filter_stats(weight: torch.Tensor, layer: str) -> pd.DataFrame:
    """One row per filter: layer, filter, in_channels, kh, kw, l2_norm, mean, std, min, max."""
    o = weight.shape[0]
    flat = weight.reshape(o, -1)
    return pd.DataFrame({
        "layer": layer, "filter": np.arange(o), "in_channels": weight.shape[1], "kh": weight.shape[2], "kw": weight.shape[3],
        "l2_norm": flat.norm(dim=1).numpy(), "mean": flat.mean(dim=1).numpy(), "std": flat.std(dim=1).numpy(),
        "min": flat.min(dim=1).values.numpy(), "max": flat.max(dim=1).values.numpy(),
    })


def run_filters(store: str | Path, features_id: str | None = None, model: str | None = None, weights: str | None = None,
                layers: list[str] | None = None, max_filters: int = 32, max_in_channels: int = 32,
                source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Publish filter grids of ``layers`` (default: the first conv) and a per-filter table.

    Files: ``filters-<layer>.png`` per layer (RGB grid for 3-channel kernels, else channel grid),
    ``filters.parquet`` (:func:`filter_stats` rows for every filter of every layer).
    """
    src = source or open_source(store, features_id, model, weights)
    mod = src.lm.module
    layers = layers or [first_conv_layer(mod)]
    weights_by_layer = {ly: conv_weight(mod, ly) for ly in layers}
    params = {"layers": layers, "max_filters": max_filters, "max_in_channels": max_in_channels}

    def build(adir: Path):
        files, tables, images = [], [], {}
        for ly, w in weights_by_layer.items():
            img = filter_grid(w) if w.shape[1] == 3 else channel_grid(w, max_filters, max_in_channels)
            name = f"filters-{ly.replace('.', '_')}.png"
            files.append(write_png(adir, name, img, layer=ly, shape=list(w.shape)))
            images[ly] = name
            tables.append(filter_stats(w, ly))
        files.append(write_table(adir, "filters.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"layers": layers, "images": images}

    return publish(store, "filters", src.readable, {**src.key, "params": params}, build, force)
