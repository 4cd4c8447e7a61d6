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

__all__ = ["RUNNERS", "add_runner_arguments", "make_task_runner", "with_runner", "run_stage", "flow_is_distributed",
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
        raise ValueError(f"unknown --runner {runner!r}; use one of {', '.join(RUNNERS)}")
    if runner == "local":
        if address or workers:
            raise ValueError("--dask-address / --dask-workers need --runner dask")
        return None
    if workers is not None and workers < 1:
        raise ValueError(f"--dask-workers must be >= 1, got {workers}")
    if threads < 1:
        raise ValueError(f"--dask-threads must be >= 1, got {threads}")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - prefect-dask is a declared dependency
        raise ValueError("--runner dask needs the prefect-dask package (pip install prefect-dask)") from exc
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


def run_stage(args: argparse.Namespace, flow_fn: Any, plain_fn: Callable[[], Any], **flow_kwargs: Any) -> Any:
    """Like :func:`flows.cli.run_stage`, but a ``--runner`` other than ``local`` always runs the Prefect flow
    (with that task runner), since a Dask task runner needs a flow run."""
    from flows import cli

    runner = getattr(args, "runner", "local") or "local"
    task_runner = make_task_runner(runner, getattr(args, "dask_address", None), getattr(args, "dask_workers", None),
                                   getattr(args, "dask_threads", 1) or 1)
    if task_runner is None:
        return cli.run_stage(args, flow_fn, plain_fn, **flow_kwargs)
    return with_runner(flow_fn, task_runner)(**flow_kwargs)
