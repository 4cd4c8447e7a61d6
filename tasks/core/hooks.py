"""Hook plumbing in one place: layer resolution (names and aliases) and activation capture.

Aliases: ``fc6`` / ``fc7`` (AlexNet / VGG 4096-d FC layers after their ReLU), ``penultimate`` (the input of
the model's final ``nn.Linear``). Hooks are registered inside a context manager and always removed in
``finally``. Captured tensors are cloned so a later in-place op cannot change them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from storage.errors import UsageError

__all__ = ["LayerRef", "resolve_layer", "capture", "LAYER_ALIASES", "get_module", "capture_for_grad",
           "override_outputs"]

LAYER_ALIASES = ("fc6", "fc7", "penultimate", "cls", "output")


@dataclass(frozen=True)
class LayerRef:
    """Where to read: module ``name``; ``side`` = ``output`` (forward hook) or ``input`` (pre-hook)."""

    alias: str
    name: str
    side: str = "output"
    token: int | None = None  # for (N, tokens, D) outputs: keep this token only (``cls`` alias)


def get_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(name)
    return modules[name]


def _fc_relus(model: nn.Module) -> list[str] | None:
    """Names of the ReLUs right after the last-but-two and last-but-one Linear layers, or None."""
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    linears = [i for i, n in enumerate(names) if isinstance(mods[n], nn.Linear)]
    if len(linears) < 3:
        return None
    out = []
    for li in linears[-3:-1]:
        relu = next((names[j] for j in range(li + 1, len(names)) if isinstance(mods[names[j]], nn.ReLU)), None)
        if relu is None or (names.index(relu) > linears[-1]):
            return None
        out.append(relu)
    if mods[names[linears[-3]]].out_features != mods[names[linears[-2]]].in_features:
        return None
    return out


def resolve_layer(model: nn.Module, layer: str | None) -> LayerRef:
    """Resolve a module name or alias to a :class:`LayerRef`; ``None`` means ``fc7`` where it exists, else ``penultimate``.

    Raises ``ValueError`` listing valid choices for an unknown name.
    """
    from tasks.core.models import ModelError

    if isinstance(model, torch.jit.ScriptModule):
        # Hooks cannot be registered inside TorchScript: the scripted model's output is the feature.
        if layer not in (None, "", "default", "output"):
            raise ModelError(f"layer {layer!r} is not available on a TorchScript model (no hooks inside TorchScript); "
                             "use --layer output and script a feature extractor, or pass the architecture + a state dict")
        return LayerRef("output", "", "output")
    if layer == "output":
        return LayerRef("output", "", "output")
    if layer in (None, "", "default"):
        return resolve_layer(model, "fc7" if _fc_relus(model) else "penultimate")
    if layer in ("fc6", "fc7"):
        relus = _fc_relus(model)
        if not relus:
            raise ModelError(f"layer alias {layer!r} needs an AlexNet/VGG-style classifier (three Linear layers with ReLUs); "
                             "use --layer penultimate or a module name (see `convlens layers`)")
        return LayerRef(layer, relus[0] if layer == "fc6" else relus[1], "output")
    if layer == "penultimate":
        last = None
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear):
                last = n
        if last is None:
            raise ModelError("layer alias 'penultimate' needs a final nn.Linear; pass a module name instead (see `convlens layers`)")
        return LayerRef(layer, last, "input")
    if layer == "cls":
        last_ln = None
        for n, m in model.named_modules():
            if isinstance(m, nn.LayerNorm):
                last_ln = n
        if last_ln is None:
            raise ModelError("layer alias 'cls' needs a transformer with a final LayerNorm over tokens (e.g. a ViT); "
                             "use --layer penultimate for CNNs")
        return LayerRef(layer, last_ln, "output", token=0)
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        close = [n for n in names if layer.split(".")[0] in n][:6]
        raise ModelError(
            f"unknown layer {layer!r}; use an alias ({', '.join(LAYER_ALIASES)}) or a module name from "
            f"named_modules()" + (f", e.g. {', '.join(close)}" if close else f", e.g. {', '.join(names[:6])}")
            + " (list them all with `convlens layers --model ...`)"
        )
    return LayerRef(layer, layer, "output")


@contextlib.contextmanager
def capture(model: nn.Module, refs: list[LayerRef] | LayerRef, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the activations at ``refs`` during forward passes inside the block.

    Yields a dict ``alias -> tensor`` refreshed on every forward. With ``detach=False`` the tensors keep
    their graph (for gradient methods). Hooks are removed when the block exits, even on error.
    """
    if isinstance(refs, LayerRef):
        refs = [refs]
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for ref in refs:
            if ref.name == "":
                continue  # the model's own output: callers read it from the forward's return value
            module = get_module(model, ref.name)
            if ref.side == "input":
                def pre(_m, args, _alias=ref.alias, _tok=ref.token):
                    x = args[0]
                    if _tok is not None and x.dim() == 3:
                        x = x[:, _tok]
                    store[_alias] = x.detach().clone() if detach else x
                handles.append(module.register_forward_pre_hook(pre))
            else:
                def post(_m, _args, out, _alias=ref.alias, _tok=ref.token):
                    x = out[0] if isinstance(out, (tuple, list)) else out
                    if _tok is not None and x.dim() == 3:
                        x = x[:, _tok]
                    store[_alias] = x.detach().clone() if detach else x
                handles.append(module.register_forward_hook(post))
        yield store
    finally:
        for h in handles:
            h.remove()


# --- gradient-side helpers (attribution methods) -------------------------------------------------------


@contextlib.contextmanager
def capture_for_grad(model: nn.Module, name: str) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the output of module ``name`` with its graph, safe from later in-place ops, during the block.

    The forward hook stores the module's own output tensor and hands a *clone* downstream, so a following
    ``ReLU(inplace=True)`` modifies the clone, never the stored tensor (pytorch-grad-cam's hook reads the
    in-place-modified storage). Gradients w.r.t. the stored tensor are then exact:
    ``torch.autograd.grad(score, store["output"])``. The hook is removed on exit, even on error.
    """
    module = get_module(model, name)
    store: dict[str, torch.Tensor] = {}

    def post(_m, _args, out):
        x = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"module {name!r} does not output a tensor; pick a conv layer or block")
        store["output"] = x
        return x.clone() if not isinstance(out, (tuple, list)) else type(out)([x.clone(), *out[1:]])

    handle = module.register_forward_hook(post)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def override_outputs(model: nn.Module, predicate, make_output) -> Iterator[int]:
    """Replace the output of every module where ``predicate(module)`` with ``make_output(module, input)``.

    ``input`` is the module's original (pre-call) input tensor: a pre-hook hands the module a clone when the
    module works in place (``inplace=True``), so the original is never modified. Used for backprop rules
    (guided backprop / deconvnet ReLU overrides). Yields the number of hooked modules; every hook is removed on
    exit, even on error.
    """
    handles = []
    stash: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            if not predicate(module):
                continue

            def pre(m, args):
                stash[id(m)] = args[0]
                if getattr(m, "inplace", False):
                    return (args[0].clone(), *args[1:])
                return None

            def post(m, _args, _out):
                return make_output(m, stash.pop(id(m)))

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        yield len(handles) // 2
    finally:
        for h in handles:
            h.remove()
        stash.clear()


def layer_table(model: nn.Module, input_size: int = 224) -> list[dict]:
    """One dummy forward ``(1, 3, input_size, input_size)``; every module's name, type, depth, output shape
    and own parameter count, in ``named_modules()`` order (modules not run in forward have shape ``None``)."""
    shapes: dict[str, tuple | None] = {}
    handles = []

    def hook(name):
        def fn(_m, _a, out):
            x = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
            shapes[name] = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        return fn

    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_hook(hook(name)))
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, m in model.named_modules():
        if not name:
            continue
        own = sum(p.numel() for p in m.parameters(recurse=False))
        rows.append({"name": name, "type": type(m).__name__, "depth": name.count("."),
                     "output_shape": shapes.get(name), "params": int(own)})
    return rows
