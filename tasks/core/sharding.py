"""Shards: split a dataset-scale job into contiguous slices that run in parallel, then merge once.

Used by the extraction, attribution-audit and max-activation flows when they run on a distributed task
runner (``--runner dask``, :mod:`flows.runners`). The flow plans serially, takes the artefact lock, submits one
task per shard and merges / publishes once, under the lock. Shard tasks get small picklable jobs (a config,
paths, image records, a slice of a selection), load the model themselves, write their own content-addressed
files into the artefact directory and return small records (file entries, rejects, counters, a top-k table).
Nothing here holds a tensor of the dataset.

Same results as the local runner: shard boundaries fall on multiples of the batch size, so every batch a
shard forwards is exactly a batch of the unsharded run (bit-identical features on the same device), and the
merge keeps the unsharded order (shard order, not completion order).

The functions take ``run_shards(jobs) -> iterable of (index, result)``: the flow passes one that submits Prefect
tasks and yields as they finish; :func:`run_serially` runs them in this process (tests, debugging).
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import threading
from typing import Any, Callable, Iterable

from storage.errors import ConvlensError, UsageError

__all__ = [
    "SHARD_MAX",
    "TARGET_SHARDS",
    "RunShards",
    "ShardJob",
    "ShardMismatchError",
    "shard_bounds",
    "run_serially",
    "load_shard_model",
    "model_fingerprint",
    "check_model",
    "in_daemon",
]

log = logging.getLogger(__name__)

SHARD_MAX = 8192  # images per shard by default: one ~42 MB part at D=1280, ~1.7 MB of records to ship
TARGET_SHARDS = 16  # small datasets are cut into about this many shards (load balance over a few workers)

RunShards = Callable[[list[Any]], Iterable[tuple[int, Any]]]


class ShardMismatchError(ConvlensError):
    """A shard worker resolved a different model / weights than the planner (e.g. a different weights file)."""


def shard_bounds(n: int, shard_size: int | None = None, align: int = 1, target: int = TARGET_SHARDS,
                 cap: int = SHARD_MAX) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` slices covering ``range(n)``.

    ``shard_size`` (images) is rounded up to a multiple of ``align`` (the batch size, so each shard's batches are
    the unsharded run's batches); ``None`` picks ``ceil(n / target)`` capped at ``cap``. Raises ``ValueError``
    for a size < 1.
    """
    if align < 1:
        raise UsageError(f"shard alignment must be >= 1, got {align}")
    if shard_size is None:
        shard_size = min(cap, max(1, math.ceil(n / target)))
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    size = math.ceil(shard_size / align) * align
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def run_serially(fn: Callable[[Any], Any]) -> RunShards:
    """A ``run_shards`` that runs ``fn(job)`` for each job in this process, in order."""
    def run(jobs: list[Any]) -> Iterable[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            yield i, fn(job)
    return run


# Seeded random init (``--weights none``) reseeds torch's global generator, which other threads also draw from
# (e.g. a DataLoader's base seed): a model is built once per process and worker, under a lock, before any shard of
# the process runs, and each shard gets its own deep copy (hooks are per copy).
_LOAD_LOCK = threading.Lock()
_MODELS: dict[tuple, Any] = {}
_MODELS_MAX = 2


def load_shard_model(model: str, weights: str, seed: int = 0, weights_prefix: str | None = None) -> Any:
    """A private copy of :func:`tasks.core.models.load_model`'s result, built once per process (thread-safe).

    ``model`` / ``weights`` must come from the user or from an approved
    :class:`tasks.core.models.ModelRecipe` (``load_model_from_manifest(...).recipe`` /
    ``resolve_manifest_model``), never straight from a manifest: a factory or TorchScript spec runs code.
    """
    import copy

    from tasks.core.models import load_model

    key = (model, weights, seed, weights_prefix, _stat(model), _stat(weights))  # a rewritten file is a new key
    with _LOAD_LOCK:
        lm = _MODELS.get(key)
        if lm is None:
            lm = load_model(model, weights, seed, weights_prefix)
            while len(_MODELS) >= _MODELS_MAX:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = lm
        return copy.deepcopy(lm)


def _stat(path: str) -> tuple[int, int] | None:
    import os

    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size)


def model_fingerprint(module: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): planner and shard workers must agree."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_model(index: int, module: Any, fingerprint: str | None) -> None:
    if fingerprint and model_fingerprint(module) != fingerprint:
        raise ShardMismatchError(f"shard {index}: the worker built a model whose weights differ from the planner's; "
                                 "workers must see the same model code, weights files and library versions as the flow")


def in_daemon() -> bool:
    # Dask worker processes are daemonic by default and may not start DataLoader worker processes; decode then
    # runs in the worker itself. For GPU workers start them with DASK_DISTRIBUTED__WORKER__DAEMON=False so each
    # keeps its DataLoader decode processes (docs/scaling.md).
    return bool(multiprocessing.current_process().daemon)


class ShardJob:
    """Base of the shard jobs: a plain class on purpose (not a dataclass), so Prefect does not walk its
    thousands of records looking for futures when it is passed to ``task.submit``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={getattr(self, 'index', '?')})"


