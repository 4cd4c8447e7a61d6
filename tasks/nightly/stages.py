"""The nightly audit's stages as plain functions, plus the run records that say what "yesterday" was.

Each stage wraps an existing entry point and reports what it *computed* this run (vs reused), so a night
with no new images computes nothing and a night with 1% new images computes about 1% of the per-image work.

Run records (store kind ``runs``): a successful nightly run ends by publishing
``<store>/runs/nightly-<features-id>-<UTC stamp>/`` holding

- ``<run id>/`` (the snapshot): the features artefact exactly as this run saw it (its ``manifest.json`` and every file it
  lists, hard-linked: parts are content-named and never rewritten in place, so a link costs no space and
  stays valid after the live artefact moves on; copied where links are not possible);
- ``manifest.json`` (kind ``nightly-run``, written **last**, atomically): features id / created, report path,
  per-stage counts, drift counts.

The *previous successful run* of a features artefact is its newest published run record; the report's
drift section compares today's features against that record's snapshot folder (a features artefact folder,
which ``convlens report --compare`` accepts). A failed run publishes no record, so tomorrow still compares
against the last good night. Old records beyond ``keep_runs`` are removed.

Removal (old run records, superseded maps and dataset audits) goes through the artefact's writer lock
(:func:`storage.locks.artefact_lock`), like every write: the manifest is unlinked first (readers stop seeing the
artefact), then its files. An artefact whose lock another process holds is skipped (logged) and removed by a
later run, which finds it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from storage.artefacts import artefacts_of
from storage.errors import ConvlensError, LockedError, UsageError
from storage.locks import LOCK_NAME, artefact_lock
from storage.manifest import MANIFEST_NAME, read_manifest, write_manifest
from storage.paths import Store
from storage.runs import RUN_KIND, previous_run, snapshot_dir

__all__ = [
    "NightlyConfig",
    "is_transient",
    "publish_run",
    "remove_artefact",
    "stage_extract",
    "stage_index",
    "stage_dataset_audit",
    "stage_maps",
    "stage_attribution",
    "stage_report",
    "new_image_ids",
    "snapshot_findings",
    "run_nightly",
    "summary_markdown",
]

log = logging.getLogger(__name__)


@dataclass
class NightlyConfig:
    """Parameters of one nightly run (the flow's and the CLI's parameters map 1:1)."""

    data: str
    store: str = "convlens-store"
    model: str = "mobilenet_v2"
    weights: str = "imagenet"
    layer: str | None = None
    device: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    select: str = "random"          # attribution selection policy, applied to the images new since the last run
    n: int = 16                     # at most this many new images get attribution maps per night
    methods: tuple[str, ...] = ("occlusion", "saliency", "gradcam")
    window: int = 32                # occlusion window / stride (pixels of the model input)
    stride: int = 16
    index: bool = True
    dataset_audit: bool = True
    maps: bool = True
    report_dir: str | None = None   # default <store>/reports
    keep_runs: int = 14
    always_report: bool = False     # re-render the report even when nothing changed (default: reuse the last one)
    seed: int = 0

    def validate(self) -> None:
        if not self.data:
            raise UsageError("nightly: DATA is empty; pass the dataset folder / CSV / Parquet list to audit")
        if self.n < 0:
            raise UsageError(f"nightly: --n must be >= 0 (0 = no attribution audit), got {self.n}")
        if self.keep_runs < 1:
            raise UsageError(f"nightly: --keep-runs must be >= 1, got {self.keep_runs}")
        if self.batch_size < 1:
            raise UsageError(f"nightly: --batch-size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        return d


# ------------------------------------------------------------------------------------------ retries


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: I/O (``OSError``: network file systems, S3, full temp dirs) and CUDA
    out-of-memory (retried with a smaller batch). Never for bad input: :class:`ConvlensError`, ``ValueError``,
    missing / unreadable paths (``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``,
    ``PermissionError``) — rerunning cannot fix those.
    """
    if exc is None or isinstance(exc, (ConvlensError, ValueError)):
        return False
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return False
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return True
    return isinstance(exc, OSError)


def _smaller(batch: int, attempt: int) -> int:
    """Batch size for retry ``attempt`` (1 = first try): halved per retry, at least 1."""
    return max(1, batch >> max(attempt - 1, 0))


# ------------------------------------------------------------------------------------------ run records


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # other file system, or links not allowed: copy
        shutil.copy2(src, dst)


def _snapshot(fdir: Path, fman: dict[str, Any], dest: Path) -> None:
    """Freeze the features artefact ``fdir`` (as ``fman`` lists it) into ``dest`` (files first, manifest last)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in fman.get("files", []):
        target = dest / entry["name"]
        if not target.exists():
            _link_or_copy(fdir / entry["name"], target)
    write_manifest(dest, fman)


def publish_run(store: str | os.PathLike[str], run_id: str, features_id: str, fman: dict[str, Any],
                record: dict[str, Any], keep_runs: int = 14) -> dict[str, Any]:
    """Publish the run record ``runs/<run_id>`` (snapshot of the features + manifest written last) and remove
    this features artefact's records beyond the newest ``keep_runs``. Returns the record's manifest."""
    s = Store(store)
    rdir = s.artefact_dir("runs", run_id, create=True)
    fdir = s.artefact_dir("features", features_id)
    _snapshot(fdir, fman, snapshot_dir(store, run_id))
    manifest = {"kind": RUN_KIND, "artefact_id": run_id, "status": "completed",
                "features": {"id": features_id, "created": fman.get("created"), "rows": fman.get("rows")},
                **record}
    published = write_manifest(rdir, manifest)
    runs = artefacts_of(s, RUN_KIND, features_id)  # newest first
    kept_reports = {str(m.get("report")) for _, m, _ in runs[:keep_runs]}
    for rid, m, rdir_old in runs[keep_runs:]:
        log.info("removing old nightly run record %s (keeping %d)", rid, keep_runs)
        report = Path(str(m.get("report", "")))
        if not (str(report) not in kept_reports and report.parent == s.kind_dir("reports")
                and report.name.startswith("nightly-")):
            report = None  # only a nightly report in the store that no kept record points to is removed
        remove_artefact(rdir_old, "old nightly run record", also=report)
    return published


def remove_artefact(adir: Path, what: str = "artefact", also: Path | None = None) -> bool:
    """Remove the artefact directory ``adir`` (and the file ``also``, e.g. its report) under its writer lock.

    The manifest goes first (readers stop seeing the artefact), then every other file and folder, then the lock
    (released) and the empty directory. Returns False, logging why, when another process holds the lock: the
    artefact is left as it is for a later run to remove.
    """
    if not adir.is_dir():
        return True
    try:
        with artefact_lock(adir):
            (adir / MANIFEST_NAME).unlink(missing_ok=True)
            for child in adir.iterdir():
                if child.name == LOCK_NAME:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            if also is not None:
                also.unlink(missing_ok=True)
    except LockedError as exc:
        log.warning("not removing %s %s now (retried on the next run): %s", what, adir.name, exc)
        return False
    with contextlib.suppress(OSError):  # not empty: another writer has started in it since; it is theirs
        adir.rmdir()
    return True


# ------------------------------------------------------------------------------------------ stages


def _ids(fdir: Path, fman: dict[str, Any]) -> set[str]:
    from storage.features import read_meta

    return set(read_meta(fdir, fman, verify=False)["image_id"])


def new_image_ids(store: str | os.PathLike[str], features_id: str, previous_snapshot: Path | None) -> tuple[set[str], set[str]]:
    """``(new, removed)`` image ids (content hashes) of the current features vs a previous snapshot
    (``None``: first run, every image is new)."""
    s = Store(store)
    fdir = s.artefact_dir("features", features_id)
    cur = _ids(fdir, read_manifest(fdir))
    if previous_snapshot is None:
        return cur, set()
    prev = _ids(previous_snapshot, read_manifest(previous_snapshot))
    return cur - prev, prev - cur


def _usable_snapshot(snapshot: Path | None, fdir: Path) -> Path | None:
    """``snapshot`` (the previous run's) when every file it lists verifies, else None, logged as an error: the run
    goes on without a drift baseline instead of failing every night. A snapshot file that is the live features'
    own (same inode, verified by tonight's extraction) is not hashed again; a feature part that was damaged in
    place (the snapshot's hard link shares its bytes) and repaired by the extraction is a new inode, so checked."""
    if snapshot is None:
        return None
    from storage.errors import StoreError
    from storage.manifest import verify_files

    try:
        for entry in read_manifest(snapshot).get("files", []):
            live = fdir / entry["name"]
            if not (live.is_file() and os.path.samefile(live, snapshot / entry["name"])):
                verify_files(snapshot, {"files": [entry]})
    except (StoreError, OSError) as exc:
        log.error("the previous run's features snapshot %s is damaged (%s); this run has no drift baseline", snapshot, exc)
        return None
    return snapshot


def snapshot_findings(store: str | os.PathLike[str], audit_id: str, run_dir: Path) -> list[dict[str, Any]]:
    """Copy (hard-link) the findings table of the dataset audit ``audit_id`` into the run record ``run_dir``;
    returns its manifest entries (role ``findings``, to list in the record's manifest). The next run's report reads
    it as "yesterday's findings" (:func:`reports.sections.core.previous_findings`): the audit itself is replaced by
    then. Empty when the audit lists no findings table."""
    adir = Store(store).artefact_dir("audits", audit_id)
    entry = next((e for e in read_manifest(adir).get("files", []) if e.get("role") == "findings"), None)
    if entry is None:
        return []
    target = run_dir / entry["name"]
    if not target.exists():
        _link_or_copy(adir / entry["name"], target)
    return [dict(entry, role="findings", dataset_audit=audit_id)]


def stage_extract(cfg: NightlyConfig, attempt: int = 1) -> dict[str, Any]:
    """Extract features of the images not yet stored; returns ``{features_id, created, rows, extracted,
    reused, removed, added_paths, rejects, republished}``. Retry ``attempt`` k runs with batch size / 2^(k-1)."""
    from tasks.extract.features import ExtractConfig, run_extraction

    ecfg = ExtractConfig(data=cfg.data, store=cfg.store, model=cfg.model, weights=cfg.weights, layer=cfg.layer,
                         device=cfg.device, batch_size=_smaller(cfg.batch_size, attempt), num_workers=cfg.num_workers,
                         seed=cfg.seed, progress=False)
    # run_extraction keeps the published manifest (and its ``created`` stamp, which keys every later stage)
    # when the listing matches it exactly; ``run["unchanged"]`` says so.
    m = run_extraction(ecfg)
    run = m["run"]
    republished = not run.get("unchanged", False)
    return {"features_id": m["artefact_id"], "created": m["created"], "rows": int(m["rows"]),
            "extracted": int(run.get("extracted", 0)), "reused": int(run.get("reused", 0)),
            "removed": int(run.get("removed", 0)), "added_paths": int(run.get("added_paths", 0)),
            "rejects": int(m.get("rejects", 0)), "republished": republished, "batch_size": ecfg.batch_size}


def stage_index(store: str, features_id: str) -> dict[str, Any]:
    """Feature- and pixel-space FAISS indexes (reused / incremental add / rebuilt after deletions)."""
    from tasks.index.build import build_default_indexes

    out = build_default_indexes(store, features_id)
    return {space: {"mode": v["mode"], "rows": v["rows"], "artefact_id": v["artefact_id"]} for space, v in out.items()}


def _prune_superseded(store: str, features_id: str, created: str) -> list[str]:
    """Remove maps / dataset audits of ``features_id`` built from an older publication of it (superseded by
    tonight's; the report would otherwise list them as stale), each under its writer lock
    (:func:`remove_artefact`: one whose lock is held is skipped and removed by a later run). Returns the removed
    artefact ids."""
    s = Store(store)
    removed = []
    for kind in ("maps", "audits"):
        for aid, m in list(s.iter_artefacts(kind)):
            if m.get("kind") == "maps" and m.get("source") == features_id:
                built_from = (m.get("source_manifest") or {}).get("created")
            elif m.get("kind") == "dataset-audit" and (m.get("source") or {}).get("features") == features_id:
                built_from = m["source"].get("features_created")
            else:
                continue
            if built_from and built_from != created and remove_artefact(s.artefact_dir(kind, aid), f"superseded {kind}"):
                removed.append(aid)
    if removed:
        log.info("removed %d superseded maps / dataset audits of %s", len(removed), features_id)
    return removed


def stage_dataset_audit(store: str, features_id: str) -> dict[str, Any]:
    """kNN dataset audit (duplicates, leakage, label disagreement, outliers); reused when the index is unchanged."""
    from tasks.index.dataset_audit import audit_dataset

    r = audit_dataset(store, features_id)
    return {"artefact_id": r["artefact_id"], "reused": bool(r.get("reused")), "images": r["images"],
            "counts": r["counts"]}


def stage_maps(store: str, features_id: str, created: str, seed: int = 0) -> dict[str, Any]:
    """PCA + t-SNE maps and the t-SNE grid; reused when the features are unchanged, otherwise the new images are
    placed into yesterday's maps (old images keep their coordinates; ``incremental`` says how many), then the
    superseded maps are removed."""
    from tasks.maps.defaults import make_default_maps

    r = make_default_maps(store, features_id, seed=seed, incremental=True)
    pruned = _prune_superseded(store, features_id, created)
    return {"pca": {"map_id": r["pca"].get("map_id"), "reused": bool(r["pca"].get("reused")),
                    "incremental": r["pca"].get("incremental")},
            "tsne": {"map_id": r["tsne"].get("map_id"), "reused": bool(r["tsne"].get("reused")),
                     "incremental": r["tsne"].get("incremental")},
            "computed": sum(not r[k].get("reused") for k in ("pca", "tsne")), "superseded_removed": len(pruned)}


def stage_attribution(cfg: NightlyConfig, features_id: str, new_ids: set[str], work_dir: Path,
                      attempt: int = 1) -> dict[str, Any]:
    """Attribution maps for at most ``cfg.n`` of tonight's *new* images, chosen by ``cfg.select`` among them.

    Returns ``{selected, image_ids, computed (maps), reused (maps), artefact_id}``; nothing runs when there
    are no new images. Stored maps are keyed by image content hash, so a re-selected image is never recomputed.
    """
    from storage.features import read_meta
    from tasks.attribution.audit import AuditConfig, run_audit, select_images, summarise

    if cfg.n == 0 or not new_ids:
        return {"selected": 0, "image_ids": [], "computed": 0, "reused": 0, "artefact_id": None}
    s = Store(cfg.store)
    fdir = s.artefact_dir("features", features_id)
    fman = read_manifest(fdir)
    meta = read_meta(fdir, fman, verify=False)
    cats = None
    cat_entry = next((e for e in fman.get("files", []) if e.get("role") == "categories"), None)
    if cat_entry:
        import json

        cats = json.loads((fdir / cat_entry["name"]).read_text("utf-8"))
    fresh = meta[meta["image_id"].isin(new_ids)]
    num_classes = len(cats) if cats else (int(max(max(v) for v in meta["pred_top5"])) + 1
                                          if "pred_top5" in meta.columns and len(meta) else 0)
    sel = select_images(fresh, cfg.select, cfg.n, cfg.seed, cats, num_classes, s, features_id)
    if sel.empty:
        return {"selected": 0, "image_ids": [], "computed": 0, "reused": 0, "artefact_id": None}
    work_dir.mkdir(parents=True, exist_ok=True)
    ids_file = work_dir / "attribution-ids.txt"
    ids_file.write_text(f"# nightly selection: --select {cfg.select} among {len(fresh)} new images\n"
                        + "\n".join(sel["image_id"]) + "\n", "utf-8")
    acfg = AuditConfig(store=cfg.store, artefact=features_id, methods=tuple(cfg.methods), select=f"ids:{ids_file}",
                       n=len(sel), seed=cfg.seed, device=cfg.device, window=cfg.window, stride=cfg.stride,
                       batch_size=_smaller(64, attempt), image_batch=_smaller(8, attempt), progress=False,
                       model=cfg.model, weights=cfg.weights if cfg.weights not in ("imagenet", "none") else None)
    acfg.validate()
    r = summarise(run_audit(acfg))
    return {"selected": int(len(sel)), "image_ids": sorted(sel["image_id"]), "computed": r["computed"],
            "reused": r["reused"], "artefact_id": r["artefact_id"], "policy": cfg.select}


def stage_report(store: str, features_id: str, out: str, compare: str | None) -> dict[str, Any]:
    """Render the report (drift vs ``compare``, a previous run's snapshot, when given); returns path + drift."""
    from reports.render import ReportOptions, build_report, render_html
    from storage.atomic import atomic_write_bytes

    ctx = build_report(store, features_id, compare, ReportOptions())
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, render_html(ctx).encode("utf-8", "replace"))
    os.chmod(target, 0o644)
    d = ctx["drift"]
    drift = {k: d[k] for k in ("n_new", "n_removed", "n_common", "n_prev", "n_cur", "previous") if k in d} if d.get("present") else None
    return {"path": str(target.absolute()), "bytes": target.stat().st_size, "drift": drift}


# ------------------------------------------------------------------------------------------ orchestration

Call = Callable[[str, Callable[..., Any], dict[str, Any]], Any]


def _direct(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    return fn(**kwargs)


def run_nightly(cfg: NightlyConfig, call: Call = _direct, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run every stage in order and publish the run record; returns the small summary.

    ``call(name, fn, kwargs)`` runs one stage (default: directly; the Prefect flow passes its tasks). A stage
    that raises stops the run: no record is published, so the next run compares against the last good one.
    Summary: ``{run_id, features_id, report, previous_run, stages: {name: counts}, seconds: {name: s},
    drift: {n_new, n_removed, ...} | None, new_images, removed_images}``.
    """
    cfg.validate()
    t_all = time.perf_counter()
    stages: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def stage(name: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = call(name, fn, kwargs)
        seconds[name] = round(time.perf_counter() - t0, 3)
        stages[name] = out
        say(f"[{name}] {seconds[name]:.1f}s {_brief(out)}")
        return out

    ext = stage("extract", stage_extract, cfg=cfg)
    fid, created = ext["features_id"], ext["created"]
    prev = previous_run(cfg.store, fid)
    prev_snapshot = _usable_snapshot(prev[2] if prev else None, Store(cfg.store).artefact_dir("features", fid))
    new_ids, removed_ids = new_image_ids(cfg.store, fid, prev_snapshot)
    run_id = f"nightly-{fid[:48]}-{_utc_stamp()}"
    work_dir = Store(cfg.store).artefact_dir("runs", run_id, create=True)
    if cfg.index:
        stage("index", stage_index, store=cfg.store, features_id=fid)
    if cfg.dataset_audit:
        stage("dataset-audit", stage_dataset_audit, store=cfg.store, features_id=fid)
        # tomorrow's report compares findings night over night; tonight's audit is replaced by then, so keep a copy
        findings_files = snapshot_findings(cfg.store, stages["dataset-audit"]["artefact_id"], work_dir)
    else:
        findings_files = []
    if cfg.maps:
        stage("maps", stage_maps, store=cfg.store, features_id=fid, created=created, seed=cfg.seed)
    stage("attribution", stage_attribution, cfg=cfg, features_id=fid, new_ids=new_ids, work_dir=work_dir)
    report_dir = Path(cfg.report_dir) if cfg.report_dir else Store(cfg.store).kind_dir("reports")
    out = report_dir / f"{run_id}.html"
    reuse = _reusable_report(cfg, prev, created, ext, stages)
    if reuse is not None:
        say(f"[report] nothing changed since {prev[0]}; reusing its report {reuse['path']}")
        stages["report"], seconds["report"] = reuse, 0.0
        rep = reuse
    else:
        rep = stage("report", stage_report, store=cfg.store, features_id=fid, out=str(out),
                    compare=str(prev_snapshot) if prev_snapshot else None)
    seconds["total"] = round(time.perf_counter() - t_all, 3)
    summary = {
        "run_id": run_id, "features_id": fid, "report": rep["path"], "previous_run": prev[0] if prev else None,
        "new_images": len(new_ids), "removed_images": len(removed_ids),
        "drift": rep["drift"] if reuse is None else {"n_new": 0, "n_removed": 0, "n_common": ext["rows"],
                                                      "n_prev": ext["rows"], "n_cur": ext["rows"], "previous": prev[0]},
        "stages": {k: v for k, v in stages.items() if k != "report"}
        | {"report": {"path": rep["path"], "bytes": rep["bytes"], "reused": reuse is not None}},
        "seconds": seconds, "config": cfg.to_dict(),
    }
    fdir = Store(cfg.store).artefact_dir("features", fid)
    publish_run(cfg.store, run_id, fid, read_manifest(fdir),
                {k: v for k, v in summary.items() if k != "run_id"} | {"files": findings_files}, cfg.keep_runs)
    return summary


def _reusable_report(cfg: NightlyConfig, prev: tuple[str, dict[str, Any], Path] | None, created: str,
                     ext: dict[str, Any], stages: dict[str, Any]) -> dict[str, Any] | None:
    """The previous run's report when tonight changed nothing it shows (same features publication, every
    stage reused, report file still there) and ``cfg.always_report`` is off; else None."""
    if cfg.always_report or prev is None or ext["republished"]:
        return None
    _, pman, _ = prev
    report = Path(str(pman.get("report", "")))
    if pman.get("features", {}).get("created") != created or not report.is_file():
        return None
    st = stages
    if any(v["mode"] != "reused" for v in st.get("index", {}).values()):
        return None
    if ("dataset-audit" in st and not st["dataset-audit"]["reused"]) or st.get("maps", {}).get("computed", 0):
        return None
    if st["attribution"]["computed"]:
        return None
    return {"path": str(report), "bytes": report.stat().st_size, "drift": pman.get("drift"), "reused": True}


def _brief(out: Any, limit: int = 240) -> str:
    text = str(out)
    return text if len(text) <= limit else text[:limit] + " …"


def summary_markdown(summary: dict[str, Any]) -> str:
    """Markdown for the Prefect artefact: what each stage computed, drift, link to the report."""
    st = summary["stages"]
    ext = st["extract"]
    lines = [f"# convlens nightly audit — `{summary['features_id']}`", "",
             f"Report: [{Path(summary['report']).name}]({Path(summary['report']).as_uri()})  ",
             f"Run record: `runs/{summary['run_id']}`; compared with: "
             f"`{summary['previous_run'] or 'nothing (first run)'}`", "",
             "| stage | computed this run | seconds |", "|---|---|---|",
             f"| extract | {ext['extracted']} images extracted, {ext['reused']} reused, {ext['removed']} removed "
             f"({ext['rows']} rows, {ext['rejects']} rejects) | {summary['seconds'].get('extract', 0):.1f} |"]
    if "index" in st:
        lines.append("| index | " + ", ".join(f"{k}: {v['mode']} ({v['rows']} rows)" for k, v in st["index"].items())
                     + f" | {summary['seconds'].get('index', 0):.1f} |")
    if "dataset-audit" in st:
        da = st["dataset-audit"]
        lines.append(f"| dataset audit | {'reused' if da['reused'] else 'recomputed'}: "
                     + ", ".join(f"{k} {v}" for k, v in da["counts"].items()) + f" | {summary['seconds'].get('dataset-audit', 0):.1f} |")
    if "maps" in st:
        lines.append(f"| maps | {st['maps']['computed']} of 2 maps computed | {summary['seconds'].get('maps', 0):.1f} |")
    at = st["attribution"]
    lines.append(f"| attribution | {at['selected']} new images selected, {at['computed']} maps computed, "
                 f"{at['reused']} reused | {summary['seconds'].get('attribution', 0):.1f} |")
    how = "reused (nothing changed)" if st["report"].get("reused") else "written"
    lines.append(f"| report | {how} ({st['report']['bytes'] / 1e6:.1f} MB) | {summary['seconds'].get('report', 0):.1f} |")
    d = summary.get("drift")
    lines += ["", (f"**Drift vs previous run:** {d['n_new']} new images, {d['n_removed']} removed, "
                   f"{d['n_common']} in both ({d['n_prev']} → {d['n_cur']} rows)." if d else
                   "**Drift:** no previous successful run to compare with (first run).")]
    return "\n".join(lines)

