"""Keep freed CPU tensor memory in the process for the next step instead of returning it to the kernel.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB once it has adapted) with fresh
pages and unmaps them on free, so on CPU every large activation of every step is faulted in and zero-filled
by the kernel again: about 200,000 page faults per forward pass of a micro model at batch 32, a third of its
time. Raising the mmap and trim thresholds keeps those pages, and the next step reuses them. Outputs are
unchanged; the price is that the process holds on to its peak memory, as a GPU caching allocator does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the only one whose thresholds this sets), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others have no such symbol)
    except (OSError, AttributeError):
        return None
    return libc


def reuse_cpu_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let freed CPU blocks up to ``limit_bytes`` stay in the process for reuse (glibc); False where unsupported."""
    if not 0 < limit_bytes <= _INT_MAX:
        raise ValueError(
            f"reuse_cpu_memory(limit_bytes={limit_bytes}): the limit must be between 1 and {_INT_MAX} bytes "
            "(glibc's mallopt takes a C int); the default, 1 GiB, covers the activations of every model here"
        )
    libc = _glibc()
    if libc is None:
        return False
    trim = min(2 * limit_bytes, _INT_MAX)  # glibc's own ratio between the two thresholds
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
