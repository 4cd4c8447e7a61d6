"""Extraction in shards (``--runner dask``): see :mod:`tasks.core.sharding` for the contract."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Sequence

from storage.errors import ConvlensError
from tasks.core.sharding import RunShards, ShardJob, check_model, in_daemon, load_shard_model, model_fingerprint, run_serially, shard_bounds

__all__ = ["ExtractShard", "extract_shard", "merge_extract_stats", "run_sharded_extraction"]

log = logging.getLogger(__name__)


class ExtractShard(ShardJob):
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
    from tasks.core.models import apply_preprocess_overrides
    from tasks.extract.features import extract_records

    plan = job.plan
    cfg = plan.config
    if in_daemon() and cfg.num_workers != 0:
        log.info("shard %d: daemonic Dask worker, decoding in-process (num_workers=0)", job.index)
        cfg = replace(cfg, num_workers=0)
        plan = replace(plan, config=cfg)
    lm = load_shard_model(cfg.model, cfg.weights, cfg.seed, cfg.weights_prefix)
    if any(v is not None for v in (cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)):
        lm = apply_preprocess_overrides(lm, cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)
    check_model(job.index, lm.module, job.fingerprint)
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
    Listed copies of images a shard rejected are decoded afterwards in this process (``extract_copies``), so no
    listed path ends without a row or a reject. Returns the published manifest. Default ``run_shards``:
    in-process, in order.
    """
    from storage.features import read_journal, write_journal
    from storage.locks import artefact_lock
    from tasks.extract.features import extract_copies, keep_if_unchanged, model_for_plan, plan_extraction, publish_features

    plan, lm = plan_extraction(cfg, lm)
    adir = plan.artefact_dir
    adir.mkdir(parents=True, exist_ok=True)
    run_shards = run_shards or run_serially(extract_shard)
    with artefact_lock(adir):
        journal = read_journal(adir)
        kept = keep_if_unchanged(plan, journal)
        if kept is not None:
            return kept
        lm = model_for_plan(plan, lm)  # None from a no-op-looking plan (model identity cache): built only now
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

        def on_part(entry: dict[str, Any]) -> None:
            journal["parts"] = journal.get("parts", []) + [entry]
            write_journal(adir, journal)

        # copies of images whose one decoded copy a shard rejected: decoded here, in-process (rare, few)
        entries, rejects, stats = extract_copies(plan, lm, entries, rejects, stats, on_part)
        manifest = publish_features(plan, entries, rejects, stats, lm.categories)
    return manifest
