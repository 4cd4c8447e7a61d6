"""Reader of ``neurons`` artefacts (tables written by the techniques in :mod:`tasks.neurons`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from storage.errors import StoreError
from storage.manifest import read_manifest, verify_files

__all__ = ["read_table"]


def read_table(adir: str | Path, manifest: dict[str, Any] | None = None, name: str | None = None) -> pd.DataFrame:
    """Read a neurons artefact's table (the first ``role == "table"`` file, or ``name``), sha256-checked."""
    adir = Path(adir)
    manifest = manifest or read_manifest(adir)
    entries = [f for f in manifest.get("files", []) if (f["name"] == name if name else f.get("role") == "table")]
    if not entries:
        raise StoreError(f"{adir} lists no table{' ' + name if name else ''}")
    verify_files(adir, {"files": entries})
    return pd.read_parquet(adir / entries[0]["name"])
