"""``convlens layers --model M``: the module tree with output shapes, to pick a ``--layer``."""

from __future__ import annotations

import argparse

from tasks.core.hooks import LAYER_ALIASES, layer_table, resolve_layer
from tasks.core.models import load_model

__all__ = ["register", "format_layers"]


def format_layers(model: str, weights: str = "none", input_size: int | None = None, depth: int | None = None) -> str:
    lm = load_model(model, weights)
    size = input_size or lm.preprocess.crop
    rows = layer_table(lm.module, size)
    lines = [f"{model}: {lm.num_params:,} parameters; dummy input (1, 3, {size}, {size})"]
    for r in rows:
        if depth is not None and r["depth"] > depth:
            continue
        shape = "x".join(map(str, r["output_shape"])) if r["output_shape"] else "-"
        lines.append(f"{'  ' * r['depth']}{r['name']:<{max(1, 40 - 2 * r['depth'])}} {r['type']:<24} {shape:<20} {r['params']:>10,}")
    lines.append("aliases:")
    for alias in LAYER_ALIASES:
        try:
            ref = resolve_layer(lm.module, alias)
            lines.append(f"  {alias:<12} -> {ref.name} ({ref.side}{', token 0' if ref.token is not None else ''})")
        except ValueError:
            lines.append(f"  {alias:<12} -> (not available for this model)")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from flows.cli import say

    say(format_layers(args.model, args.weights, args.input_size, args.depth))
    return 0


def register(sub) -> None:
    p = sub.add_parser("layers", help="print a model's module tree with output shapes (to pick --layer)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--weights", default="none", help="none (default: shapes don't need weights) | imagenet | PATH")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None, help="only modules up to this nesting depth")
    p.set_defaults(func=_cli)
