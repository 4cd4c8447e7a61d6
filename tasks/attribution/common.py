"""Shared pieces of the attribution methods: input checks, target scores, channel reduction, the registry.

Every method takes ``(model, inputs (N,3,H,W) float32, target (N,) long, ...)`` and returns attributions of
the input's shape (Grad-CAM returns ``(N, H, W)``). ``reduce_map`` turns a channel attribution into the 2-D
map that is stored, drawn and scored. Methods live one per file (occlusion, saliency, cam); this module only
holds what they share, so it imports none of them at import time.
"""

from __future__ import annotations

import torch
from torch import nn

from storage.errors import UsageError

__all__ = [
    "check_inputs",
    "target_scores",
    "reduce_map",
    "normalise_maps",
    "decode_stored_rows",
]


def check_inputs(inputs: torch.Tensor, target: torch.Tensor | int | list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``inputs`` ``(N,C,H,W)`` float and ``target`` (int, list or ``(N,)`` long); return both as tensors.

    Raises ``ValueError`` saying what was wrong.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise UsageError(f"inputs must be a (N, C, H, W) tensor, got {type(inputs).__name__} "
                         f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else ''}")
    if not inputs.is_floating_point():
        raise UsageError(f"inputs must be floating point (normalised images), got {inputs.dtype}")
    n = inputs.shape[0]
    if target is None:
        raise UsageError("target is required: one class index per image (e.g. the predicted class)")
    t = torch.as_tensor(target, dtype=torch.long, device=inputs.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise UsageError(f"target must have one entry per image ({n}), got shape {tuple(t.shape)}")
    return inputs, t.contiguous()


def target_scores(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``model(x)[i, target[i]]`` as ``(N,)``: the logit (score) each attribution explains."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() != 2:
        raise UsageError(f"the model must return (N, classes) scores, got shape {tuple(out.shape)}")
    if int(target.max()) >= out.shape[1] or int(target.min()) < 0:
        raise UsageError(f"target index out of range for a model with {out.shape[1]} outputs")
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
    raise UsageError(f"unknown channel reduction {how!r}; use absmax, sum, abssum or mean")


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to ``[0, 1]`` (``(N,H,W)``), as pytorch-grad-cam's ``scale_cam_image`` (+1e-7)."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    flat = flat - lo
    return (flat / (1e-7 + flat.amax(dim=1, keepdim=True))).view_as(maps)


def decode_stored_rows(root: str | None, rows, pre) -> tuple[list[int], torch.Tensor | None, list[str]]:
    """Decode the stored images of ``rows`` (a DataFrame with ``path`` and ``image_id``; ``root`` = the dataset root,
    local or URL), checking each file still has the bytes it was extracted from: ``(ok row positions, (n,3,H,W)
    uint8, failure notes "path: reason")``. Used by the attribution audit and its sanity check."""
    from storage.atomic import sha256_bytes
    from tasks.core.forward import preprocess_uint8
    from tasks.core.images import REOPEN_LIMITS, RejectedImage, decode_image, read_stored_bytes

    ok, imgs, bad = [], [], []
    for i, r in enumerate(rows.itertuples()):
        try:
            data = read_stored_bytes(root, r.path)
            if sha256_bytes(data) != r.image_id:
                raise RejectedImage("changed", "file changed since extraction")
            imgs.append(preprocess_uint8(decode_image(data, r.path, REOPEN_LIMITS), pre))
            ok.append(i)
        except RejectedImage as exc:
            bad.append(f"{r.path}: {exc}")
    return ok, (torch.stack(imgs) if imgs else None), bad
