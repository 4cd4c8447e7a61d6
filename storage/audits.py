"""Readers of ``audits`` artefacts: dataset audits (kNN findings, manifest kind ``dataset-audit``) and
attribution audits (scores + stored maps, kind ``attribution``). The column sets are the producers' contract."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storage.artefacts import newest_of
from storage.atomic import sha256_bytes
from storage.errors import ChecksumError, StoreError
from storage.features import read_part
from storage.paths import Store

__all__ = ["FINDING_TYPES", "FINDING_COLUMNS", "SCORES_COLUMNS", "SANITY_COLUMNS", "IMAGE_TABLE_COLUMNS",
           "read_findings", "load_scores", "read_scores", "load_map", "read_sanity", "read_image_table"]

FINDING_TYPES = ("exact-duplicate", "near-duplicate", "leakage", "label-disagreement", "outlier")
FINDING_COLUMNS = ("finding", "rank", "score", "cluster", "image_id", "path", "label", "split", "other_image_id",
                   "other_path", "other_label", "other_split", "suggested_label", "detail")
SCORES_COLUMNS = ("image_id", "path", "label", "method", "params_hash", "target", "target_kind", "target_name",
                  "pred", "prob", "deletion_auc", "insertion_auc", "runtime_s", "map_file", "map_index",
                  "overlay", "selected_by", "created")
# attribution-sanity artefacts (tasks/attribution/sanity.py): one row per (method, cascade depth, image)
SANITY_COLUMNS = ("method", "depth", "layers", "top_layer", "image", "image_id", "path", "target", "spearman", "ssim",
                  "constant")
# image-table artefacts (reports/sections/per_image.py): one row per feature-table row, every finding joined
IMAGE_TABLE_COLUMNS = ("row", "image_id", "path", "label", "split", "pred", "pred_index", "prob", "correct", "findings",
                       "duplicate_group", "duplicate_of", "leak_partner", "leak_partner_split", "label_issue_score",
                       "suggested_label", "outlier_score", "faithfulness", "best_method", "best_gap", "sanity",
                       "unreliable_methods", "new_image", "pred_changed", "new_findings", "resolved_findings",
                       "since_last_run")


def read_findings(store: str | Path | Store, audit_id: str | None = None, features_id: str | None = None) -> pd.DataFrame:
    """The verified findings table of a dataset-audit artefact (newest when ``audit_id`` is None)."""
    _, m, adir = newest_of(store, "dataset-audit", audit_id, features_id)
    entry = next((e for e in m["files"] if e.get("role") == "findings"), None)
    if entry is None:
        raise StoreError(f"dataset audit {adir.name} lists no findings table; rerun `convlens audit-dataset`")
    return read_part(adir, entry).to_pandas()


def load_scores(adir: Path, manifest: dict[str, Any] | None) -> pd.DataFrame:
    """All scores parts of an attribution audit (an empty table with the columns when there is none)."""
    if not manifest:
        return pd.DataFrame(columns=list(SCORES_COLUMNS))
    parts = [read_part(adir, e).to_pandas() for e in manifest.get("files", []) if e.get("role") == "scores"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SCORES_COLUMNS))


def read_scores(store: str | Path, artefact: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The scores table of an attribution audit (newest if ``artefact`` is None), checksums verified."""
    _, man, adir = newest_of(store, "attribution", artefact)
    return load_scores(adir, man), man


def load_map(store: str | Path, manifest: dict[str, Any], map_file: str, map_index: int) -> np.ndarray:
    """One stored map ``(H, W) float32`` (sha256 of its NPZ verified)."""
    adir = Store(store).artefact_dir("audits", manifest["artefact_id"])
    entry = next((e for e in manifest["files"] if e["name"] == map_file), None)
    if entry is None:
        raise StoreError(f"{map_file} is not listed in the manifest of {manifest['artefact_id']}")
    data = (adir / map_file).read_bytes()
    if sha256_bytes(data) != entry["sha256"]:
        raise ChecksumError(f"checksum mismatch for {adir / map_file}; rebuild the audit")
    with np.load(io.BytesIO(data)) as z:
        return z["maps"][int(map_index)].astype(np.float32)


def read_sanity(store: str | Path | Store, attribution_id: str | None = None
                ) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The newest sanity check (kind ``attribution-sanity``) of the attribution audit ``attribution_id`` (any
    audit when None): ``(table, manifest)`` with the table sha256-verified, or None when there is none."""
    from storage.artefacts import artefacts_of

    for _, m, adir in artefacts_of(store, "attribution-sanity"):
        if attribution_id is not None and (m.get("attribution") or {}).get("id") != attribution_id:
            continue
        entry = next((e for e in m.get("files", []) if e.get("role") == "sanity"), None)
        if entry is None:
            continue
        return read_part(adir, entry).to_pandas(), m
    return None


def read_image_table(store: str | Path | Store, features_id: str | None = None, artefact: str | None = None
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The per-image table (kind ``image-table``, written with the report) of ``features_id`` (newest when
    None), sha256-verified: one row per feature row, columns :data:`IMAGE_TABLE_COLUMNS`."""
    _, m, adir = newest_of(store, "image-table", artefact, features_id)
    entry = next((e for e in m.get("files", []) if e.get("role") == "images"), None)
    if entry is None:
        raise StoreError(f"image table {adir.name} lists no table; rebuild it with `convlens report`")
    return read_part(adir, entry).to_pandas(), m
