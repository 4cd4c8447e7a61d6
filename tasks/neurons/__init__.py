"""The seeds' neuron toolbox, one technique per module; each has a pure function and a ``run_*`` that
publishes a ``neurons`` artefact (PNGs + Parquet table + manifest). See docs/neurons.md for the layouts.

Nothing is imported at package import time beyond the names below (no model loads, no torch work).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "run_filters", "run_activations", "run_max_activations", "run_class_viz", "run_inversion", "run_deepdream",
    "run_style", "run_adversarial", "run_evolution", "run_invariance", "run_compare", "run_default_neurons",
    "receptive_field", "TECHNIQUES",
]

# technique (manifest "technique" key) -> module
TECHNIQUES = {
    "filters": "filters", "activations": "activations", "max_activations": "max_activations", "class_viz": "class_viz",
    "inversion": "inversion", "deepdream": "deepdream", "style": "style", "adversarial": "adversarial",
    "evolution": "evolution", "invariance": "invariance", "compare": "transfer",
}

_LAZY = {
    "run_filters": "filters", "run_activations": "activations", "run_max_activations": "max_activations",
    "run_class_viz": "class_viz", "run_inversion": "inversion", "run_deepdream": "deepdream", "run_style": "style",
    "run_adversarial": "adversarial", "run_evolution": "evolution", "run_invariance": "invariance",
    "run_compare": "transfer", "receptive_field": "receptive_field", "run_default_neurons": "defaults",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tasks.neurons.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tasks.neurons' has no attribute {name!r}")
