"""The million-image paths at small sizes: the report's binary scatter payload (quantised coordinates and colour
codes, decoded in Chromium and compared with the stored map coordinates), the streamed neighbour searches the
report uses at scale, and the benchmark's synthetic feature writer (through the store contract)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from maps_fixtures import clusters, write_features
from storage.paths import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_quantise_round_trip_within_half_a_step():
    from reports.scatter_data import QUANT_LEVELS, dequantise, encode_scatter, quantise

    rng = np.random.default_rng(0)
    xy = np.c_[rng.normal(0, 40, 5000), rng.uniform(-3, 7, 5000)].astype(np.float32)
    q, lo, hi = quantise(xy)
    assert q.dtype == np.uint16 and q.min() == 0 and q.max() == QUANT_LEVELS
    step = (hi - lo) / QUANT_LEVELS
    assert np.all(np.abs(dequantise(q, lo, hi) - xy) <= step / 2 + 1e-6 * np.abs(xy).max())
    flat = quantise(np.ones((3, 2)))  # a degenerate axis decodes to its single value
    assert np.allclose(dequantise(*flat), 1.0)
    p = encode_scatter({"m": xy}, {"label": {"idx": list(range(5000))}})  # > 256 categories: uint16 codes
    assert p["n"] == 5000 and p["color"]["label"]["bytes"] == 2
    assert np.array_equal(np.frombuffer(base64.b64decode(p["color"]["label"]["b64"]), "<u2"), np.arange(5000))
    assert np.array_equal(np.frombuffer(base64.b64decode(p["proj"]["m"]["b64"]), "<u2").reshape(-1, 2), q)


def test_streamed_neighbours_equal_exact_search(tmp_path):
    from reports.render import _knn_rows
    from reports.streamed import feature_knn, pixel_knn
    from storage.features import load_features
    from storage.manifest import read_manifest

    x, lab = clusters(n_per=40, k=5, d=16)
    write_features(tmp_path / "store", x, lab, images=False)
    fdir = Store(tmp_path / "store").artefact_dir("features", "synthetic-features")
    fman = read_manifest(fdir)
    _, feats = load_features(fdir, fman)
    q = np.array([0, 7, 55, 199])
    got = feature_knn(fdir, fman, q, 5)
    want = _knn_rows(feats, q, 5, "cosine")
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for r, g, w in zip(q, got, want):  # same neighbour distances (ties may pick other rows)
        assert r not in g
        np.testing.assert_allclose(np.sort(unit[g] @ unit[r]), np.sort(unit[w] @ unit[r]), atol=1e-5)
    pix = np.random.default_rng(1).integers(0, 256, (200, 48)).astype(np.uint8)
    usable = np.ones(200, bool)
    usable[[3, 9]] = False
    got = pixel_knn(pix, usable, q, 4)
    f = pix.astype(np.float32) / 255
    f[~usable] = 1e3
    for r, g in zip(q, got):
        d = ((f - f[r]) ** 2).sum(1)
        d[r] = np.inf
        assert 3 not in g and 9 not in g
        np.testing.assert_allclose(np.sort(d[g]), np.sort(d)[:4], rtol=1e-5)
    # an unreadable image gets no pixel neighbours; with no readable image there is nothing to search
    assert (pixel_knn(pix, usable, np.array([3, 7]), 4)[0] == -1).all()
    assert (pixel_knn(pix, usable, np.array([3, 7]), 4)[1] == got[1]).all()
    assert (pixel_knn(pix, np.zeros(200, bool), q, 4) == -1).all()
    few = np.zeros(200, bool)
    few[[0, 5, 6]] = True
    assert pixel_knn(pix, few, np.array([0]), 4).tolist() == [[*sorted([5, 6], key=lambda r: ((f[r] - f[0]) ** 2).sum()), -1, -1]]


def test_benchmark_writes_features_through_the_store(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import million

    from storage.features import load_features
    from storage.manifest import read_manifest

    aid = million.write_synthetic(tmp_path / "store", 1000, 24, 5, part_rows=300)
    fdir = Store(tmp_path / "store").artefact_dir("features", aid)
    m = read_manifest(fdir, verify=True)
    assert m["rows"] == 1000 and len([f for f in m["files"] if f["role"] == "part"]) == 4
    meta, feats = load_features(fdir, m)
    assert feats.shape == (1000, 24) and meta["path"].is_unique and meta["label"].nunique() == 5
    x, _ = million.synthetic_block(600, 300, 24, 5)  # any block regenerates alone, bit for bit
    assert np.array_equal(feats[600:900], x)


# ------------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    from reports.render import ReportOptions, write_report
    from tasks.maps.projection import MapConfig, build_map

    tmp = tmp_path_factory.mktemp("million-small")
    x, lab = clusters(n_per=300, k=6, d=24, spread=4.0)
    write_features(tmp / "store", x, lab, images=False)
    maps = {m: build_map(MapConfig(store=str(tmp / "store"), method=m, max_fit=600, pca_first=10, quality_sample=200))
            for m in ("pca", "tsne")}
    out = write_report(tmp / "store", out=tmp / "report.html", options=ReportOptions(k=3, workers=1))
    return tmp / "store", Path(out), maps, x


def test_report_ships_the_points_as_binary(small_report):
    store, out, maps, x = small_report
    html = out.read_text("utf-8")
    pts = json.loads(re.search(r'<script type="application/json" id="cl-points">(.*?)</script>', html, re.S).group(1))
    payload = json.loads(re.search(r'<script type="application/json" id="cl-scatter-bin">(.*?)</script>', html, re.S).group(1))
    assert pts["bin"] is True and pts["proj"] == {"PCA": None, "TSNE": None} and "idx" not in pts["color"]["label"]
    assert payload["n"] == len(x) and set(payload["proj"]) == {"PCA", "TSNE"}
    assert len(base64.b64decode(payload["proj"]["TSNE"]["b64"])) == 4 * len(x)      # 2 x uint16 per point
    assert len(base64.b64decode(payload["color"]["label"]["b64"])) == len(x)        # 1 uint8 per point


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian chromium is not installed")
def test_binary_payload_decodes_in_chromium_to_the_stored_points(small_report):
    from playwright.sync_api import sync_playwright

    from storage.maps import read_coords

    store, out, maps, x = small_report
    payload = json.loads(re.search(r'id="cl-scatter-bin">(.*?)</script>', out.read_text("utf-8"), re.S).group(1))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(out.as_uri())
        page.wait_for_function("window.convlens && window.convlens.ready === true", timeout=60000)
        assert page.evaluate("window.convlens.renderer") == "webgl" and page.evaluate("window.convlens.scatter.n") == len(x)
        for name, method in (("PCA", "pca"), ("TSNE", "tsne")):
            got = np.array(page.evaluate(f"Array.from(window.convlens.scatter.coords('{name}'))")).reshape(-1, 2)
            df = read_coords(Store(store).artefact_dir("maps", maps[method]["artefact_id"]))
            want = df.sort_values("row")[["x", "y"]].to_numpy(np.float64)
            step = np.asarray(payload["proj"][name]["step"])
            assert got.shape == want.shape
            assert np.all(np.abs(got - want) <= step / 2 + 1e-9 * np.abs(want).max()), name
        # the legend shows the decoded label categories with their counts
        assert page.locator("#cl-legend .legend-item").count() == 6
        # picking at a point's pixel finds that point (or one drawn on the same spot) and shows its hover box
        page.evaluate("document.getElementById('cl-scatter').scrollIntoView({block: 'center'})")
        row = 123
        pos = page.evaluate(f"window.convlens.pointPixel({row})")
        page.mouse.move(pos["x"] + 40, pos["y"] + 40)
        page.mouse.move(pos["x"], pos["y"], steps=2)
        page.wait_for_function("document.getElementById('cl-hover').dataset.row !== ''", timeout=10000)
        hovered = int(page.evaluate("document.getElementById('cl-hover').dataset.row"))
        other = page.evaluate(f"window.convlens.pointPixel({hovered})")
        assert abs(other["x"] - pos["x"]) <= 8 and abs(other["y"] - pos["y"]) <= 8
        # zoomed out past the density threshold the map is drawn as a density image, zoomed in as points
        page.evaluate("window.convlens.scatter.densityAt(0)")
        assert page.evaluate("window.convlens.scatter.fit().mode") == "density"
        page.evaluate("window.convlens.scatter.densityAt(null)")
        assert page.evaluate("window.convlens.scatter.zoom(2).mode") == "points"
        browser.close()
    assert errors == []
