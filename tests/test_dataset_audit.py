"""Dataset audit: planted duplicates, resized and cross-split copies, label flips and outliers are found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

    # synthetic features have no images to confirm copies on: the plain feature-threshold audit
    m = run_dataset_audit(str(store), params=AuditParams(k=10, dup_threshold=0.999, confirm="none"))
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
    assert run_dataset_audit(str(store), params=AuditParams(k=10, dup_threshold=0.999, confirm="none")).get("reused") is True
    from flows.cli import main

    assert main(["--no-prefect", "audit-dataset", "--store", str(store), "--dup-threshold", "0.999", "--confirm", "none",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["leakage"] == 1
    # the default (pixel-confirmed) audit cannot open these images: it reports no near copy it could not confirm,
    # only the exact duplicate, and says how many candidate pairs stayed unverified
    m = run_dataset_audit(str(store), params=AuditParams(k=10, dup_threshold=0.999))
    cal = m["calibration"]
    assert cal["confirm"] == "pixels" and cal["unreadable_images"] == len(x) - 1 and cal["unverified_pairs"] >= 2
    f = read_findings(str(store), m["artefact_id"])
    assert set(f.loc[f["finding"] == "near-duplicate", "path"]) == {"img/00030.png", "planted/exact_copy.png"}
    assert m["counts"]["leakage"] == 0


def test_flow_on_real_images_finds_planted_cases(tmp_path: Path, prefect_server) -> None:
    """Through Prefect: exact duplicate, resized copy, cross-split copy and a label flip on decoded images."""
    from flows.dataset_audit import dataset_audit_flow
    from tasks.extract.features import ExtractConfig, run_extraction

    data = build_planted_dataset(tmp_path / "data")
    store = tmp_path / "store"
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none", progress=False,
                                 num_workers=0))
    # random-weight features put same-colour siblings at cosine ~0.9999 (the old fixed 0.95 called them all
    # duplicates); the default calibrates the candidate threshold and confirms each pair on the pixels
    r = dataset_audit_flow(store=str(store), k=5, calibration_sample=4)
    assert r["calibration"]["feature"]["source"] == "calibrated"
    assert r["counts"]["exact-duplicate"] == 4  # two planted pairs of identical bytes
    f = read_findings(str(store), r["artefact_id"])
    near = f[f["finding"] == "near-duplicate"].groupby("cluster")["path"].apply(frozenset)
    assert frozenset({"train/green/green_train_1.png", "train/green/resized_copy.png"}) in set(near)
    assert frozenset({"train/red/red_train_0.png", "train/red/dup_copy.png"}) in set(near)
    assert len(near) == 3  # the two pairs above + the cross-split copy; ordinary siblings are not duplicates
    leak = f[f["finding"] == "leakage"]
    assert list(zip(leak["path"], leak["other_path"])) == [("test/blue/leak_copy.png", "train/blue/blue_train_2.png")]
    lab = f[f["finding"] == "label-disagreement"].sort_values("rank")
    assert lab["path"].iloc[0] == "train/green/flip.png" and lab["suggested_label"].iloc[0] == "red"


def _pattern(kind: str, rng: np.random.Generator, size: int = 72) -> Image.Image:
    """A structured grey-and-colour picture of a given kind (same kind = same style, different picture)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "stripes":
        f, ph, ang = rng.uniform(2, 6), rng.uniform(0, 6.3), rng.uniform(0, 3.14)
        g = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(ang) + yy * np.sin(ang)) + ph)
    elif kind == "blobs":
        g = np.zeros_like(xx)
        for _ in range(4):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            g += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        g /= g.max()
    else:  # "boxes"
        g = np.full_like(xx, 0.2)
        for _ in range(3):
            x0, y0 = rng.uniform(0, 0.6, 2)
            w, h = rng.uniform(0.15, 0.4, 2)
            g[(xx > x0) & (xx < x0 + w) & (yy > y0) & (yy < y0 + h)] = rng.uniform(0.5, 1.0)
    tint = {"stripes": (1.0, 0.6, 0.3), "blobs": (0.3, 0.8, 1.0), "boxes": (0.9, 0.9, 0.4)}[kind]
    arr = np.stack([g * t for t in tint], -1) * 230 + 12
    return Image.fromarray(np.clip(arr + rng.normal(0, 3, arr.shape), 0, 255).astype(np.uint8))


def _copy(img: Image.Image, how: str) -> Image.Image:
    import io

    from PIL import ImageEnhance

    w, h = img.size
    if how == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if how == "resize":
        return img.resize((round(w * 0.9), round(h * 0.9)), Image.BILINEAR)
    if how == "light":
        return ImageEnhance.Brightness(img).enhance(1.1)
    return img.crop((2, 1, w - 2, h - 3))  # a 5 % crop


def _planted_pictures(root: Path) -> tuple[set[frozenset], set[frozenset]]:
    """Three kinds x 8 distinct pictures in train/test, plus four near-copies (two of them across splits).
    Returns (planted same-picture pairs, planted cross-split pairs)."""
    rng = np.random.default_rng(3)
    paths: dict[tuple[str, int], str] = {}
    for kind in ("stripes", "blobs", "boxes"):
        for i in range(8):
            split = "test" if i % 4 == 0 else "train"
            rel = f"{split}/{kind}/{kind}_{i}.png"
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            _pattern(kind, rng).save(root / rel)
            paths[(kind, i)] = rel
    planted = [(("stripes", 1), "train/stripes/stripes_1_jpeg.jpg", "jpeg"),
               (("blobs", 2), "test/blobs/blobs_2_resized.png", "resize"),
               (("boxes", 3), "train/boxes/boxes_3_relit.png", "light"),
               (("stripes", 4), "train/stripes/stripes_4_crop.png", "crop")]
    pairs, leaks = set(), set()
    for src, rel, how in planted:
        with Image.open(root / paths[src]) as im:
            _copy(im.convert("RGB"), how).save(root / rel)
        pair = frozenset((paths[src], rel))
        pairs.add(pair)
        if paths[src].split("/")[0] != rel.split("/")[0]:
            leaks.add(pair)
    return pairs, leaks


def _found_pairs(f) -> set[frozenset]:
    near = f[f["finding"] == "near-duplicate"]
    return {frozenset((r.path, r.other_path)) for r in near.itertuples()}


def test_default_audit_finds_exactly_the_planted_copies(tmp_path: Path) -> None:
    """Generated pictures of three kinds (same-kind pictures look alike to a random-weight ResNet-18: cosine > 0.95)
    plus re-encoded / resized / re-lit / cropped copies: at default settings the near-duplicates and leaks found
    are exactly the planted ones, and the calibration is recorded in the manifest."""
    from tasks.extract.features import ExtractConfig, run_extraction

    data, store = tmp_path / "data", tmp_path / "store"
    pairs, leaks = _planted_pictures(data)
    assert len(pairs) == 4 and len(leaks) == 2
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none", resize=64, crop=64,
                                 progress=False, num_workers=0, device="cpu"))
    m = run_dataset_audit(str(store), params=AuditParams(k=5, calibration_sample=4), gpu="off")
    f = read_findings(str(store), m["artefact_id"])
    assert _found_pairs(f) == pairs
    leak = f[f["finding"] == "leakage"]
    assert {frozenset((r.path, r.other_path)) for r in leak.itertuples()} == leaks
    assert set(leak["split"]) == {"test"}
    cal = m["calibration"]
    feat = cal["feature"]
    assert feat["method"] == "self-copies" and feat["source"] == "calibrated" and feat["sample"] == 4 and feat["copies"] == 16
    assert cal["feature_threshold"] == feat["threshold"] and -1.0 <= feat["threshold"] <= 1.0
    assert cal["pixel_rule"]["thumb_px"] == 64 and cal["confirmed_pairs"] == 4 and cal["unverified_pairs"] == 0
    assert "calibrated on 16 self-made copies of 4 images" in m["near_copy_rule"]
    assert "same picture" in f.loc[f["finding"] == "leakage", "detail"].iloc[0]
    # the report's dataset-audit card carries the rule as a line
    from reports.sections.findings import findings_view
    from storage.paths import Store

    v = findings_view(m["artefact_id"], m, Store(store).artefact_dir("audits", m["artefact_id"]), {}, set())
    assert v["rule"] == m["near_copy_rule"] and "confirmed on the pixels" in v["rule"]


def test_distinct_noise_under_random_weights_has_no_duplicates(tmp_path: Path) -> None:
    """Distinct noise images under a random-weight ResNet-18 all sit at cosine > 0.95 (the old fixed default made
    one cluster of them all); at default settings none is a near-duplicate or a leak."""
    from tasks.extract.features import ExtractConfig, run_extraction

    rng = np.random.default_rng(5)
    data, store = tmp_path / "noise", tmp_path / "store"
    for i in range(40):
        split = "test" if i % 4 == 0 else "train"
        (data / split).mkdir(parents=True, exist_ok=True)
        s = int(rng.integers(32, 49))
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(data / split / f"n{i:03d}.png")
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none", resize=64, crop=64,
                                 progress=False, num_workers=0, device="cpu"))
    old = run_dataset_audit(str(store), params=AuditParams(k=5, dup_threshold=0.95, confirm="none"), gpu="off")
    assert old["counts"]["near-duplicate"] > 20  # what the fixed threshold reported
    m = run_dataset_audit(str(store), params=AuditParams(k=5, calibration_sample=4), gpu="off")
    assert m["counts"]["near-duplicate"] == 0 and m["counts"]["leakage"] == 0
    assert m["calibration"]["feature"]["source"] == "calibrated" and m["calibration"]["self_copy_recall"] >= 0.9


def test_leak_through_a_cluster_of_copies_is_reported() -> None:
    """Source S (test) with two edited copies, C0 in train and C1 in test, where only S~C0 and S~C1 were confirmed
    (two different edits of S may differ more than one edit does): C1 leaks too, through the cluster."""
    import pandas as pd

    from tasks.index.dataset_audit import NearCopies, audit_knn

    idmap = pd.DataFrame({"row": [0, 1, 2, 3], "image_id": ["s", "c0", "c1", "x"],
                          "path": ["test/s.png", "train/c0.png", "test/c1.png", "train/x.png"],
                          "label": ["a"] * 4, "split": ["test", "train", "test", "train"]})
    graph = pd.DataFrame({"row": [0, 1, 2, 3], "rank": [1, 1, 1, 1], "neighbor_row": [1, 0, 0, 0],
                          "distance": [0.01, 0.01, 0.02, 0.3]})
    near = NearCopies(pairs={(0, 1): (0.99, "same picture"), (0, 2): (0.98, "same picture")})
    f = audit_knn(idmap, graph, AuditParams(k=1), near)
    leak = f[f["finding"] == "leakage"]
    assert sorted(zip(leak["path"], leak["other_path"])) == [("test/c1.png", "train/c0.png"), ("test/s.png", "train/c0.png")]
    assert set(f.loc[f["finding"] == "near-duplicate", "path"]) == {"test/s.png", "train/c0.png", "test/c1.png"}


def test_demo_dataset_plants_copies_and_flips(tmp_path: Path) -> None:
    """The demo set holds the planted near-copies (next to their sources, some across train/test) and label flips
    (a digit filed under another class), listed by planted_cases(); a rebuild writes nothing."""
    from tasks.core.demo_data import build_demo_dataset, planted_cases

    counts = build_demo_dataset(tmp_path, per_class=4)
    cases = planted_cases(per_class=4)
    assert counts["planted_copies"] == len(cases["copies"]) == 7 and counts["planted_flips"] == len(cases["flips"]) == 3
    for c in cases["copies"]:
        assert (tmp_path / c["path"]).is_file() and (tmp_path / c["source"]).is_file()
    assert sum(c["path"].split("/")[0] != c["source"].split("/")[0] for c in cases["copies"]) == 3  # leaks
    for fl in cases["flips"]:
        assert (tmp_path / fl["path"]).is_file() and fl["label"] != fl["true_label"]
        assert fl["path"].split("/")[1] == fl["label"] and f"digit_{fl['true_label']}_" in fl["path"]
    assert build_demo_dataset(tmp_path, per_class=4)["written"] == 0
