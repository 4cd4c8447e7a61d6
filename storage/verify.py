"""Whole-store integrity check (``convlens verify``): every manifest, every listed file's size and sha256.

A store is ``<store>/<kind>/<artefact_id>/manifest.json`` plus the data files each manifest lists (see
:mod:`storage.paths`). :func:`verify_store` reads every manifest (refusing a torn, edited or hostile one),
streams every listed file through sha256 and reports each problem with the file it concerns. It never writes.

Problems (the store is not trustworthy): a symlinked artefact directory (refused, not followed: readers
refuse it too), unreadable / self-inconsistent manifest, a listed name that escapes the artefact directory or
is a symlink, a listed file missing, of the wrong size or with the wrong sha256.
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

from storage.atomic import TMP_PREFIX, sha256_file
from storage.errors import StoreError, UsageError
from storage.locks import LOCK_NAME, read_lock
from storage.manifest import MANIFEST_NAME, read_manifest, safe_member
from storage.paths import KINDS, Store, symlinked_artefact_problem

__all__ = ["ArtefactReport", "verify_artefact", "verify_store"]

_JOURNAL = "journal.json"


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

    @property
    def ok(self) -> bool:
        return not self.problems


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
            continue
        size = path.stat().st_size
        if entry.get("bytes") is not None and int(entry["bytes"]) != size:
            rep.problems.append(f"{path}: size {size} bytes, manifest says {entry['bytes']}")
        digest = sha256_file(path)
        rep.files_checked += 1
        rep.bytes_checked += size
        if digest != entry.get("sha256"):
            rep.problems.append(f"{path}: sha256 {digest[:16]}… does not match the manifest's "
                                f"{str(entry.get('sha256'))[:16]}… (modified or corrupted)")
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
