"""Index building: exact results vs NumPy, IVF-PQ recall, incremental updates, staleness, checksums, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index_fixtures import clustered, write_feature_artefact
from storage.errors import ChecksumError
from storage.index_store import file_with_role, read_knn_graph
from storage.paths import Store
from tasks.index.build import IndexConfig, build_index
from tasks.index.neighbors import knn_graph, neighbors, open_index, query_vectors


def _brute(x: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy all-vs-all kNN without self: (idx, dist) with dist = 1 - cos or squared L2."""
    x = x.astype(np.float64)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1.0 - xn @ xn.T
    else:
        sq = (x * x).sum(1)
        d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_matches_numpy_bruteforce(tmp_path: Path, metric: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    store = tmp_path / "store"
    write_feature_artefact(store, x)
    m = build_index(IndexConfig(store=str(store), metric=metric))
    assert m["rows"] == 300 and m["factory"] == "Flat" and m["metric"] == metric
    exp_i, exp_d = _brute(x, metric, 10)
    # per-query API
    oi = open_index(str(store), metric=metric)
    res = query_vectors(oi, x[:50], 10, exclude_rows=None)
    for qi, df in enumerate(res):
        assert df["row"].iloc[0] == qi  # each vector finds itself first
    # all-rows kNN graph equals the brute force (self excluded)
    knn_graph(str(store), k=10, metric=metric)
    s = Store(store)
    adir = s.artefact_dir("indexes", m["artefact_id"])
    from storage.manifest import read_manifest

    g = read_knn_graph(adir, read_manifest(adir), 10).sort_values(["row", "rank"])
    got_i = g["neighbor_row"].to_numpy().reshape(300, 10)
    got_d = g["distance"].to_numpy().reshape(300, 10)
    np.testing.assert_allclose(got_d, exp_d, rtol=1e-4, atol=1e-4)
    assert (got_i == exp_i).mean() > 0.99  # identical up to float ties
    assert set(g.columns) >= {"image_id", "rank", "neighbor_id", "distance"}
    # one query by id: same as the brute-force row
    df = neighbors(str(store), image_id=f"{7:064x}", k=5, index_id=m["artefact_id"])
    assert list(df["row"]) == list(exp_i[7, :5])
    np.testing.assert_allclose(df["distance"], exp_d[7, :5], rtol=1e-4, atol=1e-4)


def test_ivfpq_recall_on_clustered_set(tmp_path: Path) -> None:
    """IVF-PQ (trained on a sample) keeps recall@10 >= 0.9 vs exact search on 100 tight clusters of 12 points."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(100, 16))
    lab = np.repeat(np.arange(100), 12)
    x = (centers[lab] + 0.3 * rng.normal(size=(1200, 16))).astype(np.float32)
    store = tmp_path / "store"
    write_feature_artefact(store, x)
    m = build_index(IndexConfig(store=str(store), factory="IVF32,PQ8np", train_rows=1000, nprobe=8))
    assert m["train_rows"] == 1000 and m["nlist"] == 32 and m["nprobe"] == 8
    oi = open_index(str(store), index_id=m["artefact_id"])
    q = np.arange(0, 1200, 4)
    res = query_vectors(oi, x[q], 11)
    exp_i, _ = _brute(x, "cosine", 10)
    recall = np.mean([len(set(df["row"]) - {qi} & set(exp_i[qi])) / 10 for qi, df in zip(q, res)])
    assert recall >= 0.9, recall
    oi1 = open_index(str(store), index_id=m["artefact_id"], nprobe=1)  # nprobe is settable at query time
    res1 = query_vectors(oi1, x[q], 11)
    assert any(list(a["row"]) != list(b["row"]) for a, b in zip(res, res1))


def test_incremental_update_and_stale_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    store = tmp_path / "store"
    write_feature_artefact(store, x[:100], created="2024-01-01T00:00:00+00:00")
    m1 = build_index(IndexConfig(store=str(store)))
    assert m1["build"]["mode"] == "full" and m1["rows"] == 100
    assert build_index(IndexConfig(store=str(store)))["build"]["mode"] == "reused"
    write_feature_artefact(store, x, created="2024-02-01T00:00:00+00:00")  # the feature table grew
    df = neighbors(str(store), image_id=f"{3:064x}", k=3)
    assert df.attrs["stale"] and "older than its features" in df.attrs["stale"]
    with pytest.raises(ValueError, match="unknown image_id.*older than its features"):
        neighbors(str(store), image_id=f"{110:064x}", k=3)
    m2 = build_index(IndexConfig(store=str(store)))
    assert m2["artefact_id"] == m1["artefact_id"]
    assert m2["build"]["mode"] == "incremental" and m2["build"]["added"] == 20 and m2["rows"] == 120
    df = neighbors(str(store), image_id=f"{110:064x}", k=5)
    assert df.attrs["stale"] is None
    exp_i, _ = _brute(x, "cosine", 5)
    assert list(df["row"]) == list(exp_i[110])  # appended rows keep feature order here


def test_corrupted_index_names_checksum_mismatch(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_feature_artefact(store, np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32))
    m = build_index(IndexConfig(store=str(store)))
    adir = Store(store).artefact_dir("indexes", m["artefact_id"])
    f = adir / file_with_role(m, "index")["name"]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"checksum mismatch for index file .*\.faiss"):
        neighbors(str(store), image_id=f"{1:064x}")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        build_index(IndexConfig(store=str(store)))  # never reported as up to date
    assert build_index(IndexConfig(store=str(store), rebuild=True))["build"]["mode"] == "full"


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat,RFlat"])
def test_gpu_on_without_a_gpu_is_refused_for_streamed_builds_too(tmp_path: Path, factory: str) -> None:
    from tasks.core.faiss_index import gpu_available

    if gpu_available():
        pytest.skip("a GPU FAISS sees a GPU here")
    store = tmp_path / "store"
    write_feature_artefact(store, np.random.default_rng(3).normal(size=(200, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="--gpu on, but this FAISS has no GPU support"):
        build_index(IndexConfig(store=str(store), factory=factory, gpu="on"))
    assert build_index(IndexConfig(store=str(store), factory=factory, gpu="auto"))["build"]["device"] == "cpu"


def test_bad_factory_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    store = tmp_path / "store"
    x, _ = clustered(60, 8, 3)
    write_feature_artefact(store, x, labels=["a"] * 60)
    with pytest.raises(ValueError, match="index factory string"):
        build_index(IndexConfig(store=str(store), factory="NoSuchIndex99"))
    assert main(["--no-prefect", "index", "--store", str(store), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 60 and out["mode"] == "full"
    assert main(["--no-prefect", "neighbors", "--store", str(store), "--id", f"{4:064x}", "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in res["neighbors"]] == [1, 2, 3] and res["query"]["path"] == "img/00004.png"
    assert main(["--no-prefect", "neighbors", "--store", str(store), "--id", "deadbeefdeadbeef"]) == 2
    assert "unknown image_id 'deadbeefdeadbeef'" in capsys.readouterr().err
    assert main(["--no-prefect", "neighbors", "--store", str(store), "--all", "-k", "4"]) == 0
    assert "kNN graph (k=4, 240 rows)" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x4fs,RFlat"])
def test_open_index_maps_the_index_file_read_only_with_the_same_results(tmp_path: Path, factory: str) -> None:
    """Searching stages map the index file (its vectors stay page cache, not anonymous memory) and get exactly
    what a copy read into memory gives; the index builder still reads a writable copy (incremental adds)."""
    from storage.index_store import index_file_path
    from tasks.core.faiss_index import read_index_file

    x, _lab = clustered(n=2000, d=32, centers=8, seed=2)
    store = tmp_path / "store"
    write_feature_artefact(store, x)
    m = build_index(IndexConfig(store=str(store), factory=factory, metric="l2"))
    oi = open_index(str(store), metric="l2")
    path = index_file_path(oi.adir, oi.manifest)
    maps = Path("/proc/self/maps").read_text()
    assert str(path.resolve()) in maps  # the file is mapped ...
    mapped_lines = [ln for ln in maps.splitlines() if ln.endswith(str(path.resolve()))]
    assert all(ln.split()[1].startswith("r-") for ln in mapped_lines)  # ... read-only
    copy = read_index_file(path)
    q = x[:64]
    d1, i1 = oi.cpu_index.search(q, 10)
    d0, i0 = copy.search(q, 10)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)
    np.testing.assert_array_equal(oi.cpu_index.reconstruct_n(0, 5), copy.reconstruct_n(0, 5))
    assert m["rows"] == 2000


@pytest.mark.parametrize(("factory", "metric"), [("Flat", "cosine"), ("Flat", "l2"), ("IVF16,PQ8x4fs,RFlat", "cosine"),
                                                 ("IVF8,Flat,RFlat", "l2")])
def test_streamed_index_file_is_byte_identical_to_faiss_write_index(tmp_path: Path, factory: str, metric: str) -> None:
    """The hand-written file layout (tasks.core.faiss_files) is FAISS's own, for a new index and for one reopened
    from its file and added to; reopening anything else is refused."""
    import faiss

    from tasks.core.faiss_files import StreamedIndex, streamable
    from tasks.core.faiss_index import finalize_index, new_index, prepare_vectors

    x = prepare_vectors(clustered(n=3000, d=32, centers=8, seed=5)[0], metric)
    ref = new_index(32, factory, metric)
    if not ref.is_trained:
        ref.train(x[:1500])
    spooled = StreamedIndex(faiss.clone_index(ref), tmp_path)
    k_factor = 7.0 if "RFlat" in factory else None
    for s in range(0, 2000, 700):  # batches of unequal size
        ref.add(x[s:min(s + 700, 2000)])
        spooled.add(x[s:min(s + 700, 2000)])
    finalize_index(ref, 4, k_factor)
    faiss.write_index(ref, str(tmp_path / "ref.faiss"))
    spooled.write(tmp_path / "streamed.faiss", 4, k_factor)
    spooled.close()
    assert (tmp_path / "streamed.faiss").read_bytes() == (tmp_path / "ref.faiss").read_bytes()
    # an incremental add continues the file: same bytes as FAISS adding to the index it read
    ref.add(x[2000:])
    faiss.write_index(ref, str(tmp_path / "ref2.faiss"))
    with StreamedIndex.open(tmp_path / "streamed.faiss", tmp_path) as again:
        assert again.ntotal == 2000
        again.add(x[2000:])
        again.write(tmp_path / "streamed2.faiss", 4, None)
    assert (tmp_path / "streamed2.faiss").read_bytes() == (tmp_path / "ref2.faiss").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.faiss", "ref2.faiss", "streamed.faiss", "streamed2.faiss"]
    assert streamable(ref)
    other = new_index(32, "IVF8,PQ8x4", metric)
    assert not streamable(other)
    other.train(x[:1500])
    faiss.write_index(other, str(tmp_path / "other.faiss"))
    with pytest.raises(ValueError, match="not a Flat or RFlat index file"):
        StreamedIndex.open(tmp_path / "other.faiss", tmp_path)
    cut = tmp_path / "cut.faiss"
    cut.write_bytes((tmp_path / "ref2.faiss").read_bytes()[:-1000])
    with pytest.raises(ValueError, match="base index ends|does not match|truncated|ends inside"):
        StreamedIndex.open(cut, tmp_path)


@pytest.mark.parametrize("factory", ["auto", "Flat"])
def test_streamed_build_publishes_what_the_in_memory_build_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     factory: str) -> None:
    """``convlens index`` keeps the exact vectors of Flat / RFlat in a spool file, not in memory: the published
    index and id map (full build, then an incremental add) hold the same rows as the in-memory build's, the index
    file is byte-identical, and nothing is left in the artefact directory."""
    import pyarrow.parquet as pq

    import tasks.index.build as build_mod
    from storage.manifest import read_manifest

    x, lab = clustered(n=1600, d=32, centers=8, seed=4)
    labels = [f"c{v}" for v in lab]
    edited = ["relabelled"] * 10 + labels[10:]  # labels edited between the builds: the id map follows them
    results = {}
    for how in ("streamed", "memory"):
        if how == "memory":
            monkeypatch.setattr(build_mod, "streamable", lambda _index: False)
        store = tmp_path / how
        write_feature_artefact(store, x[:1200], labels=labels[:1200], created="2024-01-01T00:00:00+00:00")
        cfg = IndexConfig(store=str(store), factory=factory, exact_max_rows=500, train_rows=1000, batch_rows=256)
        m1 = build_index(cfg)
        write_feature_artefact(store, x, labels=edited, created="2024-02-01T00:00:00+00:00")
        m2 = build_index(cfg)
        adir = Store(store).artefact_dir("indexes", m2["artefact_id"])
        results[how] = (m1, m2, adir)
        assert m1["build"]["streamed"] is (how == "streamed") and m2["build"]["streamed"] is (how == "streamed")
        assert m1["build"]["mode"] == "full" and m2["build"]["mode"] == "incremental" and m2["rows"] == 1600
        assert sorted(p.name for p in adir.iterdir() if p.name.startswith(".tmp")) == []
        assert len(read_manifest(adir)["files"]) == 2
    (s1, s2, sdir), (r1, r2, rdir) = results["streamed"], results["memory"]
    assert s1["factory"] == ("IVF64,PQ32x4fs,RFlat" if factory == "auto" else "Flat")
    for a, b in ((s1, r1), (s2, r2)):
        assert a["index_sha256"] == b["index_sha256"]
        assert (a["nprobe"], a["k_factor"], a["nlist"], a["train_rows"]) == (b["nprobe"], b["k_factor"], b["nlist"], b["train_rows"])
    ids = [pq.read_table(d / file_with_role(m, "idmap")["name"]).to_pandas().sort_values("row").reset_index(drop=True)
           for d, m in ((sdir, s2), (rdir, r2))]
    assert ids[0].equals(ids[1]) and list(ids[0]["row"]) == list(range(1600))
    assert list(ids[0]["label"]) == edited and list(ids[0]["image_id"]) == [f"{i:064x}" for i in range(1600)]
    df = neighbors(str(tmp_path / "streamed"), image_id=f"{1500:064x}", k=5, index_id=s2["artefact_id"])
    assert df["row"].iloc[0] != 1500 and df.attrs["stale"] is None


@pytest.mark.parametrize(("factory", "metric"), [("Flat", "cosine"), ("Flat", "l2"), ("IVF16,PQ8x4fs,RFlat", "cosine"),
                                                 ("IVF16,PQ8x4fs,RFlat", "l2")])
def test_search_file_streams_the_vectors_with_faiss_results(tmp_path: Path, factory: str, metric: str) -> None:
    """``search_file`` (the report's search: the stored vectors read in chunks, never mapped) returns what FAISS's
    own search of the same file returns: same neighbours, same distances up to float rounding."""
    from tasks.core.faiss_files import search_file
    from tasks.core.faiss_index import finalize_index, new_index, prepare_vectors, read_index_file

    x = prepare_vectors(clustered(n=3000, d=32, centers=8, seed=6)[0], metric)
    ix = new_index(32, factory, metric)
    if not ix.is_trained:
        ix.train(x)
    ix.add(x)
    finalize_index(ix, 4, 5.0 if "RFlat" in factory else None)
    path = tmp_path / "ix.faiss"
    import faiss

    faiss.write_index(ix, str(path))
    ref = read_index_file(path)
    q = x[::37] + 0.01  # 82 queries, not stored rows
    for k in (1, 10):
        d0, i0 = ref.search(q, k)
        d1, i1 = search_file(path, q, k, chunk_rows=700)  # chunks that split the rows unevenly
        np.testing.assert_allclose(d1, d0, rtol=1e-4, atol=1e-4)
        assert (i1 == i0).mean() > 0.99  # the same rows up to float ties
    from tasks.core.faiss_files import read_vectors

    np.testing.assert_array_equal(read_vectors(path, [2999, 5, 5, 0]), x[[2999, 5, 5, 0]])  # as added
    with pytest.raises(ValueError, match="rows must be in"):
        read_vectors(path, [3000])
    few = new_index(32, factory if factory == "Flat" else "Flat", metric)
    few.add(x[:3])
    faiss.write_index(few, str(tmp_path / "few.faiss"))
    d, i = search_file(tmp_path / "few.faiss", q[:2], 5)
    assert (i[:, 3:] == -1).all() and sorted(i[0, :3]) == [0, 1, 2]
    with pytest.raises(ValueError, match="expected"):
        search_file(path, q[:, :8], 3)
