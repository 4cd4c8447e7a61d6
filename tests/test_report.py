"""Report unit tests: safe embedding, accuracy logic on hand-made tables, the rendered file, drift, checksums, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from report_fixtures import SCRIPT_LABEL, hostile_store
from reports.figures import clean_text, safe_json
from reports.sections.core import accuracy_section, class_mapping, drift_section


@pytest.fixture(scope="module")
def hs(tmp_path_factory):
    return hostile_store(tmp_path_factory)


def test_safe_json_cannot_close_script_and_round_trips():
    obj = {"label": SCRIPT_LABEL, "a&b": "x\u2028y\u2029z <!-- >", "n": float("nan"), "bytes": b"ab\xff"}
    text = safe_json(obj)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    back = json.loads(text)
    assert back["label"] == SCRIPT_LABEL and back["a&b"] == "x\u2028y\u2029z <!-- >"
    assert back["n"] is None and back["bytes"] == "ab\ufffd"


def test_clean_text_makes_valid_utf8():
    assert clean_text("bad\udcff.png") == "bad\ufffd.png"
    assert clean_text(b"\xfe") == "\ufffd"
    assert clean_text("ok \u2028") == "ok \u2028"
    assert clean_text(None) == ""


def test_class_mapping_only_when_labels_are_the_model_classes():
    cats = ["tench", "goldfish", "great white shark"]
    assert class_mapping(["goldfish", "Great_White_Shark", "tench"], cats, 3) == {"goldfish": 1, "Great_White_Shark": 2, "tench": 0}
    assert class_mapping(["0", "1", "2"], cats, 3) is None          # digits are not ImageNet indices
    assert class_mapping(["0", "1", "2"], None, 3) == {"0": 0, "1": 1, "2": 2}
    assert class_mapping(["cat", "dog", "tench"], cats, 3) is None   # 1/3 maps: not enough


def _meta(labels, preds):
    return pd.DataFrame({"image_id": [f"id{i}" for i in range(len(labels))], "path": [f"p{i}.png" for i in range(len(labels))],
                         "label": labels, "pred_top5": [np.array(p + [9] * (5 - len(p)), np.int32) for p in preds]})


def test_accuracy_mode_counts_by_hand():
    cats = ["cat", "dog", "fox"] + [f"c{i}" for i in range(3, 10)]
    meta = _meta(["cat", "cat", "dog", "dog", "fox"], [[0], [1, 0], [1], [0, 1], [3, 4, 5, 6, 2]])
    acc = accuracy_section(meta, cats)
    assert acc["mode"] == "accuracy" and acc["n"] == 5
    assert acc["overall1"] == pytest.approx(2 / 5) and acc["overall5"] == pytest.approx(5 / 5)
    per = {r["name"]: r for r in acc["per_class"]}
    assert per["cat"]["acc1"] == 0.5 and per["fox"]["acc1"] == 0.0 and per["fox"]["acc5"] == 1.0
    pairs = {(c["true"], c["pred"]): c["n"] for c in acc["confusions"]}
    assert pairs == {("cat", "dog"): 1, ("dog", "cat"): 1, ("fox", "c3"): 1}
    rows = {r["name"]: [c["v"] for c in r["cells"]] for r in acc["table"]["rows"]}
    assert rows["cat"][:3] == [1, 1, 0] and rows["fox"][-1] == 1  # fox -> c3 falls in "(other)"


def test_distribution_mode_when_labels_are_not_classes():
    cats = [f"c{i}" for i in range(10)]
    meta = _meta(["3", "3", "7"], [[2], [2], [5]])
    acc = accuracy_section(meta, cats)
    assert acc["mode"] == "distribution"
    rows = {r["name"]: r for r in acc["table"]["rows"]}
    cols = acc["table"]["cols"]
    assert rows["3"]["cells"][cols.index("c2")]["v"] == 2 and rows["7"]["cells"][cols.index("c5")]["v"] == 1


def test_drift_against_itself_and_a_changed_run():
    rng = np.random.default_rng(0)
    cats = [f"c{i}" for i in range(10)]
    meta = _meta(["a", "b"] * 20, [[i % 3] for i in range(40)])
    feats = rng.normal(size=(40, 8)).astype(np.float32)
    same = drift_section(("x", {}, meta, feats), ("x", {}, meta, feats), cats, cats)
    assert same["n_new"] == same["n_removed"] == same["n_changed"] == 0
    assert same["mean_cosine_distance"] == pytest.approx(0.0, abs=1e-9)
    assert same["domain_auc"] is not None and same["domain_auc"] < 0.8
    meta2 = meta.copy()
    meta2.loc[:4, "image_id"] = [f"new{i}" for i in range(5)]
    meta2["pred_top5"] = [np.array([(i + 1) % 3, 9, 9, 9, 9], np.int32) for i in range(40)]
    shifted = feats + 3.0
    d = drift_section(("y", {}, meta2, shifted), ("x", {}, meta, feats), cats, cats)
    assert d["n_new"] == 5 and d["n_removed"] == 5 and d["n_common"] == 35
    assert d["n_changed"] == 35 and d["domain_auc"] > 0.95 and d["mean_cosine_distance"] > 0.1


def _sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z_]+)" class="report-section" data-present="(yes|no)"', html))


def test_report_file_is_self_contained_and_sections_present(hs, tmp_path):
    from reports.render import write_report

    out = write_report(hs["store"], out=tmp_path / "r.html", features_id=hs["a"], compare=hs["b"])
    html = Path(out).read_text("utf-8")
    assert _sections(html) == {k: "yes" for k in ("summary", "accuracy", "map", "tsne_grid", "audit", "attribution",
                                                 "images", "neurons", "drift")}
    # no resource is loaded from anywhere but the file itself
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', markup)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    # the hostile label is escaped everywhere: exactly the report's own 7 script elements close
    # (per-image table, points, points' text, thumbnails, scatter payload, plotly, scatter.js, report.js)
    assert html.count("</script>") == 8 and SCRIPT_LABEL not in html
    assert "<img src=x" not in html
    # embedded JSON is parseable and aligned with the feature rows
    pts = json.loads(re.search(r'<script type="application/json" id="cl-points">(.*?)</script>', html, re.S).group(1))
    text = json.loads(re.search(r'<script type="application/json" id="cl-points-text">(.*?)</script>', html, re.S).group(1))
    assert pts["n"] == hs["a_manifest"]["rows"] and "TSNE" in pts["proj"] and "path" not in pts
    assert len(text["path"]) == len(text["label"]) == len(text["pred"]) == pts["n"]
    assert pts["k"] == 6 and len(pts["nf"]) == len(pts["q"]) * 6
    thumbs = json.loads(re.search(r'id="cl-thumbs">(.*?)</script>', html, re.S).group(1))
    assert len(thumbs) == pts["n"] and all(v.startswith("data:image/jpeg;base64,") for v in thumbs.values())


def test_missing_stages_say_which_command_makes_them(tmp_path):
    from conftest import make_color_dataset
    from report_fixtures import extract
    from reports.render import write_report

    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    m = extract(data, tmp_path / "s")
    html = Path(write_report(tmp_path / "s", out=tmp_path / "r.html")).read_text("utf-8")
    sec = _sections(html)
    assert sec["summary"] == sec["map"] == "yes"
    assert sec["tsne_grid"] == sec["audit"] == sec["attribution"] == sec["neurons"] == sec["drift"] == "no"
    assert "convlens project" in html and "convlens dataset-audit" in html and "--compare" in html
    assert "PCA (computed for this report)" in html and m["artefact_id"] in html


def test_thumbnail_budget_samples_thumbnails(hs, tmp_path):
    from reports.render import ReportOptions, build_report

    ctx = build_report(hs["store"], hs["a"], options=ReportOptions(thumb_budget_bytes=1, examples=1))
    # only the rows the static sections show get a thumbnail; everything else is sampled out
    shown = {r for p in ctx["acc"]["per_label"] for r in p["examples"]}
    thumbs = json.loads(ctx["thumbs_json"])
    shown |= {0, 1, 2}  # rows named in the fake audit tables
    assert {int(k) for k in thumbs} == shown and len(shown) < ctx["n_points"]


def test_corrupt_artefact_file_is_refused(hs, tmp_path):
    import shutil

    from reports.render import build_report
    from storage.errors import ChecksumError

    store = tmp_path / "copy"
    shutil.copytree(hs["store"], store)
    grid = store / "maps" / hs["ids"]["maps"] / "grid.png"
    grid.write_bytes(grid.read_bytes() + b"x")
    ctx = build_report(store, hs["a"])
    assert ctx["maps"]["grids"] == [] and any("checksum" in e for e in ctx["maps"]["errors"])
    part = next((store / "features" / hs["a"]).glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumError):
        build_report(store, hs["a"])


def test_cli_report_and_compare_errors(hs, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "cli.html"
    assert main(["--no-prefect", "report", "--store", str(hs["store"]), "--artefact", hs["a"], "--out", str(out),
                 "--compare", str(hs["store"] / "features" / hs["b"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == out.stat().st_size
    assert main(["--no-prefect", "report", "--store", str(hs["store"]), "--compare", "nope-nothing"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_report_flow_runs_under_prefect(hs, tmp_path, prefect_server):
    from flows.report import report_flow

    path = report_flow(store=str(hs["store"]), out=str(tmp_path / "flow.html"), features_id=hs["a"])
    assert Path(path).is_file() and "cl-scatter" in Path(path).read_text("utf-8")


def test_feature_neighbours_come_from_a_stored_knn_graph(hs, tmp_path):
    import shutil

    from reports.render import ReportOptions, _knn_rows, build_report
    from storage.features import load_features
    from storage.paths import Store
    from tasks.index.build import build_default_indexes
    from tasks.index.neighbors import ensure_knn_graph

    store = tmp_path / "idx"
    shutil.copytree(hs["store"], store)
    build_default_indexes(str(store), hs["a"])
    ensure_knn_graph(str(store), k=6, artefact=hs["a"])
    ctx = build_report(store, hs["a"], options=ReportOptions(k=5))
    assert ctx["knn_source"] == "stored kNN graph (exact, Flat)"
    pts = json.loads(ctx["points_json"])
    _, feats = load_features(Store(store).artefact_dir("features", hs["a"]))
    exact = _knn_rows(feats, np.arange(len(feats)), 5, "cosine")
    assert (np.sort(np.array(pts["nf"]).reshape(-1, 5), 1) == np.sort(exact, 1)).all()
    # a graph of an index built from other features (an older `created`) is not used
    from storage.artefacts import artefacts_of
    from storage.manifest import write_manifest

    for _aid, m, adir in artefacts_of(Store(store), "index", hs["a"]):
        write_manifest(adir, {**m, "source": {**m["source"], "created": "2000-01-01T00:00:00+00:00"}})
    ctx = build_report(store, hs["a"], options=ReportOptions(k=5))
    assert ctx["knn_source"].startswith("exact cosine kNN")


def test_feature_neighbours_come_from_a_stored_index_up_to_date_with_the_features(hs, tmp_path):
    """Without a kNN graph the report searches a stored cosine index of the same features (exact first, the
    caption says how exact) instead of the minutes-long streamed search; a stale index is not used."""
    import shutil

    from reports.render import ReportOptions, _knn_rows, build_report
    from storage.features import load_features
    from storage.manifest import read_manifest, write_manifest
    from storage.paths import Store
    from tasks.index.build import IndexConfig, build_index

    store = tmp_path / "idx"
    shutil.copytree(hs["store"], store)
    _, feats = load_features(Store(store).artefact_dir("features", hs["a"]))
    exact = np.sort(_knn_rows(feats, np.arange(len(feats)), 5, "cosine"), 1)

    def neighbours(ctx):
        return np.sort(np.array(json.loads(ctx["points_json"])["nf"]).reshape(-1, 5), 1)

    flat = build_index(IndexConfig(store=str(store), artefact=hs["a"]))
    approx = build_index(IndexConfig(store=str(store), artefact=hs["a"], factory="IVF2,Flat", train_rows=len(feats)))
    rflat = build_index(IndexConfig(store=str(store), artefact=hs["a"], factory="IVF2,Flat,RFlat", train_rows=len(feats)))
    ctx = build_report(store, hs["a"], options=ReportOptions(k=5))
    assert ctx["knn_source"] == "stored index (exact, Flat)"  # exact preferred over the newer approximate one
    assert (neighbours(ctx) == exact).all()

    def edit(m, **changes):
        adir = Store(store).artefact_dir("indexes", m["artefact_id"])
        write_manifest(adir, {**read_manifest(adir), **changes})

    edit(flat, source={**flat["source"], "created": "2000-01-01T00:00:00+00:00"})  # built from older features
    ctx = build_report(store, hs["a"], options=ReportOptions(k=5))  # the newest: its vectors read as a stream
    assert ctx["knn_source"] == "stored index (approximate: IVF2,Flat,RFlat candidates, exact re-rank)"
    assert (neighbours(ctx) == exact).all()  # nprobe covers both lists here
    edit(rflat, rows=rflat["rows"] - 1)
    ctx = build_report(store, hs["a"], options=ReportOptions(k=5))  # searched by FAISS through a map of the file
    assert ctx["knn_source"] == "stored index (approximate: IVF2,Flat)"  # the caption says so
    assert (neighbours(ctx) == exact).all()
    edit(approx, rows=approx["rows"] - 1)  # misses a row
    ctx = build_report(store, hs["a"], options=ReportOptions(k=5))
    assert ctx["knn_source"].startswith("exact cosine kNN")
    assert (neighbours(ctx) == exact).all()


def test_pixel_neighbours_come_from_a_stored_pixel_index_and_only_thumbnails_are_decoded(hs, tmp_path, monkeypatch, caplog):
    """With a pixel index up to date with the features the report takes pixel-space neighbours from the index:
    the exact L2 neighbours of each image's stored 32 x 32 pixel vector; an image the index does not hold gets
    none. (That it then decodes only a thumbnail budget's worth of images: the next test.)"""
    import shutil

    import reports.render as render
    from storage.features import load_features
    from storage.paths import Store
    from tasks.core.pixels import pixel_vectors
    from tasks.index.build import IndexConfig, build_index

    store = tmp_path / "pix"
    shutil.copytree(hs["store"], store)
    meta, _ = load_features(Store(store).artefact_dir("features", hs["a"]))
    n = len(meta)
    decoded: list[str] = []
    real = render.thumbnail

    def counting(root, path, *a, **kw):
        decoded.append(path)
        return real(root, path, *a, **kw)

    monkeypatch.setattr(render, "thumbnail", counting)
    opts = render.ReportOptions(k=3, thumb_budget_bytes=1, workers=1)
    monkeypatch.setattr(render, "DECODE_ALL_WARN_ROWS", n - 1)
    with caplog.at_level("WARNING", logger="reports.render"):
        ctx = render.build_report(store, hs["a"], options=opts)
    assert len(decoded) == n  # no pixel index: every image, for the report's own pixel search
    assert f"decoding all {n} images" in caplog.text and "convlens index --space pixel" in caplog.text
    caplog.clear()
    assert json.loads(ctx["points_json"])["pix_source"] == "exact L2 on 16×16 RGB thumbnails"
    m = build_index(IndexConfig(store=str(store), artefact=hs["a"], space="pixel"))
    decoded.clear()
    ctx = render.build_report(store, hs["a"], options=opts)
    pts = json.loads(ctx["points_json"])
    assert pts["pix_source"] == "stored pixel index: L2 on 32×32 RGB, exact, Flat"
    assert "decoding all" not in caplog.text
    root = Store(store).resolve("features", hs["a"])[1]["dataset_root"]
    paths = [str(p) for p in meta["path"]]
    vecs, ok, _fails = pixel_vectors(root, paths)
    full = np.zeros((n, vecs.shape[1]), np.float32)
    full[ok] = vecs
    got = np.array(pts["np"]).reshape(len(pts["q"]), 3)
    assert m["rows"] == int(ok.sum())
    for qi, r in enumerate(pts["q"]):
        if not ok[r]:
            assert (got[qi] == -1).all()
            continue
        d = ((full - full[r]) ** 2).sum(1)
        d[~ok] = np.inf
        d[r] = np.inf
        np.testing.assert_allclose(np.sort(d[got[qi][got[qi] >= 0]]), np.sort(d)[:3][: int((got[qi] >= 0).sum())], rtol=1e-4)
    # a row the index does not hold (an image that did not decode when it was built) gets no pixel neighbours
    found = render._pixel_index(Store(store), hs["a"], Store(store).resolve("features", hs["a"])[1])
    rows = {p: i for i, p in enumerate(paths)} | {"never/indexed.png": n}
    nb, caption = render._stored_pixel_knn(found, rows, np.array([0, n]), 3)
    assert (nb[1] == -1).all() and (nb[0] >= 0).all() and caption == pts["pix_source"]


def test_decoding_stops_at_the_thumbnail_budget_when_no_pixel_vectors_are_needed(monkeypatch):
    import reports.render as render

    calls: list[int] = []

    def fake(root, path, *a, **kw):
        calls.append(int(path))
        return "x" * 10, np.zeros(12, np.uint8)

    monkeypatch.setattr(render, "thumbnail", fake)
    opts = render.ReportOptions(thumb_budget_bytes=55, workers=1, pixel_px=2)
    paths = [str(i) for i in range(1000)]
    order = np.r_[[990, 991], np.arange(1000)]
    order = order[np.sort(np.unique(order, return_index=True)[1])]
    thumbs, pixels, has = render._decode_all(None, paths, order, opts, {990, 991}, all_rows=False)
    assert pixels is None and {990, 991} <= set(thumbs) and len(thumbs) == 2 + 3  # 3 more fit in 55 - 20 bytes
    assert len(calls) <= 32 and has.sum() == len(calls)  # a chunk or two, not 1,000 decodes
    calls.clear()
    thumbs, pixels, has = render._decode_all(None, paths, order, opts, {990, 991}, all_rows=True)
    assert len(calls) == 1000 and pixels is not None and has.all() and len(thumbs) == 5


# ---- curated views (attribution gallery, dataset-audit findings, neurons) ----

_HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


def _section_html(html: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}".*?</section>', html, re.S).group(0)


def _visible_text(fragment: str) -> str:
    """Text a reader sees: tags (and their attributes, e.g. hover titles and data URIs) removed."""
    import html as html_mod

    return html_mod.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_attribution_gallery_rows_worst_first_with_aucs(hs):
    from reports.render import build_report
    from storage.features import read_meta
    from storage.paths import Store

    ctx = build_report(hs["store"], hs["a"])
    (v,) = [c for c in ctx["attr_cards"] if c["view"] == "attribution"]
    s = Store(hs["store"])
    paths = list(read_meta(s.artefact_dir("features", hs["a"]))["path"])
    # best insertion - deletion per image: row 1 -0.1, row 2 0.4, row 0 0.7 -> worst explained first
    assert [r["path"] for r in v["rows"]] == [paths[1], paths[2], paths[0]]
    assert [r["best_gap"] for r in v["rows"]] == pytest.approx([-0.1, 0.4, 0.7])
    assert [r["best_method"] for r in v["rows"]] == ["gradcam", "gradcam", "occlusion"]
    first = v["rows"][0]
    assert [c["method"] for c in first["cells"]] == ["occlusion", "gradcam"]  # canonical method order
    assert (first["cells"][0]["deletion"], first["cells"][0]["insertion"]) == ("0.500", "0.100")
    assert all(c["uri"].startswith("data:image/jpeg;base64,") for r in v["rows"] for c in r["cells"])
    assert first["original"].startswith("data:image/jpeg;base64,")
    summ = {r["method"]: r for r in v["summary"]}
    assert summ["occlusion"]["deletion"] == pytest.approx(1.0 / 3) and summ["gradcam"]["insertion"] == pytest.approx(1.4 / 3)
    assert v["believe"]["method"] == "gradcam" and summ["gradcam"]["believe"] and not summ["occlusion"]["believe"]
    assert summ["gradcam"]["wins"] == 2 and summ["occlusion"]["wins"] == 1


def test_curated_sections_render_without_hash_ids(hs, tmp_path):
    from reports.render import write_report
    from storage.features import read_meta
    from storage.paths import Store

    html = Path(write_report(hs["store"], out=tmp_path / "r.html", features_id=hs["a"])).read_text("utf-8")
    paths = list(read_meta(Store(hs["store"]).artefact_dir("features", hs["a"]))["path"])
    attr = _section_html(html, "attribution")
    text = _visible_text(attr)
    assert "Believe gradcam" in " ".join(text.split())
    # gallery rows in worst-first order, each with the method names and both AUCs under the overlays
    rows = re.findall(r'<div class="attr-row".*?(?=<div class="attr-row"|<p class="hint">images|<details)', attr, re.S)
    assert len(rows) == 3
    assert [_visible_text(r).count(p) > 0 for r, p in zip(rows, (paths[1], paths[2], paths[0]))] == [True] * 3
    for r in rows:
        t = _visible_text(r)
        assert "occlusion" in t and "gradcam" in t and t.count("del ") == 2 and t.count("ins ") == 2
        assert len(re.findall(r'<img src="data:image/jpeg;base64,', r)) == 3  # original + 2 overlays
    assert "del 0.500" in _visible_text(rows[0]) and "ins 0.100" in _visible_text(rows[0])
    # dataset audit grouped by finding kind, pairs shown side by side; neurons curated per technique
    audit = _visible_text(_section_html(html, "audit"))
    assert "Near-duplicates 2" in " ".join(audit.split())
    assert "Outliers" in audit and paths[2] in audit
    neurons = _section_html(html, "neurons")
    assert "Class visualisation" in neurons and "tabby&lt;cat&gt;" in neurons and "<polyline" in neurons
    assert "First-layer filters" in neurons
    # no 64-hex id is visible anywhere in these sections (they live in hover titles only)
    for sid in ("audit", "attribution", "neurons"):
        assert not _HEX64.search(_visible_text(_section_html(html, sid))), sid
    assert _HEX64.search(attr)  # ... but are still there for hover


def test_findings_view_groups_pairs_and_singles(hs):
    from reports.render import build_report

    ctx = build_report(hs["store"], hs["a"])
    (v,) = [c for c in ctx["audit_cards"] if c["view"] == "findings"]
    groups = {g["kind"]: g for g in v["groups"]}
    assert groups["near-duplicate"]["count"] == 2 and groups["near-duplicate"]["mode"] == "pairs"
    assert groups["near-duplicate"]["total"] == 1  # (a, b) and (b, a) are one pair
    pair = groups["near-duplicate"]["entries"][0]
    assert {pair["a"]["row"], pair["b"]["row"]} == {0, 1}
    assert groups["outlier"]["mode"] == "singles" and groups["outlier"]["entries"][0]["a"]["row"] == 2
    assert not any(_HEX64.search(c["text"]) for r in v["raw"]["rows"] for c in r)
    assert "image_id" not in v["raw"]["cols"]


def test_sparkline_maps_values_into_the_box():
    from reports.sections.neurons import sparkline

    s = sparkline([0, 1, 2], [0.0, 5.0, 10.0], width=100, height=50, pad=5)
    pts = [tuple(map(float, p.split(","))) for p in s["points"].split()]
    assert pts == [(5.0, 45.0), (50.0, 25.0), (95.0, 5.0)]
    assert sparkline([0, 1], [float("nan")] * 2)["points"] == ""


def _neuron_artefact(tmp_path, technique, table, pictures, manifest):
    from report_fixtures import _png
    from storage.manifest import file_entry, write_manifest

    adir = tmp_path / technique
    adir.mkdir()
    files = []
    for name, size, extra in pictures:
        (adir / name).write_bytes(_png((120, 80, 40), size=size))
        files.append(file_entry(adir, name, role="image", **extra))
    pd.DataFrame(table).to_parquet(adir / f"{technique}.parquet")
    files.append(file_entry(adir, f"{technique}.parquet", role="table"))
    m = write_manifest(adir, {"kind": "neurons", "technique": technique, "artefact_id": technique, "files": files, **manifest})
    return adir, m


_H = "ab" * 32
_NEURON_CASES = {
    "filters": ({"layer": ["conv1"] * 2, "filter": [0, 1], "l2_norm": [1.0, 0.01]},
                [("f.png", (20, 10), {"layer": "conv1", "shape": [2, 3, 3, 3]})], {}, "1 near-dead"),
    "max_activations": ({"layer": ["l"] * 4, "channel": [5, 5, 7, 7], "rank": [0, 1, 0, 1], "image_id": [_H] * 4,
                         "path": ["a.png", "b.png", "c.png", "d.png"], "label": ["x"] * 4, "activation": [3.0, 2.0, 1.5, 1.0]},
                        [("p.png", (3 * 8 + 4 * 2, 2 * 8 + 3 * 2), {"channels": [5, 7]})], {"k": 2, "params": {"patch_px": 8}}, "ch 5"),
    "adversarial": ({"image_id": [_H], "path": ["a.png"], "orig_class": ["cat"], "orig_prob": [0.9], "adv_class": ["dog"],
                     "adv_prob": [0.6], "flipped": [True], "eps_255": [0.5]}, [("adv-00.png", (60, 20), {"path": "a.png"})],
                    {"images": 2, "flipped": 1, "flip_rate": 0.5, "median_eps_255": 0.5, "params": {"method": "fgsm", "eps_max": 4 / 255}},
                    "flip rate 50%"),
    "invariance": ({"transform": ["rotate"] * 2, "value": [0.0, 10.0], "distance": [0.0, 0.2], "top1_changed": [False, True]},
                   [("invariance.png", (30, 20), {})], {}, "top-1 changes in 50%"),
    "inversion": ({"layer": ["l1", "l1"], "path": ["a.png"] * 2, "step": [0, 1], "feature_distance": [1.0, 0.25]},
                  [("inversion-0.png", (30, 10), {})], {}, "0.25"),
    "style": ({"step": [0, 1], "total": [2.0, 1.0]}, [("style.png", (30, 10), {})], {"style_loss_start": 9.0, "style_loss_end": 1.0}, "9 → 1"),
    "compare": ({"metric": ["knn_accuracy"], "space": ["a"], "value": [0.75], "detail": ["k=5"]},
                [("compare.png", (30, 10), {})], {}, "knn_accuracy"),
    "evolution": ({"checkpoint": [0]}, [("evolution.png", (30, 10), {})], {"checkpoints": ["e1", "e2"]}, "2 checkpoints"),
    "deepdream": ({"step": [0]}, [("dream-0.png", (30, 10), {})], {"layer": "l3"}, "l3"),
}


@pytest.mark.parametrize("technique", sorted(_NEURON_CASES))
def test_neuron_views_per_technique(tmp_path, technique):
    from reports.sections.neurons import neuron_view

    table, images, extra, expect = _NEURON_CASES[technique]
    adir, m = _neuron_artefact(tmp_path, technique, table, images, extra)
    v = neuron_view(technique, m, adir, {}, set())
    assert v["error"] is None and v["blocks"], v
    text = " ".join(v["summary"]) + json.dumps(v["blocks"], ensure_ascii=False)
    assert expect in text
    assert not _HEX64.search(json.dumps([v["summary"], [c["text"] for r in v["raw"]["rows"] for c in r]]))
    if technique == "max_activations":
        rows = v["blocks"][0]["rows"]
        assert [r["label"] for r in rows] == ["ch 5", "ch 7"] and [len(r["patches"]) for r in rows] == [2, 2]
        assert rows[0]["patches"][0]["title"].startswith("a.png")
    if technique == "filters":
        assert v["blocks"][0]["type"] == "pixelated" and v["blocks"][0]["width"] == 20 * 8


def test_superseded_neuron_artefacts_show_once(tmp_path):
    """A technique rerun after the features were republished (new source stamp, same technique, parameters and
    model) is shown once, newest first; a different parameter set is its own view."""
    from reports.render import _views
    from storage.manifest import write_manifest
    from storage.paths import Store

    st = Store(tmp_path / "store")
    model = {"arch": "tiny"}
    for aid, created, params in (("filters-a", "2026-01-01T00:00:00+00:00", {"layers": ["conv1"]}),
                                 ("filters-b", "2026-01-02T00:00:00+00:00", {"layers": ["conv1"]}),
                                 ("filters-c", "2026-01-01T00:00:00+00:00", {"layers": ["conv2"]})):
        d = st.artefact_dir("neurons", aid)
        d.mkdir(parents=True)
        write_manifest(d, {"kind": "neurons", "artefact_id": aid, "technique": "filters", "params": params,
                           "source": {"model": model, "features_created": created}, "created": created, "files": []})
    seen = []
    views = _views(st, "neurons", "any", {}, set(), lambda aid, m, adir, pr, nd: seen.append(aid) or {"id": aid},
                   include_unrelated=True)
    assert [v["id"] for v in views] == ["filters-b", "filters-c"]
