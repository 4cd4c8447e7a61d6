"""The max-activation scan in shards (``--runner dask``): see :mod:`tasks.core.sharding`."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from storage.errors import ConvlensError, UsageError
from tasks.core.sharding import RunShards, ShardJob, check_model, in_daemon, load_shard_model, model_fingerprint, run_serially, shard_bounds

__all__ = ["MaxActShard", "max_activation_shard", "merge_max_activations", "sharded_max_activation_scan"]

log = logging.getLogger(__name__)


class MaxActShard(ShardJob):
    """One max-activation shard: image files ``[start, start + len(files))`` of the pass and how to rank them."""

    __slots__ = ("index", "start", "files", "model", "preprocess", "layer", "k", "batch_size", "device", "rf",
                 "min_inside", "fingerprint")

    def __init__(self, index: int, start: int, files: list[Any], model: dict[str, Any], preprocess: Any, layer: str,
                 k: int, batch_size: int, device: str, rf: Any, min_inside: float, fingerprint: str | None) -> None:
        self.index, self.start, self.files, self.model, self.preprocess = index, start, files, model, preprocess
        self.layer, self.k, self.batch_size, self.device, self.rf = layer, k, batch_size, device, rf
        self.min_inside, self.fingerprint = min_inside, fingerprint


def max_activation_shard(job: MaxActShard) -> dict[str, Any]:
    """Running top-k of one shard: ``{"index", "values" (C, k) float32, "rows" / "ys" / "xs" (C, k) int64 (rows
    are indices into the whole pass), "size" (h, w), "skipped" (global indices)}``; ``values`` is ``None`` when
    no image of the shard decoded. Memory O(k x C + batch)."""
    import torch

    from tasks.core.forward import pick_device
    from tasks.neurons.common import Normalised
    from tasks.neurons.max_activations import max_activation_pass

    lm = load_shard_model(job.model["model"], job.model["weights"], job.model["seed"], job.model.get("weights_prefix"))
    check_model(job.index, lm.module, job.fingerprint)
    dev = pick_device(job.device)
    for p in lm.module.parameters():
        p.requires_grad_(False)
    net = Normalised(lm.module.eval(), job.preprocess.mean, job.preprocess.std).to(dev)
    try:
        top, size, skipped = max_activation_pass(net, job.files, job.preprocess, job.layer, job.k, job.batch_size, dev,
                                                 num_workers=0 if in_daemon() else None, rf=job.rf,
                                                 min_inside=job.min_inside)
    except ValueError as exc:
        if not str(exc).startswith("no image could be decoded"):
            raise
        return {"index": job.index, "values": None, "size": None, "skipped": list(range(job.start, job.start + len(job.files)))}
    shift = lambda t: torch.where(t >= 0, t + job.start, t).numpy()  # noqa: E731
    return {"index": job.index, "values": top.values.numpy(), "rows": shift(top.rows), "ys": top.ys.numpy(),
            "xs": top.xs.numpy(), "size": size, "skipped": [job.start + i for i in skipped]}


def merge_max_activations(results: Sequence[dict[str, Any]]) -> tuple[Any, tuple[int, int], list[int]]:
    """Shard results (in shard order) -> ``(TopK, map size, skipped)`` as one :func:`max_activation_pass` gives."""
    import torch

    from tasks.neurons.max_activations import TopK

    top, size, skipped = None, (0, 0), []
    for r in results:
        skipped.extend(r["skipped"])
        if r["values"] is None:
            continue
        part = TopK(torch.from_numpy(r["values"]), torch.from_numpy(r["rows"]), torch.from_numpy(r["ys"]),
                    torch.from_numpy(r["xs"]))
        if top is None:
            top, size = part, tuple(r["size"])
        else:
            top.merge(part)
    if top is None:
        raise UsageError("no image could be decoded; nothing to rank")
    return top, size, skipped


def sharded_max_activation_scan(store: Any, features_id: str | None, run_shards: RunShards | None = None,
                                shard_size: int | None = None, model: str | None = None,
                                weights: str | None = None) -> Callable[..., Any]:
    """A ``scan`` for :func:`tasks.neurons.max_activations.run_max_activations`: the pass split into shards (run
    through ``run_shards``, default in-process) and merged in shard order. The shard workers rebuild the model of
    feature artefact ``features_id`` as :func:`tasks.neurons.common.open_source` does (the same trust rule and
    weights check, ``model`` / ``weights`` being the user's ``--model`` / ``--weights``) and check its fingerprint."""
    from storage.paths import Store
    from tasks.core.models import resolve_manifest_model

    aid, fman = Store(store).resolve("features", features_id)
    r = resolve_manifest_model(fman["model"], user_model=model, user_weights=weights, artefact=aid)
    recipe = {"model": r.model, "weights": r.weights, "seed": r.seed, "weights_prefix": r.weights_prefix}

    def scan(net: Any, files: Sequence[Any], pre: Any, layer: str, k: int = 9, batch_size: int = 32, device: Any = None,
             num_workers: int | None = None, progress: bool = False, rf: Any = None, min_inside: float = 0.0):
        inner = getattr(net, "model", net)
        fp = model_fingerprint(inner)
        dev = str(device or next(net.parameters()).device)
        bounds = shard_bounds(len(files), shard_size, batch_size)
        jobs = [MaxActShard(i, s, list(files[s:e]), recipe, pre, layer, k, batch_size, dev, rf, min_inside, fp)
                for i, (s, e) in enumerate(bounds)]
        log.info("max-activations %s: %d images in %d shards", layer, len(files), len(jobs))
        done = dict((run_shards or run_serially(max_activation_shard))(jobs))
        if len(done) != len(jobs):
            raise ConvlensError(f"{len(jobs) - len(done)} of {len(jobs)} max-activation shards returned no result")
        return merge_max_activations([done[i] for i in range(len(jobs))])
    return scan
