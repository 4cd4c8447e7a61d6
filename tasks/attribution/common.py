"""Shared pieces of the attribution methods: input checks, target scores, channel reduction, the registry.

Every method takes ``(model, inputs (N,3,H,W) float32, target (N,) long, ...)`` and returns attributions of
the input's shape (Grad-CAM returns ``(N, H, W)``). ``reduce_map`` turns a channel attribution into the 2-D
map that is stored, drawn and scored. Methods live one per file (occlusion, saliency, cam); this module only
holds what they share, so it imports none of them at import time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "check_inputs",
    "target_scores",
    "reduce_map",
    "normalise_maps",
    "MethodSpec",
    "METHODS",
    "method_spec",
    "params_hash",
    "model_device",
]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_inputs(inputs: torch.Tensor, target: torch.Tensor | int | list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``inputs`` ``(N,C,H,W)`` float and ``target`` (int, list or ``(N,)`` long); return both as tensors.

    Raises ``ValueError`` saying what was wrong.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ValueError(f"inputs must be a (N, C, H, W) tensor, got {type(inputs).__name__} "
                         f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else ''}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point (normalised images), got {inputs.dtype}")
    n = inputs.shape[0]
    if target is None:
        raise ValueError("target is required: one class index per image (e.g. the predicted class)")
    t = torch.as_tensor(target, dtype=torch.long, device=inputs.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"target must have one entry per image ({n}), got shape {tuple(t.shape)}")
    return inputs, t.contiguous()


def target_scores(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``model(x)[i, target[i]]`` as ``(N,)``: the logit (score) each attribution explains."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() != 2:
        raise ValueError(f"the model must return (N, classes) scores, got shape {tuple(out.shape)}")
    if int(target.max()) >= out.shape[1] or int(target.min()) < 0:
        raise ValueError(f"target index out of range for a model with {out.shape[1]} outputs")
    return out.gather(1, target.view(-1, 1)).squeeze(1)


def reduce_map(attr: torch.Tensor, how: str) -> torch.Tensor:
    """``(N,C,H,W)`` -> ``(N,H,W)`` float32. ``how``: ``absmax`` (Simonyan: max |a| over channels),
    ``sum`` (signed sum, for occlusion / IG), ``abssum``, ``mean``, ``none`` (already ``(N,H,W)``)."""
    if how == "none" or attr.dim() == 3:
        return attr.float()
    if how == "absmax":
        return attr.abs().amax(dim=1).float()
    if how == "sum":
        return attr.sum(dim=1).float()
    if how == "abssum":
        return attr.abs().sum(dim=1).float()
    if how == "mean":
        return attr.mean(dim=1).float()
    raise ValueError(f"unknown channel reduction {how!r}; use absmax, sum, abssum or mean")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to ``[0, 1]`` (``(N,H,W)``), as pytorch-grad-cam's ``scale_cam_image`` (+1e-7)."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    flat = flat - lo
    return (flat / (1e-7 + flat.amax(dim=1, keepdim=True))).view_as(maps)


@dataclass(frozen=True)
class MethodSpec:
    """An audit method: how to call it with default parameters and how to reduce its output to 2-D."""

    name: str
    reduce: str
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_layer: bool = False

    def function(self) -> Callable[..., torch.Tensor]:
        if self.name == "occlusion":
            from tasks.attribution.occlusion import occlusion

            return occlusion
        if self.name == "gradcam":
            from tasks.attribution.cam import grad_cam

            return grad_cam
        from tasks.attribution import saliency

        return {"saliency": saliency.vanilla_gradient, "guided": saliency.guided_backprop,
                "deconvnet": saliency.deconvnet, "smoothgrad": saliency.smoothgrad,
                "ig": saliency.integrated_gradients}[self.name]


METHODS: dict[str, MethodSpec] = {
    "occlusion": MethodSpec("occlusion", "mean", {"window": 16, "stride": 8, "baseline": 0.0}),
    "saliency": MethodSpec("saliency", "absmax", {}),
    "guided": MethodSpec("guided", "absmax", {}),
    "deconvnet": MethodSpec("deconvnet", "absmax", {}),
    "smoothgrad": MethodSpec("smoothgrad", "absmax", {"nt_samples": 5, "stdevs": 1.0, "seed": 0}),
    "ig": MethodSpec("ig", "sum", {"n_steps": 50, "method": "gausslegendre"}),
    "gradcam": MethodSpec("gradcam", "none", {"layer": None}, needs_layer=True),
}
ALIASES = {"integrated_gradients": "ig", "integrated-gradients": "ig", "grad-cam": "gradcam", "grad_cam": "gradcam",
           "guided_backprop": "guided", "guided-backprop": "guided", "deconv": "deconvnet", "gradient": "saliency",
           "vanilla": "saliency"}


def method_spec(name: str) -> MethodSpec:
    """Look up a method by name or alias; ``ValueError`` lists the valid names."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]


def params_hash(method: str, params: dict[str, Any]) -> str:
    """Short content hash of a method's parameters (part of the incremental key)."""
    return hashlib.sha256(json.dumps({"method": method, **params}, sort_keys=True, default=str).encode()).hexdigest()[:12]
