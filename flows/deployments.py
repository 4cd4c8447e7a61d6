"""Scheduling the nightly audit: ``convlens serve`` (this process runs the deployment) and ``convlens deploy``
(register it to a work pool; a ``prefect worker start --pool NAME`` process runs it).

Both need a Prefect API (``prefect server start``, then ``PREFECT_API_URL=http://127.0.0.1:4200/api``) and
take the nightly flow's parameters (dataset, store, model, ...), stored as the deployment's default
parameters; ``--cron`` adds a cron schedule (default ``0 2 * * *``, in ``--timezone``, default UTC).

- ``serve``: ``flow.serve`` — creates / updates the deployment ``nightly-audit/<name>`` and polls for its
  scheduled and manually triggered runs, running each in a subprocess of this process. Nothing to install
  beyond convlens; stop it with Ctrl-C (the schedule is paused on shutdown unless ``--keep-schedule``).
- ``deploy``: ``flow.from_source(<project dir>, "flows/nightly_audit.py:nightly_audit").deploy(...)`` with
  ``build=False, push=False`` — no Docker image, no remote storage: the deployment records the project
  directory as a local source (a ``set_working_directory`` pull step), so a **process** work pool's worker
  on a machine (or container) where convlens is installed at that same path runs it. The pool is created
  (type ``process``) when missing. Works offline.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from storage.errors import UsageError

__all__ = ["DEFAULT_CRON", "DEPLOYMENT_NAME", "ENTRYPOINT", "project_dir", "require_api", "serve_nightly",
           "deploy_nightly", "ensure_process_pool", "register"]

log = logging.getLogger(__name__)

DEFAULT_CRON = "0 2 * * *"
DEPLOYMENT_NAME = "nightly"
ENTRYPOINT = "flows/nightly_audit.py:nightly_audit"


def project_dir() -> Path:
    """The directory holding ``flows/`` (the deployment's local source)."""
    return Path(__file__).resolve().parent.parent


def require_api() -> str:
    """The configured Prefect API URL; raises ValueError saying how to start one when there is none."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UsageError("scheduling needs a Prefect server: start one with `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)")
    return str(url)


def _schedule(cron: str | None, timezone: str) -> Any:
    if not cron:
        return None
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    try:
        CronSchedule(cron=cron, timezone=timezone)  # validates expression and time zone
    except ValueError as exc:
        raise UsageError(f"--cron {cron!r} / --timezone {timezone!r} is not a valid schedule ({exc}); e.g. "
                         "\"0 2 * * *\" is 02:00 every day") from None
    return Cron(cron, timezone=timezone)


def serve_nightly(parameters: dict[str, Any], cron: str | None = DEFAULT_CRON, name: str = DEPLOYMENT_NAME,
                  timezone: str = "UTC", pause_on_shutdown: bool = True, limit: int | None = 1) -> None:
    """Serve the nightly deployment from this process until interrupted (blocks)."""
    from flows.nightly_audit import nightly_audit

    require_api()
    schedule = _schedule(cron, timezone)
    nightly_audit.serve(name=name, schedules=[schedule] if schedule else None, parameters=parameters,
                        tags=["convlens", "nightly"], description="convlens nightly incremental dataset audit",
                        pause_on_shutdown=pause_on_shutdown, limit=limit)


def ensure_process_pool(pool: str) -> bool:
    """Create the ``process`` work pool ``pool`` when it does not exist; returns True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            wp = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            log.info("created process work pool %s", pool)
            return True
    if wp.type != "process":
        log.warning("work pool %s is of type %s; the deployment has no image, so a process pool is expected", pool, wp.type)
    return False


def deploy_nightly(parameters: dict[str, Any], pool: str, cron: str | None = DEFAULT_CRON, name: str = DEPLOYMENT_NAME,
                   timezone: str = "UTC", source: str | None = None, create_pool: bool = True) -> str:
    """Register the nightly deployment on work pool ``pool`` (local source, no image); returns its id."""
    from prefect import flow as prefect_flow

    require_api()
    if create_pool:
        ensure_process_pool(pool)
    src = source or str(project_dir())
    if "://" not in src and not (Path(src) / ENTRYPOINT.split(":")[0]).is_file():
        raise UsageError(f"--source {src} does not contain {ENTRYPOINT.split(':')[0]}; pass the convlens project "
                         "directory as the worker sees it")
    schedule = _schedule(cron, timezone)
    remote = prefect_flow.from_source(source=src, entrypoint=ENTRYPOINT)
    dep_id = remote.deploy(name=name, work_pool_name=pool, build=False, push=False, parameters=parameters,
                           schedules=[schedule] if schedule else None, tags=["convlens", "nightly"],
                           description="convlens nightly incremental dataset audit", print_next_steps=False,
                           ignore_warnings=True, concurrency_limit=1)  # never two nights of one store at once
    return str(dep_id)


# ---------------------------------------------------------------------------------------------------- CLI


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    from flows.nightly_audit import flow_parameters

    params = flow_parameters(args)
    if params["data"] is None:
        del params["data"]  # given per run (UI "Custom run" / run_deployment parameters)
    return params


def _serve_cli(args: argparse.Namespace) -> int:
    from flows.cli import say

    params = _parameters(args)
    say(f"serving {DEPLOYMENT_NAME!r} deployment nightly-audit/{args.name} (cron {args.cron!r} {args.timezone}) "
          f"against {require_api()}; Ctrl-C to stop")
    serve_nightly(params, cron=args.cron or None, name=args.name, timezone=args.timezone,
                  pause_on_shutdown=not args.keep_schedule)
    return 0


def _deploy_cli(args: argparse.Namespace) -> int:
    from flows.cli import emit

    params = _parameters(args)
    dep_id = deploy_nightly(params, args.pool, cron=args.cron or None, name=args.name, timezone=args.timezone,
                            source=args.source, create_pool=not args.no_create_pool)
    emit({"deployment": f"nightly-audit/{args.name}", "id": dep_id, "pool": args.pool, "cron": args.cron,
          "parameters": params}, args.json,
         f"deployment nightly-audit/{args.name} ({dep_id}) registered on work pool {args.pool!r}, cron {args.cron!r}.\n"
         f"Run it with a worker:  prefect worker start --pool {args.pool}\n"
         f"Trigger now:           prefect deployment run 'nightly-audit/{args.name}'")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from flows.nightly_audit import add_nightly_arguments

    add_nightly_arguments(p, data_required=False)
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default {DEFAULT_CRON!r}; '' = no schedule)")
    p.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default UTC)")
    p.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME!r})")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the nightly audit deployment from this process (flow.serve), on a cron schedule")
    _common(p)
    p.add_argument("--keep-schedule", action="store_true", help="leave the schedule active when this process stops")
    p.set_defaults(func=_serve_cli)

    d = sub.add_parser("deploy", help="register the nightly audit on a work pool for `prefect worker start`")
    _common(d)
    d.add_argument("--pool", required=True, help="work pool name (a process pool is created when missing)")
    d.add_argument("--source", default=None,
                   help="project directory as the worker sees it (default: this checkout / install)")
    d.add_argument("--no-create-pool", action="store_true", help="fail instead of creating a missing pool")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_deploy_cli)

