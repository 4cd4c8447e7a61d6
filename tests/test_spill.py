"""Spilling the planner's kept columns (tasks.core.datasets.RecordTableBuilder, DigestSet) to memory-mapped temp
files: past the row threshold the listing's columns are views of unlinked files in the spill folder, with the same
contents and the same extract / publish results as in memory, and nothing is left behind (also after an error)."""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import make_color_dataset
from storage.features import read_feature_table
from storage.paths import Store
from tasks.core import datasets
from tasks.core.datasets import DigestSet, RecordTable, hash_listing, image_digests, open_listing

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and /proc/self/fd")


def _fields(recs) -> list[tuple]:
    return [(r.path, r.src, r.label, r.split, dict(r.extras), r.image_id, r.size, r.mtime_ns, r.ino) for r in recs]


def _mapping(address: int) -> str:
    """The file named by the /proc/self/maps line holding ``address`` ("" for anonymous memory)."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) == 6 else ""
    raise AssertionError(f"address {address:#x} is not mapped")


def _column_addresses(t: RecordTable) -> dict[str, int]:
    bufs = t.paths.buffers()
    cols = {"paths.offsets": bufs[1].address, "paths.data": bufs[2].address}
    for name in ("label_codes", "split_codes", "sizes", "mtimes", "inos", "digests"):
        cols[name] = getattr(t, name).ctypes.data
    return cols


def _spill_fds(spill: Path) -> int:
    """Open file descriptors of this process on files in ``spill``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(spill) + os.sep)
        except OSError:
            continue
    return n


def _spill_maps(spill: Path) -> int:
    with open("/proc/self/maps") as fh:
        return sum(str(spill) + os.sep in line for line in fh)


def _tree(root: Path) -> Path:
    """~200 generated images in train / val class folders, plus names that need ``srcs`` (an undecodable byte)."""
    data = make_color_dataset(root / "data", per_class=33, size=(8, 8), splits=("train", "val"))
    (data / "loose").mkdir()
    with open(os.path.join(os.fsencode(data / "loose"), b"bad\xffname.png"), "wb") as fh:
        fh.write(b"\x89PNG undecodable")
    (data / "loose" / "ünï.png").write_bytes(b"\x89PNG unicode")
    return data


def test_spilled_listing_has_the_same_contents_as_the_in_memory_one(tmp_path: Path) -> None:
    """With the threshold at 10 rows, a ~200-file folder and a list with an extra column give exactly the records,
    columns, labels, splits, sources and extras of the in-memory path, and every column (and locate's sort order)
    is a view of an unlinked file in the spill folder: the in-memory table's columns are not."""
    data = _tree(tmp_path)
    spill = tmp_path / "spill"
    mem, rej_m, _ = hash_listing(open_listing(data), tmp_path / "c1.parquet", chunk_size=7)
    sp, rej_s, stats = hash_listing(open_listing(data), tmp_path / "c2.parquet", chunk_size=7, spill_rows=10,
                                    spill_dir=spill)
    assert len(mem) == len(sp) == 200 and stats["hashed"] == 200 and rej_m == rej_s == []
    assert not mem.spilled and sp.spilled
    assert _fields(sp) == _fields(mem)
    assert sp.paths.equals(mem.paths) and sp.paths.type == pa.large_string()
    for name in ("sizes", "mtimes", "inos", "digests"):
        np.testing.assert_array_equal(getattr(sp, name), getattr(mem, name))
    assert [sp.labels[c] for c in sp.label_codes] == [mem.labels[c] for c in mem.label_codes]
    assert [sp.splits[c] for c in sp.split_codes] == [mem.splits[c] for c in mem.split_codes]
    assert sp.srcs == mem.srcs and len(sp.srcs) == 1 and sp.extras is None
    q = pa.array(["loose/ünï.png", "nope.png", mem.paths[150].as_py(), mem.paths[0].as_py()], pa.large_string())
    np.testing.assert_array_equal(sp.locate(q), mem.locate(q))
    for name, addr in {**_column_addresses(sp), "order": sp._order.ctypes.data}.items():
        where = _mapping(addr)
        assert where.startswith(str(spill) + os.sep) and where.endswith("(deleted)"), (name, where)
        assert name.startswith("paths") or not getattr(sp, "_order" if name == "order" else name).flags.writeable
    assert not any(_mapping(a).startswith(str(spill)) for a in _column_addresses(mem).values())
    assert os.listdir(spill) == []  # nothing there by name, even while mapped

    rows = [r.path for r in mem if r.path.isascii()]
    lst = data / "list.csv"
    pd.DataFrame({"path": rows, "label": [f"L{i % 3}" for i in range(len(rows))],
                  "note": [f"n{i}" for i in range(len(rows))]}).to_csv(lst, index=False)
    mem_l, _, _ = hash_listing(open_listing(lst), chunk_size=7)
    sp_l, _, _ = hash_listing(open_listing(lst), chunk_size=7, spill_rows=10, spill_dir=spill)
    assert sp_l.spilled and _fields(sp_l) == _fields(mem_l) and sp_l.extra_columns() == ["note"]
    assert [dict(e) for e in sp_l.extras] == [dict(e) for e in mem_l.extras]

    del sp, sp_l
    gc.collect()
    assert _spill_maps(spill) == 0 and _spill_fds(spill) == 0  # dropped: the files' space is freed


def test_concat_spills_and_backfills_extras(tmp_path: Path) -> None:
    """RecordTable.concat past spill_rows: labels re-coded across chunks, extras only in a later chunk filled
    with empty mappings before it, the same records as the in-memory concat."""
    recs = [datasets.ImageRecord(f"d/{i:03d}.png", str(tmp_path / f"d/{i:03d}.png"), label=f"c{i % 4}",
                                 split=None if i % 5 else "test", image_id=f"{i + 1:064x}", size=i + 1, mtime_ns=7 * i,
                                 ino=i) for i in range(40)]
    for r in recs[25:]:
        r.extras = {"note": r.path}
    parts = [RecordTable.from_records(recs[a:b], tmp_path) for a, b in ((0, 9), (9, 9), (9, 25), (25, 40))]
    mem = RecordTable.concat(parts, tmp_path, spill_rows=100)
    sp = RecordTable.concat(parts, tmp_path, spill_rows=10, spill_dir=tmp_path / "spill")
    assert not mem.spilled and sp.spilled
    assert _fields(sp) == _fields(mem) == _fields(recs)


def test_an_error_mid_listing_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listing fails after spilling started (files open in the spill folder at that moment): afterwards no file
    descriptor, no mapping and no file of the spill folder is left."""
    data = make_color_dataset(tmp_path / "data", per_class=20, size=(8, 8), splits=("",))
    spill = tmp_path / "spill"
    real = datasets.iter_hashed_tables
    seen: list[int] = []

    def failing(*args, **kwargs):
        for k, chunk in enumerate(real(*args, **kwargs)):
            if k == 4:
                seen.append(_spill_fds(spill))
                raise RuntimeError("disk on fire")
            yield chunk

    monkeypatch.setattr(datasets, "iter_hashed_tables", failing)
    with pytest.raises(RuntimeError, match="disk on fire") as failure:
        hash_listing(open_listing(data), tmp_path / "c.parquet", chunk_size=5, spill_rows=10, spill_dir=spill)
    assert seen and seen[0] >= 8  # the eight column files were open when it failed
    # closed at once, not when the collector is collected (the traceback still holds its frame)
    assert failure.tb is not None and _spill_fds(spill) == 0
    del failure
    gc.collect()
    assert _spill_fds(spill) == 0 and _spill_maps(spill) == 0 and os.listdir(spill) == []


def test_digest_set_spills_past_the_threshold(tmp_path: Path) -> None:
    """A DigestSet of more than spill_rows ids is a sorted, de-duplicated, read-only view of a mapped file in the
    spill folder, with the same membership answers; a union keeps spilling."""
    ids = image_digests([f"{i * 7919 % 1000:064x}" for i in range(300)])  # 300 ids, 300 distinct
    ids = np.concatenate([ids, ids[:50]])
    mem = DigestSet(ids)
    sp = DigestSet(ids, spill_rows=10, spill_dir=tmp_path / "spill")
    assert not mem.spilled and sp.spilled and len(sp) == len(mem) == 300
    np.testing.assert_array_equal(sp.digests, mem.digests)
    where = _mapping(sp.digests.ctypes.data)
    assert where.startswith(str(tmp_path / "spill") + os.sep) and where.endswith("(deleted)")
    q = np.concatenate([ids[::7], image_digests([f"{i:064x}" for i in range(5000, 5050)])])
    np.testing.assert_array_equal(sp.contains(q), mem.contains(q))
    assert sp.contains(q).sum() == len(ids[::7])
    u = sp.union(image_digests([f"{5000:064x}"]))
    assert u.spilled and len(u) == 301 and u.contains(image_digests([f"{5000:064x}"]))[0]


def _features(store: Path, manifest: dict) -> pd.DataFrame:
    adir = Store(store).artefact_dir("features", manifest["artefact_id"])
    t = read_feature_table(adir, manifest, ["path", "image_id", "label", "split", "width", "height", "feature"])
    df = t.to_pandas().sort_values("path").reset_index(drop=True)
    df["feature"] = [np.asarray(f, np.float32).tobytes() for f in df["feature"]]
    return df


def test_extract_and_publish_give_the_same_results_when_the_plan_spills(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Extraction, a rerun with a deleted, a renamed, a copied and a new file, and a no-op rerun publish the same
    rows, ids, labels, splits and features whether the planner's listing and stored ids spill (SPILL_ROWS = 10)
    or not; the spilled plan's table and stored-id set are mapped files."""
    from tasks.extract import features as fx

    data = make_color_dataset(tmp_path / "data", per_class=34, size=(8, 8), splits=("train", "val"))
    mem_store, sp_store = tmp_path / "mem", tmp_path / "sp"

    def cfg(store: Path) -> fx.ExtractConfig:
        return fx.ExtractConfig(data=str(data), store=str(store), model="tiny_models:build", weights="none",
                                progress=False, num_workers=0, plan_chunk=16)

    def both() -> tuple[dict, dict]:
        m1 = fx.run_extraction(cfg(mem_store))
        with monkeypatch.context() as m:
            m.setattr(datasets, "SPILL_ROWS", 10)
            m2 = fx.run_extraction(cfg(sp_store))
        pd.testing.assert_frame_equal(_features(sp_store, m2), _features(mem_store, m1))
        for key in ("rows", "rejects", "unique_images", "labels"):
            assert m2[key] == m1[key], key
        return m1, m2

    m1, m2 = both()
    assert m2["rows"] == 204 and m2["run"]["extracted"] == 204
    pngs = sorted(data.rglob("*.png"))
    pngs[0].unlink()
    shutil.move(pngs[1], pngs[1].with_name("renamed.png"))
    shutil.copy(pngs[2], pngs[2].with_name("copy.png"))
    make_color_dataset(tmp_path / "more", per_class=1, size=(8, 8), splits=("",), seed=7)
    shutil.copy(tmp_path / "more" / "red" / "red__0.png", data / "val" / "red" / "new.png")
    m1, m2 = both()
    assert m2["rows"] == 205 and m2["run"]["extracted"] == m1["run"]["extracted"] == 1
    assert m2["run"]["removed"] == m1["run"]["removed"] == 2

    with monkeypatch.context() as m:
        m.setattr(datasets, "SPILL_ROWS", 10)
        plan, _ = fx.plan_extraction(cfg(sp_store))
        assert plan.records.spilled and plan.stored_ids.spilled and plan.todo == []
        assert fx.unchanged_manifest(plan) is not None
        cache = Store(sp_store).kind_dir("cache")
        assert _mapping(plan.records.sizes.ctypes.data).startswith(str(cache) + os.sep)
    m1, m2 = both()
    assert m1["run"].get("unchanged") is True and m2["run"].get("unchanged") is True
