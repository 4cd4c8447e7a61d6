"""The attribution method registry: the only module that imports every method.

Each method lives in its own file (occlusion, saliency, cam); :data:`METHODS` names them with their default
parameters and how their output is reduced to the stored 2-D map. The audit looks methods up here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from storage.errors import UsageError
from tasks.attribution import saliency
from tasks.attribution.cam import grad_cam
from tasks.attribution.common import reduce_map
from tasks.attribution.occlusion import occlusion, plan_incremental

__all__ = ["MethodSpec", "METHODS", "ALIASES", "method_spec", "params_hash", "compute_map"]

_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "occlusion": occlusion,
    "gradcam": grad_cam,
    "saliency": saliency.vanilla_gradient,
    "guided": saliency.guided_backprop,
    "deconvnet": saliency.deconvnet,
    "smoothgrad": saliency.smoothgrad,
    "ig": saliency.integrated_gradients,
}


@dataclass(frozen=True)
class MethodSpec:
    """An audit method: how to call it with default parameters and how to reduce its output to 2-D."""

    name: str
    reduce: str
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_layer: bool = False

    def function(self) -> Callable[..., torch.Tensor]:
        return _FUNCTIONS[self.name]


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
        raise UsageError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]


def params_hash(method: str, params: dict[str, Any]) -> str:
    """Short content hash of a method's parameters (part of the incremental key)."""
    return hashlib.sha256(json.dumps({"method": method, **params}, sort_keys=True, default=str).encode()).hexdigest()[:12]


def compute_map(name: str, model, x: torch.Tensor, t: torch.Tensor, cfg: Any, cam_layer: str,
             occ_plan_cache: dict) -> torch.Tensor:
    """One method on a batch -> 2-D maps ``(n, H, W)`` float32 (higher = more important). ``cfg`` carries the
    audit's method parameters (an ``AuditConfig``); ``occ_plan_cache`` keeps occlusion's incremental plan per
    input shape across batches."""
    spec = method_spec(name)
    if spec.name == "occlusion":
        key = tuple(x.shape[1:])
        if key not in occ_plan_cache:
            occ_plan_cache[key] = plan_incremental(model, key, cfg.window, cfg.stride, x.device)
        a = occlusion(model, x, t, cfg.window, cfg.stride, cfg.baseline, cfg.batch_size,
                      incremental=occ_plan_cache[key] is not None, plan=occ_plan_cache[key])
    elif spec.name == "saliency":
        a = saliency.vanilla_gradient(model, x, t, batch_size=cfg.batch_size)
    elif spec.name == "guided":
        a = saliency.guided_backprop(model, x, t, batch_size=cfg.batch_size)
    elif spec.name == "deconvnet":
        a = saliency.deconvnet(model, x, t, batch_size=cfg.batch_size)
    elif spec.name == "smoothgrad":
        a = saliency.smoothgrad(model, x, t, cfg.smooth_samples, cfg.smooth_stdev, seed=cfg.seed, batch_size=cfg.batch_size)
    elif spec.name == "ig":
        a = saliency.integrated_gradients(model, x, t, n_steps=cfg.ig_steps, batch_size=cfg.batch_size)
    else:
        a = grad_cam(model, x, t, cam_layer, batch_size=cfg.batch_size)
    return reduce_map(a, spec.reduce)
