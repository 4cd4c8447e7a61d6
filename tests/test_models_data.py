"""Own models and own data: factories, TorchScript, safetensors, timm, `layers`, fsspec (memory, file, S3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_color_dataset
from storage.features import load_features, read_meta
from storage.paths import Store
from tasks.core.models import ModelError, load_model
from tasks.extract.features import ExtractConfig, run_extraction
from tiny_models import TinyNet


def extract(data, store, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    kw.setdefault("weights", "none")
    return run_extraction(ExtractConfig(data=str(data), store=str(store), **kw))


def feats_of(store, m):
    meta, f = load_features(Store(store).artefact_dir("features", m["artefact_id"]), m)
    order = np.argsort(meta["path"].to_numpy())
    return meta.iloc[order].reset_index(drop=True), f[order]


@pytest.fixture
def small_data(tmp_path):
    return make_color_dataset(tmp_path / "data", per_class=2, splits=("",))


def test_factory_with_weights_prefix_and_key_report(tmp_path, small_data, store_dir):
    torch.manual_seed(1)
    net = TinyNet()
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    with pytest.raises(ModelError, match="missing.*unexpected.*--weights-prefix"):
        load_model("tiny_models:build", str(tmp_path / "ckpt.pth"))
    lm = load_model("tiny_models:build", str(tmp_path / "ckpt.pth"), weights_prefix="module.")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(lm.module.state_dict()[k], v)
    assert lm.spec["num_params"] == sum(p.numel() for p in net.parameters())
    m = extract(small_data, store_dir, model="tiny_models:build", weights=str(tmp_path / "ckpt.pth"),
                weights_prefix="module.", layer="penultimate")
    assert m["dim"] == 16 and m["rows"] == 6 and m["model"]["source"] == "factory"
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        load_model("tiny_models:not_a_model", "none")
    with pytest.raises(ModelError, match="cannot import"):
        load_model("no_such_pkg.models:build", "none")


def test_torchscript_and_safetensors_give_same_features(tmp_path, small_data):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    net = TinyNet().eval()
    from tiny_models import TinyFeatures

    torch.jit.save(torch.jit.script(TinyFeatures(net).eval()), tmp_path / "model.pt")
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match="TorchScript"):
        extract(small_data, tmp_path / "s1", model=str(tmp_path / "model.pt"), layer="net.fc1")
    m_ts = extract(small_data, tmp_path / "s1", model=str(tmp_path / "model.pt"))
    assert m_ts["layer"]["alias"] == "output" and m_ts["dim"] == 16
    m_st = extract(small_data, tmp_path / "s2", model="tiny_models:build", weights=str(tmp_path / "w.safetensors"),
                   layer="penultimate")
    assert m_ts["model"]["source"] == "torchscript"
    _, f1 = feats_of(tmp_path / "s1", m_ts)
    _, f2 = feats_of(tmp_path / "s2", m_st)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)


def test_pickled_full_module_is_refused(tmp_path):
    torch.save(TinyNet(), tmp_path / "full.pth")
    with pytest.raises(ModelError, match="state_dict"):
        load_model("tiny_models:build", str(tmp_path / "full.pth"))
    with pytest.raises(ModelError, match="pickled full model is refused"):
        load_model(str(tmp_path / "full.pth"), "none")


def test_timm_models_and_cls_alias(small_data, store_dir):
    pytest.importorskip("timm")
    m = extract(small_data, store_dir, model="timm:resnet18", crop=64, resize=72)
    assert m["dim"] == 512 and m["preprocessing"]["crop"] == 64 and m["model"]["source"] == "timm"
    lm = load_model("timm:vit_tiny_patch16_224", "none")
    assert lm.preprocess.interpolation == "bicubic" and lm.preprocess.mean == (0.5, 0.5, 0.5)
    from tasks.core.hooks import capture, resolve_layer

    for alias, name in (("cls", "norm"), ("penultimate", "head")):
        ref = resolve_layer(lm.module, alias)
        assert ref.name == name
        with capture(lm.module, ref) as acts, torch.no_grad():
            lm.module(torch.rand(2, 3, 224, 224))
        assert acts[alias].shape == (2, 192)
    with pytest.raises(ModelError, match="unknown timm model"):
        load_model("timm:not_a_model_xyz", "none")


def test_layers_command_output(capsys):
    from flows.cli import main

    assert main(["layers", "--model", "alexnet"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "1x64x55x55" in out and "fc7          -> classifier.5" in out
    assert main(["layers", "--model", "resnet18", "--depth", "0"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "1x512x7x7" in out and "penultimate  -> fc (input)" in out
    assert main(["layers", "--model", "timm:vit_tiny_patch16_224", "--depth", "0"]) == 0
    out = capsys.readouterr().out
    assert "1x197x192" in out and "cls          -> norm (output, token 0)" in out


def test_preprocessing_override_recorded(small_data, store_dir):
    m = extract(small_data, store_dir, model="resnet18", resize=80, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                interpolation="bicubic")
    assert m["preprocessing"] == {"resize": 80, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                  "interpolation": "bicubic", "decode": "jpeg-draft"}
    with pytest.raises(ValueError, match="larger than"):
        extract(small_data, store_dir, model="resnet18", resize=32, crop=64)


def test_fsspec_memory_and_file_urls_match_local(small_data, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in small_data.rglob("*.png"):
        fs.pipe(f"/convlens-test/ds/{p.relative_to(small_data)}", p.read_bytes())
    m_local = extract(small_data, tmp_path / "a", model="resnet18", crop=64, resize=64)
    m_mem = extract("memory://convlens-test/ds", tmp_path / "b", model="resnet18", crop=64, resize=64)
    m_file = extract(f"file://{small_data}", tmp_path / "c", model="resnet18", crop=64, resize=64)
    (ml, fl), (mm, fm), (mf, ff) = feats_of(tmp_path / "a", m_local), feats_of(tmp_path / "b", m_mem), feats_of(tmp_path / "c", m_file)
    assert list(ml["path"]) == list(mm["path"]) == list(mf["path"])
    assert list(ml["image_id"]) == list(mm["image_id"])
    assert list(ml["label"]) == list(mm["label"])
    np.testing.assert_array_equal(fl, fm)
    np.testing.assert_array_equal(fl, ff)


def test_s3_end_to_end_with_list_columns_and_cross_bucket_reuse(s3_server, small_data, tmp_path, store_dir):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("bucket-a")
    fs.mkdir("bucket-b")
    files = sorted(small_data.rglob("*.png"))
    for p in files:
        fs.put_file(str(p), f"bucket-a/imgs/{p.relative_to(small_data)}")
    rel = [f"imgs/{p.relative_to(small_data)}" for p in files]
    lst = pd.DataFrame({"path": rel, "label": [p.parent.name for p in files],
                        "source": ["cam-1", "cam-2"] * (len(files) // 2), "captured_at": ["2026-11-01"] * len(files)})
    fs.pipe("bucket-a/list.csv", lst.to_csv(index=False).encode())
    m = extract("s3://bucket-a/list.csv", store_dir, model="resnet18", crop=64, resize=64)
    meta = read_meta(Store(store_dir).artefact_dir("features", m["artefact_id"]), m)
    assert m["rows"] == len(files) and m["extra_columns"] == ["captured_at", "source"]
    assert dict(zip(meta["path"], meta["source"])) == dict(zip(lst["path"], lst["source"]))
    # copy the images to another bucket: same content hashes -> nothing re-extracted
    fs.copy("bucket-a/imgs", "bucket-b/imgs", recursive=True)
    m2 = extract("s3://bucket-b/imgs", store_dir, model="resnet18", crop=64, resize=64)
    assert m2["rows"] == len(files) and m2["run"]["extracted"] == 0
    meta2 = read_meta(Store(store_dir).artefact_dir("features", m2["artefact_id"]), m2)
    assert set(meta2["image_id"]) == set(meta["image_id"])
    assert set(meta2["label"]) == {"red", "green", "blue"}
