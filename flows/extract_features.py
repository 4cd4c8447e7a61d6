"""Flow: extract one layer's features for a whole image dataset into the Parquet feature store.

Parameters mirror ``convlens extract``. Steps (each a task that passes paths and small records):
plan (list + hash + diff against the store) -> extract new images into journalled parts -> publish the
manifest. Incremental: a rerun extracts only images whose content hash is not stored yet.

Scale-out: with a Dask task runner (``--runner dask``, :mod:`flows.runners`) or ``shard_size > 0`` the new
images are split into shards extracted by parallel ``extract-shard`` tasks, each writing its own parts; the
manifest merge / publish runs once, under the artefact lock (:func:`tasks.extract.sharding.run_sharded_extraction`).

Prefect is imported when the flow or its tasks are first used (``from flows.extract_features import
extract_features``, or a run under Prefect), so ``convlens --no-prefect extract`` does not pay its import.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import replace
from typing import Any

from flows.runners import shard_setting, submit_shards
from tasks.core.datasets import ListLimits
from tasks.extract.features import ExtractConfig, run_extraction
from tasks.extract.sharding import ExtractShard, extract_shard, run_sharded_extraction

__all__ = ["extract_features", "extract_task", "extract_shard_task", "add_arguments", "config_from_args", "summarise"]

# Declared, not bound: module ``__getattr__`` builds them on first access (see _build_prefect_objects).
extract_task: Any  # prefect.Task[[ExtractConfig], dict[str, Any]]
extract_shard_task: Any  # prefect.Task[[ExtractShard], dict[str, Any]]
extract_features: Any  # prefect.Flow[[ExtractConfig, int | None], dict[str, Any]]
_PREFECT_NAMES = ("extract_task", "extract_shard_task", "extract_features")
_build_lock = threading.Lock()


def _build_prefect_objects() -> dict[str, Any]:
    """Import Prefect and define the flow and its tasks (once); returns them by name (:data:`_PREFECT_NAMES`),
    also bound as this module's attributes."""
    with _build_lock:
        if "extract_features" in globals():
            return {name: globals()[name] for name in _PREFECT_NAMES}
        from prefect import flow, get_run_logger, task
        from prefect.cache_policies import NO_CACHE

        @task(name="extract-features", retries=0)
        def extract_task(cfg: ExtractConfig) -> dict[str, Any]:
            """Plan, extract and publish under the artefact lock; returns the published manifest."""
            return run_extraction(cfg)

        @task(name="extract-shard", retries=0, cache_policy=NO_CACHE)
        def extract_shard_task(job: ExtractShard) -> dict[str, Any]:
            """Extract one shard into its own parts (no lock); returns part entries, rejects and counters."""
            return extract_shard(job)

        @flow(name="extract-features", log_prints=False)
        def extract_features(cfg: ExtractConfig, shard_size: int | None = None) -> dict[str, Any]:
            """Extract features of ``cfg.data`` into ``cfg.store``; returns a small summary (artefact id, rows,
            rejects, timings).

            ``shard_size``: ``None`` shards automatically under a Dask task runner only, ``0`` never shards, ``N``
            splits the new images into shards of N (rounded up to a multiple of ``batch_size``) on any task runner."""
            cfg = replace(cfg, progress=False)
            shard, size = shard_setting(shard_size)
            if shard:
                manifest = run_sharded_extraction(cfg, submit_shards(extract_shard_task), size)
            else:
                manifest = extract_task(cfg)
            summary = summarise(manifest)
            get_run_logger().info("published %(artefact_id)s: %(rows)d rows, %(rejects)d rejects, %(extracted)d extracted",
                                  summary)
            return summary

        built = {"extract_task": extract_task, "extract_shard_task": extract_shard_task, "extract_features": extract_features}
        globals().update(built)
        return built


def __getattr__(name: str) -> Any:
    """``extract_features`` / ``extract_task`` / ``extract_shard_task``: built (Prefect imported) on first access."""
    if name in _PREFECT_NAMES:
        return _build_prefect_objects()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flow() -> Any:
    """The Prefect flow, for :func:`flows.runners.run_stage` (called only when the stage runs under Prefect)."""
    return _build_prefect_objects()["extract_features"]


def summarise(manifest: dict[str, Any]) -> dict[str, Any]:
    run = manifest.get("run", {})
    return {
        "artefact_id": manifest["artefact_id"], "rows": manifest["rows"], "rejects": manifest["rejects"],
        "dim": manifest["dim"], "extracted": run.get("extracted", 0), "images_per_s": run.get("images_per_s", 0.0),
        "layer": manifest["layer"]["name"], "model": manifest["model"].get("arch"),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="image folder, or CSV/Parquet list with a 'path' column")
    p.add_argument("--model", default="mobilenet_v2",
                   help="torchvision name (default mobilenet_v2) | timm:NAME | module.path:factory | TorchScript file")
    p.add_argument("--weights", default="imagenet", help="imagenet (default) | none | PATH to a state dict")
    p.add_argument("--weights-prefix", default=None, help="strip this key prefix from the state dict (e.g. 'module.')")
    p.add_argument("--layer", default=None, help="module name or alias fc6|fc7|penultimate (default fc7, else penultimate)")
    p.add_argument("--pool", default="avg", choices=["avg", "max", "none"], help="reduce conv maps (default avg)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader decode workers")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="forward precision: auto = bf16 autocast on CUDA, fp32 on CPU (features stored float32)")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where images are decoded: auto = gpu on CUDA, else cpu; gpu = JPEGs batch-decoded by nvJPEG and "
                        "resized on the GPU (other formats on the CPU); cpu = PIL in DataLoader workers")
    p.add_argument("--full-decode", action="store_true",
                   help="CPU decode: decode JPEGs at full size (default: at the largest 1/2, 1/4, 1/8 DCT reduction "
                        "that keeps the shorter side >= the resize target; recorded as preprocessing decode=jpeg-draft)")
    p.add_argument("--part-rows", type=int, default=None,
                   help="rows per Parquet part (default: about 64 MB of features); smaller parts resume finer after a crash")
    p.add_argument("--max-reject-rate", type=float, default=0.2, help="fail (publish nothing) above this reject rate")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights none")
    p.add_argument("--root", default=None, help="resolve list paths against this folder (default: the list's folder)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept list entries, and symlinked files / folders in a DATA folder, that resolve outside the "
                        "root (default: each is an 'outside-root' reject row)")
    p.add_argument("--max-list-rows", type=int, default=ListLimits.max_rows,
                   help=f"refuse a CSV/Parquet list with more rows (default {ListLimits.max_rows:,})")
    p.add_argument("--max-list-bytes", type=int, default=ListLimits.max_bytes,
                   help="refuse a CSV/Parquet list whose file, or Parquet uncompressed / decoded size, is larger "
                        f"(bytes; default {ListLimits.max_bytes:,} = 2 GiB)")
    p.add_argument("--resize", type=int, default=None, help="override: shorter-side resize (px)")
    p.add_argument("--crop", type=int, default=None, help="override: centre-crop size (px)")
    p.add_argument("--mean", type=_triple, default=None, help="override: normalisation mean R,G,B")
    p.add_argument("--std", type=_triple, default=None, help="override: normalisation std R,G,B")
    p.add_argument("--interpolation", default=None, help="override: nearest|bilinear|bicubic|lanczos")
    p.add_argument("--allow-extension-mismatch", action="store_true", help="decode e.g. a PNG named .jpg instead of rejecting it")


def _triple(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: need exactly three numbers (R,G,B)")
    return vals  # type: ignore[return-value]


def config_from_args(a: argparse.Namespace) -> ExtractConfig:
    return ExtractConfig(data=a.data, store=a.store, model=a.model, weights=a.weights, layer=a.layer, pool=a.pool,
                         batch_size=a.batch_size, device=a.device, num_workers=a.num_workers,
                         max_reject_rate=a.max_reject_rate, seed=a.seed, root=a.root,
                         allow_outside_root=a.allow_outside_root, strict_extension=not a.allow_extension_mismatch,
                         weights_prefix=a.weights_prefix, resize=a.resize, crop=a.crop, mean=a.mean, std=a.std,
                         interpolation=a.interpolation, part_rows=a.part_rows, precision=a.precision, progress=True,
                         decode=a.decode, full_decode=a.full_decode,
                         max_list_rows=a.max_list_rows, max_list_bytes=a.max_list_bytes)


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit
    from flows.runners import run_stage

    cfg = config_from_args(args)
    result = run_stage(args, _flow, lambda: summarise(run_extraction(cfg)),
                       cfg=cfg, shard_size=getattr(args, "shard_size", None))
    emit(result, args.json, (
        f"features {result['artefact_id']}: {result['rows']} rows (D={result['dim']}, layer {result['layer']}), "
        f"{result['extracted']} extracted this run at {result['images_per_s']} img/s, {result['rejects']} rejects\n"
        f"store: {cfg.store}"))
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("extract", help="extract a layer's features for a dataset into the store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from flows.runners import add_runner_arguments

    add_arguments(p)
    add_runner_arguments(p)
    add_store_argument(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cli)


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["extract", *sys.argv[1:]]))
