"""Artefacts by the ``kind`` their manifest declares, and the feature artefact each was built from.

Every writer puts ``kind`` in its manifest (``features``, ``index``, ``maps``, ``dataset-audit``,
``attribution``, ``attribution-sanity``, ``image-table``, ``neurons``, ``nightly-run``) and records its feature source in one known field. Readers
select artefacts here, by that field, instead of guessing from names or columns. The per-kind readers
(:mod:`storage.features`, :mod:`storage.index_store`, :mod:`storage.maps`, :mod:`storage.audits`,
:mod:`storage.neurons`, :mod:`storage.runs`) build on these two functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.errors import StoreError, UsageError
from storage.paths import Store

__all__ = ["DIRECTORY_OF", "artefacts_of", "newest_of", "features_source"]

# manifest kind -> the store directory that holds it
DIRECTORY_OF = {
    "features": "features",
    "index": "indexes",
    "maps": "maps",
    "dataset-audit": "audits",
    "attribution": "audits",
    "attribution-sanity": "audits",
    "image-table": "audits",
    "neurons": "neurons",
    "nightly-run": "runs",
}

_HOW_TO_MAKE = {
    "features": "convlens extract DATA",
    "index": "convlens index",
    "maps": "convlens project --method tsne",
    "dataset-audit": "convlens audit-dataset",
    "attribution": "convlens audit",
    "attribution-sanity": "convlens audit-sanity",
    "image-table": "convlens report",
    "neurons": "convlens neurons ...",
    "nightly-run": "convlens nightly DATA",
}


def features_source(manifest: dict[str, Any]) -> str | None:
    """The id of the feature artefact that ``manifest``'s artefact was built from (its own id for features)."""
    kind = manifest.get("kind", "features")
    src = manifest.get("source")
    if kind == "features":
        return manifest.get("artefact_id")
    if kind == "index":
        return (src or {}).get("artefact_id")
    if kind == "maps":
        return src if isinstance(src, str) else None
    if kind == "dataset-audit":
        return (src or {}).get("features")
    if kind in ("attribution", "nightly-run", "attribution-sanity", "image-table"):
        return (manifest.get("features") or {}).get("id")
    if kind == "neurons":
        return (src or {}).get("features_id")
    return None


def _check_kind(kind: str) -> str:
    if kind not in DIRECTORY_OF:
        raise UsageError(f"unknown manifest kind {kind!r}; expected one of {', '.join(DIRECTORY_OF)}")
    return DIRECTORY_OF[kind]


def artefacts_of(store: str | Path | Store, kind: str, features_id: str | None = None
                 ) -> list[tuple[str, dict[str, Any], Path]]:
    """Published artefacts whose manifest ``kind`` is ``kind`` (built from ``features_id`` when given), newest
    first, as ``(artefact_id, manifest, directory)``."""
    s = store if isinstance(store, Store) else Store(store)
    directory = _check_kind(kind)
    out = [(aid, m, s.artefact_dir(directory, aid)) for aid, m in s.iter_artefacts(directory)
           if m.get("kind", "features" if directory == "features" else None) == kind
           and (features_id is None or features_source(m) == features_id)]
    out.sort(key=lambda t: (t[1].get("created", ""), t[0]), reverse=True)
    return out


def newest_of(store: str | Path | Store, kind: str, aid: str | None = None, features_id: str | None = None
              ) -> tuple[str, dict[str, Any], Path]:
    """One artefact of ``kind``: ``aid`` (or a unique prefix of it), else the newest. Raises
    :class:`StoreError` saying which command makes one when there is none."""
    s = store if isinstance(store, Store) else Store(store)
    items = artefacts_of(s, kind, features_id)
    if aid:
        exact = [it for it in items if it[0] == aid]
        items = exact or [it for it in items if it[0].startswith(aid)]
        if len(items) > 1:
            raise StoreError(f"artefact id prefix {aid!r} is ambiguous: " + ", ".join(i for i, _, _ in items))
    if not items:
        what = f"{kind} artefact {aid!r}" if aid else f"{kind} artefact"
        raise StoreError(f"no published {what} in store {s.root}; run `{_HOW_TO_MAKE[kind]} --store {s.root}` first")
    return items[0]
