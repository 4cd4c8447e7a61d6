"""Helpers for the report tests: a small store with hostile names/labels and hand-made artefacts of the
later stages (a t-SNE map with a grid image, a dataset audit, an attribution audit, a neurons artefact)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

HOSTILE_LABELS = (
    "<img src=x onerror=window.__pwned=1>",
    "quo\"te's & amp\u2028line\u2029para",
)
SCRIPT_LABEL = "</script><script>window.__pwned=2</script>"
HOSTILE_FILE = "\"><img src=x onerror=window.__pwned=3>.png"
NON_UTF8_DIR = b"bytes-\xff\xfe"


def _png(rgb, size=(40, 36), seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = rgb
    arr = np.clip(arr.astype(int) + rng.integers(-30, 30, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_hostile_dataset(root: Path, per_class: int = 4) -> Path:
    """Folder dataset: 3 colour classes + 2 hostile-label classes + a non-UTF-8 folder, hostile file names, one corrupt file."""
    root.mkdir(parents=True, exist_ok=True)
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200),
              HOSTILE_LABELS[0]: (200, 200, 30), HOSTILE_LABELS[1]: (30, 200, 200)}
    seed = 0
    for name, rgb in colors.items():
        d = root / name
        d.mkdir(exist_ok=True)
        for i in range(per_class):
            seed += 1
            fname = HOSTILE_FILE if (name == "red" and i == 0) else f"{i}\u2028{name[:3]}.png" if name == "green" and i == 0 else f"img{i}.png"
            (d / fname).write_bytes(_png(rgb, seed=seed))
    bad = os.path.join(os.fsencode(root), NON_UTF8_DIR)
    os.makedirs(bad, exist_ok=True)
    for i in range(2):
        seed += 1
        with open(os.path.join(bad, b"pic-\xff%d.png" % i), "wb") as fh:
            fh.write(_png((120, 60, 160), seed=seed))
    (root / "red" / "broken<b>.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def extract(data: Path | str, store: Path | str) -> dict:
    from tasks.extract.features import ExtractConfig, run_extraction

    return run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none",
                                        progress=False, num_workers=0, max_reject_rate=0.5))


def make_script_label_list(root: Path, dest: Path) -> Path:
    """A CSV list (in ``dest``, a copy of the colour images of ``root``) whose labels contain ``</script>``."""
    import shutil

    rows = []
    for name in ("red", "green", "blue"):
        for p in sorted((root / name).glob("img*.png")):
            rel = Path(name) / p.name
            (dest / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest / rel)
            rows.append({"path": str(rel), "label": SCRIPT_LABEL if name == "red" else name})
    # one image only in this run (shows up as "removed" when it is the previous run)
    (dest / "extra.png").write_bytes(_png((10, 10, 10), seed=99))
    rows.append({"path": "extra.png", "label": "blue"})
    lst = dest / "list.csv"
    pd.DataFrame(rows).to_csv(lst, index=False)
    return lst


_CACHE: dict[str, dict] = {}


def hostile_store(tmp_path_factory) -> dict:
    """Build once per session: store with artefact A (hostile folder) + B (CSV list, ``</script>`` labels)
    + fake later-stage artefacts for A. Returns ``{"store", "a", "b", "ids", "root"}``."""
    if "hostile" in _CACHE:
        return _CACHE["hostile"]
    base = tmp_path_factory.mktemp("report")
    root = make_hostile_dataset(base / "data")
    store = base / "store"
    a = extract(root, store)
    b = extract(make_script_label_list(root, base / "listdata"), store)
    ids = add_fake_artefacts(store, a["artefact_id"])
    _CACHE["hostile"] = {"store": store, "a": a["artefact_id"], "b": b["artefact_id"], "ids": ids, "root": root,
                         "a_manifest": a, "b_manifest": b}
    return _CACHE["hostile"]


def _grid_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8)[None, :, None], (80, 1, 3))).save(buf, "PNG")
    return buf.getvalue()


def _overlay_png(seed: int) -> bytes:
    """A 2:1 overlay like the attribution audit's: original (left) | heat-map blend (right), 48 px high."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (48, 96, 3), dtype=np.uint8)
    arr[:, 48:, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def add_fake_artefacts(store: Path, fid: str) -> dict[str, str]:
    """Publish a maps (coords + grid), an audits (dataset + attribution) and a neurons artefact for ``fid``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.features import read_meta
    from storage.manifest import file_entry, write_manifest
    from storage.paths import Store

    s = Store(store)
    fdir = s.artefact_dir("features", fid)
    from storage.manifest import read_manifest

    fman = read_manifest(fdir)
    meta = read_meta(fdir, fman)
    n = len(meta)
    ids = {}
    # maps: t-SNE coords on a circle + a grid image
    adir = s.artefact_dir("maps", "tsne-test-000000000001", create=True)
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pq.write_table(pa.table({"row": np.arange(n), "image_id": meta["image_id"], "path": meta["path"],
                             "label": meta["label"], "x": np.cos(ang).astype(np.float32) * 10,
                             "y": np.sin(ang).astype(np.float32) * 10}), adir / "coords.parquet")
    (adir / "grid.png").write_bytes(_grid_png())
    write_manifest(adir, {"kind": "maps", "artefact_id": adir.name, "source": fid, "method": "tsne", "rows": n,
                          "files": [file_entry(adir, "coords.parquet", role="coords", rows=n),
                                    file_entry(adir, "grid.png", role="grid")]})
    ids["maps"] = adir.name
    # dataset audit: a duplicate pair and an outlier (+ hash ids, which the report must not show as text)
    adir = s.artefact_dir("audits", "dataset-audit-test-000000000002", create=True)
    paths = list(meta["path"][:3])
    pd.DataFrame({"finding": ["near-duplicate", "near-duplicate", "outlier"], "path": paths, "score": [0.99, 0.99, 3.2],
                  "image_id": list(meta["image_id"][:3]),
                  "other_path": [paths[1], paths[0], None]}).to_parquet(adir / "findings.parquet")
    write_manifest(adir, {"kind": "dataset-audit", "artefact_id": adir.name,
                          "source": {"features": fid}, "files": [file_entry(adir, "findings.parquet", role="findings")]})
    ids["audit"] = adir.name
    # attribution audit in the real layout (tasks/attribution/audit.py): scores + one overlay PNG per row
    # (original | blend). Best insertion - deletion per image: row 1 -0.1 (worst), row 2 0.4, row 0 0.7;
    # mean gap: occlusion 0.167, gradcam 0.267 (the method to believe).
    adir = s.artefact_dir("audits", "attribution-test-000000000003", create=True)
    aucs = {("occlusion", 0): (0.2, 0.9), ("occlusion", 1): (0.5, 0.1), ("occlusion", 2): (0.3, 0.5),
            ("gradcam", 0): (0.1, 0.6), ("gradcam", 1): (0.3, 0.2), ("gradcam", 2): (0.2, 0.6)}
    rows, entries = [], []
    for (method, i), (dele, ins) in aucs.items():
        name = f"ov-{method}-{i}.png"
        (adir / name).write_bytes(_overlay_png(i))
        entries.append(file_entry(adir, name, role="overlay"))
        rows.append({"image_id": meta["image_id"][i], "path": meta["path"][i], "label": meta["label"][i],
                     "method": method, "target": 7, "target_kind": "pred", "target_name": f"class-{i}", "pred": 7,
                     "prob": 0.5, "deletion_auc": dele, "insertion_auc": ins, "overlay": name})
    pd.DataFrame(rows).to_parquet(adir / "scores.parquet")
    write_manifest(adir, {"kind": "attribution", "artefact_id": adir.name,
                          "features": {"id": fid}, "images": 3,
                          "faithfulness": {"deletion_baseline": 0.0, "insertion_start": "blur", "score": "prob", "steps": 8},
                          "files": [file_entry(adir, "scores.parquet", role="scores")] + entries})
    ids["attribution"] = adir.name
    # neurons: class visualisation (image + score per step)
    adir = s.artefact_dir("neurons", "class_viz-test-000000000005", create=True)
    (adir / "class-3.png").write_bytes(_png((90, 120, 200), size=(32, 32)))
    pd.DataFrame({"class_index": [3] * 5, "class_name": ["tabby<cat>"] * 5, "step": range(5),
                  "score": [0.0, 1.0, 2.5, 3.0, 4.0], "prob": [0.1] * 5, "l2": [0.0] * 5}).to_parquet(adir / "class_viz.parquet")
    write_manifest(adir, {"kind": "neurons", "technique": "class_viz", "artefact_id": adir.name, "source": {"features_id": fid},
                          "classes": [{"class_index": 3, "class_name": "tabby<cat>", "score_start": 0.0, "score_end": 4.0,
                                       "prob_end": 0.1}],
                          "files": [file_entry(adir, "class-3.png", role="image", class_index=3, class_name="tabby<cat>"),
                                    file_entry(adir, "class_viz.parquet", role="table")]})
    ids["class_viz"] = adir.name
    # neurons: first-layer filters image
    adir = s.artefact_dir("neurons", "filters-test-000000000004", create=True)
    (adir / "filters.png").write_bytes(_grid_png())
    write_manifest(adir, {"kind": "neurons", "technique": "filters", "artefact_id": adir.name,
                          "source": {"features_id": fid}, "files": [file_entry(adir, "filters.png", role="image")]})
    ids["neurons"] = adir.name
    return ids
