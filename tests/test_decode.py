"""Decode modes of extraction: JPEG draft (DCT-domain) downscaling, full decode, and the batched tensor (GPU) path.

The tensor path (``--decode gpu``) is exercised on the CPU (torchvision's CPU JPEG decoder, manifest
``decode: torchvision-jpeg``); the nvJPEG run itself is the ``gpu``-marked test at the end.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hostile_corpus import write_hostile_corpus
from storage.errors import UsageError
from storage.features import load_features, part_entries
from storage.paths import Store
from tasks.core.forward import forward_batch, forward_batch_async, prepare_module, resolve_decode
from tasks.core.images import (
    DecodeLimits,
    decode_image,
    decode_image_sized,
    decode_jpeg_tensors,
    draft_request,
    inspect_image,
    orient_tensor,
)
from tasks.extract.features import ExtractConfig, run_extraction

TINY = "tiny_models:build"  # Preprocess() defaults: resize 256, crop 224
# Documented bound (README "convlens extract", docs/benchmarks.md): MobileNetV2 penultimate features of
# real-photo JPEGs decoded with draft vs at full size.
DRAFT_REL_L2_MAX = 0.15
DRAFT_COSINE_MIN = 0.99


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A crop of a real photo shipped with scikit-image / scikit-learn, resized to ``w x h``."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    srcs = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), *load_sample_images().images]
    src = srcs[seed % len(srcs)]
    rng = np.random.default_rng(seed)
    sh, sw = src.shape[:2]
    ch = int(rng.integers(sh // 2, sh + 1))
    cw = min(sw, int(round(ch * w / h)))
    ch = min(sh, int(round(cw * h / w)))
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    return Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)


def _jpeg(img: Image.Image, orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _extract(data: Path, store: Path, **kw) -> dict:
    kw.setdefault("model", TINY)
    kw.setdefault("weights", "none")
    kw.setdefault("device", "cpu")
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return run_extraction(ExtractConfig(data=str(data), store=str(store), **kw))


def _table(store: Path, m: dict):
    d = Store(store).artefact_dir("features", m["artefact_id"])
    meta, feats = load_features(d, m)
    rej = pq.read_table(d / part_entries(m, "rejects")[0]["name"]).to_pandas()
    return meta, feats, dict(zip(rej["path"], rej["reason"]))


# ------------------------------------------------------------------------------------------- draft decode


@pytest.mark.parametrize("size,resize,scale", [((4032, 3024), 256, 8), ((2048, 1536), 256, 4), ((1024, 768), 256, 2),
                                               ((640, 480), 232, 2), ((500, 375), 256, 1), ((600, 400), 232, 1)])
def test_draft_keeps_shorter_side_at_least_resize(size, resize, scale):
    w, h = size
    data = _jpeg(_photo(w, h))
    img, full = decode_image_sized(data, "x.jpg", draft=draft_request(resize))
    assert full == (w, h)  # the file's own size, whatever was decoded
    assert img.size == (-(-w // scale), -(-h // scale))  # the largest 1/2, 1/4, 1/8 reduction ...
    assert min(img.size) >= resize  # ... that keeps the shorter side >= the resize target
    if scale < 8:
        assert min(w, h) // (2 * scale) < resize  # one more halving would go below it
    # the portrait (EXIF-rotated) file: same reduction, full size reported after rotation
    img6, full6 = decode_image_sized(_jpeg(_photo(w, h), orientation=6), "x.jpg", draft=draft_request(resize))
    assert full6 == (h, w) and img6.size == (img.size[1], img.size[0])
    assert inspect_image(_jpeg(_photo(w, h), orientation=6), "x.jpg").width == h


def test_draft_request_refuses_nonsense():
    with pytest.raises(ValueError, match="resize"):
        draft_request(0)


def test_extraction_draft_default_full_opt_out_never_mixed(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "big.jpg").write_bytes(_jpeg(_photo(1024, 768, 1)))
    (data / "rotated.jpg").write_bytes(_jpeg(_photo(1024, 768, 2), orientation=8))
    (data / "small.jpg").write_bytes(_jpeg(_photo(300, 200, 3)))
    _photo(800, 600, 4).save(data / "photo.png")
    store = tmp_path / "store"
    m1 = _extract(data, store)
    assert m1["preprocessing"]["decode"] == "jpeg-draft"
    meta1, f1, _ = _table(store, m1)
    sizes = dict(zip(meta1["path"], zip(meta1["width"], meta1["height"])))
    assert sizes == {"big.jpg": (1024, 768), "rotated.jpg": (768, 1024), "small.jpg": (300, 200), "photo.png": (800, 600)}
    # --full-decode: its own artefact, and nothing is reused from the draft one (all 4 extracted again)
    m2 = _extract(data, store, full_decode=True)
    assert m2["preprocessing"]["decode"] == "full" and m2["artefact_id"] != m1["artefact_id"]
    assert m2["run"]["extracted"] == 4
    meta2, f2, _ = _table(store, m2)
    row2 = {p: i for i, p in enumerate(meta2["path"])}
    same = {p: bool(np.array_equal(f1[i], f2[row2[p]])) for i, p in enumerate(meta1["path"])}
    assert same == {"big.jpg": False, "rotated.jpg": False, "small.jpg": True, "photo.png": True}
    # a rerun of each mode reuses its own artefact
    assert _extract(data, store)["run"]["extracted"] == 0
    assert _extract(data, store, full_decode=True)["run"]["extracted"] == 0


def test_draft_feature_difference_within_documented_bound():
    """MobileNetV2 with its real ImageNet weights, real-photo JPEGs at camera sizes: draft vs full decode."""
    from tasks.core.forward import embed_images
    from tasks.core.hooks import resolve_layer
    from tasks.core.models import load_model

    lm = load_model("mobilenet_v2", "imagenet")
    ref = resolve_layer(lm.module, None)
    sizes = [(1024, 768), (2048, 1536), (4032, 3024), (800, 600), (768, 1024), (1600, 1200)]
    datas = [_jpeg(_photo(w, h, seed)) for seed, (w, h) in enumerate(sizes)]
    draft = draft_request(lm.preprocess.resize)
    full = embed_images(lm, [decode_image(d, "x.jpg") for d in datas], ref).astype(np.float64)
    reduced = embed_images(lm, [decode_image(d, "x.jpg", draft=draft) for d in datas], ref).astype(np.float64)
    rel = np.linalg.norm(reduced - full, axis=1) / np.linalg.norm(full, axis=1)
    cos = (reduced * full).sum(1) / (np.linalg.norm(reduced, axis=1) * np.linalg.norm(full, axis=1))
    assert (rel > 0).all()  # every one of these was decoded reduced
    assert rel.max() <= DRAFT_REL_L2_MAX, rel
    assert cos.min() >= DRAFT_COSINE_MIN, cos


# ----------------------------------------------------------------------------------- tensor (GPU) path on CPU


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_tensor_matches_pil_exif_transpose(orientation):
    from PIL import ImageOps

    data = _jpeg(_photo(50, 30, orientation), orientation=orientation)
    im = Image.open(io.BytesIO(data))
    im.load()
    raw = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = orient_tensor(raw, orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)


def test_decode_jpeg_tensors_isolates_a_bad_file():
    good = _jpeg(_photo(64, 48))
    # a JPEG header and end marker around garbage: the header parses, the decoder refuses it
    bad = good[:600] + bytes(range(256)) * 8 + b"\xff\xd9"
    batch = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, bad, good)]
    out = decode_jpeg_tensors(batch, [1, 1, 6], "cpu")
    assert out[1] is None
    assert tuple(out[0].shape) == (3, 48, 64) and tuple(out[2].shape) == (3, 64, 48)
    pil = torch.from_numpy(np.asarray(decode_image(good, "x.jpg")).copy()).permute(2, 0, 1)
    assert torch.equal(out[0], pil)  # same libjpeg-turbo settings: the same pixels as PIL


def test_a_file_the_tensor_decoder_refuses_is_decoded_by_pil(monkeypatch):
    """nvJPEG refuses some files PIL reads (unusual subsampling, ...): they still become rows, decoded by PIL;
    files PIL refuses too become rejects with PIL's reason."""
    import tasks.core.images as images
    from tasks.core.forward import decode_preprocess_jpegs, preprocess_uint8
    from tasks.core.models import Preprocess

    real = images.decode_jpeg_tensors
    monkeypatch.setattr(images, "decode_jpeg_tensors", lambda datas, o, dev: [None, *real(datas[1:], o[1:], dev)])
    pre = Preprocess(resize=64, crop=48)
    a, b = _jpeg(_photo(120, 90, 1)), _jpeg(_photo(90, 120, 2))
    garbage = a[:600] + bytes(range(256)) * 8 + b"\xff\xd9"
    items = [(7, torch.frombuffer(bytearray(a), dtype=torch.uint8), 1, 120, 90),
             (8, torch.frombuffer(bytearray(b), dtype=torch.uint8), 1, 90, 120),
             (9, torch.frombuffer(bytearray(garbage), dtype=torch.uint8), 1, 120, 90)]
    ok, bad = decode_preprocess_jpegs(items, torch.device("cpu"), pre, DecodeLimits())
    assert [r[0] for r in ok] == [7, 8] and [(r[2], r[3]) for r in ok] == [(120, 90), (90, 120)]
    assert torch.equal(ok[0][1], preprocess_uint8(decode_image(a, "a.jpg"), pre))  # PIL's pixels, exactly
    with pytest.raises(images.RejectedImage) as exc:
        decode_image(garbage, "g.jpg")
    assert bad == [(9, exc.value.reason, exc.value.detail)]
    # the whole batch refused at once: every file still decoded (one at a time, then PIL)
    monkeypatch.setattr(images, "decode_jpeg_tensors", lambda datas, o, dev: [None] * len(datas))
    ok, bad = decode_preprocess_jpegs(items[:2], torch.device("cpu"), pre, DecodeLimits())
    assert [r[0] for r in ok] == [7, 8] and bad == []


def test_tensor_decode_path_matches_pil_decode(tmp_path):
    data = tmp_path / "d"
    (data / "photos").mkdir(parents=True)
    for i, (w, h) in enumerate([(1024, 768), (500, 375), (640, 480)]):
        (data / "photos" / f"p{i}.jpg").write_bytes(_jpeg(_photo(w, h, i), orientation=6 if i == 1 else None))
    (data / "photos" / "prog.jpg").write_bytes(_jpeg(_photo(400, 300, 5), progressive=True))
    (data / "photos" / "grey.jpg").write_bytes(_jpeg(_photo(400, 300, 6).convert("L")))
    good = _jpeg(_photo(64, 48))
    (data / "photos" / "garbage.jpg").write_bytes(good[:600] + bytes(range(256)) * 8 + b"\xff\xd9")
    write_hostile_corpus(data / "hostile", fifo=False)
    full = _table(tmp_path / "s1", _extract(data, tmp_path / "s1", full_decode=True, max_reject_rate=0.9, batch_size=4))
    m = _extract(data, tmp_path / "s2", decode="gpu", max_reject_rate=0.9, batch_size=4)
    assert m["preprocessing"]["decode"] == "torchvision-jpeg"
    tens = _table(tmp_path / "s2", m)
    assert tens[2] == full[2] and tens[2]["photos/garbage.jpg"] == full[2]["photos/garbage.jpg"]  # same rejects, reasons
    assert list(tens[0]["path"]) == list(full[0]["path"])
    assert list(zip(tens[0]["width"], tens[0]["height"])) == list(zip(full[0]["width"], full[0]["height"]))
    rel = np.linalg.norm(tens[1] - full[1], axis=1) / np.maximum(np.linalg.norm(full[1], axis=1), 1e-12)
    assert rel.max() <= 0.02, dict(zip(tens[0]["path"], rel))  # tensor resize vs PIL resize: within a level or two


def test_forward_batch_async_on_cpu_is_forward_batch():
    from tasks.core.hooks import resolve_layer
    from tasks.core.models import load_model

    lm = load_model(TINY, "none")
    ref = resolve_layer(lm.module, None)
    dev = torch.device("cpu")
    module = prepare_module(lm.module, dev, ref)
    x = torch.randn(11, 3, 32, 32)
    want = forward_batch(module, x, ref, "avg", dev, True, "fp32")
    got = forward_batch_async(module, x, ref, "avg", dev, True, "fp32").result()
    for a, b in zip(got, want):
        assert (a is None and b is None) or np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------ settings


def test_resolve_decode_and_flags():
    assert resolve_decode("auto", "cpu") == "jpeg-draft"
    assert resolve_decode("cpu", "cpu", full_decode=True) == "full"
    assert resolve_decode("gpu", "cpu") == "torchvision-jpeg"
    with pytest.raises(UsageError, match="lanczos"):
        resolve_decode("gpu", "cpu", interpolation="lanczos")
    with pytest.raises(UsageError, match="--decode"):
        resolve_decode("fast", "cpu")
    with pytest.raises(UsageError, match="--decode"):
        ExtractConfig(data="x", decode="fast").validate()
    from flows.extract_features import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--store", default="s")
    cfg = config_from_args(p.parse_args(["DATA", "--decode", "cpu", "--full-decode"]))
    assert cfg.decode == "cpu" and cfg.full_decode is True
    cfg = config_from_args(p.parse_args(["DATA"]))
    assert cfg.decode == "auto" and cfg.full_decode is False


def test_inspect_image_rejects_like_decode():
    limits = DecodeLimits(min_side=4)
    for data, name in [(b"", "x.jpg"), (b"not an image", "x.jpg"), (_jpeg(_photo(3, 3)), "x.jpg"),
                       (_jpeg(_photo(64, 48)), "x.png")]:
        with pytest.raises(Exception) as a:
            inspect_image(data, name, limits)
        with pytest.raises(Exception) as b:
            decode_image(data, name, limits)
        assert a.value.reason == b.value.reason


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_extraction_matches_cpu_full_decode(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    for i, (w, h) in enumerate([(1024, 768), (500, 375), (640, 480), (2048, 1536)]):
        (data / f"p{i}.jpg").write_bytes(_jpeg(_photo(w, h, i), orientation=6 if i == 1 else None))
    _photo(300, 200, 7).save(data / "photo.png")
    kw = dict(model="mobilenet_v2", weights="imagenet", precision="fp32", num_workers=1)
    full = _table(tmp_path / "s1", _extract(data, tmp_path / "s1", device="cpu", full_decode=True, **kw))
    m = _extract(data, tmp_path / "s2", device="cuda", decode="gpu", **kw)
    assert m["preprocessing"]["decode"] == "nvjpeg"
    gpu = _table(tmp_path / "s2", m)
    assert list(gpu[0]["path"]) == list(full[0]["path"]) and gpu[2] == full[2]
    assert list(zip(gpu[0]["width"], gpu[0]["height"])) == list(zip(full[0]["width"], full[0]["height"]))
    rel = np.linalg.norm(gpu[1] - full[1], axis=1) / np.linalg.norm(full[1], axis=1)
    assert rel.max() <= 0.05, rel  # nvJPEG's IDCT / chroma upsampling and the tensor resize differ from PIL's
