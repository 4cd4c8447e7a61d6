"""The model identity cache: a no-op extract rerun plans (artefact key and id) without building the model.

Every run here is ``run_extraction`` with a cheap torchvision classifier (random weights, seeded, or a state-dict
file saved from one); ``load_model`` is wrapped to count builds, or replaced to fail when a build must not happen.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_color_dataset
from storage.features import load_features
from storage.manifest import read_manifest
from storage.paths import Store
from tasks.core.models import load_model
from tasks.extract import features as fx
from tasks.extract.features import ExtractConfig, model_for_plan, plan_extraction, run_extraction

MODEL = "mobilenet_v3_small"


def cfg(data: Path, store: Path, **kw) -> ExtractConfig:
    kw.setdefault("model", MODEL)
    kw.setdefault("weights", "none")
    return ExtractConfig(data=str(data), store=str(store), progress=False, num_workers=0, resize=40, crop=32, **kw)


def identity_files(store: Path) -> list[Path]:
    return sorted(Store(store).kind_dir("cache").glob("model-*.json"))


@pytest.fixture()
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts model builds through the planner's ``load_model``."""
    seen: list[str] = []

    def counted(model, weights, *a, **k):
        seen.append(str(weights))
        return load_model(model, weights, *a, **k)

    monkeypatch.setattr(fx, "load_model", counted)
    return seen


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the model was built on a no-op rerun")

    monkeypatch.setattr(fx, "load_model", refuse)


def test_noop_rerun_with_a_warm_cache_builds_no_model(tmp_path: Path, store_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    m1 = run_extraction(cfg(data, store_dir))
    assert m1["run"]["extracted"] == 6
    no_model(monkeypatch)
    m2 = run_extraction(cfg(data, store_dir))
    assert len(identity_files(store_dir)) == 1
    assert m2["run"].get("unchanged") is True and m2["run"]["extracted"] == 0
    assert m2["artefact_id"] == m1["artefact_id"] and m2["created"] == m1["created"]
    assert {k: v for k, v in m2.items() if k != "run"} == {k: v for k, v in m1.items() if k != "run"}


def test_rerun_with_new_image_builds_the_model_and_extracts_only_it(tmp_path: Path, store_dir: Path,
                                                                    builds: list[str]) -> None:
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    m1 = run_extraction(cfg(data, store_dir))
    assert len(builds) == 1
    run_extraction(cfg(data, store_dir))
    assert len(builds) == 1  # the no-op rerun built nothing
    make_color_dataset(tmp_path / "more", per_class=1, splits=("",), seed=7)
    shutil.copy(tmp_path / "more" / "red" / "red__0.png", data / "red" / "new.png")
    m3 = run_extraction(cfg(data, store_dir))
    assert len(builds) == 2
    assert m3["run"]["extracted"] == 1 and m3["rows"] == 7 and m3["artefact_id"] == m1["artefact_id"]
    # a rename needs no extraction but a new manifest: the plan looks like a no-op, the model is built late
    (data / "red" / "new.png").rename(data / "red" / "renamed.png")
    m4 = run_extraction(cfg(data, store_dir))
    assert len(builds) == 3 and m4["run"]["extracted"] == 0 and m4["rows"] == 7
    assert not m4["run"].get("unchanged") and m4["artefact_id"] == m1["artefact_id"]
    meta, _ = load_features(Store(store_dir).artefact_dir("features", m4["artefact_id"]), m4)
    assert "red/renamed.png" in set(meta["path"]) and "red/new.png" not in set(meta["path"])


def test_weights_file_rewritten_with_same_size_and_mtime_is_not_served_from_the_cache(
        tmp_path: Path, store_dir: Path, builds: list[str]) -> None:
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    wfile = tmp_path / "w.pth"
    state = load_model(MODEL, "none", seed=0).module.state_dict()
    torch.save(state, wfile)
    m1 = run_extraction(cfg(data, store_dir, weights=str(wfile)))
    st = wfile.stat()
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "w.pth"  # torch.save names the archive's records after the file: same name, same layout
    for v in state.values():  # other values, the same tensors: the same layout
        if v.is_floating_point():
            v.mul_(2)
    torch.save(state, other)
    assert other.stat().st_size == st.st_size and other.read_bytes() != wfile.read_bytes()
    wfile.write_bytes(other.read_bytes())
    os.utime(wfile, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (wfile.stat().st_size, wfile.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    builds.clear()
    m2 = run_extraction(cfg(data, store_dir, weights=str(wfile)))
    assert builds == [str(wfile)]  # not served from the first entry
    assert m2["artefact_id"] != m1["artefact_id"] and m2["run"]["extracted"] == 6
    assert m2["model"]["weights_sha256"] != m1["model"]["weights_sha256"]
    assert len(identity_files(store_dir)) == 2


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path: Path, store_dir: Path, builds: list[str]) -> None:
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    m1 = run_extraction(cfg(data, store_dir))
    (entry,) = identity_files(store_dir)
    good = json.loads(entry.read_text())
    for bad in (b"\x00{not json", json.dumps({**good, "layer": {"alias": 1}}).encode(),
                json.dumps({**good, "spec": {**good["spec"], "arch": ["x"]}}).encode()):
        entry.write_bytes(bad)
        builds.clear()
        m = run_extraction(cfg(data, store_dir))
        assert builds == ["none"]  # the entry was not trusted
        assert m["artefact_id"] == m1["artefact_id"] and m["run"].get("unchanged") is True and m["rows"] == 6
        assert json.loads(entry.read_text()) == good  # rewritten
    builds.clear()
    run_extraction(cfg(data, store_dir))
    assert builds == []


def test_cached_and_uncached_plans_agree(tmp_path: Path, store_dir: Path) -> None:
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    run_extraction(cfg(data, store_dir, layer="features.3"))
    c = cfg(data, store_dir, layer="features.3")
    cached, lm_none = plan_extraction(c)
    assert lm_none is None  # from the cache: nothing built
    lm = load_model(MODEL, "none", 0)
    uncached, lm_given = plan_extraction(c, lm)
    assert lm_given is lm
    for name in ("artefact_id", "artefact_dir", "layer", "model_spec", "preprocess", "todo", "repaired", "extra_columns"):
        assert getattr(cached, name) == getattr(uncached, name), name
    assert cached.layer.name == "features.3" and cached.preprocess.crop == 32
    built = model_for_plan(cached, None)  # built later on demand: the same identity
    assert built.spec == uncached.model_spec
    m = read_manifest(cached.artefact_dir)
    assert m["artefact_id"] == cached.artefact_id and m["model"] == cached.model_spec


def test_stale_entry_is_refused_when_the_model_is_built(tmp_path: Path, store_dir: Path) -> None:
    """An entry whose values disagree with the model built from the same flags (written by hand here) never
    publishes under the wrong identity: the build checks it, drops it and asks for a rerun."""
    from storage.errors import StoreError

    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    run_extraction(cfg(data, store_dir))
    (entry,) = identity_files(store_dir)
    raw = json.loads(entry.read_text())
    raw["spec"]["num_params"] += 1
    entry.write_text(json.dumps(raw))
    (data / "red" / "red__0.png").rename(data / "red" / "moved.png")  # no-op-looking plan, model built late
    with pytest.raises(StoreError, match="does not match the cached model identity"):
        run_extraction(cfg(data, store_dir))
    assert not entry.exists()
    m = run_extraction(cfg(data, store_dir))
    assert m["rows"] == 6 and entry.exists()
