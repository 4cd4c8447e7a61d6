"""``convlens`` command line. Each sub-command lives beside its flow: a flow module that defines
``register(subparsers)`` is picked up from :data:`COMMAND_MODULES` (modules not present are skipped).
:data:`COMMAND_OWNERS` names the module that registers each sub-command, so ``convlens extract ...`` imports
only :mod:`flows.extract_features`, not every stage (and Prefect) it does not run; ``convlens``, ``--help`` and
an unknown command import them all, so help and argparse's "invalid choice" list every command. A new command
goes in both tables (``tests/test_cli.py`` fails until it does).

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

__all__ = ["main", "build_parser", "COMMAND_MODULES", "COMMAND_OWNERS", "command_named", "add_store_argument", "emit",
           "say"]

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

# Sub-command -> the module in COMMAND_MODULES whose ``register`` adds it (code, not data: a command line only
# ever selects one of these fixed modules).
COMMAND_OWNERS: dict[str, str] = {
    "extract": "flows.extract_features",
    "info": "flows.info",
    "index": "flows.build_index",
    "neighbors": "flows.build_index",
    "audit-dataset": "flows.dataset_audit",
    "project": "flows.project",
    "grid": "flows.project",
    "audit": "flows.audit",
    "audit-sanity": "flows.audit",
    "neurons": "flows.neurons",
    "report": "flows.report",
    "nightly": "flows.nightly_audit",
    "serve": "flows.deployments",
    "deploy": "flows.deployments",
    "verify": "flows.verify",
    "layers": "flows.layers",
    "demo": "flows.demo",
}

# Global options that take no value and print nothing, so a sub-command may follow them (``-v``, ``-vv``, ...).
_LIGHT_GLOBALS = frozenset({"--verbose", "--prefect", "--no-prefect"})


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


def command_named(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` (the arguments after ``convlens``) names, or ``None``.

    It is the first token after the global options ``-v`` / ``-vv`` / ``--verbose`` / ``--prefect`` /
    ``--no-prefect``; any other option before it (``-h``, ``--help``, an abbreviation, a typo) gives ``None``, so
    the caller builds the full parser and argparse handles it exactly as before."""
    for i, token in enumerate(argv):
        if token == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if token in _LIGHT_GLOBALS or (len(token) > 1 and token.strip("v") == "-"):
            continue
        return None if token.startswith("-") else token
    return None


def _command_modules(command: str | None) -> tuple[str, ...]:
    """The modules to import for ``command``: its owner when :data:`COMMAND_OWNERS` knows it, else all of them."""
    owner = COMMAND_OWNERS.get(command) if command is not None else None
    return (owner,) if owner is not None else COMMAND_MODULES


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``convlens`` parser. With ``command`` (a name in :data:`COMMAND_OWNERS`) only the module that
    registers it is imported and only that sub-command is added; otherwise (``None``, an unknown name, or an
    owner module that is not installed) every module in :data:`COMMAND_MODULES` registers its commands."""
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
    modules = _command_modules(command)
    if len(modules) == 1 and _import_command_module(modules[0]) is None:
        modules = COMMAND_MODULES  # its owner is not installed: the full parser reports "invalid choice"
    for name in modules:
        module = _import_command_module(name)
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def _import_command_module(name: str) -> Any:
    """The module ``name``, or ``None`` when it is not installed (an import error inside it still raises)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_named(argv))
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
