"""Backprop rules: the shared gradient engine of the saliency family.

- ``plain``: ordinary gradients (Simonyan et al. 2014 saliency).
- ``guided``: guided backprop (Springenberg et al. 2015): at each ``nn.ReLU`` the backward signal is
  ``relu(grad_out) * (x > 0)``.
- ``deconvnet``: Zeiler & Fergus 2014: at each ``nn.ReLU`` the backward signal is ``relu(grad_out)`` (the
  forward mask is ignored; max-pool "switches" are the ordinary max-pool backward; transposed filters are the
  ordinary conv backward).

On ``nn.ReLU`` these are exactly Captum's ``GuidedBackprop`` / ``Deconvolution`` rules. Beyond Captum, the
same rules are applied to ``nn.ReLU6`` (MobileNetV2): Captum leaves ReLU6 alone, so on MobileNetV2 its guided
backprop / deconvnet silently equal the plain gradient. Functional ``F.relu`` calls are not overridden
(neither by Captum). In-place ReLUs are handled: the hook gives the
module a copy, so the tensor the rule reads is never modified.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from storage.errors import UsageError
from tasks.attribution.common import check_inputs, target_scores
from tasks.core.hooks import override_outputs

__all__ = ["RULES", "relu_rule", "input_gradients"]

RULES = ("plain", "guided", "deconvnet")


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


class _GuidedReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clamp(0, 6)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * ((x > 0) & (x < 6)).to(grad.dtype)


class _DeconvReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def relu_rule(model: nn.Module, rule: str):
    """Context manager: inside it every ``nn.ReLU`` / ``nn.ReLU6`` of ``model`` backpropagates with ``rule``."""
    if rule not in RULES:
        raise UsageError(f"unknown backprop rule {rule!r}; use one of {', '.join(RULES)}")
    if rule == "plain":
        return nullcontext(0)
    fns = {nn.ReLU: _GuidedReLU if rule == "guided" else _DeconvReLU,
           nn.ReLU6: _GuidedReLU6 if rule == "guided" else _DeconvReLU6}
    return override_outputs(model, lambda m: type(m) in fns, lambda m, x: fns[type(m)].apply(x))


def input_gradients(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, rule: str = "plain",
                    batch_size: int | None = None) -> torch.Tensor:
    """``d score_target / d inputs`` under ``rule``, ``(N,C,H,W)`` float32, computed ``batch_size`` rows at a time.

    Memory: O(batch_size x activations of one forward/backward). The model's parameter gradients are not
    touched (``torch.autograd.grad`` w.r.t. the inputs only).
    """
    inputs, target = check_inputs(inputs, target)
    n = inputs.shape[0]
    bs = n if not batch_size or batch_size >= n else int(batch_size)
    out = torch.empty_like(inputs, dtype=torch.float32)
    with relu_rule(model, rule), torch.enable_grad():
        for i in range(0, n, bs):
            x = inputs[i:i + bs].detach().clone().requires_grad_(True)
            score = target_scores(model, x, target[i:i + bs])
            (g,) = torch.autograd.grad(score.sum(), x)
            out[i:i + bs] = g.float()
    return out
