"""``convlens`` command line. Each sub-command lives beside its flow: a flow module that defines
``register(subparsers)`` is picked up from :data:`COMMAND_MODULES` (modules not present are skipped).

Stages run through Prefect when a Prefect API is configured (``PREFECT_API_URL``, e.g. a local
``prefect server start``) or ``--prefect`` is given, so runs are tracked in the UI; otherwise the same task
functions run in-process (no server needed). Errors a user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Sequence

__all__ = ["main", "build_parser", "COMMAND_MODULES", "add_store_argument", "emit", "say"]

COMMAND_MODULES = (
    "flows.extract_features",
    "flows.info",
    "flows.build_index",
    "flows.dataset_audit",
    "flows.project",
    "flows.audit",
    "flows.neurons",
    "flows.report",
    "flows.nightly_audit",
    "flows.deployments",
    "flows.verify",
    "flows.layers",
    "flows.demo",
)


def add_store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("CONVLENS_STORE", "convlens-store"),
                   help="store directory (default ./convlens-store or $CONVLENS_STORE)")


def say(text: str, err: bool = False) -> None:
    """The one place a command handler writes to the terminal (stdout, or stderr for notes)."""
    print(text, file=sys.stderr if err else sys.stdout)


def emit(obj: Any, as_json: bool, text: str | None = None) -> None:
    """Print ``obj`` as JSON for scripts, or ``text`` for people."""
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    elif text is not None:
        say(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convlens",
        description="Audit image CNNs over whole datasets: features, neighbours, maps, attributions, reports.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    orch = parser.add_mutually_exclusive_group()
    orch.add_argument("--prefect", dest="prefect", action="store_true", default=None,
                      help="run stages as Prefect flows (default when PREFECT_API_URL is set)")
    orch.add_argument("--no-prefect", dest="prefect", action="store_false", help="run stages in-process")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception so ``finally`` blocks run (locks released, temp files removed)."""


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise _Terminated(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        # Under Prefect, the flow engine installs its own SIGTERM bridge for the run (marks it CRASHED) and
        # then re-delivers the signal here; either way the run unwinds cleanly instead of dying mid-write.
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from storage.errors import ConvlensError

    try:
        result = args.func(args)
    except ConvlensError as exc:  # a mistake the user can fix (UsageError, StoreError, ...): one line, exit 2
        print(f"convlens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(f"convlens {args.command}: {what}; the last published output is intact, rerun to resume", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
