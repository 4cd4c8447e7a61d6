"""Crash soak (issue 10, requirements 1 and 2): ``convlens extract`` / ``index`` / ``audit`` in a subprocess,
killed with SIGKILL at random moments, rerun to completion and compared with an uninterrupted run; a reader
polls every manifest meanwhile and must only ever see a valid, fully checksummed one. Plus SIGTERM, plain
and as a Prefect flow run.

Trial counts: the default run lands :data:`DEFAULT_KILLS` kills (extract 2, index 1, audit 1) so the test
stays around a minute on 2 idle cores; ``CONVLENS_SOAK=1`` lands :data:`FULL_KILLS` (extract 16, index 4,
audit 4 = 24) and also checks that a no-op rerun of every stage changes nothing. ``CONVLENS_SOAK_SEED`` picks the random kill schedule (default 0).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from conftest import make_color_dataset
from storage.atomic import TMP_PREFIX
from storage.errors import StoreError
from storage.features import load_features, part_entries
from storage.locks import LOCK_NAME
from storage.manifest import MANIFEST_NAME, read_manifest
from storage.paths import Store

REPO = Path(__file__).resolve().parents[1]
FULL = os.environ.get("CONVLENS_SOAK") == "1"
DEFAULT_KILLS = {"extract": 2, "index": 1, "audit": 1}
FULL_KILLS = {"extract": 16, "index": 4, "audit": 4}
KILLS = FULL_KILLS if FULL else DEFAULT_KILLS
SEED = int(os.environ.get("CONVLENS_SOAK_SEED", "0"))

# Keys that legitimately differ between an interrupted-and-resumed run and an uninterrupted one: times,
# timings, per-run statistics, and part boundaries (a resumed run keeps its journalled parts, so rows are
# split differently across files; rows, features and rejects are compared separately, bit for bit).
VOLATILE = {"created", "previous_created", "updated", "first_built", "manifest_sha256", "seconds", "images_per_s", "run", "build",
            "files", "library_versions", "timings", "reused", "computed"}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _cmd(stage: str, data: Path, store: Path) -> list[str]:
    base = [sys.executable, "-m", "flows.cli", "--no-prefect"]
    if stage == "extract":
        return base + ["extract", str(data), "--store", str(store), "--model", "tiny_models:build", "--weights", "none",
                       "--batch-size", "2", "--part-rows", "4", "--num-workers", "0", "--json"]
    if stage == "index":
        return base + ["index", "--store", str(store), "--json"]
    return base + ["audit", "--store", str(store), "--model", "tiny_models:build", "--methods", "saliency,gradcam",
                   "--n", "4", "--select", "random",
                   "--faith-steps", "4", "--json"]


def _kind(stage: str) -> str:
    return {"extract": "features", "index": "indexes", "audit": "audits"}[stage]


class Reader(threading.Thread):
    """Polls every manifest under the watched stores; each must read and verify (all files' sha256).

    A failure is retried once: a publish between reading the manifest and hashing its files is a legitimate
    race (the newer manifest is then read); the same failure twice is a violation."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stores: list[Path] = []
        self.reads = 0
        self.violations: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for store in list(self.stores):
                for mpath in store.glob(f"*/*/{MANIFEST_NAME}"):
                    self._check(mpath.parent)
            time.sleep(0.05)

    def _check(self, adir: Path) -> None:
        for attempt in range(2):
            try:
                read_manifest(adir, verify=True)
                self.reads += 1
                return
            except StoreError as exc:
                if attempt:
                    self.violations.append(f"{adir}: {exc}")
                time.sleep(0.05)


def _run(stage: str, data: Path, store: Path, timeout: float = 300) -> dict[str, Any]:
    p = subprocess.run(_cmd(stage, data, store), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def _kill_trial(stage: str, data: Path, store: Path, rng: random.Random, total_s: float, locked_s: float) -> str:
    """One victim run killed with SIGKILL at a random moment. Returns 'killed' or 'finished' (ran to the end
    before the kill landed). Half the kills land anywhere in the run (startup included), half inside the
    locked work phase (after the artefact's lock appears), where every write happens."""
    proc = subprocess.Popen(_cmd(stage, data, store), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        if rng.random() < 0.5:
            deadline = time.monotonic() + rng.uniform(0.2, total_s)
        else:
            kind_dir = store / _kind(stage)
            t0 = time.monotonic()
            while proc.poll() is None and not list(kind_dir.glob(f"*/{LOCK_NAME}")) and time.monotonic() - t0 < 120:
                time.sleep(0.002)
            deadline = time.monotonic() + rng.uniform(0.0, locked_s)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode == 0, err[-3000:]
            return "finished"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _timed(stage: str, data: Path, store: Path) -> tuple[float, float]:
    """Run to completion; return (total seconds, seconds the artefact lock was held)."""
    proc = subprocess.Popen(_cmd(stage, data, store), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    locked_at = None
    kind_dir = store / _kind(stage)
    while proc.poll() is None:
        if locked_at is None and list(kind_dir.glob(f"*/{LOCK_NAME}")):
            locked_at = time.monotonic()
        time.sleep(0.002)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    t1 = time.monotonic()
    return t1 - t0, max(0.05, t1 - (locked_at or t0))


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _no_debris(store: Path) -> None:
    assert not [p for p in store.rglob(f"{TMP_PREFIX}*")], "temp files left after a completed run"
    assert not list(store.rglob(LOCK_NAME)), "lock left after a completed run"
    assert not list(store.rglob("journal.json")), "journal left after a completed run"


def logical_features(store: Path) -> dict[str, Any]:
    """Everything a reader can observe of the feature artefact, independent of part boundaries."""
    fid, m = Store(store).resolve("features")
    fdir = Store(store).artefact_dir("features", fid)
    meta, feats = load_features(fdir, m)
    order = np.argsort(meta["path"].to_numpy(), kind="stable")
    rej = part_entries(m, "rejects")[0]
    return {
        "id": fid,
        "rows": [tuple(map(str, r)) for r in meta.iloc[order].drop(columns=[]).itertuples(index=False)],
        "features": feats[order].tobytes(),
        "rejects": rej["sha256"],
        "manifest": _strip(m),
        "rows_in_parts": sum(e["rows"] for e in part_entries(m)),
    }


def logical_index(store: Path) -> dict[str, Any]:
    import faiss

    from storage.index_store import load_index_bytes, read_idmap

    iid, m = Store(store).resolve("indexes")
    idir = Store(store).artefact_dir("indexes", iid)
    index = faiss.deserialize_index(np.frombuffer(load_index_bytes(idir, m), np.uint8))
    vecs = index.reconstruct_n(0, index.ntotal)
    idmap = read_idmap(idir, m)
    by_path = {p: (i, vecs[r].tobytes()) for r, p, i in zip(idmap["row"], idmap["path"], idmap["image_id"])}
    return {"id": iid, "vectors": dict(sorted(by_path.items())), "manifest": _strip(m), "ntotal": index.ntotal}


def logical_audit(store: Path) -> dict[str, Any]:
    """Maps and overlays by sha256; the scores table less its per-run columns (``runtime_s``, ``created``)."""
    from storage.audits import read_scores

    aid, m = Store(store).resolve("audits")
    read_manifest(Store(store).artefact_dir("audits", aid), verify=True)
    files = sorted((e.get("role", ""), e["sha256"]) for e in m["files"] if e.get("role") != "scores")
    scores, _ = read_scores(str(store), aid)
    scores = scores.drop(columns=["runtime_s", "created"]).sort_values(["image_id", "method", "target"])
    return {"id": aid, "files": files, "scores": scores.to_json(orient="records", double_precision=15),
            "manifest": _strip(m)}


LOGICAL = {"extract": logical_features, "index": logical_index, "audit": logical_audit}


def test_kill9_soak_store_identical_to_uninterrupted_run(tmp_path):
    data = make_color_dataset(tmp_path / "data", per_class=6, size=(40, 32), splits=("train", "test"))
    (data / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg")  # a rejects row too
    rng = random.Random(SEED)
    reader = Reader()
    reader.start()
    ref = tmp_path / "ref"
    reader.stores.append(ref)
    timing: dict[str, tuple[float, float]] = {}
    expected: dict[str, Any] = {}
    for stage in ("extract", "index", "audit"):
        timing[stage] = _timed(stage, data, ref)
        expected[stage] = LOGICAL[stage](ref)
    _no_debris(ref)
    if FULL:  # a no-op rerun of every stage changes nothing a reader can see
        for stage in ("extract", "index", "audit"):
            _run(stage, data, ref)
            assert LOGICAL[stage](ref) == expected[stage]

    stats = {stage: {"killed": 0, "finished": 0, "rounds": 0} for stage in KILLS}
    round_no = 0
    store = None
    for stage in ("extract", "index", "audit"):
        while stats[stage]["killed"] < KILLS[stage]:
            if store is None:  # a fresh round: earlier stages' artefacts copied from the reference, this one empty
                round_no += 1
                store = tmp_path / f"round-{round_no}"
                store.mkdir()
                for earlier in ("extract", "index", "audit")[: ("extract", "index", "audit").index(stage)]:
                    shutil.copytree(ref / _kind(earlier), store / _kind(earlier))
                if (ref / "cache").is_dir():
                    shutil.copytree(ref / "cache", store / "cache")
                reader.stores.append(store)
            outcome = _kill_trial(stage, data, store, rng, *timing[stage])
            stats[stage][outcome] += 1
            if outcome == "finished" or stats[stage]["killed"] >= KILLS[stage]:
                _run(stage, data, store)  # rerun to completion
                _no_debris(store)
                got = LOGICAL[stage](store)
                for key in expected[stage]:
                    assert got[key] == expected[stage][key], f"{stage}: {key} differs after kill -9 and resume"
                for earlier in ("extract", "index", "audit")[: ("extract", "index", "audit").index(stage)]:
                    assert LOGICAL[earlier](store) == expected[earlier]
                stats[stage]["rounds"] += 1
                store = None
    reader.stop.set()
    reader.join(10)
    summary = {"trials_killed": sum(s["killed"] for s in stats.values()), "per_stage": stats,
               "reader_reads": reader.reads, "violations": len(reader.violations), "seed": SEED}
    print("SOAK", json.dumps(summary))
    (tmp_path / "soak-summary.json").write_text(json.dumps(summary))
    assert reader.violations == []
    assert reader.reads > 0
    assert summary["trials_killed"] == sum(KILLS.values())


def _wait_for(pred, timeout: float = 120.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.005)
    return False


def _sigterm_mid_run(data: Path, store: Path, env: dict[str, str], prefect: bool) -> subprocess.CompletedProcess:
    cmd = _cmd("extract", data, store)
    cmd[cmd.index("--no-prefect")] = "--prefect" if prefect else "--no-prefect"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: list((store / "features").glob("*/journal.json")) or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before it could be interrupted; use more images"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigterm_stops_cleanly_releases_lock_and_resumes(tmp_path):
    data = make_color_dataset(tmp_path / "data", per_class=20, size=(40, 32), splits=("",))
    store = tmp_path / "store"
    p = _sigterm_mid_run(data, store, _env(), prefect=False)
    assert p.returncode == 143, p.stderr[-2000:]
    assert "terminated (SIGTERM)" in p.stderr and "rerun to resume" in p.stderr
    fdir = next((store / "features").iterdir())
    assert not (fdir / LOCK_NAME).exists()  # released in finally, not left for stale-lock reclaim
    assert not list(store.rglob(f"{TMP_PREFIX}*"))
    assert not (fdir / MANIFEST_NAME).exists()  # nothing half-published
    journalled = json.loads((fdir / "journal.json").read_text())["parts"]
    assert journalled, "finished parts are journalled"
    summary = _run("extract", data, store)
    assert summary["rows"] == 60 and summary["extracted"] == 60 - sum(e["rows"] for e in journalled)  # resumed
    _no_debris(store)


def test_sigterm_prefect_flow_run_ends_crashed_not_running(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect test harness sets an API URL"
    data = make_color_dataset(tmp_path / "data", per_class=20, size=(40, 32), splits=("",))
    store = tmp_path / "store"
    p = _sigterm_mid_run(data, store, _env(PREFECT_API_URL=url), prefect=True)
    assert p.returncode in (143, -signal.SIGTERM), p.stderr[-3000:]
    fdir = next((store / "features").iterdir())
    assert not (fdir / LOCK_NAME).exists()
    assert not (fdir / MANIFEST_NAME).exists()
    assert not list(store.rglob(f"{TMP_PREFIX}*"))

    async def states() -> list[tuple[str, dict]]:
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return [(r.state.type.value, r.parameters) for r in runs if (r.parameters.get("cfg") or {}).get("store") == str(store)]

    import asyncio

    got = asyncio.run(states())
    assert len(got) == 1, got
    print("SIGTERM-PREFECT", json.dumps({"returncode": p.returncode, "state": got[0][0]}))
    assert got[0][0] in ("CRASHED", "CANCELLED"), got
    summary = _run("extract", data, store)  # the next run resumes and completes
    assert summary["rows"] == 60 and summary["extracted"] < 60
    _no_debris(store)
