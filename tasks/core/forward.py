"""The one forward engine: pick a device, preprocess PIL images the weights' way, run a model in fixed
micro-batches and pool a layer's activation into features.

Used by extraction, the neighbour query (``neighbors --image``), the attribution audit and the neuron
techniques, so an image gives the same features whichever stage computes them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from storage.errors import UsageError
from tasks.core.hooks import LayerRef, capture
from tasks.core.models import LoadedModel, Preprocess

__all__ = [
    "CPU_MICRO_BATCH",
    "pick_device",
    "resolve_precision",
    "preprocess_uint8",
    "normalise",
    "pool_features",
    "prepare_module",
    "forward_batch",
    "embed_images",
    "has_head",
]


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> ``bf16`` (autocast) on CUDA, ``fp32`` on CPU; explicit values pass through."""
    if precision != "auto":
        return precision
    dev = pick_device(device) if isinstance(device, str) else device
    return "bf16" if dev.type == "cuda" else "fp32"


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return torch.device(device)


def preprocess_uint8(img, pre: Preprocess) -> torch.Tensor:
    """PIL RGB -> ``(3, crop, crop) uint8``: resize shorter side (antialiased) and centre crop, as torchvision does."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(img, [pre.resize], interpolation=InterpolationMode(pre.interpolation), antialias=True)
    img = F.center_crop(img, [pre.crop, pre.crop])
    return F.pil_to_tensor(img)


def normalise(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """``(N,3,H,W) uint8`` -> normalised float32 on the batch's device."""
    x = batch.float().div_(255.0)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def pool_features(act: torch.Tensor, pool: str) -> torch.Tensor:
    """Reduce an activation to ``(N, D)``: conv maps ``(N,C,H,W)`` by global avg/max pooling unless ``pool='none'``."""
    if act.dim() == 2:
        return act
    if act.dim() == 4 and pool != "none":
        return act.mean(dim=(2, 3)) if pool == "avg" else act.amax(dim=(2, 3))
    if act.dim() == 3 and pool != "none":  # (N, tokens, D): mean over tokens
        return act.mean(dim=1) if pool == "avg" else act.amax(dim=1)
    return act.flatten(1)


# CPU forward in micro-batches: measured here (2 cores, oneDNN) MobileNetV2 runs 70-99 img/s at batch 4-16 but
# 48 img/s at batch 64 (activations fall out of cache), and channels_last beats NCHW by 1.2-1.6x on CPU too.
CPU_MICRO_BATCH = 8


def prepare_module(module: nn.Module, device: torch.device, ref: LayerRef | None = None) -> nn.Module:
    """An inference copy of ``module`` on ``device``: eval mode, Conv+BN folded (except at the hooked layer
    ``ref``), channels_last (faster for convs on both CUDA and oneDNN CPU). ``module`` itself is unchanged."""
    from tasks.core.models import fold_conv_bn

    module = fold_conv_bn(module.eval(), keep=[ref.name] if ref is not None and ref.name else [])
    module = module.to(device)
    try:
        module = module.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError):  # e.g. TorchScript modules that refuse a memory-format move
        pass
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return module


def forward_batch(module: nn.Module, x: torch.Tensor, ref: LayerRef, pool: str, device: torch.device,
                   with_preds: bool, precision: str = "auto") -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Features ``(N, D) float32`` (+ top-5 ``(N, 5)`` int32 / float32) of a normalised ``(N,3,H,W)`` batch.

    On CPU the batch runs in :data:`CPU_MICRO_BATCH` chunks; on CUDA in one pass. ``precision`` (see
    :func:`resolve_precision`) picks bf16 autocast or plain fp32; features come out float32 either way.
    """
    amp = resolve_precision(precision, device) == "bf16"
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    step = CPU_MICRO_BATCH if device.type == "cpu" else max(1, x.shape[0])
    feats_l, preds_l, probs_l = [], [], []
    for s in range(0, x.shape[0], step):
        chunk = x[s:s + step]
        n = chunk.shape[0]
        if device.type == "cpu" and n < step:
            # Pad to the fixed micro-batch: oneDNN picks kernels by batch size, so an image's features would
            # otherwise depend (in the last bits) on how many images shared its chunk, and a resumed run would
            # not be byte-identical to an uninterrupted one.
            chunk = torch.cat([chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))])
            if chunk.dim() == 4:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
        f, p, q = _forward_chunk(module, chunk, ref, pool, device, with_preds, amp)
        f, p, q = f[:n], (p[:n] if p is not None else None), (q[:n] if q is not None else None)
        feats_l.append(f)
        if p is not None:
            preds_l.append(p)
            probs_l.append(q)
    feats = np.concatenate(feats_l) if len(feats_l) > 1 else feats_l[0]
    if preds_l and len(preds_l) == len(feats_l):
        return feats, np.concatenate(preds_l), np.concatenate(probs_l)
    return feats, None, None


def _forward_chunk(module: nn.Module, x: torch.Tensor, ref: LayerRef, pool: str, device: torch.device,
                   with_preds: bool, amp: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    with capture(module, ref) as acts, torch.inference_mode():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = module(x)
        act = acts[ref.alias] if ref.name else out
        feats = pool_features(act.float(), pool)
    preds = probs = None
    if with_preds and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 5:
        p = torch.softmax(out.float(), dim=1)
        top = torch.topk(p, 5, dim=1)
        preds, probs = top.indices.int().cpu().numpy(), top.values.cpu().numpy()
    return feats.cpu().numpy().astype(np.float32), preds, probs


def embed_images(lm: LoadedModel, images: Sequence, ref: LayerRef, pool: str = "avg",
                 device: str = "cpu", precision: str = "auto") -> np.ndarray:
    """Features of PIL RGB images with the model's own preprocessing: ``(N, D) float32``."""
    dev = pick_device(device)
    module = prepare_module(lm.module, dev, ref)
    x = torch.stack([preprocess_uint8(im, lm.preprocess) for im in images]).to(dev)
    feats, _, _ = forward_batch(module, normalise(x, lm.preprocess), ref, pool, dev, False, precision)
    return feats


def has_head(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())
