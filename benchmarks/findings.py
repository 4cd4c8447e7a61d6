"""Are the dataset audit's findings true? Precision / recall on planted near-copies, leaks and label flips.

    python benchmarks/findings.py [--digits 200] [--tiles 200] [--copies 48] [--flips 20] [--noise 2000] [--keep DIR]

1. **Planted set** from real images: scikit-learn's handwritten digits (upscaled to 96 px, label ``d<digit>``) and
   tiles cut from the photos scikit-image and scikit-learn ship (non-overlapping grid cells with a random jitter,
   near-blank cells dropped; label = the photo), split 75/25 into ``train/`` and ``test/``. Planted: ``--copies``
   near-copies of random images (JPEG re-encode q70-90, 0.9x resize, +-10 % brightness, 5 % crop, or a crop + JPEG),
   half of them in the other split (leaks), a few sources with two copies (clusters of three); ``--flips`` images
   filed under a wrong class folder. Run: ``extract`` (MobileNetV2, real ImageNet weights, offline) + index +
   ``audit-dataset`` at **default settings**; printed: precision and recall of near-duplicate pairs, leak pairs and
   label issues. Peers in the same run: the old fixed rule (feature cosine >= 0.95, no pixel check:
   ``--confirm none --dup-threshold 0.95``) and, for label issues, cleanlab's ``find_label_issues`` on out-of-sample
   kNN class probabilities from the same features (``cross_val_predict`` of a cosine ``KNeighborsClassifier``).
2. **Distinct noise**: ``--noise`` uniform-noise images (32-64 px) under a random-weight ResNet-18 (input 64 px for
   speed); every duplicate / leak finding is false. Peer: the old fixed rule on the same features.

Ground truth for near-duplicates is every pair inside a planted group (source + its copies); a finding pair is
every pair inside a reported cluster. Needs no network (the weights come from an installed package).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins",
          "clock", "brick", "grass", "gravel", "moon", "page", "text", "cell", "colorwheel")


def _photos() -> dict[str, Image.Image]:
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out = {}
    for name in PHOTOS:
        try:
            a = np.asarray(getattr(skd, name)())
        except Exception:  # noqa: BLE001 - an skimage image that needs a download: skip
            continue
        if a.dtype != np.uint8:
            a = (a.astype(np.float64) / max(float(a.max()), 1e-9) * 255).astype(np.uint8)
        out[name] = Image.fromarray(a).convert("RGB")
    s = load_sample_images()
    for fname, a in zip(s.filenames, s.images):
        out[Path(fname).stem] = Image.fromarray(a)
    return out


def _tiles(n: int, rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """Non-overlapping grid cells (3x3 per photo, jittered inside their cell) that are not near-blank."""
    cells = []
    for name, img in _photos().items():
        w, h = img.size
        side = min(w, h) // 4
        for gy in range(3):
            for gx in range(3):
                cw, ch = w // 3, h // 3
                x0 = gx * cw + int(rng.integers(0, max(1, cw - side)))
                y0 = gy * ch + int(rng.integers(0, max(1, ch - side)))
                tile = img.crop((x0, y0, x0 + side, y0 + side)).resize((128, 128), Image.BILINEAR)
                if float(np.asarray(tile.convert("L"), np.float32).std()) >= 12.0:
                    cells.append((name, tile))
    order = rng.permutation(len(cells))[:n]
    return [cells[i] for i in order]


def _edit(img: Image.Image, how: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if how == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(70, 91)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if how == "resize":
        return img.resize((round(w * 0.9), round(h * 0.9)), Image.BILINEAR)
    if how == "light":
        return ImageEnhance.Brightness(img).enhance(float(rng.choice([0.9, 1.1])))
    if how == "crop":
        dw, dh = round(w * 0.05), round(h * 0.05)
        x0, y0 = int(rng.integers(0, dw + 1)), int(rng.integers(0, dh + 1))
        return img.crop((x0, y0, x0 + w - dw, y0 + h - dh))
    if how == "crop+jpeg":
        return _edit(_edit(img, "crop", rng), "jpeg", rng)
    raise ValueError(how)


def build_planted(root: Path, n_digits: int, n_tiles: int, n_copies: int, n_flips: int, seed: int = 0) -> dict:
    """Write the planted set; returns the truth: groups of same-picture paths, leak pairs, flipped paths."""
    from sklearn.datasets import load_digits

    from tasks.core.demo_data import _digit_image

    rng = np.random.default_rng(seed)
    dg = load_digits()
    idx = rng.permutation(len(dg.target))[:n_digits]
    items = [(f"d{int(dg.target[i])}", _digit_image(dg.images[i]), f"digit{i:04d}") for i in idx]
    items += [(name, tile, f"{name}{j:03d}") for j, (name, tile) in enumerate(_tiles(n_tiles, rng))]
    paths, splits, labels = [], [], []
    for lab, img, stem in items:
        split = "test" if rng.random() < 0.25 else "train"
        p = f"{split}/{lab}/{stem}.png"
        (root / split / lab).mkdir(parents=True, exist_ok=True)
        img.save(root / p)
        paths.append(p)
        splits.append(split)
        labels.append(lab)
    groups, leaks = [], set()
    sources = rng.choice(len(items), size=n_copies, replace=False)
    edits = ("jpeg", "resize", "light", "crop", "crop+jpeg")
    for c, s in enumerate(sources):
        lab, img, stem = items[s]
        group = [paths[s]]
        for extra in range(2 if c % 8 == 0 else 1):
            how = edits[(c + extra) % len(edits)]
            split = ("test" if splits[s] == "train" else "train") if (c + extra) % 2 == 0 else splits[s]
            ext = "jpg" if "jpeg" in how else "png"
            p = f"{split}/{lab}/{stem}_copy{extra}_{how.replace('+', '-')}.{ext}"
            (root / split / lab).mkdir(parents=True, exist_ok=True)
            out = _edit(img, how, rng)
            out.save(root / p, quality=95) if ext == "jpg" else out.save(root / p)
            group.append(p)
        groups.append(group)
    for a, b in itertools.chain.from_iterable(itertools.combinations(g, 2) for g in groups):
        if a.split("/")[0] != b.split("/")[0]:
            leaks.add(frozenset((a, b)))
    copied = {p for g in groups for p in g}
    flips = []
    candidates = [i for i in rng.permutation(len(items)) if paths[i] not in copied][:n_flips]
    classes = sorted(set(labels))
    for i in candidates:
        lab = labels[i]
        same_kind = [c for c in classes if (c[0] == "d" and len(c) == 2) == (lab[0] == "d" and len(lab) == 2) and c != lab]
        new = str(rng.choice(same_kind))
        split, _, fname = paths[i].split("/")
        dst = f"{split}/{new}/{fname}"
        (root / split / new).mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / paths[i]), str(root / dst))
        flips.append(dst)
    return {"groups": groups, "leaks": [sorted(x) for x in leaks], "flips": flips, "images": len(items) + sum(len(g) - 1 for g in groups)}


def _pairs_from_clusters(f) -> set[frozenset]:
    near = f[f["finding"] == "near-duplicate"]
    out: set[frozenset] = set()
    for _, g in near.groupby("cluster"):
        members = set(g["path"]) | set(g["other_path"].dropna())
        out |= {frozenset(p) for p in itertools.combinations(sorted(members), 2)}
    return out


def _pr(found: set, truth: set) -> tuple[float, float, int, int]:
    tp = len(found & truth)
    return (tp / len(found) if found else 1.0), (tp / len(truth) if truth else 1.0), len(found), len(truth)


def _line(name: str, pr: tuple[float, float, int, int]) -> str:
    p, r, nf, nt = pr
    return f"  {name:38s} precision {p:.3f}  recall {r:.3f}   (found {nf}, planted {nt})"


def run_planted(a: argparse.Namespace, work: Path) -> dict:
    from storage.audits import read_findings
    from storage.features import load_features
    from storage.paths import Store
    from tasks.extract.features import ExtractConfig, run_extraction
    from tasks.index.dataset_audit import AuditParams, run_dataset_audit

    data, store = work / "planted", work / "store-planted"
    truth = build_planted(data, a.digits, a.tiles, a.copies, a.flips)
    print(f"planted set: {truth['images']} images, {len(truth['groups'])} copy groups "
          f"({sum(len(g) - 1 for g in truth['groups'])} copies), {len(truth['leaks'])} leak pairs, {len(truth['flips'])} label flips")
    t = time.perf_counter()
    fm = run_extraction(ExtractConfig(data=str(data), store=str(store), progress=False, device="cpu"))
    print(f"extract (mobilenet_v2 imagenet, penultimate): {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    m = run_dataset_audit(str(store), gpu="off")
    t_audit = time.perf_counter() - t
    print(f"audit-dataset (defaults): {t_audit:.1f}s\n  {m['near_copy_rule']}")
    f = read_findings(str(store), m["artefact_id"])
    t = time.perf_counter()
    m_old = run_dataset_audit(str(store), params=AuditParams(dup_threshold=0.95, confirm="none"), gpu="off")
    t_old = time.perf_counter() - t
    f_old = read_findings(str(store), m_old["artefact_id"])

    true_pairs = {frozenset(p) for g in truth["groups"] for p in itertools.combinations(sorted(g), 2)}
    true_leaks = {frozenset(x) for x in truth["leaks"]}
    res = {}
    true_leak_images = {p for x in true_leaks for p in x}
    for name, ff in (("default", f), ("old cosine>=0.95", f_old)):
        found_leaks = {frozenset((r.path, r.other_path)) for r in ff[ff["finding"] == "leakage"].itertuples()}
        res[name] = {"near": _pr(_pairs_from_clusters(ff), true_pairs), "leak": _pr(found_leaks, true_leaks),
                     "leak_images": _pr({p for x in found_leaks for p in x}, true_leak_images)}
    flips = set(truth["flips"])
    res["default"]["labels"] = _pr(set(f.loc[f["finding"] == "label-disagreement", "path"]), flips)

    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    meta, x = load_features(Store(str(store)).artefact_dir("features", fm["artefact_id"]))
    y_names = meta["label"].astype(str).to_numpy()
    classes, y = np.unique(y_names, return_inverse=True)
    t = time.perf_counter()
    probs = cross_val_predict(KNeighborsClassifier(n_neighbors=10, weights="distance", metric="cosine"), x, y, cv=5,
                              method="predict_proba")
    issues = find_label_issues(y, probs, filter_by="prune_by_noise_rate")
    t_cl = time.perf_counter() - t
    res["cleanlab"] = {"labels": _pr(set(meta.loc[issues, "path"]), flips)}

    print("near-duplicates (pairs):")
    for name in ("default", "old cosine>=0.95"):
        print(_line(name, res[name]["near"]))
    print("train/test leakage (pairs; a copy-to-copy pair across splits counts too):")
    for name in ("default", "old cosine>=0.95"):
        print(_line(name, res[name]["leak"]))
    print("train/test leakage (images on either side of a leak):")
    for name in ("default", "old cosine>=0.95"):
        print(_line(name, res[name]["leak_images"]))
    print("label issues (images):")
    print(_line("kNN label disagreement (default)", res["default"]["labels"]))
    print(_line("cleanlab find_label_issues (kNN cv probs)", res["cleanlab"]["labels"]))
    print(f"  time: audit {t_audit:.1f}s (old rule {t_old:.1f}s), cleanlab cv + find_label_issues {t_cl:.1f}s")
    missed = true_pairs - _pairs_from_clusters(f)
    wrong = _pairs_from_clusters(f) - true_pairs
    for p in sorted(map(sorted, missed))[:10]:
        print(f"  missed pair: {p[0]} ~ {p[1]}")
    for p in sorted(map(sorted, wrong))[:10]:
        print(f"  false pair:  {p[0]} ~ {p[1]}")
    found_leaks = {frozenset((r.path, r.other_path)) for r in f[f["finding"] == "leakage"].itertuples()}
    for p in sorted(map(sorted, true_leaks - found_leaks))[:10]:
        print(f"  leak pair not reported: {p[0]} ~ {p[1]}")
    res["calibration"] = m.get("calibration")
    return res


def run_noise(a: argparse.Namespace, work: Path) -> dict:
    from tasks.extract.features import ExtractConfig, run_extraction
    from tasks.index.dataset_audit import AuditParams, run_dataset_audit

    data, store = work / "noise", work / "store-noise"
    rng = np.random.default_rng(1)
    for i in range(a.noise):
        s = int(rng.integers(32, 65))
        split = "test" if i % 4 == 0 else "train"
        (data / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)).save(data / split / f"noise{i:05d}.png")
    t = time.perf_counter()
    run_extraction(ExtractConfig(data=str(data), store=str(store), model="resnet18", weights="none", resize=64, crop=64,
                                 progress=False, device="cpu"))
    print(f"\ndistinct noise: {a.noise} images, resnet18 random weights (64 px input); extract {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    m = run_dataset_audit(str(store), gpu="off")
    t_new = time.perf_counter() - t
    m_old = run_dataset_audit(str(store), params=AuditParams(dup_threshold=0.95, confirm="none"), gpu="off")
    c, co = m["counts"], m_old["counts"]
    print(f"  default:          near-duplicate {c['near-duplicate']}, leakage {c['leakage']}   ({t_new:.1f}s)\n  {m['near_copy_rule']}")
    print(f"  old cosine>=0.95: near-duplicate {co['near-duplicate']}, leakage {co['leakage']}")
    return {"default": c, "old": co, "seconds": t_new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=200)
    ap.add_argument("--copies", type=int, default=48)
    ap.add_argument("--flips", type=int, default=20)
    ap.add_argument("--noise", type=int, default=2000)
    ap.add_argument("--skip-noise", action="store_true")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder, removed)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    a = ap.parse_args()
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="sklearn")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="convlens-findings-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = {"planted": run_planted(a, work)}
        if not a.skip_noise:
            out["noise"] = run_noise(a, work)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
