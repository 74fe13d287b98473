"""Keep freed memory for reuse while refining (glibc), instead of mapping and zeroing it afresh.

The dense CRF allocates many large temporaries (the lattice build's sorts and keys, per-iteration
scratch). glibc serves blocks above its mmap threshold (at most 32 MiB by default) with fresh
``mmap`` calls and unmaps them when freed, so every such allocation is zero-filled again by the kernel,
one 4 KiB page fault at a time. On a 128^3 volume most blocks sit under the threshold and are reused;
on a 256^3 volume they do not, which made the cost grow faster than the volume (the page faults and
the time they cost are in ``docs/benchmarks.md``).

:func:`reuse_freed_memory` raises glibc's mmap and trim thresholds for the duration of a refinement,
then gives the freed memory back to the system (``malloc_trim``) and sets the thresholds to glibc's
dynamic ceilings (32 MiB mmap, 64 MiB trim). Elsewhere than glibc, and when the user set either
threshold through glibc's ``MALLOC_*_`` environment variables, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_MMAP = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap
_KEEP_TRIM = 2**31 - 1  # hardly ever trim the heap while refining (mallopt takes a C int)
_DEFAULT_MMAP = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_DEFAULT_TRIM = 64 << 20  # what glibc sets with the dynamic threshold at its ceiling
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_SETTINGS):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """While inside, freed large blocks stay with the process and are reused; given back after.

    Re-entrant and thread-safe: only the outermost use changes and restores the settings.

    Examples:
        >>> with reuse_freed_memory():
        ...     pass
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                libc.malloc_trim(0)
