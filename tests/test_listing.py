"""The columnar planner listing (tasks.core.datasets.RecordTable / hash_listing): same records as the record path,
a no-op rerun hashes nothing, a changed file (size, mtime or inode) is hashed again, memory per file is bounded."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_color_dataset
from tasks.core.datasets import (
    RecordTable,
    hash_listing,
    hash_records,
    iter_hashed_tables,
    list_dataset,
    open_listing,
)


def _fields(recs) -> list[tuple]:
    return [(r.path, r.src, r.label, r.split, dict(r.extras), r.image_id, r.size, r.mtime_ns, r.ino) for r in recs]


def _odd_tree(root: Path) -> Path:
    """Labels, splits, odd names (spaces, unicode, an undecodable byte), an empty file, a directory named like an
    image, a symlink out of the root, a hidden file and a non-image file."""
    data = make_color_dataset(root / "data", per_class=3, splits=("train", "val", ""))
    (data / "train" / "red" / "with space.png").write_bytes(b"\x89PNG space")
    (data / "train" / "red" / "ünï.png").write_bytes(b"\x89PNG unicode")
    os.makedirs(data / "weird", exist_ok=True)
    with open(os.path.join(os.fsencode(data / "weird"), b"bad\xffname.png"), "wb") as fh:
        fh.write(b"\x89PNG undecodable")
    (data / "weird" / "empty.png").write_bytes(b"")
    (data / "weird" / "dir.png").mkdir()
    (data / "weird" / ".hidden.png").write_bytes(b"hidden")
    (data / "weird" / "notes.txt").write_text("not an image")
    outside = root / "outside.png"
    outside.write_bytes(b"\x89PNG outside")
    (data / "weird" / "link.png").symlink_to(outside)
    (data / "green_link.png").symlink_to(data / "train" / "green" / "green_train_0.png")  # inside: listed
    return data


def test_columnar_listing_gives_the_records_of_the_record_path(tmp_path: Path) -> None:
    """Every field of every record (path, src, label, split, extras, id, size, mtime, inode) and every reject, in
    order, for a folder with odd names and for CSV / Parquet lists with extra columns."""
    data = _odd_tree(tmp_path)
    recs, rejects, root = list_dataset(data)
    want, want_rej, _ = hash_records(recs, tmp_path / "c-old.parquet")
    listing = open_listing(data)
    table, rej, stats = hash_listing(listing, tmp_path / "c-new.parquet", chunk_size=5)  # chunks cut directories
    assert isinstance(table, RecordTable) and stats == {"hashed": len(want), "cached": 0}
    assert _fields(table) == _fields(want) and len(table) == len(want) > 30
    assert [(r.path, r.reason) for r in listing.rejects + rej] == [(r.path, r.reason) for r in rejects + want_rej]
    reasons = {r.reason for r in listing.rejects + rej}
    assert {"outside-root", "empty-file", "not-a-file"} <= reasons
    assert "weird/bad\\xffname.png" in {r.path for r in table}  # displayed escaped, opened by its real name
    odd = table[[r.path for r in table].index("weird/bad\\xffname.png")]
    assert os.path.isfile(odd.src) and odd.image_id is not None
    assert {(r.label, r.split) for r in table} >= {("red", "train"), ("green", "val"), ("blue", None)}
    assert _fields(table[2:5]) == _fields(want[2:5]) and _fields([table[-1]]) == _fields([want[-1]])

    rows = [r.path for r in want if r.path.isascii()]
    df = pd.DataFrame({"path": rows + [rows[0]], "label": ["L"] * (len(rows) + 1), "note": [f"n{i}" for i in range(len(rows) + 1)]})
    for name, write in (("list.csv", lambda p: df.to_csv(p, index=False)), ("list.parquet", lambda p: df.to_parquet(p))):
        lst = data / name
        write(lst)
        recs, rejects, _ = list_dataset(lst)
        want, want_rej, _ = hash_records(recs, tmp_path / f"{name}-old.parquet")
        listing = open_listing(lst)
        table, rej, _ = hash_listing(listing, tmp_path / f"{name}-new.parquet", chunk_size=7)
        assert _fields(table) == _fields(want) and table.extra_columns() == ["note"]
        assert [(r.path, r.reason) for r in listing.rejects + rej] == [(r.path, r.reason) for r in rejects + want_rej]
        assert [r.reason for r in listing.rejects] == ["duplicate-entry"]


def test_columnar_listing_of_an_fsspec_url(tmp_path: Path) -> None:
    """A URL dataset (fsspec memory://) goes through the same columns: sources are the URLs, labels the folders."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for i, label in enumerate(["cat", "cat", "dog"]):
        with fs.open(f"/lst-{tmp_path.name}/{label}/{i}.png", "wb") as fh:
            fh.write(b"\x89PNG" + bytes([i]) * 10)
    url = f"memory:///lst-{tmp_path.name}"
    recs, _, _ = list_dataset(url)
    want, _, _ = hash_records(recs)
    table, _, _ = hash_listing(open_listing(url))
    assert _fields(table) == _fields(want) and [r.label for r in table] == ["cat", "cat", "dog"]
    assert table[0].src.startswith("memory://") and not table.srcs  # every source is root + "/" + path


def test_noop_rerun_hashes_nothing_and_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    """Nothing changed: 0 hashed. Touched (mtime), resized, or replaced by another file with the same size and
    mtime (a new inode, e.g. ``cp -p`` + rename): hashed again, and the new id is the new bytes' sha256."""
    import hashlib

    data = make_color_dataset(tmp_path / "data", per_class=4, splits=("",))  # 12 files
    cache = tmp_path / "hashes.parquet"
    assert hash_listing(open_listing(data), cache)[2] == {"hashed": 12, "cached": 0}
    assert hash_listing(open_listing(data), cache)[2] == {"hashed": 0, "cached": 12}
    files = sorted(data.rglob("*.png"))
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    with open(files[1], "ab") as fh:  # resized (mtime restored: only the size tells)
        fh.write(b"\0")
    os.utime(files[1], ns=(files[1].stat().st_atime_ns, files[1].stat().st_mtime_ns))
    st2 = files[2].stat()
    other = files[2].with_name("tmp.bin")
    other.write_bytes(files[3].read_bytes()[: st2.st_size].ljust(st2.st_size, b"x"))  # same size, other bytes
    os.utime(other, ns=(st2.st_atime_ns, st2.st_mtime_ns))  # same mtime
    os.replace(other, files[2])  # replaced: only the inode tells
    assert files[2].stat().st_ino != st2.st_ino and files[2].stat().st_mtime_ns == st2.st_mtime_ns
    table, _, stats = hash_listing(open_listing(data), cache)
    assert stats == {"hashed": 3, "cached": 9}
    by_path = {r.path: r.image_id for r in table}
    for p in files[:3]:
        assert by_path[p.relative_to(data).as_posix()] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert hash_listing(open_listing(data), cache)[2] == {"hashed": 0, "cached": 12}
    # the record path checks the inode too
    os.replace(files[3], tmp_path / "keep.png")
    (tmp_path / "keep.png").rename(files[3])  # same file back: same inode, a hit
    assert hash_records(list_dataset(data)[0], cache)[2] == {"hashed": 0, "cached": 12}
    st3 = files[3].stat()
    copy = files[3].with_name("copy.bin")
    copy.write_bytes(files[3].read_bytes())
    os.utime(copy, ns=(st3.st_atime_ns, st3.st_mtime_ns))
    os.replace(copy, files[3])
    assert hash_records(list_dataset(data)[0], cache)[2] == {"hashed": 1, "cached": 11}


def test_a_cache_without_inodes_is_used_and_gets_them(tmp_path: Path) -> None:
    """A hash cache written before inodes were recorded still hits (size + mtime) and is rewritten with inodes."""
    data = make_color_dataset(tmp_path / "data", per_class=2, splits=("",))  # 6 files
    cache = tmp_path / "hashes.parquet"
    hash_listing(open_listing(data), cache)
    old = pq.read_table(cache).drop_columns(["ino"])
    pq.write_table(old, cache)
    assert hash_listing(open_listing(data), cache)[2] == {"hashed": 0, "cached": 6}
    inos = pq.read_table(cache).column("ino").to_pylist()
    assert sorted(inos) == sorted(p.stat().st_ino for p in data.rglob("*.png"))


def test_a_killed_columnar_run_resumes_from_its_journal(tmp_path: Path) -> None:
    data = make_color_dataset(tmp_path / "data", per_class=5, splits=("",))  # 15 files
    cache = tmp_path / "cache" / "hashes-x.parquet"
    stream = iter_hashed_tables(open_listing(data), cache, chunk_size=4)
    done = [next(stream), next(stream)]
    stream.close()  # killed after 8 files
    assert sum(len(t) for t, _ in done) == 8 and not cache.exists()
    assert len(list(cache.parent.glob("hashes-x.journal-*.arrows"))) == 1
    table, _, stats = hash_listing(open_listing(data), cache, chunk_size=4)
    assert stats == {"hashed": 7, "cached": 8} and len(table) == 15
    assert cache.is_file() and not list(cache.parent.glob("*.journal-*"))


def _retained_bytes(fn) -> tuple[object, int, int]:
    """``fn()``'s result, the bytes it keeps (Python heap via tracemalloc + Arrow's pool) and the Python heap peak."""
    gc.collect()
    arrow0 = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        out = fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, current + pa.total_allocated_bytes() - arrow0, peak


@pytest.mark.parametrize("n", [20_000])
def test_memory_per_listed_file_is_bounded(tmp_path: Path, n: int) -> None:
    """Planning 20k files keeps < 160 B per file (25-character paths; measured ~100 B) and the Python heap peaks
    under 320 B per file on a rerun. The record path (one ImageRecord per file) keeps ~520 B / peaks ~610 B per
    file: it fails both bounds, checked here as the peer."""
    data = tmp_path / "data"
    for c in range(20):
        (data / f"class_{c:03d}").mkdir(parents=True)
    for i in range(n):
        (data / f"class_{i % 20:03d}" / f"img_{i:07d}.png").write_bytes(i.to_bytes(4, "little"))
    cache = tmp_path / "hashes.parquet"
    hash_listing(open_listing(data), cache)  # first run: fills the cache
    table, kept, peak = _retained_bytes(lambda: hash_listing(open_listing(data), cache)[0])
    assert len(table) == n and table.digests.dtype == np.dtype("S32")
    assert kept / n < 160, f"{kept / n:.0f} B per listed file"
    assert peak / n < 320, f"{peak / n:.0f} B per listed file at peak"
    del table
    records, kept_old, peak_old = _retained_bytes(lambda: hash_records(list_dataset(data)[0], cache)[0])
    assert len(records) == n and kept_old / n > 160 and peak_old / n > 320


def test_the_planner_keeps_a_record_table_and_a_noop_rerun_hashes_nothing(tmp_path: Path) -> None:
    """plan_extraction keeps the listing as a RecordTable; after a run, replanning hashes 0 files and has nothing to
    do; a file replaced in place (same size and mtime, new inode) is hashed again and planned for extraction."""
    from tasks.extract.features import ExtractConfig, plan_extraction, run_extraction

    data = make_color_dataset(tmp_path / "data", per_class=3, splits=("",))  # 9 files
    cfg = ExtractConfig(data=str(data), store=str(tmp_path / "store"), model="tiny_models:build", weights="none",
                        progress=False, num_workers=0)
    run_extraction(cfg)
    plan, _ = plan_extraction(cfg)
    assert isinstance(plan.records, RecordTable) and len(plan.records) == 9
    assert plan.hash_stats == {"hashed": 0, "cached": 9} and plan.todo == []
    f = sorted(data.rglob("*.png"))[0]
    st = f.stat()
    other = make_color_dataset(tmp_path / "other", per_class=1, splits=("",), seed=7)
    new_bytes = sorted(other.rglob("*.png"))[0].read_bytes()
    tmp = f.with_name("tmp.bin")
    tmp.write_bytes(new_bytes[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, f)
    plan, _ = plan_extraction(cfg)
    assert plan.hash_stats == {"hashed": 1, "cached": 8}
    assert [r.path for r in plan.todo] == [f.relative_to(data).as_posix()]
