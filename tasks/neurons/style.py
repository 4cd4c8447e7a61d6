"""Neural style transfer (Gatys et al.; CS231n): match the content image's features at one layer and the
style image's Gram matrices at several layers, with a total-variation term.

    L(x) = w_c ‖φ_l(x) − φ_l(content)‖² / ‖φ_l(content)‖²  +  Σ_j w_s,j ‖G_j(x) − G_j(style)‖² / ‖G_j(style)‖²
           + w_tv · TV(x)

``G = F Fᵀ / (C·H·W)`` for ``F`` the ``(C, H·W)`` activation. The losses are relative (divided by the target's
squared norm), so the default weights work across layers and models. Optimised in pixel space (clamped to
[0, 1]) from the content image, with L-BFGS (default) or Adam.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.core.hooks import LayerRef, capture, resolve_layer
from tasks.neurons.common import (
    Normalised,
    Source,
    conv_layers,
    label_strip,
    load_images,
    open_source,
    publish,
    tile_grid,
    to_uint8,
    total_variation,
    write_png,
    write_table,
)

__all__ = ["StyleConfig", "gram", "style_losses", "style_transfer", "default_style_layers", "run_style"]


@dataclass(frozen=True)
class StyleConfig:
    content_layer: str | None = None
    style_layers: tuple[str, ...] = ()
    content_weight: float = 1.0
    style_weight: float = 10.0
    tv_weight: float = 1e-2
    steps: int = 50
    optimizer: str = "lbfgs"  # lbfgs | adam
    lr: float = 0.02  # adam only
    size: int | None = None
    init: str = "content"  # content | noise
    seed: int = 0


def gram(feat: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> Gram matrices ``(N, C, C)`` normalised by ``C·H·W``."""
    n, c, h, w = feat.shape
    f = feat.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def default_style_layers(model: torch.nn.Module) -> tuple[str, list[str]]:
    """``(content_layer, style_layers)``: four convs spread over the first 60 % of the network, content at ~40 %."""
    convs = conv_layers(model)
    if len(convs) < 2:
        raise UsageError("style transfer needs a model with at least two Conv2d layers")
    upto = max(2, int(len(convs) * 0.6))
    idx = sorted({int(round(i)) for i in torch.linspace(0, upto - 1, 4).tolist()})
    return convs[int(len(convs) * 0.4)], [convs[i] for i in idx]


def _features(net: Normalised, x: torch.Tensor, layers: Sequence[str], grad: bool) -> dict[str, torch.Tensor]:
    inner = net.model
    refs = [LayerRef(ly, resolve_layer(inner, ly).name) for ly in layers]
    with capture(inner, refs, detach=not grad) as acts:
        net(x)
        return {k: v.float() for k, v in acts.items()}


def style_losses(net: Normalised, x: torch.Tensor, content_target: torch.Tensor, style_targets: dict[str, torch.Tensor],
                 cfg: StyleConfig, content_layer: str, grad: bool = True) -> dict[str, torch.Tensor]:
    """Loss terms for ``x``: ``content``, ``style`` (Gram), ``tv`` and weighted ``total`` (scalar tensors)."""
    feats = _features(net, x, [content_layer, *style_targets], grad)
    content = (feats[content_layer] - content_target).pow(2).sum() / content_target.pow(2).sum().clamp_min(1e-12)
    style = sum((gram(feats[ly]) - gt).pow(2).sum() / gt.pow(2).sum().clamp_min(1e-12) for ly, gt in style_targets.items())
    style = style / max(1, len(style_targets))
    tv = total_variation(x)
    total = cfg.content_weight * content + cfg.style_weight * style + cfg.tv_weight * tv
    return {"content": content, "style": style, "tv": tv, "total": total}


def style_transfer(net: Normalised, content: torch.Tensor, style: torch.Tensor, cfg: StyleConfig = StyleConfig()
                   ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Stylise ``content (1,3,H,W)`` with ``style (1,3,H',W')`` (both in [0,1]) through pixel-space ``net``.

    Returns ``(image (3,H,W) in [0,1], history)`` with rows step, content, style (Gram loss), tv, total.
    """
    if cfg.optimizer not in ("lbfgs", "adam"):
        raise UsageError(f"optimizer must be lbfgs or adam, got {cfg.optimizer!r}")
    if cfg.steps < 1:
        raise UsageError("steps must be >= 1")
    c_layer, s_layers = default_style_layers(net.model)
    c_layer = cfg.content_layer or c_layer
    s_layers = list(cfg.style_layers) or s_layers
    with torch.no_grad():
        content_target = _features(net, content, [c_layer], False)[c_layer]
        style_targets = {ly: gram(f) for ly, f in _features(net, style, s_layers, False).items()}
    if cfg.init == "content":
        x = content.clone()
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.rand(content.shape, generator=g).to(content.device)
    x.requires_grad_(True)
    hist: list[dict[str, Any]] = []

    def record(step: int) -> None:
        with torch.no_grad():
            parts = style_losses(net, x, content_target, style_targets, cfg, c_layer, grad=False)
        hist.append({"step": step, **{k: float(v) for k, v in parts.items()}})

    record(0)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam([x], lr=cfg.lr)
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            style_losses(net, x, content_target, style_targets, cfg, c_layer)["total"].backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            record(step + 1)
    else:
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = style_losses(net, x, content_target, style_targets, cfg, c_layer)["total"]
            loss.backward()
            return loss

        for step in range(cfg.steps):
            opt.step(closure)
            with torch.no_grad():
                x.clamp_(0, 1)
            record(step + 1)
    return x.detach()[0].cpu(), pd.DataFrame(hist)


def run_style(store: str | Path, content: str, style: str, model: str | None = None, weights: str | None = None,
              features_id: str | None = None, cfg: StyleConfig = StyleConfig(), device: str = "auto",
              source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Stylise image file ``content`` with image file ``style``.

    Files: ``style.png`` (content | style | result), ``style.parquet``: step, content, style, tv, total.
    """
    from storage.atomic import sha256_file

    src = source or open_source(store, features_id, model or (None if features_id else "mobilenet_v2"), weights)
    for p in (content, style):
        if not Path(p).is_file():
            raise UsageError(f"image file {p} does not exist")
    c_layer, s_layers = default_style_layers(src.lm.module)
    cfg_used = StyleConfig(**{**asdict(cfg), "content_layer": cfg.content_layer or c_layer,
                              "style_layers": tuple(cfg.style_layers) or tuple(s_layers)})
    params = {"content": str(content), "style": str(style), "content_sha256": sha256_file(content),
              "style_sha256": sha256_file(style), **asdict(cfg_used)}

    def build(adir: Path):
        dev = pick_device(device)
        net = src.wrapped(dev)
        xc = load_images([content], src.preprocess, cfg.size).to(dev)
        xs = load_images([style], src.preprocess, cfg.size).to(dev)
        out, hist = style_transfer(net, xc, xs, cfg_used)
        grid = tile_grid([label_strip(to_uint8(xc[0]), "content"), label_strip(to_uint8(xs[0]), "style"),
                          label_strip(to_uint8(out), "result")], 3)
        files = [write_png(adir, "style.png", grid), write_png(adir, "style-result.png", to_uint8(out)),
                 write_table(adir, "style.parquet", hist)]
        return files, {"content_layer": cfg_used.content_layer, "style_layers": list(cfg_used.style_layers),
                       "style_loss_start": float(hist["style"].iloc[0]), "style_loss_end": float(hist["style"].iloc[-1])}

    return publish(store, "style", src.readable, {**src.key, "params": params}, build, force)


