"""Shards: split a dataset-scale job into contiguous slices that run in parallel, then merge once.

Used by the extraction, attribution-audit and max-activation flows when they run on a distributed task
runner (``--runner dask``, :mod:`flows.runners`). The flow plans serially, takes the artefact lock, submits one
task per shard and merges / publishes once, under the lock. Shard tasks get small picklable jobs (a config,
paths, image records, a slice of a selection), load the model themselves, write their own content-addressed
files into the artefact directory and return small records (file entries, rejects, counters, a top-k table).
Nothing here holds a tensor of the dataset.

Same results as the local runner: shard boundaries fall on multiples of the batch size, so every batch a
shard forwards is exactly a batch of the unsharded run (bit-identical features on the same device), and the
merge keeps the unsharded order (shard order, not completion order).

The functions take ``run_shards(jobs) -> iterable of (index, result)``: the flow passes one that submits Prefect
tasks and yields as they finish; :func:`run_serially` runs them in this process (tests, debugging).
"""

from __future__ import annotations

import logging
import math
import hashlib
import multiprocessing
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from storage.errors import ConvlensError

__all__ = [
    "SHARD_MAX",
    "TARGET_SHARDS",
    "ShardMismatchError",
    "shard_bounds",
    "run_serially",
    "load_shard_model",
    "model_fingerprint",
    "ExtractShard",
    "extract_shard",
    "merge_extract_stats",
    "run_sharded_extraction",
    "MaxActShard",
    "max_activation_shard",
    "merge_max_activations",
    "sharded_max_activation_scan",
    "AUDIT_SHARD_MAX",
    "AuditShard",
    "audit_shard",
    "run_sharded_audit",
]

log = logging.getLogger(__name__)

SHARD_MAX = 8192  # images per shard by default: one ~42 MB part at D=1280, ~1.7 MB of records to ship
TARGET_SHARDS = 16  # small datasets are cut into about this many shards (load balance over a few workers)

RunShards = Callable[[list[Any]], Iterable[tuple[int, Any]]]


class ShardMismatchError(ConvlensError):
    """A shard worker resolved a different model / weights than the planner (e.g. a different weights file)."""


def shard_bounds(n: int, shard_size: int | None = None, align: int = 1, target: int = TARGET_SHARDS,
                 cap: int = SHARD_MAX) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` slices covering ``range(n)``.

    ``shard_size`` (images) is rounded up to a multiple of ``align`` (the batch size, so each shard's batches are
    the unsharded run's batches); ``None`` picks ``ceil(n / target)`` capped at ``cap``. Raises ``ValueError``
    for a size < 1.
    """
    if align < 1:
        raise ValueError(f"shard alignment must be >= 1, got {align}")
    if shard_size is None:
        shard_size = min(cap, max(1, math.ceil(n / target)))
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    size = math.ceil(shard_size / align) * align
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def run_serially(fn: Callable[[Any], Any]) -> RunShards:
    """A ``run_shards`` that runs ``fn(job)`` for each job in this process, in order."""
    def run(jobs: list[Any]) -> Iterable[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            yield i, fn(job)
    return run


# Seeded random init (``--weights none``) reseeds torch's global generator, which other threads also draw from
# (e.g. a DataLoader's base seed): a model is built once per process and worker, under a lock, before any shard of
# the process runs, and each shard gets its own deep copy (hooks are per copy).
_LOAD_LOCK = threading.Lock()
_MODELS: dict[tuple, Any] = {}
_MODELS_MAX = 2


def load_shard_model(model: str, weights: str, seed: int = 0, weights_prefix: str | None = None) -> Any:
    """A private copy of :func:`tasks.core.models.load_model`'s result, built once per process (thread-safe)."""
    import copy

    from tasks.core.models import load_model

    key = (model, weights, seed, weights_prefix, _stat(model), _stat(weights))  # a rewritten file is a new key
    with _LOAD_LOCK:
        lm = _MODELS.get(key)
        if lm is None:
            lm = load_model(model, weights, seed, weights_prefix)
            while len(_MODELS) >= _MODELS_MAX:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = lm
        return copy.deepcopy(lm)


def _stat(path: str) -> tuple[int, int] | None:
    import os

    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size)


def model_fingerprint(module: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): planner and shard workers must agree."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_model(index: int, module: Any, fingerprint: str | None) -> None:
    if fingerprint and model_fingerprint(module) != fingerprint:
        raise ShardMismatchError(f"shard {index}: the worker built a model whose weights differ from the planner's; "
                                 "workers must see the same model code, weights files and library versions as the flow")


def _in_daemon() -> bool:
    # Dask worker processes are daemonic by default and may not start DataLoader worker processes; decode then
    # runs in the worker itself. For GPU workers start them with DASK_DISTRIBUTED__WORKER__DAEMON=False so each
    # keeps its DataLoader decode processes (docs/scaling.md).
    return bool(multiprocessing.current_process().daemon)


# ------------------------------------------------------------------------------------------- extraction


class _Job:
    """Base of the shard jobs: a plain class on purpose (not a dataclass), so Prefect does not walk its
    thousands of records looking for futures when it is passed to ``task.submit``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={getattr(self, 'index', '?')})"


class ExtractShard(_Job):
    """One extraction shard: a slim plan (no dataset-wide record lists) and this shard's image records
    (``tasks.core.datasets.ImageRecord``, hashed)."""

    __slots__ = ("index", "plan", "records", "fingerprint")

    def __init__(self, index: int, plan: Any, records: list[Any], fingerprint: str | None = None) -> None:
        self.index, self.plan, self.records, self.fingerprint = index, plan, records, fingerprint


def extract_shard(job: ExtractShard) -> dict[str, Any]:
    """Decode and embed one shard into parts of the artefact directory (no lock: parts are content-addressed).

    Loads the model named by the plan's config (checked against the planner's weights fingerprint). Returns
    ``{"index", "entries", "rejects", "stats"}``: part entries, decode rejects, counters. Memory: one batch.
    """
    from tasks.extract.features import extract_records
    from tasks.core.models import apply_preprocess_overrides

    plan = job.plan
    cfg = plan.config
    if _in_daemon() and cfg.num_workers != 0:
        log.info("shard %d: daemonic Dask worker, decoding in-process (num_workers=0)", job.index)
        cfg = replace(cfg, num_workers=0)
        plan = replace(plan, config=cfg)
    lm = load_shard_model(cfg.model, cfg.weights, cfg.seed, cfg.weights_prefix)
    if any(v is not None for v in (cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)):
        lm = apply_preprocess_overrides(lm, cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)
    _check_model(job.index, lm.module, job.fingerprint)
    entries, rejects, stats = extract_records(plan, lm, job.records)
    log.info("shard %d: %d images, %d parts, %d rejects", job.index, len(job.records), len(entries), len(rejects))
    return {"index": job.index, "entries": entries, "rejects": rejects, "stats": stats}


def merge_extract_stats(results: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Counters of all shards as one run's stats (``seconds`` = wall time of the parallel section)."""
    extracted = sum(r["stats"].get("extracted", 0) for r in results)
    first = next((r["stats"] for r in results if r["stats"].get("dim")), {})
    return {"extracted": extracted, "decode_rejects": sum(len(r["rejects"]) for r in results),
            "seconds": round(seconds, 3), "images_per_s": round(extracted / seconds, 2) if seconds > 0 and extracted else 0.0,
            "dim": first.get("dim"), "with_preds": first.get("with_preds"), "shards": len(results),
            "shard_seconds": round(sum(r["stats"].get("seconds", 0.0) for r in results), 3)}


def run_sharded_extraction(cfg: Any, run_shards: RunShards | None = None, shard_size: int | None = None,
                           lm: Any = None) -> dict[str, Any]:
    """Plan, extract the new images shard by shard (in parallel through ``run_shards``), publish once.

    The artefact lock is held from planning to publishing by this process; shard tasks write parts without it.
    Each finished shard's parts are journalled (in shard order), so a killed run resumes from finished shards.
    Returns the published manifest. Default ``run_shards``: in-process, in order.
    """
    from storage.features import read_journal, write_journal
    from storage.locks import artefact_lock
    from tasks.extract.features import keep_if_unchanged, plan_extraction, publish_features

    plan, lm = plan_extraction(cfg, lm)
    adir = plan.artefact_dir
    adir.mkdir(parents=True, exist_ok=True)
    run_shards = run_shards or run_serially(extract_shard)
    with artefact_lock(adir):
        journal = read_journal(adir)
        kept = keep_if_unchanged(plan, journal)
        if kept is not None:
            return kept
        bounds = shard_bounds(len(plan.todo), shard_size, cfg.batch_size)
        slim = replace(plan, records=[], todo=[], rejects=[], stored_ids=set(), donors=[])
        fp = model_fingerprint(lm.module) if bounds else None
        jobs = [ExtractShard(i, slim, plan.todo[s:e], fp) for i, (s, e) in enumerate(bounds)]
        log.info("%s: %d listed, %d to extract in %d shards", plan.artefact_id, len(plan.records), len(plan.todo), len(jobs))
        base = list(journal.get("parts", []))
        done: dict[int, dict[str, Any]] = {}
        t0 = time.perf_counter()
        for i, res in run_shards(jobs):
            done[i] = res
            journal["parts"] = base + [e for j in sorted(done) for e in done[j]["entries"]]
            write_journal(adir, journal)
        if len(done) != len(jobs):
            raise ConvlensError(f"{len(jobs) - len(done)} of {len(jobs)} shards returned no result; nothing was "
                                "published. Rerun: finished shards are journalled and reused")
        results = [done[i] for i in range(len(jobs))]
        stats = merge_extract_stats(results, time.perf_counter() - t0)
        entries = [e for r in results for e in r["entries"]]
        rejects = [x for r in results for x in r["rejects"]]
        manifest = publish_features(plan, entries, rejects, stats, lm.categories)
    return manifest


# ------------------------------------------------------------------------------------- max activations


class MaxActShard(_Job):
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

    from tasks.neurons.common import Normalised, pick_device
    from tasks.neurons.max_activations import max_activation_pass

    lm = load_shard_model(job.model["model"], job.model["weights"], job.model["seed"])
    _check_model(job.index, lm.module, job.fingerprint)
    dev = pick_device(job.device)
    for p in lm.module.parameters():
        p.requires_grad_(False)
    net = Normalised(lm.module.eval(), job.preprocess.mean, job.preprocess.std).to(dev)
    try:
        top, size, skipped = max_activation_pass(net, job.files, job.preprocess, job.layer, job.k, job.batch_size, dev,
                                                 num_workers=0 if _in_daemon() else None, rf=job.rf,
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
        raise ValueError("no image could be decoded; nothing to rank")
    return top, size, skipped


def sharded_max_activation_scan(store: Any, features_id: str | None, run_shards: RunShards | None = None,
                                shard_size: int | None = None) -> Callable[..., Any]:
    """A ``scan`` for :func:`tasks.neurons.max_activations.run_max_activations`: the pass split into shards (run
    through ``run_shards``, default in-process) and merged in shard order. The shard workers rebuild the model of
    feature artefact ``features_id`` (as :func:`tasks.neurons.common.open_source` does) and check its fingerprint."""
    from storage.paths import Store

    _, fman = Store(store).resolve("features", features_id)
    spec = fman["model"]
    model = {"model": spec["arch"], "weights": spec.get("weights") or "imagenet", "seed": int(spec.get("seed") or 0)}

    def scan(net: Any, files: Sequence[Any], pre: Any, layer: str, k: int = 9, batch_size: int = 32, device: Any = None,
             num_workers: int | None = None, progress: bool = False, rf: Any = None, min_inside: float = 0.0):
        inner = getattr(net, "model", net)
        fp = model_fingerprint(inner)
        dev = str(device or next(net.parameters()).device)
        bounds = shard_bounds(len(files), shard_size, batch_size)
        jobs = [MaxActShard(i, s, list(files[s:e]), model, pre, layer, k, batch_size, dev, rf, min_inside, fp)
                for i, (s, e) in enumerate(bounds)]
        log.info("max-activations %s: %d images in %d shards", layer, len(files), len(jobs))
        done = dict((run_shards or run_serially(max_activation_shard))(jobs))
        if len(done) != len(jobs):
            raise ConvlensError(f"{len(jobs) - len(done)} of {len(jobs)} max-activation shards returned no result")
        return merge_max_activations([done[i] for i in range(len(jobs))])
    return scan


# ------------------------------------------------------------------------------------- attribution audit

AUDIT_SHARD_MAX = 256  # images per audit shard by default: each image costs hundreds of forward passes


class AuditShard(_Job):
    """One attribution-audit shard: a slice of the selection and the stored keys it may reuse."""

    __slots__ = ("index", "plan", "rows", "done", "fingerprint")

    def __init__(self, index: int, plan: Any, rows: Any, done: set, fingerprint: str | None) -> None:
        self.index, self.plan, self.rows, self.done, self.fingerprint = index, plan, rows, done, fingerprint


def audit_shard(job: AuditShard) -> dict[str, Any]:
    """Maps, overlays and score rows of one selection slice (:func:`tasks.attribution.audit.compute_audit`)."""
    from tasks.attribution.audit import audit_model, compute_audit
    from tasks.extract.features import pick_device

    plan = job.plan
    lm = load_shard_model(plan.spec["arch"], plan.weights, int(plan.spec.get("seed") or 0))
    _check_model(job.index, lm.module, job.fingerprint)
    model = audit_model(lm.module, pick_device(plan.config.device))
    res = compute_audit(plan, model, job.rows, job.done)
    log.info("audit shard %d: %d images, %d maps computed", job.index, len(job.rows), res["computed"])
    return res


def run_sharded_audit(cfg: Any, run_shards: RunShards | None = None, shard_size: int | None = None) -> dict[str, Any]:
    """:func:`tasks.attribution.audit.run_audit` with the selection split into shards (aligned to the image batch)
    computed through ``run_shards`` (default in-process); one publish under the artefact lock. Returns the manifest."""
    from storage.locks import artefact_lock
    from tasks.attribution.audit import plan_audit, publish_audit, stored_scores

    t0 = time.perf_counter()
    plan, lm = plan_audit(cfg)
    fp = model_fingerprint(lm.module)
    with artefact_lock(plan.artefact_dir):
        old, scores, done = stored_scores(plan)
        sel = plan.selection
        bounds = shard_bounds(len(sel), shard_size, plan.config.image_batch, cap=AUDIT_SHARD_MAX)
        slim = replace(plan, selection=sel.iloc[:0])
        jobs = []
        for i, (s, e) in enumerate(bounds):
            rows = sel.iloc[s:e]
            ids = set(rows["image_id"])
            jobs.append(AuditShard(i, slim, rows, {k for k in done if k[0] in ids}, fp))
        log.info("%s: %d images in %d shards", plan.artefact_id, len(sel), len(jobs))
        got = dict((run_shards or run_serially(audit_shard))(jobs))
        if len(got) != len(jobs):
            raise ConvlensError(f"{len(jobs) - len(got)} of {len(jobs)} audit shards returned no result; nothing "
                                "was published (their maps are garbage until the next run)")
        return publish_audit(plan, old, scores, [got[i] for i in range(len(jobs))], time.perf_counter() - t0)
