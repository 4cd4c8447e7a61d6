"""Gradient attributions: vanilla gradient (Simonyan), guided backprop, deconvnet, SmoothGrad, Integrated Gradients.

Each takes ``(model, inputs (N,3,H,W) float32, target (N,) long)`` and returns ``(N,3,H,W) float32`` equal to
its Captum counterpart with Captum's defaults (``Saliency(abs=True)``, ``GuidedBackprop``,
``Deconvolution``, ``NoiseTunnel(Saliency)`` smoothgrad with 5 samples / stdev 1.0, ``IntegratedGradients``
with zero baseline, 50 steps, Gauss-Legendre). ``channel_max`` gives Simonyan's ``max_c |dS/dx|`` map.
The model must be in eval mode; its parameter gradients are never touched.

Memory: O(batch_size x one forward/backward); SmoothGrad and IG run their N x samples copies in chunks of
``batch_size`` rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from storage.errors import UsageError
from tasks.attribution.backprop import input_gradients
from tasks.attribution.common import check_inputs

__all__ = [
    "vanilla_gradient",
    "guided_backprop",
    "deconvnet",
    "smoothgrad",
    "integrated_gradients",
    "channel_max",
    "ig_alphas",
]


def channel_max(attr: torch.Tensor) -> torch.Tensor:
    """Simonyan's saliency map: ``max_c |attr|``, ``(N,C,H,W) -> (N,H,W)``."""
    return attr.abs().amax(dim=1)


def vanilla_gradient(model: nn.Module, inputs: torch.Tensor, target, abs: bool = True,  # noqa: A002 (Captum's name)
                     batch_size: int | None = 64, reduce: str | None = None) -> torch.Tensor:
    """``|d S_c / d x|`` (``abs=True``, Captum ``Saliency`` default) or the signed gradient.

    ``reduce='max'`` returns Simonyan's ``(N,H,W)`` map ``max_c |d S_c / d x|`` instead.
    """
    g = input_gradients(model, inputs, target, "plain", batch_size)
    g = g.abs() if abs else g
    if reduce == "max":
        return channel_max(g)
    if reduce is not None:
        raise UsageError(f"reduce must be None or 'max', got {reduce!r}")
    return g


def guided_backprop(model: nn.Module, inputs: torch.Tensor, target, batch_size: int | None = 64) -> torch.Tensor:
    """Guided backprop (signed), as Captum ``GuidedBackprop``: ReLU backward = ``relu(grad) * (x > 0)``."""
    return input_gradients(model, inputs, target, "guided", batch_size)


def deconvnet(model: nn.Module, inputs: torch.Tensor, target, batch_size: int | None = 64) -> torch.Tensor:
    """Zeiler & Fergus deconvnet (signed), as Captum ``Deconvolution``: ReLU backward = ``relu(grad)``."""
    return input_gradients(model, inputs, target, "deconvnet", batch_size)


def smoothgrad(model: nn.Module, inputs: torch.Tensor, target, nt_samples: int = 5, stdevs: float = 1.0,
               abs: bool = True, seed: int | None = None, generator: torch.Generator | None = None,  # noqa: A002
               batch_size: int | None = 64) -> torch.Tensor:
    """SmoothGrad: mean over ``nt_samples`` noisy copies ``x + N(0, stdevs^2)`` of the (absolute) gradient.

    The noise is drawn exactly as Captum's ``NoiseTunnel`` draws it (one ``torch.normal`` call over the
    ``(N * nt_samples, C, H, W)`` block, copies ordered image-major), so with the same RNG state the result
    equals ``NoiseTunnel(Saliency(model)).attribute(inputs, nt_type='smoothgrad', ...)``. ``seed`` seeds a
    private generator (reproducible, leaves the global RNG alone); with neither ``seed`` nor ``generator``
    the global RNG is used, as Captum does.
    """
    inputs, target = check_inputs(inputs, target)
    if nt_samples < 1:
        raise UsageError(f"nt_samples must be >= 1, got {nt_samples}")
    n = inputs.shape[0]
    size = (n * nt_samples,) + tuple(inputs.shape[1:])
    std = torch.tensor(float(stdevs), device=inputs.device).repeat(size)
    if generator is None and seed is not None:
        generator = torch.Generator(device=inputs.device).manual_seed(int(seed))
    noise = torch.normal(0, std, generator=generator) if generator is not None else torch.normal(0, std)
    del std
    noisy = inputs.detach().repeat_interleave(nt_samples, dim=0).add_(noise)
    del noise
    g = input_gradients(model, noisy, target.repeat_interleave(nt_samples), "plain", batch_size)
    if abs:
        g = g.abs()
    return g.view(n, nt_samples, *inputs.shape[1:]).sum(dim=1) * (1 / nt_samples)


def ig_alphas(n_steps: int, method: str = "gausslegendre") -> tuple[list[float], list[float]]:
    """``(step_sizes, alphas)`` of Captum's approximation methods (``gausslegendre`` or ``riemann_*``)."""
    if n_steps < 1:
        raise UsageError(f"n_steps must be >= 1, got {n_steps}")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return list(0.5 * w), list(0.5 * (x + 1))
    if method in ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        if n_steps < 2:
            raise UsageError(f"{method} needs n_steps >= 2")
        steps = [1 / n_steps] * n_steps  # Captum's convention, also for the trapezoid (ends halved)
        if method == "riemann_trapezoid":
            steps[0] /= 2
            steps[-1] /= 2
            return steps, torch.linspace(0, 1, n_steps).tolist()
        lo, hi = {"riemann_left": (0, 1 - 1 / n_steps), "riemann_right": (1 / n_steps, 1),
                  "riemann_middle": (1 / (2 * n_steps), 1 - 1 / (2 * n_steps))}[method]
        return steps, torch.linspace(lo, hi, n_steps).tolist()
    raise UsageError(f"unknown IG method {method!r}; use gausslegendre or riemann_left/right/middle/trapezoid")


def integrated_gradients(model: nn.Module, inputs: torch.Tensor, target, baselines: float | torch.Tensor = 0.0,
                         n_steps: int = 50, method: str = "gausslegendre", batch_size: int | None = 64) -> torch.Tensor:
    """Integrated Gradients: ``(x - x') * sum_i w_i * dS/dx(x' + a_i (x - x'))`` (Sundararajan et al. 2017).

    Same quadrature and defaults as Captum ``IntegratedGradients`` (zero baseline, 50 Gauss-Legendre steps).
    ``baselines``: scalar or a tensor broadcastable to ``inputs``. The ``N x n_steps`` scaled copies are
    evaluated ``batch_size`` at a time.
    """
    inputs, target = check_inputs(inputs, target)
    steps, alphas = ig_alphas(n_steps, method)
    base = torch.as_tensor(baselines, dtype=inputs.dtype, device=inputs.device)
    base = base.expand_as(inputs) if base.dim() == 0 else torch.broadcast_to(base, inputs.shape)
    n = inputs.shape[0]
    delta = inputs.detach() - base
    w = torch.tensor(steps, dtype=torch.float32, device=inputs.device)
    total = torch.zeros_like(inputs, dtype=torch.float32)
    per = max(1, (batch_size or n * n_steps) // max(n, 1))  # alphas per chunk (all images in every chunk)
    for a0 in range(0, n_steps, per):
        al = torch.tensor(alphas[a0:a0 + per], dtype=inputs.dtype, device=inputs.device)
        k = al.shape[0]
        x = (base.unsqueeze(0) + al.view(k, 1, 1, 1, 1) * delta.unsqueeze(0)).reshape(k * n, *inputs.shape[1:])
        g = input_gradients(model, x, target.repeat(k), "plain", None).view(k, n, *inputs.shape[1:])
        total += (g * w[a0:a0 + k].view(k, 1, 1, 1, 1)).sum(dim=0)
    return total * delta
