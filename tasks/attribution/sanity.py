"""Model-parameter randomisation sanity check for attribution maps (Adebayo et al., NeurIPS 2018, "Sanity
Checks for Saliency Maps").

A map that explains a *model* must change when the model's learned weights are destroyed. The cascading test
re-initialises the parametrised layers from the logits down — the top 1, 2, 3, ... layers, then a quarter,
half and all of them (:func:`default_depths`) — recomputes each method's maps on the same images and targets,
and measures how similar they stay to the trained model's maps:

- **Spearman rank correlation of the absolute maps** (:func:`spearman`, ties averaged; a map that becomes
  constant counts as 0 = fully changed);
- **SSIM of the maps** min-max scaled to [0, 1] and average-pooled to ``ssim_px`` x ``ssim_px``
  (:func:`ssim`, Gaussian window sigma 1.5, ``C1 = 0.01^2``, ``C2 = 0.03^2``).

**The rule** (:func:`verdicts`): at the *verdict depth* — the deepest tested cascade step that randomises at
most the top half of the layers, ``ceil(L / 2)`` of ``L`` parametrised layers — a method whose median Spearman
over the checked images is ``>= threshold`` (default 0.8) is flagged "does not depend on what the model
learned": its maps mostly reflect the input (edges, colour) and the architecture, not the trained weights, and
should not be read as the model's reasons.

"Parametrised layers" are the leaf modules that own parameters (Conv, Linear, BatchNorm, ...), ordered by
definition (= forward order for sequential CNNs); the top layer is the last one. Randomising a layer calls its
own ``reset_parameters()`` (the initialiser the architecture was built with; BatchNorm running statistics reset
too) under a seed derived from ``seed`` and the layer's name, so depth ``k + 1`` keeps the random values of
depth ``k`` (a true cascade) and reruns are identical. A leaf without ``reset_parameters`` gets each
parameter redrawn ``N(0, std of the trained values)``.

:func:`run_sanity` applies the test to the methods of a stored attribution audit on ``n`` of its images and
publishes an ``audits`` artefact (manifest kind ``attribution-sanity``, table columns
:data:`storage.audits.SANITY_COLUMNS`). Memory: one copy of the model + ``n`` images x methods maps.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from storage.errors import StoreError, UsageError
from tasks.attribution.common import decode_stored_rows

__all__ = [
    "MapFn",
    "SanityConfig",
    "SANITY_KIND",
    "parametrised_layers",
    "default_depths",
    "verdict_depth",
    "randomised_copy",
    "spearman",
    "ssim",
    "sanity_table",
    "verdicts",
    "audit_map_fn",
    "run_sanity",
    "summarise_sanity",
]

log = logging.getLogger(__name__)

SANITY_KIND = "attribution-sanity"

#: ``fn(model, inputs (N,3,H,W) float32 normalised, target (N,) long) -> maps (N,H,W) float32``
MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SanityConfig:
    """Parameters of the randomisation test (CLI flags ``--sanity-*`` map 1:1).

    ``n``: audited images checked; ``depths``: cascade depths (numbers of top layers randomised; ``None`` =
    :func:`default_depths`); ``threshold``: median Spearman at the verdict depth at or above which a method is
    flagged; ``ssim_px``: side of the pooled maps SSIM compares (0 = no SSIM); ``seed``: image choice and
    re-initialisation."""

    n: int = 4
    depths: tuple[int, ...] | None = None
    threshold: float = 0.8
    ssim_px: int = 32
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64

    def validate(self) -> None:
        if self.n < 1:
            raise UsageError(f"--sanity-n must be >= 1, got {self.n}")
        if not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"--sanity-threshold is a rank correlation in [-1, 1], got {self.threshold}")
        if self.depths is not None and (not self.depths or min(self.depths) < 1):
            raise UsageError(f"--sanity-depths must be positive layer counts, got {self.depths}")
        if self.ssim_px < 0 or 0 < self.ssim_px < 7:
            raise UsageError(f"--sanity-ssim-px must be 0 (off) or >= 7, got {self.ssim_px}")


# ------------------------------------------------------------------------------------------ the model side


def parametrised_layers(model: nn.Module) -> list[str]:
    """Names of the leaf modules that own parameters, in definition order (the last one is the top layer)."""
    out = []
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)):
            out.append(name)
    return out


def default_depths(n_layers: int) -> list[int]:
    """The cascade: top 1, 2, 3 layers, then a quarter, half and all of ``n_layers`` (sorted, unique)."""
    if n_layers < 1:
        raise UsageError("the model has no parametrised layer to randomise")
    cand = {1, 2, 3, math.ceil(n_layers / 4), verdict_depth(n_layers), n_layers}
    return sorted(d for d in cand if 1 <= d <= n_layers)


def verdict_depth(n_layers: int) -> int:
    """Layers randomised at the verdict: the top half, ``ceil(n_layers / 2)``."""
    return max(1, math.ceil(n_layers / 2))


def _layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:6], "little")


def randomised_copy(model: nn.Module, layers: Sequence[str], depth: int, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` (eval mode, parameters frozen) whose top ``depth`` layers of ``layers`` are
    re-initialised (see the module docstring); ``model`` itself is untouched."""
    if not 1 <= depth <= len(layers):
        raise UsageError(f"cascade depth {depth} is outside [1, {len(layers)}] (the model's parametrised layers)")
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name in layers[len(layers) - depth:]:
        m = modules[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_layer_seed(seed, name))
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                with torch.no_grad():
                    reset()
                if hasattr(m, "reset_running_stats"):
                    m.reset_running_stats()
            else:
                with torch.no_grad():
                    for p in m.parameters(recurse=False):
                        std = float(p.detach().float().std()) if p.numel() > 1 else 1.0
                        p.normal_(0.0, std if math.isfinite(std) and std > 0 else 1.0)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


# ------------------------------------------------------------------------------------------ similarity


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation of two maps of the same shape (flattened; ties get average ranks).
    NaN when either map is constant."""
    from scipy.stats import rankdata

    x = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).ravel()
    y = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise UsageError(f"maps to compare must have the same shape, got {x.shape} and {y.shape}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _unit(m: torch.Tensor) -> torch.Tensor:
    m = m.float()
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(m)


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, size: int = 32, sigma: float = 1.5) -> float:
    """Structural similarity of two ``(H, W)`` maps, each min-max scaled to [0, 1] and average-pooled to
    ``size x size``, with an 11-tap (or smaller) Gaussian window of ``sigma`` pooled pixels."""
    x = _unit(torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().cpu())
    y = _unit(torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).detach().cpu())
    if x.shape != y.shape or x.dim() != 2:
        raise UsageError(f"ssim needs two (H, W) maps of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = F.adaptive_avg_pool2d(x[None, None], size)
    y = F.adaptive_avg_pool2d(y[None, None], size)
    r = min(5, (size - 1) // 2)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ------------------------------------------------------------------------------------------ the test


def sanity_table(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, methods: Mapping[str, MapFn],
                 depths: Sequence[int] | None = None, layers: Sequence[str] | None = None, seed: int = 0,
                 ssim_px: int = 32, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the cascading randomisation test.

    ``model``: eval mode, normalised input; ``inputs (N,3,H,W) float32``; ``target (N,) long`` (the class each
    map explains, fixed across the cascade); ``methods``: name -> :data:`MapFn`. Returns one row per
    (method, depth, image): ``method, depth, layers, top_layer, image, image_id, spearman, ssim, constant``
    (``top_layer`` = the lowest layer randomised at that depth; ``constant`` = the randomised map is flat,
    whose Spearman is then recorded as 0). Depth 0 is not a row: it is the trained model's map itself.
    Memory: one model copy at a time + ``N x methods`` maps.
    """
    if inputs.dim() != 4 or target.dim() != 1 or target.shape[0] != inputs.shape[0]:
        raise UsageError(f"inputs must be (N, C, H, W) with one target each, got {tuple(inputs.shape)} and "
                         f"{tuple(target.shape)}")
    if not methods:
        raise UsageError("no attribution method to check")
    layers = list(layers) if layers is not None else parametrised_layers(model)
    depths = sorted(set(depths)) if depths else default_depths(len(layers))
    if max(depths) > len(layers):
        raise UsageError(f"cascade depth {max(depths)} exceeds the model's {len(layers)} parametrised layers")
    ids = list(image_ids) if image_ids is not None else [str(i) for i in range(inputs.shape[0])]
    ref = {name: fn(model, inputs, target).detach().float().abs().cpu() for name, fn in methods.items()}
    rows = []
    for d in depths:
        rnd = randomised_copy(model, layers, d, seed)
        for name, fn in methods.items():
            maps = fn(rnd, inputs, target).detach().float().abs().cpu()
            for i in range(inputs.shape[0]):
                flat = float(maps[i].max() - maps[i].min()) == 0.0
                rho = spearman(ref[name][i], maps[i])
                rows.append({"method": name, "depth": int(d), "layers": len(layers),
                             "top_layer": layers[len(layers) - d], "image": i, "image_id": ids[i],
                             "spearman": 0.0 if flat or not math.isfinite(rho) else rho,
                             "ssim": ssim(ref[name][i], maps[i], ssim_px) if ssim_px else float("nan"),
                             "constant": flat})
        del rnd
    return pd.DataFrame(rows)


def verdicts(table: pd.DataFrame, threshold: float = 0.8, depth: int | None = None) -> dict[str, dict[str, Any]]:
    """Per method: the verdict of the rule in the module docstring. ``depth`` overrides the verdict depth
    (default: the deepest tested depth <= ``ceil(layers / 2)``).

    Returns ``{method: {"depth", "layers", "median_spearman", "median_ssim", "flagged", "verdict", "curve"}}``;
    ``curve`` is ``[[depth, median spearman, median ssim], ...]`` over the cascade."""
    out: dict[str, dict[str, Any]] = {}
    if table.empty:
        return out
    n_layers = int(table["layers"].iloc[0])
    tested = sorted(int(d) for d in table["depth"].unique())
    if depth is None:
        limit = verdict_depth(n_layers)
        depth = max([d for d in tested if d <= limit] or tested[:1])
    for method, g in table.groupby("method", sort=False):
        curve = [[int(d), float(gd["spearman"].median()), float(gd["ssim"].median()) if gd["ssim"].notna().any() else None]
                 for d, gd in g.groupby("depth")]
        at = g[g["depth"] == depth]
        rho = float(at["spearman"].median()) if len(at) else float("nan")
        s = float(at["ssim"].median()) if len(at) and at["ssim"].notna().any() else None
        flagged = bool(math.isfinite(rho) and rho >= threshold)
        out[str(method)] = {
            "depth": int(depth), "layers": n_layers, "median_spearman": rho, "median_ssim": s, "flagged": flagged,
            "threshold": float(threshold), "curve": curve,
            "verdict": ("does not depend on what the model learned" if flagged else "depends on the learned weights"),
        }
    return out


# ------------------------------------------------------------------------------------------ stored audits


def audit_map_fn(name: str, params: Mapping[str, Any], cam_layer: str | None, batch_size: int = 64) -> MapFn:
    """The stored audit's method ``name`` with its stored ``params`` as a :data:`MapFn` (same maps as the
    audit computed: :func:`tasks.attribution.methods.compute_map`, with the audit's channel reduction)."""
    from tasks.attribution.audit import AuditConfig
    from tasks.attribution.methods import compute_map, method_spec

    spec = method_spec(name)
    p = dict(params)
    cfg = AuditConfig(window=int(p.get("window", 16)), stride=int(p.get("stride", 8)),
                      baseline=float(p.get("baseline", 0.0)), ig_steps=int(p.get("n_steps", 50)),
                      smooth_samples=int(p.get("nt_samples", 5)), smooth_stdev=float(p.get("stdevs", 1.0)),
                      seed=int(p.get("seed", 0)), batch_size=batch_size, layer=cam_layer)

    def fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # a fresh occlusion plan per model: the incremental plan is traced from the model it runs on
        return compute_map(spec.name, model, x, t, cfg, cam_layer or "", {})

    return fn


def _pick(scores: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` audited (image, target) rows, one per image, seeded; the predicted-class target preferred."""
    s = scores.copy()
    s["_pref"] = (~s["target_kind"].astype(str).str.startswith("pred")).astype(int)
    s = s.sort_values(["image_id", "_pref", "target"], kind="stable").drop_duplicates("image_id")
    s = s.sort_values("image_id", kind="stable").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    return s.iloc[np.sort(rng.permutation(len(s))[:n])].reset_index(drop=True)


def run_sanity(store: str | Path, audit_id: str | None = None, n: int | None = None, cfg: SanityConfig | None = None,
               methods: Sequence[str] | None = None, model: str | None = None, weights: str | None = None,
               force: bool = False, map_fns: Mapping[str, MapFn] | None = None) -> dict[str, Any]:
    """Check the methods of a stored attribution audit (newest when ``audit_id`` is None) on ``n`` of its images.

    ``n`` overrides ``cfg.n`` (default 4). ``methods`` restricts the methods checked (names or aliases; default:
    every method the audit stored); ``map_fns`` adds or replaces methods by name (a method of your own; such a
    check is recomputed on every call); ``model`` / ``weights``: as ``convlens audit
    --model / --weights`` (confirm a factory / TorchScript model, the weights file the features were made with).
    Publishes (or, unchanged, reuses) ``audits/sanity-<audit>-<hash>/`` with a Parquet table
    (:func:`sanity_table`'s rows + ``path``, ``target``) and a manifest of kind ``attribution-sanity`` holding
    the per-method :func:`verdicts`. Returns the manifest (``reused`` added).
    Raises :class:`StoreError` without an attribution audit, :class:`UsageError` for bad options.
    """
    import pyarrow as pa

    from storage.artefacts import newest_of
    from storage.audits import SANITY_COLUMNS, load_scores
    from storage.features import remove_garbage, write_part
    from storage.locks import artefact_lock
    from storage.manifest import CODE_VERSION, MANIFEST_NAME, read_manifest, write_manifest
    from storage.paths import Store, artefact_id
    from tasks.attribution.methods import method_spec
    from tasks.core.forward import normalise, pick_device
    from tasks.core.models import load_model_from_manifest

    cfg = cfg or SanityConfig()
    if n is not None:
        cfg = replace(cfg, n=int(n))
    cfg.validate()
    t0 = time.perf_counter()
    s = Store(store)
    aid, am, adir_a = newest_of(s, "attribution", audit_id)
    scores = load_scores(adir_a, am)
    if scores.empty:
        raise StoreError(f"attribution audit {aid} has no scores; run `convlens audit` first")
    stored = {m: list(v) for m, v in (am.get("methods") or {}).items()}
    canon = [m if (map_fns and m in map_fns) else method_spec(m).name for m in (methods or [])]
    wanted = list(dict.fromkeys(canon)) if canon else [m for m in stored if m in set(scores["method"])]
    if map_fns:
        wanted += [m for m in map_fns if m not in wanted]
    unknown = [m for m in wanted if m not in stored and not (map_fns and m in map_fns)]
    if unknown:
        raise UsageError(f"method(s) {', '.join(unknown)} not in audit {aid} (it has {', '.join(stored) or 'none'})")
    fid = (am.get("features") or {}).get("id")
    fdir = s.artefact_dir("features", fid)
    fman = read_manifest(fdir)
    spec = fman.get("model") or am.get("model") or {}
    pick = _pick(scores, cfg.n, cfg.seed)
    params_of = {}
    for m in wanted:
        if map_fns and m in map_fns:
            continue
        used = scores[scores["method"] == m]["params_hash"].astype(str)
        ph = used.iloc[-1] if len(used) else stored[m][-1]
        params_of[m] = {"params_hash": ph, **(am["methods"][m].get(ph) or {}).get("params", {})}
    key = {"attribution": aid, "attribution_created": am.get("created"), "config": asdict(cfg) | {"device": None},
           "methods": sorted(wanted), "params": params_of, "code_version": CODE_VERSION,
           "custom": sorted(map_fns or {})}
    sid = artefact_id(f"sanity-{aid[:40]}", key)
    sdir = s.artefact_dir("audits", sid, create=True)
    if not force and not map_fns and (sdir / MANIFEST_NAME).is_file():
        try:
            return {**read_manifest(sdir, verify=True), "reused": True}
        except StoreError as exc:
            log.warning("rebuilding %s: %s", sid, exc)
    # the audit's own rule: data never chooses code, weights checked by sha256
    lm = load_model_from_manifest(spec, user_model=model, user_weights=weights, artefact=fid)
    device = pick_device(cfg.device)
    net = lm.module.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    ok, raw, bad = decode_stored_rows(fman.get("dataset_root"), pick, lm.preprocess)
    for note in bad:
        log.warning("sanity check skips %s", note)
    if raw is None:
        raise StoreError(f"none of the {len(pick)} images chosen from audit {aid} could be read back; "
                         "is the dataset still where it was extracted from?")
    pick = pick.iloc[ok].reset_index(drop=True)
    x = normalise(raw.to(device), lm.preprocess)
    t = torch.tensor([int(v) for v in pick["target"]], device=device)
    fns: dict[str, MapFn] = {}
    for m in wanted:
        if map_fns and m in map_fns:
            fns[m] = map_fns[m]
        else:
            fns[m] = audit_map_fn(m, params_of[m], am.get("gradcam_layer"), cfg.batch_size)
    layers = parametrised_layers(net)
    table = sanity_table(net, x, t, fns, cfg.depths, layers, cfg.seed, cfg.ssim_px, list(pick["image_id"]))
    table["path"] = table["image"].map(dict(enumerate(pick["path"].astype(str))))
    table["target"] = table["image"].map(dict(enumerate(int(v) for v in pick["target"])))
    table = table[list(SANITY_COLUMNS)]
    ver = verdicts(table, cfg.threshold)
    with artefact_lock(sdir):
        entry = write_part(sdir, pa.Table.from_pandas(table, preserve_index=False), prefix="sanity")
        manifest = {
            "kind": SANITY_KIND, "artefact_id": sid, "features": {"id": fid},
            "attribution": {"id": aid, "created": am.get("created")}, "model": spec,
            "params": {**asdict(cfg), "depths": sorted(set(table["depth"].astype(int)))},
            "layers": len(layers), "top_layers": layers[::-1][:max(table["depth"])],
            "verdict_depth": next(iter(ver.values()))["depth"] if ver else None,
            "rule": (f"flagged when the median Spearman rank correlation of |map| (trained vs randomised) is "
                     f">= {cfg.threshold} after re-initialising the top half of the {len(layers)} parametrised "
                     "layers (the deepest tested depth <= ceil(layers / 2))"),
            "verdicts": ver, "images": len(pick), "methods": wanted,
            "seconds": round(time.perf_counter() - t0, 2), "files": [dict(entry, role="sanity")],
        }
        published = write_manifest(sdir, manifest)
        remove_garbage(sdir, published)
    log.info("sanity check %s: %s", sid, {m: v["verdict"] for m, v in ver.items()})
    return {**published, "reused": False}


def summarise_sanity(manifest: dict[str, Any]) -> dict[str, Any]:
    """Small record of a sanity artefact (what the CLI prints): id, audit, verdict per method."""
    return {"artefact_id": manifest["artefact_id"], "attribution": (manifest.get("attribution") or {}).get("id"),
            "images": manifest.get("images"), "layers": manifest.get("layers"),
            "verdict_depth": manifest.get("verdict_depth"), "reused": bool(manifest.get("reused")),
            "seconds": manifest.get("seconds"),
            "verdicts": {m: {"median_spearman": round(v["median_spearman"], 3) if math.isfinite(v["median_spearman"]) else None,
                             "flagged": v["flagged"]} for m, v in (manifest.get("verdicts") or {}).items()}}
