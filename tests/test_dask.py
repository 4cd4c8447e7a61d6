"""Scale-out: the sharded flows on a 2-worker Dask LocalCluster publish what the local runner publishes.

Tiny hand-built model (``tiny_models:build``, seeded weights) and generated images. The LocalCluster uses two
single-threaded workers inside this process (``processes=False``): the same scheduler, task graph and
serialisation boundary as a process cluster, started in a fraction of the time.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_color_dataset
from storage.features import load_features
from storage.manifest import read_manifest
from storage.paths import Store

MODEL = "tiny_models:build"


def dask_runner():
    from flows.runners import make_task_runner

    return make_task_runner("dask", workers=2, threads=1, processes=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dask")
    data = make_color_dataset(root / "data", per_class=5, size=(40, 36))  # 30 images
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return data


def _features(store: Path, manifest: dict) -> tuple[pd.DataFrame, np.ndarray]:
    return load_features(Store(store).artefact_dir("features", manifest["artefact_id"]), verify=True)


def _extract_kwargs(data: Path, store: Path) -> dict:
    from tasks.extract.features import ExtractConfig

    return dict(cfg=ExtractConfig(data=str(data), store=str(store), model=MODEL, weights="none", batch_size=4, num_workers=0))


@pytest.fixture(scope="module")
def local_and_dask(dataset, tmp_path_factory, prefect_server):
    """The extraction flow run twice: default runner, and a 2-worker Dask cluster with shards of 8 images."""
    from flows.extract_features import extract_features

    root = tmp_path_factory.mktemp("stores")
    local = extract_features(**_extract_kwargs(dataset, root / "local"))
    dask = extract_features.with_options(task_runner=dask_runner())(**_extract_kwargs(dataset, root / "dask"),
                                                                     shard_size=8)
    return root, local, dask


def test_shard_bounds_align_to_batches():
    from tasks.core.sharding import shard_bounds

    assert shard_bounds(30, 8, align=4) == [(0, 8), (8, 16), (16, 24), (24, 30)]
    assert shard_bounds(30, 6, align=4) == [(0, 8), (8, 16), (16, 24), (24, 30)]  # rounded up to the batch
    assert shard_bounds(0, 8) == []
    auto = shard_bounds(100_000, None, align=64)
    assert all((e - s) % 64 == 0 for s, e in auto[:-1]) and auto[-1][1] == 100_000 and len(auto) >= 16
    with pytest.raises(ValueError, match="shard-size"):
        shard_bounds(10, 0)


def test_dask_extraction_publishes_the_local_store(local_and_dask):
    root, local, dask = local_and_dask
    assert local["artefact_id"] == dask["artefact_id"]
    assert local["rows"] == dask["rows"] == 30 and local["rejects"] == dask["rejects"] == 1
    assert dask["extracted"] == 30
    lm, lf = _features(root / "local", local)
    dm, df = _features(root / "dask", dask)
    assert list(lm["image_id"]) == list(dm["image_id"]) and list(lm["path"]) == list(dm["path"])
    assert lf.dtype == df.dtype == np.float32 and np.array_equal(lf, df)  # bit for bit
    cols = ["image_id", "path", "label", "split", "width", "height"]
    pd.testing.assert_frame_equal(lm[cols], dm[cols])
    assert np.array_equal(np.stack(lm["pred_top5"]), np.stack(dm["pred_top5"]))
    man = read_manifest(Store(root / "dask").artefact_dir("features", dask["artefact_id"]), verify=True)
    assert len([f for f in man["files"] if f["role"] == "part"]) == 4  # one part per shard (30 rows / 8)
    rej = [f for f in man["files"] if f["role"] == "rejects"]
    assert len(rej) == 1 and not (Store(root / "dask").artefact_dir("features", dask["artefact_id"]) / "journal.json").exists()


def test_sharded_rerun_is_incremental(local_and_dask, dataset, tmp_path):
    """Shards on the default (thread pool) runner; a rerun after adding images extracts only the new ones,
    shard by shard, keeping the stored rows."""
    import shutil

    from flows.extract_features import extract_features

    root, _, dask = local_and_dask
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    store = tmp_path / "store"
    first = extract_features(**_extract_kwargs(data, store), shard_size=8)
    assert first["extracted"] == 30
    extra = make_color_dataset(tmp_path / "more", per_class=1, size=(40, 36), splits=("new",), seed=7)
    shutil.copytree(extra / "new", data / "new")
    again = extract_features(**_extract_kwargs(data, store), shard_size=8)
    assert again["extracted"] == 3 and again["rows"] == 33
    meta, feats = _features(store, again)
    dm, df = _features(root / "dask", dask)
    # the 30 first-run rows are kept as they were: same features as the dask run's store, path for path
    pos = {p: i for i, p in enumerate(meta["path"])}
    idx = [pos[p] for p in dm["path"]]
    assert np.array_equal(feats[idx], df) and list(meta["image_id"].iloc[idx]) == list(dm["image_id"])
    assert set(meta["path"]) - set(dm["path"]) == {f"new/{c}/{c}_new_0.png" for c in ("red", "green", "blue")}
    same = extract_features(**_extract_kwargs(data, store), shard_size=8)
    assert same["extracted"] == 0 and same["rows"] == 33  # nothing new: no shard, same rows republished


def test_killed_sharded_run_publishes_nothing_and_resumes_from_finished_shards(dataset, tmp_path):
    """A shard failure after one shard finished: no manifest, that shard's parts journalled; the rerun extracts
    only the other shards' images and publishes the full store."""
    from storage.features import read_journal
    from storage.manifest import MANIFEST_NAME
    from tasks.extract.sharding import extract_shard, run_sharded_extraction

    cfg = replace(_extract_kwargs(dataset, tmp_path / "store")["cfg"], progress=False)

    def dies_after_first(jobs):
        yield 0, extract_shard(jobs[0])
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_sharded_extraction(cfg, dies_after_first, shard_size=8)
    adir = next((tmp_path / "store" / "features").iterdir())
    assert not (adir / MANIFEST_NAME).exists() and not (adir / ".lock").exists()
    journalled = read_journal(adir)["parts"]
    assert sum(e["rows"] for e in journalled) == 8
    m = run_sharded_extraction(cfg, shard_size=8)
    assert m["run"]["extracted"] == 30 - 8 and m["rows"] == 30


def test_cli_runner_arguments():
    from flows.runners import make_task_runner

    assert make_task_runner("local") is None
    with pytest.raises(ValueError, match="--runner"):
        make_task_runner("spark")
    with pytest.raises(ValueError, match="need --runner dask"):
        make_task_runner("local", workers=2)
    with pytest.raises(ValueError, match="dask-workers"):
        make_task_runner("dask", workers=0)
    r = make_task_runner("dask", address="tcp://127.0.0.1:8786")
    assert type(r).__name__ == "DaskTaskRunner"
    from flows.cli import build_parser

    args = build_parser().parse_args(["extract", "d", "--runner", "dask", "--dask-workers", "3", "--shard-size", "64"])
    assert (args.runner, args.dask_workers, args.shard_size, args.dask_address) == ("dask", 3, 64, None)


def test_dask_max_activations_equal_local(local_and_dask):
    """Per channel top-k (image, activation, unit, box) from 2 shards on Dask == the one-process pass."""
    from flows.neurons import neurons
    from storage.neurons import read_table

    root, _, _ = local_and_dask
    params = {"layer": "conv", "k": 4, "batch_size": 16, "png_channels": 2,  # 30 images: in-process decode
              "model": MODEL}  # the features name a factory: the user names it to let it run
    local = neurons(technique="max-act", store=str(root / "local"), params=params)
    dask = neurons.with_options(task_runner=dask_runner())(technique="max-act", store=str(root / "dask"), params=params)
    tables = []
    for name, res in (("local", local), ("dask", dask)):
        adir = Store(root / name).artefact_dir("neurons", res["artefact_id"])
        tables.append(read_table(adir, read_manifest(adir, verify=True)))
    lt, dt = tables
    assert len(lt) == 8 * 4 and lt["image_id"].nunique() > 1
    cols = ["channel", "rank", "image_id", "path", "activation", "unit_y", "unit_x", "box_x0", "box_y0", "box_x1", "box_y1"]
    pd.testing.assert_frame_equal(lt[cols].reset_index(drop=True), dt[cols].reset_index(drop=True), check_exact=True)
    assert local["images_scanned"] == dask["images_scanned"] == 30 and local["png_channels"] == dask["png_channels"]


def test_topk_merge_of_shards_equals_streaming_with_ties():
    """Shard top-k tables merged in order == one running top-k, ties (ReLU zeros) included: earlier row first."""
    import torch

    from tasks.neurons.max_activations import TopK

    g = torch.Generator().manual_seed(1)
    act = torch.relu(torch.randn(40, 5, 3, 3, generator=g)).round(decimals=1)  # many exact ties
    act[:, 4] = 0.0  # a dead channel: every image ties
    rows = torch.arange(40)
    one = TopK.empty(5, 6)
    for s in range(0, 40, 4):
        one.update(act[s:s + 4], rows[s:s + 4])
    merged = None
    for s in range(0, 40, 16):
        part = TopK.empty(5, 6)
        for b in range(s, min(40, s + 16), 4):
            part.update(act[b:b + 4], rows[b:b + 4])
        merged = part if merged is None else (merged.merge(part) or merged)
    for name in ("values", "rows", "ys", "xs"):
        assert torch.equal(getattr(one, name), getattr(merged, name)), name
    assert one.rows[4].tolist() == [0, 1, 2, 3, 4, 5]  # dead channel: the first images, in order


def test_dask_attribution_audit_equals_local(local_and_dask):
    """Scores (targets, predictions, deletion/insertion AUC) and the stored maps from 2 shards == one process."""
    from flows.audit import attribution_audit
    from storage.audits import load_map, read_scores

    root, _, _ = local_and_dask
    from tasks.attribution.audit import AuditConfig

    kw = dict(methods=("occlusion", "saliency", "guided", "gradcam"), select="random", n=12, window=112, stride=112,
              faith_steps=2, batch_size=16, device="cpu", model=MODEL)
    local = attribution_audit(AuditConfig(store=str(root / "local"), **kw))
    dask = attribution_audit.with_options(task_runner=dask_runner())(AuditConfig(store=str(root / "dask"), **kw),
                                                                      shard_size=8)
    assert local["computed"] == dask["computed"] == 12 * 4 and local["rows"] == dask["rows"] == 48
    out = []
    for name in ("local", "dask"):
        scores, man = read_scores(root / name)
        scores = scores.sort_values(["image_id", "method", "target"]).reset_index(drop=True)
        maps = np.stack([load_map(root / name, man, f, i) for f, i in zip(scores["map_file"], scores["map_index"])])
        out.append((scores, maps))
    (ls, lmaps), (ds, dmaps) = out
    cols = ["image_id", "path", "method", "params_hash", "target", "target_kind", "pred", "prob", "deletion_auc",
            "insertion_auc", "overlay", "selected_by"]
    pd.testing.assert_frame_equal(ls[cols], ds[cols], check_exact=True)
    assert np.array_equal(lmaps, dmaps) and np.isfinite(lmaps).all() and lmaps.std() > 0
    # one scores part per run, maps written by each shard: 2 map parts on Dask vs 1 locally
    _, dman = read_scores(root / "dask")
    assert sum(f["role"] == "maps" for f in dman["files"]) == 2
    # the sharded rerun reuses every row
    again = attribution_audit.with_options(task_runner=dask_runner())(AuditConfig(store=str(root / "dask"), **kw), shard_size=8)
    assert again["computed"] == 0 and again["reused"] == 48 and again["rows"] == 48


def test_cli_extract_runner_dask_on_an_existing_cluster(dataset, tmp_path, prefect_server, capsys):
    """``convlens extract ... --runner dask --dask-address ADDR`` runs the flow (a flow run is needed) on that
    cluster and publishes the same features as ``--runner local``."""
    import json

    from distributed import LocalCluster

    from flows.cli import main

    common = ["extract", str(dataset), "--model", MODEL, "--weights", "none", "--batch-size", "4", "--num-workers", "0",
              "--json"]
    assert main(["--no-prefect", *common, "--store", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        rc = main([*common, "--store", str(tmp_path / "dask"), "--runner", "dask", "--dask-address",
                   cluster.scheduler_address, "--shard-size", "8"])
        ran = dict(cluster.scheduler.task_prefixes)
    assert rc == 0
    assert "extract_shard_task" in ran  # the shard tasks ran on that cluster
    dask = json.loads(capsys.readouterr().out)
    assert dask["artefact_id"] == local["artefact_id"] and dask["rows"] == local["rows"] == 30
    _, lf = _features(tmp_path / "local", local)
    _, df = _features(tmp_path / "dask", dask)
    assert np.array_equal(lf, df)


@pytest.mark.skipif(not __import__("os").environ.get("CONVLENS_DASK_PROCESSES"),
                    reason="slow: set CONVLENS_DASK_PROCESSES=1 to run on 2 worker processes")
def test_dask_worker_processes_extract_the_local_store(local_and_dask, dataset, tmp_path):
    """Real worker processes (daemonic: decode in-process, 1 OpenMP thread each): same rows, features equal to
    float32 rounding (bit-identity needs the same intra-op thread count as the local run)."""
    from flows.extract_features import extract_features
    from flows.runners import make_task_runner

    root, local, _ = local_and_dask
    runner = make_task_runner("dask", workers=2, threads=1, processes=True)
    res = extract_features.with_options(task_runner=runner)(**_extract_kwargs(dataset, tmp_path / "store"), shard_size=8)
    lm, lf = _features(root / "local", local)
    pm, pf = _features(tmp_path / "store", res)
    assert list(lm["image_id"]) == list(pm["image_id"]) and res["rows"] == 30
    np.testing.assert_allclose(pf, lf, rtol=1e-5, atol=1e-6)
