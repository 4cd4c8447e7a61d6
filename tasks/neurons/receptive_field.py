"""Receptive fields from the layer arithmetic.

A receptive field (RF) of a layer is described per axis by ``size`` (input pixels one unit sees),
``stride`` (input pixels between neighbouring units) and ``offset`` (input coordinate of the first pixel
seen by unit 0; negative where padding is involved). Unit ``i`` sees input pixels
``[offset + i*stride, offset + i*stride + size - 1]``.

Analytic method (``method="analytic-fx"``): trace the model with ``torch.fx`` and walk the graph from the
input to the layer, composing ``(kernel, stride, padding, dilation)`` of every ``Conv2d`` / ``MaxPool2d`` /
``AvgPool2d``; point-wise modules pass the RF through, a residual ``add`` / ``cat`` takes the union of its
inputs' RFs. Containers (ResNet blocks, MobileNet inverted residuals) are traced recursively, so any
torchvision CNN works. When the graph holds an op this walk does not know, the empirical method is used:
``method="empirical-gradient"`` backpropagates from one output unit and measures the extent of non-zero input
gradient (and the shift between two neighbouring units for the stride). The method used is always reported.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from storage.errors import UsageError

__all__ = ["ReceptiveField", "receptive_field", "analytic_receptive_field", "empirical_receptive_field", "unit_box"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceptiveField:
    """RF of a layer's units. Tuples are ``(y, x)``; ``size`` is ``None`` for a global layer (sees everything)."""

    size: tuple[int, int] | None
    stride: tuple[int, int]
    offset: tuple[int, int]
    method: str
    layer: str

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input-pixel box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) of unit ``(y, x)``, clipped to the image."""
        return unit_box(self, y, x, height, width)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["stride"], d["offset"] = list(self.stride), list(self.offset)
        return d


def unit_box(rf: ReceptiveField, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
    if rf.size is None:
        return 0, 0, width, height
    y0 = rf.offset[0] + y * rf.stride[0]
    x0 = rf.offset[1] + x * rf.stride[1]
    y1, x1 = y0 + rf.size[0], x0 + rf.size[1]
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


# A per-axis transform: (size, stride, offset); None = global.
_T = tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None
_ID: _T = ((1, 1), (1, 1), (0, 0))


class _Unsupported(Exception):
    pass


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _compose(inner: _T, outer: _T) -> _T:
    """RF of ``outer`` applied after ``inner`` (both relative to their own inputs)."""
    if inner is None or outer is None:
        return None
    (k1, s1, o1), (k2, s2, o2) = inner, outer
    size = tuple((k2[a] - 1) * s1[a] + k1[a] for a in range(2))
    stride = tuple(s1[a] * s2[a] for a in range(2))
    offset = tuple(o1[a] + o2[a] * s1[a] for a in range(2))
    return size, stride, offset  # type: ignore[return-value]


def _union(ts: list[_T]) -> _T:
    if any(t is None for t in ts):
        return None
    strides = {t[1] for t in ts}
    if len(strides) != 1:
        raise _Unsupported(f"merging branches with different strides {sorted(strides)}")
    off = tuple(min(t[2][a] for t in ts) for a in range(2))
    end = tuple(max(t[2][a] + t[0][a] for t in ts) for a in range(2))
    return tuple(end[a] - off[a] for a in range(2)), ts[0][1], off  # type: ignore[return-value]


def _kernel_transform(k, s, p, d=1) -> _T:
    k, s, p, d = _pair(k), _pair(s), _pair(p), _pair(d)
    return tuple(d[a] * (k[a] - 1) + 1 for a in range(2)), s, tuple(-p[a] for a in range(2))  # type: ignore[return-value]


_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Dropout2d, nn.Identity, nn.GroupNorm, nn.LocalResponseNorm,
    nn.InstanceNorm2d,
)
_GLOBAL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
# Per-position modules named by class (torchvision internals: ConvNeXt's Permute / LayerNorm2d, StochasticDepth).
_POINTWISE_NAMES = {"StochasticDepth", "Permute", "LayerNorm2d", "LayerNorm", "Linear", "Conv2dNormActivation"}
_GATING_FUNCS = {operator.mul, operator.imul, torch.mul}
_POINTWISE_FUNCS = {
    operator.add, operator.mul, operator.iadd, operator.imul, operator.sub, operator.truediv, torch.add, torch.mul,
    torch.cat, torch.relu, F.relu, F.relu6, F.hardswish, F.hardsigmoid, torch.sigmoid, F.silu, F.gelu, F.dropout,
    torch.sub, F.batch_norm, torch.clamp,
}
_POINTWISE_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid", "clamp", "contiguous", "clone", "sub"}
_GLOBAL_FUNCS = {torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear, torch.mean}
_GLOBAL_METHODS = {"view", "reshape", "flatten", "mean", "squeeze"}


def _module_transform(module: nn.Module, name: str, stop_at: str | None, found: dict[str, _T]) -> _T:
    """Transform of ``module`` (input -> output). Records in ``found`` the RF (relative to this module's
    input) at the output of the sub-module named ``stop_at`` (a dotted name relative to ``module``)."""
    if isinstance(module, nn.Conv2d):
        return _kernel_transform(module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _kernel_transform(module.kernel_size, module.stride or module.kernel_size, module.padding,
                                 getattr(module, "dilation", 1))
    if isinstance(module, _POINTWISE_MODULES) or (type(module).__name__ in _POINTWISE_NAMES and not list(module.children())):
        return _ID
    if isinstance(module, _GLOBAL_MODULES):
        return None
    if isinstance(module, nn.Sequential):
        t = _ID
        for child_name, child in module.named_children():
            sub_stop = _child_stop(stop_at, child_name)
            sub_found: dict[str, _T] = {}
            ct = _module_transform(child, child_name, sub_stop, sub_found)
            if stop_at == child_name:
                found["rf"] = _compose(t, ct)
            elif "rf" in sub_found:
                found["rf"] = _compose(t, sub_found["rf"])
            t = _compose(t, ct)
        return t
    if not list(module.children()):
        raise _Unsupported(f"leaf module {type(module).__name__} ({name})")
    try:
        graph = _ShallowTracer().trace(module)
    except Exception as exc:  # fx raises many types for untraceable code
        raise _Unsupported(f"cannot fx-trace {type(module).__name__}: {str(exc)[:120]}") from None
    return _graph_transform(module, graph, stop_at, found)


class _ShallowTracer(fx.Tracer):
    """Keeps a module's direct children as single ``call_module`` nodes (they are walked recursively)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return "." not in qualname or super().is_leaf_module(m, qualname)


def _child_stop(stop_at: str | None, child: str) -> str | None:
    if stop_at and stop_at.startswith(child + "."):
        return stop_at[len(child) + 1:]
    return None


def _graph_transform(root: nn.Module, graph: fx.Graph, stop_at: str | None, found: dict[str, _T]) -> _T:
    env: dict[fx.Node, _T] = {}
    have: set[fx.Node] = set()
    mods = dict(root.named_modules())
    consumed_children: set[str] = set()
    out: _T = _ID

    def inputs(node: fx.Node) -> list[_T]:
        res = []
        for a in node.all_input_nodes:
            if a in have:
                res.append(env[a])
        return res

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = _ID
            have.add(node)
            continue
        if node.op == "get_attr":
            continue
        if node.op == "output":
            ins = inputs(node)
            out = _union(ins) if ins else _ID
            continue
        ins = inputs(node)
        if not ins:
            continue  # constants / shapes
        if node.op in ("call_function", "call_method") and (node.target in _GATING_FUNCS or node.target in ("mul", "mul_")):
            # squeeze-excitation: a globally pooled gate multiplies a local map; the gate is ignored
            ins = [t for t in ins if t is not None] or ins
        src = _union(ins)
        if node.op == "call_module":
            target = str(node.target)
            sub = mods[target]
            sub_found: dict[str, _T] = {}
            t = _module_transform(sub, target, _child_stop(stop_at, target), sub_found)
            env[node] = _compose(src, t)
            if stop_at == target:
                found["rf"] = env[node]
            elif "rf" in sub_found:
                found["rf"] = _compose(src, sub_found["rf"])
            consumed_children.add(target.split(".")[0])
        elif node.op == "call_function":
            fn = node.target
            if fn in _POINTWISE_FUNCS:
                env[node] = src
            elif fn in _GLOBAL_FUNCS:
                env[node] = None
            elif fn in (F.max_pool2d, F.avg_pool2d):
                kw = dict(node.kwargs)
                args = list(node.args[1:])
                k = kw.get("kernel_size", args[0] if args else None)
                s = kw.get("stride", args[1] if len(args) > 1 else None) or k
                p = kw.get("padding", args[2] if len(args) > 2 else 0)
                env[node] = _compose(src, _kernel_transform(k, s, p))
            elif fn is getattr:
                continue  # x.shape etc.
            else:
                raise _Unsupported(f"function {getattr(fn, '__name__', fn)}")
        elif node.op == "call_method":
            if node.target in _POINTWISE_METHODS:
                env[node] = src
            elif node.target in _GLOBAL_METHODS:
                env[node] = None
            elif node.target in ("size", "dim"):
                continue
            else:
                raise _Unsupported(f"method .{node.target}()")
        have.add(node)
    return out


def analytic_receptive_field(model: nn.Module, layer: str) -> ReceptiveField:
    """RF of the output of module ``layer`` by composing kernel/stride/padding/dilation along the traced
    graph. Raises ``ValueError`` if the layer is unknown or the graph has an op the walk cannot follow."""
    names = dict(model.named_modules())
    if layer not in names or not layer:
        raise UsageError(f"unknown layer {layer!r}; pass a module name from named_modules()")
    found: dict[str, _T] = {}
    try:
        _module_transform(model, "", layer, found)
    except _Unsupported as exc:
        raise UsageError(f"analytic receptive field not available for {layer!r}: {exc}") from None
    if "rf" not in found:
        raise UsageError(f"layer {layer!r} was not found on the traced path from the input")
    t = found["rf"]
    if t is None:
        return ReceptiveField(None, (1, 1), (0, 0), "analytic-fx", layer)
    return ReceptiveField(tuple(t[0]), tuple(t[1]), tuple(t[2]), "analytic-fx", layer)  # type: ignore[arg-type]


def empirical_receptive_field(model: nn.Module, layer: str, input_size: int = 224, trials: int = 3,
                              seed: int = 0) -> ReceptiveField:
    """RF measured by backpropagating from single output units of ``layer`` (eval mode, CPU/GPU as the model).

    The size is the extent of non-zero input gradient of the central unit (union over ``trials`` random
    inputs, since a ReLU can hide part of the field for one input); the stride is the shift of that extent
    between the central unit and its neighbour. Clipped by the image border for very large fields.
    """
    from tasks.neurons.common import forward_to

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)

    def extent(uy: int, ux: int) -> tuple[int, int, int, int]:
        ys, xs = [], []
        for _ in range(trials):
            x = torch.randn(1, 3, input_size, input_size, generator=g).to(dev).requires_grad_(True)
            act = forward_to(model, x, layer, grad=True)
            if act.dim() != 4:
                return 0, 0, input_size, input_size
            act[0, :, uy, ux].sum().backward()
            nz = (x.grad.abs().sum(dim=(0, 1)) > 0).nonzero()
            if len(nz):
                ys += [int(nz[:, 0].min()), int(nz[:, 0].max())]
                xs += [int(nz[:, 1].min()), int(nz[:, 1].max())]
        if not ys:
            raise UsageError(f"no input gradient reaches layer {layer!r}; cannot measure its receptive field")
        return min(ys), min(xs), max(ys), max(xs)

    with torch.enable_grad():
        probe = forward_to(model, torch.zeros(1, 3, input_size, input_size, device=dev), layer)
        if probe.dim() != 4:
            return ReceptiveField(None, (1, 1), (0, 0), "empirical-gradient", layer)
        h, w = probe.shape[2:]
        cy, cx = h // 2, w // 2
        y0, x0, y1, x1 = extent(cy, cx)
        if h > 1 and w > 1:
            ny0, nx0, _, _ = extent(max(0, cy - 1), max(0, cx - 1))
            sy, sx = max(1, y0 - ny0), max(1, x0 - nx0)
        else:
            sy, sx = input_size, input_size
    size = (y1 - y0 + 1, x1 - x0 + 1)
    return ReceptiveField(size, (sy, sx), (y0 - cy * sy, x0 - cx * sx), "empirical-gradient", layer)


def receptive_field(model: nn.Module, layer: str, input_size: int = 224) -> ReceptiveField:
    """Analytic RF where the graph can be walked, else the empirical one (``.method`` says which)."""
    try:
        return analytic_receptive_field(model, layer)
    except ValueError as exc:
        if layer not in dict(model.named_modules()):
            raise
        log.info("falling back to the empirical receptive field for %s: %s", layer, exc)
        return empirical_receptive_field(model, layer, input_size)
