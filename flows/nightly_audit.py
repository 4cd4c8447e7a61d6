"""Flow: the nightly dataset audit — extract → index → dataset audit → maps → attribution → report (+ drift).

Parameters mirror ``convlens nightly DATA --store DIR --model M --weights W [--select POLICY --n N]``.
Every stage is incremental: unchanged inputs are reused, new images are the only per-image work, and each
stage's counts are returned and published as a Prefect markdown artefact with a link to the report. The
report's drift section compares today's features with the previous successful run's snapshot (run records:
see :mod:`tasks.nightly.stages`). A failing stage fails the flow run; only transient errors (I/O, CUDA out of
memory, retried with half the batch) are retried, never bad input (``ConvlensError`` / ``ValueError``).

Scheduling (``convlens serve`` / ``convlens deploy``) lives in :mod:`flows.deployments`.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.nightly.stages import (
    NightlyConfig,
    is_transient,
    run_nightly,
    stage_attribution,
    stage_dataset_audit,
    stage_extract,
    stage_index,
    stage_maps,
    stage_report,
    summary_markdown,
)

__all__ = ["nightly_audit", "run_nightly", "NightlyConfig", "retry_transient", "publish_artifact", "register",
           "FLOW_NAME", "DEFAULT_METHODS"]

FLOW_NAME = "nightly-audit"
DEFAULT_METHODS = ("occlusion", "saliency", "gradcam")
RETRIES = 2
RETRY_DELAY_S = 5

log = logging.getLogger(__name__)


def retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O errors and CUDA OOM only (see :func:`tasks.nightly.stages.is_transient`)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    retry = is_transient(exc)
    if not retry:
        logging.getLogger("convlens.nightly").info("task %s failed with %r: not transient, no retry",
                                                   getattr(task_, "name", "?"), exc)
    return retry


def _attempt() -> int:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1)


_RETRYING = dict(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient,
                 cache_policy=NO_CACHE)


@task(name="extract", **_RETRYING)
def extract_task(cfg: NightlyConfig) -> dict[str, Any]:
    return stage_extract(cfg, attempt=_attempt())


@task(name="index", **_RETRYING)
def index_task(store: str, features_id: str) -> dict[str, Any]:
    return stage_index(store, features_id)


@task(name="dataset-audit", **_RETRYING)
def dataset_audit_task(store: str, features_id: str) -> dict[str, Any]:
    return stage_dataset_audit(store, features_id)


@task(name="maps", **_RETRYING)
def maps_task(store: str, features_id: str, created: str, seed: int = 0) -> dict[str, Any]:
    return stage_maps(store, features_id, created, seed)


@task(name="attribution", **_RETRYING)
def attribution_task(cfg: NightlyConfig, features_id: str, new_ids: set[str], work_dir: Any) -> dict[str, Any]:
    return stage_attribution(cfg, features_id, new_ids, work_dir, attempt=_attempt())


@task(name="report", **_RETRYING)
def report_task(store: str, features_id: str, out: str, compare: str | None) -> dict[str, Any]:
    return stage_report(store, features_id, out, compare)


_TASKS: dict[str, Callable[..., Any]] = {
    "extract": extract_task, "index": index_task, "dataset-audit": dataset_audit_task, "maps": maps_task,
    "attribution": attribution_task, "report": report_task,
}


def publish_artifact(summary: dict[str, Any]) -> Any:
    """Publish the run's markdown summary (counts, drift, link to the report) as a Prefect artefact."""
    from prefect.artifacts import create_markdown_artifact

    from storage.paths import slugify

    key = slugify(f"nightly-{summary['features_id']}", limit=60).replace("_", "-").replace(".", "-")
    return create_markdown_artifact(markdown=summary_markdown(summary), key=key,
                                    description=f"convlens nightly audit of {summary['features_id']}")


@flow(name=FLOW_NAME, log_prints=False)
def nightly_audit(data: str, store: str = "convlens-store", model: str = "mobilenet_v2", weights: str = "imagenet",
                  layer: str | None = None, device: str = "auto", batch_size: int = 64,
                  num_workers: int | None = None, select: str = "random", n: int = 16,
                  methods: list[str] | None = None, window: int = 32, stride: int = 16,
                  index: bool = True, dataset_audit: bool = True, maps: bool = True,
                  report_dir: str | None = None, keep_runs: int = 14, always_report: bool = False,
                  seed: int = 0) -> dict[str, Any]:
    """Nightly incremental audit of ``data`` into ``store``; returns the summary (run id, report path, per-stage
    counts and seconds, drift counts vs the previous successful run)."""
    cfg = NightlyConfig(data=data, store=store, model=model, weights=weights, layer=layer, device=device,
                        batch_size=batch_size, num_workers=num_workers, select=select, n=n,
                        methods=tuple(methods or DEFAULT_METHODS), window=window, stride=stride, index=index,
                        dataset_audit=dataset_audit, maps=maps, report_dir=report_dir, keep_runs=keep_runs,
                        always_report=always_report, seed=seed)
    logger = get_run_logger()
    summary = run_nightly(cfg, call=lambda name, fn, kw: _TASKS[name](**kw), say=logger.info)
    publish_artifact(summary)
    logger.info("nightly audit done: %d new, %d removed images; report %s", summary["new_images"],
                summary["removed_images"], summary["report"])
    return _small(summary)


def _small(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without the attribution id list (keeps flow results small)."""
    out = dict(summary)
    out["stages"] = {k: ({kk: vv for kk, vv in v.items() if kk != "image_ids"} if k == "attribution" else v)
                     for k, v in summary["stages"].items()}
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def add_nightly_arguments(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """The nightly flow's parameters as CLI options (shared with ``serve`` / ``deploy``)."""
    from flows.cli import add_store_argument

    if data_required:
        p.add_argument("data", help="dataset: image folder, CSV or Parquet list (local path or s3://...)")
    else:
        p.add_argument("--data", default=None,
                       help="dataset the scheduled runs audit (folder, CSV, Parquet list); omitted: give it per run")
    add_store_argument(p)
    p.add_argument("--model", default="mobilenet_v2", help="torchvision NAME, timm:NAME, module.path:factory or TorchScript file")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | path to a state dict")
    p.add_argument("--layer", default=None, help="layer name or alias (default: penultimate)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="decode workers (default: 1 per 2 cores)")
    p.add_argument("--select", default="random",
                   help="attribution selection policy among the new images: random | misclassified | "
                        "low-confidence | label-disagreement (default random)")
    p.add_argument("--n", type=int, default=16, help="at most N new images get attribution maps per run (0 = none)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="attribution methods, comma separated")
    p.add_argument("--no-maps", dest="maps", action="store_false", help="skip the PCA / t-SNE maps")
    p.add_argument("--no-index", dest="index", action="store_false", help="skip the FAISS indexes")
    p.add_argument("--no-dataset-audit", dest="dataset_audit", action="store_false", help="skip the kNN dataset audit")
    p.add_argument("--report-dir", default=None, help="where reports go (default <store>/reports)")
    p.add_argument("--keep-runs", type=int, default=14, help="run records kept per dataset (default 14)")
    p.add_argument("--always-report", action="store_true",
                   help="re-render the report even when nothing changed (default: reuse the previous run's)")


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """CLI namespace -> the flow's keyword parameters (also a deployment's ``parameters``)."""
    from pathlib import Path

    def absolute(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        return str(Path(p).expanduser().absolute())

    weights = args.weights if args.weights in ("imagenet", "none") else absolute(args.weights)
    return {"data": absolute(args.data), "store": absolute(args.store), "model": args.model, "weights": weights,
            "layer": args.layer, "device": args.device, "batch_size": args.batch_size, "num_workers": args.num_workers,
            "select": args.select, "n": args.n,
            "methods": [m.strip() for m in args.methods.split(",") if m.strip()], "index": args.index,
            "dataset_audit": args.dataset_audit, "maps": args.maps, "report_dir": absolute(args.report_dir),
            "keep_runs": args.keep_runs, "always_report": args.always_report}


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import use_prefect

    params = flow_parameters(args)
    if use_prefect(args):
        summary = nightly_audit(**params)
    else:
        cfg = NightlyConfig(**{k: (tuple(v) if k == "methods" else v) for k, v in params.items()})
        summary = _small(run_nightly(cfg, say=print if not args.json else log.info))
    text = (f"nightly {summary['run_id']}: {summary['new_images']} new, {summary['removed_images']} removed images; "
            f"{summary['stages']['extract']['extracted']} extracted, "
            f"{summary['stages']['attribution']['computed']} attribution maps computed\nreport: {summary['report']}")
    emit(json.loads(json.dumps(summary, default=str)), args.json, text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("nightly", help="run the incremental nightly audit once (extract → ... → report with drift)")
    add_nightly_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cli)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["nightly", *sys.argv[1:]]))
