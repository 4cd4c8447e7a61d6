"""Is this pair of images the same picture? A model-independent near-copy test on the stored pixels.

A feature-space kNN edge says "these two look alike to the model"; under a model for which all inputs look alike
(upscaled 8x8 digits under ImageNet MobileNetV2, noise under a random-weight ResNet) that says nothing about
whether the two files are copies of one picture. This module answers the second question from the images
themselves, so the answer means the same for every model:

1. **Thumbnail**: the image (opened with :func:`tasks.core.images.open_stored_image`) in grey, resized to
   ``THUMB x THUMB`` (aspect ignored, antialiased bilinear) and blurred (Gaussian, ``BLUR_SIGMA`` px) so that
   sub-pixel shifts and re-encoding noise do not count: ``(THUMB, THUMB) float32`` in [0, 255].
2. **Aligned match** (:func:`match`): one thumbnail is shrunk by each scale in ``SCALES`` (a copy may be a crop of
   up to 10 %) and slid over the other (``cv2.matchTemplate``, normalised cross-correlation, every integer
   offset, then a sub-pixel refinement of the peak), both ways round; at the best alignment the result is
   ``corr`` (Pearson correlation, so global brightness / contrast changes do not count) and ``resid`` (the ``RESID_QUANTILE`` quantile of the absolute
   residual after a least-squares gain + offset fit, in units of the template's standard deviation: a different
   picture differs *somewhere* by a lot, a copy differs everywhere by a little).
3. **Self-copy tolerance** (:func:`tolerance`): how far the image's *own* near-copies land — a JPEG re-encode
   (quality 75), a 0.9x resize, brightness x0.9 and x1.1 and six 5 % crops at different offsets are made from it
   and matched against it; the tolerance is (lowest ``corr``, highest ``resid``). Textured photos move more under
   these edits than smooth digits do, so each image carries its own yardstick.
4. **Decision** (:func:`is_near_copy`): the pair is the same picture when ``corr >= CORR_FLOOR``,
   ``1 - corr <= MARGIN x (1 - tol_corr)`` and ``resid <= MARGIN x max(tol_resid, MIN_RESID_TOL)``, with the more
   lenient tolerance of the two images.

Why not a perceptual hash (pHash / dHash): measured while designing this on the kinds of images the benchmark uses
(``benchmarks/findings.py``: upscaled digits, photo tiles, noise), a 5 % crop moves a 63-bit DCT pHash by up to
16-20 bits while two *different* upscaled handwritten digits can sit 2 bits apart, so no hash cut-off separates
copies from distinct images of the same kind; the aligned residual separates them (digits: copies <= 0.27, nearest distinct digits >= 0.45).

Cost (2 shared CPU cores): a thumbnail is one decode + resize (4 KiB kept as uint8, in memory up to
:data:`SPILL_ROWS` images, else in a temp file: :class:`ThumbStore`); a match ~2-4 ms; a tolerance
~20-30 ms (ten edits of the image shrunk to <= 256 px, each matched). Nothing here depends on the model.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from tasks.core.images import RejectedImage, decode_image, open_stored_image

__all__ = ["THUMB", "BLUR_SIGMA", "SCALES", "CORR_FLOOR", "MARGIN", "MIN_RESID_TOL", "RESID_QUANTILE", "PREFILTER",
           "TRANSFORMS", "grey_thumb", "coarse_vectors", "self_copies", "match", "tolerance", "is_near_copy",
           "SPILL_ROWS", "LOAD_BLOCK", "ThumbStore", "load_thumbs", "rule_record"]

log = logging.getLogger(__name__)

THUMB = 64
BLUR_SIGMA = 1.0
SCALES = (1.0, 0.9875, 0.975, 0.9625, 0.95, 0.9375, 0.925, 0.9125, 0.9)
CORR_FLOOR = 0.8  # below this aligned correlation two images are never the same picture
MARGIN = 1.5  # a pair may be this many times further apart than the image's own self-copies
MIN_RESID_TOL = 0.05
RESID_QUANTILE = 0.99
PREFILTER = 0.4  # unaligned 16x16 correlation under which a candidate is not worth aligning (5 % crops of noise: >= 0.55)
TRANSFORMS = ("jpeg-q75", "resize-0.9", "brightness-10%", "crop-5%")
_COARSE = 16
_FLAT_STD = 1.0  # grey levels: a thumbnail this flat has no structure to compare


def grey_thumb(img: Image.Image) -> np.ndarray:
    """PIL image -> unblurred grey thumbnail ``(THUMB, THUMB) uint8`` (blur is applied in :func:`match`)."""
    small = img.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def _blurred(t: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(t.astype(np.float32), (0, 0), BLUR_SIGMA)


def coarse_vectors(thumbs: np.ndarray) -> np.ndarray:
    """``(N, THUMB, THUMB) uint8`` -> ``(N, 256) float32``: 16x16 area-averaged, mean-centred, unit-norm (zeros for
    a flat thumbnail). Their dot product is the unaligned low-resolution Pearson correlation."""
    n = len(thumbs)
    f = THUMB // _COARSE
    v = thumbs.reshape(n, _COARSE, f, _COARSE, f).astype(np.float32).mean(axis=(2, 4)).reshape(n, -1)
    v -= v.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norm > 1e-3, v / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def self_copies(img: Image.Image, seed: int) -> list[tuple[str, Image.Image]]:
    """The four near-copies of :data:`TRANSFORMS` made from ``img`` (RGB): JPEG quality 75, 0.9x resize,
    brightness x0.9 or x1.1 and a 5 % crop (of each side's length, at a random offset), seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    img = img.convert("RGB")
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    jpeg = decode_image(buf.getvalue(), "self-copy.jpg")
    resized = img.resize((max(1, round(w * 0.9)), max(1, round(h * 0.9))), Image.Resampling.BILINEAR)
    bright = ImageEnhance.Brightness(img).enhance(1.1 if rng.random() < 0.5 else 0.9)
    dw, dh = round(w * 0.05), round(h * 0.05)
    x0, y0 = int(rng.integers(0, dw + 1)), int(rng.integers(0, dh + 1))
    crop = img.crop((x0, y0, x0 + w - dw, y0 + h - dh))
    return list(zip(TRANSFORMS, (jpeg, resized, bright, crop)))


def _placement(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Best placement of ``b`` (shrunk by each scale in :data:`SCALES`; a coarse-to-fine scale search missed crops of
    textured photos) inside ``a``: integer offsets by normalised cross-correlation, then a sub-pixel refinement
    (parabola through the correlation peak), so that a crop whose offset falls between thumbnail pixels scores like
    one that does not. Returns ``(peak corr, window of a (w*w,) float64, template (w*w,) float64)``."""
    import cv2

    def place(s: float) -> tuple[float, tuple[int, int], np.ndarray, np.ndarray]:
        w = int(round(THUMB * s))
        t = b if w == THUMB else cv2.resize(b, (w, w), interpolation=cv2.INTER_AREA)
        r = cv2.matchTemplate(a, t, cv2.TM_CCOEFF_NORMED)
        _, mx, _, loc = cv2.minMaxLoc(r)
        return (float(mx) if np.isfinite(mx) else -2.0), loc, t, r

    best, (x, y), tmpl, r = max((place(s) for s in SCALES), key=lambda v: v[0])
    w = tmpl.shape[0]

    def vertex(lo: float, mid: float, hi: float) -> float:
        den = lo - 2 * mid + hi
        return float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5)) if den < -1e-9 else 0.0

    dx = vertex(r[y, x - 1], r[y, x], r[y, x + 1]) if 0 < x < r.shape[1] - 1 else 0.0
    dy = vertex(r[y - 1, x], r[y, x], r[y + 1, x]) if 0 < y < r.shape[0] - 1 else 0.0
    if dx or dy:
        src = cv2.getRectSubPix(a, (w, w), (x + dx + (w - 1) / 2.0, y + dy + (w - 1) / 2.0))
    else:
        src = a[y:y + w, x:x + w]
    return best, src.ravel().astype(np.float64), tmpl.ravel().astype(np.float64)


def _corr_resid(src: np.ndarray, dst: np.ndarray) -> tuple[float, float]:
    """Pearson correlation of two aligned windows and the :data:`RESID_QUANTILE` quantile of ``|dst - (g src + o)|``
    (least-squares gain ``g`` and offset ``o``) in units of ``dst``'s standard deviation."""
    sc, dc = src - src.mean(), dst - dst.mean()
    ss, sd = float(sc @ sc), float(dc @ dc)
    corr = float(sc @ dc / max(np.sqrt(ss * sd), 1e-9))
    gain = float(sc @ dc / ss) if ss > 1e-9 else 0.0
    res = np.abs(dc - gain * sc) / max(np.sqrt(sd / len(dst)), 1e-6)
    k = min(len(res) - 1, int(np.ceil(RESID_QUANTILE * (len(res) - 1))))
    return corr, float(np.partition(res, k)[k])


def match(ta: np.ndarray, tb: np.ndarray) -> tuple[float, float]:
    """Aligned similarity of two thumbnails (:func:`grey_thumb`): ``(corr in [-1, 1], resid >= 0)`` at the best of
    the scales x offsets x both directions (see module docstring). Two flat thumbnails of about the same grey are
    ``(1.0, 0.0)``; a flat and a structured one ``(0.0, inf)``."""
    fa, fb = float(ta.std()), float(tb.std())
    if fa < _FLAT_STD or fb < _FLAT_STD:
        same = fa < _FLAT_STD and fb < _FLAT_STD and abs(float(ta.mean()) - float(tb.mean())) <= 12.75
        return (1.0, 0.0) if same else (0.0, float("inf"))
    a, b = _blurred(ta), _blurred(tb)
    p1, p2 = _placement(a, b), _placement(b, a)
    best = p1 if p1[0] >= p2[0] else p2
    corr, resid = _corr_resid(best[1], best[2])
    return max(corr, best[0]), resid


def _crop(img: Image.Image, fx: float, fy: float) -> Image.Image:
    w, h = img.size
    dw, dh = round(w * 0.05), round(h * 0.05)
    x0, y0 = int(round(fx * dw)), int(round(fy * dh))
    return img.crop((x0, y0, x0 + w - dw, y0 + h - dh))


# the tolerance's 5 % crops: how well a crop re-aligns depends on its offset's sub-pixel phase at thumbnail scale,
# so one crop can underestimate what another copy of the same image scores; corners, centre and two in between
_TOL_CROPS = ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (1 / 3, 2 / 3))


def tolerance(img: Image.Image) -> tuple[float, float]:
    """How far ``img``'s own near-copies land from it: ``(lowest corr, highest resid)`` over a JPEG q75 re-encode,
    a 0.9x resize, brightness x0.9 and x1.1 and six 5 % crops at different offsets (deterministic), made at
    <= ``4 x THUMB`` px (cost ~10-15 ms)."""
    img = img.convert("RGB")
    if max(img.size) > 4 * THUMB:  # the edits' effect at thumbnail scale does not need the full resolution
        img = img.copy()
        img.thumbnail((4 * THUMB, 4 * THUMB), Image.Resampling.BILINEAR)
    t = grey_thumb(img)
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    edits = [decode_image(buf.getvalue(), "self-copy.jpg"),
             img.resize((max(1, round(w * 0.9)), max(1, round(h * 0.9))), Image.Resampling.BILINEAR),
             ImageEnhance.Brightness(img).enhance(0.9), ImageEnhance.Brightness(img).enhance(1.1)]
    edits += [_crop(img, fx, fy) for fx, fy in _TOL_CROPS]
    scores = [match(t, grey_thumb(c)) for c in edits]
    return min(c for c, _ in scores), max(r for _, r in scores)


def is_near_copy(corr: float, resid: float, tol_a: tuple[float, float], tol_b: tuple[float, float]) -> bool:
    """The decision of step 4 (module docstring) for a pair with aligned ``(corr, resid)`` and tolerances."""
    tol_corr = min(tol_a[0], tol_b[0])
    tol_resid = max(tol_a[1], tol_b[1], MIN_RESID_TOL)
    return bool(corr >= CORR_FLOOR and (1.0 - corr) <= MARGIN * max(1.0 - tol_corr, 1e-4) and resid <= MARGIN * tol_resid)


SPILL_ROWS = 65_536
"""Thumbnails kept in memory up to this many images (256 MiB); above, :class:`ThumbStore` keeps them in a temp file."""
LOAD_BLOCK = 1024
"""Images decoded per block by :func:`load_thumbs` (bounds the thread pool's queued futures and results)."""
_BYTES = THUMB * THUMB


class ThumbStore:
    """``(N, THUMB, THUMB) uint8`` thumbnails: an in-memory array up to ``spill_rows`` rows (default
    :data:`SPILL_ROWS`), else an unlinked temp file in ``spill_dir`` (default: the system temp dir) written and read
    with positional reads / writes, so the process holds O(block) of them (4 KiB per image on disk; 4 GB at 1M).
    Reads are thread-safe. Rows never written read as zeros. Use as a context manager or call :meth:`close`."""

    def __init__(self, n: int, spill_dir: str | os.PathLike[str] | None = None, spill_rows: int | None = None) -> None:
        self.n = int(n)
        self.spilled = self.n > (SPILL_ROWS if spill_rows is None else int(spill_rows))
        self._mem: np.ndarray | None = None
        self._file = None
        if self.spilled:
            if spill_dir is not None:
                Path(spill_dir).mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(prefix="convlens-thumbs-", dir=spill_dir)
            self._file.truncate(self.n * _BYTES)
        else:
            self._mem = np.zeros((self.n, THUMB, THUMB), np.uint8)

    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> "ThumbStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the temp file (spilled) or the array."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = None

    def array(self) -> np.ndarray:
        """The in-memory ``(N, THUMB, THUMB) uint8`` array (not for a spilled store)."""
        if self._mem is None:
            raise RuntimeError("a spilled ThumbStore has no in-memory array; read it with read() / get()")
        return self._mem

    def write(self, start: int, block: np.ndarray) -> None:
        """Store ``block`` ``(m, THUMB, THUMB) uint8`` as rows ``start .. start + m - 1``."""
        block = np.ascontiguousarray(block, np.uint8)
        if self._mem is not None:
            self._mem[start:start + len(block)] = block
        elif self._file is not None:
            os.pwrite(self._file.fileno(), block.tobytes(), int(start) * _BYTES)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start .. stop - 1`` as ``(m, THUMB, THUMB) uint8`` (a view when in memory, else a fresh array)."""
        stop = min(int(stop), self.n)
        if self._mem is not None:
            return self._mem[start:stop]
        if self._file is None:
            raise RuntimeError("ThumbStore is closed")
        m = max(0, stop - int(start))
        buf = os.pread(self._file.fileno(), m * _BYTES, int(start) * _BYTES)
        return np.frombuffer(buf, np.uint8).reshape(m, THUMB, THUMB)

    def get(self, i: int) -> np.ndarray:
        """Row ``i`` as ``(THUMB, THUMB) uint8``."""
        return self.read(int(i), int(i) + 1)[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order) as ``(len(rows), THUMB, THUMB) uint8``."""
        rows = np.asarray(rows, np.int64)
        if self._mem is not None:
            return self._mem[rows]
        out = np.empty((len(rows), THUMB, THUMB), np.uint8)
        for j, r in enumerate(rows.tolist()):
            out[j] = self.get(r)
        return out


def load_thumbs(root: str | None, paths: Sequence[str], workers: int | None = None, out: ThumbStore | None = None
                ) -> tuple[np.ndarray | ThumbStore, np.ndarray, list[tuple[str, str]]]:
    """Thumbnails of stored images ``root`` + ``path``, decoded in a thread pool, :data:`LOAD_BLOCK` at a time.

    Returns ``(thumbs, ok (N,) bool, failures [(path, reason)])``: ``thumbs`` is ``(N, THUMB, THUMB) uint8`` in
    memory, or ``out`` (a :class:`ThumbStore` of N rows, possibly spilled to disk) when given; rows that could not
    be read are zeros with ``ok`` false. Memory O(N x 4 KiB) without ``out``, O(block) beyond ``out``.
    """
    n = len(paths)
    store = out if out is not None else ThumbStore(n, spill_rows=n)
    if len(store) != n:
        raise ValueError(f"ThumbStore holds {len(store)} rows for {n} paths")
    ok = np.zeros(n, bool)
    failures: list[tuple[str, str]] = []

    def one(i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, grey_thumb(open_stored_image(root, str(paths[i]), draft=(4 * THUMB, 4 * THUMB))), ""
        except (RejectedImage, OSError, ValueError) as exc:
            return i, None, str(exc)

    with cf.ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, n, LOAD_BLOCK):
            stop = min(n, start + LOAD_BLOCK)
            block = np.zeros((stop - start, THUMB, THUMB), np.uint8)
            for i, t, err in pool.map(one, range(start, stop)):
                if t is None:
                    failures.append((str(paths[i]), err))
                else:
                    block[i - start] = t
                    ok[i] = True
            store.write(start, block)
    if failures:
        log.warning("%d of %d images could not be opened for the near-copy check (e.g. %s: %s); their pairs stay "
                    "unconfirmed", len(failures), n, *failures[0])
    return (store if out is not None else store.array()), ok, failures


def rule_record() -> dict[str, object]:
    """The constants of the pixel test, for the audit manifest."""
    return {"thumb_px": THUMB, "blur_sigma_px": BLUR_SIGMA, "scales": list(SCALES), "corr_floor": CORR_FLOOR,
            "margin": MARGIN, "min_resid_tol": MIN_RESID_TOL, "resid_quantile": RESID_QUANTILE,
            "prefilter_corr16": PREFILTER, "self_copy_transforms": list(TRANSFORMS)}
