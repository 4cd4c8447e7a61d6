"""``convlens demo``: the whole pipeline on the embedded default, offline.

Builds the demo dataset (upscaled scikit-learn digits in train/test splits + the real photos scikit-image
ships), extracts MobileNetV2 features with real ImageNet weights, then runs every later stage that is
installed (index + neighbours, dataset audit, maps, attribution audit, neurons, report) and prints where the
output is. Idempotent: a second run reuses everything stored.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_demo", "register"]

log = logging.getLogger(__name__)


def _stage(name: str, fn: Callable[[], Any], results: dict[str, Any], say: Callable[[str], None]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    results[name] = {"seconds": round(time.perf_counter() - t0, 2), "result": out}
    say(f"[{name}] done in {results[name]['seconds']:.1f}s")
    return out


def run_demo(store: str = "convlens-store", data_dir: str = "demo-data", device: str = "auto",
             report: str | None = None, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run the demo pipeline; returns ``{stage: {seconds, result}}`` plus ``report`` (path) when written."""
    from tasks.core.demo_data import build_demo_dataset
    from tasks.extract.features import ExtractConfig, run_extraction

    results: dict[str, Any] = {}
    counts = _stage("dataset", lambda: build_demo_dataset(data_dir), results, say)
    say(f"  demo dataset {data_dir}: {counts['digits']} digits (train/test), {counts['photos']} photos, "
        f"{counts.get('planted_copies', 0)} planted near-copies, {counts.get('planted_flips', 0)} planted label flips")
    manifest = _stage("extract", lambda: run_extraction(ExtractConfig(data=data_dir, store=store, device=device)), results, say)
    fid = manifest["artefact_id"]
    run = manifest["run"]
    say(f"  features {fid}: {manifest['rows']} rows, D={manifest['dim']} ({manifest['layer']['name']}), "
        f"{run['extracted']} extracted this run, {manifest['rejects']} rejects")
    results["features_id"] = fid

    from reports.render import write_report
    from tasks.attribution.audit import run_default_audit
    from tasks.index.build import build_default_indexes
    from tasks.index.dataset_audit import audit_dataset
    from tasks.index.neighbors import neighbors
    from tasks.maps.defaults import make_default_maps
    from tasks.neurons.defaults import run_default_neurons

    idx = _stage("index", lambda: build_default_indexes(store, fid), results, say)
    say(f"  indexes: {_short(idx)}")
    nb = _stage("neighbors", lambda: [
        (p, neighbors(store, path=p, k=5)) for p in ("photos/chelsea.png", "photos/coffee.png", "test/3/digit_3_0003.png")
        if (Path(data_dir) / p).is_file()], results, say)
    for p, df in nb:
        say(f"  nearest to {p} (feature space): " + ", ".join(str(x) for x in list(df["path"])[:5]))
    audit_ds = _stage("dataset-audit", lambda: audit_dataset(store), results, say)
    say(f"  dataset audit: {_short(audit_ds)}")
    if audit_ds.get("near_copy_rule"):
        say(f"  {audit_ds['near_copy_rule']}")
    maps = _stage("maps", lambda: make_default_maps(store, fid), results, say)
    say(f"  maps: {_short(maps)}")
    att = _stage("attribution", lambda: run_default_audit(store, n=4), results, say)
    say(f"  attribution audit: {_short(att)}")
    neu = _stage("neurons", lambda: run_default_neurons(store, fid, device=device), results, say)
    say(f"  neurons: {_short(neu)}")
    out = report or str(Path(store) / "reports" / "demo-report.html")
    rep = _stage("report", lambda: write_report(store, out, fid), results, say)
    results["report"] = str(Path(rep).absolute())
    return results


def _short(obj: Any, limit: int = 300) -> str:
    text = str(obj)
    return text if len(text) <= limit else text[:limit] + " …"


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import say

    results = run_demo(store=args.store, data_dir=args.data_dir, device=args.device, report=args.out, say=say)
    say(f"store: {Path(args.store).absolute()}")
    if results.get("report"):
        say(f"report: {results['report']}")
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("demo", help="run the whole pipeline on the embedded demo (real MobileNetV2 + real images)")
    add_store_argument(p)
    p.add_argument("--data-dir", default="demo-data", help="where the demo images are written (default ./demo-data)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="report path (default <store>/reports/demo-report.html)")
    p.set_defaults(func=_cli)
