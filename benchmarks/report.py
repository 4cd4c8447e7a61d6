"""Benchmark the report: render time and file size for 1k / 10k / 100k synthetic points, and time to first
paint / to an interactive scatter in headless chromium.

Peer, measured in the same run: plotly's own ``plotly.io.write_html`` of a bare ``Scattergl`` figure with the
same points and hover text (no thumbnails, no neighbours, no other sections). Ratios are ours / peer.

Synthetic data: ``N`` rows of 64-d Gaussian-mixture features (10 classes), each with its own 32x32 JPEG file
(a noisy class colour), written as a real features artefact; no t-SNE/index artefacts, so the report computes
its PCA-2 and kNN itself (the worst case).

    python benchmarks/report.py [--sizes 1000,10000,100000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from pathlib import Path

import numpy as np


def make_artefact(work: Path, n: int, dim: int = 64, seed: int = 0) -> tuple[Path, str]:
    """A features artefact of ``n`` synthetic rows with one small JPEG per row."""
    from PIL import Image

    from storage.atomic import sha256_bytes
    from storage.features import PartWriter, rejects_schema, write_part
    from storage.manifest import write_manifest
    from storage.paths import Store, artefact_id

    rng = np.random.default_rng(seed)
    root = work / f"data-{n}"
    store = work / f"store-{n}"
    if store.exists():
        s = Store(store)
        aid = next(iter(s.iter_artefacts("features")))[0]
        return store, aid
    labels = rng.integers(0, 10, n)
    centres = rng.normal(size=(10, dim)).astype(np.float32) * 3
    feats = centres[labels] + rng.normal(size=(n, dim)).astype(np.float32)
    colours = rng.integers(0, 255, (10, 3))
    meta = []
    for i in range(n):
        cls = int(labels[i])
        arr = np.clip(colours[cls] + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=80)
        rel = f"class{cls}/img{i:06d}.jpg"
        (root / f"class{cls}").mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(buf.getvalue())
        meta.append({"image_id": sha256_bytes(buf.getvalue()), "path": rel, "label": f"class{cls}", "split": None,
                     "width": 32, "height": 32})
    aid = artefact_id(f"bench-{n}", {"n": n, "seed": seed})
    adir = Store(store).artefact_dir("features", aid, create=True)
    preds = np.stack([(labels + j) % 1000 for j in range(5)], 1).astype(np.int32)
    preds[rng.random(n) < 0.2, 0] = 999
    w = PartWriter(adir, dim, True)
    w.add(meta, feats, preds, np.full((n, 5), 0.2, np.float32))
    entries = [dict(e, role="part") for e in w.close()]
    import pyarrow as pa

    rej = write_part(adir, pa.table({"path": [], "reason": [], "detail": [], "image_id": []}, schema=rejects_schema()),
                     prefix="rejects")
    write_manifest(adir, {"kind": "features", "artefact_id": aid, "dataset_root": str(root), "data": str(root),
                          "model": {"arch": "synthetic", "weights": "none"}, "layer": {"alias": None, "name": "synthetic", "side": "output"},
                          "pool": "none", "preprocessing": {}, "dim": dim, "with_preds": True, "extra_columns": [],
                          "rows": n, "unique_images": n, "rejects": 0, "files": entries + [dict(rej, role="rejects")],
                          "run": {}})
    return store, aid


def peer_html(store: Path, aid: str, out: Path) -> float:
    """plotly.io.write_html of a bare Scattergl of the same points (PCA-2) with path/label hover text."""
    import plotly.graph_objects as go

    from reports.figures import pca2
    from storage.features import load_features
    from storage.paths import Store

    t0 = time.perf_counter()
    meta, feats = load_features(Store(store).artefact_dir("features", aid))
    xy = pca2(feats)
    fig = go.Figure(go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", text=[f"{p}<br>{lab}" for p, lab in zip(meta["path"], meta["label"])],
                                 marker={"color": [int(x[5:]) for x in meta["label"]], "size": 4}))
    fig.write_html(out, include_plotlyjs=True, full_html=True)
    return time.perf_counter() - t0


def paint_times(path: Path, ready_js: str) -> tuple[float, float]:
    """(first contentful paint ms, ms until ``ready_js`` is true) for ``path`` in headless chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        page.goto(path.as_uri(), timeout=300_000)
        page.wait_for_function(ready_js, timeout=300_000)
        ready = (time.perf_counter() - t0) * 1000
        fcp = page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0] || {startTime: NaN}).startTime")
        browser.close()
    return float(fcp), ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--workdir", default=None, help="where the synthetic datasets go (default: a new temp folder)")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    import tempfile

    from reports.render import write_report

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="convlens-bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'N':>7} {'render s':>9} {'MB':>6} {'thumbs':>7} {'FCP ms':>7} {'ready ms':>9} | "
          f"{'peer s':>7} {'peer MB':>8} {'peer ready':>10} | render x  size x  ready x")
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.perf_counter()
        store, aid = make_artefact(work, n)
        gen = time.perf_counter() - t0
        out = work / f"report-{n}.html"
        t0 = time.perf_counter()
        write_report(store, out=out)
        ours = time.perf_counter() - t0
        html = out.read_text("utf-8")
        thumbs = html.count("data:image/jpeg;base64,")
        peer = work / f"peer-{n}.html"
        tp = peer_html(store, aid, peer)
        fcp = ready = pready = float("nan")
        if not args.no_browser:
            fcp, ready = paint_times(out, "window.convlens && window.convlens.ready === true")
            _, pready = paint_times(peer, "document.querySelector('.plotly canvas') !== null || document.querySelector('.main-svg') !== null")
        mb, pmb = out.stat().st_size / 1e6, peer.stat().st_size / 1e6
        print(f"{n:>7} {ours:>9.1f} {mb:>6.1f} {thumbs:>7} {fcp:>7.0f} {ready:>9.0f} | {tp:>7.1f} {pmb:>8.1f} {pready:>10.0f} | "
              f"{ours / tp:>8.1f} {mb / pmb:>7.2f} {ready / pready:>8.2f}   (data generated in {gen:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
