"""Grad-CAM (Selvaraju et al. 2017): ``relu(sum_k mean_ij(dS_c/dA_k) * A_k)`` at a chosen layer, upsampled.

Same map as pytorch-grad-cam's ``GradCAM`` (channel weights = spatial mean of the gradient, ReLU, per-map
min-max to [0, 1], bilinear resize to the input size as ``cv2.resize(INTER_LINEAR)`` does, min-max again).
Difference by design: the activation and gradient are those of the layer's *own* output even when the next
module is an in-place ReLU (pytorch-grad-cam's hook then reads the post-ReLU activation but the pre-ReLU
gradient; here the hook hands a copy downstream, see :func:`tasks.core.hooks.capture_for_grad`).

Memory: O(batch_size x one forward/backward); no activation is kept after a batch (no growth across images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import UsageError
from tasks.attribution.common import check_inputs, normalise_maps, target_scores
from tasks.core.hooks import capture_for_grad, get_module

__all__ = ["grad_cam", "default_cam_layer"]


def default_cam_layer(model: nn.Module) -> str:
    """Name of the last ``nn.Conv2d`` in ``named_modules()`` order (the usual Grad-CAM choice)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = name
    if last is None:
        raise UsageError("the model has no Conv2d layer; pass layer= a module name whose output is (N, C, h, w)")
    return last


def grad_cam(model: nn.Module, inputs: torch.Tensor, target, layer: str | None = None, normalise: bool = True,
             batch_size: int | None = 64) -> torch.Tensor:
    """Grad-CAM maps ``(N, H, W) float32`` at the input's resolution.

    ``layer``: a module name from ``named_modules()`` (default: the last Conv2d). ``normalise=True`` gives
    pytorch-grad-cam's [0, 1] map; ``False`` the raw ReLU'd, bilinearly upsampled map.
    """
    inputs, target = check_inputs(inputs, target)
    layer = layer or default_cam_layer(model)
    try:
        get_module(model, layer)
    except KeyError:
        raise UsageError(f"unknown layer {layer!r} for Grad-CAM; use a name from model.named_modules()") from None
    n, _, h, w = inputs.shape
    bs = n if not batch_size or batch_size >= n else int(batch_size)
    out = torch.empty((n, h, w), dtype=torch.float32, device=inputs.device)
    with capture_for_grad(model, layer) as store, torch.enable_grad():
        for i in range(0, n, bs):
            x = inputs[i:i + bs].detach().clone().requires_grad_(True)  # works with frozen parameters too
            score = target_scores(model, x, target[i:i + bs])
            act = store.pop("output")
            if act.dim() != 4:
                raise UsageError(f"layer {layer!r} outputs shape {tuple(act.shape)}; Grad-CAM needs (N, C, h, w)")
            (grad,) = torch.autograd.grad(score.sum(), act)
            cam = (grad.mean(dim=(2, 3), keepdim=True) * act.detach()).sum(dim=1).clamp(min=0).float()
            del act, grad, score
            if normalise:
                cam = normalise_maps(cam)
            cam = F.interpolate(cam.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
            out[i:i + bs] = normalise_maps(cam) if normalise else cam
    return out
