"""Artefact manifests: the only thing a reader trusts.

A manifest is ``manifest.json`` in an artefact directory, written last and atomically. It lists every data
file with its size and sha256. File names in a manifest must be plain names inside the artefact directory;
anything else is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_json, sha256_file
from storage.errors import ChecksumError, StoreError
from storage.locks import check_if_held

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "CODE_VERSION",
    "read_manifest",
    "write_manifest",
    "file_entry",
    "safe_member",
    "manifest_digest",
    "verify_files",
    "library_versions",
    "utc_now",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

try:
    CODE_VERSION = metadata.version("convlens")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    CODE_VERSION = "0+source"

_LIBS = ("torch", "torchvision", "numpy", "pyarrow", "pillow", "faiss-cpu", "openTSNE", "scikit-learn", "prefect")


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes stored results."""
    out = {"python": platform.python_version()}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def safe_member(artefact_dir: str | os.PathLike[str], name: str) -> Path:
    """Resolve a manifest-listed file name inside ``artefact_dir``; refuse anything that escapes it
    (a path with separators or ``..``, or a symlink, which could point anywhere)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise StoreError(
            f"manifest in {artefact_dir} lists {name!r}, which is not a plain file name inside the artefact; "
            "the manifest is corrupt or hostile — delete the artefact and rebuild it"
        )
    path = Path(artefact_dir) / name
    if path.is_symlink():
        raise StoreError(
            f"{path} is a symlink (to {os.readlink(path)!r}); artefact files must be regular files inside the "
            "artefact directory — the store was tampered with: delete the artefact and rebuild it"
        )
    return path


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, compact), excluding ``manifest_sha256`` itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(json.loads(json.dumps(body, default=str)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_entry(artefact_dir: str | os.PathLike[str], name: str, **extra: Any) -> dict[str, Any]:
    """A manifest entry for a file already written in ``artefact_dir``: name, bytes, sha256 (+ extra)."""
    path = safe_member(artefact_dir, name)
    return {"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}


def write_manifest(artefact_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Publish ``manifest`` atomically. Adds schema version, code and library versions, created time.

    Where this process holds the artefact's writer lock (:func:`storage.locks.artefact_lock`), it is checked
    to still be this writer's right before the manifest is written; :class:`~storage.errors.LockedError`
    otherwise, and nothing is published.
    """
    out = dict(manifest)
    out.setdefault("schema_version", SCHEMA_VERSION)
    out.setdefault("code_version", CODE_VERSION)
    out.setdefault("library_versions", library_versions())
    out.setdefault("created", utc_now())
    for entry in out.get("files", []):
        safe_member(artefact_dir, entry["name"])
    out.pop("manifest_sha256", None)
    out["manifest_sha256"] = manifest_digest(out)
    check_if_held(artefact_dir)
    atomic_write_json(Path(artefact_dir) / MANIFEST_NAME, out)
    return out


def read_manifest(artefact_dir: str | os.PathLike[str], verify: bool = False) -> dict[str, Any]:
    """Read an artefact's manifest; with ``verify`` check every listed file's sha256.

    Raises :class:`StoreError` if there is no manifest (the artefact was never published) and
    :class:`ChecksumError` naming the file on a mismatch. A manifest carrying ``manifest_sha256`` (all written
    by :func:`write_manifest`) is checked against its own content, so an edited or torn manifest is refused.
    """
    path = Path(artefact_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise StoreError(f"no manifest in {artefact_dir}: this artefact was never published (run the stage first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"manifest {path} is not valid JSON ({exc}); delete the artefact and rebuild it") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"manifest {path} is not a JSON object; delete the artefact and rebuild it")
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {manifest.get('schema_version')}, newer than this convlens "
            f"({SCHEMA_VERSION}); upgrade convlens"
        )
    stated = manifest.get("manifest_sha256")
    if stated is not None and stated != manifest_digest(manifest):
        raise ChecksumError(
            f"checksum mismatch for {path}: its content does not match its manifest_sha256; the manifest was "
            "edited or corrupted — rebuild the artefact (`convlens verify --store ...` checks a whole store)"
        )
    for entry in manifest.get("files", []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise StoreError(f"manifest {path} has a malformed file entry {entry!r}; delete the artefact and rebuild it")
        safe_member(artefact_dir, entry["name"])
    if verify:
        verify_files(artefact_dir, manifest)
    return manifest


def verify_files(artefact_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Check size and sha256 of every file the manifest lists; raise :class:`ChecksumError` naming the first bad one."""
    for entry in manifest.get("files", []):
        path = safe_member(artefact_dir, entry["name"])
        if not path.is_file():
            raise ChecksumError(f"{path} is listed in the manifest but missing; run `convlens verify` and rebuild the artefact")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ChecksumError(
                f"checksum mismatch for {path}: manifest says sha256 {entry['sha256'][:16]}…, file has {digest[:16]}…; "
                "the file was modified or corrupted — rebuild the artefact"
            )
