"""Feature extraction into the Parquet store: inputs, schema, manifest, incremental runs, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_color_dataset
from images_factory import write_bad_images, write_odd_images
from storage.errors import QualityGateError
from storage.features import load_features, part_entries, read_meta
from storage.manifest import read_manifest
from storage.paths import Store
from tasks.core.models import ModelError, load_model
from tasks.extract.features import ExtractConfig, run_extraction
from tiny_models import extract_config

MODEL = "mobilenet_v3_small"  # cheapest torchvision classifier; random weights, seeded


def extract(data, store, **kw):
    kw.setdefault("model", MODEL)
    return run_extraction(extract_config(data, store, **kw))


def adir(store, m):
    return Store(store).artefact_dir("features", m["artefact_id"])


def test_folder_labels_splits_schema_and_manifest(color_dataset, store_dir):
    m = extract(color_dataset, store_dir)
    d = adir(store_dir, m)
    meta, feats = load_features(d, m)
    assert m["rows"] == 24 and len(meta) == 24
    assert set(meta["label"]) == {"red", "green", "blue"}
    assert set(meta["split"]) == {"train", "test"}
    assert feats.shape == (24, 1024) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert (meta["width"] == 48).all() and (meta["height"] == 40).all()
    # image_id is the sha256 of the file's bytes
    import hashlib

    row = meta.iloc[0]
    assert row["image_id"] == hashlib.sha256((color_dataset / row["path"]).read_bytes()).hexdigest()
    # schema per the store contract
    part = d / part_entries(m)[0]["name"]
    schema = pq.read_schema(part)
    assert str(schema.field("feature").type) == "fixed_size_list<element: float>[1024]"
    assert str(schema.field("pred_top5").type).startswith("fixed_size_list<element: int32>[5]")
    # manifest: written last, lists every file with sha256, records model/layer/preprocessing/versions
    on_disk = read_manifest(d, verify=True)
    assert on_disk == m
    assert m["model"]["arch"] == MODEL and m["model"]["weights"] == "none" and m["model"]["seed"] == 0
    assert m["layer"] == {"alias": "penultimate", "name": "classifier.3", "side": "input"}
    assert m["preprocessing"]["crop"] == 224 and m["preprocessing"]["resize"] == 256
    assert {"torch", "pyarrow", "numpy"} <= set(m["library_versions"])
    assert m["dim"] == 1024 and m["rejects"] == 0 and m["code_version"]
    assert not (d / "journal.json").exists() and not (d / ".lock").exists()


def test_features_match_direct_forward(color_dataset, store_dir):
    """The stored feature equals the model's own penultimate activation for that image."""
    m = extract(color_dataset, store_dir)
    meta, feats = load_features(adir(store_dir, m), m)
    lm = load_model(MODEL, "none", seed=0)
    from PIL import Image
    from torchvision.transforms import functional as F

    img = Image.open(color_dataset / meta.iloc[3]["path"]).convert("RGB")
    x = F.normalize(F.to_tensor(F.center_crop(F.resize(img, [256]), [224])), lm.preprocess.mean, lm.preprocess.std)
    got = {}
    h = lm.module.classifier[3].register_forward_pre_hook(lambda m_, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        lm.module(x[None])
    h.remove()
    np.testing.assert_allclose(feats[3], got["x"][0].numpy(), rtol=1e-4, atol=1e-5)


def test_csv_and_parquet_lists_with_extra_columns(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "imgs", per_class=2, splits=("",))
    files = sorted(p.relative_to(tmp_path) for p in data.rglob("*.png"))
    df = pd.DataFrame({"path": [str(f) for f in files], "label": [f.parent.name for f in files],
                       "split": ["train"] * len(files), "group": [f"g{i % 2}" for i in range(len(files))]})
    df.to_csv(tmp_path / "list.csv", index=False)
    df.to_parquet(tmp_path / "list.parquet")
    for lst in ("list.csv", "list.parquet"):
        m = extract(tmp_path / lst, store_dir)
        meta = read_meta(adir(store_dir, m), m)
        assert m["rows"] == len(files)
        assert sorted(meta["path"]) == sorted(df["path"])
        assert dict(zip(meta["path"], meta["group"])) == dict(zip(df["path"], df["group"]))
        assert m["extra_columns"] == ["group"]


def test_list_entry_escaping_root_is_rejected(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "lists" / "imgs", per_class=2, splits=("",))
    outside = tmp_path / "secret.png"
    shutil.copy(next(data.rglob("*.png")), outside)
    rows = [str(p.relative_to(tmp_path / "lists")) for p in data.rglob("*.png")] + ["../secret.png", str(outside)]
    pd.DataFrame({"path": rows}).to_csv(tmp_path / "lists" / "l.csv", index=False)
    m = extract(tmp_path / "lists" / "l.csv", store_dir, max_reject_rate=0.5)
    rej = pq.read_table(adir(store_dir, m) / part_entries(m, "rejects")[0]["name"]).to_pandas()
    assert sorted(rej["reason"]) == ["outside-root", "outside-root"]
    assert m["rows"] == 6


def test_incremental_add_delete_rename(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "d", per_class=3)
    m1 = extract(data, store_dir)
    assert m1["run"]["extracted"] == 18
    m2 = extract(data, store_dir)
    assert m2["run"]["extracted"] == 0 and m2["rows"] == 18
    # add k=2 new images, delete one, rename one
    extra = make_color_dataset(tmp_path / "x", per_class=1, splits=("train",), seed=7)
    new = sorted(extra.rglob("*.png"))[:2]
    for p in new:
        shutil.copy(p, data / "train" / p.parent.name / ("new_" + p.name))
    victims = sorted((data / "test" / "red").glob("*.png"))
    victims[0].unlink()
    victims[1].rename(victims[1].with_name("renamed.png"))
    meta2, f_before = load_features(adir(store_dir, m2), m2)
    old = f_before[list(meta2["path"]).index(f"test/red/{victims[1].name}")]
    m3 = extract(data, store_dir)
    assert m3["run"]["extracted"] == 2
    meta3, f3 = load_features(adir(store_dir, m3), m3)
    assert m3["rows"] == 19 and len(meta3) == 19
    paths = set(meta3["path"])
    assert "test/red/renamed.png" in paths and f"test/red/{victims[0].name}" not in paths
    # the renamed file kept its stored feature bit for bit
    np.testing.assert_array_equal(f3[list(meta3["path"]).index("test/red/renamed.png")], old)
    assert m3["run"]["removed"] == 2 and m3["run"]["added_paths"] == 3


def test_duplicate_files_share_one_extraction(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    src = sorted(data.rglob("*.png"))[0]
    shutil.copy(src, data / "red" / "copy.png")
    m = extract(data, store_dir)
    meta, feats = load_features(adir(store_dir, m), m)
    assert m["run"]["extracted"] == 6 and m["rows"] == 7 and m["unique_images"] == 6
    a, b = (meta["image_id"] == meta.loc[meta["path"] == "red/copy.png", "image_id"].iloc[0]).to_numpy().nonzero()[0]
    np.testing.assert_array_equal(feats[a], feats[b])


def test_bad_images_become_rejects_and_odd_images_are_normalised(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "d", per_class=8, splits=("",))
    bad = write_bad_images(data / "bad")
    odd = write_odd_images(data / "odd")
    m = extract(data, store_dir, max_reject_rate=0.5)
    d = adir(store_dir, m)
    rej = pq.read_table(d / part_entries(m, "rejects")[0]["name"]).to_pandas()
    got = dict(zip(rej["path"], rej["reason"]))
    for name, (path, reason) in bad.items():
        rel = str(path.relative_to(data))
        assert got.get(rel) == reason, (name, got.get(rel), reason)
    meta = read_meta(d, m)
    for name, path in odd.items():
        assert str(path.relative_to(data)) in set(meta["path"]), name
    exif = meta[meta["path"] == "odd/exif_rotated.jpg"].iloc[0]
    assert (exif["width"], exif["height"]) == (48, 64)  # rotated by EXIF orientation 6
    assert m["rejects"] == len(bad)


def test_reject_rate_threshold_keeps_previous_manifest(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    m1 = extract(data, store_dir)
    for i in range(3):
        (data / f"junk{i}.jpg").write_text("not an image")
    with pytest.raises(QualityGateError, match="max-reject-rate"):
        extract(data, store_dir, max_reject_rate=0.2)
    assert read_manifest(adir(store_dir, m1)) == m1


def test_layer_aliases_on_zoo_models():
    from tasks.core.hooks import capture, resolve_layer

    cases = {
        ("alexnet", "fc7"): ("classifier.5", 4096), ("alexnet", "fc6"): ("classifier.2", 4096),
        ("vgg11", "fc7"): ("classifier.4", 4096), ("vgg11", "fc6"): ("classifier.1", 4096),
        ("mobilenet_v2", "penultimate"): ("classifier.1", 1280), ("resnet18", "penultimate"): ("fc", 512),
        ("alexnet", None): ("classifier.5", 4096), ("resnet18", None): ("fc", 512),
        ("resnet18", "layer3"): ("layer3", 256),
    }
    from tasks.core.forward import pool_features

    x = torch.rand(2, 3, 64, 64)
    for (arch, alias), (name, dim) in cases.items():
        lm = load_model(arch, "none")
        ref = resolve_layer(lm.module, alias)
        assert ref.name == name, (arch, alias, ref)
        with capture(lm.module, ref) as acts, torch.no_grad():
            lm.module(x)
        feats = pool_features(acts[ref.alias], "avg")
        assert feats.shape == (2, dim), (arch, alias, feats.shape)
        if alias in ("fc6", "fc7"):
            assert (feats >= 0).all()  # after the ReLU
    with pytest.raises(ModelError, match="fc7"):
        resolve_layer(load_model("resnet18", "none").module, "fc7")


def test_clear_errors_unknown_model_layer_missing_weights(tmp_path, color_dataset, store_dir, monkeypatch):
    with pytest.raises(ModelError, match="unknown model 'resnet9000'"):
        load_model("resnet9000", "none")
    with pytest.raises(ModelError, match="unknown layer 'nope'"):
        extract(color_dataset, store_dir, layer="nope")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(ModelError, match="never downloads"):
        load_model("resnet18", "imagenet")


def test_weights_file_sha256_recorded_and_pickles_refused(tmp_path, color_dataset, store_dir):
    lm = load_model(MODEL, "none", seed=3)
    wpath = tmp_path / "w.pth"
    torch.save(lm.module.state_dict(), wpath)
    import hashlib

    m = extract(color_dataset, store_dir, weights=str(wpath))
    assert m["model"]["weights_sha256"] == hashlib.sha256(wpath.read_bytes()).hexdigest()
    # a pickle that would run code is refused, and the code does not run
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, evil)
    with pytest.raises(ModelError, match="weights_only"):
        load_model(MODEL, str(evil))
    assert not marker.exists()
    # a state dict for another architecture: clear key report
    torch.save(load_model("resnet18", "none").module.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_model(MODEL, str(tmp_path / "r18.pth"))


def test_parquet_reads_with_pandas_pyarrow_duckdb(color_dataset, store_dir):
    m = extract(color_dataset, store_dir)
    part = adir(store_dir, m) / part_entries(m)[0]["name"]
    df = pd.read_parquet(part)
    t = pq.read_table(part)
    assert len(df) == t.num_rows == 24
    assert len(df["feature"].iloc[0]) == 1024
    duckdb = pytest.importorskip("duckdb")
    n, d = duckdb.sql(f"select count(*), max(len(feature)) from read_parquet('{part}')").fetchall()[0]
    assert (n, d) == (24, 1024)


def test_cli_extract_and_info(color_dataset, store_dir, capsys):
    from flows.cli import main

    rc = main(["--no-prefect", "extract", str(color_dataset), "--store", str(store_dir), "--model", MODEL,
               "--weights", "none", "--json", "--num-workers", "0"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 24 and out["dim"] == 1024
    assert main(["info", "--store", str(store_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info[0]["kind"] == "features" and info[0]["rows"] == 24 and info[0]["layer"] == "classifier.3"
    assert main(["extract", str(color_dataset), "--store", str(store_dir), "--model", "nope", "--weights", "none"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_flow_runs_through_prefect_server(prefect_server, color_dataset, store_dir):
    from flows.extract_features import extract_features

    summary = extract_features(ExtractConfig(str(color_dataset), store=str(store_dir), model=MODEL, weights="none",
                                             num_workers=0))
    assert summary["rows"] == 24 and summary["extracted"] == 24
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    assert any(r.name and r.state and r.state.is_completed() for r in runs)


def test_unchanged_rerun_keeps_the_manifest_and_a_change_republishes(color_dataset, store_dir):
    import shutil as _sh

    from storage.manifest import MANIFEST_NAME
    from tasks.extract.features import ExtractConfig, run_extraction

    cfg = ExtractConfig(data=str(color_dataset), store=str(store_dir), model="resnet18", weights="none", progress=False)
    m1 = run_extraction(cfg)
    mfile = store_dir / "features" / m1["artefact_id"] / MANIFEST_NAME
    before = mfile.read_bytes()
    m2 = run_extraction(cfg)
    assert m2["run"]["extracted"] == 0 and m2["run"].get("unchanged") is True
    assert m2["created"] == m1["created"] and mfile.read_bytes() == before  # later stages' cache keys hold
    # a relabel (file moved to another class folder, same bytes) is a change: republished, nothing extracted
    src = next((color_dataset / "train" / "red").glob("*.png"))
    _sh.move(src, color_dataset / "train" / "blue" / src.name)
    m3 = run_extraction(cfg)
    assert m3["run"]["extracted"] == 0 and not m3["run"].get("unchanged")
    assert mfile.read_bytes() != before and m3["labels"]["blue"] == m1["labels"]["blue"] + 1
