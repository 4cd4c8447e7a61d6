"""Unattended runs you can trust: data never chooses code, and your own weights file reaches every stage.

1. A feature manifest edited to name a ``module:factory`` whose import / call writes a marker file: ``audit``,
   ``neurons max-act`` and ``neighbors --image`` refuse with a one-line UsageError and the marker never appears;
   naming the same spec (``--model`` or the user's trust file) runs it. A TorchScript spec is refused (never
   ``torch.jit.load``ed) unless named, and a named archive must have the recorded sha256.
2. ``extract --weights w.pth`` records the file's absolute path; ``audit``, ``neurons max-act`` (function and
   CLI) and ``neighbors --image`` reuse it without being told; changed bytes are a UsageError naming the sha256
   mismatch, a missing file says to pass ``--weights PATH``, and ``--weights`` with the right bytes works.

Tiny hand-built models (``tests/tiny_models.py``) and generated PNGs only.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from conftest import make_color_dataset
from storage.errors import UsageError
from storage.manifest import read_manifest, write_manifest
from storage.paths import Store
from tasks.core.models import TRUST_ENV, load_model_from_manifest, resolve_manifest_model, trusted_models
from tiny_models import TinyFeatures, TinyNet

FACTORY = "tiny_models:build"


def _extract(data: Path, store: Path, **kw):
    from tasks.extract.features import ExtractConfig, run_extraction

    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    kw.setdefault("device", "cpu")
    return run_extraction(ExtractConfig(data=str(data), store=str(store), **kw))


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A store whose features came from ``tiny_models:build`` + ``--weights w.pth``, with its indexes."""
    from tasks.index.build import build_default_indexes

    root = tmp_path_factory.mktemp("trust")
    data = make_color_dataset(root / "data", per_class=2, splits=("",))
    torch.manual_seed(3)
    wfile = root / "weights" / "w.pth"
    wfile.parent.mkdir()
    torch.save(TinyNet().state_dict(), wfile)
    store = root / "store"
    m = _extract(data, store, model=FACTORY, weights=str(wfile), layer="penultimate")
    build_default_indexes(str(store), gpu="off")
    return {"root": root, "data": data, "store": store, "weights": wfile, "features": m,
            "bytes": wfile.read_bytes(), "query": next(iter(sorted(data.rglob("*.png"))))}


@pytest.fixture(scope="module")
def plain(own, tmp_path_factory):
    """A store whose features came from ``tiny_models:build`` with seeded random weights (no weights file, so the
    trust rule is tested on its own), with its indexes."""
    from tasks.index.build import build_default_indexes

    store = tmp_path_factory.mktemp("plain") / "store"
    _extract(own["data"], store, model=FACTORY, weights="none", layer="penultimate")
    build_default_indexes(str(store), gpu="off")
    return {"store": store, "query": own["query"]}


def _trust(tmp_path: Path, monkeypatch, entries: list[str]) -> Path:
    tf = tmp_path / "trust.toml"
    tf.write_text("trusted_models = [" + ", ".join(json.dumps(e) for e in entries) + "]\n", "utf-8")
    monkeypatch.setenv(TRUST_ENV, str(tf))
    return tf


@pytest.fixture
def no_trust(tmp_path, monkeypatch):
    """No trust file (the user's real one is never read by the tests)."""
    monkeypatch.setenv(TRUST_ENV, str(tmp_path / "no-trust-file.toml"))


def _features_dir(store: Path) -> Path:
    aid, _ = Store(store).resolve("features", None)
    return Store(store).artefact_dir("features", aid)


def _edit_model(store: Path, **changes) -> dict:
    """Rewrite the features manifest's model spec as an attacker would (its own checksum recomputed)."""
    fdir = _features_dir(store)
    man = read_manifest(fdir)
    man["model"] = {**man["model"], **changes}
    return write_manifest(fdir, man)


@pytest.fixture
def hostile(plain, tmp_path, monkeypatch, no_trust):
    """A copy of ``plain``'s store whose manifest names ``<module>:build``, a module that writes a marker file
    when imported and another when ``build`` is called (it then returns a TinyNet, so an allowed run works)."""
    name = f"marker_factory_{uuid.uuid4().hex[:10]}"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    imported, called = tmp_path / "imported.marker", tmp_path / "called.marker"
    (pkg / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(imported)!r}).write_text('imported')\n"
        "def build():\n"
        f"    Path({str(called)!r}).write_text('called')\n"
        "    from tiny_models import TinyNet\n"
        "    return TinyNet()\n", "utf-8")
    monkeypatch.syspath_prepend(str(pkg))
    store = tmp_path / "store"
    shutil.copytree(plain["store"], store)
    spec = f"{name}:build"
    _edit_model(store, arch=spec)
    return {"store": store, "spec": spec, "markers": (imported, called), "query": plain["query"]}


def _no_marker(h) -> None:
    assert not any(m.exists() for m in h["markers"]), "the manifest's factory was imported or called"


def _audit_cfg(store: Path, **kw):
    from tasks.attribution.audit import AuditConfig

    return AuditConfig(store=str(store), methods=("saliency",), n=2, device="cpu", faith_steps=2, progress=False, **kw)


# ------------------------------------------------------------------------------------- 1. data never chooses code


def test_manifest_factory_refused_by_audit_maxact_and_neighbors(hostile, capsys):
    from flows.cli import main
    from tasks.attribution.audit import run_audit
    from tasks.index.neighbors import neighbors
    from tasks.neurons.max_activations import run_max_activations

    store, spec = hostile["store"], hostile["spec"]
    with pytest.raises(UsageError, match=rf"--model {spec} .*trusted_models in .*no-trust-file\.toml"):
        run_audit(_audit_cfg(store))
    _no_marker(hostile)
    with pytest.raises(UsageError, match=rf"never chooses code.*--model {spec}"):
        run_max_activations(str(store), k=2, device="cpu")
    _no_marker(hostile)
    with pytest.raises(UsageError, match=rf"--model {spec}"):
        neighbors(str(store), image=str(hostile["query"]), k=2)
    _no_marker(hostile)
    # the CLI prints it as one line and exits 2
    for argv in (["audit", "--store", str(store), "--methods", "saliency", "--n", "2", "--device", "cpu"],
                 ["neurons", "max-act", "--store", str(store), "-k", "2", "--device", "cpu"],
                 ["neighbors", "--store", str(store), "--image", str(hostile["query"]), "-k", "2"]):
        capsys.readouterr()
        assert main(["--no-prefect", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"pass --model {spec}" in err, err
    _no_marker(hostile)
    # naming a different model does not allow it either
    with pytest.raises(UsageError, match=rf"--model {FACTORY} is not the model .*\({spec}\)"):
        run_audit(_audit_cfg(store, model=FACTORY))
    # the sharded paths (--runner dask) plan with the same rule before any worker loads a model
    from tasks.attribution.sharding import run_sharded_audit
    from tasks.neurons.sharding import sharded_max_activation_scan

    with pytest.raises(UsageError, match=rf"--model {spec}"):
        run_sharded_audit(_audit_cfg(store), shard_size=1)
    with pytest.raises(UsageError, match=rf"--model {spec}"):
        sharded_max_activation_scan(str(store), None, shard_size=2)
    _no_marker(hostile)


def test_manifest_factory_runs_when_the_user_names_it(hostile, capsys):
    from flows.cli import main
    from tasks.attribution.audit import run_audit
    from tasks.index.neighbors import neighbors

    store, spec = hostile["store"], hostile["spec"]
    r = run_audit(_audit_cfg(store, model=spec))
    assert r["rows"] >= 2 and all(m.exists() for m in hostile["markers"])  # the user's --model: its code ran
    # shard workers load the approved recipe (in-process here), not the manifest's spec
    from tasks.attribution.sharding import run_sharded_audit
    from tasks.neurons.max_activations import run_max_activations
    from tasks.neurons.sharding import sharded_max_activation_scan

    assert run_sharded_audit(_audit_cfg(store, model=spec, image_batch=1), shard_size=1)["rows"] == r["rows"]
    scan = sharded_max_activation_scan(str(store), None, shard_size=2, model=spec)
    assert run_max_activations(str(store), k=2, device="cpu", model=spec, scan=scan)["images_scanned"] == 6
    df = neighbors(str(store), image=str(hostile["query"]), k=2, model=spec)
    assert df["distance"].iloc[0] < 1e-5  # the query is a stored image: same model + weights, same vector
    assert main(["--no-prefect", "neurons", "max-act", "--store", str(store), "-k", "2", "--device", "cpu",
                 "--model", spec, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["technique"] == "max_activations"


def test_manifest_factory_runs_when_the_trust_file_lists_it(hostile, tmp_path, monkeypatch):
    from tasks.neurons.max_activations import run_max_activations

    _trust(tmp_path, monkeypatch, [hostile["spec"]])
    m = run_max_activations(str(hostile["store"]), k=2, device="cpu")
    assert m["technique"] == "max_activations" and all(x.exists() for x in hostile["markers"])


def test_trust_file_outside_the_store_and_its_checks(own, tmp_path, monkeypatch, no_trust):
    """A trust file inside the store is not read (a copied store must not bring its own); a world-writable or
    malformed trust file is a UsageError; JSON works too."""
    spec = {**own["features"]["model"], "arch": "some_pkg:build"}
    for name in ("convlens.toml", "trust.toml"):
        (own["store"] / name).write_text('trusted_models = ["some_pkg:build"]\n', "utf-8")
    try:
        with pytest.raises(UsageError, match="pass --model some_pkg:build"):
            resolve_manifest_model(spec)
    finally:
        for name in ("convlens.toml", "trust.toml"):
            (own["store"] / name).unlink()
    tf = _trust(tmp_path, monkeypatch, ["some_pkg:build"])
    assert resolve_manifest_model(spec).allowed_by == str(tf)
    tf.chmod(0o666)
    with pytest.raises(UsageError, match="writable by everyone"):
        resolve_manifest_model(spec)
    tf.chmod(0o644)
    tf.write_text("trusted_models = 'some_pkg:build'\n", "utf-8")
    with pytest.raises(UsageError, match="must be a list of strings"):
        trusted_models()
    tj = tmp_path / "trust.json"
    tj.write_text(json.dumps({"trusted_models": ["some_pkg:build"]}), "utf-8")
    monkeypatch.setenv(TRUST_ENV, str(tj))
    assert resolve_manifest_model(spec).model == "some_pkg:build"


def test_damaged_or_unknown_specs_refused(own, no_trust):
    base = own["features"]["model"]
    for bad in ({"source": "torchvision", "arch": "os:system"}, {"source": "factory", "arch": "x; import os"},
                {"source": "timm", "arch": "resnet18"}, {"source": "pickle", "arch": "x"}):
        with pytest.raises(UsageError):
            resolve_manifest_model({**base, **bad})
    # a timm name with a scheme reads a config from elsewhere: needs permission; a plain registered name does not
    with pytest.raises(UsageError, match="pass --model timm:hf-hub:someone/net"):
        resolve_manifest_model({"source": "timm", "arch": "timm:hf-hub:someone/net", "weights": "none"})
    assert resolve_manifest_model({"source": "timm", "arch": "timm:resnet18", "weights": "none"}).model == "timm:resnet18"
    assert resolve_manifest_model({"source": "torchvision", "arch": "resnet18", "weights": "none"}).model == \
        "torchvision:resnet18"


@pytest.fixture
def scripted(own, tmp_path_factory):
    """Features from a TorchScript archive (TinyFeatures), with their indexes; plus a second, different archive."""
    from tasks.index.build import build_default_indexes

    root = tmp_path_factory.mktemp("ts")
    torch.manual_seed(5)
    net = TinyNet().eval()
    archive = root / "models" / "feats.pt"
    archive.parent.mkdir()
    torch.jit.save(torch.jit.script(TinyFeatures(net).eval()), archive)
    other = root / "models" / "other.pt"
    torch.jit.save(torch.jit.script(TinyFeatures(TinyNet().eval()).eval()), other)
    store = root / "store"
    m = _extract(own["data"], store, model=str(archive))
    build_default_indexes(str(store), gpu="off")
    return {"store": store, "archive": archive, "other": other, "features": m, "query": own["query"], "root": root}


def test_torchscript_spec_refused_unless_named(scripted, tmp_path, monkeypatch, no_trust):
    from tasks.index.neighbors import neighbors
    from tasks.neurons.common import open_source

    spec = scripted["features"]["model"]
    assert spec["source"] == "torchscript" and spec["model_path"] == str(scripted["archive"].resolve())
    loads: list[str] = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda f, *a, **k: loads.append(str(f)) or real_load(f, *a, **k))
    # a file named like the manifest's arch in the current directory is never opened either
    monkeypatch.chdir(tmp_path)
    shutil.copy(scripted["other"], tmp_path / spec["arch"])
    with pytest.raises(UsageError, match=r"TorchScript .*runs the code inside it.*--model .*feats\.pt"):
        open_source(str(scripted["store"]), need_features=True)
    with pytest.raises(UsageError, match="torchscript:"):
        neighbors(str(scripted["store"]), image=str(scripted["query"]), k=2)
    assert loads == []
    # another archive named with --model: sha256 mismatch, still not loaded
    with pytest.raises(UsageError, match="sha256 mismatch"):
        open_source(str(scripted["store"]), need_features=True, model=str(scripted["other"]))
    assert loads == []
    # named by the user: --model PATH, or torchscript:PATH in the trust file
    src = open_source(str(scripted["store"]), need_features=True, model=str(scripted["archive"]))
    assert loads == [str(scripted["archive"].resolve())] and src.lm.recipe.allowed_by == "--model"
    df = neighbors(str(scripted["store"]), image=str(scripted["query"]), k=2, model=f"torchscript:{scripted['archive']}")
    assert df["distance"].iloc[0] < 1e-5
    _trust(tmp_path, monkeypatch, [f"torchscript:{scripted['archive']}"])
    df = neighbors(str(scripted["store"]), image=str(scripted["query"]), k=2)
    assert df["distance"].iloc[0] < 1e-5


# ------------------------------------------------------------------------------ 2. your own weights, every stage


@pytest.fixture
def trusted_own(own, tmp_path, monkeypatch):
    """``own`` with the factory in the user's trust file and the weights file's original bytes restored."""
    _trust(tmp_path, monkeypatch, [FACTORY])
    own["weights"].write_bytes(own["bytes"])
    yield own
    own["weights"].write_bytes(own["bytes"])


def test_weights_path_recorded_not_part_of_the_identity(trusted_own):
    spec = trusted_own["features"]["model"]
    assert spec["weights_path"] == str(trusted_own["weights"].resolve()) and spec["weights_source"] == "file"
    # the same file in another folder gives the same artefact id (the location is not part of the cache key)
    (trusted_own["root"] / "elsewhere").mkdir()
    moved = trusted_own["root"] / "elsewhere" / "w.pth"
    shutil.copy(trusted_own["weights"], moved)
    m = _extract(trusted_own["data"], trusted_own["root"] / "store2", model=FACTORY, weights=str(moved),
                 layer="penultimate")
    assert m["artefact_id"] == trusted_own["features"]["artefact_id"]
    assert m["model"]["weights_path"] == str(moved.resolve())


def test_own_weights_reach_every_stage_without_naming_them(trusted_own, capsys):
    from flows.cli import main
    from tasks.attribution.audit import run_audit
    from tasks.index.neighbors import neighbors
    from tasks.neurons.max_activations import run_max_activations

    store = trusted_own["store"]
    r = run_audit(_audit_cfg(store))
    assert r["rows"] >= 2
    m = run_max_activations(str(store), k=2, device="cpu")
    assert m["technique"] == "max_activations" and m["images_scanned"] == 6
    assert main(["--no-prefect", "neurons", "max-act", "--store", str(store), "-k", "3", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 3
    df = neighbors(str(store), image=str(trusted_own["query"]), k=2)
    assert df["distance"].iloc[0] < 1e-5


def test_changed_or_missing_weights_file_is_a_usage_error(trusted_own, capsys):
    from flows.cli import main
    from tasks.attribution.audit import run_audit
    from tasks.index.neighbors import neighbors
    from tasks.neurons.max_activations import run_max_activations

    store, wfile = trusted_own["store"], trusted_own["weights"]
    keep = trusted_own["root"] / "original-copy.pth"
    keep.write_bytes(trusted_own["bytes"])
    torch.manual_seed(99)
    torch.save(TinyNet().state_dict(), wfile)  # same keys and shapes, other bytes
    for call in (lambda: run_audit(_audit_cfg(store)),
                 lambda: run_max_activations(str(store), k=2, device="cpu", force=True),
                 lambda: neighbors(str(store), image=str(trusted_own["query"]), k=2)):
        with pytest.raises(UsageError, match=r"w\.pth \(recorded by .*sha256 mismatch.*--weights PATH"):
            call()
    capsys.readouterr()
    assert main(["--no-prefect", "neurons", "max-act", "--store", str(store), "-k", "2", "--device", "cpu",
                 "--force"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    # --weights with the right bytes works on every stage; with wrong bytes it is refused the same way
    assert run_audit(_audit_cfg(store, weights=str(keep)))["rows"] >= 2
    assert run_max_activations(str(store), k=2, device="cpu", weights=str(keep))["technique"] == "max_activations"
    assert neighbors(str(store), image=str(trusted_own["query"]), k=2, weights=str(keep))["distance"].iloc[0] < 1e-5
    assert main(["--no-prefect", "neurons", "max-act", "--store", str(store), "-k", "2", "--device", "cpu",
                 "--weights", str(keep), "--force", "--json"]) == 0
    assert main(["--no-prefect", "neighbors", "--store", str(store), "--image", str(trusted_own["query"]), "-k", "2",
                 "--weights", str(wfile)]) == 2
    assert "given with --weights" in capsys.readouterr().err
    # a missing file says to pass --weights PATH
    wfile.unlink()
    with pytest.raises(UsageError, match=r"w\.pth .*does not exist; pass --weights PATH"):
        load_model_from_manifest(trusted_own["features"]["model"])
