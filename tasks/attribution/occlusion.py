"""Occlusion sensitivity (Zeiler & Fergus 2014), batched and with incremental re-inference (Krypton).

``occlusion`` returns what ``captum.attr.Occlusion(model).attribute(inputs, sliding_window_shapes=(C, window,
window), strides=(C, stride, stride), baselines=baseline, target=target)`` returns: for every pixel, the mean
over the windows covering it of ``score(x) - score(x occluded)``.

How it is faster than Captum (which runs one occluded copy per forward pass by default):

1. An inference copy of the model (:func:`inference_copy`): traced with ``torch.fx``, each Conv -> BatchNorm
   pair folded into one conv, in-place ops made out-of-place, ``channels_last``. On CPU the convolutional
   part runs in micro-batches that stay in cache, as extraction does (:data:`CPU_OCCLUSION_MICRO_BATCH`, 1
   for memory-bound networks such as MobileNetV2), and the head (flatten, Linear) once per ``batch_size``
   copies; both as fx-generated code.
2. Many occluded copies per forward pass (``batch_size``).
3. Incremental re-inference (Nakandala et al., "Krypton", SIGMOD 2019), layer by layer. For every node of the
   traced graph and every window, the rectangle of the node's output that the window can change is derived
   from the ops' geometry (kernel, stride, padding, dilation; pointwise ops keep it; residual adds and channel
   concatenations take the hull). The unoccluded image runs once and every activation is cached. For a batch
   of occluded copies, each spatially local node (conv incl. depthwise, max / avg pool, BatchNorm, ReLU /
   ReLU6 / ..., add, mul, cat) is computed only on a fixed-size *patch* around its changed rectangle: its
   input region is gathered from the input node's patch where it has one and from the input node's cached
   activation elsewhere (zeros / -inf outside the map, like the op's own padding), with one ``index_select``.
   Once a node's patch would cover most of its map (the cut, chosen by a FLOP + memory-traffic cost model),
   the patch is pasted into the cached activation and the rest of the network runs at full size.
   Every value used is the one the full forward computes, so the result equals plain batching up to float
   rounding (different oneDNN kernels for different shapes): no data-dependent check can fail on another
   machine. :func:`plan_incremental` still checks a few windows against the full forward once, with a
   tolerance scaled to the logits' magnitude and the dtype, and returns ``None`` (plain batching) if they
   disagree, which would mean an op whose semantics the planner got wrong.

Tolerance against Captum: the folded Conv+BN and the different kernel choices change float32 rounding, so
attributions agree with Captum's to about ``1e-6 x max |logit|`` (tests allow ``1e-4`` absolute at logits of
order 1; the benchmark reports the measured difference).

Memory: O(batch_size x (input + activations of one forward)) plus one image's cached activations for the
incrementally computed nodes. Nothing grows with the number of images.
"""

from __future__ import annotations

import logging
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import UsageError
from tasks.attribution.common import check_inputs, target_scores
from tasks.core.forward import CPU_MICRO_BATCH, prepare_module

__all__ = [
    "CPU_OCCLUSION_MICRO_BATCH",
    "DEFAULT_BATCH_SIZE",
    "gpu_batch_size",
    "occlusion",
    "window_starts",
    "inference_copy",
    "IncrementalPlan",
    "plan_incremental",
]

log = logging.getLogger(__name__)

# Occluded copies per forward on CPU for the full-size part of the network. Extraction's CPU_MICRO_BATCH (8)
# keeps activations in cache; occlusion needs no batch-mate independence, and 16 measured fastest here
# (1 thread, img/s at micro-batch 1 / 4 / 16, folded channels_last): ResNet-18 21.5 / 25.2 / 26.4, and the
# layers after MobileNetV2's cut 6.5 / 5.5 / 3.9 s per image. Memory-bound networks run whole (fewer than
# _MEMORY_BOUND_MAC multiply-adds per activation element written, as in MobileNets' depthwise / 1x1 blocks)
# get as many copies as fit one core's L2 (_CACHE_BYTES) by their largest activation, at least 1: MobileNetV2
# plain batching 76 / 58 / 53 img/s at 1 / 4 / 16.
CPU_OCCLUSION_MICRO_BATCH = 2 * CPU_MICRO_BATCH
_MEMORY_BOUND_MAC = 40.0
_CACHE_BYTES = 2 * 2**20
DEFAULT_BATCH_SIZE = 64
"""Occluded copies per step when ``batch_size`` is not given, on CPU (on CUDA: :func:`gpu_batch_size`)."""
_GPU_MEMORY_FRACTION = 0.5
_GPU_MAX_BATCH = 4096


def gpu_batch_size(per_copy_bytes: int, free_bytes: int, windows: int, fraction: float = _GPU_MEMORY_FRACTION,
                   cap: int = _GPU_MAX_BATCH) -> int:
    """Occluded copies per step on a GPU: as many as fit ``fraction`` of the device's free memory
    (``free_bytes``) at ``per_copy_bytes`` each (the measured peak of one copy's forward, doubled for the
    caller's own tensors), at most ``windows`` (no point in a batch larger than the work) and ``cap``, at least 1."""
    per = max(1, int(per_copy_bytes)) * 2
    return int(max(1, min(int(windows), int(cap), int(free_bytes * fraction) // per)))


def _measured_gpu_batch(model: nn.Module, x: torch.Tensor, windows: int) -> int:
    """:func:`gpu_batch_size` from the device's free memory (``torch.cuda.mem_get_info``) and the peak memory of
    one forward of one copy of ``x[:1]`` (``torch.cuda.max_memory_allocated`` before / after)."""
    dev = x.device
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        model(x[:1])
    torch.cuda.synchronize(dev)
    per_copy = max(1, torch.cuda.max_memory_allocated(dev) - before)
    free, _total = torch.cuda.mem_get_info(dev)
    n = gpu_batch_size(per_copy, free, windows)
    log.info("occlusion: %d copies per step on %s (%.0f MiB free, %.1f MiB per copy)", n, dev, free / 2**20,
             per_copy / 2**20)
    return n

_POINTWISE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                      nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.ELU, nn.PReLU,
                      nn.Hardtanh, nn.Mish)
_POINTWISE_FUNCS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
                    torch.relu, F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu,
                    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.leaky_relu, F.elu}
_POINTWISE_METHODS = {"relu", "add", "sub", "mul", "div", "clone", "contiguous", "sigmoid", "tanh", "clamp"}
# in-place variants rewritten to their out-of-place twins, so cached activations are never overwritten
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                  operator.itruediv: operator.truediv, torch.relu_: torch.relu}
_INPLACE_METHODS = {"relu_": "relu", "add_": "add", "mul_": "mul", "sub_": "sub", "div_": "div",
                    "clamp_": "clamp", "sigmoid_": "sigmoid", "tanh_": "tanh"}

# One gathered / pasted activation element costs about this many multiply-adds (measured order of magnitude
# on CPU: an index_select moves ~1e9 floats/s while convs run ~1e10 MAC/s on two cores).
_GATHER_COST = 8.0


def window_starts(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Captum's window positions along one axis: ``ceil((size - window) / stride) + 1`` windows, the last one
    clipped at the border. Returns ``[(start, end), ...]``."""
    count = int(math.ceil((size - window) / stride)) + 1
    return [(k * stride, min(k * stride + window, size)) for k in range(count)]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _out_of_place(gm: Any) -> None:
    """Rewrite ``gm``'s in-place ops (``ReLU(inplace=True)``, ``x += y``, ``relu_``) as out-of-place ones."""
    for m in gm.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _INPLACE_FUNCS:
            n.target = _INPLACE_FUNCS[n.target]
        elif n.op == "call_method" and n.target in _INPLACE_METHODS:
            n.target = _INPLACE_METHODS[n.target]
        if n.op in ("call_function", "call_method") and n.kwargs.get("inplace") is True:
            n.kwargs = {**n.kwargs, "inplace": False}
    gm.recompile()


def inference_copy(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """An inference copy of ``model`` for occlusion; ``model`` itself is unchanged.

    Eval-mode models that ``torch.fx`` can trace become a ``GraphModule`` with every Conv -> BatchNorm pair
    folded (``torch.fx.experimental.optimization.fuse``: also the pairs inside ResNet blocks, which are not
    ``Sequential``), in-place ops made out-of-place, on ``device`` in ``channels_last``. Others get
    :func:`tasks.core.forward.prepare_module` (``Sequential`` pairs folded, ``channels_last``). A model in
    training mode is returned as it is (its BatchNorm / Dropout depend on the batch).
    """
    if model.training:
        return model
    dev = device if device is not None else _device_of(model)
    try:
        from torch.fx.experimental.optimization import fuse

        gm = fuse(model)  # deep copy, traced, Conv+BN folded
    except Exception as exc:  # fx raises many error types for untraceable models; extraction's copy instead
        log.info("occlusion: model not traceable with torch.fx (%s); folding Sequential Conv+BN only", str(exc)[:120])
        return prepare_module(model, dev)
    _out_of_place(gm)
    gm = gm.to(dev).eval()
    try:
        gm = gm.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError):
        pass
    return gm


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class _Axis:
    """One node's patch along one axis: map length ``L``, patch length ``P``, patch start per window."""

    L: int
    P: int
    starts: tuple[int, ...]


@dataclass(frozen=True)
class _Op:
    """How an incrementally computed node is evaluated: ``kind`` is ``conv`` / ``maxpool`` / ``avgpool``
    (spatial, one input, kernel ``k`` stride ``s`` padding ``p`` dilation ``d`` per axis) or ``pointwise``."""

    kind: str
    k: tuple[int, int] = (1, 1)
    s: tuple[int, int] = (1, 1)
    p: tuple[int, int] = (0, 0)
    d: tuple[int, int] = (1, 1)


@dataclass
class IncrementalPlan:
    """Occlusion schedule of one model for ``(C, H, W)`` inputs, one window size and stride.

    ``module``: the traced inference copy (:func:`inference_copy`); ``mode``: node name -> ``inc`` (computed on
    a patch), ``full`` (at full size) or ``const`` (independent of the input); ``axes``: per ``inc`` node its
    (rows, cols) patch geometry; ``cut``: the ``inc`` nodes whose patches are pasted into full maps;
    ``est_speedup``: cost-model estimate against plain batching; ``check_error`` / ``check_tol``: the largest
    difference found when a few windows were checked against the full forward, and the allowed one;
    ``source``: :func:`_weights_key` of the model it was made from (a changed model is planned again).
    """

    module: nn.Module
    shape: tuple[int, int, int]
    window: int
    stride: int
    mode: dict[str, str]
    axes: dict[str, tuple[_Axis, _Axis]]
    ops: dict[str, _Op]
    cut: list[str]
    est_speedup: float
    inc_fraction: float = 0.0
    check_error: float = float("nan")
    check_tol: float = float("nan")
    source: tuple = ()
    _tables: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def incremental_nodes(self) -> list[str]:
        """Names of the nodes computed on patches (in graph order)."""
        return [k for k, v in self.mode.items() if v == "inc"]


def _weights_key(model: nn.Module) -> tuple:
    """Identity of ``model``'s current weights: the module and each parameter / buffer with its version
    counter, which every in-place write (``copy_``, ``load_state_dict``, an optimiser step) increments."""
    return (id(model), tuple((id(t), t._version) for t in [*model.parameters(), *model.buffers()]))


def _spatial_op(m: nn.Module) -> _Op | None:
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or (isinstance(m.padding, str) and m.padding != "valid"):
            return None
        pad = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
        return _Op("conv", _pair(m.kernel_size), _pair(m.stride), pad, _pair(m.dilation))
    if isinstance(m, nn.MaxPool2d):
        if m.ceil_mode or m.return_indices:
            return None
        return _Op("maxpool", _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                   _pair(m.padding), _pair(m.dilation))
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
            return None
        return _Op("avgpool", _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size),
                   _pair(m.padding), (1, 1))
    return None


def _classify(gm: Any, n: Any) -> _Op | None:
    """The op of node ``n`` if it can run on a patch, else ``None``."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, _POINTWISE_MODULES):
            return _Op("pointwise")
        return _spatial_op(m)
    if n.op == "call_function":
        if n.target in _POINTWISE_FUNCS:
            return _Op("pointwise")
        if n.target is torch.cat:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            return _Op("pointwise") if dim in (1, -3) else None
        return None
    if n.op == "call_method" and n.target in _POINTWISE_METHODS:
        return _Op("pointwise")
    return None


def _shape(n: Any) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta")
    shp = getattr(meta, "shape", None)
    return tuple(int(v) for v in shp) if shp is not None else None


def _spatially_constant(n: Any) -> bool:
    """True when node ``n``'s value (an input-independent constant) broadcasts over H and W unchanged."""
    shp = _shape(n)
    return shp is None or len(shp) < 2 or shp[-2:] == (1, 1)


def _node_flops(gm: Any, n: Any) -> float:
    shp = _shape(n)
    if shp is None:
        return 0.0
    numel = float(math.prod(shp))
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Conv2d):
            return numel * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.Linear):
            return numel * m.in_features
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            return numel * k[0] * k[1]
    return numel


def _interval_through(iv: list[tuple[int, int]], op: _Op, ax: int, out_len: int) -> list[tuple[int, int]]:
    """Changed output interval per window (inclusive) of a spatial op, from its input's changed intervals."""
    k, s, p, d = op.k[ax], op.s[ax], op.p[ax], op.d[ax]
    out = []
    for a, b in iv:
        lo = max(0, -((-(a + p - (k - 1) * d)) // s))       # ceil((a + p - (k-1) d) / s)
        hi = min(out_len - 1, (b + p) // s)
        out.append((lo, max(hi, lo - 1)))
    return out


def _axis_of(iv: list[tuple[int, int]], L: int) -> _Axis:
    P = max(1, min(L, max(b - a + 1 for a, b in iv)))
    return _Axis(L, P, tuple(min(max(a, 0), L - P) for a, _ in iv))


def _required(op: _Op, out_ax: _Axis, ax: int) -> tuple[list[int], int]:
    """Input region (start per window, length) that an op needs to compute its output patch."""
    if op.kind == "pointwise":
        return list(out_ax.starts), out_ax.P
    k, s, p, d = op.k[ax], op.s[ax], op.p[ax], op.d[ax]
    return [st * s - p for st in out_ax.starts], (out_ax.P - 1) * s + (k - 1) * d + 1


def plan_incremental(model: nn.Module, shape: tuple[int, int, int], window: int, stride: int,
                     device: torch.device | None = None, min_gain: float = 0.15, check: bool = True,
                     module: nn.Module | None = None) -> IncrementalPlan | None:
    """Trace ``model`` and plan incremental occlusion of ``shape = (C, H, W)`` inputs, or return ``None``.

    The cut (which nodes run on patches) minimises the estimated cost per occluded copy: each patch node's
    FLOPs x (patch area / map area) + gathered elements x :data:`_GATHER_COST`, plus the full-size FLOPs of
    the rest. Returns ``None`` (use plain batching) when the model is in training mode or cannot be traced,
    when the best cut saves less than ``min_gain`` of the full cost (``min_gain=-inf``: every node that can
    run on a patch does, for tests), or when ``check`` finds the incremental scores of three windows (corner,
    centre, far corner; a seeded random image) further from the full forward's than
    ``max(1e-4, 1000 eps(dtype)) x max(1, max |logit|)``. ``module``: a ready :func:`inference_copy` to reuse.
    """
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    C, H, W = (int(v) for v in shape)
    if window < 1 or stride < 1 or window > min(H, W):
        raise UsageError(f"window {window} / stride {stride} do not fit a {H}x{W} image")
    if model.training:
        log.info("occlusion: model in training mode; no incremental plan")
        return None
    dev = device if device is not None else _device_of(model)
    gm = module if module is not None else inference_copy(model, dev)
    if not isinstance(gm, fx.GraphModule) or sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        return None  # untraceable, or forward() takes more than the image (fx makes defaults inputs too)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros((1, C, H, W), device=dev).contiguous(
                memory_format=torch.channels_last))
    except Exception as exc:  # shape propagation runs arbitrary model code; any failure means "no plan"
        log.info("occlusion: shape propagation failed (%s); using plain batching", str(exc)[:120])
        return None
    nodes = list(gm.graph.nodes)
    wins = (window_starts(H, window, stride), window_starts(W, window, stride))

    # 1. changed interval per window, per axis, for every node that could run on a patch
    depends: dict[Any, bool] = {}
    cand_iv: dict[Any, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
    cand_op: dict[Any, _Op] = {}
    for n in nodes:
        ins = n.all_input_nodes
        depends[n] = n.op == "placeholder" or any(depends[a] for a in ins)
        shp = _shape(n)
        if n.op == "placeholder":
            if len(cand_iv) == 0 and shp is not None and len(shp) == 4:
                cand_iv[n] = tuple([(r0, r1 - 1) for r0, r1 in w] for w in wins)  # type: ignore[assignment]
            continue
        if not depends[n] or shp is None or len(shp) != 4:
            continue
        op = _classify(gm, n)
        data = [a for a in ins if depends[a]]
        if op is None or not data or any(a not in cand_iv for a in data):
            continue
        if not all(depends[a] or _spatially_constant(a) for a in ins):
            continue
        if op.kind == "pointwise":
            ivs = []
            for ax in range(2):
                per = [cand_iv[a][ax] for a in data]
                if any(_shape(a)[2 + ax] != shp[2 + ax] for a in data):  # type: ignore[index]
                    break
                ivs.append([(min(v[w][0] for v in per), max(v[w][1] for v in per)) for w in range(len(per[0]))])
            if len(ivs) != 2:
                continue
        else:
            if len(data) != 1 or len(ins) != 1:
                continue
            ivs = [_interval_through(cand_iv[data[0]][ax], op, ax, shp[2 + ax]) for ax in range(2)]
        cand_iv[n] = (ivs[0], ivs[1])
        cand_op[n] = op
    axes_all = {n: (_axis_of(iv[0], _shape(n)[2]), _axis_of(iv[1], _shape(n)[3]))  # type: ignore[index]
                for n, iv in cand_iv.items()}
    frac = {n: a[0].P * a[1].P / (a[0].L * a[1].L) for n, a in axes_all.items()}
    flops = {n: _node_flops(gm, n) for n in nodes}
    total = sum(flops.values())

    # 2. choose the cut: nodes with patch fraction <= tau run on patches, tau from the candidates' fractions
    def assign(tau: float) -> tuple[dict[Any, str], float]:
        mode: dict[Any, str] = {}
        cost = 0.0
        for n in nodes:
            if not depends[n]:
                mode[n] = "const"
            elif n.op == "placeholder" and n in axes_all:
                mode[n] = "inc"
            elif n in axes_all and frac[n] <= tau and all(mode.get(a) in ("inc", "const") for a in n.all_input_nodes):
                mode[n] = "inc"
            else:
                mode[n] = "full"
        for n in nodes:
            if mode[n] == "inc":
                if n.op == "placeholder":
                    continue
                ax = axes_all[n]
                cost += flops[n] * frac[n]
                for a in n.all_input_nodes:
                    if mode[a] != "inc":
                        continue
                    if cand_op[n].kind == "pointwise" and axes_all[a] == ax:
                        continue
                    q = [_required(cand_op[n], ax[i], i)[1] for i in range(2)]
                    cost += _GATHER_COST * q[0] * q[1] * (_shape(a)[1])  # type: ignore[index]
                if any(mode[u] == "full" for u in n.users) or any(u.op == "output" for u in n.users):
                    cost += _GATHER_COST * math.prod(_shape(n)[1:])  # type: ignore[index]
            elif mode[n] == "full":
                cost += flops[n]
                if any(mode[a] == "inc" and a.op == "placeholder" for a in n.all_input_nodes):
                    cost += _GATHER_COST * C * H * W
        return mode, cost

    taus = sorted(set(frac.values())) if min_gain != -math.inf else [math.inf]
    best_mode, best_cost = None, math.inf
    for tau in taus:
        mode, cost = assign(tau)
        if cost < best_cost:
            best_mode, best_cost = mode, cost
    if best_mode is None or not any(v == "inc" and n.op != "placeholder" for n, v in best_mode.items()):
        return None
    if min_gain != -math.inf and best_cost > (1.0 - min_gain) * total:
        log.info("occlusion: incremental re-inference would save only %.0f%%; using plain batching",
                 100 * (1 - best_cost / total))
        return None
    inc = [n for n in nodes if best_mode[n] == "inc"]
    cut = [n.name for n in inc if any(best_mode[u] == "full" or u.op == "output" for u in n.users)]
    plan = IncrementalPlan(
        module=gm, shape=(C, H, W), window=window, stride=stride,
        mode={n.name: best_mode[n] for n in nodes if n.op != "output"},
        axes={n.name: axes_all[n] for n in inc}, ops={n.name: cand_op[n] for n in inc if n in cand_op},
        cut=cut, est_speedup=round(total / best_cost, 2), source=_weights_key(model),
        inc_fraction=round(sum(flops[n] for n in inc) / max(total, 1.0), 3))
    if check and not _check_plan(plan, dev):
        return None
    return plan


def _check_plan(plan: IncrementalPlan, device: torch.device) -> bool:
    """Compare three windows' incremental scores with the full forward on a seeded random image; False (and a
    warning) when they differ by more than the tolerance or the incremental run raises."""
    C, H, W = plan.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, C, H, W), generator=gen).to(device)
    bl = torch.zeros_like(x)
    wr, wc = window_starts(H, plan.window, plan.stride), window_starts(W, plan.window, plan.stride)
    items = [(0, 0), (len(wr) // 2, len(wc) // 2), (len(wr) - 1, len(wc) - 1)]
    with torch.inference_mode():
        caches, full_out = _cache_run(plan, x)
        try:
            inc = _chunk_logits(plan, caches, x, bl, wr, wc, items, micro=len(items))
        except RuntimeError as exc:  # e.g. a shape mismatch from a geometry the planner got wrong
            log.warning("occlusion: incremental re-inference failed its check (%s); using plain batching",
                        str(exc)[:200])
            return False
        refs = []
        for i, j in items:  # one at a time: batch-1 forwards reuse the kernels shape propagation built
            xo = x.clone().contiguous(memory_format=torch.channels_last)
            xo[:, :, wr[i][0]:wr[i][1], wc[j][0]:wc[j][1]] = 0
            refs.append(_logits(plan.module(xo)))
        ref = torch.cat(refs)
    eps = torch.finfo(ref.dtype).eps if ref.is_floating_point() else 1e-7
    scale = max(1.0, float(ref.abs().max()), float(full_out.abs().max()))
    plan.check_tol = max(1e-4, 1000 * eps) * scale
    plan.check_error = float((inc.float() - ref.float()).abs().max())
    if not plan.check_error <= plan.check_tol:
        log.warning("occlusion: incremental re-inference differs from the full forward by %.3g (> %.3g); "
                    "using plain batching", plan.check_error, plan.check_tol)
        return False
    return True


# --------------------------------------------------------------------------------------------------- execution

def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UsageError(f"the model must return (N, classes) scores, got {type(out).__name__}"
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    return out


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _call(gm: nn.Module, n: Any, args: tuple, kwargs: dict) -> Any:
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "get_attr":
        return _fetch_attr(gm, n.target)
    raise RuntimeError(f"unexpected fx node {n.op}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B*h*w, C)`` rows (a view for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _cache_run(plan: IncrementalPlan, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward of one unoccluded image ``(1,C,H,W)``: cached activations of ``inc`` nodes (as ``(H*W, C)`` rows)
    and ``const`` node values, plus the logits ``(1, K)``."""
    gm = plan.module
    env: dict[Any, Any] = {}
    caches: dict[str, Any] = {}
    out = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = x.contiguous(memory_format=torch.channels_last)
        elif n.op == "output":
            out = torch.fx.node.map_arg(n.args[0], lambda a: env[a])
            continue
        else:
            mode = plan.mode.get(n.name)
            get = (lambda a: env[a].clone() if plan.mode.get(a.name) == "inc" else env[a]) if mode == "full" \
                else (lambda a: env[a])
            env[n] = _call(gm, n, torch.fx.node.map_arg(n.args, get), torch.fx.node.map_arg(n.kwargs, get))
        mode = plan.mode.get(n.name)
        if mode == "inc":
            caches[n.name] = _flat(env[n].contiguous(memory_format=torch.channels_last))
        elif mode == "const":
            caches[n.name] = env[n]
    return caches, _logits(out)


def _axis_table(plan: IncrementalPlan, key: Any, src: _Axis, q_starts: list[int], Q: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, for the ``Q`` input positions ``q_start + arange(Q)``: the cache index (-1: outside the
    map) and the index in ``src``'s patch (-1: not in the patch). Both ``(windows, Q)`` int64, memoised."""
    if key in plan._tables:
        return plan._tables[key]
    q = torch.tensor(q_starts, dtype=torch.long)[:, None] + torch.arange(Q)[None, :]
    cache = torch.where((q >= 0) & (q < src.L), q, torch.full_like(q, -1))
    rel = q - torch.tensor(src.starts, dtype=torch.long)[:, None]
    patch = torch.where((rel >= 0) & (rel < src.P), rel, torch.full_like(rel, -1))
    plan._tables[key] = (cache.to(device), patch.to(device))
    return plan._tables[key]


def _gather_index(plan: IncrementalPlan, key: Any, src: tuple[_Axis, _Axis], q_starts: tuple[list[int], list[int]],
                  Q: tuple[int, int], rows_w: torch.Tensor, cols_w: torch.Tensor, b0: int, pad_row: int) -> torch.Tensor:
    """Row indices ``(b, Qr, Qc)`` into ``[cache rows (H*W); patch rows (B*Pr*Pc); pad rows]`` for the copies
    ``b0 .. b0 + len(rows_w) - 1`` of the chunk, whose windows are ``(rows_w, cols_w)``."""
    dev = rows_w.device
    rc, rp = _axis_table(plan, (key, 0), src[0], q_starts[0], Q[0], dev)
    cc, cp = _axis_table(plan, (key, 1), src[1], q_starts[1], Q[1], dev)
    rc, rp, cc, cp = rc[rows_w][:, :, None], rp[rows_w][:, :, None], cc[cols_w][:, None, :], cp[cols_w][:, None, :]
    L1, P0, P1 = src[1].L, src[0].P, src[1].P
    b = torch.arange(b0, b0 + rows_w.shape[0], device=dev)[:, None, None]
    idx = torch.where((rp >= 0) & (cp >= 0), src[0].L * L1 + (b * P0 + rp) * P1 + cp, rc * L1 + cc)
    return torch.where((rc < 0) | (cc < 0), torch.full_like(idx, pad_row), idx)


def _chunk_logits(plan: IncrementalPlan, caches: dict[str, Any], x: torch.Tensor, baseline: torch.Tensor,
                  wr: list[tuple[int, int]], wc: list[tuple[int, int]], items: list[tuple[int, int]],
                  micro: int) -> torch.Tensor:
    """Logits ``(B, K)`` of the occluded copies ``items = [(row window, col window), ...]`` of ``x (1,C,H,W)``."""
    gm = plan.module
    dev = x.device
    B = len(items)
    rows_w = torch.tensor([i for i, _ in items], device=dev)
    cols_w = torch.tensor([j for _, j in items], device=dev)
    patches: dict[str, torch.Tensor] = {}
    srcs: dict[str, torch.Tensor] = {}
    nodes = list(gm.graph.nodes)
    last_use = {}
    for k, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a.name] = k

    def source(name: str) -> torch.Tensor:
        """``[cache rows; patch rows; a zero row; a -inf row]`` of an ``inc`` node, built once per chunk."""
        if name not in srcs:
            c = caches[name]
            pad = torch.zeros((2, c.shape[1]), dtype=c.dtype, device=dev)
            pad[1] = -math.inf
            srcs[name] = torch.cat([c, _flat(patches[name]), pad])
        return srcs[name]

    def gather(name: str, key: Any, q_starts: tuple[list[int], list[int]], Q: tuple[int, int], sel: slice,
               neg: bool = False) -> torch.Tensor:
        s = source(name)
        idx = _gather_index(plan, (name, key), plan.axes[name], q_starts, Q, rows_w[sel], cols_w[sel], sel.start or 0,
                            s.shape[0] - (1 if neg else 2))
        rows = s.index_select(0, idx.reshape(-1))
        return rows.view(idx.shape[0], Q[0], Q[1], s.shape[1]).permute(0, 3, 1, 2)

    # 1. nodes on patches, whole chunk at once
    for k, n in enumerate(nodes):
        mode = plan.mode.get(n.name)
        if mode != "inc":
            continue
        ax = plan.axes[n.name]
        if n.op == "placeholder":
            (P0, P1), C = (ax[0].P, ax[1].P), x.shape[1]
            pt = torch.empty((B, C, P0, P1), dtype=x.dtype, device=dev).contiguous(memory_format=torch.channels_last)
            for b, (i, j) in enumerate(items):
                rs, cs = ax[0].starts[i], ax[1].starts[j]
                pt[b] = x[0, :, rs:rs + P0, cs:cs + P1]
                (r0, r1), (c0, c1) = wr[i], wc[j]
                pt[b, :, r0 - rs:r1 - rs, c0 - cs:c1 - cs] = baseline[0, :, r0:r1, c0:c1]
            patches[n.name] = pt
            continue
        op = plan.ops[n.name]
        if op.kind == "pointwise":
            def arg(a: Any, n: Any = n, ax: tuple[_Axis, _Axis] = ax) -> Any:
                m = plan.mode.get(a.name)
                if m == "const":
                    return caches[a.name]
                if plan.axes[a.name] == ax:
                    return patches[a.name]
                return gather(a.name, ("pw", n.name), ([*ax[0].starts], [*ax[1].starts]), (ax[0].P, ax[1].P),
                              slice(None))
            out = _call(gm, n, torch.fx.node.map_arg(n.args, arg), torch.fx.node.map_arg(n.kwargs, arg))
        else:
            a = n.all_input_nodes[0]
            q = [_required(op, ax[i], i) for i in range(2)]
            g = gather(a.name, ("sp", n.name), (q[0][0], q[1][0]), (q[0][1], q[1][1]), slice(None),
                       neg=op.kind == "maxpool")
            if op.kind == "conv":
                m = gm.get_submodule(n.target)
                out = F.conv2d(g, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
            elif op.kind == "maxpool":
                out = F.max_pool2d(g, op.k, op.s, 0, op.d)
            else:
                out = F.avg_pool2d(g, op.k, op.s, 0)
        patches[n.name] = out
        for a in n.all_input_nodes:  # free what no later node reads (cut nodes stay for the full-size part)
            if last_use.get(a.name, -1) <= k and a.name not in plan.cut:
                patches.pop(a.name, None)
                srcs.pop(a.name, None)

    # 2. the rest at full size: spatial nodes in micro-batches, the head (flatten, Linear, ...) per chunk
    for name in plan.cut:
        source(name)
    outside: dict[str, Any] = {}
    for n in nodes:
        mode = plan.mode.get(n.name)
        if mode == "const":
            outside[n.name] = lambda sel, v=caches[n.name]: v
        elif mode == "inc" and any(plan.mode.get(u.name) == "full" or u.op == "output" for u in n.users):
            axa = plan.axes[n.name]
            q0 = ([0] * len(axa[0].starts), [0] * len(axa[1].starts))
            outside[n.name] = lambda sel, name=n.name, q0=q0, Q=(axa[0].L, axa[1].L): gather(name, "full", q0, Q, sel)
    return _run_full(gm, outside, B, micro, {k for k, v in plan.mode.items() if v == "full"})


@dataclass
class _Split:
    """A traced module cut for :func:`_run_full`: ``small`` (generated code: the nodes with 4-D outputs,
    run per micro-batch) reads the given values ``small_in`` and returns the values ``keep``; ``rest`` (the
    head, run once per batch) reads ``keep`` then ``rest_in`` and returns the model's output."""

    small: Any
    small_in: list[str]
    keep: list[str]
    rest: Any
    rest_in: list[str]


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split(gm: Any, given: frozenset[str], run: frozenset[str] | None) -> _Split:
    """Cut ``gm`` (memoised per module): nodes named in ``given`` are inputs, the nodes in ``run`` (default:
    all but inputs) are computed. Needs ``tensor_meta`` (``ShapeProp``) on the nodes."""
    import torch.fx as fx

    memo = _SPLITS.setdefault(gm, {})
    if (given, run) in memo:
        return memo[(given, run)]
    nodes = [n for n in gm.graph.nodes if n.name not in given and n.op not in ("output", "placeholder")
             and (run is None or n.name in run)]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    small: list[Any] = []
    names: set[str] = set()
    for n in nodes:
        shp = _shape(n)
        if shp is not None and len(shp) == 4 and all(a.name in given or a.name in names for a in n.all_input_nodes):
            small.append(n)
            names.add(n.name)
    rest = [n for n in nodes if n.name not in names]
    keep = list(dict.fromkeys(a.name for n in [*rest, out_node] for a in n.all_input_nodes if a.name in names))

    def build(body: list[Any], result: Any) -> tuple[Any, list[str]]:
        g = fx.Graph()
        env: dict[Any, Any] = {}
        inputs: list[str] = []
        for n in body:
            for a in n.all_input_nodes:
                if a not in env and a.name in given:
                    env[a] = g.placeholder(f"in_{a.name}")
                    inputs.append(a.name)
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(result(env))
        return fx.GraphModule(gm, g), inputs

    small_gm, small_in = build(small, lambda env: tuple(env[n] for n in small if n.name in keep))
    kept = [n for n in small if n.name in keep]

    def rest_body(env: dict) -> Any:
        return fx.node.map_arg(out_node.args[0], lambda a: env[a])

    g = fx.Graph()
    env: dict[Any, Any] = {n: g.placeholder(f"keep_{n.name}") for n in kept}
    rest_in: list[str] = []
    for n in [*rest, out_node]:
        for a in n.all_input_nodes:
            if a not in env and a.name in given:
                env[a] = g.placeholder(f"in_{a.name}")
                rest_in.append(a.name)
        if n is not out_node:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(rest_body(env))
    split = _Split(small_gm if small else None, small_in, [n.name for n in kept], fx.GraphModule(gm, g), rest_in)
    memo[(given, run)] = split
    return split


def _run_full(gm: Any, outside: dict[str, Any], B: int, micro: int, run: set[str] | None = None) -> torch.Tensor:
    """Logits ``(B, K)`` of a traced ``gm`` whose node values named in ``outside`` are given (``outside[name]
    (slice of the batch) -> value``). Nodes with a 4-D output run in ``micro``-sized slices of the batch (cache-
    sized conv work); the rest (flatten, Linear, ...) run once on the whole batch, so a large Linear's weights
    are read once per ``B`` copies, not once per micro-batch. ``run``: the nodes to compute (default: all but
    the inputs). Both parts run as fx-generated code (:func:`_split`). Needs ``tensor_meta`` on the nodes."""
    sp = _split(gm, frozenset(outside), frozenset(run) if run is not None else None)
    parts: list[tuple] = []
    if sp.small is not None:
        for s0 in range(0, B, micro):
            sel = slice(s0, min(B, s0 + micro))
            parts.append(sp.small(*[outside[k](sel) for k in sp.small_in]))
    kept = [torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(sp.keep))]
    whole = slice(0, B)
    return _logits(sp.rest(*kept, *[outside[k](whole) for k in sp.rest_in]))


def _occlusion_incremental(plan: IncrementalPlan, x: torch.Tensor, target: int, baseline: torch.Tensor,
                           wr: list[tuple[int, int]], wc: list[tuple[int, int]], batch_size: int,
                           micro: int) -> tuple[torch.Tensor, float]:
    """Score drops ``(len(wr), len(wc)) float32`` and the base score of one image ``x (1,C,H,W)``."""
    caches, full = _cache_run(plan, x)
    base = float(full[0, target])
    items = [(i, j) for i in range(len(wr)) for j in range(len(wc))]
    diffs = torch.empty((len(wr), len(wc)), dtype=torch.float32, device=x.device)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        out = _chunk_logits(plan, caches, x, baseline, wr, wc, chunk, micro)
        d = base - out[:, target].float()
        for b, (i, j) in enumerate(chunk):
            diffs[i, j] = d[b]
    return diffs, base


def _micro_batch(module: nn.Module, device: torch.device, batch_size: int, names: set[str] | None = None) -> int:
    """Copies per forward for the nodes ``names`` of a traced ``module`` (default: all): ``batch_size`` on
    GPU; on CPU :data:`CPU_OCCLUSION_MICRO_BATCH`, or fewer for memory-bound nodes (see the constants)."""
    if device.type != "cpu":
        return batch_size
    if not isinstance(module, torch.fx.GraphModule):
        return CPU_OCCLUSION_MICRO_BATCH
    macs = elems = 0.0
    largest = 0
    for n in module.graph.nodes:
        shp = _shape(n)
        if (names is not None and n.name not in names) or n.op == "placeholder" or shp is None or len(shp) != 4:
            continue
        macs += _node_flops(module, n) / shp[0]
        elems += math.prod(shp[1:])
        largest = max(largest, math.prod(shp[1:]) * 4)
    if elems == 0 or macs / elems >= _MEMORY_BOUND_MAC:
        return CPU_OCCLUSION_MICRO_BATCH
    return max(1, min(CPU_OCCLUSION_MICRO_BATCH, _CACHE_BYTES // max(largest, 1)))


def _placeholder(module: nn.Module) -> str | None:
    """The single input node's name of a traced module that has shape metadata, else ``None``."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    ph = [n for n in module.graph.nodes if n.op == "placeholder"]
    return ph[0].name if len(ph) == 1 and "tensor_meta" in ph[0].meta else None


def _ensure_meta(module: nn.Module, shape: tuple[int, int, int], device: torch.device) -> None:
    """Run ``ShapeProp`` once on a traced module without shape metadata (best effort: without it the module
    simply runs whole in micro-batches)."""
    if not isinstance(module, torch.fx.GraphModule) or _placeholder(module) is not None:
        return
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(module).propagate(torch.zeros((1, *shape), device=device).contiguous(
                memory_format=torch.channels_last))
    except Exception as exc:  # arbitrary model code; without metadata the plain micro-batched forward is used
        log.info("occlusion: shape propagation failed (%s)", str(exc)[:120])


def _batch_scores(module: nn.Module, xb: torch.Tensor, target: torch.Tensor, micro: int) -> torch.Tensor:
    """``module(xb)[b, target[b]]`` ``(B,)``: conv work in ``micro``-sized slices, a traced head per batch."""
    ph = _placeholder(module)
    if ph is None:
        return torch.cat([target_scores(module, xb[m:m + micro], target[m:m + micro])
                          for m in range(0, xb.shape[0], micro)])
    logits = _run_full(module, {ph: lambda sel: xb[sel]}, xb.shape[0], micro)
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def _occlusion_batched(model: nn.Module, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor,
                       baseline: torch.Tensor, wr: list[tuple[int, int]], wc: list[tuple[int, int]],
                       batch_size: int, images: list[int], micro: int) -> dict[int, torch.Tensor]:
    """Score drops for ``images`` by plain batching: ``batch_size`` occluded copies (any images) built at a
    time, run through ``model`` in ``micro``-sized forwards (channels_last)."""
    jobs = [(n, i, j) for n in images for i in range(len(wr)) for j in range(len(wc))]
    out = {n: torch.empty((len(wr), len(wc)), dtype=torch.float32, device=x.device) for n in images}
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        idx = torch.tensor([n for n, _, _ in chunk], device=x.device)
        xb = x[idx].contiguous(memory_format=torch.channels_last)
        for b, (n, i, j) in enumerate(chunk):
            r0, r1 = wr[i]
            c0, c1 = wc[j]
            xb[b, :, r0:r1, c0:c1] = baseline[n if baseline.shape[0] > 1 else 0, :, r0:r1, c0:c1]
        scores = _batch_scores(model, xb, target[idx], micro)
        d = base[idx] - scores.float()
        for b, (n, i, j) in enumerate(chunk):
            out[n][i, j] = d[b]
        del xb
    return out


def occlusion(model: nn.Module, inputs: torch.Tensor, target, window: int = 16, stride: int = 8,
              baseline: float | torch.Tensor = 0.0, batch_size: int | None = None, incremental: bool | str = "auto",
              plan: IncrementalPlan | None = None, info: dict | None = None) -> torch.Tensor:
    """Occlusion attributions ``(N,C,H,W) float32`` (the same value in every channel of a pixel).

    ``window`` / ``stride``: square occluder size and step in pixels (``stride <= window``, as Captum requires);
    ``baseline``: the occluder's value (scalar, or a tensor broadcastable to ``inputs``, e.g. per-channel
    mean); ``batch_size``: occluded copies per step (default: :data:`DEFAULT_BATCH_SIZE` on CPU, where the
    full-size forwards run in micro-batches of :data:`CPU_OCCLUSION_MICRO_BATCH`; on CUDA sized from the
    device's free memory, :func:`gpu_batch_size`); ``incremental``: ``"auto"`` (Krypton-style reuse when the cost model
    says it pays), ``True`` (same, but warn when it cannot), ``"force"`` (every node that can run on a patch
    does, even when it does not pay; for tests), ``False`` (plain batching). ``plan``: a precomputed
    :func:`plan_incremental` result to reuse across calls (same shape, window and stride). ``info``: when a
    dict is given it receives ``path`` (``"incremental"`` or ``"batched"``), ``incremental_images`` and, on
    the incremental path, ``cut``, ``est_speedup`` and ``check_error``.
    Units: attribution = score drop (logit units) averaged over the windows covering a pixel.
    """
    inputs, target = check_inputs(inputs, target)
    N, C, H, W = inputs.shape
    if window < 1 or stride < 1:
        raise UsageError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if window > min(H, W):
        raise UsageError(f"window {window} is larger than the image ({H}x{W}); use a smaller --window")
    if stride > window:
        raise UsageError(f"stride {stride} > window {window} would leave pixels unoccluded; use stride <= window")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size is None:
        n_windows = len(window_starts(H, window, stride)) * len(window_starts(W, window, stride))
        # a model in training mode is not run for the measurement (its BatchNorm statistics would move)
        batch_size = (_measured_gpu_batch(model, inputs.detach(), n_windows)
                      if inputs.device.type == "cuda" and not model.training else DEFAULT_BATCH_SIZE)
    bl = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    try:
        bl = torch.broadcast_to(bl, inputs.shape) if bl.dim() < 4 or bl.shape[0] == N else torch.broadcast_to(bl, (1, C, H, W))
    except RuntimeError:
        raise UsageError(f"baseline of shape {tuple(bl.shape)} does not broadcast to the inputs {tuple(inputs.shape)}") from None
    if plan is not None and (plan.shape != (C, H, W) or plan.window != window or plan.stride != stride):
        log.warning("occlusion: the given plan is for %s window %d stride %d, not %s window %d stride %d; "
                    "planning again", plan.shape, plan.window, plan.stride, (C, H, W), window, stride)
        plan = None
    if plan is not None and plan.source != _weights_key(model):
        log.warning("occlusion: the given plan was made from another model or from these weights before they "
                    "changed; planning again")
        plan = None
    wr, wc = window_starts(H, window, stride), window_starts(W, window, stride)
    x = inputs.detach()
    with torch.inference_mode():
        if incremental and plan is None:
            module = inference_copy(model, x.device)
            plan = plan_incremental(model, (C, H, W), window, stride, x.device,
                                    min_gain=-math.inf if incremental == "force" else 0.15, module=module)
            if plan is None and incremental is True:
                log.warning("occlusion: no profitable incremental cut for this model; using plain batching")
        else:
            module = plan.module if plan is not None else inference_copy(model, x.device)
        diffs: dict[int, torch.Tensor] = {}
        base = torch.empty(N, dtype=torch.float32, device=x.device)
        if incremental and plan is not None:
            micro = _micro_batch(plan.module, x.device, batch_size, {k for k, v in plan.mode.items() if v == "full"})
            for n in range(N):
                diffs[n], base[n] = _occlusion_incremental(plan, x[n:n + 1], int(target[n]),
                                                           bl[n:n + 1] if bl.shape[0] > 1 else bl, wr, wc,
                                                           batch_size, micro)
        todo = [n for n in range(N) if n not in diffs]
        if todo:
            _ensure_meta(module, (C, H, W), x.device)
            micro = _micro_batch(module, x.device, batch_size)
            base[todo] = target_scores(module, x[todo].contiguous(memory_format=torch.channels_last),
                                       target[todo]).float()
            diffs.update(_occlusion_batched(module, x, target, base, bl, wr, wc, batch_size, todo, micro))
        # accumulate: mean over covering windows (separable indicator matrices)
        mr = torch.zeros((len(wr), H), dtype=torch.float32, device=x.device)
        mc = torch.zeros((len(wc), W), dtype=torch.float32, device=x.device)
        for k, (a, b) in enumerate(wr):
            mr[k, a:b] = 1
        for k, (a, b) in enumerate(wc):
            mc[k, a:b] = 1
        d = torch.stack([diffs[n] for n in range(N)])
        num = torch.einsum("rh,nrc,cw->nhw", mr, d, mc)
        den = mr.sum(0)[:, None] * mc.sum(0)[None, :]
        res = (num / den).unsqueeze(1).expand(N, C, H, W)
    if info is not None:
        info.update(path="incremental" if not todo else "batched", incremental_images=N - len(todo))
        if plan is not None and not todo:
            info.update(cut=list(plan.cut), est_speedup=plan.est_speedup, check_error=plan.check_error)
    return res.clone()
