"""Unattended runs you can trust: a killed attribution audit resumes from its journal, Ctrl-C stops cleanly,
removal of superseded artefacts respects their writer lock, an index update never pulls files from under a
reader of the previous manifest, and a FIFO or a symlink to /dev/zero at a stored image path hangs no stage.

Tiny hand-built model (``tiny_models:build``, random weights) and small generated PNGs only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import make_color_dataset
from storage.locks import LOCK_NAME, artefact_lock
from storage.manifest import MANIFEST_NAME, read_manifest, write_manifest
from storage.paths import Store

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODEL = "tiny_models:build"
FAST = dict(window=112, stride=112, faith_steps=2, batch_size=16, thumb=32, progress=False, device="cpu")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


@pytest.fixture
def trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A trust file naming the test model (later stages rebuild a ``module:factory`` model only when the user
    allows it); set for this process and returned as extra environment for subprocesses."""
    path = tmp_path / "trust.toml"
    path.write_text(f'trusted_models = ["{MODEL}"]\n', "utf-8")
    path.chmod(0o644)
    monkeypatch.setenv("CONVLENS_TRUST", str(path))
    return {"CONVLENS_TRUST": str(path)}


def _extract(data: Path, store: Path) -> dict[str, Any]:
    from tasks.extract.features import ExtractConfig, run_extraction

    return run_extraction(ExtractConfig(data=str(data), store=str(store), model=MODEL, weights="none", batch_size=2,
                                        part_rows=4, num_workers=0, progress=False, device="cpu"))


# ------------------------------------------------------------------------------------------ 1. audit journal


def _logical_audit(store: Path) -> dict[str, Any]:
    """What a reader of the newest attribution audit sees: maps / overlays by sha256, scores less per-run columns."""
    from storage.audits import read_scores

    scores, man = read_scores(store)
    read_manifest(Store(store).artefact_dir("audits", man["artefact_id"]), verify=True)
    scores = scores.drop(columns=["runtime_s", "created"]).sort_values(["image_id", "method", "target"])
    return {"files": sorted((e["role"], e["sha256"]) for e in man["files"] if e["role"] != "scores"),
            "scores": scores.reset_index(drop=True).to_json(orient="records", double_precision=15),
            "rows": man["rows"], "images": man["images"]}


def _audit_setup(tmp_path: Path) -> tuple[Any, Path, Path, Path]:
    """A feature store with a published audit (saliency on 6 images); the config that adds Grad-CAM to them in
    3 image batches; a copy of the store for the uninterrupted reference run. Returns (cfg, store, ref, adir)."""
    from tasks.attribution.audit import AuditConfig, run_audit

    data = make_color_dataset(tmp_path / "data", per_class=3, size=(40, 36), splits=("",))
    store = tmp_path / "store"
    _extract(data, store)
    first = run_audit(AuditConfig(store=str(store), methods=("saliency",), n=6, image_batch=2, **FAST))
    assert first["rows"] == 6
    ref = tmp_path / "ref"
    shutil.copytree(store, ref)
    cfg = AuditConfig(store=str(store), methods=("saliency", "gradcam"), n=6, image_batch=2, **FAST)
    return cfg, store, ref, Store(store).artefact_dir("audits", first["artefact_id"])


def _count_maps(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count attribution maps computed from now on (``tasks.attribution.audit.compute_map`` wrapped)."""
    import tasks.attribution.audit as audit

    real, count = audit.compute_map, {"maps": 0}

    def counting(name, model, x, t, *a, **k):
        count["maps"] += len(t)
        return real(name, model, x, t, *a, **k)

    monkeypatch.setattr(audit, "compute_map", counting)
    return count


def _journalled_batches(adir: Path) -> list[dict[str, Any]]:
    return json.loads((adir / "journal.json").read_text("utf-8"))["batches"]


def test_killed_audit_resumes_from_its_journal_and_equals_an_uninterrupted_run(tmp_path, trusted, monkeypatch):
    import tasks.attribution.audit as audit

    cfg, store, ref, adir = _audit_setup(tmp_path)
    published = (adir / MANIFEST_NAME).read_bytes()
    real_decode, calls = audit._decode_batch, {"n": 0}

    def killed_after_first_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")  # the process dies while the second batch is read
        return real_decode(*a, **k)

    monkeypatch.setattr(audit, "_decode_batch", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        audit.run_audit(cfg)
    monkeypatch.setattr(audit, "_decode_batch", real_decode)
    assert (adir / MANIFEST_NAME).read_bytes() == published  # nothing published
    assert not (adir / LOCK_NAME).exists()
    batches = _journalled_batches(adir)
    sel = audit.plan_audit(cfg)[0].selection
    assert len(batches) == 1 and batches[0]["images"] == list(sel["image_id"][:2])
    assert batches[0]["computed"] == 2 and batches[0]["methods"].keys() == {"saliency", "gradcam"}
    for e in batches[0]["maps"] + batches[0]["overlays"] + [batches[0]["scores"]]:
        assert (adir / e["name"]).is_file()  # the finished batch's files are on disk

    count = _count_maps(monkeypatch)
    resumed = audit.run_audit(cfg)
    assert count["maps"] == 4  # only the two unjournalled batches' Grad-CAM maps
    assert resumed["last_run"]["computed"] == 6 and resumed["last_run"]["resumed"] == 2
    assert not (adir / "journal.json").exists()
    listed = {e["name"] for e in resumed["files"]} | {MANIFEST_NAME}
    assert {p.name for p in adir.iterdir()} == listed  # the journal's batch score parts were merged, then removed

    count["maps"] = 0
    uninterrupted = audit.run_audit(replace(cfg, store=str(ref)))
    assert count["maps"] == 6 and uninterrupted["last_run"]["computed"] == 6
    assert _logical_audit(store) == _logical_audit(ref)


def test_killed_sharded_audit_resumes_only_unfinished_shards(tmp_path, trusted, monkeypatch):
    from tasks.attribution.audit import run_audit
    from tasks.attribution.sharding import audit_shard, run_sharded_audit

    cfg, store, ref, adir = _audit_setup(tmp_path)
    published = (adir / MANIFEST_NAME).read_bytes()

    def killed_after_first_shard(jobs):
        yield 0, audit_shard(jobs[0])
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_sharded_audit(cfg, killed_after_first_shard, shard_size=2)
    assert (adir / MANIFEST_NAME).read_bytes() == published
    batches = _journalled_batches(adir)
    assert len(batches) == 1 and batches[0]["computed"] == 2

    submitted: list[int] = []

    def serial(jobs):
        submitted.append(len(jobs))
        for i, job in enumerate(jobs):
            yield i, audit_shard(job)

    count = _count_maps(monkeypatch)
    resumed = run_sharded_audit(cfg, serial, shard_size=2)
    assert submitted == [2] and count["maps"] == 4  # the journalled shard is not submitted again
    assert resumed["last_run"]["computed"] == 6 and resumed["last_run"]["resumed"] == 2
    assert not (adir / "journal.json").exists()
    run_audit(replace(cfg, store=str(ref)))  # uninterrupted, one process
    assert _logical_audit(store) == _logical_audit(ref)


# ------------------------------------------------------------------------------------------ 2. Ctrl-C


def _wait_for(pred, timeout: float = 120.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.005)
    return False


def _default_sigint() -> None:  # in the child, before exec: a runner that ignores SIGINT must not hide Ctrl-C
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_cleanly_keeps_the_published_manifest_and_resumes(tmp_path):
    data = make_color_dataset(tmp_path / "data", per_class=8, size=(40, 32), splits=("",))
    store = tmp_path / "store"
    first = _extract(data, store)
    fdir = Store(store).artefact_dir("features", first["artefact_id"])
    published = (fdir / MANIFEST_NAME).read_bytes()
    more = make_color_dataset(tmp_path / "more", per_class=16, size=(40, 32), splits=("",), seed=1)
    for src in more.rglob("*.png"):
        shutil.copy(src, data / src.parent.name / f"new-{src.name}")
    cmd = [sys.executable, "-m", "flows.cli", "--no-prefect", "extract", str(data), "--store", str(store), "--model",
           MODEL, "--weights", "none", "--batch-size", "2", "--part-rows", "4", "--num-workers", "0", "--device",
           "cpu", "--json"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        assert _wait_for(lambda: (fdir / "journal.json").exists() or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before it could be interrupted; use more images"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "convlens extract: interrupted; the last published output is intact, rerun to resume" in err
    assert "SIGTERM" not in err
    assert not (fdir / LOCK_NAME).exists()
    with artefact_lock(fdir):  # free: taken at once by the next writer
        pass
    assert (fdir / MANIFEST_NAME).read_bytes() == published
    journalled = sum(e["rows"] for e in json.loads((fdir / "journal.json").read_text("utf-8"))["parts"])
    assert journalled > 0
    rerun = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["rows"] == 24 + 48 and summary["extracted"] == 48 - journalled  # resumed, not redone
    assert not (fdir / "journal.json").exists() and not (fdir / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ 3. removal and GC


@contextlib.contextmanager
def _locked_by_another_process(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s writer lock in a child process for the block."""
    code = ("import sys\nfrom storage.locks import artefact_lock\nwith artefact_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.stdin.close()
        proc.wait(60)


def _fake_artefact(store: Path, kind: str, aid: str, manifest: dict[str, Any]) -> Path:
    adir = Store(store).artefact_dir(kind, aid, create=True)
    (adir / "data.parquet").write_bytes(b"x")
    from storage.manifest import file_entry

    write_manifest(adir, {"artefact_id": aid, **manifest, "files": [file_entry(adir, "data.parquet")]})
    return adir


def test_superseded_maps_and_audits_are_removed_under_their_lock(tmp_path, caplog):
    from tasks.nightly.stages import _prune_superseded

    store = tmp_path / "store"
    old_map = _fake_artefact(store, "maps", "tsne-old", {"kind": "maps", "source": "fid", "source_manifest": {"created": "T1"}})
    cur_map = _fake_artefact(store, "maps", "tsne-cur", {"kind": "maps", "source": "fid", "source_manifest": {"created": "T2"}})
    old_audit = _fake_artefact(store, "audits", "dataset-audit-old",
                               {"kind": "dataset-audit", "source": {"features": "fid", "features_created": "T1"}})
    with _locked_by_another_process(old_map), caplog.at_level(logging.WARNING, logger="tasks.nightly.stages"):
        assert _prune_superseded(str(store), "fid", "T2") == ["dataset-audit-old"]
        assert read_manifest(old_map, verify=True)["artefact_id"] == "tsne-old"  # untouched while held
        assert any("tsne-old" in r.getMessage() and "retried on the next run" in r.getMessage() for r in caplog.records)
    assert not old_audit.exists()
    assert _prune_superseded(str(store), "fid", "T2") == ["tsne-old"]  # the next run removes it
    assert not old_map.exists()
    assert read_manifest(cur_map, verify=True)["artefact_id"] == "tsne-cur"


def test_old_run_records_are_removed_under_their_lock(tmp_path, caplog):
    from tasks.nightly.stages import publish_run

    store = tmp_path / "store"
    fdir = _fake_artefact(store, "features", "fid", {"kind": "features"})
    fman = read_manifest(fdir)
    reports = Store(store).kind_dir("reports")
    reports.mkdir(parents=True)

    def publish(i: int) -> Path:
        report = reports / f"nightly-{i}.html"
        report.write_text("<html></html>")
        publish_run(str(store), f"nightly-fid-{i}", "fid", fman, {"report": str(report)}, keep_runs=1)
        return Store(store).artefact_dir("runs", f"nightly-fid-{i}")

    run1 = publish(1)
    with _locked_by_another_process(run1), caplog.at_level(logging.WARNING, logger="tasks.nightly.stages"):
        run2 = publish(2)
        assert read_manifest(run1)["artefact_id"] == "nightly-fid-1" and (reports / "nightly-1.html").is_file()
        assert any("nightly-fid-1" in r.getMessage() for r in caplog.records)
    publish(3)
    assert not run1.exists() and not run2.exists() and not (reports / "nightly-1.html").exists()
    assert sorted(p.name for p in reports.iterdir()) == ["nightly-3.html"]


def test_index_update_keeps_the_files_a_reader_of_the_previous_manifest_needs(tmp_path):
    from index_fixtures import write_feature_artefact
    from storage.index_store import load_index_bytes, read_idmap
    from tasks.index.build import IndexConfig, build_index

    x = np.random.default_rng(3).normal(size=(130, 8)).astype(np.float32)
    store = tmp_path / "store"
    write_feature_artefact(store, x[:100], created="2024-01-01T00:00:00+00:00")
    m1 = build_index(IndexConfig(store=str(store)))
    adir = Store(store).artefact_dir("indexes", m1["artefact_id"])
    held = read_manifest(adir)  # a reader holds the published manifest ...
    write_feature_artefact(store, x[:120], created="2024-02-01T00:00:00+00:00")
    m2 = build_index(IndexConfig(store=str(store)))  # ... while an incremental update publishes a new one
    assert m2["build"]["mode"] == "incremental" and {e["name"] for e in m2["files"]}.isdisjoint(e["name"] for e in held["files"])
    assert len(load_index_bytes(adir, held)) > 0 and len(read_idmap(adir, held)) == 100  # all its files open
    write_feature_artefact(store, x, created="2024-03-01T00:00:00+00:00")
    m3 = build_index(IndexConfig(store=str(store)))
    names = {p.name for p in adir.iterdir()}
    assert {e["name"] for e in m2["files"]} <= names and {e["name"] for e in m3["files"]} <= names
    assert names.isdisjoint(e["name"] for e in held["files"])  # garbage once listed by neither m3 nor m2
    assert read_idmap(adir, read_manifest(adir, verify=True)).shape[0] == 130


# ------------------------------------------------------------------------------------------ 4. FIFO, /dev/zero


@pytest.mark.timeout(120)
def test_fifo_and_dev_zero_at_stored_image_paths_hang_no_stage(tmp_path, trusted):
    from storage.audits import read_scores
    from storage.features import read_meta
    from tasks.attribution.audit import AuditConfig, run_audit
    from tasks.maps.grid import make_grid
    from tasks.maps.projection import MapConfig, build_map
    from tasks.neurons.max_activations import run_max_activations

    data = make_color_dataset(tmp_path / "data", per_class=6, size=(40, 36), splits=("",))
    store = tmp_path / "store"
    fman = _extract(data, store)
    build_map(MapConfig(store=str(store), method="tsne", seed=0))
    meta = read_meta(Store(store).artefact_dir("features", fman["artefact_id"]), fman).sort_values("path")
    fifo_path, zero_path = meta["path"].iloc[0], meta["path"].iloc[1]
    (data / fifo_path).unlink()
    os.mkfifo(data / fifo_path)  # nobody ever writes to it: a blocking open waits forever
    (data / zero_path).unlink()
    (data / zero_path).symlink_to("/dev/zero")  # endless bytes
    bad = {fifo_path, zero_path}

    p = subprocess.run([sys.executable, "-m", "flows.cli", "--no-prefect", "report", "--store", str(store), "--json"],
                       cwd=REPO, env=_env(**trusted), capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(json.loads(p.stdout)["report"]).stat().st_size > 0
    from reports.render import ReportOptions, build_report

    ctx = build_report(str(store), None, None, ReportOptions())
    assert ctx["n_points"] == 18 and ctx["n_thumbs"] == 16  # the two are shown without a thumbnail, nothing else lost

    grid = make_grid(str(store), size="3x6", force=True)
    assert grid["filled"] == 18 and grid["missing_images"] == 2

    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([fifo_path, zero_path, meta["path"].iloc[2]]) + "\n")
    man = run_audit(AuditConfig(store=str(store), methods=("saliency",), select=f"ids:{ids}", n=3, **FAST))
    failed = man["last_run"]["failed"]
    assert len(failed) == 2 and {f.split(":", 1)[0] for f in failed} == bad
    assert all("not-a-file" in f for f in failed)
    scores, _ = read_scores(store)
    assert list(scores["path"]) == [meta["path"].iloc[2]]

    act = run_max_activations(str(store), layer="conv", k=2, device="cpu", batch_size=4, png_channels=2)
    assert act["images_skipped"] == 2 and act["images_scanned"] == 16
