"""PCA / t-SNE maps: scikit-learn equivalence, cluster separation, determinism, small N, NaN refusal, the
stored map artefact, the CLI and (once) the Prefect flow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA

from maps_fixtures import clusters, write_features
from storage.errors import ChecksumError
from storage.manifest import read_manifest
from storage.maps import read_coords
from storage.paths import Store
from tasks.maps.projection import (
    MapConfig,
    PCAAccumulator,
    build_map,
    clamp_perplexity,
    fit_pca,
    knn_label_agreement,
    trustworthiness_sample,
    tsne_embed,
)


def _matrix(n: int = 300, d: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(6.0, 0.2, d)
    return (rng.normal(size=(n, d)) * scales + 50.0 + rng.normal(size=d)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ PCA


def test_pca_equals_sklearn_components_up_to_sign_and_variance():
    x = _matrix()
    ours = fit_pca(x, 10, solver="exact")
    ref = PCA(n_components=10, svd_solver="full").fit(x.astype(np.float64))
    signs = np.sign((ours.components * ref.components_).sum(axis=1))
    assert np.all(signs != 0)
    np.testing.assert_allclose(ours.components * signs[:, None], ref.components_, atol=1e-6)
    np.testing.assert_allclose(ours.explained_variance, ref.explained_variance_, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.mean, ref.mean_, atol=1e-5)
    np.testing.assert_allclose(ours.transform(x) * signs, ref.transform(x.astype(np.float64)), atol=1e-3)


def test_pca_streamed_batches_equal_one_shot():
    x = _matrix(n=257)
    acc = PCAAccumulator(x.shape[1])
    for start in range(0, len(x), 37):  # odd batch sizes, first batch small
        acc.add(x[start:start + 37])
    a, b = acc.result(5), fit_pca(x, 5)
    np.testing.assert_allclose(a.components, b.components, atol=1e-9)
    np.testing.assert_allclose(a.explained_variance, b.explained_variance, rtol=1e-9)


def test_randomized_pca_close_to_exact():
    x = _matrix()
    r = fit_pca(x, 3, solver="randomized", seed=0)
    e = fit_pca(x, 3, solver="exact")
    cos = np.abs((r.components * e.components).sum(axis=1))
    assert cos.min() > 0.99
    np.testing.assert_allclose(r.explained_variance, e.explained_variance, rtol=1e-3)


def test_pca_refuses_nan_and_bad_components():
    x = _matrix()
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_pca(x, 2)
    with pytest.raises(ValueError, match="n_components"):
        fit_pca(_matrix(n=5, d=4), 6)


# ---------------------------------------------------------------------------------------------------- t-SNE


def test_tsne_keeps_separated_clusters_apart():
    x, lab = clusters(n_per=50, k=5, d=30)
    res = tsne_embed(x, seed=0)
    assert res.coords.shape == (250, 2) and res.coords.dtype == np.float32
    assert knn_label_agreement(res.coords, lab, k=10) >= 0.95
    # a random 2-d layout of the same labels does not pass the same bar (the check is meaningful)
    rand = np.random.default_rng(0).normal(size=(250, 2))
    assert knn_label_agreement(rand, lab, k=10) < 0.5
    assert res.info["k_neighbors"] == 90 and res.info["knn"].startswith("faiss")


def test_tsne_auto_stop_runs_fewer_iterations_with_the_same_quality():
    from sklearn.manifold import trustworthiness

    x, lab = clusters(n_per=80, k=5, d=30)
    auto = tsne_embed(x, seed=0)
    full = tsne_embed(x, seed=0, auto_stop=False)
    assert full.info["iterations_run"] == [250, 500]
    assert sum(auto.info["iterations_run"]) < 750 and auto.info["auto_stop"]
    assert knn_label_agreement(auto.coords, lab, k=10) >= 0.95
    t_auto = trustworthiness(x, auto.coords, n_neighbors=10)
    t_full = trustworthiness(x, full.coords, n_neighbors=10)
    assert t_auto >= t_full - 0.02


def test_tsne_same_seed_identical_other_seed_different():
    x, _ = clusters(n_per=30, k=3, d=10)
    a = tsne_embed(x, seed=3)
    b = tsne_embed(x, seed=3)
    c = tsne_embed(x, seed=4, init=None, exaggeration=None, max_fit=60)  # sample-fit path with another seed
    assert np.array_equal(a.coords, b.coords)
    assert not np.array_equal(a.coords, c.coords)


def test_tsne_small_n_clamps_perplexity():
    assert clamp_perplexity(30, 10) == (3.0, 9)
    assert clamp_perplexity(5, 1000) == (5.0, 15)
    x, lab = clusters(n_per=4, k=3, d=8)
    res = tsne_embed(x, perplexity=30, seed=0)
    assert res.info["effective_perplexity"] == pytest.approx(11 / 3)
    assert np.isfinite(res.coords).all() and res.coords.shape == (12, 2)
    with pytest.raises(ValueError, match="at least 4"):
        tsne_embed(x[:3])


def test_tsne_fit_on_sample_places_the_rest_with_transform():
    x, lab = clusters(n_per=60, k=4, d=16)
    res = tsne_embed(x, seed=0, max_fit=120)
    assert res.info["fitted_rows"] == 120 and res.info["transformed_rows"] == 120
    assert np.isfinite(res.coords).all()
    assert knn_label_agreement(res.coords, lab, k=10) >= 0.95


def test_tsne_refuses_nan():
    x, _ = clusters(n_per=10, k=2, d=5)
    x[3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        tsne_embed(x)


def test_quality_helpers():
    x, lab = clusters(n_per=20, k=3, d=6)
    assert knn_label_agreement(x, lab, k=5) == 1.0
    assert knn_label_agreement(x, [None] * len(x)) is None
    mixed = lab.copy()
    mixed[::2] = "other"
    assert knn_label_agreement(x, mixed, k=5) < 0.9
    assert trustworthiness_sample(x, x[:, :2]) < trustworthiness_sample(x, x) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ artefacts


@pytest.fixture
def cluster_store(tmp_path):
    x, lab = clusters(n_per=40, k=4, d=64)
    ids = [f"{i:064x}" for i in range(len(x))]
    ids[1] = ids[0]  # identical files at two paths: one map row per feature row, image_id repeats
    write_features(tmp_path / "store", x, lab, ids=ids, images=False)
    return tmp_path / "store", x, lab


def test_build_tsne_map_artefact(cluster_store):
    store, x, lab = cluster_store
    m = build_map(MapConfig(store=str(store), method="tsne", seed=0))
    adir = Store(store).artefact_dir("maps", m["artefact_id"])
    assert m["reused"] is False and m["kind"] == "maps" and m["source"] == "synthetic-features"
    df = read_coords(adir, m)
    assert list(df.columns) == ["row", "image_id", "path", "label", "x", "y"]
    assert len(df) == len(x) and df["path"].is_unique and df["image_id"].iloc[0] == df["image_id"].iloc[1]
    assert df["row"].tolist() == list(range(len(x)))
    assert df["label"].tolist() == list(lab)
    q = m["quality"]
    assert q["knn_label_agreement_map"] >= 0.95 and q["knn_label_agreement_full"] == 1.0
    assert 0.9 <= q["trustworthiness"] <= 1.0
    assert m["pca"]["n_components"] == 50 and m["tsne"]["effective_perplexity"] == 30.0
    roles = {f["role"] for f in m["files"]}
    assert roles == {"coords", "scatter", "reference"}
    assert m["library_versions"]["openTSNE"] and m["seed"] == 0
    # rerun: same id, reused, nothing recomputed; forced rebuild: identical coordinates (seeded)
    again = build_map(MapConfig(store=str(store), method="tsne", seed=0))
    assert again["artefact_id"] == m["artefact_id"] and again["reused"] is True
    forced = build_map(MapConfig(store=str(store), method="tsne", seed=0, force=True))
    assert forced["reused"] is False
    np.testing.assert_array_equal(read_coords(adir)[["x", "y"]].to_numpy(), df[["x", "y"]].to_numpy())
    # a different seed is a different artefact
    other = build_map(MapConfig(store=str(store), method="tsne", seed=1))
    assert other["artefact_id"] != m["artefact_id"]


def test_build_pca_map_matches_sklearn_and_detects_tampering(cluster_store):
    store, x, lab = cluster_store
    m = build_map(MapConfig(store=str(store), method="pca"))
    ref = PCA(2, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(m["pca"]["explained_variance"], ref.explained_variance_, rtol=1e-6)
    adir = Store(store).artefact_dir("maps", m["artefact_id"])
    df = read_coords(adir, m)
    proj = ref.transform(x.astype(np.float64))
    for j, axis in enumerate("xy"):
        assert abs(np.corrcoef(df[axis], proj[:, j])[0, 1]) > 0.99999
    coords = adir / "coords.parquet"
    coords.write_bytes(coords.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumError):
        read_coords(adir, m)
    rebuilt = build_map(MapConfig(store=str(store), method="pca"))  # a corrupt map is rebuilt, not reused
    assert rebuilt["reused"] is False and len(read_coords(adir, rebuilt)) == len(x)


def test_build_map_refuses_nan_features_naming_the_image(tmp_path):
    x, lab = clusters(n_per=10, k=2, d=8)
    x[5, 2] = np.nan
    write_features(tmp_path / "store", x, lab, images=False)
    with pytest.raises(ValueError, match=r"1 of .* NaN or Inf.*img/0005\.png"):
        build_map(MapConfig(store=str(tmp_path / "store"), method="pca"))
    assert not list(Store(tmp_path / "store").iter_artefacts("maps"))


def test_build_map_tiny_set_and_3d(tmp_path):
    x, lab = clusters(n_per=3, k=3, d=8)  # 9 rows: perplexity clamps to 8/3
    write_features(tmp_path / "store", x, lab, images=False)
    m = build_map(MapConfig(store=str(tmp_path / "store"), method="tsne", dim=3, pca_first=5))
    assert m["tsne"]["effective_perplexity"] == pytest.approx(8 / 3)
    df = read_coords(Store(tmp_path / "store").artefact_dir("maps", m["artefact_id"]))
    assert list(df.columns)[-3:] == ["x", "y", "z"] and np.isfinite(df[["x", "y", "z"]].to_numpy()).all()


def test_cli_project_and_errors(cluster_store, capsys):
    from flows.cli import main

    store, x, _ = cluster_store
    assert main(["--no-prefect", "project", "--store", str(store), "--method", "pca", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "pca" and out["rows"] == len(x) and len(out["explained_variance_ratio"]) == 2
    assert main(["--no-prefect", "project", "--store", str(store), "--method", "tsne", "--perplexity", "-1"]) == 2
    assert "perplexity" in capsys.readouterr().err
    assert main(["--no-prefect", "project", "--store", str(store / "nope"), "--method", "pca"]) == 2


def test_maps_flow_through_prefect(prefect_server, tmp_path):
    from flows.project import maps_flow

    x, lab = clusters(n_per=12, k=3, d=16)
    write_features(tmp_path / "store", x, lab, dataset_root=tmp_path / "data")
    out = maps_flow(store=str(tmp_path / "store"))
    assert out["pca"]["method"] == "pca" and out["tsne"]["method"] == "tsne"
    assert out["grid"]["filled"] == 36 and out["grid"]["missing_images"] == 0
    m = read_manifest(Store(tmp_path / "store").artefact_dir("maps", out["tsne"]["map_id"]), verify=True)
    assert {"coords", "scatter", "grid", "grid-cells"} <= {f["role"] for f in m["files"]}


# ------------------------------------------------------------- sample + placement, incremental maps, UMAP


def _publish(store, feats, labels, paths, created, aid="nightly-features"):
    """Publish ``feats`` as the feature artefact ``aid`` with an explicit ``created`` (a later night's
    republication of the same artefact, as the nightly run does). No images."""
    from storage.features import PartWriter
    from storage.manifest import write_manifest

    n, d = feats.shape
    adir = Store(store).artefact_dir("features", aid, create=True)
    w = PartWriter(adir, d, False, part_rows=max(1, (n + 2) // 3))
    w.add([{"image_id": f"id-{p}", "path": p, "label": lab, "split": None, "width": 16, "height": 16}
           for p, lab in zip(paths, labels)], np.ascontiguousarray(feats, np.float32))
    files = [dict(e, role="part") for e in w.close()]
    write_manifest(adir, {"kind": "features", "artefact_id": aid, "dataset_root": str(store), "dim": d, "rows": n,
                          "with_preds": False, "extra_columns": [], "model": {"arch": "synthetic", "weights": "none"},
                          "layer": {"alias": None, "name": "synthetic", "side": "output"}, "files": files,
                          "created": created})
    return aid


def _reference(store, m):
    from tasks.maps.projection import MapReference

    entry = next(f for f in m["files"] if f["role"] == "reference")
    return MapReference.from_bytes((Store(store).artefact_dir("maps", m["artefact_id"]) / entry["name"]).read_bytes())


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_sample_fit_places_every_row_and_keeps_the_fitted_coordinates(tmp_path, method):
    from tasks.maps.projection import umap_available

    if method == "umap" and not umap_available():
        pytest.skip("umap-learn is not installed")
    x, lab = clusters(n_per=60, k=4, d=24)
    write_features(tmp_path / "store", x, lab, images=False)
    m = build_map(MapConfig(store=str(tmp_path / "store"), method=method, max_fit=100, pca_first=10, seed=0))
    df = read_coords(Store(tmp_path / "store").artefact_dir("maps", m["artefact_id"]), m)
    xy = df[["x", "y"]].to_numpy()
    assert len(df) == len(x) and np.isfinite(xy).all()
    info = m[method]
    assert info["fitted_rows"] == 100 and info["transformed_rows"] == len(x) - 100
    ref = _reference(tmp_path / "store", m)
    assert ref.method == method and len(ref.fit_rows) == 100 and ref.fit_x.shape == (100, 10)
    # the fitted rows sit exactly where the fit put them; the placed rows land among their own cluster
    np.testing.assert_array_equal(xy[ref.fit_rows], ref.fit_y.astype(np.float32))
    placed = np.setdiff1d(np.arange(len(x)), ref.fit_rows)
    assert knn_label_agreement(xy, lab, k=10, queries=placed) >= 0.95
    assert m["reference"]["fitted_rows"] == 100 and m["reference"]["pca"] is True


def test_umap_map_builds_on_a_small_set(cluster_store):
    from tasks.maps.projection import umap_available

    if not umap_available():
        pytest.skip("umap-learn is not installed")
    store, x, lab = cluster_store
    m = build_map(MapConfig(store=str(store), method="umap", seed=0))
    assert m["method"] == "umap" and m["umap"]["knn"].startswith("faiss") and m["umap"]["fitted_rows"] == len(x)
    assert m["quality"]["knn_label_agreement_map"] >= 0.95
    df = read_coords(Store(store).artefact_dir("maps", m["artefact_id"]), m)
    again = build_map(MapConfig(store=str(store), method="umap", seed=0, force=True))  # seeded: reproducible
    np.testing.assert_array_equal(read_coords(Store(store).artefact_dir("maps", again["artefact_id"]))[["x", "y"]].to_numpy(),
                                  df[["x", "y"]].to_numpy())


@pytest.mark.parametrize("method", ["tsne", "pca", "umap"])
def test_incremental_map_keeps_old_coordinates_bit_for_bit(tmp_path, method):
    from tasks.maps.projection import umap_available

    if method == "umap" and not umap_available():
        pytest.skip("umap-learn is not installed")
    store = tmp_path / "store"
    x, lab = clusters(n_per=50, k=4, d=20, seed=1)
    paths = [f"img/{i:04d}.png" for i in range(len(x))]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    night1 = np.sort(order[:160])                        # 160 images on night 1
    gone = night1[:5]                                    # 5 of them are deleted before night 2
    night2 = np.sort(np.r_[np.setdiff1d(night1, gone), order[160:]])  # + 40 new images
    _publish(store, x[night1], lab[night1], [paths[i] for i in night1], "2024-01-01T00:00:00+00:00")
    first = build_map(MapConfig(store=str(store), method=method, max_fit=120, pca_first=8, seed=0))
    old = read_coords(Store(store).artefact_dir("maps", first["artefact_id"]), first).set_index("path")

    _publish(store, x[night2], lab[night2], [paths[i] for i in night2], "2024-01-02T00:00:00+00:00")
    inc = build_map(MapConfig(store=str(store), method=method, max_fit=120, pca_first=8, seed=0, previous="auto"))
    assert inc["incremental"] == {"previous": first["artefact_id"], "previous_created": first["created"],
                                  "previous_rows": 160, "kept": 155, "placed": 40, "dropped": 5}
    new = read_coords(Store(store).artefact_dir("maps", inc["artefact_id"]), inc).set_index("path")
    assert len(new) == len(night2) and new["row"].tolist() == list(range(len(night2)))
    kept = new.index.intersection(old.index)
    assert len(kept) == 155
    for axis in ("x", "y"):  # bit for bit
        assert new.loc[kept, axis].to_numpy().tobytes() == old.loc[kept, axis].to_numpy().tobytes()
    added = new.index.difference(old.index)
    assert len(added) == 40 and np.isfinite(new.loc[added, ["x", "y"]].to_numpy()).all()
    if method != "pca":  # new images land among their own class
        xy = new[["x", "y"]].to_numpy()
        queries = np.flatnonzero(new.index.isin(added))
        assert knn_label_agreement(xy, new["label"].tolist(), k=10, queries=queries) >= 0.9
    else:  # a PCA map projects the new rows with yesterday's PCA (not a refit)
        ref = _reference(store, first)
        rows = [paths.index(p) for p in added]
        np.testing.assert_allclose(new.loc[added, ["x", "y"]].to_numpy(), ref.reduce(x[rows])[:, :2], atol=1e-5)
    assert {"coords", "reference", "scatter"} <= {f["role"] for f in inc["files"]}
    # the same night again reuses the incremental map; an explicit --previous of other parameters is refused
    again = build_map(MapConfig(store=str(store), method=method, max_fit=120, pca_first=8, seed=0, previous="auto"))
    assert again["reused"] and again["artefact_id"] == inc["artefact_id"]
    with pytest.raises(ValueError, match="same method and parameters"):
        build_map(MapConfig(store=str(store), method=method, max_fit=120, pca_first=8, seed=1,
                            previous=first["artefact_id"]))


def test_incremental_auto_refits_when_the_reference_is_too_small(tmp_path):
    store = tmp_path / "store"
    x, lab = clusters(n_per=40, k=3, d=12)
    paths = [f"img/{i:04d}.png" for i in range(len(x))]
    _publish(store, x[:30], lab[:30], paths[:30], "2024-01-01T00:00:00+00:00")
    first = build_map(MapConfig(store=str(store), method="tsne", pca_first=8, seed=0))
    _publish(store, x, lab, paths, "2024-01-02T00:00:00+00:00")  # 4x the rows: the 30-row fit is too small
    m = build_map(MapConfig(store=str(store), method="tsne", pca_first=8, seed=0, previous="auto"))
    assert m["incremental"] is None and m["tsne"]["fitted_rows"] == len(x) and m["artefact_id"] != first["artefact_id"]


def test_cli_project_umap_and_previous(cluster_store, capsys):
    from flows.cli import main
    from tasks.maps.projection import umap_available

    store, x, _ = cluster_store
    assert main(["--no-prefect", "project", "--store", str(store), "--method", "pca", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["--no-prefect", "project", "--store", str(store), "--method", "tsne", "--previous", first["map_id"]]) == 2
    assert "same method and parameters" in capsys.readouterr().err
    if umap_available():
        assert main(["--no-prefect", "project", "--store", str(store), "--method", "umap", "--n-neighbors", "10",
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["method"] == "umap" and out["n_neighbors"] == 10 and out["rows"] == len(x)


# ------------------------------------------------------------------------------- approximate kNN above a size


def test_map_knn_is_exact_up_to_the_threshold_and_ivf_above_it():
    from tasks.core.faiss_index import knn_search
    from tasks.maps.projection import KNN_EXACT_MAX_ROWS, _L2Search, knn_spec

    assert knn_spec(KNN_EXACT_MAX_ROWS) is None
    spec = knn_spec(200_000)
    assert spec == {"kind": "ivf-flat", "nlist": 1024, "nprobe": 64, "seed": 1234}
    x, _lab = clusters(n_per=800, k=5, d=16, seed=3)  # 4,000 rows
    spec = knn_spec(len(x), exact_max_rows=1000)
    assert spec is not None and spec["kind"] == "ivf-flat"
    search = _L2Search(x, spec)
    assert type(search.index).__name__ == "IndexIVFFlat" and search.index.nprobe == spec["nprobe"]
    idx, d2 = search.self_knn(10)
    exact_i, exact_d2 = knn_search(x, 10, metric="l2")
    assert not (idx == np.arange(len(x))[:, None]).any()  # never its own neighbour
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact_i)])
    assert recall >= 0.95
    same = idx == exact_i  # the hits it finds carry exact distances
    np.testing.assert_allclose(d2[same], exact_d2[same], rtol=1e-4, atol=1e-4)
    again_i, _ = _L2Search(x, spec).self_knn(10)  # seeded k-means: the same index, the same neighbours
    np.testing.assert_array_equal(again_i, idx)
    q = x[:50] + 0.01
    qi, qd = search.query(q, 7)
    assert qi.shape == (50, 7) and (qi >= 0).all() and np.isfinite(qd).all()


def test_approximate_knn_map_is_recorded_keyed_and_reused_for_placement(tmp_path, monkeypatch):
    """Above the threshold a map's fit and placement use the IVF search; the spec goes into the map's key and its
    reference, and an incremental build places with the stored spec even after the threshold moved back."""
    import tasks.maps.projection as projection

    store = tmp_path / "store"
    x, lab = clusters(n_per=60, k=4, d=20, seed=2)
    paths = [f"img/{i:04d}.png" for i in range(len(x))]
    night1 = np.arange(200)
    _publish(store, x[night1], lab[night1], [paths[i] for i in night1], "2024-01-01T00:00:00+00:00")
    exact = build_map(MapConfig(store=str(store), method="tsne", max_fit=120, pca_first=8, seed=0))
    assert exact["tsne"]["knn"] == "faiss exact L2" and "knn" not in _reference(store, exact).params

    specs: list = []
    real_init = projection._L2Search.__init__

    def spy(self, reference, spec=None):
        specs.append(spec)
        real_init(self, reference, spec)

    monkeypatch.setattr(projection._L2Search, "__init__", spy)
    monkeypatch.setattr(projection, "KNN_EXACT_MAX_ROWS", 100)
    approx = build_map(MapConfig(store=str(store), method="tsne", max_fit=120, pca_first=8, seed=0))
    assert approx["artefact_id"] != exact["artefact_id"]  # the approximate kNN is part of the map's identity
    assert approx["tsne"]["knn"].startswith("faiss IVF64,Flat")
    assert _reference(store, approx).params["knn"]["kind"] == "ivf-flat"
    assert specs and all(s is not None and s["kind"] == "ivf-flat" for s in specs)
    xy = read_coords(Store(store).artefact_dir("maps", approx["artefact_id"]), approx)[["x", "y"]].to_numpy()
    placed = np.setdiff1d(np.arange(200), _reference(store, approx).fit_rows)
    assert knn_label_agreement(xy, lab[night1], k=10, queries=placed) >= 0.95

    monkeypatch.setattr(projection, "KNN_EXACT_MAX_ROWS", 100_000)  # a later run: the stored spec still rules
    specs.clear()
    _publish(store, x, lab, paths, "2024-01-02T00:00:00+00:00")
    inc = build_map(MapConfig(store=str(store), method="tsne", max_fit=120, pca_first=8, seed=0,
                              previous=approx["artefact_id"]))
    assert inc["incremental"]["placed"] == len(x) - 200
    assert specs and all(s is not None and s["kind"] == "ivf-flat" for s in specs)


def test_compiled_init_graph_transform_is_bit_identical_to_umap_learns():
    from tasks.maps.projection import _init_graph_transform, umap_available

    if not umap_available():
        pytest.skip("umap-learn is not installed")
    import scipy.sparse as sp
    from umap.umap_ import init_graph_transform

    rng = np.random.default_rng(5)
    n, m, k = 400, 300, 15
    rows = np.repeat(np.arange(n), k)
    cols = rng.integers(0, m, n * k)
    vals = rng.random(n * k).astype(np.float32)
    vals[rng.random(n * k) < 0.2] = 0.0     # eliminated below: rows of every length, some empty
    vals[:k] = 0.0                          # row 0: no neighbour -> NaN
    vals[k:2 * k] = 1.0                     # row 1: an exact copy of a fitted row
    vals[2 * k + 3] = 1.0                   # row 2: a weight of 1 after three others
    csr = sp.coo_matrix((vals, (rows, cols)), shape=(n, m)).tocsr()
    csr.eliminate_zeros()
    tail = rng.normal(size=(m, 2)).astype(np.float32) * 10
    ours, theirs = _init_graph_transform(csr, tail), init_graph_transform(csr, tail)
    assert np.isnan(theirs[0]).all() and np.isnan(ours[0]).all()
    assert ours[1:].tobytes() == theirs[1:].tobytes()
