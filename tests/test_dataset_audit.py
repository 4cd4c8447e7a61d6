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


# ------------------------------------------------------------------------------------------ scale (issue 19)


def _dense_label_vote(idmap, graph, k: int, min_votes: int) -> dict[int, tuple[str, float]]:
    """The label vote as it used to be computed (a dense rows x labels table, one pandas row at a time), as the
    oracle: ``{row: (suggested label, 1 - p(given))}`` of the questioned rows."""
    import pandas as pd

    g = graph[graph["rank"] <= k]
    q, nb = g["row"].to_numpy(np.int64), g["neighbor_row"].to_numpy(np.int64)
    w = np.clip(1.0 - g["distance"].to_numpy(np.float64), 0.0, None) + 1e-6
    labels = idmap["label"].to_numpy(dtype=object)
    has = pd.notna(labels)
    ok = has[q] & has[nb] & (q != nb)
    df = pd.DataFrame({"q": q[ok], "lab": labels[nb][ok], "w": w[ok]})
    votes = df.groupby(["q", "lab"])["w"].sum().unstack(fill_value=0.0)
    counts, totals = df.groupby("q").size(), votes.sum(axis=1)
    out = {}
    for r in votes.index:
        if counts[r] < min_votes:
            continue
        p = votes.loc[r] / totals[r]
        p_given = float(p.get(labels[r], 0.0))
        top = str(p.idxmax())
        if top != labels[r] and p_given < 0.5:
            out[int(r)] = (top, 1.0 - p_given)
    return out


def _random_knn_case(n: int, k: int, n_labels: int, seed: int):
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = np.array([f"c{v}" for v in rng.integers(0, n_labels, n)], dtype=object)
    labels[rng.random(n) < 0.1] = None
    idmap = pd.DataFrame({"row": np.arange(n), "image_id": [f"{i:064x}" for i in range(n)],
                          "path": [f"p/{i:06d}.png" for i in range(n)], "label": labels,
                          "split": np.where(rng.random(n) < 0.25, "test", "train")})
    graph = pd.DataFrame({"row": np.repeat(np.arange(n), k), "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
                          "neighbor_row": rng.integers(0, n, n * k),
                          "distance": np.sort(rng.uniform(0.0, 0.6, (n, k)), axis=1).ravel().astype(np.float32)})
    return idmap, graph


def test_label_vote_on_edge_arrays_equals_the_dense_vote() -> None:
    """The vectorised vote (label_votes on the (N, k) edge arrays) questions the same images, with the same suggested
    label and score, as the dense rows x labels table it replaced, on a random case with unlabelled images,
    self-edges and k below the graph's."""
    from tasks.index.dataset_audit import audit_knn, label_votes

    idmap, graph = _random_knn_case(600, 8, 5, seed=11)
    graph.loc[::37, "neighbor_row"] = graph.loc[::37, "row"]  # a few self-edges: never a vote
    for k, min_votes in ((8, 3), (5, 2)):
        want = _dense_label_vote(idmap, graph, k, min_votes)
        assert 50 < len(want) < 600
        f = audit_knn(idmap, graph, AuditParams(k=k, dup_threshold=0.99999, confirm="none", min_label_votes=min_votes))
        lab = f[f["finding"] == "label-disagreement"]
        got = {int(p[2:8]): (s, sc) for p, s, sc in zip(lab["path"], lab["suggested_label"], lab["score"])}
        assert set(got) == set(want)
        for r, (sug, score) in want.items():
            assert got[r][0] == sug and got[r][1] == pytest.approx(score, abs=1e-12)
    # the primitive on a hand-made case: row 0 votes b (0.9) over a (0.5 + 0.1), row 1 a tie -> the smaller code
    q, nb = np.array([0, 0, 0, 1, 1]), np.array([1, 2, 3, 0, 2])
    sim = np.array([0.5, 0.9, 0.1, 0.4, 0.4])
    rows, votes, p_given, top, p_top = label_votes(q, nb, sim, np.array([0, 0, 1, 0]), 2)
    assert rows.tolist() == [0, 1] and votes.tolist() == [3, 2] and top.tolist() == [1, 0]
    assert p_given[0] == pytest.approx((0.5 + 0.1 + 2e-6) / (1.5 + 3e-6)) and p_top[1] == pytest.approx(0.5)


def test_audit_knn_memory_is_edge_arrays_not_per_image_records() -> None:
    """50k images x 200 classes, k = 3, nothing to report: the audit's traced peak stays far below what one dict per
    image (``idmap.to_dict("records")``) plus a dense 50k x 200 float64 vote table need (the code before measured
    ~120 MiB here; the edge-array audit ~13 MiB)."""
    import tracemalloc

    import pandas as pd

    from tasks.index.dataset_audit import audit_knn

    n, k, n_cls = 50_000, 3, 200
    rng = np.random.default_rng(0)
    cls = np.arange(n) % n_cls
    idmap = pd.DataFrame({"row": np.arange(n), "image_id": [f"{i:064x}" for i in range(n)],
                          "path": [f"train/c{c}/{i:07d}.png" for i, c in enumerate(cls)],
                          "label": [f"c{c}" for c in cls], "split": "train"})
    members = np.arange(n).reshape(-1, n_cls).T  # rows of each class
    pos = np.arange(n) // n_cls
    nb = members[cls[:, None], (pos[:, None] + rng.integers(1, n // n_cls, (n, k))) % (n // n_cls)]
    graph = pd.DataFrame({"row": np.repeat(np.arange(n), k), "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
                          "neighbor_row": nb.ravel(),
                          "distance": np.sort(rng.uniform(0.05, 0.3, (n, k)), axis=1).ravel().astype(np.float32)})
    tracemalloc.start()
    try:
        f = audit_knn(idmap, graph, AuditParams(k=k, dup_threshold=0.999, confirm="none"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(f) == 0  # every image agrees with its classmates; no copies, no outlier
    assert peak < 40 * 2**20, f"audit_knn traced peak {peak / 2**20:.1f} MiB at 50k rows"


def _copies_set(root: Path, n_pictures: int) -> tuple[list[str], set[tuple[int, int]]]:
    """``n_pictures`` distinct generated pictures + 6 near-copies of some of them; returns (paths, planted row pairs)."""
    rng = np.random.default_rng(7)
    (root / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_pictures):
        rel = f"img/p{i:04d}.png"
        _pattern(("stripes", "blobs", "boxes")[i % 3], rng, size=48).save(root / rel)
        paths.append(rel)
    planted = set()
    for j, (src, how) in enumerate(((3, "jpeg"), (40, "resize"), (77, "light"), (120, "crop"), (151, "jpeg"),
                                    (199, "crop"))):
        rel = f"img/copy{j}.png"
        with Image.open(root / paths[src]) as im:
            _copy(im.convert("RGB"), how).save(root / rel)
        planted.add((src, len(paths)))
        paths.append(rel)
    return paths, planted


def test_pixel_candidates_above_the_threshold_use_the_auto_index_and_spill(tmp_path: Path) -> None:
    """Above ``pixel_exact_max_rows`` the 16x16 candidate search runs on the ``auto`` FAISS index (IVF-PQ + exact
    re-rank) instead of the exact all-vs-all kNN, and above ``spill_rows`` the thumbnails live in a temp file; on
    generated pictures with six planted near-copies (and no feature edges at all) both runs confirm exactly the
    planted pairs, like the exact in-memory run, and pre-filter the feature edges alike."""
    import pandas as pd

    from tasks.index.dataset_audit import find_near_copies

    paths, planted = _copies_set(tmp_path / "data", 210)
    n = len(paths)
    idmap = pd.DataFrame({"row": np.arange(n), "image_id": [f"{i:064x}" for i in range(n)], "path": paths,
                          "label": None, "split": "train"})
    # three random "feature" neighbours per image (every edge a candidate: no feature threshold), so the unaligned
    # pre-filter of feature edges runs on the vectors each search path holds
    nbr = np.random.default_rng(1).integers(0, n, (n, 3))
    graph = pd.DataFrame({"row": np.repeat(np.arange(n), 3), "rank": np.tile(np.arange(1, 4, dtype=np.int32), n),
                          "neighbor_row": nbr.ravel(), "distance": np.full(3 * n, 0.2, np.float32)})
    nan = lambda a, b: float("nan")  # noqa: E731
    exact = find_near_copies(idmap, graph, str(tmp_path / "data"), AuditParams(k=5), None, nan)
    assert exact.record["candidates"]["pixel_index"]["exact"] is True and exact.record["thumbnails_spilled"] is False
    assert set(exact.pairs) == planted
    assert 0 < exact.record["candidates"]["feature_knn_edges"] < 3 * n  # the pre-filter dropped some, kept some
    spill = tmp_path / "cache"
    auto = find_near_copies(idmap, graph, str(tmp_path / "data"), AuditParams(k=5), None, nan,
                            pixel_exact_max_rows=100, spill_rows=50, spill_dir=spill)
    pix = auto.record["candidates"]["pixel_index"]
    assert pix["exact"] is False and pix["factory"].startswith("IVF") and pix["factory"].endswith(",RFlat")
    assert pix["rows"] == n and pix["nprobe"] >= 1
    assert auto.record["thumbnails_spilled"] is True and spill.is_dir() and not any(spill.iterdir())  # temp file gone
    assert set(auto.pairs) == planted
    assert auto.record["confirmed_pairs"] == exact.record["confirmed_pairs"] == len(planted)
    assert auto.record["candidates"]["feature_knn_edges"] == exact.record["candidates"]["feature_knn_edges"]


def test_thumb_store_spills_to_a_temp_file_and_reads_back(tmp_path: Path) -> None:
    """A ThumbStore above its spill limit writes to a temp file (nothing held as an array) and reads every row,
    block and scattered take back exactly; below it it is an in-memory array."""
    from tasks.index.near_copy import THUMB, ThumbStore, load_thumbs

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (7, THUMB, THUMB), dtype=np.uint8)
    with ThumbStore(7, tmp_path / "spill", spill_rows=3) as st:
        assert st.spilled
        with pytest.raises(RuntimeError):
            st.array()
        st.write(0, data[:4])
        st.write(4, data[4:])
        assert np.array_equal(st.read(0, 7), data) and np.array_equal(st.read(5, 99), data[5:])
        assert np.array_equal(st.get(3), data[3]) and np.array_equal(st.take(np.array([6, 0, 6])), data[[6, 0, 6]])
    small = ThumbStore(7, spill_rows=7)
    assert not small.spilled and small.array().shape == (7, THUMB, THUMB)
    # load_thumbs fills a spilled store block by block; an unreadable image is a zero row with ok False
    (tmp_path / "d").mkdir()
    for i in range(5):
        Image.fromarray(data[i]).save(tmp_path / "d" / f"{i}.png")
    with ThumbStore(6, tmp_path / "spill", spill_rows=2) as st:
        _, ok, failures = load_thumbs(str(tmp_path / "d"), [f"{i}.png" for i in range(5)] + ["gone.png"], out=st)
        assert ok.tolist() == [True] * 5 + [False] and len(failures) == 1
        assert np.array_equal(st.read(0, 5), data[:5]) and not st.get(5).any()
