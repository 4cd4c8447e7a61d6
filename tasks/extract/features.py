"""Dataset-scale feature extraction into the Parquet feature store.

The pipeline: list DATA -> hash (cached) -> decide what is new -> decode in DataLoader workers -> one
forward pass per batch with a hook on the chosen layer -> pooled float32 features -> bounded Parquet parts
(journalled) -> publish a manifest that lists exactly the current dataset's rows.

Memory contract: O(batch_size x image) for decoding and the forward pass, O(part_rows x D) for the part
buffer, O(number of files) small listing records. Never O(dataset x D).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.atomic import atomic_write_json, sha256_bytes
from storage.errors import QualityGateError, StoreError, UsageError
from storage.features import (
    PartWriter,
    feature_schema,
    part_entries,
    read_journal,
    read_part,
    rejects_schema,
    remove_garbage,
    write_journal,
    write_part,
)
from storage.locks import artefact_lock
from storage.manifest import MANIFEST_NAME, file_entry, read_manifest, write_manifest
from storage.paths import Store, artefact_id
from tasks.core.datasets import ImageRecord, Reject, hash_records, list_dataset
from tasks.core.forward import forward_batch, has_head, normalise, pick_device, prepare_module, preprocess_uint8, resolve_precision
from tasks.core.hooks import LayerRef, resolve_layer
from tasks.core.images import DecodeLimits, RejectedImage, decode_image, read_file_bytes
from tasks.core.models import LoadedModel, Preprocess, apply_preprocess_overrides, load_model

__all__ = [
    "keep_if_unchanged",
    "unchanged_manifest",
    "ExtractConfig",
    "ExtractPlan",
    "plan_extraction",
    "extract_records",
    "publish_features",
    "run_extraction",
]

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Everything that defines an extraction run (CLI flags map 1:1)."""

    data: str
    store: str = "convlens-store"
    model: str = "mobilenet_v2"
    weights: str = "imagenet"
    layer: str | None = None
    pool: str = "avg"
    batch_size: int = 64
    device: str = "auto"
    num_workers: int | None = None
    max_reject_rate: float = 0.2
    seed: int = 0
    part_rows: int | None = None
    root: str | None = None
    allow_outside_root: bool = False
    strict_extension: bool = True
    min_side: int = 4
    max_pixels: int = 89_478_485
    weights_prefix: str | None = None
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16; features are stored float32
    progress: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.max_reject_rate <= 1.0:
            raise UsageError(f"--max-reject-rate must be in [0, 1], got {self.max_reject_rate}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.pool not in ("avg", "max", "none"):
            raise UsageError(f"--pool must be avg, max or none, got {self.pool!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device} asked for but no CUDA device is available; use --device cpu")


class _DecodeDataset(torch.utils.data.Dataset):
    """Decodes ``(src, name, expected_id)`` items to uint8 tensors; failures are returned, not raised."""

    def __init__(self, items: list[tuple[str, str, str]], pre: Preprocess, limits: DecodeLimits) -> None:
        self.items, self.pre, self.limits = items, pre, limits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        src, name, expected = self.items[i]
        try:
            data = read_file_bytes(src, self.limits)
            if expected and sha256_bytes(data) != expected:
                raise RejectedImage("changed-during-run", "the file's bytes changed after it was hashed; rerun")
            img = decode_image(data, name, self.limits)
            w, h = img.size
            return i, preprocess_uint8(img, self.pre), w, h, None, None
        except RejectedImage as exc:
            return i, None, 0, 0, exc.reason, exc.detail


def _worker_context() -> str | None:
    """``fork`` (fast start) from a single-threaded process; ``forkserver`` once other threads run (a Prefect
    flow or task run, a Dask worker): forking a process that has live event-loop / logging threads could leave
    a decode worker dead at start ("DataLoader worker exited unexpectedly"), seen under Prefect's test server."""
    import threading

    ours = ("convlens-", "MainThread", "pin_memory", "TMonitor", "Thread-")  # our heartbeat, tqdm's monitor, ...
    foreign = [t for t in threading.enumerate() if not t.name.startswith(ours)]
    if foreign or threading.current_thread() is not threading.main_thread():
        return "forkserver"
    return None


def _worker_init(_worker_id: int) -> None:
    # Decode workers resize with PIL; one torch thread each keeps them from fighting the model for cores.
    torch.set_num_threads(1)


def _collate(items):
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[4], it[5]) for it in items if it[1] is None]
    batch = torch.stack([it[1] for it in good]) if good else None
    return [it[0] for it in good], batch, [(it[2], it[3]) for it in good], bad


@dataclass
class ExtractPlan:
    """What a run will do: small records only (no tensors)."""

    config: ExtractConfig
    artefact_id: str
    artefact_dir: Path
    dataset_root: Path | str
    records: list[ImageRecord]
    rejects: list[Reject]
    todo: list[ImageRecord]
    stored_ids: set[str]
    layer: LayerRef
    model_spec: dict[str, Any]
    preprocess: Preprocess
    hash_stats: dict[str, int]
    extra_columns: list[str] = field(default_factory=list)
    donors: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # sibling artefacts' parts (same model key)


def _stored_ids(directory: Path, entries: list[dict[str, Any]]) -> set[str]:
    ids: set[str] = set()
    for e in entries:
        ids.update(read_part(directory, e, columns=["image_id"]).column("image_id").to_pylist())
    return ids


def plan_extraction(cfg: ExtractConfig, lm: LoadedModel | None = None) -> tuple[ExtractPlan, LoadedModel]:
    """List and hash DATA, resolve model and layer, and work out which images are new."""
    cfg.validate()
    lm = lm or load_model(cfg.model, cfg.weights, cfg.seed, cfg.weights_prefix)
    if any(v is not None for v in (cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)):
        lm = apply_preprocess_overrides(lm, cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)
    ref = resolve_layer(lm.module, cfg.layer)
    records, rejects, root = list_dataset(cfg.data, cfg.root, cfg.allow_outside_root)
    store = Store(cfg.store)
    key = {
        "dataset_root": str(root), "model": {k: v for k, v in lm.spec.items() if k != "weights_source"},
        "layer": ref.name, "side": ref.side, "pool": cfg.pool, "preprocess": lm.preprocess.to_dict(),
    }
    if resolve_precision(cfg.precision, cfg.device) == "bf16":
        # bf16 features differ from fp32 ones (~1e-2 relative): never mixed into one artefact
        key["compute"] = "bf16"
    root_name = root.name if isinstance(root, Path) else str(root).rstrip("/").rsplit("/", 1)[-1]
    aid = artefact_id(f"{root_name}-{str(lm.spec.get('arch', 'model')).replace(':', '-')}-{ref.alias}", key)
    adir = store.artefact_dir("features", aid)
    cache = store.kind_dir("cache") / f"hashes-{sha256_bytes(str(root).encode())[:16]}.parquet"
    hashed, hrejects, stats = hash_records(records, cache, progress=cfg.progress)
    rejects = rejects + hrejects
    stored: set[str] = set()
    if (adir / MANIFEST_NAME).is_file():
        stored |= _stored_ids(adir, part_entries(read_manifest(adir)))
    journal = read_journal(adir) if adir.is_dir() else {}
    for e in journal.get("parts", []):
        try:
            stored |= _stored_ids(adir, [e])
        except StoreError as exc:  # a journalled part that did not survive: redo its images
            log.warning("dropping journalled part %s: %s", e.get("name"), exc)
    # Identity is the content hash: features of the same bytes under the same model/layer/preprocessing in any
    # other dataset of this store (e.g. a copy in another bucket) are reused, not re-extracted.
    model_key = {k: v for k, v in key.items() if k != "dataset_root"}
    donors: list[tuple[Path, dict[str, Any]]] = []
    wanted = {r.image_id for r in hashed} - stored
    if wanted:
        for other_id, om in store.iter_artefacts("features"):
            if other_id == aid or om.get("pool") != cfg.pool or om.get("layer", {}).get("name") != ref.name:
                continue
            okey = {"model": {k: v for k, v in om.get("model", {}).items() if k not in ("weights_source",)},
                    "layer": om["layer"]["name"], "side": om["layer"]["side"], "pool": om.get("pool"),
                    "preprocess": om.get("preprocessing")}
            if om.get("precision") == "bf16":
                okey["compute"] = "bf16"
            if json.dumps(okey, sort_keys=True, default=str) != json.dumps(model_key, sort_keys=True, default=str):
                continue
            odir = store.artefact_dir("features", other_id)
            for e in part_entries(om):
                try:
                    ids = set(read_part(odir, e, columns=["image_id"]).column("image_id").to_pylist())
                except StoreError:
                    continue
                if ids & wanted:
                    donors.append((odir, e))
                    stored |= ids & wanted
    seen: set[str] = set()
    todo = []
    for r in hashed:
        if r.image_id not in stored and r.image_id not in seen:
            seen.add(r.image_id)
            todo.append(r)
    extra = sorted({k for r in hashed for k in r.extras})
    return ExtractPlan(cfg, aid, adir, root, hashed, rejects, todo, stored, ref, lm.spec, lm.preprocess, stats, extra,
                       donors), lm


def extract_records(plan: ExtractPlan, lm: LoadedModel, records: list[ImageRecord] | None = None,
                    on_part: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], list[Reject], dict[str, Any]]:
    """Decode and embed ``records`` (default: the plan's todo list), writing parts into the artefact dir.

    Returns ``(part_entries, decode_rejects, stats)``. Safe to run on disjoint shards in parallel.
    """
    cfg = plan.config
    records = plan.todo if records is None else records
    device = pick_device(cfg.device)
    module = prepare_module(lm.module, device, plan.layer)
    limits = DecodeLimits(max_pixels=cfg.max_pixels, min_side=cfg.min_side, strict_extension=cfg.strict_extension)
    items = [(r.src, r.path, r.image_id) for r in records]
    default_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else max(1, min(4, (os.cpu_count() or 2) // 2))
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers
    if isinstance(plan.dataset_root, str):
        workers = 0  # fsspec filesystems (s3fs, memory) are not fork-safe: decode in-process
    use_workers = workers if len(items) > cfg.batch_size else 0
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(items, plan.preprocess, limits), batch_size=cfg.batch_size, shuffle=False,
        num_workers=use_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False, worker_init_fn=_worker_init,
        prefetch_factor=4 if use_workers else None,
        multiprocessing_context=_worker_context() if use_workers else None,
    )
    with_preds = has_head(module)
    writer: PartWriter | None = None
    rejects: list[Reject] = []
    t0 = time.perf_counter()
    done = 0
    bar = None
    if cfg.progress and items:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="extract", unit="img", dynamic_ncols=True)
    try:
        for idx, batch, sizes, bad in loader:
            for i, reason, detail in bad:
                rejects.append(Reject(records[i].path, reason, detail))
            if batch is not None:
                x = normalise(batch.to(device, non_blocking=True), plan.preprocess)
                feats, preds, probs = forward_batch(module, x, plan.layer, cfg.pool, device, with_preds, cfg.precision)
                if writer is None:
                    dim = feats.shape[1]
                    part_rows = cfg.part_rows or max(256, min(65536, (64 << 20) // (4 * dim)))
                    with_preds = preds is not None
                    writer = PartWriter(plan.artefact_dir, dim, with_preds, plan.extra_columns, part_rows, on_part)
                meta = []
                for i, (w, h) in zip(idx, sizes):
                    r = records[i]
                    meta.append({"image_id": r.image_id, "path": r.path, "label": r.label, "split": r.split,
                                 "width": w, "height": h, **r.extras})
                writer.add(meta, feats, preds, probs)
            done += len(idx) + len(bad)
            if bar is not None:
                bar.update(len(idx) + len(bad))
                bar.set_postfix(img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}", rejects=len(rejects))
    finally:
        if bar is not None:
            bar.close()
    entries = writer.close() if writer is not None else []
    dt = time.perf_counter() - t0
    stats = {"extracted": done - len(rejects), "decode_rejects": len(rejects), "seconds": round(dt, 3),
             "images_per_s": round((done - len(rejects)) / dt, 2) if dt > 0 and done else 0.0,
             "dim": writer.dim if writer else None, "with_preds": writer.with_preds if writer else None}
    return entries, rejects, stats


def _rejects_table(rejects: list[Reject]) -> pa.Table:
    rejects = sorted(rejects, key=lambda r: (r.path, r.reason))
    return pa.table({"path": [r.path for r in rejects], "reason": [r.reason for r in rejects],
                     "detail": [r.detail for r in rejects], "image_id": [None] * len(rejects)}, schema=rejects_schema())


def _row_key(d: dict[str, Any], extra: list[str]) -> tuple:
    return (d["image_id"], d.get("label"), d.get("split"), *[None if d.get(c) is None else str(d.get(c)) for c in extra])


def publish_features(plan: ExtractPlan, new_entries: list[dict[str, Any]], decode_rejects: list[Reject],
                     stats: dict[str, Any], categories: list[str] | None = None) -> dict[str, Any]:
    """Merge stored + new parts into exactly the current dataset's rows and publish the manifest.

    Parts whose rows all still match are kept as they are; parts with deleted / renamed / relabelled rows are
    rewritten; rows for duplicate or renamed files are patched from stored features (never re-extracted).
    Raises :class:`QualityGateError` (nothing published) when the reject rate exceeds the threshold or a
    feature is NaN / Inf.
    """
    cfg = plan.config
    adir = plan.artefact_dir
    old = read_manifest(adir) if (adir / MANIFEST_NAME).is_file() else None
    journal = read_journal(adir)
    candidates = (part_entries(old) if old else []) + journal.get("parts", []) + new_entries
    seen_names: set[str] = set()
    candidates = [e for e in candidates if not (e["name"] in seen_names or seen_names.add(e["name"]))]
    rejected_paths = {r.path for r in decode_rejects}
    desired = {r.path: r for r in plan.records if r.path not in rejected_paths}
    extra = plan.extra_columns
    desired_key = {p: _row_key({"image_id": r.image_id, "label": r.label, "split": r.split, **r.extras}, extra)
                   for p, r in desired.items()}
    dim = stats.get("dim") or (old or {}).get("dim")
    with_preds = stats.get("with_preds") if stats.get("dim") else (old or {}).get("with_preds")
    kept: list[dict[str, Any]] = []
    satisfied: set[str] = set()
    donor: dict[str, tuple[dict[str, Any], int]] = {}
    nonfinite = 0
    nonzero = False  # quality gate: a feature column that is all zeros carries no information
    for e in candidates:
        try:
            t = read_part(adir, e)
        except StoreError as exc:
            log.warning("skipping unreadable part %s: %s", e["name"], exc)
            continue
        if dim is None:
            dim = t.schema.field("feature").type.list_size
            with_preds = "pred_top5" in t.column_names
        d = t.select([c for c in ("image_id", "path", "label", "split", *extra) if c in t.column_names]).to_pylist()
        keep = []
        for i, row in enumerate(d):
            donor.setdefault(row["image_id"], (e, i))
            p = row["path"]
            if p in desired_key and p not in satisfied and _row_key(row, extra) == desired_key[p]:
                keep.append(i)
                satisfied.add(p)
        feats = t.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        nonfinite += int((~np.isfinite(feats.reshape(len(d), -1)[keep])).any(axis=1).sum()) if keep else 0
        nonzero = nonzero or bool(keep and np.any(feats.reshape(len(d), -1)[keep] != 0))
        if len(keep) == len(d) and t.schema.names == feature_schema(dim, with_preds, extra).names:
            kept.append(e)
        elif keep:
            kept.append(write_part(adir, t.take(pa.array(keep)).cast(feature_schema(dim, with_preds, extra))))
    for odir, e in plan.donors:  # sibling artefacts: donors only, never kept as our own parts
        try:
            ids = read_part(odir, e, columns=["image_id"]).column("image_id").to_pylist()
        except StoreError:
            continue
        if dim is None:
            fschema = pq.read_schema(odir / e["name"])
            dim, with_preds = fschema.field("feature").type.list_size, "pred_top5" in fschema.names
        for i, iid in enumerate(ids):
            donor.setdefault(iid, (dict(e, _dir=str(odir)), i))
    missing = [p for p in desired if p not in satisfied]
    patch_rows = []
    for p in missing:
        r = desired[p]
        if r.image_id in donor:
            patch_rows.append((p, r, donor[r.image_id]))
    if patch_rows:
        cache: dict[str, pa.Table] = {}
        rows = []
        for p, r, (e, i) in patch_rows:
            src_dir = Path(e["_dir"]) if "_dir" in e else adir
            ckey = f"{src_dir}/{e['name']}"
            t = cache.get(ckey) or cache.setdefault(ckey, read_part(src_dir, e, verify=False))
            row = t.slice(i, 1).to_pylist()[0]
            extras = {c: None if r.extras.get(c) is None else str(r.extras.get(c)) for c in extra}
            row.update({"path": p, "label": r.label, "split": r.split, **extras})
            rows.append(row)
            satisfied.add(p)
            nonzero = nonzero or any(v != 0 for v in row["feature"])
        kept.append(write_part(adir, pa.Table.from_pylist(rows, schema=feature_schema(dim, with_preds, extra))))
    all_rejects = list(plan.rejects) + list(decode_rejects)
    unextracted = [p for p in desired if p not in satisfied]
    n_rows = sum(e["rows"] for e in kept)
    total = n_rows + len(all_rejects)
    rate = len(all_rejects) / total if total else 0.0
    if total and rate > cfg.max_reject_rate:
        reasons: dict[str, int] = {}
        for r in all_rejects:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        raise QualityGateError(
            f"{len(all_rejects)} of {total} images rejected ({rate:.1%}) > --max-reject-rate {cfg.max_reject_rate:.0%}; "
            f"reasons: {', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}. Nothing was published; the previous "
            "manifest stays current. Fix the inputs or raise --max-reject-rate"
        )
    if nonfinite:
        raise QualityGateError(f"{nonfinite} feature rows contain NaN or Inf; nothing was published. "
                               "Check the model/weights (e.g. fp16 overflow) and rerun")
    if n_rows and not nonzero:
        raise QualityGateError(f"all {n_rows} stored feature vectors are exactly zero: the feature column carries no "
                               "information (a dead layer, e.g. after a ReLU with broken weights, or blank inputs); "
                               "nothing was published and the previous manifest stays current. Check --weights/--layer")
    if unextracted:
        log.warning("%d listed images have no stored feature (e.g. %s)", len(unextracted), unextracted[0])
    rej_entry = write_part(adir, _rejects_table(all_rejects), prefix="rejects")
    rej_entry["role"] = "rejects"
    files = [dict(e, role="part") for e in kept] + [rej_entry]
    if categories:
        atomic_write_json(adir / "categories.json", categories)
        files.append(file_entry(adir, "categories.json", role="categories"))
    label_counts: dict[str, int] = {}
    for p, r in desired.items():
        if p in satisfied and r.label is not None:
            label_counts[r.label] = label_counts.get(r.label, 0) + 1
    manifest = {
        "kind": "features",
        "artefact_id": plan.artefact_id,
        "dataset_root": str(plan.dataset_root),
        "data": str(cfg.data),
        "model": plan.model_spec,
        "layer": {"alias": plan.layer.alias, "name": plan.layer.name, "side": plan.layer.side},
        "pool": cfg.pool,
        "precision": resolve_precision(cfg.precision, cfg.device),
        "preprocessing": plan.preprocess.to_dict(),
        "dim": int(dim) if dim else 0,
        "with_preds": bool(with_preds),
        "extra_columns": extra,
        "rows": n_rows,
        "unique_images": len({desired[p].image_id for p in satisfied}),
        "rejects": len(all_rejects),
        "labels": dict(sorted(label_counts.items())),
        "seed": cfg.seed,
        "files": files,
        "run": {
            "extracted": stats.get("extracted", 0), "reused": len(plan.records) - len(plan.todo),
            "decode_rejects": len(decode_rejects), "seconds": stats.get("seconds", 0.0),
            "images_per_s": stats.get("images_per_s", 0.0), "hash": plan.hash_stats,
            "removed": len({p for p in _old_paths(adir, old)} - set(desired)) if old else 0,
            "added_paths": len(set(desired) - set(_old_paths(adir, old))) if old else len(desired),
        },
        "previous_created": old.get("created") if old else None,
    }
    published = write_manifest(adir, manifest)
    (adir / "journal.json").unlink(missing_ok=True)
    remove_garbage(adir, published)
    return published


def _old_paths(adir: Path, old: dict[str, Any] | None) -> list[str]:
    if not old:
        return []
    out: list[str] = []
    for e in part_entries(old):
        try:
            out.extend(read_part(adir, e, columns=["path"], verify=False).column("path").to_pylist())
        except StoreError:
            continue
    return out


def run_extraction(cfg: ExtractConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Plan, extract the new images and publish, holding the artefact's writer lock. Returns the manifest."""
    plan, lm = plan_extraction(cfg, lm)
    plan.artefact_dir.mkdir(parents=True, exist_ok=True)
    with artefact_lock(plan.artefact_dir):
        log.info("%s: %d listed, %d already stored, %d to extract, %d rejected while listing",
                 plan.artefact_id, len(plan.records), len(plan.records) - len(plan.todo), len(plan.todo), len(plan.rejects))
        journal = read_journal(plan.artefact_dir)
        kept = keep_if_unchanged(plan, journal)
        if kept is not None:
            return kept
        journal.setdefault("parts", [])

        def on_part(entry: dict[str, Any]) -> None:
            journal["parts"].append(entry)
            write_journal(plan.artefact_dir, journal)

        entries, rejects, stats = extract_records(plan, lm, on_part=on_part)
        return publish_features(plan, entries, rejects, stats, lm.categories)


def keep_if_unchanged(plan: ExtractPlan, journal: dict[str, Any]) -> dict[str, Any] | None:
    """Under the artefact lock: when nothing is new, gone or relabelled and no journal is pending, keep the
    published manifest (its ``created`` stamp keys every later stage's cache, so indexes, maps, audits and
    neurons are all reused on a no-op rerun) and return it with a zero-work ``run``; else None."""
    same = None if journal.get("parts") else unchanged_manifest(plan)
    if same is None:
        return None
    log.info("%s: unchanged (%d rows); nothing extracted, manifest kept", plan.artefact_id, same["rows"])
    return dict(same, run={"extracted": 0, "reused": len(plan.records), "decode_rejects": 0, "seconds": 0.0,
                           "images_per_s": 0.0, "hash": plan.hash_stats, "removed": 0, "added_paths": 0,
                           "unchanged": True})


def unchanged_manifest(plan: ExtractPlan) -> dict[str, Any] | None:
    """The published manifest when the listing matches it exactly (same paths, bytes, labels, splits and
    listing rejects, nothing to extract); else None. The caller checks first that no journal is pending."""
    from storage.features import read_meta

    adir = plan.artefact_dir
    if plan.todo or plan.extra_columns or not (adir / MANIFEST_NAME).is_file():
        return None
    old = read_manifest(adir)
    if int(old.get("rejects", -1)) != len(plan.rejects):
        return None
    meta = read_meta(adir, old, verify=False)
    if len(meta) != len(plan.records):
        return None

    def norm(v: Any) -> Any:
        return None if v is None or (isinstance(v, float) and v != v) else str(v)

    stored = {(p, i, norm(lab), norm(sp)) for p, i, lab, sp in zip(meta["path"], meta["image_id"], meta["label"], meta["split"])}
    listed = {(r.path, r.image_id, norm(r.label), norm(r.split)) for r in plan.records}
    return old if stored == listed else None
