"""Dataset audit: planted duplicates, resized and cross-split copies, label flips and outliers are found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index_fixtures import build_planted_dataset, write_feature_artefact
from storage.audits import read_findings
from tasks.index.dataset_audit import AuditParams, run_dataset_audit


def test_synthetic_findings_ranked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three label classes (well separated blobs); planted: 4 label flips, a near copy, a cross-split copy, an
    exact duplicate (same image_id at two paths) and a far outlier."""
    rng = np.random.default_rng(0)
    d, per = 32, 40
    centers = rng.normal(size=(3, d)) * 3
    x = np.concatenate([centers[c] + rng.normal(size=(per, d)) for c in range(3)]).astype(np.float32)
    labels = [f"c{c}" for c in range(3) for _ in range(per)]
    splits = ["train" if i % 4 else "test" for i in range(len(x))]
    ids = [f"{i:064x}" for i in range(len(x))]
    flips = [5, 47, 90, 101]
    for i in flips:  # filed under the next class
        labels[i] = f"c{(int(labels[i][1]) + 1) % 3}"
    extra_x, extra = [], []
    extra_x.append(x[10] + 1e-3 * rng.normal(size=d))
    extra.append(("near_copy", labels[10], "train", "a" * 64))
    extra_x.append(x[20] + 1e-3 * rng.normal(size=d))
    extra.append(("leak_copy", labels[20], "test", "b" * 64))
    extra_x.append(x[30].copy())
    extra.append(("exact_copy", labels[30], "train", ids[30]))  # same bytes
    extra_x.append(rng.normal(size=d) * 0.2 - 8 * centers[0] / np.linalg.norm(centers[0]))  # opposite class 0
    extra.append(("outlier", None, "train", "c" * 64))
    x = np.concatenate([x, np.array(extra_x, np.float32)])
    labels += [e[1] for e in extra]
    splits = [s if i not in (20,) else "train" for i, s in enumerate(splits)] + [e[2] for e in extra]
    ids += [e[3] for e in extra]
    paths = [f"img/{i:05d}.png" for i in range(len(ids) - len(extra))] + [f"planted/{e[0]}.png" for e in extra]
    store = tmp_path / "store"
    write_feature_artefact(store, x, labels=labels, splits=splits, ids=ids, paths=paths)

    m = run_dataset_audit(str(store), params=AuditParams(k=10, dup_threshold=0.999))
    assert m["kind"] == "dataset-audit" and m["images"] == len(x)
    f = read_findings(str(store))
    lab = f[f["finding"] == "label-disagreement"].sort_values("rank")
    assert set(lab["path"].iloc[:4]) == {f"img/{i:05d}.png" for i in flips}
    for p, sug in zip(lab["path"].iloc[:4], lab["suggested_label"].iloc[:4]):
        assert sug == f"c{(int(labels[int(p[4:9])][1]) - 1) % 3}"  # the class it was flipped from
    near = f[f["finding"] == "near-duplicate"]
    clusters = near.groupby("cluster")["path"].apply(frozenset)
    assert frozenset({"img/00010.png", "planted/near_copy.png"}) in set(clusters)
    assert frozenset({"img/00030.png", "planted/exact_copy.png"}) in set(clusters)
    exact = f[f["finding"] == "exact-duplicate"]
    assert set(exact["path"]) == {"img/00030.png", "planted/exact_copy.png"}
    leak = f[f["finding"] == "leakage"]
    assert len(leak) == 1 and leak["path"].iloc[0] == "planted/leak_copy.png"
    assert leak["other_path"].iloc[0] == "img/00020.png" and leak["split"].iloc[0] == "test"
    out = f[f["finding"] == "outlier"].sort_values("rank")
    assert out["path"].iloc[0] == "planted/outlier.png"
    # a rerun on unchanged features reuses the artefact
    assert run_dataset_audit(str(store), params=AuditParams(k=10, dup_threshold=0.999)).get("reused") is True
    from flows.cli import main

    assert main(["--no-prefect", "audit-dataset", "--store", str(store), "--dup-threshold", "0.999", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["leakage"] == 1


def test_flow_on_real_images_finds_planted_cases(tmp_path: Path, prefect_server) -> None:
    """Through Prefect: exact duplicate, resized copy, cross-split copy and a label flip on decoded images."""
    from flows.dataset_audit import dataset_audit_flow
    from tasks.extract.features import ExtractConfig, run_extraction

    data = build_planted_dataset(tmp_path / "data")
    store = tmp_path / "store"
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none", progress=False,
                                 num_workers=0))
    # random-weight features put same-colour siblings at cosine ~0.9999; copies are 10x closer still
    r = dataset_audit_flow(store=str(store), k=5, dup_threshold=0.99997)
    assert r["counts"]["exact-duplicate"] == 4  # two planted pairs of identical bytes
    f = read_findings(str(store), r["artefact_id"])
    near = f[f["finding"] == "near-duplicate"].groupby("cluster")["path"].apply(frozenset)
    assert frozenset({"train/green/green_train_1.png", "train/green/resized_copy.png"}) in set(near)
    assert frozenset({"train/red/red_train_0.png", "train/red/dup_copy.png"}) in set(near)
    assert not any("red_train_1.png" in p for c in near for p in c)  # ordinary siblings are not duplicates
    leak = f[f["finding"] == "leakage"]
    assert list(zip(leak["path"], leak["other_path"])) == [("test/blue/leak_copy.png", "train/blue/blue_train_2.png")]
    lab = f[f["finding"] == "label-disagreement"].sort_values("rank")
    assert lab["path"].iloc[0] == "train/green/flip.png" and lab["suggested_label"].iloc[0] == "red"
