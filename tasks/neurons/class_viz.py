"""Class visualisation by gradient ascent (Simonyan et al.; Yosinski et al. regularisers; CS231n):

    I* = argmax_I  S_c(I) − λ ‖I‖²

``S_c`` is the unnormalised class score (logit). The image is optimised in the model's normalised input space
(as the seeds do) from zeros (the dataset mean) or small noise, with the seeds' regularisers:
- L2 decay ``λ`` (the ``− λ‖I‖²`` term, applied as weight decay on the step),
- jitter: random roll by up to ``jitter`` pixels before each step (undone after),
- periodic Gaussian blur (every ``blur_every`` steps, ``blur_sigma`` pixels),
- clipping of small values: pixels whose norm over channels is below the ``clip_value_pct`` percentile are
  set to 0 (the mean colour), and of small contributions: pixels whose ``|x · grad|`` is below the
  ``clip_grad_pct`` percentile are set to 0,
- pixel-range clamp to what the normalisation can produce from [0, 1].
The step is normalised (``lr · g / mean|g|``) so ``lr`` is in normalised-input units per step.
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
    Source,
    gaussian_blur,
    jitter_roll,
    label_strip,
    open_source,
    publish,
    resolve_class,
    tile_grid,
    to_uint8,
    write_png,
    write_table,
)

__all__ = ["ClassVizConfig", "class_visualisation", "run_class_viz"]


@dataclass(frozen=True)
class ClassVizConfig:
    size: int = 224
    steps: int = 100
    lr: float = 0.1
    l2: float = 1e-3
    jitter: int = 8
    blur_every: int = 10
    blur_sigma: float = 0.5
    clip_value_pct: float = 0.0
    clip_grad_pct: float = 0.0
    init: str = "zero"  # zero | noise
    seed: int = 0

    def validate(self) -> None:
        if self.init not in ("zero", "noise"):
            raise UsageError(f"init must be 'zero' or 'noise', got {self.init!r}")
        if self.steps < 1 or self.size < 8:
            raise UsageError("steps must be >= 1 and size >= 8 pixels")
        for name in ("clip_value_pct", "clip_grad_pct"):
            if not 0 <= getattr(self, name) < 100:
                raise UsageError(f"{name} is a percentile in [0, 100), got {getattr(self, name)}")


def class_visualisation(model: torch.nn.Module, target: int, mean: Sequence[float], std: Sequence[float],
                        cfg: ClassVizConfig = ClassVizConfig(), device: torch.device | None = None
                        ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Optimise an image for class ``target`` of ``model`` (raw module, normalised input, eval mode).

    Returns ``(image (3, size, size) float32 in [0,1], history)``; history has one row per step:
    step, score (S_c before the step), prob (softmax of the target), l2 (‖I‖² in normalised units).
    """
    cfg.validate()
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    m = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), device=device).view(1, 3, 1, 1)
    lo, hi = -m / s, (1 - m) / s
    if cfg.init == "zero":
        x = torch.zeros(1, 3, cfg.size, cfg.size, device=device)
    else:
        x = (0.1 * torch.randn(1, 3, cfg.size, cfg.size, generator=g)).to(device)
    hist = []
    for step in range(cfg.steps):
        xj, (dy, dx) = jitter_roll(x, cfg.jitter, g)
        xj = xj.detach().requires_grad_(True)
        out = model(xj)
        score = out[0, target]
        obj = score - cfg.l2 * (xj ** 2).sum()
        grad, = torch.autograd.grad(obj, xj)
        hist.append({"step": step, "score": float(score.detach()), "prob": float(torch.softmax(out[0].detach().float(), 0)[target]),
                     "l2": float((x ** 2).sum())})
        with torch.no_grad():
            grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
            x = x + cfg.lr * grad / grad.abs().mean().clamp_min(1e-12)
            x = torch.max(torch.min(x, hi), lo)
            if cfg.blur_every and (step + 1) % cfg.blur_every == 0 and step + 1 < cfg.steps:
                x = gaussian_blur(x, cfg.blur_sigma)
            if cfg.clip_value_pct > 0:
                norms = x.norm(dim=1, keepdim=True)
                x = torch.where(norms < torch.quantile(norms.flatten(), cfg.clip_value_pct / 100), torch.zeros_like(x), x)
            if cfg.clip_grad_pct > 0:
                contrib = (x * grad).abs().sum(dim=1, keepdim=True)
                x = torch.where(contrib < torch.quantile(contrib.flatten(), cfg.clip_grad_pct / 100), torch.zeros_like(x), x)
    with torch.no_grad():
        out = model(x)
    hist.append({"step": cfg.steps, "score": float(out[0, target]), "prob": float(torch.softmax(out[0].float(), 0)[target]),
                 "l2": float((x ** 2).sum())})
    img = (x * s + m).clamp(0, 1)[0].cpu()
    return img, pd.DataFrame(hist)


def run_class_viz(store: str | Path, targets: Sequence[int | str], features_id: str | None = None,
                  model: str | None = None, weights: str | None = None, cfg: ClassVizConfig = ClassVizConfig(),
                  device: str = "auto", source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Publish one visualisation per target class.

    Files: ``class-<index>.png`` per class, ``class_viz.png`` (all, captioned), ``class_viz.parquet`` with the
    optimisation history: class_index, class_name, step, score, prob, l2.
    """
    src = source or open_source(store, features_id, model, weights)
    mod = src.lm.module
    dev = pick_device(device)
    n_cls = _num_classes(mod)
    resolved = [resolve_class(t, src.categories, n_cls) for t in targets]
    if not resolved:
        raise UsageError("pass at least one target class (--target INDEX|NAME)")
    params = {"targets": [i for i, _ in resolved], **asdict(cfg)}

    def build(adir: Path):
        for p in mod.parameters():
            p.requires_grad_(False)
        net = mod.eval().to(dev)
        files, tables, tiles, summary = [], [], [], []
        for idx, name in resolved:
            img, hist = class_visualisation(net, idx, src.preprocess.mean, src.preprocess.std, cfg, dev)
            hist.insert(0, "class_name", name)
            hist.insert(0, "class_index", idx)
            tables.append(hist)
            arr = to_uint8(img)
            files.append(write_png(adir, f"class-{idx}.png", arr, class_index=idx, class_name=name))
            tiles.append(label_strip(arr, f"{idx} {name}"))
            summary.append({"class_index": idx, "class_name": name, "score_start": float(hist["score"].iloc[0]),
                            "score_end": float(hist["score"].iloc[-1]), "prob_end": float(hist["prob"].iloc[-1])})
        files.append(write_png(adir, "class_viz.png", tile_grid(tiles, min(4, len(tiles)))))
        files.append(write_table(adir, "class_viz.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"classes": summary}

    return publish(store, "class_viz", src.readable, {**src.key, "params": params}, build, force)


def _num_classes(mod: torch.nn.Module) -> int:
    last = None
    for m in mod.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    if last is None:
        raise UsageError("class visualisation needs a classifier (a final nn.Linear)")
    return last.out_features


