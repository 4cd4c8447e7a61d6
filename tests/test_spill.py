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


@pytest.mark.parametrize("spill_rows", [10_000, 40, 0])
def test_digest_set_from_chunks_is_the_set_of_every_chunk(tmp_path: Path, spill_rows: int) -> None:
    """Built chunk by chunk (past the threshold: written to the spill file as they come, sorted and de-duplicated
    there in place, across dedup blocks), the set is the one DigestSet builds from their concatenation."""
    from tasks.core import datasets as ds

    rng = np.random.default_rng(3)
    pool = image_digests([f"{i:064x}" for i in range(400)])
    chunks = [pool[rng.integers(0, 400, size=n)] for n in (0, 37, 120, 1, 250, 64)]  # many duplicates, an empty one
    ref = DigestSet(np.concatenate(chunks))
    got = DigestSet.from_chunks(iter(chunks), spill_rows=spill_rows, spill_dir=tmp_path)
    assert got.spilled is (spill_rows < 472)
    np.testing.assert_array_equal(got.digests, ref.digests)
    assert got.digests.flags.writeable is not got.spilled  # a spilled set is a read-only view
    q = np.concatenate([pool, image_digests([f"{i:064x}" for i in range(900, 920)])])
    np.testing.assert_array_equal(got.contains(q), ref.contains(q))
    assert len(DigestSet.from_chunks([], spill_rows=0)) == 0
    arr = np.sort(np.concatenate(chunks))
    n = ds._dedup_sorted_in_place(arr, block=7)  # blocks that split runs of equal ids
    np.testing.assert_array_equal(arr[:n], ref.digests)


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


def _legacy_cache(cache_dir: Path, odd_id: str | None) -> Path:
    """A hash cache of 300 entries written before inodes were recorded (no ``ino`` column), plus the journal of a
    killed run: 40 new entries and one of the 300 hashed again (the later entry wins). ``odd_id``: one id that is
    not 64 lowercase hex digits."""
    import pyarrow.parquet as pq

    cache_dir.mkdir(parents=True)
    path = cache_dir / "hashes.parquet"
    ids = [f"{i * 7919:064x}" for i in range(300)]
    if odd_id is not None:
        ids[18] = odd_id
    pq.write_table(pa.table({"src": [f"/data/d{i % 7}/img_{i:04d}.png" for i in range(300)],
                             "size": [i + 1 for i in range(300)], "mtime_ns": [10 * i for i in range(300)],
                             "image_id": ids}), path, row_group_size=64)
    killed = datasets.HashCache(path)
    srcs = [f"/data/new/ü{i}.png" for i in range(40)] + ["/data/d3/img_0003.png"]
    killed.add(srcs, [1000 + i for i in range(41)], [5 * i for i in range(41)], [f"{i + 1:064x}" for i in range(41)],
               list(range(41)))
    killed.close(False)
    return path


def _cache_addresses(c: datasets.HashCache) -> dict[str, int]:
    bufs = c._src.buffers()
    cols = {"src.offsets": bufs[1].address, "src.data": bufs[2].address}
    for name in ("_size", "_mtime", "_ino", "_keys", "_order"):
        cols[name] = getattr(c, name).ctypes.data
    if c._id_digests is not None:
        cols["ids"] = c._id_digests.ctypes.data
    else:
        cols["ids.offsets"], cols["ids.data"] = c._ids.buffers()[1].address, c._ids.buffers()[2].address
    return cols


@pytest.mark.parametrize("odd_id", [None, "AB" * 32, "hand-made-id"])
def test_spilled_hash_cache_gives_the_same_lookups_and_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                odd_id: str | None) -> None:
    """With spill_rows = 10, a 300-entry legacy cache plus a killed run's journal loads into mapped, unlinked files
    in the cache's own folder (ids as digests when all are lowercase hex, else as strings) and gives the same
    lookups, digests, id strings, inode fill-in and rewritten Parquet contents as the in-memory cache; no temp file
    is left behind and dropping it frees the maps."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.HashCache, "_SPILL_BATCH", 64)  # the streaming rewrite takes several slices
    mem_path = _legacy_cache(tmp_path / "mem" / "cache", odd_id)
    sp_dir = tmp_path / "sp" / "cache"
    shutil.copytree(mem_path.parent, sp_dir)
    sp_path = sp_dir / mem_path.name
    before = sorted(os.listdir(sp_dir))
    mem = datasets.HashCache(mem_path)
    sp = datasets.HashCache(sp_path, spill_rows=10)
    assert not mem.spilled and sp.spilled and len(sp) == len(mem) == 340
    assert (sp._id_digests is not None) is (odd_id is None)
    for name, addr in _cache_addresses(sp).items():
        where = _mapping(addr)
        assert where.startswith(str(sp_dir) + os.sep) and where.endswith("(deleted)"), (name, where)
    assert all(datasets._is_mapped(a) for a in (sp._size, sp._mtime, sp._ino, sp._keys, sp._order))
    assert sp._ino.flags.writeable and not sp._size.flags.writeable  # copy-on-write inodes, read-only rest
    assert not any(datasets._is_mapped(a) for a in (mem._size, mem._mtime, mem._ino, mem._keys, mem._order))
    assert sorted(os.listdir(sp_dir)) == before  # nothing there by name

    q = [f"/data/d{i % 7}/img_{i:04d}.png" for i in range(0, 300, 3)] + ["/data/new/ü4.png", "/data/d3/img_0003.png",
                                                                         "/nope.png"]
    sizes = np.array([i + 1 for i in range(0, 300, 3)] + [1004, 1040, 1], np.int64)
    mtimes = np.array([10 * i for i in range(0, 300, 3)] + [20, 200, 0], np.int64)
    sizes[5] += 1  # changed: a miss
    inos = np.arange(len(q), dtype=np.int64) + 500
    inos[-3], inos[-2] = 4, 40
    keys = np.array(q, object)
    res = [(c.lookup_rows(keys, sizes, mtimes, inos), c) for c in (mem, sp)]
    (h_m, r_m), (h_s, r_s) = res[0][0], res[1][0]
    np.testing.assert_array_equal(h_s, h_m)
    np.testing.assert_array_equal(r_s, r_m)
    # all but the one whose size changed, the unknown one and img_0003 as first cached (its journal entry wins)
    assert len(h_m) == len(q) - 3 and 1 not in h_m and 5 not in h_m and len(q) - 2 in h_m
    np.testing.assert_array_equal(sp.digests(r_s), mem.digests(r_m))
    assert sp.lookup(q[:20], sizes[:20].tolist(), mtimes[:20].tolist()) == \
        mem.lookup(q[:20], sizes[:20].tolist(), mtimes[:20].tolist())
    assert sp.dirty and mem.dirty
    for c in (mem, sp):
        c.add(["/data/added.png", "/data/also.png"], [7, 8], [70, 80], ["cd" * 32, "other-id"], [77, 88])
        c.close(True)
    want, got = pq.read_table(mem_path), pq.read_table(sp_path)
    assert got.equals(want) and got.num_rows == len(q) - 3 + 2
    filled = got.to_pydict()
    assert odd_id is None or filled["image_id"][filled["src"].index("/data/d4/img_0018.png")] == odd_id
    assert filled["ino"][:3] == [500, 502, 503] and filled["src"][-2:] == ["/data/added.png", "/data/also.png"]
    assert os.listdir(sp_dir) == [sp_path.name]  # the journals and the temp file are gone
    del sp, res, c
    gc.collect()
    assert _spill_maps(sp_dir) == 0 and _spill_fds(sp_dir) == 0


def test_hash_cache_reads_many_new_hashes_back_from_its_journal(tmp_path: Path) -> None:
    """Past spill_rows new hashes in one run the cache stops holding them (they are in its journal) and still writes
    the same Parquet file as the in-memory cache."""
    import pyarrow.parquet as pq

    files = []
    for name, limit in (("mem", None), ("sp", 10)):
        c = datasets.HashCache(tmp_path / name / "hashes.parquet", spill_rows=limit)
        for start in range(0, 50, 7):
            idx = range(start, min(start + 7, 50))
            c.add([f"/d/{i}.png" for i in idx], [i + 1 for i in idx], [i for i in idx], [f"{i:064x}" for i in idx],
                  list(idx))
        assert (c._new == []) is (limit is not None)
        c.close(True)
        files.append(tmp_path / name / "hashes.parquet")
        assert os.listdir(tmp_path / name) == ["hashes.parquet"]
    want, got = (pq.read_table(f) for f in files)
    assert got.equals(want) and got.num_rows == 50


def test_plan_spills_the_hash_cache_and_rewrites_it_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With SPILL_ROWS patched to 10, the planner's hash cache loads spilled into mapped files under store/cache,
    a rerun after a change rewrites the same cache contents as the in-memory store's, and a no-op plan still finds
    nothing to do (and leaves the cache file as it was)."""
    import pyarrow.parquet as pq

    from tasks.extract import features as fx

    data = make_color_dataset(tmp_path / "data", per_class=34, size=(8, 8), splits=("train", "val"))
    mem_store, sp_store = tmp_path / "mem", tmp_path / "sp"
    seen: list[tuple[bool, str]] = []

    class Recording(datasets.HashCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append((self.spilled, _mapping(self._keys.ctypes.data) if len(self._keys) else ""))

    monkeypatch.setattr(datasets, "HashCache", Recording)

    def cfg(store: Path) -> fx.ExtractConfig:
        return fx.ExtractConfig(data=str(data), store=str(store), model="tiny_models:build", weights="none",
                                progress=False, num_workers=0, plan_chunk=16)

    def caches() -> tuple[pa.Table, pa.Table]:
        got = []
        for store in (mem_store, sp_store):
            (path,) = Store(store).kind_dir("cache").glob("hashes-*.parquet")
            got.append(pq.read_table(path))
        return got[0], got[1]

    def both() -> None:
        fx.run_extraction(cfg(mem_store))
        with monkeypatch.context() as m:
            m.setattr(datasets, "SPILL_ROWS", 10)
            fx.run_extraction(cfg(sp_store))

    both()
    both()  # the second sp run loads the first run's 204 entries spilled
    cache_dir = Store(sp_store).kind_dir("cache")
    assert seen[-1][0] and seen[-1][1].startswith(str(cache_dir) + os.sep) and seen[-1][1].endswith("(deleted)")
    assert not seen[-2][0]
    pngs = sorted(data.rglob("*.png"))
    pngs[0].unlink()
    shutil.copy(pngs[2], pngs[2].with_name("copy.png"))
    both()
    want, got = caches()
    assert got.equals(want) and got.num_rows == 204
    (path,) = cache_dir.glob("hashes-*.parquet")
    stamp = path.stat().st_mtime_ns
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(datasets, "SPILL_ROWS", 10)
        plan, _ = fx.plan_extraction(cfg(sp_store))
        assert plan.todo == [] and fx.unchanged_manifest(plan) is not None
    assert seen == [(True, seen[0][1])] and seen[0][1].startswith(str(cache_dir) + os.sep)
    assert path.stat().st_mtime_ns == stamp and caches()[1].equals(got)  # a no-op run: the cache is not rewritten
    assert sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(("hashes-", ".tmp-"))) == [path.name]


def test_a_failed_streaming_rewrite_keeps_the_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spilled cache's rewrite fails half-way (after a first slice was written): the old Parquet file and the
    journal are as they were, and no temp file is left in the cache folder."""
    import pyarrow.parquet as pq

    path = _legacy_cache(tmp_path / "cache", None)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    real = datasets.HashCache._kept_batches

    def failing(self):
        for k, t in enumerate(real(self)):
            if k == 1:
                raise OSError("disk on fire")
            yield t

    monkeypatch.setattr(datasets.HashCache, "_SPILL_BATCH", 64)
    monkeypatch.setattr(datasets.HashCache, "_kept_batches", failing)
    c = datasets.HashCache(path, spill_rows=10)
    assert c.spilled
    c.used[:] = True
    with pytest.raises(OSError, match="disk on fire"):
        c.close(True)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before
    assert pq.read_table(path).num_rows == 300
