"""Flow: attribution audit — occlusion / saliency / guided / deconvnet / Grad-CAM / SmoothGrad / IG maps over a
selection of a feature artefact's images, stored with overlays and faithfulness scores.

Parameters mirror ``convlens audit``. Steps: resolve the feature artefact and select images -> compute the
missing (image, method, parameters, target) maps in batches -> score deletion / insertion AUC -> publish the
``audits`` artefact (kind ``attribution``; layout in docs/attribution.md). Incremental: a rerun computes only
what is not stored yet.

Sanity check: ``convlens audit --sanity N`` (or ``convlens audit-sanity`` on a stored audit) then re-runs each
method on N audited images with the model's top layers randomised (Adebayo et al. 2018,
:mod:`tasks.attribution.sanity`) and flags the methods whose maps do not depend on the learned weights.

Scale-out: under a Dask task runner (``--runner dask``, :mod:`flows.runners`) or with ``shard_size > 0`` the
selection is split into shards computed by parallel ``attribution-shard`` tasks (maps and overlays written by
each); the scores merge / publish runs once under the artefact lock (:func:`tasks.attribution.sharding.run_sharded_audit`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runners import shard_setting, submit_shards
from tasks.attribution.audit import DEFAULT_METHODS, SELECT_POLICIES, AuditConfig, run_audit, summarise
from tasks.attribution.sanity import SanityConfig, run_sanity, summarise_sanity
from tasks.attribution.sharding import AuditShard, audit_shard, run_sharded_audit

__all__ = ["attribution_audit", "audit_task", "audit_shard_task", "attribution_sanity", "sanity_task", "add_arguments",
           "config_from_args", "register"]


@task(name="attribution-audit", retries=0)
def audit_task(cfg: AuditConfig) -> dict[str, Any]:
    """Select, compute, score and publish under the artefact lock; returns the small summary."""
    return summarise(run_audit(cfg))


@task(name="attribution-shard", retries=0, cache_policy=NO_CACHE)
def audit_shard_task(job: AuditShard) -> dict[str, Any]:
    """Maps, overlays and score rows of one slice of the selection (no lock; content-addressed files)."""
    return audit_shard(job)


@flow(name="attribution-audit", log_prints=False)
def attribution_audit(cfg: AuditConfig, shard_size: int | None = None) -> dict[str, Any]:
    """Audit ``cfg.n`` selected images of a feature artefact with ``cfg.methods``; returns a summary.

    ``shard_size``: ``None`` shards automatically under a Dask task runner only, ``0`` never, ``N`` images per
    shard (rounded up to the image batch) on any task runner."""
    cfg = replace(cfg, progress=False)
    shard, size = shard_setting(shard_size)
    if shard:
        summary = summarise(run_sharded_audit(cfg, submit_shards(audit_shard_task), size))
    else:
        summary = audit_task(cfg)
    get_run_logger().info("published %(artefact_id)s: %(computed)d maps computed, %(reused)d reused", summary)
    return summary


@task(name="attribution-sanity", retries=0)
def sanity_task(store: str, audit_id: str | None, cfg: SanityConfig, model: str | None = None,
                weights: str | None = None, methods: list[str] | None = None) -> dict[str, Any]:
    """The model-parameter randomisation check of a stored audit; returns its small summary."""
    return summarise_sanity(run_sanity(store, audit_id, cfg=cfg, methods=methods, model=model, weights=weights))


@flow(name="attribution-sanity", log_prints=False)
def attribution_sanity(store: str, audit_id: str | None = None, cfg: SanityConfig = SanityConfig(),
                       model: str | None = None, weights: str | None = None,
                       methods: list[str] | None = None) -> dict[str, Any]:
    """Randomise the model's top layers, recompute the audit's maps on ``cfg.n`` images (``methods``: default every
    method the audit stored), publish the verdicts."""
    summary = sanity_task(store, audit_id, cfg, model, weights, methods)
    get_run_logger().info("sanity check %(artefact_id)s: %(verdicts)s", summary)
    return summary


def _sanity_text(r: dict[str, Any]) -> str:
    lines = [f"sanity check {r['artefact_id']} of {r['attribution']}: {r['images']} images, top "
             f"{r['verdict_depth']} of {r['layers']} layers randomised at the verdict"
             + (" (reused)" if r.get("reused") else "")]
    for m, v in r["verdicts"].items():
        lines.append(f"  {m}: Spearman {v['median_spearman']} -> "
                     + ("FLAGGED: does not depend on what the model learned" if v["flagged"] else "ok"))
    return "\n".join(lines)


def _sanity_config(a: argparse.Namespace, n: int) -> SanityConfig:
    depths = tuple(int(x) for x in a.sanity_depths.split(",") if x.strip()) if a.sanity_depths else None
    return SanityConfig(n=n, depths=depths, threshold=a.sanity_threshold, seed=getattr(a, "seed", 0),
                        device=getattr(a, "device", "auto"))


def _add_sanity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sanity-threshold", type=float, default=0.8,
                   help="flag a method whose median Spearman (trained vs randomised maps) at the verdict depth is "
                        "at least this (default 0.8)")
    p.add_argument("--sanity-depths", default=None,
                   help="comma list of cascade depths (top layers randomised; default 1,2,3, a quarter, half, all)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artefact", default=None, help="feature artefact id or prefix (default: the newest)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list: occlusion,saliency,guided,deconvnet,gradcam,smoothgrad,ig "
                        f"(default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--select", default="random",
                   help=f"image selection policy: {', '.join(SELECT_POLICIES)} (default random)")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for --select random and SmoothGrad noise")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=64, help="copies per forward pass (occlusion, IG, curves)")
    p.add_argument("--window", type=int, default=16, help="occlusion window in pixels (default 16)")
    p.add_argument("--stride", type=int, default=8, help="occlusion stride in pixels (default 8)")
    p.add_argument("--baseline", type=float, default=0.0, help="occluder value in normalised space (0 = mean colour)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (module name; default the last Conv2d)")
    p.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps (default 50)")
    p.add_argument("--faith-steps", type=int, default=16, help="points on the deletion/insertion curves")
    p.add_argument("--weights", default=None,
                   help="the features' weights file (default: the path they recorded; sha256-checked)")
    p.add_argument("--model", default=None,
                   help="the features' model, to allow a factory (module:factory) or TorchScript model to run (they "
                        "run code; a store's manifest alone never does)")


def config_from_args(a: argparse.Namespace) -> AuditConfig:
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    return AuditConfig(store=a.store, artefact=a.artefact, methods=methods, select=a.select, n=a.n, seed=a.seed,
                       device=a.device, batch_size=a.batch_size, window=a.window, stride=a.stride,
                       baseline=a.baseline, layer=a.layer, ig_steps=a.ig_steps, faith_steps=a.faith_steps,
                       model=a.model, weights=a.weights, progress=True)


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    cfg = config_from_args(args)
    cfg.validate()
    result = run_stage(args, attribution_audit, lambda: summarise(run_audit(cfg)),
                       cfg=cfg, shard_size=getattr(args, "shard_size", None))
    emit(result, args.json, (
        f"attribution audit {result['artefact_id']}: {result['computed']} maps computed, {result['reused']} reused "
        f"({result['images']} images, {result['rows']} rows stored; methods {', '.join(result['methods'])}) "
        f"in {result['seconds']} s" + (f"; {result['failed']} images unreadable" if result["failed"] else "")
        + f"\nstore: {cfg.store}"))
    if args.sanity:  # the methods of this run, on N of the audit's images
        from tasks.attribution.methods import method_spec

        scfg = _sanity_config(args, args.sanity)
        scfg.validate()
        methods = list(dict.fromkeys(method_spec(m).name for m in cfg.methods))
        r = run_stage(args, attribution_sanity, lambda: summarise_sanity(
            run_sanity(cfg.store, result["artefact_id"], cfg=scfg, methods=methods, model=cfg.model, weights=cfg.weights)),
            store=cfg.store, audit_id=result["artefact_id"], cfg=scfg, model=cfg.model, weights=cfg.weights,
            methods=methods)
        emit(r, args.json, _sanity_text(r))
    return 0


def _sanity_cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    cfg = _sanity_config(args, args.n)
    cfg.validate()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    r = run_stage(args, attribution_sanity, lambda: summarise_sanity(
        run_sanity(args.store, args.audit, cfg=cfg, methods=methods, model=args.model, weights=args.weights,
                   force=args.force)),
        store=args.store, audit_id=args.audit, cfg=cfg, model=args.model, weights=args.weights, methods=methods)
    emit(r, args.json, _sanity_text(r))
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("audit", help="attribution maps (occlusion, saliency, Grad-CAM, ...) + faithfulness scores",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from flows.runners import add_runner_arguments

    add_arguments(p)
    add_runner_arguments(p)
    add_store_argument(p)
    p.add_argument("--sanity", type=int, default=0, metavar="N",
                   help="then run the model-randomisation sanity check on N audited images (default 0: no)")
    _add_sanity_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cli)

    q = sub.add_parser("audit-sanity", help="sanity check of a stored attribution audit: randomise the model's top "
                       "layers, flag methods whose maps do not change (Adebayo et al. 2018)",
                       description=run_sanity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--audit", default=None, help="attribution audit id or prefix (default: the newest)")
    q.add_argument("--n", type=int, default=4, help="audited images to check (default 4)")
    q.add_argument("--methods", default=None, help="comma list (default: every method the audit stored)")
    q.add_argument("--seed", type=int, default=0, help="image choice and re-initialisation seed")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    q.add_argument("--model", default=None, help="as for `convlens audit`: allow a factory / TorchScript model")
    q.add_argument("--weights", default=None, help="as for `convlens audit`: the features' weights file")
    q.add_argument("--force", action="store_true", help="recompute even if an identical check is stored")
    _add_sanity_arguments(q)
    add_store_argument(q)
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.set_defaults(func=_sanity_cli)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["audit", *sys.argv[1:]]))
