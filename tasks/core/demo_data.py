"""The embedded demo dataset, built offline from images that installed packages ship.

- ``digits``: scikit-learn's 1797 labelled 8x8 digits, upscaled (nearest, then smoothed) to 96x96 RGB PNGs,
  ``per_class`` per digit, split into ``train/`` and ``test/`` (label = the digit);
- ``photos``: the real colour / grey photographs scikit-image and scikit-learn ship (astronaut, chelsea the
  cat, coffee, rocket, ...), under ``photos/<name>.png`` (label ``photo``);
- planted cases, so that the dataset audit has true findings to show (:data:`PLANTED_COPIES`,
  :data:`PLANTED_FLIPS`, listed by :func:`planted_cases`): near-copies of digits and photos (a JPEG re-encode, a
  0.9x resize, a +-10 % re-light, a 5 % crop), three of them across ``train/`` and ``test/`` (leaks), and three
  digits filed under the wrong class folder (label flips; the file name keeps the true digit).

Idempotent: a file is written only when missing or different, so image_ids stay stable across runs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["build_demo_dataset", "planted_cases", "PHOTO_NAMES", "PLANTED_COPIES", "PLANTED_FLIPS"]

log = logging.getLogger(__name__)
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "colorwheel", "camera", "coins", "clock", "brick", "grass", "gravel", "moon", "page", "text", "cell")


# (copy path, source path, edit): near-copies planted in the demo set. Sources are digits by (label, index into
# scikit-learn's digits) or photos by name; a source that is a test digit and a copy under train/ (or the
# reverse) is a train/test leak.
PLANTED_COPIES = (
    ("train/3/digit_3_{i3}_reencoded.jpg", "test/3/digit_3_{i3}.png", "jpeg"),
    ("test/7/digit_7_{i7}_resized.png", "train/7/digit_7_{i7}.png", "resize"),
    ("test/1/digit_1_{i1}_cropped.png", "train/1/digit_1_{i1}.png", "crop"),
    ("train/5/digit_5_{i5}_relit.png", "train/5/digit_5_{i5}.png", "brighter"),
    ("photos/astronaut_small.png", "photos/astronaut.png", "resize"),
    ("photos/rocket_relit.png", "photos/rocket.png", "darker"),
    ("photos/camera_cropped.jpg", "photos/camera.png", "crop+jpeg"),
)
# (true digit, class folder it is filed under): label flips, taken from digits beyond the first ``per_class``.
PLANTED_FLIPS = ((4, 9), (8, 3), (0, 6))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=80)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _edit(img: Image.Image, how: str) -> Image.Image:
    """One near-copy edit: resize 0.9x, brighter / darker by 10 %, or a 5 % crop (offset 2/3 of the margin)."""
    from PIL import ImageEnhance

    w, h = img.size
    if how == "resize":
        return img.resize((round(w * 0.9), round(h * 0.9)), Image.BILINEAR)
    if how in ("brighter", "darker"):
        return ImageEnhance.Brightness(img).enhance(1.1 if how == "brighter" else 0.9)
    if how.startswith("crop"):
        dw, dh = round(w * 0.05), round(h * 0.05)
        x0, y0 = 2 * dw // 3, 2 * dh // 3
        return img.crop((x0, y0, x0 + w - dw, y0 + h - dh))
    return img


def _write_if_changed(path: Path, img: Image.Image) -> bool:
    data = _encode(img, "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _digit_image(pixels: np.ndarray, size: int = 96) -> Image.Image:
    """8x8 values in [0, 16] -> dark-on-light RGB ``size`` x ``size`` image (like ink on paper)."""
    grey = (255 - pixels.reshape(8, 8) / 16.0 * 255).astype(np.uint8)
    img = Image.fromarray(grey, "L").resize((size, size), Image.NEAREST).filter(ImageFilter.GaussianBlur(size / 40))
    return img.convert("RGB")


def build_demo_dataset(root: str | Path, per_class: int = 24, test_fraction: float = 0.25) -> dict[str, int]:
    """Write the demo image folder under ``root``; returns counts ``{"digits": n, "photos": m, "written": w}``."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    written = n_digits = 0
    made: dict[str, Image.Image] = {}  # what was written, by relative path: the planted copies' sources
    for rel, _kind, img in _digit_entries(digits, per_class, test_fraction):
        written += _write_if_changed(root / rel, img)
        made[rel] = img
        n_digits += 1
    n_photos = 0
    import skimage.data as skd

    for name in PHOTO_NAMES:
        try:
            arr = getattr(skd, name)()
        except Exception as exc:  # noqa: BLE001 - some skimage images need an optional download; skip those
            log.debug("skipping skimage.data.%s: %s", name, exc)
            continue
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(float(arr.max()), 1e-9) * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        img.thumbnail((512, 512))
        written += _write_if_changed(root / "photos" / f"{name}.png", img.convert("RGB"))
        made[f"photos/{name}.png"] = img.convert("RGB")
        n_photos += 1
    try:
        from sklearn.datasets import load_sample_images

        for fname, arr in zip(load_sample_images().filenames, load_sample_images().images):
            written += _write_if_changed(root / "photos" / f"{Path(fname).stem}.png", Image.fromarray(arr))
            n_photos += 1
    except (OSError, ImportError) as exc:
        log.debug("sklearn sample images unavailable: %s", exc)
    n_planted = 0
    for rel, src, how in _copy_specs(digits, per_class, test_fraction):
        if src not in made:  # e.g. a photo this scikit-image version does not ship
            continue
        written += _write_if_changed(root / rel, _edit(made[src], how))
        n_planted += 1
    return {"digits": n_digits, "photos": n_photos, "planted_copies": n_planted, "planted_flips": len(PLANTED_FLIPS),
            "written": written}


def _split_indices(digits, per_class: int, test_fraction: float) -> dict[int, tuple[list[int], list[int]]]:
    """Per label: (test indices, train indices) into scikit-learn's digits."""
    n_test = max(1, int(round(per_class * test_fraction)))
    out = {}
    for label in range(10):
        idx = [int(i) for i in np.flatnonzero(digits.target == label)[:per_class]]
        out[label] = (idx[:n_test], idx[n_test:])
    return out


def _digit_entries(digits, per_class: int, test_fraction: float):
    """(relative path, kind, image) of every digit file: the split digits, then the label flips."""
    for label, (test, train) in _split_indices(digits, per_class, test_fraction).items():
        for split, idx in (("test", test), ("train", train)):
            for i in idx:
                yield f"{split}/{label}/digit_{label}_{i:04d}.png", "digit", _digit_image(digits.images[i])
    for true, filed in PLANTED_FLIPS:
        i = int(np.flatnonzero(digits.target == true)[per_class])
        yield f"train/{filed}/digit_{true}_{i:04d}.png", "flip", _digit_image(digits.images[i])


def _copy_specs(digits, per_class: int, test_fraction: float) -> list[tuple[str, str, str]]:
    """:data:`PLANTED_COPIES` with the digit indices filled in (the 2nd test / train digit of the label)."""
    split = _split_indices(digits, per_class, test_fraction)
    fill = {}
    for _, src, _ in PLANTED_COPIES:
        for lab in range(10):
            if f"/{lab}/" in src:
                pool = split[lab][0] if src.startswith("test/") else split[lab][1]
                fill[f"i{lab}"] = f"{pool[min(1, len(pool) - 1)]:04d}"
    return [(rel.format(**fill), src.format(**fill), how) for rel, src, how in PLANTED_COPIES]


def planted_cases(per_class: int = 24, test_fraction: float = 0.25) -> dict[str, list[dict[str, str]]]:
    """What :func:`build_demo_dataset` plants: ``{"copies": [{path, source, edit}], "flips": [{path, label,
    true_label}]}`` (paths relative to the demo root), so a check can compare the audit's findings with them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    copies = [{"path": r, "source": s, "edit": h} for r, s, h in _copy_specs(digits, per_class, test_fraction)]
    flips = []
    for true, filed in PLANTED_FLIPS:
        i = int(np.flatnonzero(digits.target == true)[per_class])
        flips.append({"path": f"train/{filed}/digit_{true}_{i:04d}.png", "label": str(filed), "true_label": str(true)})
    return {"copies": copies, "flips": flips}
