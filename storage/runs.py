"""Reader of ``runs`` artefacts: one record per successful nightly run (manifest kind ``nightly-run``), each
with a hard-linked snapshot of the features it saw (the next run's "yesterday")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from storage.artefacts import artefacts_of
from storage.paths import Store

__all__ = ["RUN_KIND", "snapshot_dir", "previous_run"]

RUN_KIND = "nightly-run"


def snapshot_dir(store: str | os.PathLike[str], run_id: str) -> Path:
    """``runs/<run_id>/<run_id>/``: the run's features snapshot, named after the run so that the report's drift
    section ("compared with ...") names the previous run."""
    return Store(store).artefact_dir("runs", run_id) / run_id


def previous_run(store: str | os.PathLike[str], features_id: str) -> tuple[str, dict[str, Any], Path] | None:
    """Newest published nightly run record of ``features_id``: ``(run id, manifest, snapshot dir)`` or None."""
    found = artefacts_of(store, RUN_KIND, features_id)
    if not found:
        return None
    rid, m, _ = found[0]
    return rid, m, snapshot_dir(store, rid)
