"""Pixel-space vectors: the CS231n baseline that nearest neighbours in FC7 space are compared against.

An image is decoded (RGB, EXIF orientation applied, alpha on white: :func:`tasks.core.images.decode_image`),
resized to ``size x size`` (aspect ratio ignored, antialiased bilinear, like CIFAR thumbnails) and flattened to
``(size * size * 3,) float32`` in ``[0, 1]`` (HWC order). Pixel-space neighbours then find images of similar
colour layout, not similar content.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image

from storage.errors import UsageError
from tasks.core.images import DecodeLimits, RejectedImage, decode_image, read_file_bytes, stored_image_location

__all__ = ["PIXEL_SIZE", "pixel_vector", "pixel_vectors", "load_pixel_vector"]

log = logging.getLogger(__name__)
PIXEL_SIZE = 32


def pixel_vector(img: Image.Image, size: int = PIXEL_SIZE) -> np.ndarray:
    """RGB PIL image -> ``(size * size * 3,) float32`` in ``[0, 1]``."""
    if size < 1:
        raise UsageError(f"pixel size must be >= 1, got {size}")
    small = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(small, dtype=np.float32) / 255.0).reshape(-1)


def load_pixel_vector(path: str | os.PathLike[str], size: int = PIXEL_SIZE,
                      limits: DecodeLimits = DecodeLimits(strict_extension=False)) -> np.ndarray:
    """Read and decode one image file to its pixel vector; raises :class:`RejectedImage` with the reason."""
    data = read_file_bytes(path, limits)
    return pixel_vector(decode_image(data, str(path), limits), size)


def pixel_vectors(root: str | os.PathLike[str], paths: Sequence[str], size: int = PIXEL_SIZE,
                  workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Pixel vectors of the stored images ``root`` + ``path`` (local or fsspec URL) for every path, decoded in a
    thread pool.

    Returns ``(vectors (M, size*size*3) float32, ok (N,) bool, failures [(path, reason)])`` where ``vectors``
    holds the rows with ``ok`` true in input order. Files that vanished or no longer decode are failures, never
    a crash. Memory O(N x size^2 x 3) floats (12 KiB per image at 32 px).
    """
    n = len(paths)
    dim = size * size * 3
    out = np.zeros((n, dim), np.float32)
    ok = np.zeros(n, bool)
    failures: list[tuple[str, str]] = []

    def one(i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, load_pixel_vector(stored_image_location(root, paths[i]), size), ""
        except RejectedImage as exc:
            return i, None, str(exc)

    workers = workers or min(4, os.cpu_count() or 1)
    bar = None
    if progress and n:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="pixels", unit="img", dynamic_ncols=True)
    try:
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            for i, vec, err in pool.map(one, range(n)):
                if vec is None:
                    failures.append((paths[i], err))
                else:
                    out[i] = vec
                    ok[i] = True
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if failures:
        log.warning("%d of %d images could not be read for the pixel index (e.g. %s: %s)", len(failures), n, *failures[0])
    return out[ok], ok, failures


