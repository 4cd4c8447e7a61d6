"""The demo's neuron stage: first-layer filters, max-activating patches for a few channels, one class
visualisation and one adversarial example, on the newest (or given) feature artefact, with light defaults
(a ~200-image set with MobileNetV2 at 224 px on 2 CPU cores: well under a minute uncontended)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.neurons.common import default_conv_layer, open_source

__all__ = ["run_default_neurons"]

log = logging.getLogger(__name__)


def run_default_neurons(store: str | Path, features_id: str | None = None, device: str = "auto",
                        max_images: int = 256, model: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Run filters, max-activations, one class visualisation and one adversarial example; return a summary
    ``{technique: {artefact_id, seconds, reused, ...}}``. Reruns reuse the stored artefacts. ``model`` /
    ``weights``: the user's ``--model`` / ``--weights`` (:func:`tasks.neurons.common.open_source`)."""
    from tasks.neurons.adversarial import AdvConfig, run_adversarial
    from tasks.neurons.class_viz import ClassVizConfig, run_class_viz
    from tasks.neurons.filters import run_filters
    from tasks.neurons.max_activations import run_max_activations

    src = open_source(store, features_id, model, weights, need_features=True)
    out: dict[str, Any] = {"features_id": src.features_id}

    def timed(name: str, fn, **extra_keys):
        t0 = time.perf_counter()
        m = fn()
        out[name] = {"artefact_id": m["artefact_id"], "reused": m.get("reused", False),
                     "seconds": round(time.perf_counter() - t0, 2), **{k: m.get(k) for k in extra_keys}}
        log.info("neurons %s: %s in %.1fs", name, m["artefact_id"], out[name]["seconds"])

    timed("filters", lambda: run_filters(store, source=src), layers=None)
    layer = default_conv_layer(src.lm.module, 0.35)
    timed("max_activations", lambda: run_max_activations(store, layer, k=6, png_channels=8, limit=max_images,
                                                         device=device, source=src),
          layer=None, receptive_field=None)
    target: int | str = 0
    meta = src.meta()
    if "pred_top5" in meta.columns and len(meta):
        target = Counter(int(p[0]) for p in meta["pred_top5"] if p is not None).most_common(1)[0][0]
    if src.categories is not None or any(m for m in src.lm.module.modules() if m.__class__.__name__ == "Linear"):
        viz = ClassVizConfig(size=128, steps=40, lr=0.1, jitter=8, blur_every=4, blur_sigma=1.0, clip_value_pct=10)
        timed("class_viz", lambda: run_class_viz(store, [target], cfg=viz, device=device, source=src), classes=None)
        confident = None
        if "prob_top5" in meta.columns and len(meta):
            uniq = meta.drop_duplicates("image_id")
            m2 = uniq.assign(p1=[float(p[0]) if p is not None else 0.0 for p in uniq["prob_top5"]])
            confident = list(m2.sort_values(["p1", "path"], ascending=[False, True])["path"].iloc[:1])
        # PGD: one-step FGSM often fails on confidently classified images (its linearisation misleads)
        adv = AdvConfig(method="pgd", grid=4, steps=3, eps_min=0.25 / 255, eps_max=4 / 255)
        timed("adversarial", lambda: run_adversarial(store, images=confident, n_images=1, n_examples=1, cfg=adv,
                                                     device=device, source=src), flip_rate=None, median_eps_255=None)
    return out
