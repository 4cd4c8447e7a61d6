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

from tasks.attribution import saliency
from tasks.attribution.cam import grad_cam
from tasks.attribution.occlusion import occlusion

__all__ = ["MethodSpec", "METHODS", "ALIASES", "method_spec", "params_hash"]

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
        raise ValueError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]


def params_hash(method: str, params: dict[str, Any]) -> str:
    """Short content hash of a method's parameters (part of the incremental key)."""
    return hashlib.sha256(json.dumps({"method": method, **params}, sort_keys=True, default=str).encode()).hexdigest()[:12]
