"""Store layout: ``<store>/<kind>/<artefact_id>/`` directories with a manifest each.

Kinds: ``features``, ``indexes``, ``maps``, ``audits``, ``neurons``, ``reports``, ``runs``. Artefact ids are
``<readable-slug>-<hash12>`` where the hash covers everything that defines the artefact's content.

An artefact directory must be a real directory: a symlinked one (which readers would follow to files no
writer of this store locked or published) is refused by :meth:`Store.artefact_dir` and
:meth:`Store.iter_artefacts` with a :class:`~storage.errors.StoreError` (and reported by ``convlens verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from storage.errors import StoreError, UsageError
from storage.manifest import MANIFEST_NAME, read_manifest

__all__ = ["Store", "KINDS", "artefact_id", "refuse_symlinked_artefact", "slugify",
           "symlinked_artefact_problem"]

KINDS = ("features", "indexes", "maps", "audits", "neurons", "reports", "runs", "cache")


def slugify(text: str, limit: int = 40) -> str:
    """Lower-case ``text`` to ``[a-z0-9._-]`` for use in a directory name."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug[:limit] or "x"


def artefact_id(readable: str, key: dict[str, Any]) -> str:
    """Deterministic artefact id: ``slug(readable)-sha256(json(key))[:12]``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{slugify(readable)}-{digest}"


def symlinked_artefact_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong when the artefact directory ``path`` is a symlink (dangling or not); None when it is not."""
    path = Path(path)
    if not path.is_symlink():
        return None
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (
        f"artefact directory {path} is a symlink (to {target!r}); convlens refuses to read or write through it, "
        "because its files are not under this store's locks and checks — replace the link with a real "
        f"directory (copy the artefact into {path.parent}) or remove it"
    )


def refuse_symlinked_artefact(path: str | os.PathLike[str]) -> None:
    """Raise :class:`StoreError` when the artefact directory ``path`` is a symlink (dangling or not)."""
    problem = symlinked_artefact_problem(path)
    if problem is not None:
        raise StoreError(problem)


@dataclass(frozen=True)
class Store:
    """A store root. Cheap to construct; creates nothing until a writer asks for a directory."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root).expanduser().absolute())

    def kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise UsageError(f"unknown artefact kind {kind!r}; expected one of {', '.join(KINDS)}")
        return self.root / kind

    def artefact_dir(self, kind: str, aid: str, create: bool = False) -> Path:
        if not aid or "/" in aid or "\\" in aid or aid in (".", ".."):
            raise StoreError(f"invalid artefact id {aid!r}")
        path = self.kind_dir(kind) / aid
        refuse_symlinked_artefact(path)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def iter_artefacts(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(artefact_id, manifest)`` for every published artefact of ``kind`` (unpublished dirs skipped).

        Raises :class:`StoreError` on a symlinked artefact directory.
        """
        base = self.kind_dir(kind)
        if not base.is_dir():
            return
        for child in sorted(base.iterdir()):
            refuse_symlinked_artefact(child)
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
