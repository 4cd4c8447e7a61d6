"""A million images end to end: every stage's seconds and peak RSS, each stage in its own process.

Stages (``--stages``, comma-separated, in this order):
  features  a synthetic features artefact of ``--rows`` x ``--dim`` float32 rows (``--clusters`` Gaussian clusters,
            labelled, so maps mean something), written through the store's own writer (storage.features.PartWriter
            -> write_part, then write_manifest) part by part (16,384 rows): no images, no model.
  index     ``convlens index`` (``--factory auto``: above 100k rows the approximate IVF + fast-scan PQ index with an
            exact re-rank; ``--index-factory Flat`` for the exact one)
  knn       ``convlens neighbors --all -k 10`` (the all-rows kNN graph through that index, streamed in blocks)
  audit     ``convlens audit-dataset --confirm none --dup-threshold 0.95`` (the synthetic store has no images to
            confirm near-copies on)
  pca, tsne, umap
            ``convlens project --method ...`` (t-SNE / UMAP: fit a ``--max-fit`` sample, place the rest)
  report    ``convlens report`` (every point in the map, binary payload)
  browser   opens the report in headless Chromium (Debian's chromium via Playwright): time to the map's first
            paint, frame time of zoom / pan steps (density view zoomed out, GL points zoomed in), hover pick;
            peer: plotly.js ``scattergl`` (the report's previous renderer, vendored) with the same points in the
            same browser.
  page      the browser side alone: a page with the report's map markup, points JSON, binary payload, scatter.js
            and report.js for ``--rows`` synthetic 2-d points, measured like ``browser``.
  quality   t-SNE trustworthiness: a full fit of a ``--quality-rows`` subset vs fitting ``--quality-fit`` of it and
            placing the rest (the path above ``--max-fit``), same seed, same 2,000-point evaluation sample;
            then the same sample fit + placement with the IVF-Flat kNN maps use above 100k fitted rows forced
            (t-SNE and UMAP, each against its exact-kNN twin).

Each stage runs in a child process; its peak RSS is the child's ``ru_maxrss`` (``os.wait4``), which counts the
pages of files it maps too (the index file the searching stages map read-only), and ``peak_anon_mib`` its
``RssAnon`` sampled every 0.1 s (anonymous memory only; Linux). Stages print one
JSON line each; ``--json FILE`` keeps them. Nothing is downloaded.

Usage:
  python benchmarks/million.py --store /tmp/m1 --rows 1000000 --stages features,pca,tsne,umap,report,browser
  python benchmarks/million.py --store /tmp/m1 --rows 100000 --stages features,index,audit
  python benchmarks/million.py --stages quality --quality-rows 100000 --quality-fit 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("features", "index", "knn", "audit", "pca", "tsne", "umap", "report", "browser", "page", "quality")
AID = "million-synthetic"


# ------------------------------------------------------------------------------------------------ data


def _centres(k: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(k, d)) * 0.5).astype(np.float32)  # overlapping clusters: maps have work to do


def synthetic_block(start: int, n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start .. start + n`` of the synthetic set: ``(x (n, d) float32, cluster (n,) int)``; every row is a
    deterministic function of its index (seeded per block), so any block can be regenerated alone."""
    centres = _centres(k, d, seed)
    rng = np.random.default_rng([seed, start])
    lab = rng.integers(0, k, n)
    x = centres[lab] + rng.normal(size=(n, d)).astype(np.float32) * 1.0
    return x.astype(np.float32), lab


def write_synthetic(store: Path, rows: int, dim: int, clusters: int, part_rows: int = 16_384) -> str:
    """Publish the synthetic features artefact through the store's writer; memory O(part)."""
    from storage.features import PartWriter
    from storage.manifest import write_manifest
    from storage.paths import Store

    adir = Store(store).artefact_dir("features", AID, create=True)
    w = PartWriter(adir, dim, False, part_rows=part_rows)
    for s in range(0, rows, part_rows):
        n = min(part_rows, rows - s)
        x, lab = synthetic_block(s, n, dim, clusters)
        meta = [{"image_id": f"{s + i:064x}", "path": f"img/{(s + i) // 1000:04d}/{s + i:07d}.jpg",
                 "label": f"class-{lab[i]:02d}", "split": "train" if (s + i) % 10 else "val", "width": 224, "height": 224}
                for i in range(n)]
        w.add(meta, x)
    files = [dict(e, role="part") for e in w.close()]
    write_manifest(adir, {"kind": "features", "artefact_id": AID, "dataset_root": str(Path(store).parent / "no-images"),
                          "dim": dim, "rows": rows, "with_preds": False, "extra_columns": [],
                          "model": {"arch": "synthetic", "weights": "none"},
                          "layer": {"alias": None, "name": "synthetic", "side": "output"}, "files": files})
    return AID


# ------------------------------------------------------------------------------------------- processes


def run_child(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd``; return seconds, peak RSS of the child (MiB, ``ru_maxrss``), exit status and output tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
    out_chunks = []
    anon = [0.0]
    done = threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=(proc.pid, anon, done), daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        out_chunks.append(line)
    done.set()
    sampler.join()
    _pid, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "peak_anon_mib": round(anon[0], 1) if anon[0] else None,
            "rc": proc.returncode, "tail": "".join(out_chunks)[-1500:]}


def _sample_anon(pid: int, peak: list[float], done: threading.Event, every: float = 0.1) -> None:
    """Peak ``RssAnon`` of ``pid`` sampled every ``every`` seconds (Linux): ``ru_maxrss`` also counts the pages of
    files the stage maps (an index file searched read-only: page cache the kernel can evict), this does not. A
    sample can miss a peak shorter than ``every``."""
    path = f"/proc/{pid}/status"
    while not done.wait(every):
        try:
            with open(path) as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
                        break
        except OSError:
            return


def convlens(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--no-prefect", *args]


def stage_command(stage: str, a: argparse.Namespace) -> list[str]:
    store = str(a.store)
    if stage == "features":
        return [sys.executable, __file__, "--_child", "features", "--store", store, "--rows", str(a.rows),
                "--dim", str(a.dim), "--clusters", str(a.clusters)]
    if stage == "index":
        return convlens("index", "--store", store, "--factory", a.index_factory, "--json")
    if stage == "knn":
        return convlens("neighbors", "--store", store, "--all", "-k", "10", "--json")
    if stage == "audit":
        return convlens("audit-dataset", "--store", store, "--confirm", "none", "--dup-threshold", "0.95", "--json")
    if stage in ("pca", "tsne", "umap"):
        jobs = ["--n-jobs", str(a.tsne_jobs)] if stage == "tsne" else []
        return convlens("project", "--store", store, "--method", stage, "--max-fit", str(a.max_fit), *jobs, "--json")
    if stage == "report":
        return convlens("report", "--store", store, "--out", str(Path(store) / "reports" / "million.html"))
    if stage in ("browser", "quality", "page"):
        return [sys.executable, __file__, "--_child", stage, "--store", store, "--rows", str(a.rows), "--quality-rows", str(a.quality_rows),
                "--quality-fit", str(a.quality_fit), "--dim", str(a.dim), "--clusters", str(a.clusters)]
    raise SystemExit(f"unknown stage {stage}")


# -------------------------------------------------------------------------------------------- browser


_PLOTLY_PAGE = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<div id="p" style="width:900px;height:640px"></div>
<script>{plotly}</script>
<script>
var n = {n}, xs = new Float32Array(n), ys = new Float32Array(n), c = new Array(n), pal = {pal};
var s = 12345; function r() {{ s = (s * 16807) % 2147483647; return s / 2147483647; }}
for (var i = 0; i < n; i++) {{ var k = (i * 7) % 40;
  xs[i] = Math.cos(k) * 30 + (r() - 0.5) * 6; ys[i] = Math.sin(k * 1.3) * 30 + (r() - 0.5) * 6; c[i] = pal[k % pal.length]; }}
var t0 = performance.now();
Plotly.newPlot("p", [{{type: "scattergl", mode: "markers", x: xs, y: ys, marker: {{size: 3, color: c}}, hoverinfo: "none"}}],
  {{margin: {{l: 30, r: 10, t: 10, b: 30}}, hovermode: "closest"}}, {{responsive: false}})
  .then(function () {{ window.plotMs = performance.now() - t0; window.done = true; }});
</script></body></html>"""


def write_page(store: Path, rows: int, clusters: int) -> Path:
    """A page with the report's own map markup, points JSON, binary payload, scatter.js and report.js for
    ``rows`` synthetic 2-d points (two projections, two colourings): the browser side of a ``rows``-point report
    without building one (for when the report stage cannot run at that size)."""
    from reports.figures import PALETTE, safe_json
    from reports.render import _inline_js, _static
    from reports.scatter_data import encode_scatter, scatter_json

    rng = np.random.default_rng(0)
    lab = rng.integers(0, clusters, rows)
    ang = lab * (2 * np.pi / clusters)
    xy1 = np.c_[np.cos(ang) * 30, np.sin(ang) * 30] + rng.normal(0, 4, (rows, 2))
    xy2 = np.c_[np.cos(ang * 3) * 20, np.sin(ang * 2) * 25] + rng.normal(0, 6, (rows, 2))
    cats = [f"class-{k:02d}" for k in range(clusters)]
    colorings = {"label": {"cats": cats, "counts": np.bincount(lab, minlength=clusters).tolist(), "idx": lab},
                 "split": {"cats": ["train", "val"], "counts": [rows - rows // 10, rows // 10], "idx": (np.arange(rows) % 10 == 0).astype(int)}}
    payload = encode_scatter({"TSNE": xy1, "PCA": xy2}, colorings)
    points = {"n": rows, "shown": None, "bin": True, "proj": {"TSNE": None, "PCA": None},
              "color": {k: {"cats": v["cats"], "counts": v["counts"]} for k, v in colorings.items()}, "palette": list(PALETTE),
              "path": [f"img/{i // 1000:04d}/{i:07d}.jpg" for i in range(rows)], "label": [cats[k] for k in lab],
              "pred": [""] * rows, "q": [], "k": 0, "nf": [], "np": [], "knn_source": "none"}
    html = ("<!doctype html><html><head><meta charset='utf-8'><style>" + _static("report.css") + "</style></head><body>"
            "<select id='cl-proj'><option>TSNE</option><option>PCA</option></select><select id='cl-color'></select>"
            "<div class='mapwrap'><div id='cl-scatter' class='scatter'></div><aside class='side'><div id='cl-hover' data-row=''>"
            "<img id='cl-hover-img' alt=''><div id='cl-hover-text'></div></div><div id='cl-legend'></div></aside></div>"
            "<div id='cl-neighbours' data-row=''></div>"
            f"<script type='application/json' id='cl-points'>{safe_json(points)}</script>"
            "<script type='application/json' id='cl-thumbs'>{}</script>"
            f"<script type='application/json' id='cl-scatter-bin'>{scatter_json(payload)}</script>"
            f"<script>{_inline_js(_static('scatter.js'))}</script><script>{_inline_js(_static('report.js'))}</script></body></html>")
    out = Path(store) / "reports" / f"page-{rows}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, "utf-8")
    return out


def bench_browser(store: Path, report: Path | None = None) -> dict:
    import shutil

    from playwright.sync_api import sync_playwright

    from reports.figures import PALETTE

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return {"skipped": "Debian chromium is not installed"}
    report = report or Path(store) / "reports" / "million.html"
    out: dict = {"report_mb": round(report.stat().st_size / 1e6, 1)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        t0 = time.perf_counter()
        page.goto(report.as_uri(), timeout=300_000)
        page.wait_for_function("window.convlens && window.convlens.ready === true", timeout=300_000, polling=50)
        out["ready_s"] = round(time.perf_counter() - t0, 2)
        out["first_paint_s_since_navigation"] = round(page.evaluate("window.convlens.firstPaintMs") / 1000, 2)
        out["scatter_mount_s"] = round(page.evaluate("window.convlens.mountMs") / 1000, 2)
        out["renderer"] = page.evaluate("window.convlens.renderer")
        out["points"] = page.evaluate("window.convlens.scatter.n")
        page.evaluate("document.getElementById('cl-scatter').scrollIntoView({block: 'center'})")
        steps = page.evaluate("""() => { const s = window.convlens.scatter, out = [];
            out.push(Object.assign({step: 'fit'}, s.fit()));
            for (let i = 0; i < 3; i++) out.push(Object.assign({step: 'pan'}, s.pan(20, 10)));
            for (let i = 0; i < 12; i++) out.push(Object.assign({step: 'zoom-in'}, s.zoom(1.6)));
            for (let i = 0; i < 3; i++) out.push(Object.assign({step: 'pan'}, s.pan(-15, 5)));
            return out; }""")
        dens = [s["ms"] for s in steps if s["mode"] == "density"]
        pts = [s["ms"] for s in steps if s["mode"] == "points"]
        out["frame_ms_density"] = [round(min(dens), 1), round(float(np.median(dens)), 1), round(max(dens), 1)] if dens else None
        out["frame_ms_points"] = [round(min(pts), 1), round(float(np.median(pts)), 1), round(max(pts), 1)] if pts else None
        out["zoom_steps_until_points"] = next((i for i, s in enumerate(steps) if s["mode"] == "points"), None)
        # hover: the pick + hover box update at the screen position of some points (zoomed in: the last view)
        picks = page.evaluate("""() => { const c = window.convlens, out = [];
            const r = document.querySelector('#cl-scatter canvas').getBoundingClientRect();
            for (let j = 0; j < 200 && out.length < 8; j++) { const row = Math.floor(Math.random() * c.scatter.n), p = c.pointPixel(row);
              if (!p) continue; const t = performance.now(); const hit = c.scatter.pick(p.x - r.left, p.y - r.top);
              if (hit >= 0) c.showHover(hit); out.push([hit, performance.now() - t]); }
            c.scatter.fit();
            for (let j = 0; j < 200 && out.length < 16; j++) { const row = Math.floor(Math.random() * c.scatter.n), p = c.pointPixel(row);
              if (!p) continue; const t = performance.now(); const hit = c.scatter.pick(p.x - r.left, p.y - r.top);
              if (hit >= 0) c.showHover(hit); out.push([hit, performance.now() - t]); }
            return out; }""")
        out["hover_pick_ms_zoomed_in"] = [round(ms, 2) for _row, ms in picks[:8]]
        out["hover_pick_ms_zoomed_out"] = [round(ms, 2) for _row, ms in picks[8:]]
        out["hover_hits"] = sum(1 for row, _ms in picks if row >= 0)
        page.evaluate("window.convlens.scatter.fit()")
        shot = Path(store) / "reports" / "million-map.png"
        page.locator("#cl-scatter").screenshot(path=str(shot))
        out["screenshot"] = str(shot)
        out["page_errors"] = errors
        page.close()
        # peer: plotly scattergl with the same number of points in the same browser
        n = int(out["points"])
        html = Path(store) / "reports" / "plotly-peer.html"
        plotly = (ROOT / "reports" / "static" / "plotly.min.js").read_text("utf-8")
        html.write_text(_PLOTLY_PAGE.format(plotly=plotly, n=n, pal=json.dumps(list(PALETTE))), "utf-8")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        page.goto(html.as_uri(), timeout=300_000)
        try:
            page.wait_for_function("window.done === true", timeout=240_000, polling=100)
            out["peer_plotly_scattergl_ready_s"] = round(time.perf_counter() - t0, 2)
            frames = page.evaluate("""async () => { const gd = document.getElementById('p'), out = [];
                for (let i = 0; i < 3; i++) { const xr = gd._fullLayout.xaxis.range, yr = gd._fullLayout.yaxis.range;
                  const cx = (xr[0] + xr[1]) / 2, cy = (yr[0] + yr[1]) / 2, hx = (xr[1] - xr[0]) / 3.2, hy = (yr[1] - yr[0]) / 3.2;
                  const t = performance.now(); await Plotly.relayout(gd, {'xaxis.range': [cx - hx, cx + hx], 'yaxis.range': [cy - hy, cy + hy]});
                  await new Promise(r => requestAnimationFrame(() => r())); out.push(performance.now() - t); }
                return out; }""")
            out["peer_plotly_zoom_frame_ms"] = [round(v, 1) for v in frames]
        except Exception as exc:  # noqa: BLE001 - the peer failing to draw is itself the measurement
            out["peer_plotly_scattergl_error"] = str(exc)[:300]
        browser.close()
    return out


# -------------------------------------------------------------------------------------------- quality


def bench_quality(rows: int, fit_rows: int, dim: int, clusters: int) -> dict:
    """Full t-SNE fit of ``rows`` points vs fit ``fit_rows`` + place the rest (what maps do above ``--max-fit``),
    on PCA-50 of the synthetic features (what ``project`` feeds t-SNE); trustworthiness on one 2,000-point sample."""
    from tasks.maps.projection import (
        fit_pca,
        knn_label_agreement,
        trustworthiness_sample,
        tsne_embed,
        umap_available,
        umap_embed,
    )

    xs, labs = [], []
    for s in range(0, rows, 16_384):
        x, lab = synthetic_block(s, min(16_384, rows - s), dim, clusters)
        xs.append(x)
        labs.append(lab)
    x = np.concatenate(xs)
    lab = np.concatenate(labs).astype(str)
    y = fit_pca(x, 50, solver="exact").transform(x)
    init = y[:, :2].astype(np.float64)
    ev = np.sort(np.random.default_rng(1).choice(rows, 2000, replace=False))
    out: dict = {"rows": rows, "fit_rows": fit_rows}
    t0 = time.perf_counter()
    part = tsne_embed(y, seed=0, init=init, max_fit=fit_rows, n_jobs=os.cpu_count() or 1)
    out["sample_fit_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    full = tsne_embed(y, seed=0, init=init, max_fit=rows, n_jobs=os.cpu_count() or 1)
    out["full_fit_s"] = round(time.perf_counter() - t0, 1)
    out["trust_sample_fit"] = round(trustworthiness_sample(x[ev], part.coords[ev], 10), 4)
    out["trust_full_fit"] = round(trustworthiness_sample(x[ev], full.coords[ev], 10), 4)
    out["trust_gap"] = round(out["trust_full_fit"] - out["trust_sample_fit"], 4)
    out["knn_label_agreement_sample_fit"] = round(knn_label_agreement(part.coords, lab, 10, ev), 4)
    out["knn_label_agreement_full_fit"] = round(knn_label_agreement(full.coords, lab, 10, ev), 4)
    out["speedup_sample_vs_full"] = round(out["full_fit_s"] / max(out["sample_fit_s"], 1e-9), 2)
    # the approximate (IVF-Flat) kNN that maps use above KNN_EXACT_MAX_ROWS fitted rows, forced here on the same
    # sample fit + placement: its quality against the exact kNN's, t-SNE and UMAP
    t0 = time.perf_counter()
    ivf = tsne_embed(y, seed=0, init=init, max_fit=fit_rows, n_jobs=os.cpu_count() or 1, knn_exact_max_rows=0)
    out["sample_fit_ivf_s"] = round(time.perf_counter() - t0, 1)
    out["trust_sample_fit_ivf"] = round(trustworthiness_sample(x[ev], ivf.coords[ev], 10), 4)
    out["trust_gap_ivf_vs_exact"] = round(out["trust_sample_fit"] - out["trust_sample_fit_ivf"], 4)
    if umap_available():
        for name, limit in (("exact", None), ("ivf", 0)):
            t0 = time.perf_counter()
            um = umap_embed(y, seed=0, init=init, max_fit=fit_rows, knn_exact_max_rows=limit)
            out[f"umap_sample_fit_{name}_s"] = round(time.perf_counter() - t0, 1)
            out[f"umap_trust_sample_fit_{name}"] = round(trustworthiness_sample(x[ev], um.coords[ev], 10), 4)
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/tmp/convlens-million/store"))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=20)
    ap.add_argument("--max-fit", type=int, default=200_000)
    ap.add_argument("--tsne-jobs", type=int, default=1,
                    help="--n-jobs of the t-SNE stage (part of the map's identity; give it the cores)")
    ap.add_argument("--stages", default="features,pca,tsne,umap,report,browser")
    ap.add_argument("--quality-rows", type=int, default=100_000)
    ap.add_argument("--quality-fit", type=int, default=20_000)
    ap.add_argument("--index-factory", default="auto", help="--factory of the index stage (auto, Flat, ...)")
    ap.add_argument("--json", type=Path, default=None, help="append each stage's record to this JSON-lines file")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child == "features":
        write_synthetic(a.store, a.rows, a.dim, a.clusters)
        return 0
    if a._child == "browser":
        print("RESULT " + json.dumps(bench_browser(a.store)))
        return 0
    if a._child == "page":
        page = write_page(a.store, a.rows, a.clusters)
        print("RESULT " + json.dumps(bench_browser(a.store, page)))
        return 0
    if a._child == "quality":
        print("RESULT " + json.dumps(bench_quality(a.quality_rows, a.quality_fit, a.dim, a.clusters)))
        return 0
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    a.store.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}; rows {a.rows} x {a.dim}", flush=True)
    for stage in [s for s in STAGES if s in stages]:
        r = run_child(stage_command(stage, a), env=env)
        rec = {"stage": stage, "rows": a.rows, "dim": a.dim, "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
               "peak_anon_mib": r["peak_anon_mib"], "rc": r["rc"], "load_avg_after": [round(v, 2) for v in os.getloadavg()]}
        for line in r["tail"].splitlines():
            if line.startswith("RESULT "):
                rec["result"] = json.loads(line[7:])
        if stage in ("index", "knn", "audit") and r["rc"] == 0:
            try:
                summary = json.loads(r["tail"][r["tail"].index("{"):])
                rec["result"] = {k: summary.get(k) for k in ("factory", "exact", "rows", "seconds", "nprobe", "file",
                                                             "counts", "mode") if k in summary}
            except ValueError:
                pass
        if stage in ("pca", "tsne", "umap") and r["rc"] == 0:
            try:
                summary = json.loads(r["tail"][r["tail"].index("{"):])
                rec["result"] = {k: summary.get(k) for k in ("map_id", "trustworthiness", "knn_label_agreement_map",
                                                             "knn_label_agreement_full", "seconds")}
            except ValueError:
                pass
        if stage == "report":
            out = Path(a.store) / "reports" / "million.html"
            rec["report_mb"] = round(out.stat().st_size / 1e6, 1) if out.exists() else None
        if r["rc"] != 0:
            rec["tail"] = r["tail"][-800:]
        print(json.dumps(rec), flush=True)
        if a.json:
            with open(a.json, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if r["rc"] != 0 and stage == "features":
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
