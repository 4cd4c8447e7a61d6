"""Feature evolution during training (Zeiler & Fergus fig. 4): for several checkpoints of one model, the
first-layer filters and the max-activating patches of chosen channels of a layer, side by side.

Each checkpoint is a state-dict file for ``arch`` (loaded with ``weights_only=True`` by
:func:`tasks.core.models.load_model`). The image set is a feature artefact's images (``limit`` first by path), one
streamed max-activation pass per checkpoint (memory O(k x channels + batch)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from storage.atomic import sha256_file
from storage.errors import UsageError
from tasks.core.forward import pick_device
from tasks.core.models import load_model
from tasks.neurons.common import (
    Normalised,
    Source,
    default_conv_layer,
    label_strip,
    open_source,
    preprocess_pil,
    publish,
    stack_panels,
    write_png,
    write_table,
)
from tasks.neurons.filters import channel_grid, conv_weight, filter_grid, first_conv_layer
from tasks.neurons.max_activations import _decode, hits_table, max_activation_pass, patch_grid
from tasks.neurons.receptive_field import receptive_field

__all__ = ["run_evolution"]


def run_evolution(store: str | Path, checkpoints: Sequence[str], arch: str | None = None, layer: str | None = None,
                  filter_layer: str | None = None, channels: Sequence[int] = (0, 1, 2, 3), k: int = 6,
                  features_id: str | None = None, limit: int | None = 256, batch_size: int = 32,
                  labels: Sequence[str] | None = None, weights_prefix: str | None = None, device: str = "auto",
                  source: Source | None = None, force: bool = False, model: str | None = None,
                  weights: str | None = None) -> dict[str, Any]:
    """Publish filters + patches per checkpoint.

    Files: ``evolution.png`` (one row per checkpoint: caption, filter grid, patch grid with one row per channel),
    ``evolution-<i>.png`` (the same row for checkpoint i alone), ``evolution.parquet``: the max-activation hits
    (:func:`tasks.neurons.max_activations.hits_table` columns) plus checkpoint (index) and checkpoint_label.
    ``model`` / ``weights``: the user's ``--model`` / ``--weights`` (:func:`tasks.neurons.common.open_source`).
    """
    if len(checkpoints) < 1:
        raise UsageError("pass at least one --checkpoint file (two or more to see an evolution)")
    for c in checkpoints:
        if not Path(c).is_file():
            raise UsageError(f"checkpoint {c} does not exist")
    labels = list(labels) if labels else [Path(c).stem for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise UsageError("give one label per checkpoint")
    src = source or open_source(store, features_id, model, weights, need_features=True)
    # built from the feature artefact's model as approved by open_source (an explicit spec), not the bare name
    build_arch = arch or (src.lm.recipe.model if src.lm.recipe else src.lm.spec.get("arch"))
    arch = arch or src.lm.spec.get("arch")
    meta = src.meta().drop_duplicates("image_id").sort_values("path").reset_index(drop=True)
    if limit:
        meta = meta.iloc[:limit]
    ckpt_key = [{"file": str(c), "sha256": sha256_file(c)} for c in checkpoints]
    params = {"arch": arch, "checkpoints": ckpt_key, "labels": labels, "layer": layer, "filter_layer": filter_layer,
              "channels": list(channels), "k": k, "limit": limit}

    def build(adir: Path):
        dev = pick_device(device)
        files, tables, rows = [], [], []
        files_in = [src.image_file(p) for p in meta["path"]]
        crop_cache: dict[str, torch.Tensor] = {}
        used_layer = used_filter = None
        for i, (ck, lab) in enumerate(zip(checkpoints, labels)):
            lm = load_model(build_arch, str(ck), 0, weights_prefix)
            mod = lm.module.eval()
            used_layer = layer or default_conv_layer(mod)
            used_filter = filter_layer or first_conv_layer(mod)
            w = conv_weight(mod, used_filter)
            fimg = filter_grid(w, 8) if w.shape[1] == 3 else channel_grid(w, 16, 16)
            for p in mod.parameters():
                p.requires_grad_(False)
            net = Normalised(mod, src.preprocess.mean, src.preprocess.std).to(dev)
            rf = receptive_field(mod, used_layer, src.preprocess.crop)
            top, _size, _skipped = max_activation_pass(net, files_in, src.preprocess, used_layer, k, batch_size, dev,
                                                       rf=rf, min_inside=0.5)
            bad = [c for c in channels if not 0 <= c < top.values.shape[0]]
            if bad:
                raise UsageError(f"channel {bad[0]} out of range: {used_layer} has {top.values.shape[0]} channels")
            hits = hits_table(top, used_layer, rf, src.preprocess.crop, list(meta["image_id"]), list(meta["path"]),
                              list(meta["label"]))
            hits.insert(0, "checkpoint_label", lab)
            hits.insert(0, "checkpoint", i)
            tables.append(hits)
            for p in sorted(set(hits[hits["channel"].isin(list(channels))]["path"])):
                if p not in crop_cache:
                    crop_cache[p] = preprocess_pil(_decode(src.image_file(p)), src.preprocess)
            pimg = patch_grid(hits, list(channels), crop_cache, rf, k, 48)
            row = label_strip(stack_panels([fimg, pimg], axis=1, pad=12), f"{lab}: filters {used_filter} | patches {used_layer}")
            name = f"evolution-{i:02d}.png"
            files.append(write_png(adir, name, row, checkpoint=i, checkpoint_label=lab))
            rows.append(row)
        files.append(write_png(adir, "evolution.png", stack_panels(rows, axis=0, pad=10)))
        files.append(write_table(adir, "evolution.parquet", pd.concat(tables, ignore_index=True)))
        return files, {"layer": used_layer, "filter_layer": used_filter, "checkpoints": labels, "channels": list(channels)}

    return publish(store, "evolution", arch or src.readable, {**src.key, "params": params}, build, force)
