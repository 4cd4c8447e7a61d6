"""Flow + CLI: the neuron toolbox (filters, activation maps, max-activating patches, class visualisation,
feature inversion, DeepDream, style transfer, adversarial robustness audit, feature evolution, invariance,
transfer comparison). Each run publishes one ``neurons`` artefact; a rerun with the same inputs reuses it.

``convlens neurons TECHNIQUE ...`` runs in-process, or as the Prefect flow ``neurons`` when a Prefect API is
configured (``--prefect``). The work lives in :mod:`tasks.neurons`; this file only maps parameters.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.errors import UsageError
from tasks.neurons import run_technique

__all__ = ["neurons", "neurons_task", "max_act_shard_task", "summarise", "register"]

def summarise(technique: str, result: dict[str, Any]) -> dict[str, Any]:
    """Small record for logs / CLI output (drops file lists and library versions)."""
    if technique == "defaults":
        return result
    drop = {"files", "library_versions", "source", "params", "curves", "metrics"}
    return {k: v for k, v in result.items() if k not in drop}


@task(name="neurons-technique", retries=0)
def neurons_task(technique: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    return summarise(technique, run_technique(technique, store, params))


@task(name="max-act-shard", retries=0, cache_policy=NO_CACHE)
def max_act_shard_task(job: Any) -> dict[str, Any]:
    """Running top-k of one shard of the max-activation pass (small arrays, no images)."""
    from tasks.neurons.sharding import max_activation_shard

    return max_activation_shard(job)


@flow(name="neurons", log_prints=False)
def neurons(technique: str, store: str = "convlens-store", params: dict[str, Any] | None = None,
            shard_size: int | None = None) -> dict[str, Any]:
    """Run one neuron technique on STORE; returns the artefact summary.

    ``max-act`` scales out: under a Dask task runner (or with ``shard_size > 0``) its pass over the images runs as
    parallel ``max-act-shard`` tasks whose top-k tables are merged, under the artefact lock, in this flow run.
    ``shard_size``: ``None`` = shard under Dask only, ``0`` = never, ``N`` = N images per shard."""
    from flows.runners import shard_setting, submit_shards

    shard, size = shard_setting(shard_size)
    if technique == "max-act" and shard:
        from tasks.neurons.sharding import sharded_max_activation_scan

        params = dict(params or {})
        scan = sharded_max_activation_scan(store, params.get("features_id"), submit_shards(max_act_shard_task), size,
                                           model=params.get("model"), weights=params.get("weights"))
        out = summarise(technique, run_technique(technique, store, {**params, "scan": scan}))
        get_run_logger().info("neurons %s: %s", technique, out.get("artefact_id", out))
        return out
    out = neurons_task(technique, store, params or {})
    get_run_logger().info("neurons %s: %s", technique, out.get("artefact_id", out))
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def _ints(text: str | None) -> list[int] | None:
    return [int(t) for t in text.split(",") if t.strip()] if text else None


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _params(cmd: str, a: argparse.Namespace) -> dict[str, Any]:
    src: dict[str, Any] = {"features_id": getattr(a, "features", None)}
    for name in ("model", "weights"):  # only when given: the technique's own defaults apply otherwise
        if getattr(a, name, None):
            src[name] = getattr(a, name)
    dev = {"device": getattr(a, "device", "auto")}
    force = {"force": getattr(a, "force", False)}
    if cmd == "filters":
        return {**src, "layers": a.layer or None, "max_filters": a.max_filters, **force}
    if cmd == "activations":
        return {**src, **dev, **force, "layer": a.layer, "images": a.image or None, "n_images": a.n_images,
                "channels": _ints(a.channels), "max_channels": a.max_channels}
    if cmd == "max-act":
        return {**src, **dev, **force, "layer": a.layer, "k": a.k, "channels": _ints(a.channels),
                "png_channels": a.png_channels, "batch_size": a.batch_size, "limit": a.limit, "min_inside": a.min_inside,
                "progress": True}
    if cmd == "class-viz":
        cfg = {"size": a.size, "steps": a.steps, "lr": a.lr, "l2": a.l2, "jitter": a.jitter, "blur_every": a.blur_every,
               "blur_sigma": a.blur_sigma, "clip_value_pct": a.clip_value_pct, "clip_grad_pct": a.clip_grad_pct,
               "init": a.init, "seed": a.seed, "param": a.param, "batch": a.batch}
        return {**src, **dev, **force, "targets": a.target, "cfg": cfg}
    if cmd == "channel-viz":
        cfg = {"size": a.size, "steps": a.steps, "lr": a.lr, "jitter": a.jitter, "seed": a.seed, "batch": a.batch}
        return {**src, **dev, **force, "layer": a.layer, "channels": _ints(a.channels), "cfg": cfg}
    if cmd == "invert":
        cfg = {"steps": a.steps, "lr": a.lr, "tv_weight": a.tv_weight, "size": a.size}
        return {**src, **dev, **force, "layers": a.layer, "images": a.image or None, "n_images": a.n_images, "cfg": cfg}
    if cmd == "dream":
        cfg = {"octaves": a.octaves, "octave_scale": a.octave_scale, "steps_per_octave": a.steps, "lr": a.lr,
               "jitter": a.jitter, "channel": a.channel}
        return {**src, **dev, **force, "layer": a.layer, "images": a.image or None, "n_images": a.n_images, "cfg": cfg}
    if cmd == "style":
        cfg = {"content_layer": a.content_layer, "style_layers": tuple(a.style_layer or ()), "steps": a.steps,
               "optimizer": a.optimizer, "style_weight": a.style_weight, "content_weight": a.content_weight,
               "tv_weight": a.tv_weight, "size": a.size, "lr": a.lr}
        return {**src, **dev, **force, "content": a.content, "style": a.style_image, "cfg": cfg}
    if cmd == "adversarial":
        cfg = {"method": a.method, "target": a.target, "eps_max": a.eps_max / 255, "eps_min": a.eps_min / 255,
               "grid": a.grid, "steps": a.steps}
        return {**src, **dev, **force, "images": a.image or None, "n_images": a.n_images, "n_examples": a.examples, "cfg": cfg}
    if cmd == "evolution":
        return {**src, **dev, **force, "checkpoints": a.checkpoint, "arch": a.arch, "layer": a.layer,
                "channels": _ints(a.channels) or [0, 1, 2, 3], "k": a.k, "limit": a.limit, "labels": a.label or None}
    if cmd == "invariance":
        tr = {}
        for kind in ("translate", "scale", "rotate"):
            v = getattr(a, kind)
            if v:
                tr[kind] = _floats(v)
        return {**src, **dev, **force, "layer": a.layer, "n_images": a.n_images,
                "images": a.image or None, "transforms": tr or None}
    if cmd == "compare":
        return {"features_a": a.a, "features_b": a.b, "k": a.k, **force}
    if cmd == "defaults":
        return {**src, **dev}
    raise UsageError(cmd)


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    cmd = args.neurons_command
    params = _params(cmd, args)
    extra = {"shard_size": args.shard_size} if getattr(args, "shard_size", None) is not None else {}
    result = run_stage(args, neurons, lambda: summarise(cmd, run_technique(cmd, args.store, params)),
                       technique=cmd, store=args.store, params=params, **extra)
    if cmd == "defaults":
        text = "\n".join(f"{k}: {v}" for k, v in result.items())
    else:
        text = (f"neurons {result.get('technique')} {result['artefact_id']}"
                f"{' (reused)' if result.get('reused') else ''}\nstore: {args.store}/neurons/{result['artefact_id']}")
    emit(result, args.json, text)
    return 0


def _common(p: argparse.ArgumentParser, model: bool = True, device: bool = True) -> None:
    from flows.cli import add_store_argument

    add_store_argument(p)
    p.add_argument("--features", default=None, help="feature artefact id (or prefix) giving model + images (default newest)")
    allow = ("the feature artefact's model: needed to run a factory (module:factory) or TorchScript model it names, "
             "since those run code and a store's manifest alone never chooses code (or list it in your trust file)")
    if model:
        p.add_argument("--model", default=None, help="without --features: run on this model instead of a feature "
                       f"artefact's (torchvision name, timm:NAME, module:factory, TorchScript file); with --features: {allow}")
        p.add_argument("--weights", default=None, help="with --model alone: imagenet (default) | none | PATH; with "
                       "features: the weights file (default: the path they recorded; sha256-checked)")
    else:
        p.add_argument("--model", default=None, help=allow)
        p.add_argument("--weights", default=None,
                       help="the features' weights file (default: the path they recorded; sha256-checked)")
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical artefact exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cli)


def register(sub) -> None:
    p = sub.add_parser("neurons", help="filters, activations, max-activating patches, class viz, inversion, dream, "
                       "style, adversarial, evolution, invariance, transfer comparison",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ns = p.add_subparsers(dest="neurons_command", metavar="TECHNIQUE", required=True)

    q = ns.add_parser("filters", help="first-layer filters (RGB grid) or any conv layer's channel grids")
    _common(q, device=False)
    q.add_argument("--layer", action="append", help="Conv2d module name (repeatable; default the first conv)")
    q.add_argument("--max-filters", type=int, default=32)

    q = ns.add_parser("activations", help="activation maps of a layer for chosen images")
    _common(q)
    q.add_argument("--layer", required=True)
    q.add_argument("--image", action="append", help="dataset-relative path (with --features) or a file (with --model)")
    q.add_argument("--n-images", type=int, default=4)
    q.add_argument("--channels", default=None, help="comma-separated channel indices (default the most active)")
    q.add_argument("--max-channels", type=int, default=15)

    q = ns.add_parser("max-act", help="top-k images and receptive-field patches per channel over the dataset")
    _common(q, model=False)
    q.add_argument("--layer", default=None, help="module name (default a mid-depth conv block)")
    q.add_argument("-k", type=int, default=9)
    q.add_argument("--channels", default=None, help="channels drawn as patch grids (default the strongest)")
    q.add_argument("--png-channels", type=int, default=8)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--limit", type=int, default=None, help="use only the first N images (by path)")
    q.add_argument("--min-inside", type=float, default=0.5,
                   help="rank only units whose receptive field is at least this fraction inside the image (0 = all)")
    from flows.runners import add_runner_arguments

    add_runner_arguments(q)

    q = ns.add_parser("class-viz", help="class visualisation by gradient ascent")
    _common(q)
    q.add_argument("--target", action="append", required=True, help="class index or name (repeatable)")
    q.add_argument("--size", type=int, default=224)
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--lr", type=float, default=0.1)
    q.add_argument("--l2", type=float, default=1e-3)
    q.add_argument("--jitter", type=int, default=8)
    q.add_argument("--blur-every", type=int, default=10)
    q.add_argument("--blur-sigma", type=float, default=0.5)
    q.add_argument("--clip-value-pct", type=float, default=0.0)
    q.add_argument("--clip-grad-pct", type=float, default=0.0)
    q.add_argument("--init", choices=["zero", "noise"], default="zero", help="pixel method's start image")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--param", choices=["fourier", "pixel"], default="fourier",
                   help="fourier (default): decorrelated Fourier image + random jitter / scale / rotation each step; "
                        "pixel: the seeds' pixel-space ascent with L2 / blur / clipping")
    q.add_argument("--batch", type=int, default=1, help="fourier: transformed copies per step")

    q = ns.add_parser("channel-viz", help="channel visualisation (the class viz optimiser on a channel's mean "
                      "activation), shown beside the channel's max-activating patches")
    _common(q)
    q.add_argument("--layer", default=None, help="module name (default: the newest max-act artefact's layer)")
    q.add_argument("--channels", default=None, help="comma list (default: the channels that max-act artefact drew)")
    q.add_argument("--size", type=int, default=128)
    q.add_argument("--steps", type=int, default=128)
    q.add_argument("--lr", type=float, default=0.05)
    q.add_argument("--jitter", type=int, default=8)
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--seed", type=int, default=0)

    q = ns.add_parser("invert", help="feature inversion: reconstruct images from a layer's features")
    _common(q)
    q.add_argument("--layer", action="append", required=True, help="layer to invert (repeatable)")
    q.add_argument("--image", action="append")
    q.add_argument("--n-images", type=int, default=1)
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--lr", type=float, default=0.05)
    q.add_argument("--tv-weight", type=float, default=1e-2)
    q.add_argument("--size", type=int, default=None)

    q = ns.add_parser("dream", help="DeepDream: amplify a layer's activations on an image")
    _common(q)
    q.add_argument("--layer", required=True)
    q.add_argument("--image", action="append")
    q.add_argument("--n-images", type=int, default=1)
    q.add_argument("--octaves", type=int, default=3)
    q.add_argument("--octave-scale", type=float, default=1.4)
    q.add_argument("--steps", type=int, default=10, help="steps per octave")
    q.add_argument("--lr", type=float, default=0.01)
    q.add_argument("--jitter", type=int, default=16)
    q.add_argument("--channel", type=int, default=None)

    q = ns.add_parser("style", help="style transfer (Gram matrices + content + TV)")
    _common(q)
    q.add_argument("content", help="content image file")
    q.add_argument("style_image", metavar="style", help="style image file")
    q.add_argument("--content-layer", default=None)
    q.add_argument("--style-layer", action="append")
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--optimizer", choices=["lbfgs", "adam"], default="lbfgs")
    q.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    q.add_argument("--style-weight", type=float, default=10.0)
    q.add_argument("--content-weight", type=float, default=1.0)
    q.add_argument("--tv-weight", type=float, default=1e-2)
    q.add_argument("--size", type=int, default=None)

    q = ns.add_parser("adversarial", help="FGSM / PGD robustness audit: perturbation needed to flip each image")
    _common(q)
    q.add_argument("--image", action="append")
    q.add_argument("--n-images", type=int, default=16)
    q.add_argument("--method", choices=["fgsm", "pgd"], default="fgsm")
    q.add_argument("--target", default=None, help="target class (index or name); default untargeted")
    q.add_argument("--eps-max", type=float, default=16.0, help="largest L-inf eps, in 1/255 units")
    q.add_argument("--eps-min", type=float, default=0.25, help="smallest eps on the grid, in 1/255 units")
    q.add_argument("--grid", type=int, default=12)
    q.add_argument("--steps", type=int, default=10, help="PGD steps")
    q.add_argument("--examples", type=int, default=4, help="example PNGs to keep")

    q = ns.add_parser("evolution", help="filters + max-activating patches per training checkpoint")
    _common(q, model=False)
    q.add_argument("--checkpoint", action="append", required=True, help="state-dict file (repeatable, in order)")
    q.add_argument("--label", action="append", help="label per checkpoint (e.g. epoch)")
    q.add_argument("--arch", default=None, help="architecture (default the feature artefact's)")
    q.add_argument("--layer", default=None)
    q.add_argument("--channels", default=None)
    q.add_argument("-k", type=int, default=6)
    q.add_argument("--limit", type=int, default=256)

    q = ns.add_parser("invariance", help="feature distance / class probability under translation, scale, rotation")
    _common(q, model=False)
    q.add_argument("--layer", default=None, help="default fc7 or penultimate")
    q.add_argument("--n-images", type=int, default=8)
    q.add_argument("--image", action="append")
    q.add_argument("--translate", default=None, help="comma-separated pixel shifts")
    q.add_argument("--scale", default=None, help="comma-separated factors")
    q.add_argument("--rotate", default=None, help="comma-separated degrees")

    q = ns.add_parser("compare", help="compare two feature artefacts: kNN accuracy, linear probe, neighbour overlap")
    from flows.cli import add_store_argument

    add_store_argument(q)
    q.add_argument("--a", required=True, help="feature artefact id A (e.g. frozen)")
    q.add_argument("--b", required=True, help="feature artefact id B (e.g. fine-tuned)")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--force", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cli)

    q = ns.add_parser("defaults", help="the demo set: filters, max-act, one class viz, one adversarial example")
    _common(q, model=False)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["neurons", *sys.argv[1:]]))
