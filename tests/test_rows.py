"""No row vanishes without a trace, and a damaged store recovers (issue "Unattended runs you can trust").

Every listed image ends as a feature row or as a reject row with a reason (reserved list columns, copies of a
rejected image, duplicate list entries, folder symlinks out of the root, list size caps), and one flipped byte
in a feature part is named by ``convlens verify`` (with its rows) and repaired by the next ``extract`` (also the
sharded one and the nightly run). Tiny hand-built model, generated images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_color_dataset
from storage.errors import QualityGateError, UsageError
from storage.features import COMPUTED_COLUMNS, feature_schema, load_features, part_entries
from storage.manifest import read_manifest
from storage.paths import Store
from tasks.core.datasets import RESERVED_COLUMNS, ListLimits, list_dataset
from tasks.extract import features as fx
from tasks.extract.features import ExtractConfig, run_extraction
from tiny_models import extract_config

MODEL = "tiny_models:build"


def cfg(data, store, **kw) -> ExtractConfig:
    kw.setdefault("model", MODEL)
    return extract_config(data, store, **kw)


def extract(data, store, **kw):
    return run_extraction(cfg(data, store, **kw))


def adir(store, m) -> Path:
    return Store(store).artefact_dir("features", m["artefact_id"])


def rejects_of(store, m) -> dict[str, str]:
    t = pq.read_table(adir(store, m) / part_entries(m, "rejects")[0]["name"]).to_pandas()
    return dict(zip(t["path"], t["reason"]))


def paths_of(store, m) -> list[str]:
    meta, _ = load_features(adir(store, m), m)
    return sorted(meta["path"])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- 1a. reserved list columns --------------------------------------------------------------------------------

def test_reserved_names_are_every_computed_column():
    """The refused names are exactly the feature table's columns other than the listed path / label / split."""
    computed = [n for n in feature_schema(4, True).names if n not in ("path", "label", "split")]
    assert list(COMPUTED_COLUMNS) == computed and RESERVED_COLUMNS == COMPUTED_COLUMNS


@pytest.mark.parametrize("column", ["image_id", "width", "height", "feature", "pred_top5", "prob_top5", "Width", "Label"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_reserved_list_column_is_refused_before_any_model_work(tmp_path, store_dir, monkeypatch, column, fmt):
    """Previously `image_id` published 0 rows after "3 extracted" (exit 0), and `width` failed only after the
    model work, on every rerun."""
    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))
    lst = data / f"list.{fmt}"
    df = pd.DataFrame({"path": files, column: ["x"] * len(files)})
    df.to_csv(lst, index=False) if fmt == "csv" else df.to_parquet(lst)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the list was checked")

    monkeypatch.setattr(fx, "load_model", no_model)
    with pytest.raises(UsageError, match=rf"column '{column}'.*rename"):
        run_extraction(cfg(lst, store_dir))
    assert not (store_dir / "features").exists()  # nothing planned, nothing written


def test_reserved_column_exits_2_on_the_cli(tmp_path, store_dir, capsys):
    from flows.cli import main

    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    pd.DataFrame({"path": [str(p.relative_to(data)) for p in data.rglob("*.png")], "image_id": "x"}).to_csv(
        data / "l.csv", index=False)
    assert main(["extract", str(data / "l.csv"), "--store", str(store_dir), "--model", MODEL, "--weights", "none",
                 "--num-workers", "0"]) == 2
    assert "'image_id' is reserved" in capsys.readouterr().err


# --- 1b. no listed image is dropped in silence ---------------------------------------------------------------

def _copies(root: Path) -> Path:
    """``a.png`` and ``b.png`` (identical bytes), ``c.png``; ``x.png`` and ``y.png`` (identical, corrupt)."""
    src = make_color_dataset(root / "src", per_class=1, splits=("",))
    d = root / "d"
    d.mkdir()
    pngs = sorted(src.rglob("*.png"))
    shutil.copy(pngs[0], d / "a.png")
    shutil.copy(pngs[0], d / "b.png")
    shutil.copy(pngs[1], d / "c.png")
    (d / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    (d / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    return d


def _vanish_after_planning(monkeypatch, victim: Path) -> None:
    """``victim`` disappears between listing/hashing and decoding."""
    real = fx.plan_extraction

    def plan_then_delete(*a, **k):
        out = real(*a, **k)
        victim.unlink()
        return out

    monkeypatch.setattr(fx, "plan_extraction", plan_then_delete)


@pytest.mark.parametrize("sharded", [False, True])
def test_copy_of_a_vanished_image_is_decoded_and_every_listed_file_is_a_row_or_a_reject(tmp_path, store_dir,
                                                                                       monkeypatch, sharded):
    """``a.png`` (planned to be decoded) vanishes after listing; its identical copy ``b.png`` used to be dropped
    with only a log warning, and of two identical corrupt files only one got a reject row."""
    d = _copies(tmp_path)
    _vanish_after_planning(monkeypatch, d / "a.png")
    c = cfg(d, store_dir, max_reject_rate=0.9, batch_size=2)
    if sharded:
        from tasks.extract.sharding import run_sharded_extraction

        m = run_sharded_extraction(c, shard_size=2)
    else:
        m = run_extraction(c)
    assert paths_of(store_dir, m) == ["b.png", "c.png"]
    assert rejects_of(store_dir, m) == {"a.png": "missing", "x.png": "not-an-image", "y.png": "not-an-image"}
    assert m["rows"] + m["rejects"] == 5
    meta, feats = load_features(adir(store_dir, m), m)
    assert np.isfinite(feats).all() and len(set(meta["image_id"])) == 2


def test_a_row_without_feature_is_a_reject_and_counts_toward_the_rate(tmp_path, store_dir):
    """Publishing without the copy pass (plan -> extract -> publish): the undecoded copy is a ``not-extracted``
    reject row naming its rejected twin, and it counts toward --max-reject-rate (previously: a log warning)."""
    from tasks.extract.features import extract_records, plan_extraction, publish_features

    d = _copies(tmp_path)
    for name in ("x.png", "y.png"):
        (d / name).unlink()
    plan, lm = plan_extraction(cfg(d, store_dir, max_reject_rate=0.5))
    (d / "a.png").unlink()
    entries, rejects, stats = extract_records(plan, lm)
    with pytest.raises(QualityGateError, match="2 of 3 images rejected"):
        publish_features(plan, entries, rejects, stats)
    plan.config.max_reject_rate = 0.9
    m = publish_features(plan, entries, rejects, stats)
    t = pq.read_table(adir(store_dir, m) / part_entries(m, "rejects")[0]["name"]).to_pandas().set_index("path")
    assert dict(t["reason"]) == {"a.png": "missing", "b.png": "not-extracted"}
    assert "identical bytes to a.png" in t.loc["b.png", "detail"] and "missing" in t.loc["b.png", "detail"]
    assert m["rows"] == 1 and m["run"]["not_extracted"] == 1


def test_missing_list_entries_and_duplicate_entries_are_reject_rows(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))
    rows = files + ["gone.png", f"./{files[0]}", f"{files[1].split('/')[0]}/../{files[1]}"]
    pd.DataFrame({"path": rows}).to_csv(data / "l.csv", index=False)
    with pytest.raises(QualityGateError, match=r"3 of 6 images rejected .*duplicate-entry=2, missing=1"):
        extract(data / "l.csv", store_dir)
    m = extract(data / "l.csv", store_dir, max_reject_rate=0.6)
    assert paths_of(store_dir, m) == files
    assert rejects_of(store_dir, m) == {"gone.png": "missing", f"./{files[0]}": "duplicate-entry",
                                        f"{files[1].split('/')[0]}/../{files[1]}": "duplicate-entry"}


# --- 2c. folder symlinks out of the root ---------------------------------------------------------------------

def test_folder_symlinks_out_of_the_root_are_rejects_unless_allowed(tmp_path, store_dir):
    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    outside = make_color_dataset(tmp_path / "outside", per_class=1, splits=("",), seed=7)
    secret = next((outside / "red").glob("*.png"))
    (data / "red" / "leak.png").symlink_to(secret)  # a file link out of the root
    (data / "more").symlink_to(outside / "blue")  # a directory link out of the root
    (data / "green" / "again.png").symlink_to(next((data / "green").glob("*.png")))  # a link inside: fine
    (data / "red" / "dangling.png").symlink_to(tmp_path / "nowhere.png")  # out of the root, and dangling
    (outside / "blue" / "loop").symlink_to(outside)  # a cycle, reachable only when links are followed
    recs, rejects, _ = list_dataset(data)
    assert {r.path: r.reason for r in rejects} == {"red/leak.png": "outside-root", "more": "outside-root",
                                                   "red/dangling.png": "outside-root"}
    assert "--allow-outside-root" in rejects[0].detail
    assert all(not os.path.realpath(r.src).startswith(str(tmp_path / "outside")) for r in recs)
    assert "green/again.png" in {r.path for r in recs}
    m = extract(data, store_dir, max_reject_rate=0.5)
    assert rejects_of(store_dir, m) == {"red/leak.png": "outside-root", "more": "outside-root",
                                        "red/dangling.png": "outside-root"}
    assert m["rows"] == 4
    # explicitly allowed: the file link is a row, the linked directory is walked (its name is the label), the
    # cycle inside it ends, and the dangling link is an ordinary missing file
    recs, rejects, _ = list_dataset(data, allow_outside=True)
    by_path = {r.path: r for r in recs}
    assert {"red/leak.png", "more/" + next((outside / "blue").glob("*.png")).name} <= set(by_path)
    assert by_path["more/" + next((outside / "blue").glob("*.png")).name].label == "more"
    assert rejects == []
    m2 = extract(data, store_dir / "allowed", allow_outside_root=True, max_reject_rate=0.5)
    assert rejects_of(store_dir / "allowed", m2) == {"red/dangling.png": "missing"}
    assert sum(p.startswith("more/") for p in paths_of(store_dir / "allowed", m2)) >= 1
    assert "red/leak.png" in paths_of(store_dir / "allowed", m2)


# --- 2d. list size caps --------------------------------------------------------------------------------------

def test_list_size_is_capped_before_it_is_read(tmp_path, store_dir, monkeypatch):
    """200k rows of one long path: a 5 KB Parquet file that decodes to 40 MB; caps on rows, metadata bytes,
    decoded bytes and file bytes each refuse it with a UsageError naming the flag."""
    lst = tmp_path / "big.parquet"
    pq.write_table(pa.table({"path": ["x" * 200] * 200_000}), lst, compression="zstd")
    assert lst.stat().st_size < 20_000
    with pytest.raises(UsageError, match=r"200,000 rows \(its metadata\).*--max-list-rows"):
        list_dataset(lst, limits=ListLimits(max_rows=100_000))
    with pytest.raises(UsageError, match=r"bytes decoded.*--max-list-bytes"):  # its metadata says ~5 KB
        list_dataset(lst, limits=ListLimits(max_bytes=1 << 20))
    wide = tmp_path / "wide.parquet"  # no dictionary: the metadata's uncompressed size is the real one (4 MB)
    pq.write_table(pa.table({"path": [f"{i:0200d}" for i in range(20_000)]}), wide, use_dictionary=False,
                   compression="zstd")
    assert wide.stat().st_size < 1 << 20
    with pytest.raises(UsageError, match=r"bytes uncompressed \(its metadata\)"):
        list_dataset(wide, limits=ListLimits(max_bytes=1 << 20, max_rows=10**9))
    csv = tmp_path / "l.csv"
    pd.DataFrame({"path": [f"{i}.png" for i in range(5000)]}).to_csv(csv, index=False)
    with pytest.raises(UsageError, match=r"bytes, over the limit of 1,000 \(--max-list-bytes\)"):
        list_dataset(csv, limits=ListLimits(max_bytes=1000))
    with pytest.raises(UsageError, match=r"rows, over the limit of 100 \(--max-list-rows\)"):
        list_dataset(csv, limits=ListLimits(max_rows=100))
    # through extract (before any model work) and its flags
    monkeypatch.setattr(fx, "load_model", lambda *a, **k: pytest.fail("model loaded before the list was checked"))
    with pytest.raises(UsageError, match="--max-list-rows"):
        run_extraction(cfg(lst, store_dir, max_list_rows=1000))
    with pytest.raises(UsageError, match="--max-list-bytes must be >= 1"):
        run_extraction(cfg(lst, store_dir, max_list_bytes=0))


def test_list_caps_on_the_cli(tmp_path, store_dir, capsys):
    from flows.cli import main

    csv = tmp_path / "l.csv"
    pd.DataFrame({"path": [f"{i}.png" for i in range(50)]}).to_csv(csv, index=False)
    assert main(["extract", str(csv), "--store", str(store_dir), "--max-list-rows", "10"]) == 2
    assert "--max-list-rows" in capsys.readouterr().err


# --- 3. a flipped byte: verify says which rows, the next extract repairs -------------------------------------

def _store_with_parts(tmp_path, store_dir, **kw):
    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    m = extract(data, store_dir, part_rows=3, **kw)
    d = adir(store_dir, m)
    meta, feats = load_features(d, m)
    return data, m, d, meta, feats


def test_verify_names_the_rows_of_a_damaged_part(tmp_path, store_dir, capsys):
    from flows.cli import main

    _, m, d, _, _ = _store_with_parts(tmp_path, store_dir)
    entry = part_entries(m)[0]
    held = pq.read_table(d / entry["name"], columns=["path", "image_id"]).to_pydict()
    flip(d / entry["name"])
    assert main(["verify", "--store", str(store_dir), "--json"]) == 1
    res = json.loads(capsys.readouterr().out)
    (bad,) = [a for a in res["artefacts"] if not a["ok"]]
    (aff,) = bad["affected"]
    assert aff["file"] == entry["name"] and aff["rows"] == 3 and aff["role"] == "part"
    if aff["readable"]:  # the flipped byte may or may not leave the file parseable; where it does, the rows
        assert len(aff["paths"]) == 3 and set(aff["paths"]) & set(held["path"])
    assert main(["verify", "--store", str(store_dir)]) == 1
    out = capsys.readouterr().out
    assert f"affected: {entry['name']} (part) held 3 rows" in out and "rerun `convlens extract`" in out
    # a part whose file is gone: the rows are still counted from the manifest
    (d / entry["name"]).unlink()
    assert main(["verify", "--store", str(store_dir)]) == 1
    assert f"affected: {entry['name']} (part) held 3 rows" in capsys.readouterr().out


def test_verify_lists_the_paths_of_a_parseable_damaged_part(tmp_path, store_dir, capsys):
    """A part whose bytes changed but still parses (here: rewritten with one feature value changed): verify
    lists its rows' paths and ids as read from it."""
    from flows.cli import main

    _, m, d, _, _ = _store_with_parts(tmp_path, store_dir)
    entry = part_entries(m)[1]
    t = pq.read_table(d / entry["name"])
    feats = t.column("feature").combine_chunks()
    values = feats.flatten().to_numpy(zero_copy_only=False).copy()
    values[0] += 1.0
    t = t.set_column(t.schema.get_field_index("feature"), t.schema.field("feature"),
                     pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), feats.type.list_size))
    pq.write_table(t, d / entry["name"])
    assert main(["verify", "--store", str(store_dir), "--json"]) == 1
    (bad,) = [a for a in json.loads(capsys.readouterr().out)["artefacts"] if not a["ok"]]
    (aff,) = bad["affected"]
    assert aff["readable"] and aff["paths"] == t.column("path").to_pylist() and aff["image_ids"] == t.column("image_id").to_pylist()
    assert main(["verify", "--store", str(store_dir)]) == 1
    out = capsys.readouterr().out
    assert f"held 3 rows: {', '.join(aff['paths'])} (as read from the damaged file)" in out


@pytest.mark.parametrize("sharded", [False, True])
def test_next_extract_repairs_a_flipped_byte(tmp_path, store_dir, sharded):
    """Previously every later extract failed with ChecksumError. Now the damaged part is dropped, its rows are
    extracted again (byte-identical features), the manifest says what was repaired and the store verifies."""
    from storage.verify import verify_store
    from tasks.extract.sharding import run_sharded_extraction

    data, m, d, meta, feats = _store_with_parts(tmp_path, store_dir)
    entry = part_entries(m)[0]
    flip(d / entry["name"])
    assert not verify_store(store_dir)["ok"]
    c = cfg(data, store_dir, part_rows=3)
    m2 = run_sharded_extraction(c, shard_size=4) if sharded else run_extraction(c)
    assert [r["name"] for r in m2["run"]["repaired"]] == [entry["name"]]
    assert m2["run"]["extracted"] == 3 and m2["rows"] == 6 and m2["rejects"] == 0
    assert verify_store(store_dir)["ok"]
    meta2, feats2 = load_features(d, read_manifest(d))
    order, order2 = np.argsort(meta["path"].to_numpy()), np.argsort(meta2["path"].to_numpy())
    assert list(meta2["path"].to_numpy()[order2]) == list(meta["path"].to_numpy()[order])
    np.testing.assert_array_equal(feats2[order2], feats[order])
    # the re-extracted rows form a part with the very same content (and name) as the damaged one: it was
    # rewritten, not kept because a file of that name and size existed
    assert entry["name"] in {e["name"] for e in part_entries(m2)}
    m3 = extract(data, store_dir, part_rows=3)
    assert m3["run"].get("unchanged") and m3["created"] == m2["created"]


def test_write_part_rewrites_a_damaged_file_of_the_same_name(tmp_path):
    from storage.atomic import sha256_file
    from storage.features import write_part

    t = pa.table({"x": list(range(1000))})
    e = write_part(tmp_path, t)
    flip(tmp_path / e["name"])
    assert write_part(tmp_path, t) == e
    assert sha256_file(tmp_path / e["name"]) == e["sha256"]


def test_a_damaged_rejects_file_is_rewritten_by_an_unchanged_rerun(tmp_path, store_dir):
    from storage.verify import verify_store

    data, m, d, _, _ = _store_with_parts(tmp_path, store_dir)
    m = extract(data, store_dir, part_rows=3)
    assert m["run"].get("unchanged")
    flip(d / part_entries(m, "rejects")[0]["name"])
    assert not verify_store(store_dir)["ok"]
    m2 = extract(data, store_dir, part_rows=3)
    assert not m2["run"].get("unchanged") and m2["run"]["extracted"] == 0
    assert [r["role"] for r in m2["run"]["repaired"]] == ["rejects"]
    assert verify_store(store_dir)["ok"]


def test_nightly_run_recovers_from_a_flipped_byte(tmp_path, store_dir):
    from storage.verify import verify_store
    from tasks.nightly.stages import NightlyConfig, run_nightly

    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    nc = NightlyConfig(data=str(data), store=str(store_dir), model=MODEL, weights="none", device="cpu",
                       num_workers=0, n=0, index=False, dataset_audit=False, maps=False)
    s1 = run_nightly(nc)
    d = Store(store_dir).artefact_dir("features", s1["features_id"])
    flip(d / part_entries(read_manifest(d))[0]["name"])
    s2 = run_nightly(nc)
    assert s2["stages"]["extract"]["extracted"] > 0 and s2["stages"]["extract"]["rows"] == 6
    assert read_manifest(d)["run"]["repaired"]
    load_features(d)  # every part verifies
    bad = [f"{a['kind']}/{a['artefact_id']}" for a in verify_store(store_dir)["artefacts"] if not a["ok"]]
    assert not [b for b in bad if b.startswith("features/")]
