"""Safe image decoding: every failure becomes a :class:`RejectedImage` with a reason, never a crash.

Normalisation to RGB: EXIF orientation applied; CMYK, palette, grey, 16-bit and float images converted;
alpha (RGBA / LA / palette transparency) composited onto white. Output is a PIL ``RGB`` image.
"""

from __future__ import annotations

import io
import os
import stat
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
    "read_file_bytes",
    "to_rgb",
]

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


def read_file_bytes(path: str | os.PathLike[str], limits: DecodeLimits = DecodeLimits()) -> bytes:
    """Read a file's bytes (local path or fsspec URL), refusing non-regular files (FIFOs, directories,
    devices) before opening."""
    path = str(path)
    if "://" in path and not path.startswith("file://"):
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
    try:
        st = os.stat(path)
    except OSError as exc:
        raise RejectedImage("unreadable", f"{exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RejectedImage("not-a-file", "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise RejectedImage("not-a-file", "not a regular file (FIFO, socket or device)")
    if st.st_size == 0:
        raise RejectedImage("empty-file", "0 bytes")
    if st.st_size > limits.max_bytes:
        raise RejectedImage("too-large", f"{st.st_size} bytes > limit {limits.max_bytes}")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise RejectedImage("unreadable", f"{exc.strerror or exc}") from None


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


def decode_image(data: bytes, name: str = "", limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode ``data`` to an RGB PIL image, or raise :class:`RejectedImage`.

    Reasons: ``not-an-image``, ``unsupported-format``, ``wrong-extension``, ``decompression-bomb``,
    ``truncated``, ``corrupt``, ``too-small``.
    """
    if not data:
        raise RejectedImage("empty-file", "0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectedImage("decompression-bomb", str(exc)) from None
        except UnidentifiedImageError:
            raise RejectedImage("not-an-image", "no image format recognised in the file's bytes") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise RejectedImage("corrupt", str(exc)) from None
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
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectedImage("decompression-bomb", str(exc)) from None
        except OSError as exc:
            msg = str(exc)
            reason = "truncated" if "truncated" in msg.lower() or "incomplete" in msg.lower() else "corrupt"
            raise RejectedImage(reason, msg) from None
        except (ValueError, SyntaxError, MemoryError, IndexError, TypeError, EOFError) as exc:
            raise RejectedImage("corrupt", f"{type(exc).__name__}: {exc}") from None
    return rgb
