"""Whole-store integrity check (``convlens verify``): every manifest, every listed file's size and sha256.

A store is ``<store>/<kind>/<artefact_id>/manifest.json`` plus the data files each manifest lists (see
:mod:`storage.paths`). :func:`verify_store` reads every manifest (refusing a torn, edited or hostile one),
streams every listed file through sha256 and reports each problem with the file it concerns. It never writes.

Problems (the store is not trustworthy): a symlinked artefact directory (refused, not followed: readers
refuse it too), unreadable / self-inconsistent manifest, a listed name that escapes the artefact directory or
is a symlink, a listed file missing, of the wrong size or with the wrong sha256.
For each bad file the report also says which rows it holds (``affected``): the row count its manifest entry
records and, for a feature part that can still be parsed, the ``path`` and ``image_id`` of each row as read
from the damaged file (possibly garbled where the damage lies). A features artefact is repaired by the next
``convlens extract`` of its dataset: it drops the bad part and extracts those rows again.
Notes (informational): files not listed by any manifest (leftovers of an interrupted run), a ``journal.json``
(a run was interrupted or is in progress), a ``.lock`` (with its holder), a directory never published, files
outside any manifest (e.g. ``reports/*.html``, which carry no checksum).

Memory O(1) per file (streamed hashing); time O(store bytes).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import TMP_PREFIX, sha256_file
from storage.errors import StoreError, UsageError
from storage.locks import LOCK_NAME, read_lock
from storage.manifest import MANIFEST_NAME, read_manifest, safe_member
from storage.paths import KINDS, Store, symlinked_artefact_problem

__all__ = ["ArtefactReport", "verify_artefact", "verify_store", "affected_rows"]

_JOURNAL = "journal.json"
_ROW_KINDS = {"features"}  # kinds whose parts hold one row per image, with ``path`` and ``image_id`` columns


@dataclass
class ArtefactReport:
    """Outcome for one artefact directory. ``ok`` is False when ``problems`` is non-empty."""

    kind: str
    artefact_id: str
    status: str  # ok | corrupt | unpublished | refused (a symlinked artefact directory)
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    affected: list[dict[str, Any]] = field(default_factory=list)  # per bad file: see affected_rows

    @property
    def ok(self) -> bool:
        return not self.problems


def affected_rows(kind: str, adir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """What a bad file listed by a manifest held: ``{"file", "role", "rows", "readable", "paths", "image_ids"}``.

    ``rows`` is the manifest entry's row count (``None`` where the entry has none). For a feature part
    (``kind`` features, role ``part``) the ``path`` / ``image_id`` columns are read from the damaged file without
    the checksum; ``readable`` says whether that worked (``paths`` / ``image_ids`` are empty lists when not).
    Values read from a damaged file may be garbled where the damage lies. Memory: O(rows of that part)."""
    role = entry.get("role", "part")
    out: dict[str, Any] = {"file": entry.get("name"), "role": role, "rows": entry.get("rows"), "readable": False,
                           "paths": [], "image_ids": []}
    if kind not in _ROW_KINDS or role != "part":
        return out
    try:
        t = pq.read_table(adir / str(entry["name"]), columns=["path", "image_id"])
    except (pa.ArrowException, OSError, ValueError, KeyError):  # unparseable, or gone
        return out
    out.update(readable=True, paths=[str(p) for p in t.column("path").to_pylist()],
               image_ids=[str(i) for i in t.column("image_id").to_pylist()])
    return out


def verify_artefact(kind: str, adir: Path) -> ArtefactReport:
    """Check one artefact directory: its manifest and every file it lists (all problems, not just the first)."""
    adir = Path(adir)
    rep = ArtefactReport(kind, adir.name, "ok")
    lock = adir / LOCK_NAME
    if lock.exists():
        info = read_lock(lock)
        if info is None:
            rep.notes.append(f"{LOCK_NAME} without an owner record: a writer is taking the lock right now, or one "
                             "stopped while taking it (the next writer takes it over)")
        else:
            age = time.time() - float(info.get("heartbeat", 0) or 0)  # informational: the writer's wall clock
            rep.notes.append(f"locked by PID {info.get('pid')} on {info.get('host')} (heartbeat {age:.0f}s ago)")
    if (adir / _JOURNAL).exists():
        rep.notes.append("journal.json present: a run was interrupted or is in progress (the next run resumes it)")
    if not (adir / MANIFEST_NAME).is_file():
        rep.status = "unpublished"
        rep.notes.append("no manifest: never published (readers ignore this directory)")
        return rep
    try:
        manifest = read_manifest(adir)
    except StoreError as exc:
        rep.status = "corrupt"
        rep.problems.append(str(exc))
        return rep
    listed = set()
    for entry in manifest.get("files", []):
        name = entry.get("name")
        listed.add(name)
        try:
            path = safe_member(adir, name)
        except StoreError as exc:
            rep.problems.append(str(exc))
            continue
        if not path.is_file():
            rep.problems.append(f"{path}: listed in the manifest but missing")
            rep.affected.append(affected_rows(kind, adir, entry))
            continue
        size = path.stat().st_size
        bad = False
        if entry.get("bytes") is not None and int(entry["bytes"]) != size:
            rep.problems.append(f"{path}: size {size} bytes, manifest says {entry['bytes']}")
            bad = True
        digest = sha256_file(path)
        rep.files_checked += 1
        rep.bytes_checked += size
        if digest != entry.get("sha256"):
            rep.problems.append(f"{path}: sha256 {digest[:16]}… does not match the manifest's "
                                f"{str(entry.get('sha256'))[:16]}… (modified or corrupted)")
            bad = True
        if bad:
            rep.affected.append(affected_rows(kind, adir, entry))
    stray = sorted(c.name for c in adir.iterdir()
                   if c.name not in listed | {MANIFEST_NAME, LOCK_NAME, _JOURNAL} and not c.is_dir())
    if stray:
        temp = [s for s in stray if s.startswith(TMP_PREFIX)]
        rep.notes.append(f"{len(stray)} file(s) not in the manifest ({len(temp)} temp), ignored by readers: "
                         + ", ".join(stray[:5]) + (" …" if len(stray) > 5 else ""))
    if rep.problems:
        rep.status = "corrupt"
    return rep


def verify_store(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify every artefact of the store at ``root``.

    Returns ``{"store", "ok", "artefacts": [ArtefactReport as dict + "ok"], "files_checked", "bytes_checked",
    "problems", "unmanifested"}``. Raises ``ValueError`` when ``root`` is not a directory.
    """
    store = Store(root)
    if not store.root.is_dir():
        raise UsageError(f"store {store.root} does not exist or is not a directory; pass --store DIR")
    reports: list[ArtefactReport] = []
    unmanifested: list[str] = []
    for kind in KINDS:
        if kind == "cache":  # hash cache: rebuilt on demand, carries no manifest by design
            continue
        base = store.kind_dir(kind)
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            refused = symlinked_artefact_problem(child)  # readers refuse it (storage.paths); so does verify
            if refused is not None:
                reports.append(ArtefactReport(kind, child.name, "refused", problems=[refused]))
            elif child.is_dir():
                reports.append(verify_artefact(kind, child))
            else:
                unmanifested.append(f"{kind}/{child.name}")
    out = {
        "store": str(store.root),
        "ok": all(r.ok for r in reports),
        "artefacts": [{**asdict(r), "ok": r.ok} for r in reports],
        "files_checked": sum(r.files_checked for r in reports),
        "bytes_checked": sum(r.bytes_checked for r in reports),
        "problems": sum(len(r.problems) for r in reports),
        "unmanifested": unmanifested,
    }
    return out
