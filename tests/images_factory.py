"""Generators for good, odd and hostile image files used by the extraction tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_odd_images", "write_bad_images", "png_bytes", "decompression_bomb_png"]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decompression_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (CRC fixed up)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    # IHDR chunk: 8-byte signature, 4 length, 4 type, then width, height
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 128, np.float32)], axis=2).astype(np.uint8)


def write_odd_images(d: Path) -> dict[str, Path]:
    """Valid images in unusual encodings that must be normalised to RGB and extracted."""
    d.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_gradient())
    out = {}
    out["cmyk"] = d / "cmyk.jpg"
    rgb.convert("CMYK").save(out["cmyk"], "JPEG")
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    out["palette"] = d / "palette.png"
    pal.save(out["palette"], transparency=0)
    out["16bit"] = d / "sixteen.png"
    Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)).save(out["16bit"])
    rgba = rgb.copy()
    rgba.putalpha(Image.new("L", rgb.size, 100))
    out["rgba"] = d / "rgba.png"
    rgba.save(out["rgba"])
    out["la"] = d / "la.png"
    rgb.convert("LA").save(out["la"])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out["exif"] = d / "exif_rotated.jpg"
    rgb.save(out["exif"], "JPEG", exif=exif.tobytes())
    out["grey"] = d / "grey.bmp"
    rgb.convert("L").save(out["grey"], "BMP")
    return out


def write_bad_images(d: Path) -> dict[str, tuple[Path, str]]:
    """Files that must each become a reject row with the given reason."""
    d.mkdir(parents=True, exist_ok=True)
    good = png_bytes(Image.fromarray(_gradient()))
    out: dict[str, tuple[Path, str]] = {}
    p = d / "truncated.png"
    p.write_bytes(good[: len(good) // 2])
    out["truncated"] = (p, "truncated")
    p = d / "zero.jpg"
    p.write_bytes(b"")
    out["zero"] = (p, "empty-file")
    p = d / "text.jpg"
    p.write_text("<html><script>alert(1)</script></html>")
    out["text"] = (p, "not-an-image")
    p = d / "png_named.jpg"
    p.write_bytes(good)
    out["wrong_ext"] = (p, "wrong-extension")
    p = d / "image.ppm"
    Image.fromarray(_gradient()).save(p, "PPM")
    out["unsupported"] = (p, "unsupported-format")
    p = d / "bomb.png"
    p.write_bytes(decompression_bomb_png())
    out["bomb"] = (p, "decompression-bomb")
    p = d / "one.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(p)
    out["1x1"] = (p, "too-small")
    p = d / "loop.png"
    p.symlink_to(p)
    out["symlink_loop"] = (p, "symlink-loop")
    p = d / "dir_like.jpg"
    p.mkdir()
    out["directory"] = (p, "not-a-file")
    return out
