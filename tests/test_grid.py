"""The t-SNE image grid and the scatter: assignment, size and filled cells, missing images, artefact files."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maps_fixtures import CLUSTER_COLOURS, clusters, write_features
from storage.manifest import read_manifest
from storage.paths import Store
from tasks.maps.grid import assign_grid, default_size, make_grid, parse_size, render_grid
from tasks.maps.plots import render_scatter
from tasks.maps.projection import MapConfig, build_map


def test_parse_and_default_size():
    assert parse_size("32x32") == (32, 32) and parse_size("4x6") == (4, 6) and parse_size("5") == (5, 5)
    assert parse_size(None) is None and parse_size("auto") is None
    for bad in ("0x3", "axb", "1x2x3", "600x2"):
        with pytest.raises(ValueError, match="--size"):
            parse_size(bad)
    assert default_size(150) == (12, 12) and default_size(10_000) == (32, 32) and default_size(1) == (1, 1)


@pytest.mark.parametrize("method", ["lap", "greedy"])
def test_assignment_fills_every_cell_with_distinct_images(method):
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(500, 2))
    cell_to_row, cost = assign_grid(xy, 8, 10, method)
    assert cell_to_row.shape == (80,) and (cell_to_row >= 0).all()
    assert len(np.unique(cell_to_row)) == 80 and cost > 0


def test_lap_puts_each_point_of_a_perfect_lattice_in_its_own_cell():
    rows, cols = 4, 5
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    xy = np.stack([c.ravel(), (rows - 1 - r).ravel()], axis=1).astype(float)  # row 0 = top = largest y
    order = np.random.default_rng(1).permutation(len(xy))
    cell_to_row, cost = assign_grid(xy[order], rows, cols, "lap")
    np.testing.assert_array_equal(order[cell_to_row], np.arange(rows * cols))
    assert cost == pytest.approx(0.0, abs=1e-12)


def test_lap_on_candidates_for_large_n_is_near_optimal():
    rng = np.random.default_rng(2)
    xy = rng.uniform(size=(5000, 2))
    big, cost_big = assign_grid(xy, 30, 30, "lap")  # 4.5M pairs -> candidate LAP
    greedy, cost_greedy = assign_grid(xy, 30, 30, "greedy")
    assert (big >= 0).all() and len(np.unique(big)) == 900
    assert cost_big <= cost_greedy + 1e-12


def test_fewer_images_than_cells_leaves_cells_empty():
    xy = np.random.default_rng(3).normal(size=(7, 2))
    cell_to_row, _ = assign_grid(xy, 3, 3)
    assert (cell_to_row >= 0).sum() == 7 and sorted(cell_to_row[cell_to_row >= 0]) == list(range(7))


def test_render_grid_size_and_missing_files_grey(tmp_path):
    for i, rgb in enumerate(CLUSTER_COLOURS[:3]):
        Image.new("RGB", (20, 12), rgb).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    paths = ["0.png", "1.png", "2.png", "broken.png", "gone.png", "0.png"]
    png, missing = render_grid(np.arange(6), paths, tmp_path, 2, 3, thumb=10)
    img = Image.open(io.BytesIO(png))
    assert img.size == (30, 20) and img.mode == "RGB"
    assert missing.tolist() == [False, False, False, True, True, False]
    arr = np.asarray(img)
    assert tuple(arr[5, 5]) == CLUSTER_COLOURS[0] and tuple(arr[5, 15]) == CLUSTER_COLOURS[1]
    assert tuple(arr[15, 5]) == (128, 128, 128) and tuple(arr[15, 15]) == (128, 128, 128)


def test_render_scatter_png():
    xy = np.random.default_rng(0).normal(size=(50, 2))
    png = render_scatter(xy, ["a"] * 25 + [None] * 25, title="t", size_px=300)
    img = Image.open(io.BytesIO(png))
    assert img.size == (300, 300)
    assert png == render_scatter(xy, ["a"] * 25 + [None] * 25, title="t", size_px=300)  # deterministic bytes


def test_make_grid_on_a_tsne_map(tmp_path):
    x, lab = clusters(n_per=40, k=4, d=24)
    store = tmp_path / "store"
    write_features(store, x, lab, dataset_root=tmp_path / "data")
    (tmp_path / "data" / "img" / "0003.png").unlink()  # a vanished image must not crash the grid
    m = build_map(MapConfig(store=str(store), method="tsne"))
    out = make_grid(str(store), size="8x10", thumb=12, out=tmp_path / "copy.png", scatter_out=tmp_path / "s.png")
    assert out["map_id"] == m["artefact_id"] and out["size"] == "8x10" and out["filled"] == 80
    img = Image.open(out["grid_png"])
    assert img.size == (120, 96)
    assert (tmp_path / "copy.png").read_bytes() == open(out["grid_png"], "rb").read()
    assert Image.open(tmp_path / "s.png").size[0] > 100
    adir = Store(store).artefact_dir("maps", m["artefact_id"])
    man = read_manifest(adir, verify=True)
    assert man["created"] == m["created"] and man["grids"]["8x10"]["filled"] == 80
    assert {"grid-8x10.png", "grid-8x10.parquet", "coords.parquet", "scatter.png"} <= {f["name"] for f in man["files"]}
    cells = pd.read_parquet(adir / "grid-8x10.parquet")
    assert len(cells) == 80 and cells["row"].ge(0).all() and cells["row"].is_unique
    assert cells["missing"].sum() == man["grids"]["8x10"]["missing_images"] == int((cells["path"] == "img/0003.png").sum())
    # every filled cell shows its image: the pixel colour is the cluster colour of the assigned row's label
    names = sorted(set(lab))
    arr = np.asarray(img)
    for rec in cells.itertuples():
        px = tuple(arr[rec.cell_row * 12 + 6, rec.cell_col * 12 + 6])
        want = (128, 128, 128) if rec.missing else CLUSTER_COLOURS[names.index(rec.label)]
        assert px == want
    # same cells stay together: a cell's 4-neighbours mostly share its cluster (the map's structure survives)
    grid_lab = cells.sort_values(["cell_row", "cell_col"])["label"].to_numpy().reshape(8, 10)
    same = np.mean(np.concatenate([(grid_lab[:, 1:] == grid_lab[:, :-1]).ravel(), (grid_lab[1:] == grid_lab[:-1]).ravel()]))
    assert same > 0.8
    again = make_grid(str(store), size="8x10", thumb=12)
    assert again["reused"] is True


def test_grid_needs_a_map_and_picks_newest_tsne(tmp_path):
    from storage.errors import StoreError

    x, lab = clusters(n_per=10, k=2, d=8)
    store = tmp_path / "store"
    write_features(store, x, lab, dataset_root=tmp_path / "data")
    with pytest.raises(StoreError, match="convlens project"):
        make_grid(str(store))
    build_map(MapConfig(store=str(store), method="pca"))
    with pytest.raises(StoreError, match="tsne"):
        make_grid(str(store))  # the default is the newest t-SNE map, not any map
    pca_id = next(Store(store).iter_artefacts("maps"))[0]
    assert make_grid(str(store), map_id=pca_id)["filled"] == 16  # an explicit PCA map works too


def test_cli_grid(tmp_path, capsys):
    from flows.cli import main

    x, lab = clusters(n_per=10, k=2, d=8)
    store = tmp_path / "store"
    write_features(store, x, lab, dataset_root=tmp_path / "data")
    assert main(["--no-prefect", "project", "--store", str(store), "--method", "tsne"]) == 0
    assert main(["--no-prefect", "grid", "--store", str(store), "--size", "4x5", "--thumb", "8",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (40, 32)
    assert main(["--no-prefect", "grid", "--store", str(store), "--size", "zz"]) == 2
    assert "--size" in capsys.readouterr().err
