"""Large buffers go back to the operating system as soon as they are freed.

A list page or an event replay builds answers of megabytes. glibc's malloc serves a block that large from
mmap, but after the first such block is freed it raises its threshold (up to 32 MiB on 64-bit) and serves the
next ones from the heap, which it seldom returns: the process's RSS then keeps the high-water mark of every burst
of large answers, well past the unsent-bytes budget that bounds what clients may leave unread (docs/api.md). A
fixed threshold keeps large blocks in mmap, so the RSS follows what is really held. An operator's own
``MALLOC_MMAP_THRESHOLD_`` (or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``) wins; other C
libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # <malloc.h>
LARGE_BLOCK_BYTES = 256 * 1024  # a syscall pair per block this large is nothing beside building it


def return_large_blocks(env: Mapping[str, str] = os.environ) -> bool:
    """Fix glibc's mmap threshold at LARGE_BLOCK_BYTES; whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in env.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has mallopt but not this option)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))
