"""Task runners for the dataset-scale flows: ``--runner local`` (default) or ``--runner dask``.

``local`` runs a flow's work in one process, as before. ``dask`` gives the flow a
:class:`prefect_dask.DaskTaskRunner`: either the scheduler at ``--dask-address`` (an existing cluster, e.g.
``tcp://scheduler:8786``) or a ``distributed.LocalCluster`` of ``--dask-workers`` worker processes started for
the run and closed after it. The extraction, attribution-audit and max-activation flows then split their
image list into shards (:mod:`tasks.core.sharding`) that run as parallel tasks, each writing its own parts; the
manifest merge / publish stays a single serial step under the artefact lock.

The runner is chosen at call time with ``flow.with_options(task_runner=...)`` (:func:`with_runner`). A
``DaskTaskRunner`` needs a flow run, so :func:`run_stage` always runs the Prefect flow when a runner other
than ``local`` is asked for (an ephemeral Prefect API is started when none is configured).

Workers must see the same store and dataset paths as the flow (a shared filesystem or object store URL).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable

from storage.errors import UsageError

__all__ = ["RUNNERS", "add_runner_arguments", "make_task_runner", "with_runner", "use_prefect", "run_stage", "flow_is_distributed",
           "shard_setting", "submit_shards"]

log = logging.getLogger(__name__)

RUNNERS = ("local", "dask")


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--runner``, ``--dask-address``, ``--dask-workers``, ``--dask-threads`` and ``--shard-size``."""
    p.add_argument("--runner", default="local", choices=RUNNERS,
                   help="local (default): one process | dask: shards run in parallel on a Dask cluster")
    p.add_argument("--dask-address", default=None,
                   help="scheduler address of an existing Dask cluster (default: start a LocalCluster)")
    p.add_argument("--dask-workers", type=int, default=None,
                   help="LocalCluster worker processes (default: one per 2 CPU cores, at least 1)")
    p.add_argument("--dask-threads", type=int, default=1, help="threads per LocalCluster worker (default 1)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard with --runner dask (default: automatic, at most 8192)")


def make_task_runner(runner: str = "local", address: str | None = None, workers: int | None = None,
                     threads: int = 1, processes: bool = True) -> Any:
    """The Prefect task runner for ``runner``; ``None`` for ``local`` (the flow keeps its default).

    ``dask``: a :class:`prefect_dask.DaskTaskRunner` on ``address``, else on a new ``LocalCluster`` with
    ``workers`` workers of ``threads`` threads each (``processes=False``: threads of this process, for tests).
    Raises ``ValueError`` for an unknown runner or bad sizes.
    """
    if runner not in RUNNERS:
        raise UsageError(f"unknown --runner {runner!r}; use one of {', '.join(RUNNERS)}")
    if runner == "local":
        if address or workers:
            raise UsageError("--dask-address / --dask-workers need --runner dask")
        return None
    if workers is not None and workers < 1:
        raise UsageError(f"--dask-workers must be >= 1, got {workers}")
    if threads < 1:
        raise UsageError(f"--dask-threads must be >= 1, got {threads}")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - prefect-dask is a declared dependency
        raise UsageError("--runner dask needs the prefect-dask package (pip install prefect-dask)") from exc
    if address:
        if workers is not None:
            log.warning("--dask-workers is ignored with --dask-address (the cluster has its own workers)")
        return DaskTaskRunner(address=address)
    n = workers or max(1, (os.cpu_count() or 2) // 2)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": n, "threads_per_worker": threads, "processes": processes,
                                          "dashboard_address": None})


def with_runner(flow_fn: Any, task_runner: Any) -> Any:
    """``flow_fn`` with ``task_runner`` (unchanged when it is ``None``)."""
    return flow_fn if task_runner is None else flow_fn.with_options(task_runner=task_runner)


def flow_is_distributed() -> bool:
    """True inside a flow run whose task runner is a ``DaskTaskRunner`` (the flows then shard by default)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx is not None else None
    return runner is not None and type(runner).__name__ == "DaskTaskRunner"


def submit_shards(shard_task: Any):
    """A ``run_shards`` for :mod:`tasks.core.sharding`: submit one ``shard_task`` per job on the flow's task runner and
    yield ``(index, result)`` as they finish (the first failure raises). Outside a flow run (``flow.fn(...)``)
    the shards run one after another in this process."""
    from prefect.context import FlowRunContext
    from prefect.futures import as_completed

    from tasks.core.sharding import run_serially

    if FlowRunContext.get() is None:
        return run_serially(shard_task.fn)

    def run(jobs: list[Any]):
        futures = {shard_task.submit(job): i for i, job in enumerate(jobs)}
        for fut in as_completed(list(futures)):
            yield futures[fut], fut.result()
    return run


def shard_setting(shard_size: int | None) -> tuple[bool, int | None]:
    """``(shard?, size)``: ``None`` = shard (automatic size) under a Dask runner only; 0 = never; N = N images."""
    if shard_size is None:
        return flow_is_distributed(), None
    return shard_size > 0, shard_size or None


def use_prefect(args: argparse.Namespace) -> bool:
    """``--prefect`` / ``--no-prefect`` when given, else whether a Prefect API is configured (``PREFECT_API_URL``)."""
    flag = getattr(args, "prefect", None)
    if flag is not None:
        return flag
    return bool(os.environ.get("PREFECT_API_URL"))


def run_stage(args: argparse.Namespace, flow_fn: Any, plain_fn: Callable[[], Any], **flow_kwargs: Any) -> Any:
    """The one way a command runs its stage: ``flow_fn(**flow_kwargs)`` under Prefect when configured (see
    :func:`use_prefect`) or when ``--runner`` asks for a distributed task runner (which needs a flow run; an
    ephemeral Prefect API is started when none is configured), else ``plain_fn()`` in this process.

    ``flow_fn`` is the Prefect flow, or a function of no arguments that returns it: then it is called only when
    the stage runs under Prefect, so an in-process run need not import Prefect."""
    runner = getattr(args, "runner", "local") or "local"
    task_runner = make_task_runner(runner, getattr(args, "dask_address", None), getattr(args, "dask_workers", None),
                                   getattr(args, "dask_threads", 1) or 1)
    if task_runner is None and not use_prefect(args):
        return plain_fn()
    from prefect import Flow

    flow = flow_fn if isinstance(flow_fn, Flow) else flow_fn()
    return with_runner(flow, task_runner)(**flow_kwargs)
