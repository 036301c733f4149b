"""Handing memory the allocator keeps but nothing uses back to the operating system.

glibc's malloc serves a large block from its own heap once a block of that size was freed
(its mmap threshold rises to it), and a heap with live blocks above a hole cannot shrink: after
a pass that replaces every weight of a model (quantize), the old weights' memory stayed in the
process, counted in its resident size, as holes between the new ones. ``malloc_trim`` returns
those holes' pages. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already has
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (cheap: call it after a phase that freed much)."""
    trim = _trim()
    if trim is not None:
        trim(0)
