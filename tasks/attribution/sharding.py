"""The attribution audit in shards (``--runner dask``): see :mod:`tasks.core.sharding`."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from storage.errors import ConvlensError
from tasks.core.sharding import RunShards, ShardJob, check_model, load_shard_model, model_fingerprint, run_serially, shard_bounds

__all__ = ["AUDIT_SHARD_MAX", "AuditShard", "audit_shard", "run_sharded_audit"]

log = logging.getLogger(__name__)


AUDIT_SHARD_MAX = 256  # images per audit shard by default: each image costs hundreds of forward passes


class AuditShard(ShardJob):
    """One attribution-audit shard: a slice of the selection, the stored keys it may reuse and the
    ``(image_id, method, params_hash)`` keys an interrupted run already journalled (skipped)."""

    __slots__ = ("index", "plan", "rows", "done", "fingerprint", "finished")

    def __init__(self, index: int, plan: Any, rows: Any, done: set, fingerprint: str | None,
                 finished: set | frozenset = frozenset()) -> None:
        self.index, self.plan, self.rows, self.done, self.fingerprint = index, plan, rows, done, fingerprint
        self.finished = finished


def audit_shard(job: AuditShard) -> dict[str, Any]:
    """Maps, overlays and score rows of one selection slice (:func:`tasks.attribution.audit.compute_audit`)."""
    from tasks.attribution.audit import audit_model, compute_audit
    from tasks.core.forward import pick_device

    plan = job.plan
    r = plan.recipe  # approved by plan_audit (tasks.core.models.resolve_manifest_model), never the manifest's word
    lm = load_shard_model(r.model, r.weights, r.seed, r.weights_prefix)
    check_model(job.index, lm.module, job.fingerprint)
    model = audit_model(lm.module, pick_device(plan.config.device))
    res = compute_audit(plan, model, job.rows, job.done, finished=getattr(job, "finished", frozenset()))
    log.info("audit shard %d: %d images, %d maps computed", job.index, len(job.rows), res["computed"])
    return res


def run_sharded_audit(cfg: Any, run_shards: RunShards | None = None, shard_size: int | None = None) -> dict[str, Any]:
    """:func:`tasks.attribution.audit.run_audit` with the selection split into shards (aligned to the image batch)
    computed through ``run_shards`` (default in-process); one publish under the artefact lock. Returns the manifest.

    Each finished shard's result is journalled as it arrives (``journal.json``, under the lock), so a killed run
    resumes: shards whose images the journal already holds are not submitted again, and the publish merges the
    journalled and the new results in selection order (the same result as an uninterrupted run).
    """
    from storage.locks import artefact_lock
    from tasks.attribution.audit import journal_result, plan_audit, publish_audit, resume_audit, stored_scores

    t0 = time.perf_counter()
    plan, lm = plan_audit(cfg)
    fp = model_fingerprint(lm.module)
    with artefact_lock(plan.artefact_dir):
        old, scores, done = stored_scores(plan)
        journal, results, finished = resume_audit(plan, done)
        sel = plan.selection
        bounds = shard_bounds(len(sel), shard_size, plan.config.image_batch, cap=AUDIT_SHARD_MAX)
        slim = replace(plan, selection=sel.iloc[:0])
        jobs = []
        for s, e in bounds:
            rows = sel.iloc[s:e]
            ids = set(rows["image_id"])
            if all((i, m, plan.phash[m]) in finished for i in ids for m in plan.methods):
                continue  # journalled by an interrupted run
            jobs.append(AuditShard(len(jobs), slim, rows, {k for k in done if k[0] in ids}, fp,
                                   {k for k in finished if k[0] in ids}))
        log.info("%s: %d images in %d shards (%d more journalled)", plan.artefact_id, len(sel), len(jobs),
                 len(bounds) - len(jobs))
        got: dict[int, dict[str, Any]] = {}
        for i, res in (run_shards or run_serially(audit_shard))(jobs):
            got[i] = res
            journal_result(plan, journal, res)
        if len(got) != len(jobs):
            raise ConvlensError(f"{len(jobs) - len(got)} of {len(jobs)} audit shards returned no result; nothing "
                                "was published. Rerun: finished shards are journalled and reused")
        return publish_audit(plan, old, scores, results + [got[i] for i in range(len(jobs))], time.perf_counter() - t0)
