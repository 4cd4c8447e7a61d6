"""Fault tests for issue 10: hostile inputs, decode timeout, checksums + ``convlens verify``, locks, disk full,
quality gate, determinism, unsafe loads and path escapes. Each test injects the fault and checks the store.
(Kill -9 and SIGTERM live in test_soak.py; hostile text in the browser in test_report_browser.py.)"""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_color_dataset
from hostile_corpus import write_hostile_corpus
from storage.atomic import TMP_PREFIX
from storage.errors import ChecksumError, DiskFullError, LockedError, QualityGateError, StoreError
from storage.features import load_features, part_entries, read_meta
from storage.index_store import load_index_bytes
from storage.locks import LOCK_NAME, artefact_lock
from storage.manifest import read_manifest, safe_member, write_manifest
from storage.paths import Store
from tasks.core.forward import embed_images
from tasks.core.images import DecodeLimits, RejectedImage, decode_image, read_file_bytes
from tasks.core.models import ModelError, load_model
from tasks.extract.features import run_extraction
from tiny_models import extract_config

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny_models:build"


def extract(data, store, lm=None, **kw):
    kw.setdefault("model", MODEL)
    return run_extraction(extract_config(data, store, **kw), lm)


def adir(store, m) -> Path:
    return Store(store).artefact_dir("features", m["artefact_id"])


def rejects_of(store, m) -> dict[str, str]:
    t = pq.read_table(adir(store, m) / part_entries(m, "rejects")[0]["name"]).to_pandas()
    return dict(zip(t["path"], t["reason"]))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def emulate_permissions(monkeypatch):
    """Root reads mode-000 files anyway; emulate the kernel's check for non-root in ``os.open``, which both
    open sites (hashing and decoding, via ``tasks.core.images.open_regular_file``) use, so the code path under test
    is the real one. Off when not root (chmod 000 is real then)."""
    if os.geteuid() != 0:
        return False
    real_os_open = os.open

    def fake_os_open(path, flags, *a, **k):
        try:
            st = os.stat(path)
        except (OSError, TypeError, ValueError):
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and not (stat.S_IMODE(st.st_mode) & 0o444):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_os_open)
    return True


# --- 8. hostile images ------------------------------------------------------------------------------------

def test_hostile_corpus_rejects_with_reasons_or_normalises(tmp_path, store_dir, emulate_permissions):
    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    expect = write_hostile_corpus(data / "hostile")
    lm = load_model(MODEL, "none", seed=0)
    m = extract(data, store_dir, lm=lm, max_reject_rate=1.0)  # returns: never hangs (FIFO), never crashes
    got = rejects_of(store_dir, m)
    meta = read_meta(adir(store_dir, m), m)
    sizes = {p: (w, h) for p, w, h in zip(meta["path"], meta["width"], meta["height"])}
    tried = 0
    for name, exp in expect.items():
        rel = f"hostile/{name}"
        tried += 1
        if exp.reason:
            assert got.get(rel) == exp.reason, (name, got.get(rel), exp.reason)
            assert rel not in sizes
        else:
            assert sizes.get(rel) == exp.size, (name, sizes.get(rel), exp.size)
            assert rel not in got
    assert tried == len(expect) >= 20
    assert m["rejects"] == sum(1 for e in expect.values() if e.reason)
    assert m["rows"] == 6 + sum(1 for e in expect.values() if e.size)
    # the embedding of a normalised item is the embedding of the normalised image: EXIF rotation applied
    # (48 wide x 64 high), alpha composited on white
    _, feats = load_features(adir(store_dir, m), m)
    meta2, _ = load_features(adir(store_dir, m), m)
    row = {p: i for i, p in enumerate(meta2["path"])}
    from PIL import Image

    from hostile_corpus import _gradient

    rgba = np.asarray(Image.open(data / "hostile" / "rgba.png").convert("RGBA"), np.float64)
    a = rgba[..., 3:] / 255.0
    composite = Image.fromarray(np.rint(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8), "RGB")
    rotated = decode_image((data / "hostile" / "exif_rotated.jpg").read_bytes(), "x.jpg")
    assert rotated.size == (48, 64)
    direct = embed_images(lm, [composite, rotated], _layer(lm))
    np.testing.assert_allclose(feats[row["hostile/rgba.png"]], direct[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats[row["hostile/exif_rotated.jpg"]], direct[1], rtol=1e-4, atol=1e-5)
    # a rotated (unrotated) image would embed differently: the check above can fail
    unrotated = embed_images(lm, [_gradient().convert("RGB")], _layer(lm))
    assert not np.allclose(unrotated[0], direct[1], atol=1e-5)
    # decoded pixels: 16-bit scaled to 8-bit, palette transparency on white
    six = np.asarray(decode_image((data / "hostile" / "sixteen.png").read_bytes(), "s.png"))
    src = np.asarray(Image.open(data / "hostile" / "sixteen.png"), np.float64)
    np.testing.assert_array_equal(six[..., 0], np.clip(np.rint(src / 65535 * 255), 0, 255).astype(np.uint8))


def _layer(lm):
    from tasks.core.hooks import resolve_layer

    return resolve_layer(lm.module, None)


def test_fifo_never_blocks_and_decode_timeout(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", _reason(lambda: read_file_bytes(fifo))), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert box["r"] == "not-a-file"

    import tasks.core.images

    real = tasks.core.images._decode

    def slow(*a, **k):  # a decoder that would hang far longer than any test
        import time

        time.sleep(600)
        return real(*a, **k)

    monkeypatch.setattr(tasks.core.images, "_decode", slow)
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, "PNG")
    limits = DecodeLimits(timeout_s=0.5)
    # main thread: SIGALRM interval timer
    assert _reason(lambda: decode_image(png.getvalue(), "a.png", limits)) == "decode-timeout"
    # worker thread (as in a Prefect task thread): abandoned helper thread
    t = threading.Thread(target=lambda: box.__setitem__("t", _reason(lambda: decode_image(png.getvalue(), "a.png", limits))))
    t.start()
    t.join(30)
    assert box["t"] == "decode-timeout"


def _reason(fn) -> str:
    try:
        fn()
    except RejectedImage as exc:
        return exc.reason
    return "accepted"


# --- 5. checksums and convlens verify ----------------------------------------------------------------------

def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_detected_on_read_and_by_verify(tmp_path, store_dir, capsys):
    from flows.cli import main
    from tasks.index.build import IndexConfig, build_index

    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    m = extract(data, store_dir, part_rows=3)
    im = build_index(IndexConfig(store=str(store_dir)))
    assert main(["verify", "--store", str(store_dir)]) == 0
    clean = capsys.readouterr().out
    assert "store OK" in clean
    fdir = adir(store_dir, m)
    part = fdir / part_entries(m)[0]["name"]
    idir = Store(store_dir).artefact_dir("indexes", im["artefact_id"])
    index_file = idir / next(e["name"] for e in im["files"] if e["role"] == "index")
    original = {p: p.read_bytes() for p in (part, index_file)}
    _flip(part)
    _flip(index_file)
    with pytest.raises(ChecksumError, match=part.name):
        load_features(fdir, m)
    with pytest.raises(ChecksumError, match=index_file.name):
        load_index_bytes(idir, read_manifest(idir))
    assert main(["verify", "--store", str(store_dir)]) == 1
    out = capsys.readouterr().out
    assert part.name in out and index_file.name in out and "store CORRUPT: 2 problem(s)" in out
    assert main(["verify", "--store", str(store_dir), "--json"]) == 1
    res = json.loads(capsys.readouterr().out)
    bad = {a["artefact_id"]: a for a in res["artefacts"] if not a["ok"]}
    assert set(bad) == {m["artefact_id"], im["artefact_id"]} and res["problems"] == 2
    # an edited manifest (here: a listed sha256 rewritten to match the flipped file) is refused by its own checksum
    for p, b in original.items():
        p.write_bytes(b)
    mpath = fdir / "manifest.json"
    doc = json.loads(mpath.read_text())
    doc["rows"] += 1
    mpath.write_text(json.dumps(doc))
    with pytest.raises(ChecksumError, match="manifest.json"):
        read_manifest(fdir)
    assert main(["verify", "--store", str(store_dir)]) == 1
    assert "manifest.json" in capsys.readouterr().out
    write_manifest(fdir, {k: v for k, v in doc.items() if k != "rows"} | {"rows": doc["rows"] - 1})
    assert main(["verify", "--store", str(store_dir)]) == 0
    assert main(["verify", "--store", str(tmp_path / "nope")]) == 2


# --- 3. locks -----------------------------------------------------------------------------------------------

def test_second_writer_refused_and_stale_locks_reclaimed(tmp_path, store_dir):
    import socket
    import time

    d = tmp_path / "art"
    with artefact_lock(d) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "heartbeat" in info
        with pytest.raises(LockedError, match=f"PID {os.getpid()} on {socket.gethostname()}"):
            with artefact_lock(d):
                pass
    assert not (d / LOCK_NAME).exists()  # released
    # dead PID on this host: reclaimed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "heartbeat": time.time()}))
    with artefact_lock(d) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # another host, fresh heartbeat: held; old heartbeat: reclaimed
    (d / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time()}))
    with pytest.raises(LockedError, match="elsewhere"):
        with artefact_lock(d):
            pass
    (d / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time() - 3600}))
    with artefact_lock(d, stale_after=120):
        pass
    # a whole extraction refuses to run while another live writer holds its artefact
    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    m = extract(data, store_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (adir(store_dir, m) / LOCK_NAME).write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "heartbeat": time.time()}))
        with pytest.raises(LockedError, match=f"PID {holder.pid}"):
            extract(data, store_dir)
    finally:
        holder.kill()
        holder.wait()
    assert extract(data, store_dir)["rows"] == m["rows"]  # holder gone: lock reclaimed


# --- 4. disk full -------------------------------------------------------------------------------------------

def test_disk_full_keeps_last_good_version_and_cleans_temp_files(tmp_path, store_dir, monkeypatch):
    import storage.atomic

    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    m1 = extract(data, store_dir, part_rows=2)
    make_color_dataset(tmp_path / "d", per_class=4, splits=("",), seed=1)  # 6 new + 6 changed images
    fdir = adir(store_dir, m1)
    real_fdopen = os.fdopen
    calls = {"n": 0}

    class FullDisk(io.RawIOBase):
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def fileno(self):
            return self.fh.fileno()

        def close(self):
            self.fh.close()

    def fdopen(fd, *a, **k):
        fh = real_fdopen(fd, *a, **k)
        if not os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(TMP_PREFIX):
            return fh
        calls["n"] += 1
        # atomic writes of the rerun: hash cache, part 1, journal, part 2, journal <- the disk is full here
        return FullDisk(fh) if calls["n"] >= 5 else fh

    monkeypatch.setattr(storage.atomic.os, "fdopen", fdopen)
    with pytest.raises(DiskFullError) as err:
        extract(data, store_dir, part_rows=2)
    msg = str(err.value)
    assert "disk full" in msg and "No space left" in msg and str(fdir) in msg and "intact" in msg
    monkeypatch.undo()
    assert read_manifest(fdir, verify=True) == m1  # last good version current and readable
    meta, feats = load_features(fdir, m1)
    assert len(meta) == m1["rows"] and feats.shape[0] == m1["rows"]
    assert not [p for p in store_dir.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert not (fdir / LOCK_NAME).exists()
    m2 = extract(data, store_dir, part_rows=2)  # space back: the run resumes and publishes
    assert m2["rows"] == 12 and m2["run"]["extracted"] < 12  # journalled parts from the failed run reused


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted at ``tmp_path/small`` (skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_disk_full_on_tmpfs(tmp_path, small_tmpfs):
    """The same guarantees with a real ENOSPC from the kernel: fill a small tmpfs, then rerun with new images."""
    data = make_color_dataset(tmp_path / "d", per_class=2, splits=("",))
    store = small_tmpfs / "store"
    m1 = extract(data, store, part_rows=2)
    make_color_dataset(tmp_path / "d", per_class=4, splits=("",), seed=1)
    ballast = small_tmpfs / "ballast"
    with open(ballast, "wb") as fh:  # take every free byte
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(DiskFullError, match="No space left on device") as err:
        extract(data, store, part_rows=2)
    assert "intact" in str(err.value)
    fdir = adir(store, m1)
    assert read_manifest(fdir, verify=True) == m1
    assert len(load_features(fdir, m1)[0]) == m1["rows"]
    assert not [p for p in store.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert not (fdir / LOCK_NAME).exists()
    ballast.unlink()
    assert extract(data, store, part_rows=2)["rows"] == 12


# --- 6. quality gate ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["nan", "inf", "all-zero"])
def test_quality_gate_blocks_publish(tmp_path, store_dir, fault):
    data = make_color_dataset(tmp_path / "d", per_class=1, splits=("",))
    m1 = extract(data, store_dir)
    lm = load_model(MODEL, "none", seed=0)
    with torch.no_grad():
        if fault == "all-zero":  # penultimate = relu(fc1(x)): a dead layer
            lm.module.fc1.weight.zero_()
            lm.module.fc1.bias.zero_()
        else:
            lm.module.fc1.bias[0] = float("nan") if fault == "nan" else float("inf")
    # replace every image, so every published row would come from the faulty model
    shutil.rmtree(data)
    make_color_dataset(data, per_class=1, splits=("",), seed=7)
    with pytest.raises(QualityGateError) as err:
        extract(data, store_dir, lm=lm)
    assert ("NaN or Inf" if fault != "all-zero" else "exactly zero") in str(err.value)
    assert "nothing was published" in str(err.value)
    assert read_manifest(adir(store_dir, m1), verify=True) == m1
    # reject rate above threshold: tests/test_extract.py::test_reject_rate_threshold_keeps_previous_manifest


# --- 7. determinism -----------------------------------------------------------------------------------------

def test_same_inputs_give_identical_features_maps_and_neighbours(tmp_path):
    from storage.maps import read_coords
    from tasks.index.build import IndexConfig, build_index
    from tasks.index.neighbors import knn_graph
    from tasks.maps.projection import MapConfig, build_map

    data = make_color_dataset(tmp_path / "d", per_class=4, splits=("",))
    out = []
    for run in ("a", "b"):
        store = tmp_path / f"store-{run}"
        m = extract(data, store, part_rows=5, seed=3)
        files = {e["name"]: e["sha256"] for e in m["files"]}
        maps = {}
        for method in ("pca", "tsne"):
            mm = build_map(MapConfig(store=str(store), method=method, perplexity=3.0, seed=0, quality_sample=0))
            maps[method] = read_coords(Store(store).artefact_dir("maps", mm["artefact_id"]), mm)
        build_index(IndexConfig(store=str(store)))
        g = knn_graph(str(store), k=3)
        knn = pq.read_table(Store(store).artefact_dir("indexes", g["index"]) / g["file"]).to_pandas()
        meta, feats = load_features(adir(store, m), m)
        out.append((files, feats, maps, knn, meta))
    (fa, xa, ma, ka, meta_a), (fb, xb, mb, kb, _) = out
    assert fa == fb  # every Parquet part byte-identical (same names = same sha256)
    assert xa.tobytes() == xb.tobytes()
    for method in ("pca", "tsne"):
        cols = [c for c in ma[method].columns if c.startswith(("x", "y", "z")) or c in ("image_id", "path")]
        assert {"x", "y", "image_id"} <= set(cols)
        pd.testing.assert_frame_equal(ma[method][cols], mb[method][cols], check_exact=True)
    pd.testing.assert_frame_equal(ka, kb, check_exact=True)
    # an image's features do not depend on its batch-mates (a resumed run batches differently)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(data / meta_a["path"][5], alone / "only.png")
    m1 = extract(alone, tmp_path / "store-alone", seed=3, batch_size=3)
    one = load_features(adir(tmp_path / "store-alone", m1), m1)[1]
    assert one[0].tobytes() == xa[5].tobytes()


# --- 9. unsafe loads ----------------------------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    calls = []
    for py in REPO.rglob("*.py"):
        if any(part in (".venv", "node_modules", "build") or part.startswith(".") for part in py.relative_to(REPO).parts):
            continue
        tree_ = ast.parse(py.read_text("utf-8"), str(py))
        for node in ast.walk(tree_):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{py.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "expected at least the state-dict loader"
    assert [c for c, ok in calls if not ok] == []


def test_malicious_pickle_checkpoint_refused_and_never_runs(tmp_path, color_dataset, store_dir):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('owned')",))

    for name in ("evil.pth", "evil.pt"):
        path = tmp_path / name
        torch.save({"conv.weight": Evil()}, path)
        with pytest.raises(ModelError, match="weights_only|refus"):
            load_model(MODEL, str(path))
        with pytest.raises((ModelError, ValueError)):
            extract(color_dataset, store_dir, weights=str(path))
    # passed as the model itself (a "TorchScript" path) it is refused too
    with pytest.raises((ModelError, ValueError, RuntimeError)):
        load_model(str(tmp_path / "evil.pt"), "none")
    assert not marker.exists()
    assert not (store_dir / "features").exists() or not list((store_dir / "features").rglob("manifest.json"))


# --- 10. paths ----------------------------------------------------------------------------------------------

def test_list_escapes_rejected_manifest_escapes_refused_nothing_written_outside(tmp_path, store_dir):
    lists = tmp_path / "lists"
    data = make_color_dataset(lists / "imgs", per_class=1, splits=("",))
    secret = tmp_path / "secret"
    secret.mkdir()
    img = next(data.rglob("*.png"))
    shutil.copy(img, secret / "s.png")
    (lists / "imgs" / "link.png").symlink_to(secret / "s.png")  # a symlink out of the root
    rows = [str(p.relative_to(lists)) for p in sorted(data.rglob("*.png")) if not p.is_symlink()]
    hostile = ["../secret/s.png", str(secret / "s.png"), "imgs/link.png", "imgs/../../secret/s.png"]
    pd.DataFrame({"path": rows + hostile}).to_csv(lists / "l.csv", index=False)
    before = tree(tmp_path)
    m = extract(lists / "l.csv", store_dir, max_reject_rate=0.9)
    got = rejects_of(store_dir, m)
    assert {h: got.get(h) for h in hostile} == {h: "outside-root" for h in hostile}
    assert m["rows"] == len(rows)
    after = tree(tmp_path)
    assert {k for k in after if not k.startswith("store/")} == set(before)  # nothing written outside the store
    assert all(after[k] == v for k, v in before.items())
    m2 = extract(lists / "l.csv", store_dir / "other", allow_outside_root=True)  # explicitly allowed
    # the two "../" spellings are one relative path: the repeat is a duplicate-entry reject row, not a silent drop
    assert m2["rows"] == len(rows) + 3 and rejects_of(store_dir / "other", m2) == {"imgs/../../secret/s.png": "duplicate-entry"}
    # manifest entries that escape the artefact directory are refused on read
    fdir = adir(store_dir, m)
    for evil in ("../../secret/s.png", "/etc/passwd", "..", "a/b.parquet"):
        with pytest.raises(StoreError, match="not a plain file name"):
            safe_member(fdir, evil)
    doc = json.loads((fdir / "manifest.json").read_text())
    doc["files"][0]["name"] = "../../../secret/s.png"
    doc.pop("manifest_sha256")  # a forged manifest without the self-checksum: the entry check still refuses it
    (fdir / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="not a plain file name"):
        read_manifest(fdir)
    # a listed member that is a symlink pointing elsewhere is refused too
    part = part_entries(m)[0]["name"]
    (fdir / part).unlink()
    (fdir / part).symlink_to(secret / "s.png")
    with pytest.raises(StoreError, match="symlink"):
        safe_member(fdir, part)
