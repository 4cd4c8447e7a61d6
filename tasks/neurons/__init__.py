"""The seeds' neuron toolbox, one technique per module; each has a pure function and a ``run_*`` that
publishes a ``neurons`` artefact (PNGs + Parquet table + manifest). See docs/neurons.md for the layouts.

:data:`TECHNIQUES` is the one table of techniques: CLI command, manifest ``technique`` name, module, ``run_*``
function and config class. :func:`run_technique` calls one by command. Nothing is imported at package import
time (no model loads, no torch work); ``from tasks.neurons import run_filters`` imports its module on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from storage.errors import UsageError

__all__ = ["Technique", "TECHNIQUES", "technique", "run_technique",
           "run_filters", "run_activations", "run_max_activations", "run_class_viz", "run_channel_viz", "run_inversion",
           "run_deepdream",
           "run_style", "run_adversarial", "run_evolution", "run_invariance", "run_compare", "run_default_neurons"]


@dataclass(frozen=True)
class Technique:
    """One neuron technique: ``convlens neurons COMMAND`` runs ``tasks.neurons.MODULE.FUNCTION``; its artefact's
    manifest says ``technique: NAME``; ``config`` names the technique's config dataclass (or None)."""

    command: str
    name: str
    module: str
    function: str
    config: str | None = None

    def load(self) -> Any:
        """The ``run_*`` function (imports its module)."""
        return getattr(importlib.import_module(f"tasks.neurons.{self.module}"), self.function)


TECHNIQUES: tuple[Technique, ...] = (
    Technique("filters", "filters", "filters", "run_filters"),
    Technique("activations", "activations", "activations", "run_activations"),
    Technique("max-act", "max_activations", "max_activations", "run_max_activations"),
    Technique("class-viz", "class_viz", "class_viz", "run_class_viz", "ClassVizConfig"),
    Technique("channel-viz", "channel_viz", "class_viz", "run_channel_viz", "ClassVizConfig"),
    Technique("invert", "inversion", "inversion", "run_inversion", "InversionConfig"),
    Technique("dream", "deepdream", "deepdream", "run_deepdream", "DreamConfig"),
    Technique("style", "style", "style", "run_style", "StyleConfig"),
    Technique("adversarial", "adversarial", "adversarial", "run_adversarial", "AdvConfig"),
    Technique("evolution", "evolution", "evolution", "run_evolution"),
    Technique("invariance", "invariance", "invariance", "run_invariance"),
    Technique("compare", "compare", "transfer", "run_compare"),
    Technique("defaults", "defaults", "defaults", "run_default_neurons"),
)
_BY_COMMAND = {t.command: t for t in TECHNIQUES}
_BY_FUNCTION = {t.function: t for t in TECHNIQUES}


def technique(command: str) -> Technique:
    """The technique run by ``convlens neurons COMMAND``; :class:`UsageError` lists the commands otherwise."""
    if command not in _BY_COMMAND:
        raise UsageError(f"unknown technique {command!r}; expected one of {', '.join(_BY_COMMAND)}")
    return _BY_COMMAND[command]


def run_technique(command: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``command``'s ``run_*`` on ``store`` with ``params`` (a ``cfg`` dict becomes the technique's config)."""
    t = technique(command)
    kwargs = dict(params)
    if t.config and isinstance(kwargs.get("cfg"), dict):
        kwargs["cfg"] = getattr(importlib.import_module(f"tasks.neurons.{t.module}"), t.config)(**kwargs["cfg"])
    return t.load()(store, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _BY_FUNCTION:
        return _BY_FUNCTION[name].load()
    raise AttributeError(f"module 'tasks.neurons' has no attribute {name!r}")
