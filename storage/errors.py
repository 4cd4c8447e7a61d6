"""Named project errors. Each message says what was wrong and what to do."""

from __future__ import annotations

__all__ = ["ConvlensError", "UsageError", "StoreError", "ChecksumError", "LockedError", "DiskFullError", "QualityGateError"]


class ConvlensError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line (exit 2), without a traceback. Any other
    exception is a bug and shows its traceback."""


class UsageError(ConvlensError, ValueError):
    """A bad argument or option: the message says what was wrong and what to do. The CLI prints it as one line
    and exits 2. (A ``ValueError`` too, so callers of the Python API can catch it as one.)"""


class StoreError(ConvlensError):
    """The store or one of its artefacts is missing, unreadable or inconsistent."""


class ChecksumError(StoreError):
    """A file's sha256 does not match the one its manifest lists."""


class LockedError(StoreError):
    """Another writer holds the artefact's lock."""


class DiskFullError(StoreError):
    """A write ran out of space (ENOSPC / EDQUOT); the temp file was removed and nothing was published."""


class QualityGateError(ConvlensError):
    """A run's output failed a quality check; nothing was published."""
