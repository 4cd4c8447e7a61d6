"""Occlusion sensitivity (Zeiler & Fergus 2014), batched and with incremental re-inference (Krypton).

``occlusion`` returns exactly what ``captum.attr.Occlusion(model).attribute(inputs,
sliding_window_shapes=(C, window, window), strides=(C, stride, stride), baselines=baseline, target=target)``
returns: for every pixel, the mean over the windows covering it of ``score(x) - score(x occluded)``.

How it is faster than Captum (which runs one occluded copy per forward pass by default):

1. Many occluded copies per forward pass (``batch_size``).
2. Incremental re-inference (Nakandala et al., "Krypton", SIGMOD 2019). The model is traced with
   ``torch.fx`` and cut after an early block whose output is the only value the rest of the network reads
   (a "cut"). The prefix up to the cut is computed once on the unoccluded image. An occlusion window only
   changes the prefix output inside the window's receptive-field footprint, so for each occluded copy the
   prefix is run on a small, stride-aligned *crop* of the input around the window, and the exactly-computed
   part of the crop's output is pasted into a copy of the cached prefix output; only the rest of the network
   runs at full size. Exactness: a prefix output position is taken from a crop only when its whole input
   receptive range lies inside the crop (or the crop shares the image border there, where both runs see the
   same padding), so pasted values equal the full computation up to float rounding. The cut is chosen by a
   FLOP cost model; models that cannot be traced, or where no cut pays off, use plain batching.

Memory: O(batch_size x (input + prefix output + activations of one forward)); the cached prefix output is
one image's worth. Nothing grows with the number of images.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import UsageError
from tasks.attribution.common import check_inputs, target_scores

__all__ = ["occlusion", "window_starts", "IncrementalPlan", "plan_incremental"]

log = logging.getLogger(__name__)

_POINTWISE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                      nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.ELU, nn.PReLU)
_POINTWISE_FUNCS = {operator.add, operator.iadd, operator.mul, torch.add, torch.relu, torch.relu_, F.relu,
                    F.relu6, F.hardswish, F.silu, torch.sigmoid, torch.tanh, F.dropout}
_POINTWISE_METHODS = {"relu", "relu_", "add", "add_", "clone", "contiguous", "sigmoid", "tanh", "mul", "mul_"}

Geom = tuple[tuple[int, int, int], tuple[int, int, int]]  # per axis (stride S, lo, hi): out o <- in [o*S+lo, o*S+hi]


def window_starts(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Captum's window positions along one axis: ``ceil((size - window) / stride) + 1`` windows, the last one
    clipped at the border. Returns ``[(start, end), ...]``."""
    count = int(math.ceil((size - window) / stride)) + 1
    return [(k * stride, min(k * stride + window, size)) for k in range(count)]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _layer_geom(m: nn.Module, g: Geom) -> Geom | None:
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return None
        k, s, p, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation)
    elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if m.ceil_mode:
            return None
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        p = _pair(m.padding)
        d = _pair(getattr(m, "dilation", 1))
    elif isinstance(m, _POINTWISE_MODULES):
        return g
    else:
        return None
    out = []
    for ax in range(2):
        S, lo, hi = g[ax]
        out.append((S * s[ax], lo - p[ax] * S, hi + ((k[ax] - 1) * d[ax] - p[ax]) * S))
    return (out[0], out[1])


def _merge(geoms: list[Geom]) -> Geom | None:
    if not geoms:
        return None
    out = []
    for ax in range(2):
        strides = {g[ax][0] for g in geoms}
        if len(strides) != 1:
            return None
        out.append((strides.pop(), min(g[ax][1] for g in geoms), max(g[ax][2] for g in geoms)))
    return (out[0], out[1])


@dataclass
class IncrementalPlan:
    """A traced model cut in two: ``prefix`` (input -> cut activation) and ``rest`` (cut activation -> scores)."""

    prefix: nn.Module
    rest: nn.Module
    cut: str
    geom: Geom
    out_hw: tuple[int, int]
    est_speedup: float


def _node_flops(gm: Any, node: Any) -> float:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0.0
    numel = float(math.prod(meta.shape))
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            return numel * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.Linear):
            return numel * m.in_features
    return numel


def plan_incremental(model: nn.Module, shape: tuple[int, int, int], window: int, stride: int,
                     device: torch.device | None = None, min_gain: float = 0.15) -> IncrementalPlan | None:
    """Trace ``model`` and choose the cheapest cut for occlusion of ``shape = (C, H, W)`` inputs, or ``None``.

    Estimated cost per occluded copy = prefix FLOPs x (crop area / image area) + rest FLOPs + paste cost.
    Returns ``None`` (use plain batching) when tracing fails or no cut saves at least ``min_gain`` (a
    fraction of the full cost; ``min_gain=-inf`` takes the cheapest cut even if it costs more, for tests).
    """
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
        ShapeProp(gm).propagate(torch.zeros((1, *shape), device=device))
    except Exception as exc:  # fx raises many error types for untraceable models; fall back to batching
        log.info("occlusion: model not traceable with torch.fx (%s); using plain batching", str(exc)[:120])
        return None
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    geom: dict[Any, Geom | None] = {}
    for n in nodes:
        if n.op == "placeholder":
            geom[n] = ((1, 0, 0), (1, 0, 0)) if not geom else None
            continue
        args = [a for a in n.all_input_nodes]
        gs = [geom.get(a) for a in args]
        if not args or any(g is None for g in gs):
            geom[n] = None
            continue
        if n.op == "call_module":
            geom[n] = _layer_geom(gm.get_submodule(n.target), gs[0]) if len(args) == 1 else None
        elif n.op == "call_function" and n.target in _POINTWISE_FUNCS:
            geom[n] = _merge(gs)
        elif n.op == "call_function" and n.target is torch.cat and (n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) == 1):
            geom[n] = _merge(gs)
        elif n.op == "call_method" and n.target in _POINTWISE_METHODS:
            geom[n] = _merge(gs)
        else:
            geom[n] = None
    flops = [_node_flops(gm, n) for n in nodes]
    total = sum(flops)
    H, W = shape[1], shape[2]
    best: tuple[float, int] | None = None
    max_user = -1
    for i, n in enumerate(nodes):
        if geom.get(n) is None:
            break
        max_user_before = max_user
        max_user = max([max_user] + [index[u] for u in n.users])
        meta = n.meta.get("tensor_meta")
        if n.op == "placeholder" or meta is None or len(getattr(meta, "shape", ())) != 4:
            continue
        if max_user_before > i:  # an earlier node is read after the cut
            continue
        g = geom[n]
        lens = []
        for ax, size in ((0, H), (1, W)):
            S, lo, hi = g[ax]
            lens.append(min(size, window + (hi - lo) + 2 * S))
        frac = lens[0] * lens[1] / (H * W)
        prefix = sum(flops[: i + 1])
        cost = prefix * frac + (total - prefix) + 20.0 * float(math.prod(meta.shape))
        if best is None or cost < best[0]:
            best = (cost, i)
    if best is None or best[0] > (1.0 - min_gain) * total:
        return None
    cut_i = best[1]
    cut = nodes[cut_i]
    # prefix graph: input -> cut
    pg = fx.Graph()
    env: dict[Any, Any] = {}
    for n in nodes[: cut_i + 1]:
        env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(env[cut])
    # rest graph: cut activation -> output
    rg = fx.Graph()
    renv: dict[Any, Any] = {cut: rg.placeholder("cut_activation")}
    for n in nodes[cut_i + 1:]:
        renv[n] = rg.node_copy(n, lambda a: renv[a])
    prefix_gm, rest_gm = fx.GraphModule(gm, pg), fx.GraphModule(gm, rg)
    shp = cut.meta["tensor_meta"].shape
    return IncrementalPlan(prefix_gm.eval(), rest_gm.eval(), cut.name, geom[cut], (int(shp[2]), int(shp[3])),
                           round(total / best[0], 2))


@dataclass(frozen=True)
class _AxisCrop:
    x0: int          # crop start (input pixels, a multiple of S)
    p0: int          # first pasted output, relative to the crop run's output
    o0: int          # absolute prefix-output index of p0


def _axis_crops(size: int, out_len: int, g: tuple[int, int, int],
                wins: list[tuple[int, int]]) -> tuple[int, int, list[_AxisCrop]] | None:
    """One crop length and one paste length for every window along an axis (so all copies batch together).

    Returns ``(crop_len, paste_len, crops)`` or ``None`` when the crop would be the whole axis anyway.
    """
    S, lo, hi = g
    need = []
    for r0, r1 in wins:
        oa = max(0, -((hi - r0) // S))                    # first changed output: ceil((r0 - hi) / S)
        ob = min(out_len - 1, (r1 - 1 - lo) // S)         # last changed output
        need.append((oa, ob, (max(0, oa * S + lo) // S) * S, min(size, ob * S + hi + 1)))
    length = max(x1 - x0 for _, _, x0, x1 in need)
    length += (size - length) % S                          # so that size - length is a multiple of S
    if length >= size:
        return None
    spans = []
    for oa, ob, x0, _ in need:
        x0 = min(x0, size - length)                        # stays aligned; the right border is then the image's
        x1 = x0 + length
        lo_o = x0 // S if x0 == 0 else max(x0 // S, -((lo - x0) // S))    # first exact output
        hi_o = out_len if x1 == size else min(out_len, (x1 - 1 - hi) // S + 1)
        if not (lo_o <= oa and ob < hi_o):
            return None
        spans.append((oa, ob, x0, lo_o, hi_o))
    paste = min(hi - lo for _, _, _, lo, hi in spans)
    if any(ob - oa + 1 > paste for oa, ob, *_ in spans):
        return None
    crops = []
    for oa, ob, x0, lo_o, hi_o in spans:
        start = min(max(lo_o, ob + 1 - paste), hi_o - paste)
        start = max(start, lo_o)
        crops.append(_AxisCrop(x0, start - x0 // S, start))
    return length, paste, crops


def _occlusion_incremental(plan: IncrementalPlan, x: torch.Tensor, target: int, base: float,
                           baseline: torch.Tensor, wr: list[tuple[int, int]], wc: list[tuple[int, int]],
                           batch_size: int) -> torch.Tensor | None:
    """Diffs ``(len(wr), len(wc))`` for one image ``x (1,C,H,W)``, or None if the geometry check fails."""
    _, C, H, W = x.shape
    ra = _axis_crops(H, plan.out_hw[0], plan.geom[0], wr)
    ca = _axis_crops(W, plan.out_hw[1], plan.geom[1], wc)
    if ra is None or ca is None:
        return None
    (Lr, Pr, rows), (Lc, Pc, cols) = ra, ca
    cached = plan.prefix(x)
    if tuple(cached.shape[2:]) != plan.out_hw:
        return None
    items = [(i, j) for i in range(len(wr)) for j in range(len(wc))]
    diffs = torch.empty((len(wr), len(wc)), dtype=torch.float32, device=x.device)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        B = len(chunk)
        crops = torch.empty((B, C, Lr, Lc), dtype=x.dtype, device=x.device)
        for b, (i, j) in enumerate(chunk):
            rc, cc = rows[i], cols[j]
            crops[b] = x[0, :, rc.x0:rc.x0 + Lr, cc.x0:cc.x0 + Lc]
            r0, r1 = wr[i]
            c0, c1 = wc[j]
            crops[b, :, r0 - rc.x0:r1 - rc.x0, c0 - cc.x0:c1 - cc.x0] = baseline[0, :, r0:r1, c0:c1]
        part = plan.prefix(crops)
        act = cached.expand(B, *cached.shape[1:]).clone()
        for b, (i, j) in enumerate(chunk):
            rc, cc = rows[i], cols[j]
            if rc.p0 + Pr > part.shape[2] or cc.p0 + Pc > part.shape[3]:
                return None
            act[b, :, rc.o0:rc.o0 + Pr, cc.o0:cc.o0 + Pc] = part[b, :, rc.p0:rc.p0 + Pr, cc.p0:cc.p0 + Pc]
        del part, crops
        out = plan.rest(act)
        if isinstance(out, (tuple, list)):
            out = out[0]
        d = base - out[:, target].float()
        for b, (i, j) in enumerate(chunk):
            diffs[i, j] = d[b]
        del act, out
    return diffs


def _occlusion_batched(model: nn.Module, x: torch.Tensor, target: torch.Tensor, base: torch.Tensor,
                       baseline: torch.Tensor, wr: list[tuple[int, int]], wc: list[tuple[int, int]],
                       batch_size: int, images: list[int]) -> dict[int, torch.Tensor]:
    """Diffs for ``images`` by plain batching: ``batch_size`` occluded copies (any images) per forward."""
    jobs = [(n, i, j) for n in images for i in range(len(wr)) for j in range(len(wc))]
    out = {n: torch.empty((len(wr), len(wc)), dtype=torch.float32, device=x.device) for n in images}
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        idx = torch.tensor([n for n, _, _ in chunk], device=x.device)
        xb = x[idx].clone()
        for b, (n, i, j) in enumerate(chunk):
            r0, r1 = wr[i]
            c0, c1 = wc[j]
            xb[b, :, r0:r1, c0:c1] = baseline[n if baseline.shape[0] > 1 else 0, :, r0:r1, c0:c1]
        scores = target_scores(model, xb, target[idx])
        d = base[idx] - scores
        for b, (n, i, j) in enumerate(chunk):
            out[n][i, j] = d[b]
        del xb
    return out


def occlusion(model: nn.Module, inputs: torch.Tensor, target, window: int = 16, stride: int = 8,
              baseline: float | torch.Tensor = 0.0, batch_size: int = 64, incremental: bool | str = "auto",
              plan: IncrementalPlan | None = None) -> torch.Tensor:
    """Occlusion attributions ``(N,C,H,W) float32`` (the same value in every channel of a pixel).

    ``window`` / ``stride``: square occluder size and step in pixels (``stride <= window``, as Captum requires);
    ``baseline``: the occluder's value (scalar, or a tensor broadcastable to ``inputs``, e.g. per-channel
    mean); ``batch_size``: occluded copies per forward pass; ``incremental``: ``"auto"`` (Krypton-style reuse
    when the model can be cut profitably), ``True`` (same, but warn when it cannot), ``"force"`` (use the
    cheapest cut even when it does not pay off; for tests), ``False`` (plain batching). ``plan``: a precomputed
    :func:`plan_incremental` result to reuse across calls.
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
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    bl = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    try:
        bl = torch.broadcast_to(bl, inputs.shape) if bl.dim() < 4 or bl.shape[0] == N else torch.broadcast_to(bl, (1, C, H, W))
    except RuntimeError:
        raise UsageError(f"baseline of shape {tuple(bl.shape)} does not broadcast to the inputs {tuple(inputs.shape)}") from None
    wr, wc = window_starts(H, window, stride), window_starts(W, window, stride)
    x = inputs.detach()
    with torch.no_grad():
        base = target_scores(model, x, target).float()
        diffs: dict[int, torch.Tensor] = {}
        if incremental and plan is None:
            plan = plan_incremental(model, (C, H, W), window, stride, x.device,
                                    min_gain=-math.inf if incremental == "force" else 0.15)
            if plan is None and incremental is True:
                log.warning("occlusion: no profitable incremental cut for this model; using plain batching")
        if incremental and plan is not None:
            for n in range(N):
                d = _occlusion_incremental(plan, x[n:n + 1], int(target[n]), float(base[n]),
                                           bl[n:n + 1] if bl.shape[0] > 1 else bl, wr, wc, batch_size)
                if d is None:
                    log.warning("occlusion: incremental geometry check failed; falling back to plain batching")
                    break
                diffs[n] = d
        todo = [n for n in range(N) if n not in diffs]
        if todo:
            diffs.update(_occlusion_batched(model, x, target, base, bl, wr, wc, batch_size, todo))
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
    return (num / den).unsqueeze(1).expand(N, C, H, W).contiguous()
