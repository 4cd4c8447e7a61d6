"""Store layer: atomic writes, manifests, locks and the Parquet feature store.

A store is a directory. Each artefact directory holds data files and a ``manifest.json`` written last
(temp file + fsync + ``os.replace``); readers trust only what the manifest lists.
"""

from storage.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from storage.errors import ChecksumError, ConvlensError, LockedError, StoreError
from storage.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_manifest, write_manifest
from storage.paths import Store

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "sha256_file",
    "sha256_bytes",
    "ChecksumError",
    "ConvlensError",
    "LockedError",
    "StoreError",
    "read_manifest",
    "write_manifest",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "Store",
]
