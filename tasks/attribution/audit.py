"""Attribution audits at dataset scale: select images, compute maps per method and target, score, store.

Reads a feature artefact (images, labels, model spec), selects images by a policy, and for each image x
method x target computes the attribution, reduces it to a 2-D map, scores its faithfulness (deletion /
insertion AUC) and stores: maps (float16 NPZ parts), overlay PNG thumbnails, a scores table (Parquet parts)
and a manifest (kind ``attribution``) in store kind ``audits``. Layout: docs/attribution.md.

Incremental: rows are keyed by (image_id, method, params_hash, target); a rerun computes only missing keys
and republishes a manifest listing old + new parts. The artefact id hashes the feature artefact id (which
fixes dataset root, model, weights and preprocessing) and the code version; image_id is the sha256 of the
image bytes, so a stored map can never belong to different pixels.

Resumable: each finished image batch (each finished shard when sharded) is journalled in ``journal.json`` under
the artefact lock (:func:`journal_result`); a killed run leaves the published manifest as it was, and the rerun
(:func:`resume_audit`) skips the journalled images and publishes what an uninterrupted run would.

Memory: O(image_batch x method working set) + one buffer of at most ``maps_per_part`` maps; score rows are
small records. Nothing is kept per image beyond its score row.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from storage.atomic import atomic_write_bytes, sha256_bytes
from storage.audits import SCORES_COLUMNS, load_scores, read_findings
from storage.errors import StoreError, UsageError
from storage.features import JOURNAL_NAME, read_journal, read_meta, read_part, remove_garbage, write_journal, write_part
from storage.locks import artefact_lock
from storage.manifest import CODE_VERSION, MANIFEST_NAME, read_manifest, verify_files, write_manifest
from storage.paths import Store, artefact_id
from tasks.attribution.common import decode_stored_rows
from tasks.attribution.methods import METHODS, compute_map, method_spec, params_hash

__all__ = [
    "AuditConfig",
    "SELECT_POLICIES",
    "select_images",
    "label_index",
    "run_audit",
    "run_default_audit",
    "AuditPlan",
    "plan_audit",
    "audit_model",
    "compute_audit",
    "stored_scores",
    "journal_result",
    "resume_audit",
    "publish_audit",
    "DEFAULT_METHODS",
    "summarise",
]

log = logging.getLogger(__name__)

SELECT_POLICIES = ("random", "misclassified", "low-confidence", "label-disagreement", "ids:FILE")
DEFAULT_METHODS = ("occlusion", "saliency", "guided", "deconvnet", "gradcam")


@dataclass
class AuditConfig:
    """Everything that defines an audit run (CLI flags map 1:1)."""

    store: str = "convlens-store"
    artefact: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    select: str = "random"
    n: int = 16
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    image_batch: int = 8
    window: int = 16
    stride: int = 8
    baseline: float = 0.0
    layer: str | None = None
    ig_steps: int = 50
    smooth_samples: int = 5
    smooth_stdev: float = 1.0
    faith_steps: int = 16
    thumb: int = 160
    model: str | None = None  # the user's --model: allows a factory / TorchScript model named by the features
    weights: str | None = None
    maps_per_part: int = 256
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.n < 1:
            raise UsageError(f"--n must be >= 1, got {self.n}")
        if not self.methods:
            raise UsageError("--methods is empty; pass e.g. occlusion,saliency,gradcam")
        for m in self.methods:
            method_spec(m)
        if not (self.select in SELECT_POLICIES[:4] or self.select.startswith("ids:")):
            raise UsageError(f"unknown --select {self.select!r}; use one of {', '.join(SELECT_POLICIES)}")
        if self.stride > self.window or self.stride < 1:
            raise UsageError(f"--stride must be in [1, --window], got stride {self.stride}, window {self.window}")
        if self.faith_steps < 1 or self.batch_size < 1 or self.image_batch < 1:
            raise UsageError("--faith-steps, --batch-size and image batch must be >= 1")

    def method_params(self, name: str) -> dict[str, Any]:
        """The parameters that define ``name``'s maps (hashed into the incremental key)."""
        key = method_spec(name).name
        return {
            "occlusion": {"window": self.window, "stride": self.stride, "baseline": self.baseline},
            "saliency": {"abs": True}, "guided": {}, "deconvnet": {},
            "smoothgrad": {"nt_samples": self.smooth_samples, "stdevs": self.smooth_stdev, "seed": self.seed},
            "ig": {"n_steps": self.ig_steps, "method": "gausslegendre", "baseline": 0.0},
            "gradcam": {"layer": self.layer},
        }[key] | {"faith_steps": self.faith_steps, "faith_score": "prob", "faith_baseline": 0.0}


def label_index(label: Any, categories: list[str] | None, num_classes: int) -> int | None:
    """Class index of a dataset label: its position in ``categories`` (by name), or, for a model without
    category names, an integer label; else ``None``. Same rule as the report's accuracy section: digits labelled
    ``3`` on an ImageNet model are not class 3 ("tiger shark")."""
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return None
    s = str(label)
    if categories:
        if s in categories:
            return categories.index(s)
        low = [c.lower().replace(" ", "_") for c in categories]
        if s.lower().replace(" ", "_") in low:
            return low.index(s.lower().replace(" ", "_"))
    if not categories and s.isdigit() and int(s) < num_classes:
        return int(s)
    return None


def _dataset_audit_ids(store: Store, features_id: str) -> list[str]:
    """image_ids flagged as kNN label disagreements by the newest dataset audit of ``features_id``."""
    try:
        findings = read_findings(store.root, features_id=features_id)
    except StoreError:
        raise StoreError("--select label-disagreement needs the kNN dataset audit: run `convlens audit-dataset "
                         "--store ...` first (no 'dataset-audit' artefact for these features in the store)") from None
    hit = findings[findings["finding"] == "label-disagreement"]
    return list(dict.fromkeys(hit["image_id"].astype(str)))


def select_images(meta: pd.DataFrame, policy: str, n: int, seed: int = 0, categories: list[str] | None = None,
                  num_classes: int = 0, store: Store | None = None, features_id: str = "") -> pd.DataFrame:
    """Pick at most ``n`` rows (unique image_id) of a feature table's ``meta`` by ``policy``.

    ``random`` (seeded), ``misclassified`` (stored top-1 prediction != label's class), ``low-confidence``
    (lowest stored top-1 probability first), ``label-disagreement`` (kNN dataset-audit findings),
    ``ids:FILE`` (one image_id or dataset path per line). Adds a ``selected_by`` column.
    """
    meta = meta.drop_duplicates("image_id").reset_index(drop=True)
    if policy == "random":
        rng = np.random.default_rng(seed)
        out = meta.iloc[np.sort(rng.permutation(len(meta))[:n])]
    elif policy in ("misclassified", "low-confidence"):
        if "pred_top5" not in meta.columns:
            raise UsageError(f"--select {policy} needs stored predictions; the feature artefact has none "
                             "(extract with a model that has a classifier head)")
        top1 = meta["pred_top5"].map(lambda v: int(v[0]))
        if policy == "low-confidence":
            conf = meta["prob_top5"].map(lambda v: float(v[0]))
            out = meta.iloc[np.argsort(conf.to_numpy(), kind="stable")[:n]]
        else:
            lab = meta["label"].map(lambda v: label_index(v, categories, num_classes))
            known = lab.notna()
            if not known.any():
                raise UsageError("--select misclassified needs labels that name the model's classes (category "
                                 "names or integer indices); this dataset's labels do not. Use --select "
                                 "low-confidence or random")
            wrong = known & (lab.fillna(-1).astype(int) != top1)
            out = meta[wrong].head(n)
    elif policy == "label-disagreement":
        if store is None:
            raise UsageError("label-disagreement selection needs the store")
        ids = _dataset_audit_ids(store, features_id)
        out = meta[meta["image_id"].isin(set(ids))]
        out = out.set_index("image_id").loc[[i for i in ids if i in set(out["image_id"])]].reset_index().head(n)
    elif policy.startswith("ids:"):
        path = Path(policy[4:]).expanduser()
        if not path.is_file():
            raise UsageError(f"--select ids: file {path} does not exist (one image_id or path per line)")
        wanted = [ln.strip() for ln in path.read_text("utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
        hit = meta[meta["image_id"].isin(wanted) | meta["path"].isin(wanted)]
        if hit.empty:
            raise UsageError(f"none of the {len(wanted)} ids in {path} is in the feature artefact")
        out = hit.head(n)
    else:
        raise UsageError(f"unknown --select {policy!r}; use one of {', '.join(SELECT_POLICIES)}")
    out = out.copy()
    out["selected_by"] = policy.split(":", 1)[0]
    return out.reset_index(drop=True)


def _overlay_png(img: np.ndarray, m: np.ndarray, size: int) -> bytes:
    """``img (H,W,3) uint8`` + ``m (H,W)`` in [0,1] -> PNG bytes: JET heat map blended 50/50, ``size`` px."""
    import cv2
    from PIL import Image

    heat = cv2.applyColorMap(np.uint8(np.clip(m, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    blend = (0.5 * img.astype(np.float32) + 0.5 * heat.astype(np.float32)).astype(np.uint8)
    pic = Image.fromarray(np.concatenate([img, blend], axis=1))
    pic = pic.resize((size * 2, size), Image.BILINEAR)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _display(m: torch.Tensor, signed: bool) -> np.ndarray:
    """2-D map -> [0,1] for drawing: signed maps show their positive (supporting) part."""
    a = m.float()
    if signed:
        a = a.clamp(min=0)
    a = a - a.min()
    return (a / (a.max() + 1e-12)).cpu().numpy()


class _MapWriter:
    def __init__(self, adir: Path, per_part: int) -> None:
        self.adir, self.per_part = adir, per_part
        self.buf: list[np.ndarray] = []
        self.rows: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []

    def add(self, m: np.ndarray, row: dict[str, Any]) -> None:
        self.buf.append(m.astype(np.float16))
        self.rows.append(row)
        if len(self.buf) >= self.per_part:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        bio = io.BytesIO()
        np.savez_compressed(bio, maps=np.stack(self.buf))
        data = bio.getvalue()
        name = f"maps-{sha256_bytes(data)[:16]}.npz"
        atomic_write_bytes(self.adir / name, data)
        for i, row in enumerate(self.rows):
            row["map_file"], row["map_index"] = name, i
        self.entries.append({"name": name, "bytes": len(data), "sha256": sha256_bytes(data), "role": "maps",
                             "count": len(self.buf)})
        self.buf, self.rows = [], []


_decode_batch = decode_stored_rows  # module-level name: the resume tests stop an audit here


@dataclass
class AuditPlan:
    """What an audit run will do (small: the selection is at most ``n`` rows); picklable for shard workers."""

    config: AuditConfig  # with ``layer`` resolved to the Grad-CAM layer
    features_id: str
    features: dict[str, Any]  # the feature manifest's id / created / dataset_root
    spec: dict[str, Any]  # model spec of the feature artefact
    weights: str
    preprocessing: dict[str, Any] | None
    preprocess: Any  # tasks.core.models.Preprocess
    categories: list[str] | None
    num_classes: int
    artefact_id: str
    artefact_dir: Path
    selection: pd.DataFrame
    methods: list[str]
    params: dict[str, dict[str, Any]]
    phash: dict[str, str]
    recipe: Any = None  # tasks.core.models.ModelRecipe: what shard workers load (trust and weights checked)


def plan_audit(cfg: AuditConfig) -> tuple[AuditPlan, Any]:
    """Resolve the feature artefact, load and check the model, select the images. Returns ``(plan, loaded model)``.

    Raises ``ValueError`` / :class:`ConvlensError` for bad options, a missing feature artefact or missing
    dataset-audit findings.
    """
    from tasks.attribution.cam import default_cam_layer
    from tasks.core.models import load_model_from_manifest

    cfg.validate()
    store = Store(cfg.store)
    faid, fman = store.resolve("features", cfg.artefact)
    fdir = store.artefact_dir("features", faid)
    meta = read_meta(fdir, fman)
    spec = fman["model"]
    # data never chooses code: a factory / TorchScript model runs only if the user names it (--model or trust file)
    lm = load_model_from_manifest(spec, user_model=cfg.model, user_weights=cfg.weights, artefact=faid)
    weights = lm.recipe.weights
    cats = None
    cat_entry = next((e for e in fman.get("files", []) if e.get("role") == "categories"), None)
    if cat_entry:
        cats = json.loads((fdir / cat_entry["name"]).read_text("utf-8"))
    model = lm.module
    num_classes = next((m.out_features for m in reversed(list(model.modules())) if isinstance(m, torch.nn.Linear)), 0)
    cam_layer = cfg.layer or default_cam_layer(model)
    cfg = replace(cfg, layer=cam_layer)
    sel = select_images(meta, cfg.select, cfg.n, cfg.seed, cats, num_classes, store, faid)
    methods = [method_spec(m).name for m in dict.fromkeys(cfg.methods)]
    mparams = {m: cfg.method_params(m) for m in methods}
    phash = {m: params_hash(m, mparams[m]) for m in methods}
    aid = artefact_id(f"{faid[:40]}-attribution", {"features": faid, "code_version": CODE_VERSION, "kind": "attribution"})
    adir = store.artefact_dir("audits", aid, create=True)
    feats = {"id": faid, "created": fman.get("created"), "dataset_root": fman.get("dataset_root")}
    return AuditPlan(cfg, faid, feats, spec, weights, fman.get("preprocessing"), lm.preprocess, cats, num_classes, aid,
                     adir, sel, methods, mparams, phash, lm.recipe), lm


def audit_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device`` in eval mode with frozen parameters (in place)."""
    model = module.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def compute_audit(plan: AuditPlan, model: torch.nn.Module, rows_sel: pd.DataFrame,
                  done: set[tuple[str, str, str, int]], progress: bool = False,
                  on_batch: Callable[[dict[str, Any]], None] | None = None,
                  finished: frozenset[tuple[str, str, str]] | set[tuple[str, str, str]] = frozenset()) -> dict[str, Any]:
    """Compute the rows of ``rows_sel`` (a slice of the selection) not in ``done``; write maps and overlays.

    Images go through in batches of ``image_batch`` rows of ``rows_sel``. A batch whose every image is in
    ``finished`` for every method (``(image_id, method, params_hash)``: journalled by an interrupted run) is
    skipped without decoding. Each batch's maps are flushed into their own NPZ part(s) at the batch's end (at
    most ``maps_per_part`` maps each), so a batch's files do not depend on what ran before it (an interrupted
    and resumed run writes the same files as an uninterrupted one); ``on_batch`` is then called with that
    batch's result (the caller journals it under the artefact lock).

    Writes content-addressed map NPZ parts and overlay PNGs into the artefact dir (no lock needed: safe on
    disjoint slices in parallel). Returns small records: ``{"images": image_ids of the computed batches,
    "rows": score rows, "maps": map part entries, "overlays": overlay entries, "failures": [...],
    "computed": int, "reused": int}`` (a batch result has the same keys).
    Memory: O(image_batch x method working set) + one map part buffer.
    """
    from tasks.attribution.faithfulness import deletion_insertion
    from tasks.core.forward import normalise, pick_device

    cfg, adir, cats, phash, methods = plan.config, plan.artefact_dir, plan.categories, plan.phash, plan.methods
    device = pick_device(cfg.device)
    cam_layer = cfg.layer
    num_classes = plan.num_classes
    done = set(done)
    writer = _MapWriter(adir, cfg.maps_per_part)
    total = _empty_result()
    occ_cache: dict = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows_sel), desc="audit", unit="img", dynamic_ncols=True)
    try:
        for s in range(0, len(rows_sel), cfg.image_batch):
            rows = rows_sel.iloc[s:s + cfg.image_batch]
            if finished and all((iid, m, phash[m]) in finished for iid in rows["image_id"] for m in methods):
                if bar is not None:
                    bar.update(len(rows))
                continue  # journalled by an interrupted run: its rows are in the journal
            batch = _empty_result()
            batch["images"] = [str(i) for i in rows["image_id"]]
            maps_before = len(writer.entries)
            ok, raw, bad = _decode_batch(plan.features.get("dataset_root"), rows, plan.preprocess)
            batch["failures"].extend(bad)
            if raw is not None:
                rows = rows.iloc[ok]
                x = normalise(raw.to(device), plan.preprocess)
                with torch.no_grad():
                    prob = torch.softmax(model(x).float(), dim=1)
                pconf, pred = prob.max(dim=1)
                jobs: list[tuple[int, int, str]] = []  # (row position, target, kind)
                for i, r in enumerate(rows.itertuples()):
                    p = int(pred[i])
                    li = label_index(r.label, cats, num_classes)
                    jobs.append((i, p, "pred" if li != p else "pred=label"))
                    if li is not None and li != p:
                        jobs.append((i, li, "label"))
                imgs_np = raw.permute(0, 2, 3, 1).numpy()
                for m in methods:
                    todo = [(i, t, k) for i, t, k in jobs if (rows.iloc[i].image_id, m, phash[m], t) not in done]
                    batch["reused"] += len(jobs) - len(todo)
                    if not todo:
                        continue
                    ii = torch.tensor([i for i, _, _ in todo], device=device)
                    tt = torch.tensor([t for _, t, _ in todo], device=device)
                    t0 = time.perf_counter()
                    maps = compute_map(m, model, x[ii], tt, cfg, cam_layer, occ_cache)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = (time.perf_counter() - t0) / len(todo)
                    faith = deletion_insertion(model, x[ii], tt, maps, n_steps=cfg.faith_steps, batch_size=cfg.batch_size)
                    signed = METHODS[m].reduce in ("sum", "mean")
                    for b, (i, t, kind) in enumerate(todo):
                        r = rows.iloc[i]
                        png = _overlay_png(imgs_np[i], _display(maps[b], signed), cfg.thumb)
                        oname = f"ov-{sha256_bytes(f'{r.image_id}|{m}|{phash[m]}|{t}'.encode())[:20]}.png"
                        atomic_write_bytes(adir / oname, png)
                        batch["overlays"].append({"name": oname, "bytes": len(png), "sha256": sha256_bytes(png),
                                                  "role": "overlay"})
                        row = {"image_id": r.image_id, "path": r.path, "label": None if pd.isna(r.label) else str(r.label),
                               "method": m, "params_hash": phash[m], "target": int(t), "target_kind": kind,
                               "target_name": cats[t] if cats and t < len(cats) else str(t),
                               "pred": int(pred[i]), "prob": float(pconf[i]),
                               "deletion_auc": float(faith.deletion_auc[b]), "insertion_auc": float(faith.insertion_auc[b]),
                               "runtime_s": round(dt, 4), "map_file": "", "map_index": -1, "overlay": oname,
                               "selected_by": r.selected_by, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                        writer.add(maps[b].cpu().numpy(), row)
                        batch["rows"].append(row)
                        done.add((r.image_id, m, phash[m], int(t)))
                    batch["computed"] += len(todo)
                    del maps, faith
                del x, raw
            writer.flush()  # this batch's maps in their own part(s): the batch is complete on disk
            batch["maps"] = writer.entries[maps_before:]
            _add_result(total, batch)
            if on_batch is not None:
                on_batch(batch)
            if bar is not None:
                bar.update(len(batch["images"]))
    finally:
        if bar is not None:
            bar.close()
    return total


def _empty_result() -> dict[str, Any]:
    return {"images": [], "rows": [], "maps": [], "overlays": [], "failures": [], "computed": 0, "reused": 0}


def _add_result(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("images", "rows", "maps", "overlays", "failures"):
        total[key].extend(part[key])
    total["computed"] += part["computed"]
    total["reused"] += part["reused"]


def stored_scores(plan: AuditPlan) -> tuple[dict[str, Any] | None, pd.DataFrame, set[tuple[str, str, str, int]]]:
    """``(old manifest, stored scores, done keys)`` of the audit artefact; call under its lock."""
    adir = plan.artefact_dir
    old = read_manifest(adir) if (adir / MANIFEST_NAME).is_file() else None
    scores = load_scores(adir, old)
    done = {(r.image_id, r.method, r.params_hash, int(r.target)) for r in scores.itertuples()}
    return old, scores, done


def _scores_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in SCORES_COLUMNS} for r in rows])


def journal_result(plan: AuditPlan, journal: dict[str, Any], result: dict[str, Any]) -> None:
    """Record a finished batch (or shard) ``result`` of :func:`compute_audit` in the artefact's ``journal.json``;
    call under the artefact lock. Its score rows go into a content-addressed ``scores-*.parquet`` part (garbage
    once the run publishes); the journal holds that part's entry, the map / overlay entries (already written),
    the batch's image ids and the methods' parameter hashes. Appends to ``journal["batches"]`` in place."""
    adir = plan.artefact_dir
    scores = dict(write_part(adir, _scores_table(result["rows"]), prefix="scores"), role="scores") if result["rows"] else None
    journal.setdefault("batches", []).append({
        "images": list(result["images"]), "methods": {m: plan.phash[m] for m in plan.methods}, "scores": scores,
        "maps": list(result["maps"]), "overlays": list(result["overlays"]), "failures": list(result["failures"]),
        "computed": int(result["computed"]), "reused": int(result["reused"])})
    write_journal(adir, journal)


def resume_audit(plan: AuditPlan, done: set[tuple[str, str, str, int]]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], set[tuple[str, str, str]]]:
    """What an interrupted run left in the artefact's journal; call under the lock.

    Returns ``(journal, results, finished)``: the journal keeping only batches whose files are all still there
    with their sha256 (the others are dropped, with a warning, and recomputed), one :func:`compute_audit`-shaped
    result per kept batch (marked ``resumed``), and the ``(image_id, method, params_hash)`` keys those batches
    finished. Adds the journalled rows' keys to ``done`` in place.
    """
    adir = plan.artefact_dir
    journal = read_journal(adir) if adir.is_dir() else {}
    kept: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    finished: set[tuple[str, str, str]] = set()
    for rec in journal.get("batches", []):
        try:
            rows = read_part(adir, rec["scores"]).to_pylist() if rec.get("scores") else []
            verify_files(adir, {"files": list(rec["maps"]) + list(rec["overlays"])})
            images, methods = [str(i) for i in rec["images"]], dict(rec["methods"])
        except (StoreError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("dropping a journalled audit batch (its images are recomputed): %s", exc)
            continue
        kept.append(rec)
        results.append({"images": images, "rows": rows, "maps": list(rec["maps"]), "overlays": list(rec["overlays"]),
                        "failures": list(rec.get("failures", [])), "computed": int(rec.get("computed", len(rows))),
                        "reused": int(rec.get("reused", 0)), "resumed": True})
        finished.update((i, m, ph) for i in images for m, ph in methods.items())
        done.update((r["image_id"], r["method"], r["params_hash"], int(r["target"])) for r in rows)
    if kept:
        log.info("%s: resuming an interrupted audit: %d journalled batches, %d maps", plan.artefact_id, len(kept),
                 sum(len(r["rows"]) for r in results))
    journal = {"kind": "attribution", "batches": kept}
    return journal, results, finished


def publish_audit(plan: AuditPlan, old: dict[str, Any] | None, scores: pd.DataFrame, results: list[dict[str, Any]],
                  seconds: float) -> dict[str, Any]:
    """Merge the computed results with the stored rows and publish; call under the lock.

    ``results`` (from :func:`compute_audit`, journalled batches from :func:`resume_audit` included) are merged in
    selection order of their first image, so a resumed run publishes what an uninterrupted one would; rows
    already stored are skipped. The run's journal is removed once the manifest is written.
    """
    from tasks.core.forward import pick_device

    cfg, adir, methods = plan.config, plan.artefact_dir, plan.methods
    position = {iid: k for k, iid in enumerate(plan.selection["image_id"])}

    def first(res: dict[str, Any]) -> float:
        return min((position.get(i, float("inf")) for i in res.get("images", [])), default=float("inf"))

    results = sorted(results, key=first)
    seen = {(r.image_id, r.method, r.params_hash, int(r.target)) for r in scores.itertuples()}
    new_rows = []
    for r in (r for res in results for r in res["rows"]):
        key = (r["image_id"], r["method"], r["params_hash"], int(r["target"]))
        if key not in seen:  # a journalled row already published (a kill between publish and journal removal)
            seen.add(key)
            new_rows.append(r)
    failures = [f for res in results for f in res["failures"]]
    files = [e for e in (old or {}).get("files", []) if e.get("role") in ("scores", "maps", "overlay")]
    if new_rows:
        sentry = write_part(adir, _scores_table(new_rows), prefix="scores")
        files.append(dict(sentry, role="scores"))
    names = {e["name"] for e in files}
    files += [e for res in results for e in res["maps"] + res["overlays"] if e["name"] not in names and not names.add(e["name"])]
    all_methods = dict((old or {}).get("methods", {}))
    for m in methods:
        all_methods.setdefault(m, {})[plan.phash[m]] = {"params": plan.params[m], "reduce": METHODS[m].reduce}
    manifest = {
        "kind": "attribution",
        "artefact_id": plan.artefact_id,
        "features": plan.features,
        "model": plan.spec,
        "preprocessing": plan.preprocessing,
        "gradcam_layer": cfg.layer,
        "methods": all_methods,
        "rows": int(len(scores) + len(new_rows)),
        "images": int(len(set(scores["image_id"]) | {r["image_id"] for r in new_rows})),
        "map_dtype": "float16",
        "faithfulness": {"steps": cfg.faith_steps, "score": "prob", "deletion_baseline": 0.0,
                         "insertion_start": "gaussian blur sigma 5"},
        "files": files,
        "last_run": {"select": cfg.select, "n": cfg.n, "selected": int(len(plan.selection)), "methods": methods,
                     "computed": sum(r["computed"] for r in results), "reused": sum(r["reused"] for r in results),
                     "resumed": sum(r["computed"] for r in results if r.get("resumed")),
                     "failed": failures[:20], "device": str(pick_device(cfg.device)), "seconds": round(seconds, 2)},
        "previous_created": old.get("created") if old else None,
    }
    published = write_manifest(adir, manifest)
    (adir / JOURNAL_NAME).unlink(missing_ok=True)
    remove_garbage(adir, published)
    return published


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Select, compute missing (image, method, params, target) rows, publish. Returns the manifest.

    Each finished image batch is journalled (``journal.json``), so a killed run resumes from its journalled
    batches and publishes what an uninterrupted run would. Raises ``ValueError`` / :class:`ConvlensError` for bad
    options, a missing feature artefact or missing dataset-audit findings.
    """
    from tasks.core.forward import pick_device

    t_start = time.perf_counter()
    plan, lm = plan_audit(cfg)
    model = audit_model(lm.module, pick_device(cfg.device))
    with artefact_lock(plan.artefact_dir):
        old, scores, done = stored_scores(plan)
        journal, results, finished = resume_audit(plan, done)

        def on_batch(batch: dict[str, Any]) -> None:
            journal_result(plan, journal, batch)
            results.append(batch)

        compute_audit(plan, model, plan.selection, done, progress=cfg.progress, on_batch=on_batch, finished=finished)
        return publish_audit(plan, old, scores, results, time.perf_counter() - t_start)


def run_default_audit(store: str | Path, n: int = 4, methods: tuple[str, ...] = DEFAULT_METHODS,
                      progress: bool = False) -> dict[str, Any]:
    """Audit ``n`` images of the newest feature artefact with sensible defaults; return a small summary.

    For the demo: occlusion window 32 / stride 16 (fast on CPU), random selection, predicted + label targets.
    """
    cfg = AuditConfig(store=str(store), methods=tuple(methods), n=n, window=32, stride=16, progress=progress)
    return summarise(run_audit(cfg))


def summarise(manifest: dict[str, Any]) -> dict[str, Any]:
    """Small summary of an attribution manifest (for the CLI and flows)."""
    run = manifest.get("last_run", {})
    return {"artefact_id": manifest["artefact_id"], "features": manifest["features"]["id"],
            "rows": manifest["rows"], "images": manifest["images"], "computed": run.get("computed", 0),
            "reused": run.get("reused", 0), "resumed": run.get("resumed", 0), "methods": run.get("methods", []),
            "seconds": run.get("seconds", 0.0), "failed": len(run.get("failed", []))}
