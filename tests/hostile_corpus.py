"""A generated corpus of hostile and odd image files, each with the outcome extraction must produce.

:func:`write_hostile_corpus` writes the files into a folder and returns ``{relative path: Expect}``. An item
is either a reject with a specific ``reason`` or an accepted image whose normalised RGB size (after EXIF
rotation) is ``size``. Nothing here needs the network; everything is built with PIL and NumPy.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from images_factory import decompression_bomb_png

__all__ = ["Expect", "write_hostile_corpus", "NON_UTF8_NAME"]

# A file name that is not valid UTF-8 (Latin-1 "café.png"): must be listed, shown escaped, and extracted.
NON_UTF8_NAME = b"caf\xe9.png"


@dataclass(frozen=True)
class Expect:
    """``reason`` for a reject, else ``size`` = (width, height) of the normalised RGB image."""

    reason: str | None = None
    size: tuple[int, int] | None = None
    mode_in: str | None = None  # the file's own PIL mode, for accepted items


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), np.full((h, w), 90, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_hostile_corpus(d: Path, fifo: bool = True) -> dict[str, Expect]:
    """Write the corpus into ``d``; return ``{path relative to d (display form): Expect}``.

    Covers: truncated JPEG and PNG, zero bytes, text and HTML named ``.jpg``, formats outside the allowlist
    (PPM, ICO, TGA), a PNG declaring 30000x30000, 1x1, CMYK JPEG, palette with transparency, 16-bit grey PNG,
    RGBA, LA, EXIF-rotated JPEG, a directory named ``.jpg``, a FIFO, a symlink loop, a non-UTF-8 file name,
    and ``noperm.png`` with mode 000 (the caller decides how to make that unreadable when running as root).
    """
    d.mkdir(parents=True, exist_ok=True)
    rgb = _gradient()
    out: dict[str, Expect] = {}

    def put(name: str, data: bytes, expect: Expect) -> None:
        (d / name).write_bytes(data)
        out[name] = expect

    jpeg = _encode(rgb, "JPEG", quality=90)
    png = _encode(rgb, "PNG")
    put("truncated.jpg", jpeg[: len(jpeg) // 2], Expect("truncated"))
    put("truncated.png", png[: len(png) // 2], Expect("truncated"))
    put("zero.jpg", b"", Expect("empty-file"))
    put("text.jpg", b"just some text, not an image\n", Expect("not-an-image"))
    put("page.jpg", b'<html><body onload="alert(1)"><script>alert(document.cookie)</script></body></html>',
        Expect("not-an-image"))
    put("portable.ppm", _encode(rgb, "PPM"), Expect("unsupported-format"))
    put("icon.ico", _encode(rgb.resize((32, 32)), "ICO"), Expect("unsupported-format"))
    put("targa.tga", _encode(rgb, "TGA"), Expect("unsupported-format"))
    put("bomb.png", decompression_bomb_png(30000, 30000), Expect("decompression-bomb"))
    put("one.png", _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), Expect("too-small"))
    put("cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG"), Expect(size=(64, 48), mode_in="CMYK"))
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    put("palette.png", _encode(pal, "PNG", transparency=0), Expect(size=(64, 48), mode_in="P"))
    sixteen = Image.fromarray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16))
    put("sixteen.png", _encode(sixteen, "PNG"), Expect(size=(64, 48), mode_in=sixteen.mode))
    rgba = rgb.copy()
    rgba.putalpha(Image.new("L", rgb.size, 100))
    put("rgba.png", _encode(rgba, "PNG"), Expect(size=(64, 48), mode_in="RGBA"))
    put("la.png", _encode(rgb.convert("LA"), "PNG"), Expect(size=(64, 48), mode_in="LA"))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: 64x48 stored -> 48x64 shown
    put("exif_rotated.jpg", _encode(rgb, "JPEG", exif=exif.tobytes()), Expect(size=(48, 64), mode_in="RGB"))
    (d / "folder.jpg").mkdir()
    out["folder.jpg"] = Expect("not-a-file")
    loop = d / "loop.png"
    loop.symlink_to(loop.name)
    out["loop.png"] = Expect("symlink-loop")
    if fifo and hasattr(os, "mkfifo"):
        os.mkfifo(d / "pipe.jpg")
        out["pipe.jpg"] = Expect("not-a-file")
    raw = os.fsencode(str(d)) + b"/" + NON_UTF8_NAME
    with open(raw, "wb") as fh:
        fh.write(png)
    out["caf\\xe9.png"] = Expect(size=(64, 48), mode_in="RGB")  # display form of the undecodable byte
    noperm = d / "noperm.png"
    noperm.write_bytes(_encode(rgb.rotate(180), "PNG"))
    noperm.chmod(0)
    out["noperm.png"] = Expect("permission-denied")
    return out
