"""Flow: audit a dataset from its feature-space kNN graph — near-duplicates (clustered), train/test leakage,
kNN label disagreement (likely label errors) and outliers — and the ``convlens audit-dataset`` command.

Steps: make sure the exact cosine feature index is current (build / update / reuse) -> make sure its kNN graph
with >= k neighbours exists -> calibrate the duplicate feature threshold on self-made copies of the dataset's own
images and confirm every duplicate candidate on the stored pixels (``--confirm pixels``, the default) -> compute
findings -> publish an ``audits`` artefact ``dataset-audit-...`` holding ``findings-<sha16>.parquet`` (the
calibration is in its manifest). Tasks pass ids and small records.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger, task

from storage.audits import FINDING_TYPES
from tasks.index.dataset_audit import AuditParams, run_dataset_audit, summarise

__all__ = ["dataset_audit_flow", "dataset_audit_task", "register"]


@task(name="dataset-audit", retries=0)
def dataset_audit_task(store: str, artefact: str | None, index_id: str | None, params: AuditParams,
                       gpu: str) -> dict[str, Any]:
    return summarise(run_dataset_audit(store, artefact, index_id, params, gpu))


@flow(name="dataset-audit", log_prints=False)
def dataset_audit_flow(store: str = "convlens-store", artefact: str | None = None, index_id: str | None = None,
                       k: int = 10, dup_threshold: float | None = None, outlier_z: float = 3.5, min_label_votes: int = 3,
                       gpu: str = "auto", confirm: str = "pixels", calibration_sample: int = 12) -> dict[str, Any]:
    """Audit the newest (or given) feature artefact of STORE; returns the summary."""
    params = AuditParams(k=k, dup_threshold=dup_threshold, outlier_z=outlier_z, min_label_votes=min_label_votes,
                         confirm=confirm, calibration_sample=calibration_sample)
    summary = dataset_audit_task(store, artefact, index_id, params, gpu)
    get_run_logger().info("dataset audit %s: %s", summary["artefact_id"], summary["counts"])
    return summary


def _text(r: dict[str, Any]) -> str:
    c = r["counts"]
    s = r["summary"]
    lines = [f"dataset audit {r['artefact_id']} over {r['images']} images (index {r['index']}, k={r['params']['k']}):",
             f"  {r.get('near_copy_rule') or 'near-copy rule not recorded'}",
             f"  exact duplicates:   {c['exact-duplicate']} images in {s['exact-duplicate']['clusters']} groups",
             f"  near duplicates:    {c['near-duplicate']} images in {s['near-duplicate']['clusters']} clusters",
             f"  train/test leakage: {c['leakage']} cross-split pairs",
             f"  label disagreement: {c['label-disagreement']} likely label errors",
             f"  outliers:           {c['outlier']}"]
    for t in FINDING_TYPES:
        for row in s[t]["top"]:
            other = f" ~ {row['other_path']}" if row.get("other_path") else ""
            sug = f" -> {row['suggested_label']}?" if row.get("suggested_label") else ""
            lines.append(f"  [{t} #{row['rank']}] {row['path']} ({row['image_id'][:12]}){other}{sug}  score={row['score']:.4f}")
    lines.append(f"findings table: audits/{r['artefact_id']}/{r['findings_file']}")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    params = AuditParams(k=args.k, dup_threshold=args.dup_threshold, outlier_z=args.outlier_z,
                         min_label_votes=args.min_label_votes, confirm=args.confirm,
                         calibration_sample=args.calibration_sample)
    r = run_stage(args, dataset_audit_flow,
                  lambda: summarise(run_dataset_audit(args.store, args.artefact, args.index, params, args.gpu)),
                  store=args.store, artefact=args.artefact, index_id=args.index, k=args.k,
                  dup_threshold=args.dup_threshold, outlier_z=args.outlier_z, min_label_votes=args.min_label_votes,
                  gpu=args.gpu, confirm=args.confirm, calibration_sample=args.calibration_sample)
    emit(r, args.json, _text(r))
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("audit-dataset", help="near-duplicates, train/test leakage, likely label errors and outliers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_argument(p)
    p.add_argument("--artefact", default=None, help="feature artefact id (default: newest)")
    p.add_argument("--index", default=None, help="a feature-space cosine index to use (default: the exact one, built if needed)")
    p.add_argument("-k", type=int, default=10, help="neighbours per image (default 10)")
    p.add_argument("--dup-threshold", type=float, default=None,
                   help="feature cosine for duplicate candidates (default: calibrated per store on self-made copies)")
    p.add_argument("--confirm", choices=["pixels", "none"], default="pixels",
                   help="pixels (default): confirm each duplicate candidate on the stored images; none: trust "
                        "--dup-threshold alone (for stores whose images are not readable)")
    p.add_argument("--calibration-sample", type=int, default=12,
                   help="images whose self-made copies calibrate the feature threshold (default 12)")
    p.add_argument("--outlier-z", type=float, default=3.5, help="robust z-score of the k-th neighbour distance (default 3.5)")
    p.add_argument("--min-label-votes", type=int, default=3, help="labelled neighbours needed to question a label")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cli)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["audit-dataset", *sys.argv[1:]]))
