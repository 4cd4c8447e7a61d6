"""The one forward engine: pick a device, preprocess PIL images the weights' way, run a model in fixed
micro-batches and pool a layer's activation into features.

Used by extraction, the neighbour query (``neighbors --image``), the attribution audit and the neuron
techniques, so an image gives the same features whichever stage computes them.

Extraction's decode modes (:func:`resolve_decode`, recorded as the manifest's ``preprocessing.decode``):
``jpeg-draft`` (PIL, JPEGs decoded at a reduced DCT scale that keeps the shorter side >= the resize target),
``full`` (PIL at full size), ``nvjpeg`` (JPEGs decoded in batches on the GPU and resized there,
:func:`decode_preprocess_jpegs`) and ``torchvision-jpeg`` (the same tensor path on the CPU, for testing it).
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
    "DECODE_CHOICES",
    "DECODE_RECORDS",
    "TENSOR_DECODES",
    "pick_device",
    "resolve_precision",
    "resolve_decode",
    "preprocess_uint8",
    "preprocess_tensor_uint8",
    "decode_preprocess_jpegs",
    "normalise",
    "pool_features",
    "prepare_module",
    "forward_batch",
    "forward_batch_async",
    "PendingFeatures",
    "CpuStreams",
    "cpu_streams_plan",
    "embed_images",
    "has_head",
    "worker_context",
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


DECODE_CHOICES = ("auto", "cpu", "gpu")
# What the manifest records as preprocessing["decode"] (part of the artefact key: modes never share an artefact).
DECODE_RECORDS = ("jpeg-draft", "full", "nvjpeg", "torchvision-jpeg")
TENSOR_DECODES = frozenset({"nvjpeg", "torchvision-jpeg"})  # JPEGs decoded + resized as tensors on the model's device
_TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def resolve_decode(decode: str, device: str | torch.device, full_decode: bool = False,
                   interpolation: str = "bilinear") -> str:
    """Where and how extraction decodes images; returns one of :data:`DECODE_RECORDS`.

    ``decode``: ``cpu`` -> PIL in DataLoader workers, JPEGs at a reduced DCT scale (``jpeg-draft``) unless
    ``full_decode`` (``full``); ``gpu`` -> JPEGs decoded by ``torchvision.io.decode_jpeg`` on the model's device and
    resized there (``nvjpeg`` on CUDA; ``torchvision-jpeg`` on a CPU device, which only exists to exercise that
    path without a GPU); other formats and JPEGs the tensor decoder refuses go through PIL at full size;
    ``auto`` -> ``gpu`` on a CUDA device (when the resize ``interpolation`` has a tensor kernel), else ``cpu``.
    Raises :class:`UsageError` for an unknown value or ``gpu`` with an interpolation tensors cannot do.
    """
    if decode not in DECODE_CHOICES:
        raise UsageError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    dev = pick_device(device) if isinstance(device, str) else device
    tensor_ok = interpolation in _TENSOR_INTERPOLATIONS
    if decode == "gpu":
        if not tensor_ok:
            raise UsageError(f"--decode gpu resizes on the GPU, which has no {interpolation!r} interpolation; use "
                             f"--interpolation {'/'.join(_TENSOR_INTERPOLATIONS)} or --decode cpu")
        return "nvjpeg" if dev.type == "cuda" else "torchvision-jpeg"
    if decode == "auto" and dev.type == "cuda" and tensor_ok:
        return "nvjpeg"
    return "full" if full_decode else "jpeg-draft"


def preprocess_tensor_uint8(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """``(3, H, W) uint8`` on any device -> ``(3, crop, crop) uint8`` on the same device: resize the shorter side to
    ``pre.resize`` (antialiased, torchvision's tensor kernels) and centre crop, as :func:`preprocess_uint8` does
    for PIL images (same output size and crop box; pixels within a level or two of PIL's)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F2

    img = F2.resize(img, [pre.resize], interpolation=InterpolationMode(pre.interpolation), antialias=True)
    return F2.center_crop(img, [pre.crop, pre.crop])


def decode_preprocess_jpegs(jpegs: Sequence[tuple[int, torch.Tensor, int | None, int, int]], device: torch.device,
                            pre: Preprocess, limits) -> tuple[list[tuple[int, torch.Tensor, int, int]], list[tuple[int, str, str]]]:
    """Decode and preprocess a batch of JPEG files on ``device`` (nvJPEG on CUDA).

    ``jpegs``: ``(i, data, orientation, width, height)`` with ``data`` the file's bytes as a 1-d ``uint8`` CPU
    tensor, already through :func:`tasks.core.images.inspect_image`. Returns ``(ok, bad)``: ``ok`` rows
    ``(i, (3, crop, crop) uint8 on device, width, height)``; a file the tensor decoder refuses is decoded again by
    :func:`tasks.core.images.decode_image_sized` on the CPU (``limits``: its :class:`DecodeLimits`), and lands
    in ``ok`` or, with its reject reason, in ``bad`` as ``(i, reason, detail)``. Memory: one decoded batch.
    """
    from tasks.core.images import RejectedImage, decode_image_sized, decode_jpeg_tensors

    decoded = decode_jpeg_tensors([j[1] for j in jpegs], [j[2] for j in jpegs], device)
    ok: list[tuple[int, torch.Tensor, int, int]] = []
    bad: list[tuple[int, str, str]] = []
    for (i, data, _o, w, h), t in zip(jpegs, decoded):
        if t is not None:
            ok.append((i, preprocess_tensor_uint8(t, pre), w, h))
            continue
        try:  # the trusted decoder decides: a row (decoded by PIL) or a reject with its reason
            img, (w2, h2) = decode_image_sized(data.numpy().tobytes(), "", limits)
        except RejectedImage as exc:
            bad.append((i, exc.reason, exc.detail))
            continue
        ok.append((i, preprocess_uint8(img, pre).to(device), w2, h2))
    return ok, bad


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


def cpu_streams_plan(batch_size: int, cores: int | None = None) -> tuple[int, int]:
    """``(streams, intra-op threads per stream)`` for CPU extraction over ``cores`` threads (default: torch's
    intra-op thread count, i.e. ``OMP_NUM_THREADS`` or the cores): one stream per core, at most one per
    :data:`CPU_MICRO_BATCH` images of a batch; cores left over are shared out as intra-op threads."""
    cores = max(1, cores or torch.get_num_threads())
    streams = max(1, min(cores, -(-max(1, batch_size) // CPU_MICRO_BATCH)))
    return streams, max(1, cores // streams)


class CpuStreams:
    """``n`` copies of a prepared module that share its parameters and buffers (no extra weight memory), each run
    by its own thread: :func:`forward_batch` hands each micro-batch to whichever copy is free.

    Why: with the caller at one intra-op thread per stream (``torch.set_num_threads``), the cores work on
    different micro-batches and never wait for each other at an OpenMP barrier, so a preempted thread (a decode
    process, another job) costs its own time slice only. Measured here (MobileNetV2, 2 cores, another process
    busy): 2 intra-op threads 6.7 img/s, 1 thread 60 img/s, 2 streams of 1 thread 62-64 img/s. Every micro-batch
    runs with the same thread count whichever stream takes it, so features do not depend on scheduling.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, module: nn.Module, n: int) -> None:
        import copy
        import queue
        from concurrent.futures import ThreadPoolExecutor

        copies = [module]
        for _ in range(max(1, n) - 1):
            shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
            try:
                copies.append(copy.deepcopy(module, shared))
            except (TypeError, RuntimeError, AttributeError):  # e.g. a module that refuses to be copied: fewer streams
                break
        self.n = len(copies)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for m in copies:
            self._free.put(m)
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="convlens-forward") if self.n > 1 else None

    def map(self, fn, chunks: list) -> list:
        """``[fn(module_copy, chunk) for chunk in chunks]``, in order, each call on a copy no other call is using."""
        def run(chunk):
            m = self._free.get()
            try:
                return fn(m, chunk)
            finally:
                self._free.put(m)

        if self._pool is None:
            return [run(c) for c in chunks]
        return list(self._pool.map(run, chunks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "CpuStreams":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def forward_batch(module: nn.Module, x: torch.Tensor, ref: LayerRef, pool: str, device: torch.device,
                   with_preds: bool, precision: str = "auto", streams: CpuStreams | None = None,
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Features ``(N, D) float32`` (+ top-5 ``(N, 5)`` int32 / float32) of a normalised ``(N,3,H,W)`` batch.

    On CPU the batch runs in :data:`CPU_MICRO_BATCH` chunks (spread over ``streams`` copies of ``module`` when
    given, see :class:`CpuStreams`); on CUDA in one pass. ``precision`` (see :func:`resolve_precision`) picks bf16
    autocast or plain fp32; features come out float32 either way.
    """
    amp = resolve_precision(precision, device) == "bf16"
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    step = CPU_MICRO_BATCH if device.type == "cpu" else max(1, x.shape[0])
    chunks = []
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
        chunks.append((chunk, n))

    def run(m: nn.Module, item: tuple[torch.Tensor, int]):
        return _forward_chunk(m, item[0], ref, pool, device, with_preds, amp)

    if streams is not None and device.type == "cpu" and len(chunks) > 1:
        outs = streams.map(run, chunks)
    else:
        outs = [run(module, c) for c in chunks]
    feats_l, preds_l, probs_l = [], [], []
    for (f, p, q), (_chunk, n) in zip(outs, chunks):
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


class PendingFeatures:
    """One batch's ``(features (N, D) float32, top-5 indices (N, 5) int32 | None, top-5 probabilities (N, 5)
    float32 | None)`` whose device -> host copy may still be in flight; :meth:`result` waits for it."""

    def __init__(self, tensors: tuple, event=None) -> None:
        self._tensors, self._event = tensors, event

    def result(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        f, p, q = self._tensors
        if isinstance(f, np.ndarray):
            return f, p, q
        return (f.numpy().astype(np.float32, copy=False), p.numpy() if p is not None else None,
                q.numpy() if q is not None else None)


def forward_batch_async(module: nn.Module, x: torch.Tensor, ref: LayerRef, pool: str, device: torch.device,
                        with_preds: bool, precision: str = "auto", streams: CpuStreams | None = None) -> PendingFeatures:
    """:func:`forward_batch` that does not wait for a CUDA device: the forward pass is queued, its outputs are
    copied (non-blocking) into pinned host memory and a CUDA event marks the end, so the caller can prepare the
    next batch (read, decode, resize) while this one computes. On CPU it is :func:`forward_batch` (same micro-
    batches, same bits), already finished. Memory: one batch's outputs in pinned host memory."""
    if device.type != "cuda":
        return PendingFeatures(forward_batch(module, x, ref, pool, device, with_preds, precision, streams))
    amp = resolve_precision(precision, device) == "bf16"
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with capture(module, ref) as acts, torch.inference_mode():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = module(x)
        act = acts[ref.alias] if ref.name else out
        dev_out: list[torch.Tensor | None] = [pool_features(act.float(), pool), None, None]
        if with_preds and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 5:
            top = torch.topk(torch.softmax(out.float(), dim=1), 5, dim=1)
            dev_out[1], dev_out[2] = top.indices.int(), top.values
        host: list[torch.Tensor | None] = []
        for t in dev_out:
            if t is None:
                host.append(None)
                continue
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host.append(h)
        event = torch.cuda.Event()
        event.record()
    return PendingFeatures(tuple(host), event)


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


def worker_context() -> str | None:
    """``fork`` (fast start) from a single-threaded process; ``forkserver`` once other threads run (a Prefect
    flow or task run, a Dask worker): forking a process that has live event-loop / logging threads could leave
    a decode worker dead ("DataLoader worker exited unexpectedly"), seen under Prefect's test server for
    extraction and for max-activations after a flow had run in the same process. Every stage that starts decode
    workers asks here."""
    import threading

    # our heartbeat, tqdm's monitor (named "tqdm_monitor" by tqdm >= 4.60: before that was listed, every CLI run
    # with a progress bar started its decode workers through a forkserver, ~3 s of extra start-up on 2 cores), ...
    ours = ("convlens-", "MainThread", "pin_memory", "TMonitor", "tqdm_monitor", "Thread-")
    foreign = [t for t in threading.enumerate() if not t.name.startswith(ours)]
    if foreign or threading.current_thread() is not threading.main_thread():
        return "forkserver"
    return None
