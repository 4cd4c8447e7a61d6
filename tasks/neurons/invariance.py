"""Invariance curves (Zeiler & Fergus fig. 5): how far a layer's feature moves, and how the class probability
changes, as an image is translated, scaled and rotated.

For each image (its preprocessed crop, ``(3, S, S)`` in [0, 1]) and each transform value, the transformed crop
(``torchvision`` affine, grey fill) is embedded at ``layer`` (pooled like the feature store: global average of
conv maps) and classified. Distance is relative: ``‖f(T x) − f(x)‖ / ‖f(x)‖``, so it is exactly 0 at the
identity (the identity transform returns the crop unchanged). ``prob`` is the softmax probability of the
untransformed image's top-1 class. Curves are means over the image set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.core.hooks import capture, resolve_layer
from tasks.neurons.common import (
    Normalised,
    Source,
    line_chart,
    load_images,
    open_source,
    publish,
    select_rows,
    stack_panels,
    write_png,
    write_table,
)

__all__ = ["DEFAULT_TRANSFORMS", "transform_image", "invariance_curves", "run_invariance"]

DEFAULT_TRANSFORMS: dict[str, tuple[float, ...]] = {
    "translate": (-60, -40, -20, -10, 0, 10, 20, 40, 60),  # pixels (horizontal) in the crop
    "scale": (0.5, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7),
    "rotate": (-90, -60, -30, -15, 0, 15, 30, 60, 90),  # degrees
}
_IDENTITY = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}


def transform_image(x: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """Apply one transform to ``(N,3,H,W)`` in [0,1]; the identity value returns ``x`` itself."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if kind not in _IDENTITY:
        raise UsageError(f"unknown transform {kind!r}; expected translate, scale or rotate")
    if float(value) == _IDENTITY[kind]:
        return x
    if kind == "scale" and value <= 0:
        raise UsageError("scale factors must be > 0")
    args = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    if kind == "translate":
        args["translate"] = [int(round(value)), 0]
    elif kind == "scale":
        args["scale"] = float(value)
    else:
        args["angle"] = float(value)
    return TF.affine(x, interpolation=InterpolationMode.BILINEAR, fill=[0.5, 0.5, 0.5], **args)


@torch.no_grad()
def invariance_curves(net: Normalised, x: torch.Tensor, layer: str | None = None,
                      transforms: dict[str, Sequence[float]] | None = None) -> pd.DataFrame:
    """Per image and transform value: ``image``, ``transform``, ``value``, ``distance``, ``prob``, ``pred``.

    ``x`` ``(N,3,H,W)`` in [0,1]; ``layer`` a module name / alias (default fc7 or penultimate).
    Memory O(N x image): each transform value is one forward pass of N images.
    """
    transforms = transforms or DEFAULT_TRANSFORMS
    ref = resolve_layer(net.model, layer)
    has_head = any(isinstance(m, torch.nn.Linear) for m in net.model.modules())

    def embed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with capture(net.model, ref) as acts:
            out = net(batch)
        f = acts[ref.alias].float()
        f = f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1)
        return f, (torch.softmax(out.float(), 1) if has_head and out.dim() == 2 else None)

    f0, p0 = embed(x)
    top = p0.argmax(1) if p0 is not None else None
    norm0 = f0.norm(dim=1).clamp_min(1e-12)
    recs = []
    for kind, values in transforms.items():
        for v in values:
            xt = transform_image(x, kind, v)
            f, p = (f0, p0) if xt is x else embed(xt)
            dist = (f - f0).norm(dim=1) / norm0
            for i in range(len(x)):
                recs.append({"image": i, "transform": kind, "value": float(v), "distance": float(dist[i]),
                             "prob": float(p[i, top[i]]) if p is not None else float("nan"),
                             "pred": int(p[i].argmax()) if p is not None else -1})
    return pd.DataFrame(recs)


def run_invariance(store: str | Path, features_id: str | None = None, layer: str | None = None, n_images: int = 8,
                   images: Sequence[str] | None = None, transforms: dict[str, Sequence[float]] | None = None,
                   device: str = "auto", source: Source | None = None, force: bool = False, model: str | None = None,
                   weights: str | None = None) -> dict[str, Any]:
    """Files: ``invariance.png`` (distance and probability curves per transform, mean over images),
    ``invariance.parquet``: image_id, path, label, layer, transform, value, distance, prob, pred, top1_changed.
    ``model`` / ``weights``: the user's ``--model`` / ``--weights`` (:func:`tasks.neurons.common.open_source`)."""
    src = source or open_source(store, features_id, model, weights, need_features=True)
    rows = select_rows(src.meta(), n_images, images)
    transforms = {k: list(v) for k, v in (transforms or DEFAULT_TRANSFORMS).items()}
    ref = resolve_layer(src.lm.module, layer)
    params = {"layer": ref.name, "side": ref.side, "images": list(rows["path"]), "transforms": transforms}

    def build(adir: Path):
        dev = pick_device(device)
        net = src.wrapped(dev)
        x = load_images([src.image_file(p) for p in rows["path"]], src.preprocess).to(dev)
        df = invariance_curves(net, x, layer, transforms)
        df.insert(0, "layer", ref.name)
        df.insert(0, "label", [rows["label"].iloc[i] for i in df["image"]])
        df.insert(0, "path", [rows["path"].iloc[i] for i in df["image"]])
        df.insert(0, "image_id", [rows["image_id"].iloc[i] for i in df["image"]])
        pred0 = df[df.apply(lambda r: r["value"] == _IDENTITY[r["transform"]], axis=1)].groupby("image")["pred"].first()
        df["top1_changed"] = [bool(p != pred0.get(i, p)) for i, p in zip(df["image"], df["pred"])]
        mean = df.groupby(["transform", "value"], as_index=False)[["distance", "prob"]].mean()
        charts = []
        for kind in transforms:
            m = mean[mean["transform"] == kind].sort_values("value")
            charts.append(stack_panels([
                line_chart({"distance": (m["value"], m["distance"])}, f"{kind}: feature distance ({ref.name})"),
                line_chart({"p(top-1)": (m["value"], m["prob"])}, f"{kind}: prob of original class", y_range=(0, 1)),
            ], axis=0))
        files = [write_png(adir, "invariance.png", stack_panels(charts, axis=1, pad=8)),
                 write_table(adir, "invariance.parquet", df.drop(columns=["image"]))]
        return files, {"layer": ref.name, "transforms": transforms, "images": int(len(rows)),
                       "curves": mean.to_dict(orient="records")}

    return publish(store, "invariance", src.readable, {**src.key, "params": params}, build, force)


