"""Shared plumbing for the neuron techniques: model/image sources, image <-> tensor helpers, grids, the
regularisers of the optimisation techniques, and publishing a ``neurons`` artefact.

Conventions used by every technique:
- an *image tensor* is ``(N, 3, H, W) float32 in [0, 1]`` (pixel space); the model sees
  ``(x - mean) / std`` through :class:`Normalised`, so optimisation, clipping and perturbation sizes are in
  pixel units (``eps = 8/255`` means 8 grey levels);
- a PNG is written from ``(H, W, 3) uint8``;
- an artefact is ``<store>/neurons/<id>/`` with PNGs + one Parquet table + ``manifest.json`` (written last)
  whose ``technique`` key names the technique and whose ``files`` list every file with its sha256.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from storage.atomic import atomic_write_bytes
from storage.errors import StoreError, UsageError
from storage.features import read_meta, remove_garbage
from storage.locks import artefact_lock
from storage.manifest import CODE_VERSION, MANIFEST_NAME, file_entry, read_manifest, write_manifest
from storage.paths import Store, artefact_id
from tasks.core.hooks import LayerRef, capture, get_module, resolve_layer
from tasks.core.models import LoadedModel, Preprocess, load_model, load_model_from_manifest, spec_identity

__all__ = [
    "NEURONS_VERSION",
    "Normalised",
    "Source",
    "open_source",
    "load_images",
    "preprocess_pil",
    "to_uint8",
    "normalise_each",
    "tile_grid",
    "label_strip",
    "png_bytes",
    "write_png",
    "write_table",
    "publish",
    "forward_to",
    "default_conv_layer",
    "conv_layers",
    "gaussian_blur",
    "jitter_roll",
    "total_variation",
    "resolve_class",
    "select_rows",
    "stack_panels",
    "line_chart",
    "bar_chart",
]

log = logging.getLogger(__name__)

# Bump when a technique's maths or stored layout changes: it is part of every artefact id.
NEURONS_VERSION = 2


class Normalised(nn.Module):
    """Wrap a model so it takes pixel-space images ``(N,3,H,W) float32 in [0,1]`` and normalises inside."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class _Stop(Exception):
    pass


def forward_to(model: nn.Module, x: torch.Tensor, ref: LayerRef | str, grad: bool = False) -> torch.Tensor:
    """Run ``model(x)`` only as far as layer ``ref`` and return its activation (the rest is skipped).

    With ``grad`` the activation keeps its graph (for gradient ascent); otherwise it is detached.
    ``model`` is the raw module (input already normalised) or a :class:`Normalised` wrapper (pixel input):
    layer names are those of the raw model either way.
    """
    inner = model.model if isinstance(model, Normalised) else model
    if isinstance(ref, str):
        ref = resolve_layer(inner, ref)
    module = get_module(inner, ref.name)

    def stop(*_args):
        raise _Stop

    with capture(inner, ref, detach=not grad) as acts:
        handle = module.register_forward_pre_hook(stop) if ref.side == "input" else module.register_forward_hook(stop)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
    if ref.alias not in acts:
        raise UsageError(f"layer {ref.name!r} was not reached by the forward pass; pick another layer")
    return acts[ref.alias]


def conv_layers(model: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` in definition order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def default_conv_layer(model: nn.Module, fraction: float = 0.6) -> str:
    """A mid-depth layer with a spatial output: ``features[i]`` at ``fraction`` of a ``features``
    Sequential (AlexNet, VGG, MobileNet, EfficientNet, ...), else the Conv2d at ``fraction`` of all convs."""
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential) and len(feats) > 2:
        return f"features.{min(len(feats) - 1, int(round(fraction * (len(feats) - 1))))}"
    convs = conv_layers(model)
    if not convs:
        raise UsageError("the model has no Conv2d layer; pass --layer explicitly")
    return convs[min(len(convs) - 1, int(round(fraction * (len(convs) - 1))))]


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """What a technique runs on: a loaded model (+ its preprocessing) and optionally a feature artefact
    whose images (``dataset_root`` + ``path``, local or URL) are the image set."""

    lm: LoadedModel
    preprocess: Preprocess
    features_id: str | None = None
    features_dir: Path | None = None
    features_manifest: dict[str, Any] | None = None

    @property
    def key(self) -> dict[str, Any]:
        """The part of an artefact's cache key that identifies the source."""
        spec = spec_identity(self.lm.spec)
        fm = self.features_manifest or {}
        return {"model": spec, "features_id": self.features_id, "features_created": fm.get("created"),
                "preprocess": self.preprocess.to_dict()}

    @property
    def readable(self) -> str:
        return self.lm.spec.get("arch", "model")

    def wrapped(self, device: torch.device) -> Normalised:
        """The model on ``device`` taking pixel-space input, eval mode, parameters frozen."""
        for p in self.lm.module.parameters():
            p.requires_grad_(False)
        return Normalised(self.lm.module.eval(), self.preprocess.mean, self.preprocess.std).to(device)

    def meta(self) -> pd.DataFrame:
        """The feature artefact's rows (image_id, path, label, split, ...); raises if there is none."""
        if self.features_dir is None:
            raise UsageError("this technique needs images: pass --features ID (a feature artefact) or --image PATH")
        return read_meta(self.features_dir, self.features_manifest)

    @property
    def dataset_root(self) -> str:
        """The feature artefact's dataset root: a local folder or an fsspec URL."""
        if self.features_manifest is None:
            raise UsageError("no feature artefact given")
        return str(self.features_manifest["dataset_root"])

    def image_file(self, rel: str) -> str:
        """Where the stored image ``rel`` (a feature-table path) lives (:func:`tasks.core.images.stored_image_location`)."""
        from tasks.core.images import stored_image_location

        return stored_image_location(self.dataset_root, rel)

    @property
    def categories(self) -> list[str] | None:
        return self.lm.categories


def _preprocess_from_manifest(d: dict[str, Any]) -> Preprocess:
    return Preprocess(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]), str(d.get("interpolation", "bilinear")))


def open_source(store: str | Path, features_id: str | None = None, model: str | None = None,
                weights: str | None = None, seed: int = 0, need_features: bool = False) -> Source:
    """Resolve the model (and image set) a technique runs on.

    With ``model`` given and no feature artefact wanted (no ``features_id``, not ``need_features``) the model is
    built directly (``weights`` default ``imagenet``). Otherwise the feature artefact ``features_id`` (newest
    when ``None``) names both the model (``manifest["model"]``) and the images, and the model is rebuilt by
    :func:`tasks.core.models.load_model_from_manifest`: ``model`` then confirms the artefact's model (needed to
    run a factory / TorchScript model, unless the user's trust file lists it) and ``weights`` replaces the
    recorded weights file (both checked by sha256). ``need_features`` makes a missing feature artefact an error.
    Raises :class:`UsageError` for a model the user has not allowed or weights that do not match.
    """
    if model and not features_id and not need_features:
        lm = load_model(model, weights or "imagenet", seed)
        return Source(lm, lm.preprocess)
    s = Store(store)
    aid, manifest = s.resolve("features", features_id)
    lm = load_model_from_manifest(manifest["model"], user_model=model, user_weights=weights, artefact=aid)
    return Source(lm, _preprocess_from_manifest(manifest["preprocessing"]), aid, s.artefact_dir("features", aid), manifest)


def select_rows(meta: pd.DataFrame, n: int | None = None, paths: Sequence[str] | None = None,
                seed: int = 0) -> pd.DataFrame:
    """Unique-image rows of a feature artefact: the given ``paths``, else ``n`` spread evenly (sorted by path)."""
    meta = meta.drop_duplicates("image_id").sort_values("path").reset_index(drop=True)
    if paths:
        missing = [p for p in paths if p not in set(meta["path"])]
        if missing:
            raise UsageError(f"{len(missing)} image path(s) are not in the feature artefact, e.g. {missing[0]!r}; "
                             "paths are relative to the dataset root")
        return meta.set_index("path").loc[list(paths)].reset_index()
    if n is None or n >= len(meta):
        return meta
    if n < 1:
        raise UsageError(f"number of images must be >= 1, got {n}")
    idx = np.unique(np.linspace(0, len(meta) - 1, n).round().astype(int))
    return meta.iloc[idx].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- images


def preprocess_pil(img, pre: Preprocess, size: int | None = None) -> torch.Tensor:
    """PIL RGB -> ``(3, S, S) float32 in [0, 1]``: the model's resize + centre crop, or a plain square
    resize + crop to ``size`` pixels when given."""
    from tasks.core.forward import preprocess_uint8

    if size is not None:
        pre = Preprocess(resize=size, crop=size, mean=pre.mean, std=pre.std, interpolation=pre.interpolation)
    return preprocess_uint8(img, pre).float().div_(255.0)


def load_images(paths: Sequence[str | Path], pre: Preprocess, size: int | None = None) -> torch.Tensor:
    """Decode image files (safely, via :func:`tasks.core.images.decode_image`) to ``(N,3,S,S) float32 in [0,1]``.

    Raises ``ValueError`` naming a file that cannot be decoded.
    """
    from tasks.core.images import REOPEN_LIMITS, RejectedImage, decode_image, read_file_bytes

    out = []
    for p in paths:
        try:
            img = decode_image(read_file_bytes(p, REOPEN_LIMITS), str(p), REOPEN_LIMITS)
        except RejectedImage as exc:
            raise UsageError(f"cannot use image {p}: {exc}") from None
        out.append(preprocess_pil(img, pre, size))
    if not out:
        raise UsageError("no images given")
    return torch.stack(out)


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(3,H,W)`` or ``(H,W,3)`` float in [0,1] (clipped) -> ``(H,W,3) uint8``; ``(H,W)`` -> grey RGB."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] == 3:  # ambiguous 3x3: assume CHW
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def normalise_each(x: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
    """Min-max scale each item of ``x`` over ``dims`` to [0, 1] (constant items -> 0.5)."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (x - lo) / rng.clamp_min(1e-12), torch.full_like(x, 0.5))


def tile_grid(tiles: Sequence[np.ndarray], ncol: int, pad: int = 2, pad_value: int = 255,
              tile_size: tuple[int, int] | None = None) -> np.ndarray:
    """Arrange ``(h,w,3) uint8`` tiles row-major in ``ncol`` columns -> ``(H,W,3) uint8``.

    Tiles are resized (nearest) to ``tile_size`` ``(h, w)`` (default: the first tile's size).
    """
    from PIL import Image

    if not tiles:
        raise UsageError("no tiles to arrange")
    th, tw = tile_size or tiles[0].shape[:2]
    ncol = max(1, min(ncol, len(tiles)))
    nrow = math.ceil(len(tiles) / ncol)
    out = np.full((nrow * th + (nrow + 1) * pad, ncol * tw + (ncol + 1) * pad, 3), pad_value, np.uint8)
    for i, t in enumerate(tiles):
        if t.shape[:2] != (th, tw):
            t = np.asarray(Image.fromarray(t).resize((tw, th), Image.NEAREST if t.shape[0] < th else Image.BILINEAR))
        r, c = divmod(i, ncol)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        out[y:y + th, x:x + tw] = t
    return out


def label_strip(img: np.ndarray, text: str, height: int = 14) -> np.ndarray:
    """Add a white caption strip with ``text`` above ``(H,W,3) uint8`` ``img``."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (img.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), text[: max(1, img.shape[1] // 6)], fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), img], axis=0)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_png(adir: Path, name: str, img: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Write ``(H,W,3) uint8`` as PNG ``name`` atomically; return its manifest entry (role ``image``)."""
    atomic_write_bytes(Path(adir) / name, png_bytes(img))
    return file_entry(adir, name, role="image", **extra)


def write_table(adir: Path, name: str, df: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    """Write ``df`` as a zstd Parquet file ``name`` atomically; return its manifest entry (role ``table``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), sink, compression="zstd")
    atomic_write_bytes(Path(adir) / name, sink.getvalue().to_pybytes())
    return file_entry(adir, name, role="table", rows=int(len(df)), **extra)


def publish(store: str | Path, technique: str, readable: str, key: dict[str, Any],
            build: Callable[[Path], tuple[list[dict[str, Any]], dict[str, Any]]], force: bool = False) -> dict[str, Any]:
    """Create (or reuse) the ``neurons`` artefact for ``technique`` with cache ``key``.

    ``build(adir)`` writes the files and returns ``(file_entries, manifest_extra)``. The id is the content
    hash of ``technique`` + ``key`` + code version, so a rerun with the same inputs returns the published
    manifest (its files sha256-verified) without recomputing; ``force`` rebuilds it.
    Returns the manifest with ``reused`` True/False added (not stored).
    """
    s = Store(store)
    full_key = {"technique": technique, "neurons_version": NEURONS_VERSION, "code_version": CODE_VERSION, **key}
    aid = artefact_id(f"{technique}-{readable}", full_key)
    adir = s.artefact_dir("neurons", aid, create=True)
    if not force and (adir / MANIFEST_NAME).is_file():
        try:
            return {**read_manifest(adir, verify=True), "reused": True}
        except StoreError as exc:
            log.warning("rebuilding %s: %s", aid, exc)
    with artefact_lock(adir):
        files, extra = build(adir)
        manifest = {"kind": "neurons", "technique": technique, "artefact_id": aid, "params": key.get("params", {}),
                    "source": {k: v for k, v in key.items() if k != "params"}, "files": files, **extra}
        published = write_manifest(adir, manifest)
        remove_garbage(adir, published)
    log.info("published neurons artefact %s (%s, %d files)", aid, technique, len(files))
    return {**published, "reused": False}


# ------------------------------------------------------------------------------------- regularisers


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N,C,H,W)`` with ``sigma`` pixels (reflect padding); ``sigma<=0`` -> x."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    radius_h = min(radius, x.shape[2] - 1)
    radius_w = min(radius, x.shape[3] - 1)
    kh = k[radius - radius_h: radius + radius_h + 1].view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = k[radius - radius_w: radius + radius_w + 1].view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    x = F.conv2d(F.pad(x, (0, 0, radius_h, radius_h), mode="reflect"), kh / kh.sum(dim=2, keepdim=True), groups=c)
    return F.conv2d(F.pad(x, (radius_w, radius_w, 0, 0), mode="reflect"), kw / kw.sum(dim=3, keepdim=True), groups=c)


def jitter_roll(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Randomly roll ``(N,C,H,W)`` by up to ``max_shift`` pixels in y and x; returns the shift to undo it."""
    if max_shift <= 0:
        return x, (0, 0)
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)), (dy, dx)


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean total variation of ``(N,C,H,W)``: ``mean(|dx|^beta) + mean(|dy|^beta)`` (scalar tensor)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    return dx.pow(beta).mean() + dy.pow(beta).mean()


def resolve_class(target: int | str, categories: Sequence[str] | None, num_classes: int) -> tuple[int, str]:
    """A class index or (case-insensitive) category name -> ``(index, name)``; ValueError otherwise."""
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, int):
        if not 0 <= target < num_classes:
            raise UsageError(f"class index {target} is out of range [0, {num_classes})")
        return target, (categories[target] if categories and target < len(categories) else str(target))
    if not categories:
        raise UsageError(f"class {target!r} given by name but the model has no category names; pass an index")
    low = [c.lower() for c in categories]
    t = target.lower().strip()
    if t in low:
        i = low.index(t)
        return i, categories[i]
    close = [c for c in categories if t in c.lower()][:5]
    raise UsageError(f"unknown class {target!r}" + (f"; did you mean {', '.join(close)}?" if close else "; pass an index"))


def stack_panels(panels: Sequence[np.ndarray], axis: int = 0, pad: int = 4) -> np.ndarray:
    """Stack ``(h,w,3) uint8`` panels vertically (``axis=0``) or horizontally (``axis=1``), padding with white."""
    if not panels:
        raise UsageError("no panels to stack")
    other = 1 - axis
    size = max(p.shape[other] for p in panels)
    out = []
    for p in panels:
        shape = list(p.shape)
        shape[other] = size
        canvas = np.full(shape, 255, np.uint8)
        canvas[: p.shape[0], : p.shape[1]] = p
        out.append(canvas)
        gap = list(canvas.shape)
        gap[axis] = pad
        out.append(np.full(gap, 255, np.uint8))
    return np.concatenate(out[:-1], axis=axis)


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, width: int = 320,
               height: int = 200, y_range: tuple[float, float] | None = None) -> np.ndarray:
    """A small line chart ``(height, width, 3) uint8`` drawn with PIL: ``series`` name -> (xs, ys)."""
    from PIL import Image, ImageDraw

    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 40, width - 8, 18, height - 22
    xs_all = [float(v) for xs, _ in series.values() for v in xs]
    ys_all = [float(v) for _, ys in series.values() for v in ys if np.isfinite(v)]
    if not xs_all or not ys_all:
        d.text((4, 2), title + " (no data)", fill=(0, 0, 0))
        return np.asarray(img)
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = y_range or (min(ys_all + [0.0]), max(ys_all))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    d.text((4, 2), title, fill=(0, 0, 0))
    d.text((2, top), f"{y1:.2g}", fill=(90, 90, 90))
    d.text((2, bottom - 10), f"{y0:.2g}", fill=(90, 90, 90))
    d.text((left, bottom + 4), f"{x0:g}", fill=(90, 90, 90))
    d.text((right - 30, bottom + 4), f"{x1:g}", fill=(90, 90, 90))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = [px(float(a), float(b)) for a, b in zip(xs, ys) if np.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
        d.text((left + 4 + 70 * i, top + 2), name[:11], fill=c)
    return np.asarray(img)


def bar_chart(values: dict[str, float], title: str, width: int = 360, height: int = 200) -> np.ndarray:
    """A small horizontal bar chart of values in [0, 1] (labels on the left) drawn with PIL."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, max(height, 24 + 18 * len(values))), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((4, 2), title, fill=(0, 0, 0))
    left = 150
    for i, (name, v) in enumerate(values.items()):
        y = 22 + 18 * i
        d.text((4, y), name[:24], fill=(0, 0, 0))
        if np.isfinite(v):
            d.rectangle([left, y + 2, left + max(1, int((width - left - 50) * max(0.0, min(1.0, v)))), y + 13], fill=(31, 119, 180))
            d.text((width - 46, y), f"{v:.3f}", fill=(0, 0, 0))
    return np.asarray(img)
