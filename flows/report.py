"""Flow: render the self-contained model-review report (one offline HTML file) from everything stored.

Parameters mirror ``convlens report --store DIR [--artefact ID] [--compare PREVIOUS] --out FILE.html``.
One task: gather the stored artefacts of a features artefact (sha256-verified), render, write atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from reports.render import ReportOptions, write_report

__all__ = ["report_flow", "report_task", "write_report", "register"]


@task(name="render-report", retries=0)
def report_task(store: str, out: str | None, features_id: str | None, compare: str | None,
                options: dict[str, Any] | None = None) -> str:
    """Build and write the report; returns its absolute path."""
    return write_report(store, out=out, features_id=features_id, compare=compare,
                        options=ReportOptions(**(options or {})))


@flow(name="report", log_prints=False)
def report_flow(store: str = "convlens-store", out: str | None = None, features_id: str | None = None,
                compare: str | None = None, options: dict[str, Any] | None = None) -> str:
    """Write the model-review report of ``features_id`` (default newest) to ``out``; returns the path."""
    path = report_task(store, out, features_id, compare, options)
    get_run_logger().info("report written to %s (%.1f MB)", path, Path(path).stat().st_size / 1e6)
    return path


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    opts = {"thumb_budget_bytes": int(args.thumb_budget_mb * 1e6), "thumb_px": args.thumb_px, "k": args.k}
    path = run_stage(
        args, report_flow,
        lambda: write_report(args.store, out=args.out, features_id=args.artefact, compare=args.compare,
                             options=ReportOptions(**opts)),
        store=args.store, out=args.out, features_id=args.artefact, compare=args.compare, options=opts,
    )
    size = Path(path).stat().st_size
    emit({"report": path, "bytes": size}, args.json, f"report: {path} ({size / 1e6:.1f} MB)")
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("report", help="write the self-contained HTML model-review report")
    add_store_argument(p)
    p.add_argument("--artefact", default=None, help="features artefact id or prefix (default: the newest)")
    p.add_argument("--compare", default=None,
                   help="previous run for the drift section: a features artefact id, another store's path, or an artefact folder")
    p.add_argument("--out", default=None, help="output HTML file (default <store>/reports/report-<artefact>.html)")
    p.add_argument("--thumb-budget-mb", type=float, default=12.0,
                   help="bytes of embedded thumbnails (default 12 MB; thumbnails are sampled above it)")
    p.add_argument("--thumb-px", type=int, default=64, help="thumbnail size in pixels (default 64)")
    p.add_argument("-k", type=int, default=6, help="neighbours shown per clicked point (default 6)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cli)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["report", *sys.argv[1:]]))
