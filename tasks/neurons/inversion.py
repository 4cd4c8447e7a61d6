"""Feature inversion (Mahendran & Vedaldi; CS231n): reconstruct an image from its features at a layer.

    x* = argmin_x ‖φ(x) − φ(x0)‖² / ‖φ(x0)‖² + α · TV(x) + λ ‖x − 0.5‖²

optimised with Adam in pixel space from small noise around grey (clamped to [0, 1] after every step, with
jitter optional). Running it for several layers of one image shows what each layer keeps: early layers give the
image back almost exactly, deep layers only its "gist".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.neurons.common import (
    Normalised,
    Source,
    forward_to,
    label_strip,
    load_images,
    open_source,
    publish,
    select_rows,
    tile_grid,
    to_uint8,
    total_variation,
    write_png,
    write_table,
)

__all__ = ["InversionConfig", "invert_features", "run_inversion"]


@dataclass(frozen=True)
class InversionConfig:
    steps: int = 200
    lr: float = 0.05
    tv_weight: float = 1e-2
    l2_weight: float = 0.0
    size: int | None = None  # None: the model's crop
    seed: int = 0


def invert_features(net: Normalised, x0: torch.Tensor, layer: str, cfg: InversionConfig = InversionConfig()
                    ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Reconstruct ``x0 (1,3,H,W)`` in [0,1] from its ``layer`` activation through pixel-space ``net``.

    Returns ``(reconstruction (3,H,W) in [0,1], history)`` with one row per step: step,
    feature_distance (relative squared distance ‖φ(x)−φ(x0)‖²/‖φ(x0)‖² before the step), tv, loss.
    """
    if cfg.steps < 1:
        raise UsageError("steps must be >= 1")
    dev = x0.device
    with torch.no_grad():
        target = forward_to(net, x0, layer).float()
    denom = target.pow(2).sum().clamp_min(1e-12)
    g = torch.Generator().manual_seed(cfg.seed)
    x = (0.5 + 0.05 * torch.randn(x0.shape, generator=g)).to(dev).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    hist = []
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        feat = forward_to(net, x, layer, grad=True).float()
        dist = (feat - target).pow(2).sum() / denom
        tv = total_variation(x)
        loss = dist + cfg.tv_weight * tv + cfg.l2_weight * (x - 0.5).pow(2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        hist.append({"step": step, "feature_distance": float(dist.detach()), "tv": float(tv.detach()), "loss": float(loss.detach())})
    with torch.no_grad():
        final = float((forward_to(net, x, layer).float() - target).pow(2).sum() / denom)
    hist.append({"step": cfg.steps, "feature_distance": final, "tv": float(total_variation(x.detach())), "loss": float("nan")})
    return x.detach()[0].cpu(), pd.DataFrame(hist)


def run_inversion(store: str | Path, layers: Sequence[str], features_id: str | None = None,
                  images: Sequence[str] | None = None, n_images: int = 1, model: str | None = None,
                  weights: str | None = None, cfg: InversionConfig = InversionConfig(), device: str = "auto",
                  source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Invert each image's features at each of ``layers``.

    Files: ``inversion-<k>.png`` per image (original then one reconstruction per layer, captioned),
    ``inversion.parquet``: image_id, path, layer, step, feature_distance, tv, loss.
    """
    if not layers:
        raise UsageError("pass at least one --layer to invert")
    src = source or open_source(store, features_id, model, weights)
    if src.features_dir is not None:
        rows = select_rows(src.meta(), n_images, images)
        files_in, ids, paths = [src.image_file(p) for p in rows["path"]], list(rows["image_id"]), list(rows["path"])
    else:
        if not images:
            raise UsageError("pass image files with --image when no feature artefact is used")
        files_in, ids, paths = [Path(p) for p in images], [None] * len(images), [str(p) for p in images]
    params = {"layers": list(layers), "images": paths, **asdict(cfg)}

    def build(adir: Path):
        dev = pick_device(device)
        net = src.wrapped(dev)
        x = load_images(files_in, src.preprocess, cfg.size)
        files, tables, pngs = [], [], []
        for k in range(len(x)):
            tiles = [label_strip(to_uint8(x[k]), "original")]
            for ly in layers:
                rec, hist = invert_features(net, x[k:k + 1].to(dev), ly, cfg)
                hist.insert(0, "layer", ly)
                hist.insert(0, "path", paths[k])
                hist.insert(0, "image_id", ids[k])
                tables.append(hist)
                tiles.append(label_strip(to_uint8(rec), f"{ly} d={hist['feature_distance'].iloc[-1]:.2f}"))
            name = f"inversion-{k:03d}.png"
            files.append(write_png(adir, name, tile_grid(tiles, len(tiles)), image_id=ids[k], path=paths[k]))
            pngs.append(name)
        files.append(write_table(adir, "inversion.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"layers": list(layers), "images": pngs}

    return publish(store, "inversion", src.readable, {**src.key, "params": params}, build, force)
