"""Process memory settings shared by the node's two processes (the serving one and its intake)."""
from __future__ import annotations

import ctypes
import os
import sys

# glibc malloc settings (mallopt parameter numbers from malloc.h). Each thread allocating multi-MB
# buffers (clouds, marker arrays, their numpy copies, fields) gets a malloc arena of its own, and
# after the first free of a large mmap'ed block glibc raises its mmap threshold (up to 32 MB), so
# later clouds come from those arenas, which fragment and never shrink: the node's RSS grew from
# 0.6 to 1.6 GB in 90 s of topic abuse (bench/reliability.py). With two arenas and a fixed 128 kB
# threshold (large blocks mmap'ed, returned to the system when freed) it stays at ~0.65 GB.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_ARENAS = 2
MALLOC_MMAP_THRESHOLD_BYTES = 128 * 1024


def bound_malloc() -> None:
    """Fixed glibc malloc arenas and mmap threshold (see above); nothing elsewhere, or where the
    user already tunes malloc through MALLOC_* environment variables."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
