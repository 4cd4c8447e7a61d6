"""Faithfulness of an attribution map: deletion and insertion curves and their AUC (Petsiuk et al., RISE 2018).

Deletion: remove the most important pixels first (replace them by ``baseline``) and record the target
class probability after each step; a faithful map makes it fall fast (low AUC). Insertion: start from a
blurred copy and put the most important original pixels back first; a faithful map makes it rise fast
(high AUC). Curves have ``n_steps + 1`` points at pixel fractions ``0, 1/n_steps, ..., 1``; AUC is the
trapezoid area over fraction in [0, 1]. Ties in the map are broken by pixel index (deterministic).

Memory: O(batch_size x one forward pass); curves are ``(N, n_steps + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import UsageError
from tasks.attribution.common import check_inputs

__all__ = ["FaithfulnessResult", "deletion_insertion", "auc", "blur"]


@dataclass
class FaithfulnessResult:
    """``deletion`` / ``insertion``: ``(N, n_steps+1)`` target scores; ``*_auc``: ``(N,)`` in score units."""

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of ``(N, K)`` curves sampled evenly on [0, 1] -> ``(N,)``."""
    k = curve.shape[-1]
    if k < 2:
        raise UsageError("a curve needs at least two points")
    return ((curve[..., 1:] + curve[..., :-1]) * 0.5).sum(-1) / (k - 1)


def blur(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur of ``(N,C,H,W)`` (reflect padding); the insertion curve's starting image."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad_h = min(radius, x.shape[2] - 1)
    pad_w = min(radius, x.shape[3] - 1)
    y = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x
    y = F.conv2d(y, k[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else y
    return F.conv2d(y, k[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)


def _scores(model: nn.Module, x: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if score == "prob":
        out = torch.softmax(out.float(), dim=1)
    return out.gather(1, target.view(-1, 1)).squeeze(1).float()


def deletion_insertion(model: nn.Module, inputs: torch.Tensor, target, maps: torch.Tensor, n_steps: int = 16,
                       baseline: float | torch.Tensor = 0.0, blur_sigma: float = 5.0, score: str = "prob",
                       batch_size: int = 64) -> FaithfulnessResult:
    """Deletion and insertion curves for ``maps (N,H,W)`` (higher = more important) on ``inputs (N,C,H,W)``.

    ``baseline``: what deleted pixels become (0.0 = the dataset mean in normalised space); ``score``:
    ``prob`` (softmax probability of the target, the RISE convention) or ``logit``.
    """
    inputs, target = check_inputs(inputs, target)
    n, c, h, w = inputs.shape
    if maps.shape != (n, h, w):
        raise UsageError(f"maps must be (N, H, W) = {(n, h, w)}, got {tuple(maps.shape)}")
    if n_steps < 1:
        raise UsageError(f"n_steps must be >= 1, got {n_steps}")
    if score not in ("prob", "logit"):
        raise UsageError(f"score must be 'prob' or 'logit', got {score!r}")
    x = inputs.detach()
    hw = h * w
    order = torch.argsort(-maps.reshape(n, hw).float(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=order.device).expand(n, hw))
    counts = torch.tensor([round(k * hw / n_steps) for k in range(n_steps + 1)], device=x.device)
    bl = torch.broadcast_to(torch.as_tensor(baseline, dtype=x.dtype, device=x.device), x.shape) \
        if not isinstance(baseline, torch.Tensor) or baseline.dim() < 4 else baseline.to(x)
    blurred = blur(x, blur_sigma)
    jobs = [(i, k) for i in range(n) for k in range(n_steps + 1)]
    dele = torch.empty((n, n_steps + 1), dtype=torch.float32, device=x.device)
    ins = torch.empty_like(dele)
    with torch.no_grad():
        for s in range(0, len(jobs), max(1, batch_size // 2)):
            chunk = jobs[s:s + max(1, batch_size // 2)]
            ii = torch.tensor([i for i, _ in chunk], device=x.device)
            kk = torch.tensor([k for _, k in chunk], device=x.device)
            mask = (rank[ii] < counts[kk].view(-1, 1)).view(-1, 1, h, w).to(x.dtype)
            xd = x[ii] * (1 - mask) + bl[ii] * mask
            xi = blurred[ii] * (1 - mask) + x[ii] * mask
            sc = _scores(model, torch.cat([xd, xi]), torch.cat([target[ii], target[ii]]), score)
            dele[ii, kk] = sc[: len(chunk)]
            ins[ii, kk] = sc[len(chunk):]
    fr = counts.float() / hw
    return FaithfulnessResult(fr, dele, ins, auc(dele), auc(ins))
