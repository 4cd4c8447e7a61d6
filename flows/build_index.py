"""Flow: build (or incrementally update) a FAISS index over a stored feature table or pixel space, and the
``convlens index`` / ``convlens neighbors`` commands.

Parameters mirror ``convlens index``. Steps: resolve the feature artefact -> build / update / reuse the index
artefact (store kind ``indexes``) -> optionally write the all-rows kNN graph. Tasks pass ids and small records.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger, task

from storage.errors import UsageError
from tasks.core.faiss_index import AUTO_EXACT_MAX_ROWS
from tasks.index.build import IndexConfig, build_default_indexes, build_index
from tasks.index.neighbors import knn_graph, neighbors

__all__ = ["build_index_flow", "build_index_task", "knn_graph_task", "summarise", "build_default_indexes",
           "neighbors", "register"]


@task(name="build-index", retries=0)
def build_index_task(cfg: IndexConfig) -> dict[str, Any]:
    """Build / update / reuse the index under the artefact lock; returns a small summary."""
    return summarise(build_index(cfg))


@task(name="knn-graph", retries=0)
def knn_graph_task(store: str, k: int, space: str, index_id: str, gpu: str) -> dict[str, Any]:
    return knn_graph(store, k, space, index_id, gpu=gpu)


@flow(name="build-index", log_prints=False)
def build_index_flow(cfg: IndexConfig, knn_k: int | None = None) -> dict[str, Any]:
    """Index the features (or pixels) of ``cfg.artefact`` in ``cfg.store``; with ``knn_k`` also write the kNN graph."""
    summary = build_index_task(replace(cfg, progress=False))
    get_run_logger().info("index %(artefact_id)s: %(mode)s, %(rows)d rows", summary)
    if knn_k:
        summary["knn_graph"] = knn_graph_task(cfg.store, knn_k, cfg.space, summary["artefact_id"], cfg.gpu)
    return summary


def summarise(m: dict[str, Any]) -> dict[str, Any]:
    b = m.get("build", {})
    return {"artefact_id": m["artefact_id"], "space": m["space"], "factory": m["factory"],
            "exact": bool(m.get("exact", m.get("index_kind") == "flat")), "metric": m["metric"],
            "rows": m["rows"], "dim": m["dim"], "mode": b.get("mode"), "added": b.get("added"),
            "seconds": b.get("seconds"), "device": b.get("device"), "features": m["source"]["artefact_id"],
            "skipped": m.get("skipped", 0), "nprobe": m.get("nprobe")}


# --------------------------------------------------------------------------------------------------- CLI


def _index_cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    cfg = IndexConfig(store=args.store, artefact=args.artefact, space=args.space, factory=args.factory,
                      exact_max_rows=args.exact_max_rows, metric=args.metric, gpu=args.gpu, train_rows=args.train_rows,
                      nprobe=args.nprobe, rebuild=args.rebuild, progress=not args.json)
    r = run_stage(args, build_index_flow, lambda: summarise(build_index(cfg)), cfg=cfg)
    text = (f"index {r['artefact_id']}: {r['space']} space, {r['factory']} / {r['metric']}, {r['rows']} rows (D={r['dim']}), "
            f"{r['mode']}" + (f" (+{r['added']} rows)" if r["mode"] == "incremental" else "")
            + f" in {r['seconds']}s on {r['device']}" + (f"; {r['skipped']} unreadable images skipped" if r["skipped"] else ""))
    emit(r, args.json, text)
    return 0


def _format_table(df) -> str:
    lines = [f"{'rank':>4}  {'distance':>9}  {'sim':>6}  {'label':<12} {'split':<6} {'image_id':<14} path"]
    for r in df.itertuples(index=False):
        sim = "" if r.similarity != r.similarity else f"{r.similarity:.4f}"  # NaN for l2
        lines.append(f"{r.rank:>4}  {r.distance:>9.4f}  {sim:>6}  {str(r.label or ''):<12} {str(r.split or ''):<6} "
                     f"{r.image_id[:12]:<14} {r.path}")
    return "\n".join(lines)


def _neighbors_cli(args: argparse.Namespace) -> int:
    from flows.cli import emit, say

    if args.all:
        if args.id or args.path or args.image:
            raise UsageError("--all writes the kNN graph of every image; do not combine it with --id/--path/--image")
        r = knn_graph(args.store, args.k, args.space, args.index, args.artefact, args.gpu, args.nprobe, progress=not args.json)
        if r.get("stale"):
            say(f"note: {r['stale']}", err=True)
        emit(r, args.json, f"kNN graph (k={r['k']}, {r['rows']} rows) written to index {r['index']} as {r['file']} "
                           f"in {r['seconds']}s on {r['device']}")
        return 0
    df = neighbors(args.store, image_id=args.id, path=args.path, image=args.image, k=args.k, space=args.space,
                   index_id=args.index, artefact=args.artefact, gpu=args.gpu, nprobe=args.nprobe, weights=args.weights,
                   model=args.model)
    if df.attrs.get("stale"):
        say(f"note: {df.attrs['stale']}", err=True)
    if args.json:
        out = {**{k: v for k, v in df.attrs.items()},
               "neighbors": json.loads(df.to_json(orient="records"))}
        emit(out, True)
        return 0
    q = df.attrs["query"]
    head = (f"query {q.get('path') or q.get('image')}" + (f" (label {q['label']})" if q.get("label") else "")
            + f" — {df.attrs['space']} space, {df.attrs['metric']}, index {df.attrs['index']}")
    emit(None, False, head + "\n" + _format_table(df))
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("index", help="build / update a FAISS index over stored features (or pixel space)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_argument(p)
    p.add_argument("--artefact", default=None, help="feature artefact id or unique prefix (default: newest)")
    p.add_argument("--space", choices=["feature", "pixel"], default="feature",
                   help="index the stored features (default) or downsampled 32x32x3 pixels of the same images")
    p.add_argument("--factory", default="auto",
                   help="auto (default): exact Flat up to --exact-max-rows rows, above it IVF<nlist>,PQ<m>x4fs,RFlat "
                        "(approximate candidates, exact re-rank); Flat forces exact search; or any FAISS "
                        "index-factory string, e.g. IVF4096,PQ64 (trained on a sample)")
    p.add_argument("--exact-max-rows", type=int, default=AUTO_EXACT_MAX_ROWS,
                   help=f"--factory auto: exact up to this many rows (default {AUTO_EXACT_MAX_ROWS:,})")
    p.add_argument("--metric", choices=["cosine", "l2"], default=None, help="default cosine (feature), l2 (pixel)")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="GPU FAISS when available (auto)")
    p.add_argument("--train-rows", type=int, default=100_000, help="training sample size for IVF / PQ factories")
    p.add_argument("--nprobe", type=int, default=None, help="default nprobe stored with an IVF index")
    p.add_argument("--rebuild", action="store_true", help="rebuild from scratch instead of adding new rows")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_index_cli)

    q = sub.add_parser("neighbors", help="nearest neighbours of an image in feature or pixel space; --all for the kNN graph")
    add_store_argument(q)
    g = q.add_mutually_exclusive_group()
    g.add_argument("--id", default=None, help="stored image_id (sha256, or a unique prefix of >= 8 digits)")
    g.add_argument("--path", default=None, help="stored relative path, or the file's absolute path")
    g.add_argument("--image", default=None, help="a new image file, embedded with the artefact's model/layer/preprocessing")
    q.add_argument("--all", action="store_true", help="write the kNN graph of every image (Parquet, in the index artefact)")
    q.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    q.add_argument("--space", choices=["feature", "pixel"], default="feature")
    q.add_argument("--artefact", default=None, help="feature artefact id (default: newest)")
    q.add_argument("--index", default=None, help="index artefact id (default: newest index of --space for the features)")
    q.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: stored with the index)")
    q.add_argument("--gpu", choices=["auto", "on", "off"], default="auto")
    q.add_argument("--weights", default=None,
                   help="for --image: the weights file (default: the path the features recorded; sha256-checked)")
    q.add_argument("--model", default=None,
                   help="for --image: the features' model, to allow a factory (module:factory) or TorchScript model "
                        "to run (they run code; a store's manifest alone never does)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_neighbors_cli)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["index", *sys.argv[1:]]))
