"""Process-memory readings the memory benchmarks share (``listing.py``, ``publish_memory.py``): Linux
``/proc/self/status`` fields, a fresh peak window, and giving freed heap back before a reading."""

from __future__ import annotations

import gc
import resource

import pyarrow as pa


def rss_mib(field: str) -> float:
    """``field`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM`` = peak since :func:`reset_peak`, ``RssAnon``,
    ``RssFile``, ...) in MiB on Linux; the process's peak RSS elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: ``echo 5 > /proc/self/clear_refs``); a no-op where that is missing."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5\n")
    except OSError:
        pass


def trim() -> None:
    """Give freed heap back to the OS (``gc``, Arrow's pool, glibc ``malloc_trim``) before reading RSS."""
    import ctypes

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
