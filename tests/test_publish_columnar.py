"""The publish and the no-op check match the listing on its columns (convlens issue 19, planner memory).

``publish_features``, ``unchanged_manifest``, ``copies_to_retry`` and the not-extracted reject rows work on the
plan's :class:`tasks.core.datasets.RecordTable` (path lookup by a sorted merge, 32-byte digests, boolean masks):
no Python object or dict entry per listed file. Checked two ways: the Python heap peak (``tracemalloc``) of the
no-op check and of a no-change publish over a synthetic 30k-row store stays within a per-file bound the
dict-per-path code exceeded, and a mixed change (add, delete, rename, copy, label / split change, missing and
duplicate list entries) publishes exactly the rows and reject rows the previous code published.
"""

from __future__ import annotations

import hashlib
import shutil
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_color_dataset
from storage.features import feature_schema, load_features, part_entries, rejects_schema, write_part
from storage.manifest import write_manifest
from storage.paths import Store
from tasks.core.datasets import ImageRecord, RecordTable, Reject, image_digests
from tasks.extract import features as fx
from tasks.extract.features import ExtractConfig, run_extraction
from tiny_models import extract_config

MODEL = "tiny_models:build"
N = 30_000
BYTES_PER_FILE = 120  # heap peak allowed per listed file; the dict-per-path code took > 400 B here


def cfg(data, store, **kw) -> ExtractConfig:
    kw.setdefault("model", MODEL)
    return extract_config(data, store, **kw)


def _big_table(root: Path, n: int) -> RecordTable:
    """``n`` listed files ``cls<k>/img_<i>.jpg`` (label ``cls<k>``, split train/test), built from columns."""
    paths = pa.array([f"cls{i % 10}/img_{i:07d}.jpg" for i in range(n)], pa.large_string())
    ids = image_digests([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)])
    lcodes = (np.arange(n) % 10 + 1).astype(np.int32)
    scodes = (np.arange(n) % 2 + 1).astype(np.int32)
    z = np.full(n, 100, np.int64)
    return RecordTable(root, paths, {}, lcodes, [None, *[f"cls{k}" for k in range(10)]], scodes,
                       [None, "train", "test"], None, z, z.copy(), z.copy(), ids)


def _big_store(tmp_path: Path, store: Path, n: int, part_rows: int = 5000) -> fx.ExtractPlan:
    """A plan over ``_big_table(n)`` whose artefact holds a published manifest of exactly those rows (4-d
    features), planned on a tiny real dataset for the model / layer fields."""
    small = make_color_dataset(tmp_path / "small", per_class=1, splits=("",))
    plan, _ = fx.plan_extraction(cfg(small, store))
    adir = store / "features" / "synthetic"
    adir.mkdir(parents=True)
    table = _big_table(small, n)
    rng = np.random.default_rng(0)
    files = []
    for s in range(0, n, part_rows):
        k = min(part_rows, n - s)
        part = table.take(np.arange(s, s + k))
        files.append(write_part(adir, pa.table({
            "image_id": [r.image_id for r in part], "path": [r.path for r in part],
            "label": [r.label for r in part], "split": [r.split for r in part],
            "width": np.full(k, 8, np.int32), "height": np.full(k, 8, np.int32),
            "feature": pa.FixedSizeListArray.from_arrays(rng.random(4 * k, np.float32), 4),
        }, schema=feature_schema(4, False))))
    rej = write_part(adir, pa.table({"path": [], "reason": [], "detail": [], "image_id": []}, schema=rejects_schema()),
                     prefix="rejects")
    write_manifest(adir, {"kind": "features", "artefact_id": "synthetic", "dim": 4, "with_preds": False, "rows": n,
                          "rejects": 0, "files": [dict(e, role="part", nonfinite=0, nonzero=True) for e in files]
                          + [dict(rej, role="rejects")]})
    return replace(plan, artefact_id="synthetic", artefact_dir=adir, dataset_root=small, records=table, todo=[],
                   rejects=[], repaired=[], donors=[], stamps_path=None)


def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_no_op_check_and_publish_hold_no_object_per_listed_file(tmp_path, store_dir):
    """Over 30k listed files in a 30k-row store, the no-op check and a no-change publish each peak below
    BYTES_PER_FILE of Python heap per file (the code as found built a dict entry + record per path: it failed
    both bounds) and still give the right answers."""
    plan = _big_store(tmp_path, store_dir, N)
    same, peak = _peak(lambda: fx.unchanged_manifest(plan))
    assert same is not None and same["rows"] == N
    assert peak < BYTES_PER_FILE * N, f"unchanged_manifest peaked at {peak / N:.0f} B per listed file"

    plan = replace(plan, records=_big_table(plan.dataset_root, N))  # a fresh table: its path sort is counted too
    m, peak = _peak(lambda: fx.publish_features(plan, [], [], {}))
    assert peak < BYTES_PER_FILE * N, f"publish_features peaked at {peak / N:.0f} B per listed file"
    assert m["rows"] == N and m["unique_images"] == N and m["run"]["removed"] == 0 and m["run"]["added_paths"] == 0
    assert m["labels"] == {f"cls{k}": N // 10 for k in range(10)}
    assert [e["name"] for e in part_entries(m)] == [e["name"] for e in part_entries(same)]  # parts kept as they were

    # one relabelled file: the no-op check says so and only that file's part is rewritten
    lc = plan.records.label_codes.copy()
    lc[7] = 1 if lc[7] != 1 else 2
    t = plan.records
    moved = RecordTable(t.root, t.paths, {}, lc, t.labels, t.split_codes, t.splits, None, t.sizes, t.mtimes, t.inos,
                        t.digests)
    plan = replace(plan, records=moved)
    assert fx.unchanged_manifest(plan) is None
    m2 = fx.publish_features(plan, [], [], {})
    assert m2["rows"] == N and len(set(e["name"] for e in part_entries(m2)) - set(e["name"] for e in part_entries(m))) == 2
    assert m2["labels"][moved.labels[lc[7]]] == N // 10 + 1


def _png_list(root: Path, rows: list[tuple[str, str | None, str | None]]) -> Path:
    lst = root / "l.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(lst, index=False)
    return lst


def test_mixed_change_publishes_the_same_rows_as_before(tmp_path, store_dir):
    """Add, delete, rename, copy, label and split change, a missing entry and a duplicate entry in one rerun:
    the rows, labels, splits, reject rows and run counts are those the dict-per-path code published (checked by
    running this test against it), the renamed / copied rows carry the stored feature (not re-extracted), and a
    second rerun with nothing changed keeps the manifest."""
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))
    pngs = sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))  # blue_0 blue_1 green_0 green_1 red_0 red_1
    first = [(p, p.split("/")[0], "train") for p in pngs]
    m1 = run_extraction(cfg(_png_list(data, first), store_dir))
    assert m1["rows"] == 6
    adir = Store(store_dir).artefact_dir("features", m1["artefact_id"])
    meta1, feats1 = load_features(adir, m1)
    feat_of = {p: feats1[i] for i, p in enumerate(meta1["path"])}

    shutil.move(data / pngs[0], data / "renamed.png")  # blue_0 -> renamed.png
    shutil.copy(data / pngs[2], data / "copy.png")  # green_0's bytes under a second path
    make_color_dataset(tmp_path / "more", per_class=1, splits=("",), seed=7)
    shutil.copy(tmp_path / "more" / "red" / "red__0.png", data / "new.png")
    second = [("renamed.png", "blue", "train"), (pngs[1], "blue", "test"),  # split change
              (pngs[2], "green", "train"), ("copy.png", "green", "train"), (pngs[3], "red", "train"),  # label change
              (pngs[4], "red", "train"), ("new.png", "red", "test"), ("gone.png", "red", "train"),
              (pngs[4], "red", "train")]  # pngs[5] deleted from the list; gone.png missing; pngs[4] listed twice
    lst = _png_list(data, second)
    m2 = run_extraction(cfg(lst, store_dir, max_reject_rate=0.5))
    meta2, feats2 = load_features(adir, m2)
    got = {p: (lab, sp) for p, lab, sp in zip(meta2["path"], meta2["label"], meta2["split"])}
    assert got == {p: (lab, sp) for p, lab, sp in second[:7]}
    rej = pq.read_table(adir / part_entries(m2, "rejects")[0]["name"]).to_pandas()
    assert sorted(zip(rej["path"], rej["reason"])) == [("gone.png", "missing"), (pngs[4], "duplicate-entry")]
    assert m2["rows"] == 7 and m2["rejects"] == 2 and m2["unique_images"] == 6
    assert m2["labels"] == {"blue": 2, "green": 2, "red": 3}
    assert m2["run"]["extracted"] == 1 and m2["run"]["removed"] == 2 and m2["run"]["added_paths"] == 3
    row = {p: i for i, p in enumerate(meta2["path"])}
    np.testing.assert_array_equal(feats2[row["renamed.png"]], feat_of[pngs[0]])
    np.testing.assert_array_equal(feats2[row["copy.png"]], feat_of[pngs[2]])

    m3 = run_extraction(cfg(lst, store_dir, max_reject_rate=0.5))
    assert m3["run"].get("unchanged") is True and m3["created"] == m2["created"]


def test_copies_and_unextracted_rejects_from_columns(tmp_path):
    """``copies_to_retry`` and the not-extracted reject rows on a RecordTable plan (and on a plain list of
    records, as a hand-built plan may hold): the other copies of a rejected image, not the tried ones."""
    ids = ["a" * 64, "b" * 64, "a" * 64, "a" * 64, "c" * 64]
    recs = [ImageRecord(f"{k}.png", str(tmp_path / f"{k}.png"), image_id=i) for k, i in enumerate(ids)]
    table = RecordTable.from_records(recs, tmp_path)
    for records in (table, recs):
        plan = fx.ExtractPlan(None, "x", tmp_path, tmp_path, records, [], [recs[0], recs[3]], None, None, {}, None, {})
        retry = fx.copies_to_retry(plan, [Reject("0.png", "corrupt", "bad")])
        assert [r.path for r in retry] == ["2.png"]
        assert fx.copies_to_retry(plan, []) == [] and fx.copies_to_retry(plan, [Reject("zz.png", "x")]) == []
    lost = fx._unextracted_rejects(table, np.array([2, 4]), [Reject("0.png", "corrupt", "bad")], [])
    assert [r.path for r in lost] == ["2.png", "4.png"]
    assert "identical bytes to 0.png" in lost[0].detail and "no readable stored feature" in lost[1].detail


@pytest.mark.parametrize("query", [["cls3/img_0000003.jpg", "nope", "cls0/img_0000000.jpg"], []])
def test_locate_finds_rows_by_path(tmp_path, query):
    """RecordTable.locate: the listed row of each path, -1 where not listed."""
    t = _big_table(tmp_path, 50)
    want = [int(q.rsplit("_", 1)[1][:-4]) if q != "nope" else -1 for q in query]
    assert t.locate(pa.array(query, pa.string())).tolist() == want
