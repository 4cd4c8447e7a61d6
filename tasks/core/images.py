"""Safe image decoding: every failure becomes a :class:`RejectedImage` with a reason, never a crash.

Normalisation to RGB: EXIF orientation applied; CMYK, palette, grey, 16-bit and float images converted;
alpha (RGBA / LA / palette transparency) composited onto white. Output is a PIL ``RGB`` image.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "RejectedImage",
    "DecodeLimits",
    "ALLOWED_FORMATS",
    "EXTENSION_FORMATS",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "decode_image",
    "decode_image_sized",
    "draft_request",
    "ImageHeader",
    "inspect_image",
    "ORIENTATION_SWAPS_SIDES",
    "orient_tensor",
    "decode_jpeg_tensors",
    "read_file_bytes",
    "open_regular_file",
    "os_error_reason",
    "run_with_timeout",
    "DecodeTimeout",
    "to_rgb",
    "REOPEN_LIMITS",
    "stored_image_location",
    "read_stored_bytes",
    "open_stored_image",
]

log = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Extension -> PIL format name for the formats convlens accepts.
EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
    ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
}
ALLOWED_FORMATS = frozenset(EXTENSION_FORMATS.values())
# Image-like extensions that convlens lists (so they show up as rejects) but does not decode.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".svg", ".heic", ".heif", ".avif", ".psd", ".ico", ".jp2", ".j2k", ".tga", ".ppm", ".pgm", ".pbm", ".pnm",
     ".xcf", ".raw", ".cr2", ".nef", ".dng", ".eps", ".pcx", ".dds", ".icns", ".exr", ".hdr"}
)


class RejectedImage(Exception):
    """An input that cannot be used. ``reason`` is a short stable code; ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied while decoding. ``max_pixels`` guards against decompression bombs."""

    max_pixels: int = 89_478_485  # PIL's own default warning threshold (~ 9459 x 9459)
    max_bytes: int = 256 << 20
    min_side: int = 4
    strict_extension: bool = True
    timeout_s: float | None = 30.0  # per-image decode deadline (seconds); None disables it


class DecodeTimeout(Exception):
    """Raised inside :func:`run_with_timeout` when the deadline passes."""


def os_error_reason(exc: OSError) -> str:
    """A stable reject reason for an ``OSError`` raised while opening / reading an input file."""
    code = getattr(exc, "errno", None)
    if code == errno.ELOOP:
        return "symlink-loop"
    if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        return "permission-denied"
    if code == errno.ENOENT or isinstance(exc, FileNotFoundError):
        return "missing"
    return "unreadable"


def run_with_timeout(fn, timeout_s: float | None):
    """Call ``fn()`` and return its result, or raise :class:`DecodeTimeout` after ``timeout_s`` seconds.

    In a process's main thread (the CLI, DataLoader workers) a ``SIGALRM`` interval timer interrupts the call
    (PIL decodes in 64 KiB steps, so the alarm lands between steps) unless something else owns ``SIGALRM``.
    Elsewhere (e.g. a Prefect task thread) ``fn`` runs in a daemon helper thread that is abandoned on timeout:
    the run moves on and never hangs, but that thread may keep one core busy until its decode ends.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn()
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        def _alarm(_signum, _frame):
            raise DecodeTimeout(f"decode took longer than {timeout_s:g}s")

        previous = signal.signal(signal.SIGALRM, _alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                return fn()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
    box: dict[str, object] = {}

    def _target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=_target, name="convlens-decode", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("abandoning a decode that exceeded %ss (its thread finishes in the background)", timeout_s)
        raise DecodeTimeout(f"decode took longer than {timeout_s:g}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def read_file_bytes(path: str | os.PathLike[str], limits: DecodeLimits = DecodeLimits()) -> bytes:
    """Read a file's bytes (local path or fsspec URL), refusing non-regular files (FIFOs, directories,
    devices) before opening."""
    path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        import fsspec

        try:
            fs, p = fsspec.core.url_to_fs(path)
            size = int(fs.info(p).get("size") or 0)
            if size == 0:
                raise RejectedImage("empty-file", "0 bytes")
            if size > limits.max_bytes:
                raise RejectedImage("too-large", f"{size} bytes > limit {limits.max_bytes}")
            return fs.cat_file(p)
        except (OSError, ValueError) as exc:
            raise RejectedImage("unreadable", str(exc)[:300]) from None
    # O_NONBLOCK open + fstat on the descriptor: a FIFO never blocks, and there is no window between the
    # check and the read.
    with open_regular_file(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise RejectedImage("empty-file", "0 bytes")
            if size > limits.max_bytes:
                raise RejectedImage("too-large", f"{size} bytes > limit {limits.max_bytes}")
            data = fh.read(limits.max_bytes + 1)
        except OSError as exc:
            raise RejectedImage(os_error_reason(exc), f"{exc.strerror or exc}") from None
    if len(data) > limits.max_bytes:
        raise RejectedImage("too-large", f"more than {limits.max_bytes} bytes (file grew while reading)")
    return data


def open_regular_file(path: str | os.PathLike[str]):
    """Open a local file for binary reading without ever blocking: ``O_NONBLOCK`` open (a FIFO does not wait
    for a writer), then ``fstat`` on the descriptor. Raises :class:`RejectedImage` (``not-a-file``, or the
    reason of the ``OSError``) for anything that is not a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise RejectedImage(os_error_reason(exc), f"{exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise RejectedImage(os_error_reason(exc), f"{exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RejectedImage("not-a-file", "is a directory" if stat.S_ISDIR(st.st_mode)
                            else "not a regular file (FIFO, socket or device)")
    return os.fdopen(fd, "rb")


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any PIL mode to 8-bit RGB; alpha is composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr / (65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0) * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _truncated_or_corrupt(exc: BaseException) -> str:
    msg = str(exc).lower()
    return "truncated" if "truncat" in msg or "incomplete" in msg else "corrupt"


def decode_image(data: bytes, name: str = "", limits: DecodeLimits = DecodeLimits(),
                 draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` to an RGB PIL image, or raise :class:`RejectedImage`.

    ``draft=(w, h)`` lets a JPEG decode at a reduced DCT scale (1/2, 1/4 or 1/8) that stays at least ``w x h``
    (see :func:`draft_request`); other formats ignore it. Reasons: ``not-an-image``, ``unsupported-format``,
    ``wrong-extension``, ``decompression-bomb``, ``truncated``, ``corrupt``, ``too-small``, ``decode-timeout``
    (longer than ``limits.timeout_s``).
    """
    return decode_image_sized(data, name, limits, draft)[0]


def decode_image_sized(data: bytes, name: str = "", limits: DecodeLimits = DecodeLimits(),
                       draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` plus the image's full-resolution size ``(width, height)`` in pixels after EXIF
    orientation: with ``draft`` the decoded image may be smaller than the file, but the size recorded for the
    image (the feature table's ``width`` / ``height``) is always the file's own."""
    if not data:
        raise RejectedImage("empty-file", "0 bytes")
    try:
        return run_with_timeout(lambda: _decode(data, name, limits, draft), limits.timeout_s)
    except DecodeTimeout as exc:
        raise RejectedImage("decode-timeout", f"{exc}; the file may be hostile or enormous") from None


def draft_request(resize: int) -> tuple[int, int]:
    """The ``draft`` size that makes a JPEG decode at the largest DCT reduction (1/2, 1/4 or 1/8) whose
    *shorter* side stays ``>= resize`` pixels, whatever the orientation: PIL picks the scale
    ``min(W // w, H // h)`` rounded down to 8, 4, 2 or 1, so a square request ``(resize, resize)`` gives
    ``min(W, H) // resize`` -- e.g. 4032x3024 at resize 256 decodes at 1/8 (504x378), 1024x768 at 1/2,
    500x375 at full size. Raises ``ValueError`` for ``resize < 1``."""
    if resize < 1:
        raise ValueError(f"resize must be >= 1 pixel, got {resize}")
    return (int(resize), int(resize))


# EXIF orientations (tag 0x0112) that swap width and height (transpose, rotate 90 / 270, transverse).
ORIENTATION_SWAPS_SIDES = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, nothing decoded: PIL ``format`` and ``mode`` of the file, the full-resolution
    ``width`` x ``height`` in pixels *after* EXIF orientation, the EXIF ``orientation`` (1-8; ``None`` when the
    EXIF block cannot be parsed) and whether a JPEG is ``progressive``."""

    format: str
    mode: str
    width: int
    height: int
    orientation: int | None = 1
    progressive: bool = False


def inspect_image(data: bytes, name: str = "", limits: DecodeLimits = DecodeLimits()) -> ImageHeader:
    """Parse only the header of ``data`` and apply every check that needs no pixels (the ones
    :func:`decode_image` applies first): ``empty-file``, ``not-an-image``, ``unsupported-format``,
    ``wrong-extension``, ``decompression-bomb``, ``too-small`` raise :class:`RejectedImage`. Truncation and
    corruption are found only by decoding. Cost: tens of microseconds (no pixel is decoded)."""
    if not data:
        raise RejectedImage("empty-file", "0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img, fmt = _open_checked(data, name, limits)
        orientation = _orientation(img)
    w, h = img.size
    if orientation in ORIENTATION_SWAPS_SIDES:
        w, h = h, w
    progressive = bool(img.info.get("progressive") or img.info.get("progression"))
    return ImageHeader(fmt, img.mode, int(w), int(h), orientation, progressive)


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8; out-of-range values count as 1, as in ``ImageOps.exif_transpose``), or
    ``None`` when the EXIF block cannot be parsed."""
    try:
        value = img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, TypeError, IndexError, KeyError, EOFError):
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def _open_checked(data: bytes, name: str, limits: DecodeLimits) -> tuple[Image.Image, str]:
    """Open ``data`` lazily (header only) and apply the checks that need no pixels; call inside a
    ``DecompressionBombWarning``-as-error context."""
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage("decompression-bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise RejectedImage("not-an-image", "no image format recognised in the file's bytes") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RejectedImage(_truncated_or_corrupt(exc), str(exc)) from None
    fmt = img.format or "?"
    if fmt not in ALLOWED_FORMATS:
        raise RejectedImage("unsupported-format", f"{fmt} is not among {', '.join(sorted(ALLOWED_FORMATS))}")
    ext = Path(name).suffix.lower()
    expected = EXTENSION_FORMATS.get(ext)
    if limits.strict_extension and ext and expected and expected != fmt:
        raise RejectedImage("wrong-extension", f"extension {ext} but content is {fmt}")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise RejectedImage("decompression-bomb", f"{w}x{h} = {w * h} pixels > limit {limits.max_pixels}")
    if min(w, h) < limits.min_side:
        raise RejectedImage("too-small", f"{w}x{h} is below the minimum side {limits.min_side}")
    return img, fmt


def _decode(data: bytes, name: str, limits: DecodeLimits,
            draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img, fmt = _open_checked(data, name, limits)
        w, h = img.size  # the file's own size, before any draft reduction
        try:
            if draft is not None and fmt == "JPEG":
                img.draft("RGB", draft)  # DCT-domain downscale: decodes at 1/2, 1/4 or 1/8 size, never below draft
            img.load()
            if _orientation(img) in ORIENTATION_SWAPS_SIDES:
                w, h = h, w
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectedImage("decompression-bomb", str(exc)) from None
        except OSError as exc:
            raise RejectedImage(_truncated_or_corrupt(exc), str(exc)) from None
        except (ValueError, SyntaxError, MemoryError, IndexError, TypeError, EOFError) as exc:
            raise RejectedImage("corrupt", f"{type(exc).__name__}: {exc}") from None
    return rgb, (int(w), int(h))


def orient_tensor(img, orientation: int | None):
    """Apply an EXIF ``orientation`` (1-8) to a ``(C, H, W)`` tensor the way ``PIL.ImageOps.exif_transpose``
    does to an image; 1 / ``None`` return ``img`` unchanged. Works on any device (flip / transpose views)."""
    if orientation in (None, 1):
        return img
    if orientation == 2:  # mirror left-right
        return img.flip(-1)
    if orientation == 3:  # rotate 180
        return img.flip(-1).flip(-2)
    if orientation == 4:  # mirror top-bottom
        return img.flip(-2)
    if orientation == 5:  # transpose (main diagonal)
        return img.transpose(-1, -2)
    if orientation == 6:  # PIL ROTATE_270: 90 degrees clockwise
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse (anti-diagonal)
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # PIL ROTATE_90: 90 degrees counter-clockwise
        return img.transpose(-1, -2).flip(-2)
    return img


def decode_jpeg_tensors(datas: list, orientations: list[int | None], device) -> list:
    """Decode a batch of JPEG files with ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA, batched;
    libjpeg-turbo on CPU): ``datas`` are 1-d ``uint8`` CPU tensors of the files' bytes (pinned memory helps the
    copy), ``orientations`` their EXIF orientation (applied here: nvJPEG ignores EXIF).

    Returns one entry per input: a ``(3, H, W) uint8`` RGB tensor on ``device`` at full resolution, oriented, or
    ``None`` where that file failed to decode (the caller decodes it again with :func:`decode_image`, which
    gives the reject reason). A batch that fails as a whole is retried one file at a time, so one bad file
    never costs the batch. Memory: the decoded batch on ``device`` (3 x H x W bytes per image)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # nvJPEG's decoder is bound to one device index

    def _one_call(batch: list) -> list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its image I/O
            out = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
        return list(out)

    try:
        decoded: list = _one_call(list(datas))
    except (RuntimeError, ValueError) as exc:
        log.debug("batched JPEG decode failed (%s); decoding the %d files one at a time", exc, len(datas))
        decoded = []
        for d in datas:
            try:
                decoded.append(_one_call([d])[0])
            except (RuntimeError, ValueError) as one_exc:
                log.debug("JPEG decode on %s failed: %s", device, one_exc)
                decoded.append(None)
    out: list = []
    for t, o in zip(decoded, orientations):
        if t is None or t.dim() != 3 or t.shape[0] != 3 or t.dtype != torch.uint8 or min(t.shape[1:]) < 1:
            out.append(None)
            continue
        out.append(orient_tensor(t, o))
    return out


# Limits for re-opening an image that extraction already accepted: the extension check is off (a file extracted
# with --allow-extension-mismatch must reopen too); the size, pixel and time guards stay.
REOPEN_LIMITS = DecodeLimits(strict_extension=False, min_side=1)


def stored_image_location(root: str | os.PathLike[str] | None, rel: str) -> str:
    """Where the image of a feature row lives: ``rel`` (the table's ``path``, relative to the dataset root)
    joined to ``root`` (the manifest's ``dataset_root``: a local folder or an fsspec URL such as
    ``s3://bucket/images``). Absolute ``rel`` paths are used as they are. Non-UTF-8 file names are stored with
    ``\\xNN`` escapes (:func:`tasks.core.datasets.display_path`); they are mapped back to the bytes on disk."""
    rel = str(rel)
    base = "." if root is None or str(root) == "" else os.fspath(root)
    if "://" in base and not base.startswith("file://"):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    if base.startswith("file://"):
        base = base[len("file://"):]
    path = rel if os.path.isabs(rel) else os.path.join(base, rel)
    if "\\x" in rel and not os.path.exists(path):
        import re

        raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), rel.encode("utf-8"))
        candidate = os.path.join(os.fsencode(base), raw)
        if os.path.exists(candidate):
            return os.fsdecode(candidate)
    return path


def read_stored_bytes(root: str | os.PathLike[str] | None, rel: str, limits: DecodeLimits = REOPEN_LIMITS) -> bytes:
    """The bytes of a stored image (see :func:`stored_image_location`), read with the same guards as extraction:
    regular files only (a FIFO or device never blocks), size-capped; :class:`RejectedImage` otherwise."""
    return read_file_bytes(stored_image_location(root, rel), limits)


def open_stored_image(root: str | os.PathLike[str] | None, rel: str, limits: DecodeLimits = REOPEN_LIMITS,
                      draft: tuple[int, int] | None = None) -> Image.Image:
    """The one way a later stage opens a stored image: ``root`` + ``rel`` (local or fsspec URL) through the
    hardened reader and decoder (EXIF rotation, alpha on white, bomb / size / FIFO / timeout guards), as an
    RGB PIL image. ``draft=(w, h)`` lets a JPEG decode at a reduced scale of at least that size (thumbnails).
    Raises :class:`RejectedImage` with the reason."""
    data = read_stored_bytes(root, rel, limits)
    return decode_image(data, rel, limits, draft=draft)
