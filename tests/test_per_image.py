"""One row per image (reports/sections/per_image.py) and drift you can explain (reports/sections/core.py):
the stored per-image table's schema and joins, findings drift night over night, the new images the domain
classifier finds most unlike yesterday's with their nearest old neighbours, and the table in a browser."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_color_dataset

A, B, C, D, E = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)


def _meta() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [A, B, C, D, E, A], "path": ["t/a.png", "t/b.png", "tr/c.png", "t/d.png", "t/e.png", "t/a-copy.png"],
        "label": ["cat", "dog", "cat", "dog", None, "cat"], "split": ["test", "test", "train", "test", "test", "test"],
        "pred_top5": [[0, 1], [0, 1], [0, 1], [1, 0], [1, 0], [0, 1]],
        "prob_top5": [[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.7, 0.3], [0.55, 0.45], [0.9, 0.1]],
    })


def _findings() -> pd.DataFrame:
    rows = [
        {"finding": "exact-duplicate", "cluster": 0, "image_id": A, "path": "t/a.png", "other_image_id": A,
         "other_path": "t/a-copy.png", "score": 1.0},
        {"finding": "exact-duplicate", "cluster": 0, "image_id": A, "path": "t/a-copy.png", "other_image_id": A,
         "other_path": "t/a.png", "score": 1.0},
        {"finding": "leakage", "cluster": -1, "image_id": D, "path": "t/d.png", "split": "test", "other_image_id": C,
         "other_path": "tr/c.png", "other_split": "train", "score": 0.98},
        {"finding": "label-disagreement", "cluster": -1, "image_id": B, "path": "t/b.png", "score": 0.83,
         "suggested_label": "cat"},
        {"finding": "outlier", "cluster": -1, "image_id": E, "path": "t/e.png", "score": 2.5},
    ]
    from storage.audits import FINDING_COLUMNS

    return pd.DataFrame(rows).reindex(columns=list(FINDING_COLUMNS))


def _scores() -> pd.DataFrame:
    rows = []
    for iid, path, aucs in ((B, "t/b.png", {"gradcam": (0.3, 0.12), "saliency": (0.2, 0.5)}),
                            (D, "t/d.png", {"gradcam": (0.1, 0.8), "saliency": (0.3, 0.4)})):
        for m, (dele, ins) in aucs.items():
            rows.append({"image_id": iid, "path": path, "method": m, "target": 0, "target_kind": "pred",
                         "target_name": "cat", "deletion_auc": dele, "insertion_auc": ins})
    return pd.DataFrame(rows)


def _sanity():
    table = pd.DataFrame({"method": ["gradcam", "saliency"], "depth": [2, 2], "image_id": [B, B],
                          "spearman": [0.91, 0.12], "ssim": [0.8, 0.1]})
    return table, {"verdict_depth": 2, "verdicts": {"gradcam": {"flagged": True}, "saliency": {"flagged": False}}}


def test_image_table_schema_and_joins(tmp_path):
    import pyarrow.parquet as pq

    from reports.sections.per_image import build_image_table, image_table_schema, publish_image_table
    from storage.audits import IMAGE_TABLE_COLUMNS, read_image_table

    drift = {"new_ids": {B}, "changed": {3: ("cat", "dog")}, "new_findings": {B: ["label-disagreement"]},
             "resolved_findings": {E: ["near-duplicate"]}}
    t = build_image_table(_meta(), ["cat", "dog"], _findings(), _scores(), _sanity(), drift)
    assert tuple(t.columns) == IMAGE_TABLE_COLUMNS and len(t) == 6 and list(t["row"]) == list(range(6))
    by = t.set_index("path")
    # the join the report's preset filter relies on: a suspected label error whose Grad-CAM explains badly
    b = by.loc["t/b.png"]
    assert b["findings"] == ["label-disagreement"] and b["label_issue_score"] == pytest.approx(0.83)
    assert b["suggested_label"] == "cat" and b["correct"] is False and b["pred"] == "cat"
    faith = {f["method"]: f for f in b["faithfulness"]}
    assert faith["gradcam"]["insertion_auc"] == pytest.approx(0.12) and b["best_method"] == "saliency"
    assert b["best_gap"] == pytest.approx(0.3) and b["unreliable_methods"] == ["gradcam"]
    assert {s["method"]: s["spearman"] for s in b["sanity"]} == {"gradcam": 0.91, "saliency": 0.12}
    assert b["new_image"] and b["new_findings"] == ["label-disagreement"] and "new image" in b["since_last_run"]
    # both sides of a leak, both paths of an exact duplicate (same content hash, two rows)
    assert by.loc["t/d.png", "leak_partner"] == "tr/c.png" and by.loc["tr/c.png", "leak_partner"] == "t/d.png"
    assert by.loc["tr/c.png", "findings"] == ["leakage"] and by.loc["tr/c.png", "leak_partner_split"] == "test"
    assert by.loc["t/a.png", "duplicate_group"] == 0 and by.loc["t/a-copy.png", "duplicate_of"] == "t/a.png"
    assert by.loc["t/e.png", "outlier_score"] == pytest.approx(2.5) and by.loc["t/e.png", "correct"] is None
    assert by.loc["t/d.png", "pred_changed"] and "prediction cat → dog" in by.loc["t/d.png", "since_last_run"]
    assert by.loc["t/e.png", "resolved_findings"] == ["near-duplicate"]
    # stored and read back through storage/, with the declared schema
    man = publish_image_table(tmp_path / "store", "feat-1", {"created": "x"}, t, {"dataset_audit": "da-1"})
    back, m = read_image_table(tmp_path / "store", features_id="feat-1")
    assert m["artefact_id"] == man["artefact_id"] and m["kind"] == "image-table" and m["sources"] == {"dataset_audit": "da-1"}
    adir = tmp_path / "store" / "audits" / man["artefact_id"]
    assert pq.read_schema(adir / man["files"][0]["name"]).remove_metadata() == image_table_schema()
    assert list(back["path"]) == list(t["path"]) and list(back.loc[1, "unreliable_methods"]) == ["gradcam"]
    # without a previous run the "since" columns are null, not False
    t0 = build_image_table(_meta(), ["cat", "dog"], None, None, None, None)
    assert t0["new_image"].isna().all() and (t0["findings"].map(len) == 0).all()


def test_findings_drift_new_and_resolved_by_content_hash():
    from reports.sections.core import findings_drift

    prev = _findings()
    cur = prev[prev["finding"] != "outlier"].copy()  # E's outlier resolved
    extra = {"finding": "near-duplicate", "cluster": 3, "image_id": B, "path": "t/b.png", "other_image_id": D,
             "other_path": "t/d.png", "score": 0.97}
    cur = pd.concat([cur, pd.DataFrame([extra])], ignore_index=True)
    cur.loc[cur["finding"] == "label-disagreement", "path"] = "moved/b.png"  # same picture, new path: not new
    meta = _meta()
    d = findings_drift(cur, prev, meta)
    k = {x["kind"]: x for x in d["kinds"]}
    assert (k["outlier"]["n_prev"], k["outlier"]["n_cur"], k["outlier"]["n_new"], k["outlier"]["n_resolved"]) == (1, 0, 0, 1)
    assert k["outlier"]["resolved"][0]["row"] == 4 and not k["outlier"]["resolved"][0]["gone"]
    assert k["near-duplicate"]["n_new"] == 1 and k["near-duplicate"]["new"][0]["other_row"] == 3
    assert k["label-disagreement"]["n_new"] == k["label-disagreement"]["n_resolved"] == 0
    assert k["leakage"]["n_new"] == 0 and k["exact-duplicate"]["n_new"] == 0
    assert d["by_image"] == {"new": {B: ["near-duplicate"]}, "resolved": {E: ["outlier"]}}
    gone = findings_drift(cur, prev, meta[meta["image_id"] != E])
    assert next(x for x in gone["kinds"] if x["kind"] == "outlier")["resolved"][0]["gone"]
    assert not findings_drift(None, prev, meta)["present"]


def _png(path: Path, rgb, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (36, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _publish_findings(store: Path, fid: str, rows: list[dict], name: str) -> None:
    from storage.audits import FINDING_COLUMNS
    from storage.manifest import file_entry, write_manifest
    from storage.paths import Store

    adir = Store(store).artefact_dir("audits", name, create=True)
    pd.DataFrame(rows).reindex(columns=list(FINDING_COLUMNS)).to_parquet(adir / "findings.parquet")
    write_manifest(adir, {"kind": "dataset-audit", "artefact_id": name, "source": {"features": fid},
                          "files": [file_entry(adir, "findings.parquet", role="findings")]})


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Yesterday: 12 red / green / blue images. Today: the same files, one removed, three new near-copies of
    red ones and three yellow images (new content); each night with its own dataset-audit findings."""
    from report_fixtures import extract
    from storage.features import read_meta
    from storage.paths import Store

    base = tmp_path_factory.mktemp("nights")
    yday = make_color_dataset(base / "yesterday", per_class=4, splits=("",))
    today = base / "today"
    shutil.copytree(yday, today)
    (today / "blue" / "blue__3.png").unlink()
    for i in range(3):
        _png(today / "red" / f"red_new_{i}.png", (200, 30, 30), 100 + i)
        _png(today / "yellow" / f"yellow_{i}.png", (235, 220, 20), 200 + i)
    store = base / "store"
    y, t = extract(yday, store), extract(today, store)
    s = Store(store)
    ym = read_meta(s.artefact_dir("features", y["artefact_id"]))
    tm = read_meta(s.artefact_dir("features", t["artefact_id"]))
    row = {p: r for r, p in ym[["image_id", "path"]].itertuples(index=False)}
    trow = {p: r for r, p in tm[["image_id", "path"]].itertuples(index=False)}
    # yesterday: green_0 an outlier, blue_1 a likely label error; today: the label error stays, the outlier is
    # resolved and yellow_0 is a new outlier
    _publish_findings(store, y["artefact_id"], [
        {"finding": "outlier", "image_id": row["green/green__0.png"], "path": "green/green__0.png", "score": 3.0},
        {"finding": "label-disagreement", "image_id": row["blue/blue__1.png"], "path": "blue/blue__1.png", "score": 0.9,
         "suggested_label": "green"}], "dataset-audit-yesterday-000000000001")
    _publish_findings(store, t["artefact_id"], [
        {"finding": "label-disagreement", "image_id": row["blue/blue__1.png"], "path": "blue/blue__1.png", "score": 0.9,
         "suggested_label": "green"},
        {"finding": "outlier", "image_id": trow["yellow/yellow_0.png"], "path": "yellow/yellow_0.png", "score": 4.0}],
        "dataset-audit-today-000000000002")
    return {"store": store, "y": y["artefact_id"], "t": t["artefact_id"], "tmeta": tm, "ymeta": ym}


def test_drift_shows_most_different_new_images_with_old_neighbours_and_findings_drift(two_nights, tmp_path):
    from reports.render import ReportOptions, build_report, render_html
    from storage.audits import read_image_table

    d = two_nights
    ctx = build_report(d["store"], d["t"], compare=d["y"], options=ReportOptions(k=3))
    drift = ctx["drift"]
    paths = list(d["tmeta"]["path"])
    assert drift["n_new"] == 6 and drift["n_removed"] == 1
    top = [paths[x["row"]] for x in drift["most_different"]]
    assert len(top) == 6 and {p.split("/")[0] for p in top[:3]} == {"yellow"}, top  # new content first
    first = drift["most_different"][0]
    assert len(first["neighbours"]) == 4 and all(-1 <= nb["sim"] <= 1 for nb in first["neighbours"])
    sims = [nb["sim"] for nb in first["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    # an old neighbour still in today's set is named by its row (the page's thumbnail); the removed one by its own
    for x in drift["most_different"]:
        for nb in x["neighbours"]:
            assert (nb["row"] is not None and paths[nb["row"]] == nb["path"]) or nb["uri"].startswith("data:image/")
    red_new = next(x for x in drift["most_different"] if "red_new" in paths[x["row"]])
    assert all(nb["path"].startswith("red/") for nb in red_new["neighbours"])  # a new copy of old content
    f = {k["kind"]: k for k in drift["findings"]["kinds"]}
    assert (f["outlier"]["n_new"], f["outlier"]["n_resolved"]) == (1, 1)
    assert paths[f["outlier"]["new"][0]["row"]] == "yellow/yellow_0.png"
    assert (f["label-disagreement"]["n_new"], f["label-disagreement"]["n_resolved"]) == (0, 0)
    html = render_html(ctx)
    assert "New images most unlike the previous run" in html and "Findings, night over night" in html
    # the per-image table carries the same news and is stored
    table, _ = read_image_table(d["store"], features_id=d["t"])
    y0 = table.set_index("path").loc["yellow/yellow_0.png"]
    assert y0["new_image"] and list(y0["new_findings"]) == ["outlier"] and list(y0["findings"]) == ["outlier"]
    g0 = table.set_index("path").loc["green/green__0.png"]
    assert not g0["new_image"] and list(g0["resolved_findings"]) == ["outlier"]


def test_nightly_run_record_keeps_findings_for_tomorrow(two_nights, tmp_path):
    """The findings of a nightly run are read back from its run record, after the live audit is gone."""
    from reports.sections.core import previous_findings
    from storage.manifest import read_manifest
    from storage.paths import Store
    from storage.runs import snapshot_dir
    from tasks.nightly.stages import publish_run, snapshot_findings

    d = two_nights
    store = tmp_path / "store"
    shutil.copytree(d["store"], store)
    s = Store(store)
    rid = "nightly-test-20250101T000000Z"
    rdir = s.artefact_dir("runs", rid, create=True)
    files = snapshot_findings(store, "dataset-audit-yesterday-000000000001", rdir)
    fman = read_manifest(s.artefact_dir("features", d["y"]))
    publish_run(store, rid, d["y"], fman, {"files": files})
    shutil.rmtree(s.artefact_dir("audits", "dataset-audit-yesterday-000000000001"))  # superseded tonight
    prev = previous_findings(s, rid, snapshot_dir(store, rid))
    assert prev is not None and sorted(prev["finding"]) == ["label-disagreement", "outlier"]
    read_manifest(rdir, verify=True)  # the copy is listed with its checksum


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian chromium is not installed")
def test_table_sorts_filters_and_shows_thumbnails_in_a_browser(two_nights, tmp_path):
    from playwright.sync_api import sync_playwright

    from reports.render import write_report

    d = two_nights
    path = Path(write_report(d["store"], out=tmp_path / "r.html", features_id=d["t"], compare=d["y"]))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(path.as_uri())
        page.wait_for_function("window.convlensTable !== undefined", timeout=30000)
        n = len(d["tmeta"])
        assert page.locator("#it-table tbody tr").count() == n
        assert "of %d images" % n in page.locator("#it-count").inner_text()
        # filter: the finding select, then a preset (new / changed since the last run)
        page.select_option("#it-finding", "outlier")
        assert page.locator("#it-table tbody tr").count() == 1
        assert "yellow/yellow_0.png" in page.locator("#it-table tbody").inner_text()
        page.click("#it-reset")
        page.locator("button.preset", has_text="New or changed since the last run").click()
        rows = page.evaluate("window.convlensTable.rows()")
        paths = list(d["tmeta"]["path"])
        assert sorted(paths[r] for r in rows) == sorted(p for p in paths if "_new_" in p or "yellow" in p or p == "green/green__0.png")
        # sort by path, descending on the second click
        page.click("#it-reset")
        page.click("#it-table th[data-key=p]")
        page.click("#it-table th[data-key=p]")
        first = page.locator("#it-table tbody tr").first.inner_text()
        assert sorted(paths)[-1] in first
        # every row shows its thumbnail
        srcs = page.evaluate("Array.from(document.querySelectorAll('#it-table tbody img')).map(i => i.src.slice(0, 15))")
        assert len(srcs) == n and all(s == "data:image/jpeg" for s in srcs)
        page.locator("#images").scroll_into_view_if_needed()
        page.locator("#images").screenshot(path=str(tmp_path / "images.png"))
        page.locator("#drift").screenshot(path=str(tmp_path / "drift.png"))
        keep = Path(__file__).resolve().parents[1] / "test-artifacts"
        keep.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "images.png", keep / "per-image-table.png")
        shutil.copy(tmp_path / "drift.png", keep / "drift-explained.png")
        assert errors == []
        browser.close()
