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
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from storage.atomic import atomic_write_json, sha256_bytes, sha256_file
from storage.errors import ConvlensError, QualityGateError, StoreError, UsageError
from storage.features import (
    FileStamps,
    PartWriter,
    feature_schema,
    part_entries,
    part_gate,
    read_journal,
    read_part,
    read_part_columns,
    rejects_schema,
    remove_garbage,
    write_journal,
    write_part,
)
from storage.locks import artefact_lock
from storage.manifest import CODE_VERSION, MANIFEST_NAME, file_entry, read_manifest, write_manifest
from storage.paths import Store, artefact_id
from tasks.core.datasets import (
    HASH_CHUNK,
    DigestSet,
    ImageRecord,
    ListLimits,
    RecordTable,
    RecordTableBuilder,
    Reject,
    image_digests,
    iter_hashed_tables,
    open_listing,
)
from tasks.core.forward import (
    DECODE_CHOICES,
    TENSOR_DECODES,
    CpuStreams,
    PendingFeatures,
    cpu_streams_plan,
    decode_preprocess_jpegs,
    forward_batch_async,
    has_head,
    normalise,
    pick_device,
    prepare_module,
    preprocess_uint8,
    resolve_decode,
    resolve_precision,
    worker_context,
)
from tasks.core.hooks import LayerRef, resolve_layer
from tasks.core.images import DecodeLimits, ImageHeader, RejectedImage, decode_image_sized, draft_request, inspect_image, read_file_bytes
from tasks.core.models import (
    LoadedModel,
    Preprocess,
    apply_preprocess_overrides,
    embedded_weights_path,
    load_model,
    spec_identity,
)

__all__ = [
    "keep_if_unchanged",
    "unchanged_manifest",
    "ExtractConfig",
    "ExtractPlan",
    "plan_extraction",
    "model_for_plan",
    "extract_records",
    "copies_to_retry",
    "extract_copies",
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
    decode: str = "auto"  # auto (gpu on CUDA, else cpu) | cpu (PIL in workers) | gpu (nvJPEG); tasks.core.forward.resolve_decode
    full_decode: bool = False  # CPU decode: JPEGs at full size instead of the DCT-reduced "jpeg-draft" (the default)
    max_list_rows: int = ListLimits.max_rows  # caps on a CSV / Parquet image list (tasks.core.datasets.ListLimits)
    max_list_bytes: int = ListLimits.max_bytes
    plan_chunk: int = HASH_CHUNK  # records the planner stats / hashes / merges at a time (memory O(chunk) in flight)

    def list_limits(self) -> ListLimits:
        return ListLimits(max_rows=self.max_list_rows, max_bytes=self.max_list_bytes)

    def validate(self) -> None:
        self.list_limits().validate()
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
        if self.decode not in DECODE_CHOICES:
            raise UsageError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {self.decode!r}")


def _decode_mode(cfg: ExtractConfig, pre: Preprocess) -> str:
    """The run's decode mode (:func:`tasks.core.forward.resolve_decode`), as recorded in the manifest."""
    return resolve_decode(cfg.decode, cfg.device, cfg.full_decode, pre.interpolation)


def _preprocessing_record(cfg: ExtractConfig, pre: Preprocess) -> dict[str, Any]:
    """The manifest's ``preprocessing`` (and the artefact key's): the weights' transforms plus ``decode``, so
    features of DCT-reduced, full-size and GPU-decoded JPEGs never share an artefact or donate to each other."""
    return {**pre.to_dict(), "decode": _decode_mode(cfg, pre)}


class _DecodeDataset(torch.utils.data.Dataset):
    """Decodes ``(src, name, expected_id)`` items to uint8 tensors; failures are returned, not raised.

    ``mode`` (:func:`tasks.core.forward.resolve_decode`): ``jpeg-draft`` decodes JPEGs at the largest DCT reduction
    that keeps the shorter side >= ``pre.resize``; ``full`` at full size; in a tensor mode (``nvjpeg``) a JPEG that
    passes the header checks comes back undecoded as ``("jpeg", bytes (n,) uint8, EXIF orientation)`` for the
    batched decode on the model's device, everything else is decoded here. ``width`` / ``height`` are always the
    file's full size after EXIF orientation."""

    def __init__(self, items: list[tuple[str, str, str]], pre: Preprocess, limits: DecodeLimits, mode: str = "full") -> None:
        self.items, self.pre, self.limits, self.mode = items, pre, limits, mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        src, name, expected = self.items[i]
        try:
            data = read_file_bytes(src, self.limits)
            if expected and sha256_bytes(data) != expected:
                raise RejectedImage("changed-during-run", "the file's bytes changed after it was hashed; rerun")
            if self.mode in TENSOR_DECODES:
                hdr = inspect_image(data, name, self.limits)
                if _tensor_decodable(hdr, data):
                    return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), hdr.orientation), \
                        hdr.width, hdr.height, None, None
            draft = draft_request(self.pre.resize) if self.mode == "jpeg-draft" else None
            img, (w, h) = decode_image_sized(data, name, self.limits, draft)
            return i, preprocess_uint8(img, self.pre), w, h, None, None
        except RejectedImage as exc:
            return i, None, 0, 0, exc.reason, exc.detail


def _tensor_decodable(hdr: ImageHeader, data: bytes) -> bool:
    """JPEGs the batched tensor decoder takes: baseline or progressive YCbCr / grey with a parseable EXIF block
    and an end-of-image marker at the very end (a truncated file goes to PIL, which rejects it as such)."""
    return (hdr.format == "JPEG" and hdr.mode in ("RGB", "L") and hdr.orientation is not None
            and data.rstrip(b"\x00").endswith(b"\xff\xd9"))


def _worker_init(_worker_id: int) -> None:
    # Decode workers resize with PIL; one torch thread each keeps them from fighting the model for cores.
    torch.set_num_threads(1)


def _collate(items):
    """``(indices, (N,3,crop,crop) uint8 | None, sizes, bad (i, reason, detail), jpegs (i, bytes, orientation, w, h))``."""
    good = [it for it in items if isinstance(it[1], torch.Tensor)]
    jpegs = [(it[0], it[1][1], it[1][2], it[2], it[3]) for it in items if isinstance(it[1], tuple)]
    bad = [(it[0], it[4], it[5]) for it in items if it[1] is None]
    batch = torch.stack([it[1] for it in good]) if good else None
    return [it[0] for it in good], batch, [(it[2], it[3]) for it in good], bad, jpegs


def _with_jpegs(idx: list[int], batch: torch.Tensor | None, sizes: list[tuple[int, int]],
                decoded: list[tuple[int, torch.Tensor, int, int]], device: torch.device
                ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, int]]]:
    """Merge the worker-decoded ``batch`` (CPU) and the device-decoded JPEGs into one ``(N,3,crop,crop) uint8``
    batch on ``device``, rows in index (listing) order."""
    if not decoded:
        return idx, (batch.to(device, non_blocking=True) if batch is not None else None), sizes
    rows = [(i, t, wh) for i, t, wh in zip(idx, batch.to(device, non_blocking=True), sizes)] if batch is not None else []
    rows += [(i, t, (w, h)) for i, t, w, h in decoded]
    rows.sort(key=lambda r: r[0])
    return [r[0] for r in rows], torch.stack([r[1] for r in rows]), [r[2] for r in rows]


@dataclass
class ExtractPlan:
    """What a run will do: small records only (no tensors).

    O(listed images): ``records`` (a columnar :class:`tasks.core.datasets.RecordTable`, read as a sequence of
    :class:`ImageRecord`: ~80 B + the path per image) and ``stored_ids`` (a :class:`DigestSet`, 32 B per stored
    image). ``todo`` is O(images to extract)."""

    config: ExtractConfig
    artefact_id: str
    artefact_dir: Path
    dataset_root: Path | str
    records: Sequence[ImageRecord]  # a RecordTable from plan_extraction
    rejects: list[Reject]
    todo: list[ImageRecord]
    stored_ids: DigestSet
    layer: LayerRef
    model_spec: dict[str, Any]
    preprocess: Preprocess
    hash_stats: dict[str, int]
    extra_columns: list[str] = field(default_factory=list)
    donors: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # sibling artefacts' parts (same model key)
    repaired: list[dict[str, Any]] = field(default_factory=list)  # published files dropped as corrupt (repair)
    stamps_path: Path | None = None  # FileStamps of this artefact's files (store cache); None: always hash in full
    identity_path: Path | None = None  # the model identity cache entry this plan used or wrote (store cache)


def _part_ids(directory: Path, entry: dict[str, Any], stamps: FileStamps) -> np.ndarray:
    """The ``(n,) S32`` image digests of one listed part after checking it (its stamp, else a full sha256)."""
    stamps.check(directory, entry)
    return image_digests(read_part_columns(directory, entry, ["image_id"]).column("image_id"))


def _verified_ids(adir: Path, manifest: dict[str, Any], stamps: FileStamps,
                  dropped: list[dict[str, Any]]) -> Iterator[np.ndarray]:
    """Check every file the published manifest lists: a file whose size, mtime and inode match its stamp
    (:class:`storage.features.FileStamps`) is trusted, any other is hashed in full (then stamped); a part's
    ``image_id`` column is read either way. Yields the digests of every row of each part that checks out (for
    :meth:`DigestSet.from_chunks`: memory O(part)) and appends to ``dropped`` one record per file that does not
    (missing, modified or unreadable). A dropped part's rows are not stored as far as the plan goes, so they are
    re-extracted from the images and the next publish lists a clean set of files: a flipped byte never wedges the
    artefact."""
    for e in manifest.get("files", []):
        role = e.get("role", "part")
        try:
            if role == "part":
                yield _part_ids(adir, e, stamps)
            else:
                stamps.check(adir, e)
        except StoreError as exc:
            dropped.append({"name": e["name"], "role": role, "rows": e.get("rows"), "sha256": e.get("sha256"),
                            "error": str(exc)[:300]})
            log.error("%s: published %s %s is corrupt or unreadable (%s); REPAIRING: %s", adir.name, role, e["name"],
                      exc, f"its {e.get('rows', '?')} rows are treated as not stored and re-extracted from the images"
                      if role == "part" else "it is written anew")


def _stored_ids(adir: Path, journal: dict[str, Any], stamps: FileStamps,
                dropped: list[dict[str, Any]]) -> Iterator[np.ndarray]:
    """The digests of the artefact's stored rows, part by part: the published manifest's (:func:`_verified_ids`),
    then the parts an interrupted run journalled (one that did not survive is dropped: its images are redone)."""
    if (adir / MANIFEST_NAME).is_file():
        yield from _verified_ids(adir, read_manifest(adir), stamps, dropped)
    for e in journal.get("parts", []):
        try:
            yield _part_ids(adir, e, stamps)
        except StoreError as exc:  # a journalled part that did not survive: redo its images
            log.warning("dropping journalled part %s: %s", e.get("name"), exc)


# ------------------------------------------------------------------------------ model identity cache
#
# The artefact key needs only what a loaded model *says about itself*: its spec (source, arch, weights sha256,
# num_params, locations), its preprocessing (after the overrides) and the resolved layer. Building the model for
# that costs 1-2 s (importing torchvision, building, hashing and loading weights), all wasted on a no-op rerun.
# These values are cached as JSON in the store's cache dir, keyed by everything that determines them; the
# planner loads the model only when there is work for it. JSON only, and nothing read back names code: the
# entry holds plain values that are checked field by field, and the model is still built from the user's flags.

MODEL_IDENTITY_FORMAT = 1


@dataclass(frozen=True)
class _ModelIdentity:
    """What the plan needs from a loaded model: ``spec`` (manifest ``model``), ``preprocess`` (after overrides),
    ``layer`` (the resolved hook point) and ``preprocess_default`` (the weights' own, when overridden)."""

    spec: dict[str, Any]
    preprocess: Preprocess
    layer: LayerRef
    preprocess_default: dict[str, Any] | None = None


def _identity_of(lm: LoadedModel, ref: LayerRef) -> _ModelIdentity:
    return _ModelIdentity(dict(lm.spec), lm.preprocess, ref, lm.extra.get("preprocess_default"))


def _lib_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _file_identity(role: str, path: Path) -> dict[str, Any]:
    """``role``, resolved path and sha256 of the bytes (never size / mtime: a same-size, same-mtime rewrite
    must not hit). Raises OSError when the file cannot be read."""
    return {"role": role, "path": str(path.resolve()), "sha256": sha256_file(path)}


def _model_identity_key(cfg: ExtractConfig) -> dict[str, Any] | None:
    """The cache key of ``cfg``'s model identity, or None when it is not cached: a ``module:factory`` model
    (its code can change under the same name and versions), or a named file that cannot be read (then the
    model loader reports it). Mirrors :func:`tasks.core.models.load_model`'s dispatch; hashes each weights or
    TorchScript file it would read (~30 ms for 14 MB)."""
    from tasks.core import hooks as core_hooks
    from tasks.core import models as core_models

    model = cfg.model or ""
    files: list[dict[str, Any]] = []
    kind = "torchvision"
    name = model
    try:
        if model.startswith("torchscript:"):
            kind, ts = "torchscript", Path(model.split(":", 1)[1]).expanduser()
        elif model.startswith("timm:"):
            kind, ts = "timm", None
        elif model.startswith("torchvision:"):
            kind, ts, name = "torchvision", None, model.split(":", 1)[1]
        elif Path(model).expanduser().suffix in (".pt", ".pth", ".ts", ".zip") or Path(model).expanduser().is_file():
            kind, ts = "torchscript", Path(model).expanduser()
        elif ":" in model or not model:
            return None  # user code (module:factory): always built
        else:
            ts = None
        if ts is not None:
            files.append(_file_identity("model", ts))
        elif cfg.weights not in ("imagenet", "none", "", None):
            files.append(_file_identity("weights", Path(cfg.weights).expanduser()))
        elif cfg.weights == "imagenet" and kind == "torchvision" and name == "mobilenet_v2":
            files.append(_file_identity("embedded", embedded_weights_path()))
        code = [sha256_file(Path(m.__file__)) for m in (core_models, core_hooks)]  # type: ignore[arg-type]
    except (OSError, ConvlensError) as exc:
        log.debug("model identity not cached for %s: %s", model, exc)
        return None
    key: dict[str, Any] = {
        "format": MODEL_IDENTITY_FORMAT, "code_version": CODE_VERSION, "code_sha256": code,
        "torch": _lib_version("torch"), "torchvision": _lib_version("torchvision"),
        "timm": _lib_version("timm") if kind == "timm" else None,
        "model": model, "weights": cfg.weights, "weights_prefix": cfg.weights_prefix, "seed": cfg.seed,
        "layer": cfg.layer, "pool": cfg.pool, "resize": cfg.resize, "crop": cfg.crop,
        "mean": list(cfg.mean) if cfg.mean else None, "std": list(cfg.std) if cfg.std else None,
        "interpolation": cfg.interpolation, "precision": cfg.precision, "decode": cfg.decode,
        "full_decode": cfg.full_decode, "files": files,
    }
    if kind == "torchvision" and cfg.weights == "imagenet" and name != "mobilenet_v2":
        key["hub_dir"] = str(Path(torch.hub.get_dir()).resolve())  # where the local ImageNet weights are found
    return json.loads(json.dumps(key))  # plain JSON values, as they compare after a round trip


def _identity_path(store: Store, key: dict[str, Any]) -> Path:
    return store.kind_dir("cache") / f"model-{sha256_bytes(json.dumps(key, sort_keys=True).encode())[:24]}.json"


_ID_BLOCK = 1 << 16
"""Digests taken from the listing per block when the plan builds a set of some of them (O(block) memory)."""
_SCALARS = (str, int, float, bool, type(None))


def _parse_identity(raw: Any, key: dict[str, Any]) -> _ModelIdentity:
    """Check a cache entry field by field (ValueError / TypeError / KeyError when it is not one of ours)."""
    if not isinstance(raw, dict) or raw.get("key") != key:
        raise ValueError("entry is for another key")
    spec = raw["spec"]
    if not isinstance(spec, dict) or not all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in spec.items()):
        raise ValueError("spec is not a flat record")
    if {"source", "arch", "num_params"} - set(spec):
        raise ValueError("spec lacks source / arch / num_params")
    p = raw["preprocess"]
    mean, std = tuple(p["mean"]), tuple(p["std"])  # as recorded (ints stay ints: the key's JSON must not change)
    if not (type(p["resize"]) is int and type(p["crop"]) is int and isinstance(p["interpolation"], str)
            and len(mean) == 3 and len(std) == 3
            and all(type(x) in (int, float) for x in mean + std)):
        raise ValueError("bad preprocess")
    pre = Preprocess(p["resize"], p["crop"], mean, std, p["interpolation"])  # type: ignore[arg-type]
    lay = raw["layer"]
    token = lay.get("token")
    if not (isinstance(lay["alias"], str) and isinstance(lay["name"], str) and lay["side"] in ("output", "input")
            and (token is None or type(token) is int)):
        raise ValueError("bad layer")
    default = raw.get("preprocess_default")
    if default is not None and not isinstance(default, dict):
        raise ValueError("bad preprocess_default")
    if {f["role"] for f in key["files"]} & {"weights", "embedded", "model"} and \
            spec.get("weights_sha256") not in {f["sha256"] for f in key["files"]}:
        raise ValueError("spec's weights sha256 is not the hashed file's")
    if "hub_dir" in key:  # torchvision ImageNet weights from torch's hub cache: the same bytes must still be there
        src = Path(str(spec.get("weights_source")))
        if src.parent != Path(key["hub_dir"]) / "checkpoints" or sha256_file(src) != spec.get("weights_sha256"):
            raise ValueError("hub weights file changed")
    return _ModelIdentity(spec, pre, LayerRef(lay["alias"], lay["name"], lay["side"], token), default)


def _read_model_identity(path: Path, key: dict[str, Any]) -> _ModelIdentity | None:
    """The cached identity for ``key``, or None (no entry; an unreadable or foreign one is logged at debug)."""
    try:
        raw = json.loads(path.read_text("utf-8"))
        return _parse_identity(raw, key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.debug("ignoring model identity cache %s (%s: %s); the model is loaded", path, type(exc).__name__, exc)
        return None


def _write_model_identity(path: Path, key: dict[str, Any], ident: _ModelIdentity) -> None:
    """Record ``ident`` for ``key`` (atomic JSON; a failure only costs the next run a model load)."""
    entry = {"key": key, "spec": ident.spec, "preprocess": ident.preprocess.to_dict(),
             "layer": {"alias": ident.layer.alias, "name": ident.layer.name, "side": ident.layer.side,
                       "token": ident.layer.token},
             "preprocess_default": ident.preprocess_default}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry)
    except (OSError, TypeError, ValueError) as exc:
        log.debug("could not write model identity cache %s: %s", path, exc)


def _load_for(cfg: ExtractConfig) -> tuple[LoadedModel, LayerRef]:
    """Build ``cfg``'s model (with its preprocessing overrides) and resolve its layer."""
    lm = load_model(cfg.model, cfg.weights, cfg.seed, cfg.weights_prefix)
    if any(v is not None for v in (cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)):
        lm = apply_preprocess_overrides(lm, cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)
    return lm, resolve_layer(lm.module, cfg.layer)


def model_for_plan(plan: ExtractPlan, lm: LoadedModel | None) -> LoadedModel:
    """The plan's model: ``lm`` when given (as :func:`plan_extraction` returned it), else built now from the
    plan's config. A plan made from the model identity cache is checked against the built model (spec,
    preprocessing, layer); a mismatch drops the cache entry and raises :class:`StoreError` (nothing was written
    with the wrong identity; rerun)."""
    if lm is not None:
        return lm
    lm, ref = _load_for(plan.config)
    got = (lm.spec, lm.preprocess, (ref.alias, ref.name, ref.side, ref.token))
    want = (plan.model_spec, plan.preprocess, (plan.layer.alias, plan.layer.name, plan.layer.side, plan.layer.token))
    if json.dumps(got[0], sort_keys=True) != json.dumps(want[0], sort_keys=True) or got[1:] != want[1:]:
        if plan.identity_path is not None:
            plan.identity_path.unlink(missing_ok=True)
        raise StoreError(f"{plan.artefact_id}: the model built from the flags does not match the cached model identity "
                         f"it was planned with ({plan.identity_path}); the entry was dropped, rerun the command")
    return lm


def plan_extraction(cfg: ExtractConfig, lm: LoadedModel | None = None) -> tuple[ExtractPlan, LoadedModel | None]:
    """List DATA (first: a bad list fails before any model work), resolve model and layer, hash, and work out
    which images are new. Published parts that no longer verify are dropped (``plan.repaired``): their images
    are extracted again.

    The model's identity (spec, preprocessing, resolved layer: all the artefact key needs) comes from the store's
    model identity cache (``cache/model-<key>.json``, keyed by the model flags, the code and library versions
    and the sha256 of every weights / TorchScript file) when it holds an entry; the model is then built only when
    the plan has work for it, and the returned model is None when it looks like a no-op (nothing to extract or
    repair, no journal): callers take :func:`model_for_plan` once :func:`keep_if_unchanged` says there is work.
    Either way the key, artefact id and plan are the same.

    Streamed and columnar: the listing yields directory by directory, :func:`tasks.core.datasets.iter_hashed_tables`
    looks ``cfg.plan_chunk`` files at a time up in the hash cache (path, size, mtime, inode; vectorised) and hashes
    the rest in worker threads (journalling new hashes, so a killed plan resumes); the planner keeps the listing as
    one :class:`tasks.core.datasets.RecordTable` (no Python object per file). Published files are trusted by their stamps
    (:class:`storage.features.FileStamps`), hashed in full only when a stamp changed."""
    cfg.validate()
    if cfg.plan_chunk < 1:
        raise UsageError(f"plan_chunk must be >= 1, got {cfg.plan_chunk}")
    listing = open_listing(cfg.data, cfg.root, cfg.allow_outside_root, cfg.list_limits())
    root = listing.root
    store = Store(cfg.store)
    id_key = _model_identity_key(cfg) if lm is None else None  # a caller's own model is used as given
    id_path = _identity_path(store, id_key) if id_key is not None else None
    ident = _read_model_identity(id_path, id_key) if id_path is not None and id_key is not None else None
    if ident is None:
        if lm is None:
            lm, ref = _load_for(cfg)
            if id_path is not None and id_key is not None:
                _write_model_identity(id_path, id_key, _identity_of(lm, ref))
        else:
            if any(v is not None for v in (cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)):
                lm = apply_preprocess_overrides(lm, cfg.resize, cfg.crop, cfg.mean, cfg.std, cfg.interpolation)
            ref = resolve_layer(lm.module, cfg.layer)
        ident = _identity_of(lm, ref)
    else:
        log.debug("model identity of %s from %s; the model is built only if there is work", cfg.model, id_path)
        if ident.preprocess_default is not None and ident.spec.get("weights") not in ("none", None):
            log.warning("preprocessing %s differs from the weights' own %s; features may be off-distribution",
                        ident.preprocess.to_dict(), ident.preprocess_default)
    ref = ident.layer
    key = {
        "dataset_root": str(root), "model": spec_identity(ident.spec),
        "layer": ref.name, "side": ref.side, "pool": cfg.pool, "preprocess": _preprocessing_record(cfg, ident.preprocess),
    }
    if resolve_precision(cfg.precision, cfg.device) == "bf16":
        # bf16 features differ from fp32 ones (~1e-2 relative): never mixed into one artefact
        key["compute"] = "bf16"
    root_name = root.name if isinstance(root, Path) else str(root).rstrip("/").rsplit("/", 1)[-1]
    aid = artefact_id(f"{root_name}-{str(ident.spec.get('arch', 'model')).replace(':', '-')}-{ref.alias}", key)
    adir = store.artefact_dir("features", aid)
    cache_dir = store.kind_dir("cache")
    cache = cache_dir / f"hashes-{sha256_bytes(str(root).encode())[:16]}.parquet"
    stamps_path = cache_dir / f"stamps-{aid}.json"
    stamps = FileStamps(stamps_path)
    repaired: list[dict[str, Any]] = []
    # built part by part: past SPILL_ROWS ids straight into a mapped temp file (anonymous memory O(part))
    journal = read_journal(adir) if adir.is_dir() else {}
    stored = DigestSet.from_chunks(_stored_ids(adir, journal, stamps, repaired), spill_dir=cache_dir)
    stamps.save()
    stats: dict[str, int] = {}
    hrejects: list[Reject] = []
    # columnar: ~80 B + the path per listed file, no Python object per file; past SPILL_ROWS files the columns go
    # chunk by chunk to memory-mapped temp files under store/cache (file-backed pages, not anonymous memory)
    with RecordTableBuilder(root, spill_dir=cache_dir) as builder:
        for ok, rej in iter_hashed_tables(listing, cache, progress=cfg.progress, chunk_size=cfg.plan_chunk,
                                          stats=stats):
            builder.append(ok)
            hrejects.extend(rej)
        hashed = builder.finish()
    rejects = listing.rejects + hrejects
    listed = hashed.digests
    is_new = ~stored.contains(listed)
    # Identity is the content hash: features of the same bytes under the same model/layer/preprocessing in any
    # other dataset of this store (e.g. a copy in another bucket) are reused, not re-extracted.
    model_key = {k: v for k, v in key.items() if k != "dataset_root"}
    donors: list[tuple[Path, dict[str, Any]]] = []
    if is_new.any():
        wanted = DigestSet.from_chunks((listed[i:i + _ID_BLOCK][is_new[i:i + _ID_BLOCK]]
                                        for i in range(0, len(listed), _ID_BLOCK)), spill_dir=cache_dir)
        donated: list[np.ndarray] = []
        for other_id, om in store.iter_artefacts("features"):
            if other_id == aid or om.get("pool") != cfg.pool or om.get("layer", {}).get("name") != ref.name:
                continue
            okey = {"model": spec_identity(om.get("model", {})),
                    "layer": om["layer"]["name"], "side": om["layer"]["side"], "pool": om.get("pool"),
                    "preprocess": om.get("preprocessing")}
            if om.get("precision") == "bf16":
                okey["compute"] = "bf16"
            if json.dumps(okey, sort_keys=True, default=str) != json.dumps(model_key, sort_keys=True, default=str):
                continue
            odir = store.artefact_dir("features", other_id)
            for e in part_entries(om):
                try:
                    ids = image_digests(read_part(odir, e, columns=["image_id"]).column("image_id"))
                except StoreError:
                    continue
                hit = wanted.contains(ids)
                if hit.any():
                    donors.append((odir, e))
                    donated.append(ids[hit])
        if donated:
            stored = stored.union(np.concatenate(donated))
            is_new = ~stored.contains(listed)
    new_rows = np.flatnonzero(is_new)
    first = np.sort(new_rows[np.unique(listed[new_rows], return_index=True)[1]]) if len(new_rows) else new_rows
    todo = [hashed[i] for i in first.tolist()]  # the first listed copy of each new image, in listing order
    extra = hashed.extra_columns()
    plan = ExtractPlan(cfg, aid, adir, root, hashed, rejects, todo, stored, ref, ident.spec, ident.preprocess, stats,
                       extra, donors, repaired, stamps_path, id_path)
    if lm is None and (todo or repaired or extra or journal.get("parts") or not (adir / MANIFEST_NAME).is_file()):
        lm = model_for_plan(plan, None)  # work to do: build the model now (checked against the cached identity)
    return plan, lm


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
    mode = _decode_mode(cfg, plan.preprocess)
    if mode == "torchvision-jpeg":
        log.warning("--decode gpu on a CPU device: JPEGs are decoded with torchvision in this process (the GPU path's "
                    "code, for testing it); --decode cpu is faster here")
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(items, plan.preprocess, limits, mode), batch_size=cfg.batch_size, shuffle=False,
        num_workers=use_workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False, worker_init_fn=_worker_init,
        prefetch_factor=4 if use_workers else None,
        multiprocessing_context=worker_context() if use_workers else None,
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

    def write(idx: list[int], sizes: list[tuple[int, int]], pending: PendingFeatures) -> None:
        nonlocal writer, with_preds
        feats, preds, probs = pending.result()
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

    # One batch stays in flight: batch k is queued (on CUDA: decode, resize, forward, copy to pinned memory) before
    # batch k-1's rows are written, so reading / writing overlaps the GPU. On CPU forward_batch_async has finished
    # when it returns: the rows are the same, written one batch later.
    in_flight: tuple[list[int], list[tuple[int, int]], PendingFeatures] | None = None
    threads_before = torch.get_num_threads()
    streams: CpuStreams | None = None
    if device.type == "cpu":
        # Intra-op (OpenMP) threads that a decode process or another job preempts stall at every barrier: measured
        # here (2 cores, 1 decode process, 600 JPEGs, loaded) 2 model threads took 146 s / 59 CPU-s, 1 thread 49 s /
        # 19 CPU-s. So the cores run independent streams (micro-batches on parameter-sharing copies of the model),
        # one intra-op thread each (tasks.core.forward.CpuStreams), within torch's thread budget (OMP_NUM_THREADS or
        # the cores). The plan depends on the batch size and that budget only, so a resumed tail computes with the
        # same threads as the run it continues.
        n_streams, per_stream = cpu_streams_plan(cfg.batch_size, threads_before)
        torch.set_num_threads(per_stream)
        streams = CpuStreams(module, n_streams) if n_streams > 1 else None
    try:
        for idx, batch, sizes, bad, jpegs in loader:
            n_in = len(idx) + len(bad) + len(jpegs)
            if jpegs:
                decoded, more_bad = decode_preprocess_jpegs(jpegs, device, plan.preprocess, limits)
                bad = bad + more_bad
                idx, x_u8, sizes = _with_jpegs(idx, batch, sizes, decoded, device)
            else:
                x_u8 = batch.to(device, non_blocking=True) if batch is not None else None
            for i, reason, detail in sorted(bad):
                rejects.append(Reject(records[i].path, reason, detail))
            if x_u8 is not None:
                x = normalise(x_u8, plan.preprocess)
                pending = forward_batch_async(module, x, plan.layer, cfg.pool, device, with_preds, cfg.precision, streams)
                if in_flight is not None:
                    write(*in_flight)
                in_flight = (idx, sizes, pending)
            done += n_in
            if bar is not None:
                bar.update(n_in)
                bar.set_postfix(img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}", rejects=len(rejects))
        if in_flight is not None:
            write(*in_flight)
    finally:
        if streams is not None:
            streams.close()
        torch.set_num_threads(threads_before)
        if bar is not None:
            bar.close()
    entries = writer.close() if writer is not None else []
    dt = time.perf_counter() - t0
    stats = {"extracted": done - len(rejects), "decode_rejects": len(rejects), "seconds": round(dt, 3),
             "images_per_s": round((done - len(rejects)) / dt, 2) if dt > 0 and done else 0.0,
             "dim": writer.dim if writer else None, "with_preds": writer.with_preds if writer else None}
    return entries, rejects, stats


def copies_to_retry(plan: ExtractPlan, decode_rejects: list[Reject]) -> list[ImageRecord]:
    """Listed copies (same ``image_id``, another path) of images whose extracted copy was rejected while decoding.

    The plan extracts each distinct ``image_id`` once and patches its other paths from that row; when that one
    copy is rejected (vanished, changed, unreadable, ...), the other copies would have no row and no reject.
    Returns every such copy not decoded yet (not in the plan's todo), in listing order: decode them too (a copy
    of corrupt bytes is then rejected with its own reason). Matched on the listing's columns
    (:meth:`RecordTable.locate`, digests): records are built only for the copies, O(rejects + copies)."""
    if not decode_rejects:
        return []
    table = _listing_table(plan)
    failed_paths = {r.path for r in decode_rejects}
    at = table.locate(pa.array(sorted(failed_paths), pa.large_string()))
    at = at[at >= 0]
    if not len(at):
        return []
    copies = np.flatnonzero(DigestSet(table.digests[at]).contains(table.digests))
    tried = {r.path for r in plan.todo}
    return [r for r in table.take(copies) if r.path not in tried and r.path not in failed_paths]


def extract_copies(plan: ExtractPlan, lm: LoadedModel, entries: list[dict[str, Any]], rejects: list[Reject],
                   stats: dict[str, Any], on_part: Callable[[dict[str, Any]], None] | None = None,
                   ) -> tuple[list[dict[str, Any]], list[Reject], dict[str, Any]]:
    """After the main pass (``entries, rejects, stats`` of :func:`extract_records`): decode the
    :func:`copies_to_retry` as well and return the three merged. One pass: each remaining copy ends as a row or
    as its own reject. Memory: one batch."""
    retry = copies_to_retry(plan, rejects)
    if not retry:
        return entries, rejects, stats
    log.warning("%s: %d listed copies of rejected images (same bytes, other paths) were not decoded; decoding them",
                plan.artefact_id, len(retry))
    more_entries, more_rejects, more_stats = extract_records(plan, lm, retry, on_part=on_part)
    return entries + more_entries, rejects + more_rejects, _merge_stats(stats, more_stats)


def _merge_stats(stats: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """The run's stats after a retry pass (``extract_records`` stats of both passes, added)."""
    out = dict(stats)
    out["extracted"] = stats.get("extracted", 0) + more.get("extracted", 0)
    out["decode_rejects"] = stats.get("decode_rejects", 0) + more.get("decode_rejects", 0)
    out["seconds"] = round(stats.get("seconds", 0.0) + more.get("seconds", 0.0), 3)
    out["images_per_s"] = round(out["extracted"] / out["seconds"], 2) if out["seconds"] > 0 and out["extracted"] else 0.0
    if not out.get("dim") and more.get("dim"):
        out["dim"], out["with_preds"] = more["dim"], more["with_preds"]
    return out


def _listing_table(plan: ExtractPlan) -> RecordTable:
    """The plan's listing as a :class:`RecordTable` (``plan_extraction`` gives one; a plain list of records, as a
    hand-built plan may hold, is turned into one)."""
    recs = plan.records
    return recs if isinstance(recs, RecordTable) else RecordTable.from_records(list(recs), plan.dataset_root)


def _norm_values(values: Sequence[Any]) -> pa.Array:
    """A label / split dictionary as ``large_string`` (``None`` and NaN -> null, anything else ``str``)."""
    return pa.array([None if v is None or (isinstance(v, float) and v != v) else str(v) for v in values],
                    pa.large_string())


def _str_column(t: pa.Table, name: str) -> pa.Array:
    """Column ``name`` of a part as ``large_string`` (NaN -> null; all nulls where the part lacks it)."""
    if name not in t.column_names:
        return pa.nulls(len(t), pa.large_string())
    col = t.column(name).combine_chunks()
    if pa.types.is_floating(col.type):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    return col.cast(pa.large_string())


def _same(a: pa.Array, b: pa.Array) -> np.ndarray:
    """``(n,) bool``: ``a == b`` row by row, two nulls equal."""
    eq = pc.fill_null(pc.equal(a, b), False)
    return pc.or_(eq, pc.and_(pc.is_null(a), pc.is_null(b))).to_numpy(zero_copy_only=False)


def _distinct_digests(digests: np.ndarray, mask: np.ndarray) -> int:
    """How many distinct ``(n,) S32`` ``digests`` the rows in ``mask`` (``(n,) bool``) hold. Exact; counted on the
    8-byte prefixes (sorted: 16 B per row, transient), full digests compared only where two prefixes are equal."""
    if not mask.any():
        return 0
    raw = np.ascontiguousarray(digests).view(np.uint8).reshape(len(digests), 32)
    prefix = np.ascontiguousarray(raw[mask, :8]).view(np.uint64).ravel()
    ordered = np.sort(prefix)
    clash = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    distinct = 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))
    if len(clash):  # same prefix: count the distinct full digests behind each
        rows = np.flatnonzero(mask)[np.isin(prefix, clash)]
        distinct += len(np.unique(digests[rows])) - len(clash)
    return distinct


def _unextracted_rejects(table: RecordTable, rows: np.ndarray, decode_rejects: list[Reject],
                         skipped: list[str]) -> list[Reject]:
    """One reject row per listed row in ``rows`` (``(k,) int`` into ``table``) that ends the publish without a
    feature row (never dropped in silence). O(k + rejects)."""
    if not len(rows):
        return []
    rejected_copy: dict[bytes, Reject] = {}
    if decode_rejects:
        at = table.locate(pa.array([r.path for r in decode_rejects], pa.large_string()))
        for rej, i in zip(decode_rejects, at.tolist()):
            if i >= 0:
                rejected_copy.setdefault(table.digests[i].tobytes(), rej)
    out = []
    for p, d in zip(table.paths.take(pa.array(rows)).to_pylist(), table.digests[rows]):
        copy = rejected_copy.get(d.tobytes())
        if copy is not None:
            out.append(Reject(p, "not-extracted", f"identical bytes to {copy.path}, which was rejected ({copy.reason}: "
                                                   f"{copy.detail}); this copy was not decoded. Rerun to decode it"))
        else:
            where = f" (unreadable parts skipped: {', '.join(skipped[:3])})" if skipped else ""
            out.append(Reject(p, "not-extracted", f"not decoded in this run and no readable stored feature{where}; "
                                                   "rerun to extract it"))
    return out


def _rejects_table(rejects: list[Reject]) -> pa.Table:
    rejects = sorted(rejects, key=lambda r: (r.path, r.reason))
    return pa.table({"path": [r.path for r in rejects], "reason": [r.reason for r in rejects],
                     "detail": [r.detail for r in rejects], "image_id": [None] * len(rejects)}, schema=rejects_schema())


def _matching_rows(table: RecordTable, t: pa.Table, desired: np.ndarray, extra: list[str],
                   labels: pa.Array, splits: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Match one part's meta columns ``t`` against the listing ``table``.

    Returns ``(at, same)``: ``at`` ``(m,) int64`` the listed row of each part row whose path is listed and wanted
    (``desired``, ``(n,) bool`` over ``table``), else -1; ``same`` ``(m,) bool`` where that listed row also has the
    part row's ``image_id`` (32-byte digests), label, split (``labels`` / ``splits``: the table's dictionaries as
    strings) and extra columns. Vectorised per part; extra columns (a list's, O(rows) anyway) compared per row.
    Memory O(part rows)."""
    at = table.locate(_str_column(t, "path"))
    listed = at >= 0
    listed[listed] = desired[at[listed]]
    at = np.where(listed, at, -1)
    same = np.zeros(len(at), bool)
    rows = np.flatnonzero(listed)
    if not len(rows):
        return at, same
    j = at[rows]
    take = pa.array(rows)
    ids = _str_column(t, "image_id").take(take)
    ok = image_digests(ids.fill_null("")) == table.digests[j]
    if ids.null_count:
        ok &= ids.is_valid().to_numpy(zero_copy_only=False)
    ok &= _same(_str_column(t, "label").take(take), labels.take(pa.array(table.label_codes[j])))
    ok &= _same(_str_column(t, "split").take(take), splits.take(pa.array(table.split_codes[j])))
    for c in extra:
        theirs = _str_column(t, c).take(take).to_pylist() if c in t.column_names else [None] * len(rows)
        ex = table.extras
        ours = [None if ex is None or ex[i].get(c) is None else str(ex[i].get(c)) for i in j.tolist()]
        ok &= np.fromiter((a == b for a, b in zip(theirs, ours)), bool, len(rows))
    same[rows] = ok
    return at, same


def _part_meta(directory: Path, entry: dict[str, Any], columns: list[str]) -> tuple[pa.Table, pa.Schema]:
    """``columns`` of a part (without its features or its checksum) and the part's full schema."""
    t = read_part_columns(directory, entry, columns)
    try:
        schema = pq.read_schema(directory / entry["name"])
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"cannot read {directory / entry['name']}: {exc}") from None
    return t, schema


def publish_features(plan: ExtractPlan, new_entries: list[dict[str, Any]], decode_rejects: list[Reject],
                     stats: dict[str, Any], categories: list[str] | None = None) -> dict[str, Any]:
    """Merge stored + new parts into exactly the current dataset's rows and publish the manifest.

    Parts whose rows all still match are kept as they are, trusted by their manifest entry: only their meta
    columns (``image_id``, ``path``, ``label``, ``split``, extras) are read, never their features and never their
    sha256 (planning checked them against their stamps, :class:`storage.features.FileStamps`; ``convlens verify``
    hashes everything). The quality gate uses the counts :class:`storage.features.PartWriter` recorded in each new
    part's entry (a published part passed the gate when it was published). Parts with deleted / renamed /
    relabelled rows are read in full (checksum verified) and rewritten; rows for duplicate or renamed files are
    patched from stored features (never re-extracted). Raises :class:`QualityGateError` (nothing published) when
    the reject rate exceeds the threshold or a feature is NaN / Inf.

    Matching is columnar over the plan's :class:`RecordTable`: each part's ``path`` column is located in the
    listing (:meth:`RecordTable.locate`, a path sort of the table made once), ``image_id`` compared as 32-byte
    digests, label / split as strings of the matched rows, and which listed rows are wanted / already have a row
    are ``(n,) bool`` masks. Memory: one part's meta columns at a time plus ~6 B per listed file (sort order, two
    masks) and, at the end, the kept rows' sorted 8-byte digest prefixes for ``unique_images`` (16 B per row,
    transient); records and dicts are built only for rows that need one (patched duplicates / renames, rejects):
    O(changed).
    """
    cfg = plan.config
    adir = plan.artefact_dir
    old = read_manifest(adir) if (adir / MANIFEST_NAME).is_file() else None
    old_names = {e["name"] for e in part_entries(old)} if old else set()
    journal = read_journal(adir)
    candidates = (part_entries(old) if old else []) + journal.get("parts", []) + new_entries
    seen_names: set[str] = set()
    candidates = [e for e in candidates if not (e["name"] in seen_names or seen_names.add(e["name"]))]
    table = _listing_table(plan)
    desired = np.ones(len(table), bool)  # listed and not rejected while decoding
    if decode_rejects:
        at = table.locate(pa.array([r.path for r in decode_rejects], pa.large_string()))
        desired[at[at >= 0]] = False
    extra = plan.extra_columns
    labels, splits = _norm_values(table.labels), _norm_values(table.splits)
    dim = stats.get("dim") or (old or {}).get("dim")
    with_preds = stats.get("with_preds") if stats.get("dim") else (old or {}).get("with_preds")
    meta_cols = ["image_id", "path", "label", "split", *extra]
    kept: list[dict[str, Any]] = []
    readable: list[dict[str, Any]] = []
    unknown_nonzero: list[dict[str, Any]] = []  # kept published parts from before the gate counts were recorded
    satisfied = np.zeros(len(table), bool)  # listed rows that have a feature row in ``kept``
    nonfinite = 0
    nonzero = False  # quality gate: a feature column that is all zeros carries no information
    repaired = list(plan.repaired)
    skipped: list[str] = []
    old_rows = old_present = 0
    for e in candidates:
        try:
            t, schema = _part_meta(adir, e, meta_cols)
        except StoreError as exc:
            skipped.append(e["name"])
            if e["name"] not in {r["name"] for r in repaired}:
                log.error("skipping unreadable part %s (its rows are re-extracted or become reject rows): %s", e["name"], exc)
                repaired.append({"name": e["name"], "role": "part", "rows": e.get("rows"), "sha256": e.get("sha256"),
                                 "error": str(exc)[:300]})
            continue
        readable.append(e)
        if dim is None:
            dim = schema.field("feature").type.list_size
            with_preds = "pred_top5" in schema.names
        at, same = _matching_rows(table, t, desired, extra, labels, splits)
        cand = np.flatnonzero(same)
        cand = cand[~satisfied[at[cand]]]
        keep = np.sort(cand[np.unique(at[cand], return_index=True)[1]])  # the first matching row of each listed row
        satisfied[at[keep]] = True
        if e["name"] in old_names:
            old_rows += len(at)
            old_present += int((at >= 0).sum())
        if len(keep) == len(at) and schema.names == feature_schema(dim, with_preds, extra).names:
            kept.append(e)
            if "nonfinite" in e and "nonzero" in e:
                nonfinite += int(e["nonfinite"])
                nonzero = nonzero or bool(e["nonzero"])
            elif e["name"] in old_names:
                unknown_nonzero.append(e)  # published, so it passed the NaN gate; zeros checked below if need be
            else:
                nf, nz = part_gate(adir, e)
                nonfinite, nonzero = nonfinite + nf, nonzero or nz
        elif len(keep):
            full = read_part(adir, e).take(pa.array(keep)).cast(feature_schema(dim, with_preds, extra))
            entry = write_part(adir, full)
            feats = full.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(keep), -1)
            entry.update(nonfinite=int((~np.isfinite(feats)).any(axis=1).sum()), nonzero=bool(np.any(feats != 0)))
            nonfinite, nonzero = nonfinite + entry["nonfinite"], nonzero or entry["nonzero"]
            kept.append(entry)
    missing = np.flatnonzero(desired & ~satisfied)  # listing order
    donor: dict[bytes, tuple[dict[str, Any], int]] = {}  # O(missing): digest -> (part entry, row)
    if len(missing):  # rows for duplicate / renamed files: the first stored row with the same bytes, here or in a sibling
        needed = DigestSet(table.digests[missing])
        sources = [(adir, e) for e in readable] + list(plan.donors)
        for src_dir, e in sources:
            try:
                col = _str_column(read_part_columns(src_dir, e, ["image_id"]), "image_id")
            except StoreError:
                continue
            if dim is None:
                fschema = pq.read_schema(src_dir / e["name"])
                dim, with_preds = fschema.field("feature").type.list_size, "pred_top5" in fschema.names
            ids = image_digests(col.fill_null(""))
            hit = np.flatnonzero(needed.contains(ids) & col.is_valid().to_numpy(zero_copy_only=False))
            first = hit[np.unique(ids[hit], return_index=True)[1]]
            for i in np.sort(first).tolist():
                donor.setdefault(ids[i].tobytes(), (dict(e, _dir=str(src_dir)) if src_dir != adir else e, i))
    patch_rows: list[tuple[int, ImageRecord, tuple[dict[str, Any], int]]] = []
    if donor:
        patched = missing[np.fromiter((d.tobytes() in donor for d in table.digests[missing]), bool, len(missing))]
        for i, r in zip(patched.tolist(), table.take(patched)):
            patch_rows.append((i, r, donor[table.digests[i].tobytes()]))
    if patch_rows:
        cache: dict[str, pa.Table] = {}
        rows = []
        for at_row, r, (e, i) in patch_rows:
            src_dir = Path(e["_dir"]) if "_dir" in e else adir
            ckey = f"{src_dir}/{e['name']}"
            t = cache.get(ckey) or cache.setdefault(ckey, read_part(src_dir, e, verify=False))
            row = t.slice(i, 1).to_pylist()[0]
            extras = {c: None if r.extras.get(c) is None else str(r.extras.get(c)) for c in extra}
            row.update({"path": r.path, "label": r.label, "split": r.split, **extras})
            rows.append(row)
            satisfied[at_row] = True
            nonzero = nonzero or any(v != 0 for v in row["feature"])
        entry = write_part(adir, pa.Table.from_pylist(rows, schema=feature_schema(dim, with_preds, extra)))
        entry.update(nonfinite=0, nonzero=any(any(v != 0 for v in row["feature"]) for row in rows))
        kept.append(entry)
    n_rows = sum(e["rows"] for e in kept)
    if n_rows and not nonzero:
        for e in unknown_nonzero:  # parts published before the counts were recorded: read until one is not all zeros
            if part_gate(adir, e)[1]:
                nonzero = True
                break
    lost = _unextracted_rejects(table, np.flatnonzero(desired & ~satisfied), decode_rejects, skipped)
    if lost:
        log.error("%d listed images have no stored feature and were not decoded; each is a reject row "
                  "'not-extracted' (e.g. %s: %s)", len(lost), lost[0].path, lost[0].detail)
    all_rejects = list(plan.rejects) + list(decode_rejects) + lost
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
    rej_entry = write_part(adir, _rejects_table(all_rejects), prefix="rejects")
    rej_entry["role"] = "rejects"
    files = [dict(e, role="part") for e in kept] + [rej_entry]
    if categories:
        atomic_write_json(adir / "categories.json", categories)
        files.append(file_entry(adir, "categories.json", role="categories"))
    label_counts: dict[str, int] = {}
    per_code = np.bincount(table.label_codes[satisfied], minlength=len(table.labels))
    for lab, k in zip(table.labels, per_code.tolist()):
        if lab is not None and k:
            label_counts[lab] = label_counts.get(lab, 0) + k
    manifest = {
        "kind": "features",
        "artefact_id": plan.artefact_id,
        "dataset_root": str(plan.dataset_root),
        "data": str(cfg.data),
        "model": plan.model_spec,
        "layer": {"alias": plan.layer.alias, "name": plan.layer.name, "side": plan.layer.side},
        "pool": cfg.pool,
        "precision": resolve_precision(cfg.precision, cfg.device),
        "preprocessing": _preprocessing_record(cfg, plan.preprocess),
        "dim": int(dim) if dim else 0,
        "with_preds": bool(with_preds),
        "extra_columns": extra,
        "rows": n_rows,
        "unique_images": _distinct_digests(table.digests, satisfied),
        "rejects": len(all_rejects),
        "labels": dict(sorted(label_counts.items())),
        "seed": cfg.seed,
        "files": files,
        "run": {
            "extracted": stats.get("extracted", 0), "reused": len(plan.records) - len(plan.todo),
            "decode_rejects": len(decode_rejects), "seconds": stats.get("seconds", 0.0),
            "images_per_s": stats.get("images_per_s", 0.0), "hash": plan.hash_stats,
            "removed": old_rows - old_present,
            "added_paths": int(desired.sum()) - old_present,
            "not_extracted": len(lost),
            "repaired": repaired,
        },
        "previous_created": old.get("created") if old else None,
    }
    published = write_manifest(adir, manifest)
    (adir / "journal.json").unlink(missing_ok=True)
    remove_garbage(adir, published)
    _stamp_written(plan, published, old_names)
    return published


def _stamp_written(plan: ExtractPlan, manifest: dict[str, Any], checked: set[str]) -> None:
    """Stamp the files this run wrote (their sha256 is that of the bytes written), so the next plan trusts them
    without hashing; files in ``checked`` (the published parts) were checked and stamped by the plan. Stamps of
    files no longer listed are dropped."""
    if plan.stamps_path is None:
        return
    stamps = FileStamps(plan.stamps_path)
    for e in manifest.get("files", []):
        if e["name"] not in checked:
            stamps.record(plan.artefact_dir, e)
    stamps.keep_only(e["name"] for e in manifest.get("files", []))
    stamps.save()


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
        lm = model_for_plan(plan, lm)  # None from a no-op-looking plan (model identity cache): built only now
        journal.setdefault("parts", [])

        def on_part(entry: dict[str, Any]) -> None:
            journal["parts"].append(entry)
            write_journal(plan.artefact_dir, journal)

        entries, rejects, stats = extract_records(plan, lm, on_part=on_part)
        entries, rejects, stats = extract_copies(plan, lm, entries, rejects, stats, on_part)
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
    listing rejects, nothing to extract); else None. The caller checks first that no journal is pending.

    Columnar: each published part's meta columns are matched against the plan's :class:`RecordTable`
    (:meth:`RecordTable.locate`, digests, label / split strings); memory is one part's meta columns plus ~5 B per
    listed file (the table's path sort order and a ``seen`` mask), no Python object per file."""
    adir = plan.artefact_dir
    if plan.todo or plan.repaired or plan.extra_columns or not (adir / MANIFEST_NAME).is_file():
        return None
    old = read_manifest(adir)
    table = _listing_table(plan)
    if int(old.get("rejects", -1)) != len(plan.rejects) or int(old.get("rows", -1)) != len(table):
        return None
    labels, splits = _norm_values(table.labels), _norm_values(table.splits)
    everything = np.ones(len(table), bool)
    seen = np.zeros(len(table), bool)
    for e in part_entries(old):  # the parts were checked by the plan (stamps); their meta columns are read here
        try:
            t = read_part_columns(adir, e, ["path", "image_id", "label", "split"])
        except StoreError:
            return None
        at, same = _matching_rows(table, t, everything, [], labels, splits)
        if not same.all() or seen[at].any() or len(np.unique(at)) != len(at):
            return None
        seen[at] = True
    return old if seen.all() else None
