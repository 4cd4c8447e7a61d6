"""The embedded demo dataset, built offline from images that installed packages ship.

- ``digits``: scikit-learn's 1797 labelled 8x8 digits, upscaled (nearest, then smoothed) to 96x96 RGB PNGs,
  ``per_class`` per digit, split into ``train/`` and ``test/`` (label = the digit);
- ``photos``: the real colour / grey photographs scikit-image and scikit-learn ship (astronaut, chelsea the
  cat, coffee, rocket, ...), under ``photos/<name>.png`` (label ``photo``).

Idempotent: a file is written only when missing or different, so image_ids stay stable across runs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["build_demo_dataset", "PHOTO_NAMES"]

log = logging.getLogger(__name__)
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "colorwheel", "camera", "coins", "clock", "brick", "grass", "gravel", "moon", "page", "text", "cell")


def _write_if_changed(path: Path, img: Image.Image) -> bool:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    data = buf.getvalue()
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
    n_test = max(1, int(round(per_class * test_fraction)))
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)[:per_class]
        for j, i in enumerate(idx):
            split = "test" if j < n_test else "train"
            written += _write_if_changed(root / split / str(label) / f"digit_{label}_{i:04d}.png", _digit_image(digits.images[i]))
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
        n_photos += 1
    try:
        from sklearn.datasets import load_sample_images

        for fname, arr in zip(load_sample_images().filenames, load_sample_images().images):
            written += _write_if_changed(root / "photos" / f"{Path(fname).stem}.png", Image.fromarray(arr))
            n_photos += 1
    except (OSError, ImportError) as exc:
        log.debug("sklearn sample images unavailable: %s", exc)
    return {"digits": n_digits, "photos": n_photos, "written": written}
