"""``convlens info``: list the published artefacts in a store."""

from __future__ import annotations

import argparse
from typing import Any

from storage.errors import UsageError
from storage.paths import KINDS, Store

__all__ = ["store_info", "register"]


def store_info(store: str) -> list[dict[str, Any]]:
    """One small record per published artefact (kind, id, created, and the kind's key facts)."""
    s = Store(store)
    if not s.root.is_dir():
        raise UsageError(f"store {store!r} does not exist; create one with `convlens extract DATA --store {store}`")
    out = []
    for kind in KINDS:
        for aid, m in s.iter_artefacts(kind):
            rec: dict[str, Any] = {"kind": kind, "artefact_id": aid, "created": m.get("created")}
            if kind == "features":
                rec.update({"dataset": m.get("dataset_root"), "model": m.get("model", {}).get("arch"),
                            "weights": m.get("model", {}).get("weights"), "layer": m.get("layer", {}).get("name"),
                            "dim": m.get("dim"), "rows": m.get("rows"), "rejects": m.get("rejects")})
            else:
                rec.update({k: m[k] for k in ("source", "rows", "method", "factory", "metric", "space") if k in m})
            out.append(rec)
    return out


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import emit, say

    items = store_info(args.store)
    if args.json:
        emit(items, True)
        return 0
    if not items:
        say(f"store {args.store}: no published artefacts")
        return 0
    for it in items:
        extra = "  ".join(f"{k}={v}" for k, v in it.items() if k not in ("kind", "artefact_id", "created"))
        say(f"{it['kind']:<9} {it['artefact_id']}  created={it['created']}  {extra}")
    return 0


def register(sub) -> None:
    from flows.cli import add_store_argument

    p = sub.add_parser("info", help="list the artefacts in a store")
    add_store_argument(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cli)
