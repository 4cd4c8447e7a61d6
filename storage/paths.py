"""Store layout: ``<store>/<kind>/<artefact_id>/`` directories with a manifest each.

Kinds: ``features``, ``indexes``, ``maps``, ``audits``, ``neurons``, ``reports``, ``runs``. Artefact ids are
``<readable-slug>-<hash12>`` where the hash covers everything that defines the artefact's content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from storage.errors import StoreError
from storage.manifest import MANIFEST_NAME, read_manifest

__all__ = ["Store", "KINDS", "artefact_id", "slugify"]

KINDS = ("features", "indexes", "maps", "audits", "neurons", "reports", "runs", "cache")


def slugify(text: str, limit: int = 40) -> str:
    """Lower-case ``text`` to ``[a-z0-9._-]`` for use in a directory name."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug[:limit] or "x"


def artefact_id(readable: str, key: dict[str, Any]) -> str:
    """Deterministic artefact id: ``slug(readable)-sha256(json(key))[:12]``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{slugify(readable)}-{digest}"


@dataclass(frozen=True)
class Store:
    """A store root. Cheap to construct; creates nothing until a writer asks for a directory."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root).expanduser().absolute())

    def kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown artefact kind {kind!r}; expected one of {', '.join(KINDS)}")
        return self.root / kind

    def artefact_dir(self, kind: str, aid: str, create: bool = False) -> Path:
        if not aid or "/" in aid or "\\" in aid or aid in (".", ".."):
            raise StoreError(f"invalid artefact id {aid!r}")
        path = self.kind_dir(kind) / aid
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def iter_artefacts(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(artefact_id, manifest)`` for every published artefact of ``kind`` (unpublished dirs skipped)."""
        base = self.kind_dir(kind)
        if not base.is_dir():
            return
        for child in sorted(base.iterdir()):
            if child.is_dir() and (child / MANIFEST_NAME).is_file():
                yield child.name, read_manifest(child)

    def resolve(self, kind: str, aid: str | None = None) -> tuple[str, dict[str, Any]]:
        """Find one published artefact of ``kind``: the given id (or unique prefix), else the newest.

        Raises :class:`StoreError` saying which command creates it when there is none.
        """
        items = list(self.iter_artefacts(kind))
        if not items:
            raise StoreError(
                f"no published {kind} artefact in store {self.root}; "
                + {
                    "features": "run `convlens extract DATA --store ...` first",
                    "indexes": "run `convlens index --store ...` first",
                    "maps": "run `convlens project --store ... --method tsne` first",
                    "audits": "run `convlens audit --store ...` first",
                }.get(kind, "run the stage that creates it first")
            )
        if aid:
            matches = [it for it in items if it[0] == aid] or [it for it in items if it[0].startswith(aid)]
            if not matches:
                raise StoreError(
                    f"no {kind} artefact {aid!r} in {self.root}; available: " + ", ".join(i for i, _ in items)
                )
            if len(matches) > 1:
                raise StoreError(f"artefact id prefix {aid!r} is ambiguous: " + ", ".join(i for i, _ in matches))
            return matches[0]
        return max(items, key=lambda it: (it[1].get("created", ""), it[0]))
