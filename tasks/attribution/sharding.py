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
    """One attribution-audit shard: a slice of the selection and the stored keys it may reuse."""

    __slots__ = ("index", "plan", "rows", "done", "fingerprint")

    def __init__(self, index: int, plan: Any, rows: Any, done: set, fingerprint: str | None) -> None:
        self.index, self.plan, self.rows, self.done, self.fingerprint = index, plan, rows, done, fingerprint


def audit_shard(job: AuditShard) -> dict[str, Any]:
    """Maps, overlays and score rows of one selection slice (:func:`tasks.attribution.audit.compute_audit`)."""
    from tasks.attribution.audit import audit_model, compute_audit
    from tasks.core.forward import pick_device

    plan = job.plan
    lm = load_shard_model(plan.spec["arch"], plan.weights, int(plan.spec.get("seed") or 0))
    check_model(job.index, lm.module, job.fingerprint)
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
