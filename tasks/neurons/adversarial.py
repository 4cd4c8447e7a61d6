"""Adversarial / fooling images (Goodfellow et al. FGSM; Madry et al. PGD) and a robustness audit.

All in pixel space ``[0, 1]``; ``eps`` is an L∞ bound in those units (``8/255`` = 8 grey levels).
- :func:`fgsm`: one signed-gradient step ``x ± eps · sign(∇_x L)`` (away from the label, or toward a target);
  ``L`` is the logit margin (:func:`margin_loss`), whose gradient survives softmax saturation.
- :func:`pgd`: ``steps`` signed steps of ``alpha`` with projection on the ``eps`` ball (and [0, 1]).
- :func:`min_flip_eps`: the smallest ``eps`` on a geometric grid that flips the prediction (untargeted: the
  prediction changes; targeted: it becomes the target), refined by bisection for FGSM. The audit runs it over
  a set of images and stores per image the perturbation size needed — a robustness audit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    label_strip,
    load_images,
    open_source,
    publish,
    resolve_class,
    select_rows,
    tile_grid,
    to_uint8,
    write_png,
    write_table,
)

__all__ = ["AdvConfig", "margin_loss", "fgsm", "pgd", "eps_grid", "min_flip_eps", "run_adversarial"]


@dataclass(frozen=True)
class AdvConfig:
    method: str = "fgsm"  # fgsm | pgd
    target: int | str | None = None  # None: untargeted
    eps_min: float = 0.25 / 255
    eps_max: float = 16 / 255
    grid: int = 12
    steps: int = 10  # pgd
    refine: int = 6  # fgsm bisection steps


def eps_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` geometrically spaced eps values from ``lo`` to ``hi`` (pixel units)."""
    if not 0 < lo <= hi or n < 1:
        raise UsageError(f"need 0 < eps_min <= eps_max and grid >= 1, got {lo}, {hi}, {n}")
    return [float(v) for v in np.geomspace(lo, hi, n)] if n > 1 else [hi]


def margin_loss(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Per-row ``max_{j≠c} z_j − z_c`` (C&W margin): positive once the prediction is no longer ``c``.

    Used instead of cross-entropy for the gradient sign because it does not vanish when the softmax
    saturates (a confidently classified image has ``1 − p`` = 0 in float32 and a zero CE gradient)."""
    z = logits.float()
    own = z.gather(1, cls.view(-1, 1)).squeeze(1)
    other = z.masked_fill(F.one_hot(cls, z.shape[1]).bool(), float("-inf")).amax(dim=1)
    return other - own


def _grad_sign(net: torch.nn.Module, x: torch.Tensor, cls: torch.Tensor, targeted: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = margin_loss(net(x), cls).sum()
    grad, = torch.autograd.grad(loss, x)
    return -grad.sign() if targeted else grad.sign()


def fgsm(net: torch.nn.Module, x: torch.Tensor, eps: float | torch.Tensor, cls: torch.Tensor,
         targeted: bool = False) -> torch.Tensor:
    """``x (N,3,H,W)`` in [0,1] -> adversarial ``x ± eps·sign(∇ margin)`` clamped to [0,1]. ``cls`` ``(N,)`` int64 is the
    true/predicted class (untargeted: move away) or the target (``targeted``: move toward). ``eps`` float or ``(N,)``."""
    e = eps.view(-1, 1, 1, 1) if isinstance(eps, torch.Tensor) else eps
    return (x + e * _grad_sign(net, x, cls, targeted)).clamp(0, 1).detach()


def pgd(net: torch.nn.Module, x: torch.Tensor, eps: float | torch.Tensor, cls: torch.Tensor, targeted: bool = False,
        steps: int = 10, alpha: float | torch.Tensor | None = None) -> torch.Tensor:
    """Iterative FGSM with projection on the L∞ ``eps`` ball (``alpha`` default ``2.5·eps/steps``)."""
    e = eps.view(-1, 1, 1, 1) if isinstance(eps, torch.Tensor) else torch.tensor(eps, device=x.device)
    a = alpha if alpha is not None else 2.5 * e / steps
    adv = x.clone()
    for _ in range(steps):
        adv = adv + a * _grad_sign(net, adv, cls, targeted)
        adv = torch.max(torch.min(adv, x + e), x - e).clamp(0, 1).detach()
    return adv


def _flipped(pred: torch.Tensor, orig: int, target: int | None) -> torch.Tensor:
    return pred == target if target is not None else pred != orig


@torch.no_grad()
def _predict(net: torch.nn.Module, x: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [torch.softmax(net(x[i:i + chunk]).float(), 1) for i in range(0, len(x), chunk)]
    p = torch.cat(outs)
    return p.argmax(1), p


def min_flip_eps(net: torch.nn.Module, x: torch.Tensor, cfg: AdvConfig = AdvConfig(), target: int | None = None
                 ) -> dict[str, Any]:
    """Smallest L∞ perturbation (on the grid, FGSM refined by bisection) that flips ``x (1,3,H,W)``.

    Returns ``{orig_pred, orig_prob, eps (nan if none up to eps_max), flipped, adv_pred, adv_prob, linf, l2,
    adv (1,3,H,W) tensor or None}``.
    """
    if cfg.method not in ("fgsm", "pgd"):
        raise UsageError(f"method must be fgsm or pgd, got {cfg.method!r}")
    pred, prob = _predict(net, x)
    orig = int(pred[0])
    cls_val = target if target is not None else orig
    grid = eps_grid(cfg.eps_min, cfg.eps_max, cfg.grid)
    g = len(grid)
    xs = x.expand(g, -1, -1, -1)
    cls = torch.full((g,), cls_val, dtype=torch.long, device=x.device)
    eps_t = torch.tensor(grid, device=x.device, dtype=x.dtype)
    targeted = target is not None
    if cfg.method == "fgsm":
        sign = _grad_sign(net, x, cls[:1], targeted)
        advs = (xs + eps_t.view(-1, 1, 1, 1) * sign).clamp(0, 1)
    else:
        advs = pgd(net, xs, eps_t, cls, targeted, cfg.steps)
    apred, aprob = _predict(net, advs)
    hit = _flipped(apred, orig, target).nonzero()
    out: dict[str, Any] = {"orig_pred": orig, "orig_prob": float(prob[0, orig]), "eps": math.nan, "flipped": False,
                           "adv_pred": None, "adv_prob": math.nan, "linf": math.nan, "l2": math.nan, "adv": None}
    if not len(hit):
        return out
    j = int(hit[0])
    best, best_adv = grid[j], advs[j:j + 1]
    if cfg.method == "fgsm" and cfg.refine > 0:
        lo = grid[j - 1] if j > 0 else 0.0
        hi = grid[j]
        for _ in range(cfg.refine):
            mid = 0.5 * (lo + hi)
            cand = (x + mid * sign).clamp(0, 1)
            if bool(_flipped(_predict(net, cand)[0], orig, target)[0]):
                hi, best, best_adv = mid, mid, cand
            else:
                lo = mid
    p2, pr2 = _predict(net, best_adv)
    d = (best_adv - x).flatten()
    out.update({"eps": float(best), "flipped": True, "adv_pred": int(p2[0]), "adv_prob": float(pr2[0, int(p2[0])]),
                "linf": float(d.abs().max()), "l2": float(d.norm()), "adv": best_adv.detach()})
    return out


def _example_panel(x: torch.Tensor, adv: torch.Tensor, caption_a: str, caption_b: str, eps: float) -> np.ndarray:
    delta = (adv - x)[0]
    scale = 0.5 / max(float(delta.abs().max()), 1e-12)
    return tile_grid([label_strip(to_uint8(x[0]), caption_a), label_strip(to_uint8(0.5 + scale * delta), f"delta eps={eps * 255:.2f}/255"),
                      label_strip(to_uint8(adv[0]), caption_b)], 3)


def run_adversarial(store: str | Path, features_id: str | None = None, images: Sequence[str] | None = None,
                    n_images: int = 16, cfg: AdvConfig = AdvConfig(), n_examples: int = 4, model: str | None = None,
                    weights: str | None = None, device: str = "auto", source: Source | None = None,
                    force: bool = False) -> dict[str, Any]:
    """Robustness audit over images of a feature artefact (or image files with ``model``).

    Files: ``adversarial.parquet`` (one row per image: image_id, path, label, method, target, orig_pred,
    orig_class, orig_prob, flipped, eps, eps_255, adv_pred, adv_class, adv_prob, linf, l2) and
    ``adv-<k>.png`` for the first ``n_examples`` flipped images (original | amplified perturbation | adversarial).
    """
    src = source or open_source(store, features_id, model, weights)
    cats = src.categories
    mod = src.lm.module
    n_cls = [m for m in mod.modules() if isinstance(m, torch.nn.Linear)]
    if not n_cls:
        raise UsageError("adversarial attacks need a classifier (a final nn.Linear)")
    target = resolve_class(cfg.target, cats, n_cls[-1].out_features)[0] if cfg.target is not None else None
    if src.features_dir is not None:
        rows = select_rows(src.meta(), n_images, images)
        files_in, ids, paths = [src.image_file(p) for p in rows["path"]], list(rows["image_id"]), list(rows["path"])
        labels = list(rows["label"])
    else:
        if not images:
            raise UsageError("pass image files with --image when no feature artefact is used")
        files_in, ids, paths, labels = [Path(p) for p in images], [None] * len(images), [str(p) for p in images], [None] * len(images)
    params = {**asdict(cfg), "target": target, "images": paths, "n_examples": n_examples}

    def name_of(i: int | None) -> str | None:
        return None if i is None else (cats[i] if cats and i < len(cats) else str(i))

    def build(adir: Path):
        dev = pick_device(device)
        net = src.wrapped(dev)
        x = load_images(files_in, src.preprocess)
        recs, files, pngs = [], [], []
        for k in range(len(x)):
            xk = x[k:k + 1].to(dev)
            r = min_flip_eps(net, xk, cfg, target)
            adv = r.pop("adv")
            recs.append({"image_id": ids[k], "path": paths[k], "label": labels[k], "method": cfg.method, "target": target,
                         "orig_pred": r["orig_pred"], "orig_class": name_of(r["orig_pred"]), "orig_prob": r["orig_prob"],
                         "flipped": r["flipped"], "eps": r["eps"], "eps_255": r["eps"] * 255, "adv_pred": r["adv_pred"],
                         "adv_class": name_of(r["adv_pred"]), "adv_prob": r["adv_prob"], "linf": r["linf"], "l2": r["l2"]})
            if adv is not None and len(pngs) < n_examples:
                name = f"adv-{len(pngs):02d}.png"
                panel = _example_panel(xk.cpu(), adv.cpu(), f"{name_of(r['orig_pred'])} {r['orig_prob']:.2f}",
                                       f"{name_of(r['adv_pred'])} {r['adv_prob']:.2f}", r["eps"])
                files.append(write_png(adir, name, panel, image_id=ids[k], path=paths[k]))
                pngs.append(name)
        df = pd.DataFrame(recs)
        files.append(write_table(adir, "adversarial.parquet", df))
        flipped = df[df["flipped"]]
        summary = {"images": len(df), "flipped": int(len(flipped)), "flip_rate": float(len(flipped) / max(1, len(df))),
                   "median_eps_255": float(flipped["eps_255"].median()) if len(flipped) else None,
                   "examples": pngs, "target": target, "target_class": name_of(target)}
        return files, summary

    return publish(store, "adversarial", src.readable, {**src.key, "params": params}, build, force)
