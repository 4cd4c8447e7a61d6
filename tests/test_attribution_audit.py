"""The audit flow: selection policies, stored maps / overlays / scores, incremental reruns, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from conftest import make_color_dataset
from storage.audits import load_map, read_scores
from storage.errors import StoreError
from storage.features import write_part
from storage.manifest import read_manifest, write_manifest
from storage.paths import Store
from tasks.attribution.audit import AuditConfig, run_audit, run_default_audit, select_images

FAST = dict(window=112, stride=112, faith_steps=2, batch_size=16, ig_steps=4, thumb=64, progress=False)


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory):
    from tasks.extract.features import ExtractConfig, run_extraction

    root = tmp_path_factory.mktemp("audit")
    data = make_color_dataset(root / "data", per_class=2, size=(40, 36), splits=("",))
    store = root / "store"
    m = run_extraction(ExtractConfig(data=str(data), store=str(store), model="mobilenet_v3_small", weights="none",
                                     progress=False, num_workers=0))
    return store, m


def test_audit_stores_maps_overlays_scores_and_is_incremental(feature_store):
    store, fman = feature_store
    cfg = AuditConfig(store=str(store), methods=("occlusion", "saliency", "gradcam"), n=2, **FAST)
    man = run_audit(cfg)
    assert man["kind"] == "attribution" and man["features"]["id"] == fman["artefact_id"]
    adir = Store(store).artefact_dir("audits", man["artefact_id"])
    read_manifest(adir, verify=True)  # every listed file is there with its checksum
    scores, man2 = read_scores(store)
    assert man2["artefact_id"] == man["artefact_id"]
    # labels (red/green/blue) are not ImageNet classes -> only the predicted target: 2 images x 3 methods
    assert len(scores) == 6 and set(scores["method"]) == {"occlusion", "saliency", "gradcam"}
    assert set(scores["target_kind"]) == {"pred"}
    assert scores["deletion_auc"].between(0, 1).all() and scores["insertion_auc"].between(0, 1).all()
    assert (scores["runtime_s"] > 0).all()
    m = load_map(store, man, scores["map_file"][0], scores["map_index"][0])
    assert m.shape == (224, 224) and np.isfinite(m).all()
    from PIL import Image

    png = Image.open(adir / scores["overlay"][0])
    assert png.size == (128, 64)
    roles = {e["role"] for e in man["files"]}
    assert roles == {"scores", "maps", "overlay"}
    # rerun: nothing recomputed
    again = run_audit(cfg)
    assert again["last_run"]["computed"] == 0 and again["last_run"]["reused"] == 6 and again["rows"] == 6
    # a new method adds rows; changed parameters are new rows too, old ones kept
    more = run_audit(AuditConfig(**{**cfg.__dict__, "methods": ("saliency", "deconvnet")}))
    assert more["last_run"]["computed"] == 2 and more["rows"] == 8
    changed = run_audit(AuditConfig(**{**cfg.__dict__, "methods": ("occlusion",), "window": 224, "stride": 224}))
    assert changed["last_run"]["computed"] == 2 and changed["rows"] == 10
    assert len(changed["methods"]["occlusion"]) == 2  # two parameter sets recorded


def test_selection_policies(feature_store, tmp_path):
    store, fman = feature_store
    st = Store(store)
    from storage.features import read_meta

    meta = read_meta(st.artefact_dir("features", fman["artefact_id"]), fman)
    r1 = select_images(meta, "random", 3, seed=1)
    assert len(r1) == 3 and r1["image_id"].is_unique and (r1["selected_by"] == "random").all()
    assert list(select_images(meta, "random", 3, seed=1)["image_id"]) == list(r1["image_id"])
    low = select_images(meta, "low-confidence", 2)
    confs = meta["prob_top5"].map(lambda v: v[0])
    assert low["prob_top5"].map(lambda v: v[0]).max() <= sorted(confs)[1] + 1e-9
    with pytest.raises(ValueError, match="labels"):
        select_images(meta, "misclassified", 2, categories=None, num_classes=1000)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{meta['image_id'][4]}\n{meta['path'][0]}\n")
    got = select_images(meta, f"ids:{ids}", 10)
    assert set(got["image_id"]) == {meta["image_id"][4], meta["image_id"][0]}
    with pytest.raises(StoreError, match="audit-dataset"):
        select_images(meta, "label-disagreement", 2, store=st, features_id=fman["artefact_id"])
    # a dataset-audit artefact with findings -> those images, in findings order
    adir = st.artefact_dir("audits", "dataset-audit-test", create=True)
    tbl = pa.table({"image_id": [meta["image_id"][3], meta["image_id"][1], meta["image_id"][2]],
                    "finding": ["label-disagreement", "near-duplicate", "label-disagreement"]})
    entry = write_part(adir, tbl, prefix="findings")
    write_manifest(adir, {"kind": "dataset-audit", "artefact_id": "dataset-audit-test",
                          "source": {"features": fman["artefact_id"]}, "files": [dict(entry, role="findings")]})
    try:
        got = select_images(meta, "label-disagreement", 5, store=st, features_id=fman["artefact_id"])
        assert list(got["image_id"]) == [meta["image_id"][3], meta["image_id"][2]]
    finally:
        import shutil

        shutil.rmtree(adir)


def test_cli_and_errors(feature_store, capsys):
    from flows.cli import main

    store, _ = feature_store
    rc = main(["--no-prefect", "audit", "--store", str(store), "--methods", "saliency,guided", "--n", "1",
               "--faith-steps", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out["methods"]) == {"saliency", "guided"} and out["rows"] >= 2
    assert main(["--no-prefect", "audit", "--store", str(store), "--methods", "nope"]) == 2
    assert "unknown attribution method" in capsys.readouterr().err
    assert main(["--no-prefect", "audit", "--store", str(store), "--select", "label-disagreement"]) == 2
    assert "audit-dataset" in capsys.readouterr().err


def test_default_audit_function(feature_store):
    store, _ = feature_store
    s = run_default_audit(store, n=1, methods=("gradcam",))
    assert s["rows"] >= 1 and s["methods"] == ["gradcam"]


def test_flow_through_prefect(feature_store, prefect_server):
    from flows.audit import attribution_audit

    store, _ = feature_store
    s = attribution_audit(AuditConfig(store=str(store), methods=("saliency",), n=1, faith_steps=2))
    assert s["artefact_id"] and s["rows"] >= 1


def test_label_index_maps_names_and_only_bare_integers_without_names():
    from tasks.attribution.audit import label_index

    cats = ["tench", "goldfish", "great white shark", "tiger shark"]
    assert label_index("goldfish", cats, 4) == 1
    assert label_index("Great_White_Shark", cats, 4) == 2
    assert label_index("3", cats, 4) is None  # a digit label on a named model is not class 3
    assert label_index("3", None, 4) == 3
    assert label_index("7", None, 4) is None and label_index(None, cats, 4) is None
