"""Class and channel visualisation by gradient ascent (Simonyan et al. 2014; Olah et al., "Feature
Visualization", Distill 2017; CS231n):

    I* = argmax_I  E_T[ S(T(I)) ] − λ R(I)

``S`` is a class's unnormalised score (logit) or a channel's mean activation at a layer (:func:`channel_visualisation`).
Two parameterisations (``ClassVizConfig.param``):

- ``fourier`` (default; :mod:`tasks.neurons.param`): the image is a sigmoid of a colour-decorrelated,
  1/f-scaled Fourier spectrum, optimised with Adam (``lr`` is Adam's step on the spectrum), and each step the
  model sees ``batch`` copies randomly padded, jittered (``jitter`` px), scaled (±``scale`` fraction) and
  rotated (±``degrees``) — transformation robustness. The result is an image the model still classifies as the
  class after a few pixels of shift, a few percent of zoom and a few degrees of rotation, instead of a
  high-frequency pattern that works only on its exact pixel grid. ``l2`` weighs the mean squared normalised
  pixel value; blur and clipping are not used (the spectrum scaling and the transforms replace them).
- ``pixel`` (the seeds' method): the image is optimised directly in the model's normalised input space from
  zeros (the dataset mean) or small noise, with the seeds' regularisers — L2 decay ``λ‖I‖²`` (weight decay on
  the step), random roll by up to ``jitter`` pixels, periodic Gaussian blur (every ``blur_every`` steps,
  ``blur_sigma`` px), clipping of small values (``clip_value_pct`` percentile of pixel norms set to 0) and of
  small contributions (``clip_grad_pct`` percentile of ``|x · grad|``), and a clamp to what the normalisation
  can produce from [0, 1]; the step is normalised (``lr · g / mean|g|``, in normalised-input units).

:func:`robust_top1` measures the claim: the share of ``n`` random small transforms under which the target is
still the model's top-1 class; :func:`tasks.neurons.param.high_frequency_share` the noise (both stored per class
in the artefact; the robustness is shown in the report). Measured with the embedded MobileNetV2 at 128 px, 100
steps (goldfish, flamingo): Fourier 8 of 8 transforms top-1, 11 % of the power above 0.25 cycles/px; the pixel
method also stays top-1 on that model but keeps 56–66 % of its power there (high-frequency noise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.neurons.common import (
    Source,
    forward_to,
    gaussian_blur,
    jitter_roll,
    label_strip,
    open_source,
    publish,
    resolve_class,
    tile_grid,
    to_uint8,
    write_png,
    write_table,
)
from tasks.neurons.param import FourierImage, PixelImage, TransformConfig, high_frequency_share, random_transform

__all__ = ["ClassVizConfig", "optimise_image", "class_visualisation", "channel_visualisation", "robust_top1",
           "CHECK_TRANSFORMS", "run_class_viz", "run_channel_viz"]

#: the small random transforms :func:`robust_top1` checks under (shift ≤ 6 px, zoom ±8 %, rotation ±8°)
CHECK_TRANSFORMS = TransformConfig(pad=4, jitter=6, scale_range=(0.92, 1.08), degrees=8.0, jitter_after=0)

# pixel-space objective: (N, 3, H, W) float32 in [0, 1] -> (N,) scores to maximise, plus the logits (or None)
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class ClassVizConfig:
    """Parameters of both parameterisations (see the module docstring); sizes in pixels, angles in degrees."""

    size: int = 224
    steps: int = 100
    lr: float = 0.05
    l2: float = 1e-3
    jitter: int = 8
    blur_every: int = 10
    blur_sigma: float = 0.5
    clip_value_pct: float = 0.0
    clip_grad_pct: float = 0.0
    init: str = "zero"  # pixel: zero | noise
    seed: int = 0
    param: str = "fourier"  # fourier | pixel
    decorrelate: bool = True
    decay_power: float = 1.0
    pad: int = 12
    scale: float = 0.1  # random zoom in [1 - scale, 1 + scale]
    degrees: float = 10.0
    batch: int = 1  # transformed copies per step (fourier)
    check: int = 8  # random transforms robust_top1 checks the result under (0 = skip)

    def validate(self) -> None:
        if self.param not in ("fourier", "pixel"):
            raise UsageError(f"param must be 'fourier' or 'pixel', got {self.param!r}")
        if self.init not in ("zero", "noise"):
            raise UsageError(f"init must be 'zero' or 'noise', got {self.init!r}")
        if self.steps < 1 or self.size < 8:
            raise UsageError("steps must be >= 1 and size >= 8 pixels")
        if self.lr <= 0 or self.batch < 1 or self.check < 0:
            raise UsageError("lr must be > 0, batch >= 1 and check >= 0")
        if not 0 <= self.scale < 1 or self.degrees < 0 or self.pad < 0 or self.jitter < 0:
            raise UsageError("scale must be in [0, 1); degrees, pad and jitter >= 0")
        for name in ("clip_value_pct", "clip_grad_pct"):
            if not 0 <= getattr(self, name) < 100:
                raise UsageError(f"{name} is a percentile in [0, 100), got {getattr(self, name)}")

    def transforms(self) -> TransformConfig:
        """The robustness transforms for this image size (pad and jitter capped at an eighth of the side)."""
        cap = max(1, self.size // 8)
        return TransformConfig(pad=min(self.pad, cap), jitter=min(self.jitter, cap),
                               scale_range=(1 - self.scale, 1 + self.scale), degrees=self.degrees,
                               jitter_after=min(max(self.jitter // 2, 0), cap))


def _norm(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1))


def optimise_image(objective: Objective, mean: Sequence[float], std: Sequence[float], cfg: ClassVizConfig,
                   device: torch.device, target: int | None = None) -> tuple[torch.Tensor, pd.DataFrame]:
    """Maximise ``objective`` over an image with the Fourier parameterisation + transformation robustness.

    ``objective(x)`` takes pixel-space ``(B, 3, H, W) in [0, 1]`` and returns ``(scores (B,), logits or None)``;
    ``target`` (a class index) adds the softmax probability to the history. Returns ``(image (3, size, size)
    float32 in [0, 1], history)`` with one row per step (step, score, prob, l2; score and prob are the means over
    the step's transformed copies) plus a last row for the untransformed result.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    m, s = _norm(mean, std, device)
    if cfg.param == "fourier":
        img = FourierImage(cfg.size, cfg.size, 1, decay_power=cfg.decay_power, decorrelate=cfg.decorrelate, generator=g)
    else:
        img = PixelImage(cfg.size, cfg.size, 1, decorrelate=cfg.decorrelate, generator=g)
    img = img.to(device)
    opt = torch.optim.Adam(img.parameters(), lr=cfg.lr)
    tcfg = cfg.transforms()
    hist = []

    def record(step: int, score: torch.Tensor, logits: torch.Tensor | None, x: torch.Tensor) -> None:
        prob = float("nan")
        if logits is not None and target is not None:
            prob = float(torch.softmax(logits.detach().float(), 1)[:, target].mean())
        hist.append({"step": step, "score": float(score.detach().mean()), "prob": prob,
                     "l2": float((((x.detach() - m) / s) ** 2).mean())})

    with torch.enable_grad():
        for step in range(cfg.steps):
            x = img()
            xt = torch.cat([random_transform(x, tcfg, g) for _ in range(cfg.batch)])
            score, logits = objective(xt)
            loss = -score.mean() + cfg.l2 * (((x - m) / s) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record(step, score, logits, x)
    with torch.no_grad():
        x = img()
        score, logits = objective(x)
        record(cfg.steps, score, logits, x)
    return x[0].detach().clamp(0, 1).cpu(), pd.DataFrame(hist)


def _pixel_ascent(model: torch.nn.Module, target: int, mean: Sequence[float], std: Sequence[float],
                  cfg: ClassVizConfig, device: torch.device) -> tuple[torch.Tensor, pd.DataFrame]:
    """The seeds' method (``param="pixel"``): ascent on the normalised image with L2 / roll / blur / clipping."""
    g = torch.Generator().manual_seed(cfg.seed)
    m, s = _norm(mean, std, device)
    lo, hi = -m / s, (1 - m) / s
    if cfg.init == "zero":
        x = torch.zeros(1, 3, cfg.size, cfg.size, device=device)
    else:
        x = (0.1 * torch.randn(1, 3, cfg.size, cfg.size, generator=g)).to(device)
    hist = []
    for step in range(cfg.steps):
        xj, (dy, dx) = jitter_roll(x, cfg.jitter, g)
        xj = xj.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(xj)
            score = out[0, target]
            obj = score - cfg.l2 * (xj ** 2).sum()
            grad, = torch.autograd.grad(obj, xj)
        hist.append({"step": step, "score": float(score.detach()), "prob": float(torch.softmax(out[0].detach().float(), 0)[target]),
                     "l2": float((x ** 2).sum())})
        with torch.no_grad():
            grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
            x = x + cfg.lr * grad / grad.abs().mean().clamp_min(1e-12)
            x = torch.max(torch.min(x, hi), lo)
            if cfg.blur_every and (step + 1) % cfg.blur_every == 0 and step + 1 < cfg.steps:
                x = gaussian_blur(x, cfg.blur_sigma)
            if cfg.clip_value_pct > 0:
                norms = x.norm(dim=1, keepdim=True)
                x = torch.where(norms < torch.quantile(norms.flatten(), cfg.clip_value_pct / 100), torch.zeros_like(x), x)
            if cfg.clip_grad_pct > 0:
                contrib = (x * grad).abs().sum(dim=1, keepdim=True)
                x = torch.where(contrib < torch.quantile(contrib.flatten(), cfg.clip_grad_pct / 100), torch.zeros_like(x), x)
    with torch.no_grad():
        out = model(x)
    hist.append({"step": cfg.steps, "score": float(out[0, target]), "prob": float(torch.softmax(out[0].float(), 0)[target]),
                 "l2": float((x ** 2).sum())})
    return (x * s + m).clamp(0, 1)[0].cpu(), pd.DataFrame(hist)


def class_visualisation(model: torch.nn.Module, target: int, mean: Sequence[float], std: Sequence[float],
                        cfg: ClassVizConfig = ClassVizConfig(), device: torch.device | None = None
                        ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Optimise an image for class ``target`` of ``model`` (raw module taking normalised input, eval mode,
    parameters frozen) with ``cfg.param``'s method.

    Returns ``(image (3, size, size) float32 in [0,1], history)``; history has one row per step (step, score =
    the class logit, prob = its softmax probability, l2) and a last row for the result as returned.
    """
    cfg.validate()
    device = device or next(model.parameters()).device
    if cfg.param == "pixel":
        return _pixel_ascent(model, target, mean, std, cfg, device)
    m, s = _norm(mean, std, device)

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model((x - m) / s)
        return out[:, target], out

    return optimise_image(objective, mean, std, cfg, device, target)


def channel_visualisation(model: torch.nn.Module, layer: str, channel: int, mean: Sequence[float],
                          std: Sequence[float], cfg: ClassVizConfig = ClassVizConfig(),
                          device: torch.device | None = None) -> tuple[torch.Tensor, pd.DataFrame]:
    """Optimise an image for the mean activation of ``channel`` at ``layer`` (a module name of ``model``) with
    the Fourier parameterisation + transformation robustness (whatever ``cfg.param`` says: the pixel method is
    the class visualisation's). The forward pass stops at the layer. Returns ``(image (3, size, size) float32
    in [0, 1], history)``; ``score`` is the channel's mean activation, ``prob`` is NaN."""
    from dataclasses import replace

    cfg = replace(cfg, param="fourier")
    cfg.validate()
    device = device or next(model.parameters()).device
    m, s = _norm(mean, std, device)

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        act = forward_to(model, (x - m) / s, layer, grad=True)
        if act.dim() < 2 or not 0 <= channel < act.shape[1]:
            raise UsageError(f"channel {channel} is out of range for layer {layer!r} (output {tuple(act.shape)})")
        a = act[:, channel]
        return a.reshape(a.shape[0], -1).mean(dim=1), None

    return optimise_image(objective, mean, std, cfg, device)


def robust_top1(model: torch.nn.Module, image: torch.Tensor, target: int, mean: Sequence[float], std: Sequence[float],
                n: int = 8, transforms: TransformConfig = CHECK_TRANSFORMS, seed: int = 1234) -> dict[str, Any]:
    """How well ``image (3, H, W) in [0, 1]`` keeps class ``target`` as ``model``'s top-1 under ``n`` random
    small transforms (default :data:`CHECK_TRANSFORMS`). Returns ``{"top1": bool on the image itself, "hits":
    how many transformed copies have top-1 == target, "n", "min_prob": the lowest target probability among
    them}``."""
    device = next(model.parameters()).device
    m, s = _norm(mean, std, device)
    g = torch.Generator().manual_seed(seed)
    x = image.to(device).unsqueeze(0)
    with torch.no_grad():
        top1 = int(model((x - m) / s).argmax(1)) == int(target)
        hits, probs = 0, []
        for _ in range(n):
            p = torch.softmax(model((random_transform(x, transforms, g) - m) / s).float(), 1)[0]
            hits += int(int(p.argmax()) == int(target))
            probs.append(float(p[target]))
    return {"top1": bool(top1), "hits": int(hits), "n": int(n), "min_prob": min(probs) if probs else float("nan")}


def run_class_viz(store: str | Path, targets: Sequence[int | str], features_id: str | None = None,
                  model: str | None = None, weights: str | None = None, cfg: ClassVizConfig = ClassVizConfig(),
                  device: str = "auto", source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Publish one visualisation per target class.

    Files: ``class-<index>.png`` per class, ``class_viz.png`` (all, captioned), ``class_viz.parquet`` with the
    optimisation history: class_index, class_name, step, score, prob, l2. The manifest's ``classes`` records per
    class the start / end score, the final probability and ``robust`` (:func:`robust_top1`).
    """
    src = source or open_source(store, features_id, model, weights)
    mod = src.lm.module
    dev = pick_device(device)
    n_cls = _num_classes(mod)
    resolved = [resolve_class(t, src.categories, n_cls) for t in targets]
    if not resolved:
        raise UsageError("pass at least one target class (--target INDEX|NAME)")
    cfg.validate()
    params = {"targets": [i for i, _ in resolved], **asdict(cfg)}

    def build(adir: Path):
        for p in mod.parameters():
            p.requires_grad_(False)
        net = mod.eval().to(dev)
        files, tables, tiles, summary = [], [], [], []
        for idx, name in resolved:
            img, hist = class_visualisation(net, idx, src.preprocess.mean, src.preprocess.std, cfg, dev)
            robust = robust_top1(net, img, idx, src.preprocess.mean, src.preprocess.std, cfg.check) if cfg.check else None
            hist.insert(0, "class_name", name)
            hist.insert(0, "class_index", idx)
            tables.append(hist)
            arr = to_uint8(img)
            files.append(write_png(adir, f"class-{idx}.png", arr, class_index=idx, class_name=name))
            tiles.append(label_strip(arr, f"{idx} {name}"))
            summary.append({"class_index": idx, "class_name": name, "score_start": float(hist["score"].iloc[0]),
                            "score_end": float(hist["score"].iloc[-1]), "prob_end": float(hist["prob"].iloc[-1]),
                            "robust": robust, "high_frequency_share": high_frequency_share(img)})
        files.append(write_png(adir, "class_viz.png", tile_grid(tiles, min(4, len(tiles)))))
        files.append(write_table(adir, "class_viz.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"classes": summary}

    return publish(store, "class_viz", src.readable, {**src.key, "params": params}, build, force)


def _max_act_channels(store: str | Path, src: Source) -> tuple[str, list[int]] | None:
    """``(layer, channels)`` drawn by the newest max-activations artefact of the same model, or None."""
    from storage.artefacts import artefacts_of

    arch = src.lm.spec.get("arch")
    for _, m, _ in artefacts_of(store, "neurons"):
        if m.get("technique") != "max_activations" or ((m.get("source") or {}).get("model") or {}).get("arch") != arch:
            continue
        chans = [int(c) for e in m.get("files", []) for c in (e.get("channels") or [])]
        if m.get("layer") and chans:
            return str(m["layer"]), list(dict.fromkeys(chans))
    return None


def run_channel_viz(store: str | Path, layer: str | None = None, channels: Sequence[int] | None = None,
                    features_id: str | None = None, model: str | None = None, weights: str | None = None,
                    cfg: ClassVizConfig = ClassVizConfig(size=128, steps=128), device: str = "auto",
                    source: Source | None = None, force: bool = False) -> dict[str, Any]:
    """Publish one visualisation per channel of ``layer`` (:func:`channel_visualisation`): what each channel
    responds to, by the class visualisation's optimiser. Without ``layer`` / ``channels`` it visualises the
    channels the newest max-activations artefact of the same model draws, so the report can show each next to
    its max-activating dataset patches.

    Files: ``channel-<c>.png`` per channel (manifest entry with ``layer`` and ``channel``), ``channel_viz.png``
    (all, captioned), ``channel_viz.parquet`` (channel, step, score = mean activation, l2).
    """
    src = source or open_source(store, features_id, model, weights)
    if layer is None or not channels:
        found = _max_act_channels(store, src)
        if found is None and (layer is None or not channels):
            raise UsageError("pass --layer and --channels, or run `convlens neurons max-act` first (its channels are "
                             "the default)")
        if found is not None:
            layer = layer or found[0]
            channels = list(channels or found[1])
    if not channels:
        raise UsageError("pass at least one channel (--channels 0,1,2)")
    mod = src.lm.module
    dev = pick_device(device)
    cfg.validate()
    params = {"layer": layer, "channels": [int(c) for c in channels], **asdict(cfg)}

    def build(adir: Path):
        for p in mod.parameters():
            p.requires_grad_(False)
        net = mod.eval().to(dev)
        files, tables, tiles, summary = [], [], [], []
        for c in params["channels"]:
            img, hist = channel_visualisation(net, str(layer), c, src.preprocess.mean, src.preprocess.std, cfg, dev)
            hist.insert(0, "channel", c)
            tables.append(hist)
            arr = to_uint8(img)
            files.append(write_png(adir, f"channel-{c}.png", arr, layer=layer, channel=c))
            tiles.append(label_strip(arr, f"ch {c}"))
            summary.append({"channel": c, "score_start": float(hist["score"].iloc[0]), "score_end": float(hist["score"].iloc[-1])})
        files.append(write_png(adir, "channel_viz.png", tile_grid(tiles, min(8, len(tiles)))))
        files.append(write_table(adir, "channel_viz.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"layer": layer, "channels": summary}

    return publish(store, "channel_viz", src.readable, {**src.key, "params": params}, build, force)


def _num_classes(mod: torch.nn.Module) -> int:
    last = None
    for m in mod.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    if last is None:
        raise UsageError("class visualisation needs a classifier (a final nn.Linear)")
    return last.out_features
