"""DeepDream (Mordvintsev et al.): amplify what a layer sees in an image.

Gradient ascent on ``½ mean(a²)`` of the layer's activation ``a`` (or of one channel), in pixel space, with
random jitter (roll) per step and an octave pyramid: the image is processed from the smallest octave up,
the detail added at one octave is upsampled and carried to the next. Steps are normalised
(``lr · g / mean|g|``) and the image is clamped to [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.neurons.common import (
    Normalised,
    Source,
    forward_to,
    jitter_roll,
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

__all__ = ["DreamConfig", "deepdream", "run_deepdream"]


@dataclass(frozen=True)
class DreamConfig:
    octaves: int = 3
    octave_scale: float = 1.4
    steps_per_octave: int = 10
    lr: float = 0.01
    jitter: int = 16
    channel: int | None = None
    seed: int = 0


def deepdream(net: Normalised, x: torch.Tensor, layer: str, cfg: DreamConfig = DreamConfig()
              ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Dream on ``x (1,3,H,W)`` in [0,1]. Returns ``(dream (3,H,W) in [0,1], history)`` with rows
    octave, step, size (pixels), objective (before the step)."""
    if cfg.octaves < 1 or cfg.steps_per_octave < 1 or cfg.octave_scale <= 1:
        raise UsageError("need octaves >= 1, steps_per_octave >= 1 and octave_scale > 1")
    g = torch.Generator().manual_seed(cfg.seed)
    h, w = x.shape[2:]
    sizes = [(max(8, int(round(h / cfg.octave_scale ** o))), max(8, int(round(w / cfg.octave_scale ** o))))
             for o in range(cfg.octaves - 1, -1, -1)]
    base = [F.interpolate(x, size=s, mode="bilinear", align_corners=False) for s in sizes]
    detail = torch.zeros_like(base[0])
    hist = []
    img = base[0]
    for o, (s, b) in enumerate(zip(sizes, base)):
        detail = F.interpolate(detail, size=s, mode="bilinear", align_corners=False)
        img = (b + detail).clamp(0, 1)
        for step in range(cfg.steps_per_octave):
            xj, (dy, dx) = jitter_roll(img, cfg.jitter, g)
            xj = xj.detach().requires_grad_(True)
            a = forward_to(net, xj, layer, grad=True).float()
            if cfg.channel is not None:
                if not 0 <= cfg.channel < a.shape[1]:
                    raise UsageError(f"channel {cfg.channel} out of range: {layer} has {a.shape[1]} channels")
                a = a[:, cfg.channel]
            obj = 0.5 * a.pow(2).mean()
            grad, = torch.autograd.grad(obj, xj)
            hist.append({"octave": o, "step": step, "size": s[0], "objective": float(obj.detach())})
            with torch.no_grad():
                grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
                img = (img + cfg.lr * grad / grad.abs().mean().clamp_min(1e-12)).clamp(0, 1)
        detail = img - b
    with torch.no_grad():
        a = forward_to(net, img, layer).float()
        a = a[:, cfg.channel] if cfg.channel is not None else a
        hist.append({"octave": cfg.octaves - 1, "step": cfg.steps_per_octave, "size": sizes[-1][0],
                     "objective": float(0.5 * a.pow(2).mean())})
    return img.detach()[0].cpu(), pd.DataFrame(hist)


def run_deepdream(store: str | Path, layer: str, features_id: str | None = None, images: Sequence[str] | None = None,
                  n_images: int = 1, model: str | None = None, weights: str | None = None,
                  cfg: DreamConfig = DreamConfig(), device: str = "auto", source: Source | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Files: ``dream-<k>.png`` (original | dream), ``deepdream.parquet``: image_id, path, layer, octave, step,
    size, objective."""
    src = source or open_source(store, features_id, model, weights)
    if src.features_dir is not None:
        rows = select_rows(src.meta(), n_images, images)
        files_in, ids, paths = [src.image_file(p) for p in rows["path"]], list(rows["image_id"]), list(rows["path"])
    else:
        if not images:
            raise UsageError("pass image files with --image when no feature artefact is used")
        files_in, ids, paths = [Path(p) for p in images], [None] * len(images), [str(p) for p in images]
    params = {"layer": layer, "images": paths, **asdict(cfg)}

    def build(adir: Path):
        dev = pick_device(device)
        net = src.wrapped(dev)
        x = load_images(files_in, src.preprocess)
        files, tables, pngs = [], [], []
        for k in range(len(x)):
            dream, hist = deepdream(net, x[k:k + 1].to(dev), layer, cfg)
            hist.insert(0, "layer", layer)
            hist.insert(0, "path", paths[k])
            hist.insert(0, "image_id", ids[k])
            tables.append(hist)
            grid = tile_grid([label_strip(to_uint8(x[k]), "original"), label_strip(to_uint8(dream), f"dream {layer}")], 2)
            name = f"dream-{k:03d}.png"
            files.append(write_png(adir, name, grid, image_id=ids[k], path=paths[k]))
            pngs.append(name)
        files.append(write_table(adir, "deepdream.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"layer": layer, "images": pngs}

    return publish(store, "deepdream", src.readable, {**src.key, "params": params}, build, force)
