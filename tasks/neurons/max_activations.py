"""Max-activating images and patches per channel over a whole dataset (Zeiler & Fergus, CS231n).

One streamed pass over a feature artefact's images (``dataset_root`` + ``path``, local or fsspec URL, decoded with
:func:`tasks.core.images.decode_image`, preprocessed with the artefact's own resize + centre crop): the forward pass
stops at the layer, each channel's spatial maximum and its location are taken per image, and a running top-k
per channel is merged batch by batch. Memory: O(k x channels) for the running top-k plus O(batch x layer
activation) for the batch in flight — never O(dataset).

Each hit's patch is the receptive field (:mod:`tasks.neurons.receptive_field`, computed from the layer
arithmetic) of the maximal unit: the box is in pixels of the preprocessed crop, clipped to it; patch images
are cut from the crop padded with grey so every patch is the full RF square.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from storage.errors import UsageError
from tasks.core.forward import pick_device, worker_context
from tasks.core.models import Preprocess
from tasks.neurons.common import (
    Normalised,
    Source,
    forward_to,
    label_strip,
    open_source,
    preprocess_pil,
    publish,
    tile_grid,
    to_uint8,
    write_png,
    write_table,
)
from tasks.neurons.receptive_field import ReceptiveField, receptive_field

__all__ = ["TopK", "ImageFiles", "valid_units", "max_activation_pass", "hits_table", "patch_image", "patch_grid", "run_max_activations"]

log = logging.getLogger(__name__)


@dataclass
class TopK:
    """Running top-k per channel: ``values (C, k) float32`` (-inf = empty), ``rows (C, k) int64`` (-1 = empty),
    ``ys`` / ``xs (C, k) int64`` (unit coordinates of the maximum). Memory O(k x C)."""

    values: torch.Tensor
    rows: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor

    @classmethod
    def empty(cls, channels: int, k: int) -> "TopK":
        z = torch.full((channels, k), -1, dtype=torch.long)
        return cls(torch.full((channels, k), float("-inf")), z, z.clone(), z.clone())

    def update(self, act: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Merge a batch: ``act (B, C, h, w)`` float, ``rows (B,)`` int64 image indices; ``valid (h, w)`` bool
        masks the units that may be chosen (None: all)."""
        b, c, h, w = act.shape
        if valid is not None and not bool(valid.all()):
            act = act.masked_fill(~valid.to(act.device), float("-inf"))
        vals, idx = act.reshape(b, c, h * w).max(dim=2)  # (B, C)
        all_v = torch.cat([self.values, vals.t().float().cpu()], dim=1)
        all_r = torch.cat([self.rows, rows.view(1, b).expand(c, b).cpu()], dim=1)
        idx = idx.t().cpu()
        all_y = torch.cat([self.ys, idx // w], dim=1)
        all_x = torch.cat([self.xs, idx % w], dim=1)
        self._keep(all_v, all_r, all_y, all_x)

    def merge(self, other: "TopK") -> None:
        """Merge another running top-k whose rows all come after this one's (e.g. the next shard)."""
        self._keep(torch.cat([self.values, other.values], dim=1), torch.cat([self.rows, other.rows], dim=1),
                   torch.cat([self.ys, other.ys], dim=1), torch.cat([self.xs, other.xs], dim=1))

    def _keep(self, all_v: torch.Tensor, all_r: torch.Tensor, all_y: torch.Tensor, all_x: torch.Tensor) -> None:
        # stable descending sort: equal values keep the earlier row, so streaming, batching and sharding agree
        c, k = self.values.shape
        sel = torch.sort(all_v, dim=1, descending=True, stable=True).indices[:, :k]
        self.values = torch.full((c, k), float("-inf"))
        self.values[:, : sel.shape[1]] = torch.gather(all_v, 1, sel)
        for name, src in (("rows", all_r), ("ys", all_y), ("xs", all_x)):
            out = torch.full((c, k), -1, dtype=torch.long)
            out[:, : sel.shape[1]] = torch.gather(src, 1, sel)
            setattr(self, name, out)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes image files to ``(3, crop, crop) uint8``; an undecodable file yields ``None`` (logged, skipped)."""

    def __init__(self, files: Sequence[Path], pre: Preprocess) -> None:
        self.files, self.pre = list(files), pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from tasks.core.forward import preprocess_uint8
        from tasks.core.images import REOPEN_LIMITS, RejectedImage, decode_image, read_file_bytes

        try:
            img = decode_image(read_file_bytes(self.files[i], REOPEN_LIMITS), str(self.files[i]), REOPEN_LIMITS)
            return i, preprocess_uint8(img, self.pre)
        except RejectedImage as exc:
            return i, str(exc)


def _collate(items):
    good = [(i, t) for i, t in items if isinstance(t, torch.Tensor)]
    bad = [(i, t) for i, t in items if not isinstance(t, torch.Tensor)]
    return torch.tensor([i for i, _ in good], dtype=torch.long), (torch.stack([t for _, t in good]) if good else None), bad


def valid_units(rf: ReceptiveField | None, h: int, w: int, crop: int, min_inside: float) -> torch.Tensor:
    """``(h, w)`` bool: units whose receptive field has at least ``min_inside`` of its area inside the crop
    (border units that mostly see padding are skipped). All True when ``rf`` is None/global or nothing passes."""
    if rf is None or rf.size is None or min_inside <= 0:
        return torch.ones(h, w, dtype=torch.bool)

    def frac(n: int, axis: int) -> torch.Tensor:
        start = rf.offset[axis] + torch.arange(n) * rf.stride[axis]
        inside = (start + rf.size[axis]).clamp(max=crop) - start.clamp(min=0)
        return inside.clamp(min=0).float() / rf.size[axis]

    mask = (frac(h, 0)[:, None] * frac(w, 1)[None, :]) >= min_inside
    return mask if bool(mask.any()) else torch.ones(h, w, dtype=torch.bool)


def max_activation_pass(net: Normalised, files: Sequence[str | Path], pre: Preprocess, layer: str, k: int = 9,
                        batch_size: int = 32, device: torch.device | None = None, num_workers: int | None = None,
                        progress: bool = False, rf: ReceptiveField | None = None,
                        min_inside: float = 0.0) -> tuple[TopK, tuple[int, int], list[int]]:
    """Stream ``files`` once; returns ``(topk, map_size (h, w), skipped file indices)``.

    ``net`` takes pixel-space input. Rows in ``topk.rows`` index ``files``. With ``rf`` and ``min_inside``,
    only units whose receptive field is at least that fraction inside the crop are ranked
    (:func:`valid_units`). Memory O(k x C + batch).
    """
    valid = None
    device = device or next(net.parameters()).device
    workers = num_workers if num_workers is not None else (min(2, os.cpu_count() or 1) if len(files) > 2 * batch_size else 0)
    if files and "://" in str(files[0]):
        workers = 0  # fsspec filesystems (s3fs, ...) are not fork-safe: decode in-process, as extraction does
    loader = torch.utils.data.DataLoader(ImageFiles(files, pre), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                                         multiprocessing_context=worker_context() if workers else None)
    top: TopK | None = None
    size = (0, 0)
    skipped: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc=f"max-act {layer}", unit="img", dynamic_ncols=True)
    try:
        for idx, batch, bad in loader:
            for i, why in bad:
                log.warning("skipping %s: %s", files[i], why)
                skipped.append(i)
            if batch is not None:
                x = batch.to(device, non_blocking=True).float().div_(255.0)
                with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    act = forward_to(net, x, layer)
                act = act.float()
                if act.dim() == 2:
                    act = act[:, :, None, None]
                if act.dim() != 4:
                    raise UsageError(f"layer {layer!r} outputs {tuple(act.shape)}; need (N, C, h, w) or (N, D)")
                if top is None:
                    top = TopK.empty(act.shape[1], k)
                    size = (int(act.shape[2]), int(act.shape[3]))
                    valid = valid_units(rf, size[0], size[1], pre.crop, min_inside)
                top.update(act, idx, valid)
            if bar is not None:
                bar.update(len(idx) + len(bad))
    finally:
        if bar is not None:
            bar.close()
    if top is None:
        raise UsageError("no image could be decoded; nothing to rank")
    return top, size, skipped


def hits_table(top: TopK, layer: str, rf: ReceptiveField, crop: int, ids: Sequence[Any], paths: Sequence[str],
               labels: Sequence[Any] | None = None) -> pd.DataFrame:
    """One row per (channel, rank) hit: layer, channel, rank (0 = strongest), image_id, path, label, activation,
    unit_y, unit_x, box_x0, box_y0, box_x1, box_y1 (crop pixels, x1/y1 exclusive, clipped to the crop)."""
    c, k = top.values.shape
    recs = []
    for ch in range(c):
        for r in range(k):
            row = int(top.rows[ch, r])
            if row < 0:
                continue
            y, x = int(top.ys[ch, r]), int(top.xs[ch, r])
            x0, y0, x1, y1 = rf.box(y, x, crop, crop)
            recs.append({"layer": layer, "channel": ch, "rank": r, "image_id": ids[row], "path": paths[row],
                         "label": None if labels is None else labels[row], "activation": float(top.values[ch, r]),
                         "unit_y": y, "unit_x": x, "box_x0": x0, "box_y0": y0, "box_x1": x1, "box_y1": y1})
    return pd.DataFrame(recs)


def patch_image(image: torch.Tensor, rf: ReceptiveField, y: int, x: int) -> torch.Tensor:
    """The full RF square of unit ``(y, x)`` cut from ``(3, H, W)`` in [0,1], padded with grey outside the image."""
    _, h, w = image.shape
    if rf.size is None:
        return image
    sy, sx = rf.size
    y0, x0 = rf.offset[0] + y * rf.stride[0], rf.offset[1] + x * rf.stride[1]
    pad = (max(0, -x0), max(0, x0 + sx - w), max(0, -y0), max(0, y0 + sy - h))
    padded = F.pad(image, pad, value=0.5)
    return padded[:, y0 + pad[2]: y0 + pad[2] + sy, x0 + pad[0]: x0 + pad[0] + sx]


def patch_grid(hits: pd.DataFrame, channels: Sequence[int], images: dict[str, torch.Tensor], rf: ReceptiveField,
               k: int, patch_px: int = 64) -> np.ndarray:
    """Rows = channels, columns = the k strongest patches (``images``: path -> ``(3,H,W)`` crop in [0,1])."""
    tiles = []
    for ch in channels:
        sub = hits[hits["channel"] == ch].sort_values("rank")
        row = []
        for _, h in sub.iterrows():
            p = patch_image(images[h["path"]], rf, int(h["unit_y"]), int(h["unit_x"]))
            p = F.interpolate(p[None], size=(patch_px, patch_px), mode="bilinear", align_corners=False)[0]
            row.append(to_uint8(p))
        row += [np.full((patch_px, patch_px, 3), 255, np.uint8)] * (k - len(row))
        strip = np.full((patch_px, 34, 3), 255, np.uint8)
        tiles.append(label_strip(strip, f"{ch}", 12)[:patch_px])
        tiles += row
    return tile_grid(tiles, k + 1, pad=2, tile_size=(patch_px, patch_px))


def run_max_activations(store: str | Path, layer: str | None = None, features_id: str | None = None, k: int = 9,
                        channels: Sequence[int] | None = None, png_channels: int = 8, per_png: int = 8,
                        batch_size: int = 32, patch_px: int = 64, limit: int | None = None, min_inside: float = 0.5,
                        device: str = "auto", progress: bool = False, source: Source | None = None,
                        force: bool = False, scan: Callable[..., tuple[TopK, tuple[int, int], list[int]]] | None = None,
                        model: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Top-``k`` images and RF patches of every channel of ``layer`` over the images of a feature artefact.

    ``channels``: which channels get patch PNGs (default: the ``png_channels`` channels with the highest
    top-1 activation); the table always covers every channel. ``limit`` caps the number of images (first by path).
    ``min_inside``: rank only units whose receptive field lies at least this fraction (of its area) inside the
    crop, so border units that mostly see padding do not dominate (0 = every unit).
    Files: ``max_activations.parquet`` (:func:`hits_table`), ``patches-<n>.png`` (``per_png`` channels each).
    ``scan``: replaces the one-process :func:`max_activation_pass` with the same signature and result (the
    sharded pass of :mod:`tasks.core.sharding`, called under the artefact lock). ``model`` / ``weights``: the user's
    ``--model`` / ``--weights`` for the feature artefact's model (:func:`tasks.neurons.common.open_source`).
    """
    from tasks.neurons.common import default_conv_layer

    src = source or open_source(store, features_id, model, weights, need_features=True)
    layer = layer or default_conv_layer(src.lm.module)
    meta = src.meta().drop_duplicates("image_id").sort_values("path").reset_index(drop=True)
    if limit:
        meta = meta.iloc[:limit]
    params = {"layer": layer, "k": k, "channels": list(channels) if channels else None, "png_channels": png_channels,
              "per_png": per_png, "patch_px": patch_px, "limit": limit, "min_inside": min_inside}

    def build(adir: Path):
        dev = pick_device(device)
        net = src.wrapped(dev)
        crop = src.preprocess.crop
        rf = receptive_field(src.lm.module, layer, crop)
        files_in = [src.image_file(p) for p in meta["path"]]
        top, size, skipped = (scan or max_activation_pass)(net, files_in, src.preprocess, layer, k, batch_size, dev,
                                                           progress=progress, rf=rf, min_inside=min_inside)
        hits = hits_table(top, layer, rf, crop, list(meta["image_id"]), list(meta["path"]), list(meta["label"]))
        if channels:
            bad = [c for c in channels if not 0 <= c < top.values.shape[0]]
            if bad:
                raise UsageError(f"channel {bad[0]} out of range: {layer} has {top.values.shape[0]} channels")
            chans = list(channels)
        else:
            chans = [int(c) for c in torch.argsort(top.values[:, 0], descending=True)[:png_channels]]
        need = sorted(set(hits[hits["channel"].isin(chans)]["path"]))
        crops = {p: preprocess_pil(_decode(src.image_file(p)), src.preprocess) for p in need}
        files = [write_table(adir, "max_activations.parquet", hits)]
        pngs = []
        for g in range(0, len(chans), per_png):
            group = chans[g:g + per_png]
            name = f"patches-{g // per_png:02d}.png"
            files.append(write_png(adir, name, patch_grid(hits, group, crops, rf, k, patch_px), channels=group))
            pngs.append(name)
        extra = {"layer": layer, "k": k, "channels": int(top.values.shape[0]), "map_size": list(size),
                 "images_scanned": len(files_in) - len(skipped), "images_skipped": len(skipped), "crop": crop,
                 "receptive_field": rf.to_dict(), "png_channels": chans, "images": pngs, "min_inside": min_inside}
        return files, extra

    return publish(store, "max_activations", src.readable, {**src.key, "params": params}, build, force)


def _decode(path: str):
    from tasks.core.images import REOPEN_LIMITS, decode_image, read_file_bytes

    return decode_image(read_file_bytes(path, REOPEN_LIMITS), str(path), REOPEN_LIMITS)
