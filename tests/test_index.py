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
