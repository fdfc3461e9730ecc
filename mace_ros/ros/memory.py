"""Process memory settings: malloc's, shared by the node's two processes (the serving one and its
intake), and Fast DDS's for the serving process's service replies."""
from __future__ import annotations

import ctypes
import gc
import os
import sys
from pathlib import Path

# glibc malloc settings (mallopt parameter numbers from malloc.h). Each thread allocating multi-MB
# buffers (clouds, marker arrays, their numpy copies, fields) gets a malloc arena of its own, and
# after the first free of a large mmap'ed block glibc raises its mmap threshold (up to 32 MB), so
# later clouds come from those arenas, which fragment and never shrink: the node's RSS grew from
# 0.6 to 1.6 GB in 90 s of topic abuse (bench/reliability.py). With two arenas and a fixed 128 kB
# threshold (large blocks mmap'ed, returned to the system when freed) it stays at ~0.65 GB.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_ARENAS = 2
MALLOC_MMAP_THRESHOLD_BYTES = 128 * 1024
# The intake process copies every camera cloud it takes three times (Fast DDS, rmw, rclpy) and each
# mmap'ed 10 MB copy is page-faulted in afresh: half of the CPU time went to the kernel while a 30 Hz
# 640 x 480 stream ran. Blocks up to 16 MB come from its two arenas instead, whose pages are reused:
# ~1.5x the clouds applied here (30 MB 1280 x 720 copies stay mmap'ed), for 50-70 MB more RSS
# (BENCHMARKS.md, "Depth-camera streams").
INTAKE_MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024


# The intake's 30 MB copies of 1280 x 720 clouds stay above its mmap threshold, so each is mapped and its
# 7,200 4-kB pages faulted in afresh (a third of the taking thread's time in the kernel). glibc's malloc
# asks for transparent huge pages on what it maps with this tunable (glibc 2.35+; where the kernel's THP
# mode is `madvise` or `always`): 1280 x 720 clouds applied 3.2-3.7 a second instead of 2.0-2.7 (idle,
# A/B, BENCHMARKS.md "Depth-camera streams"), the intake's RSS no higher while streaming but ~40 MB higher
# and flat over a 20,000-request fuzzing run (a huge page counts whole). Tunables are read when a process
# starts, so this goes into the intake's environment (with_huge_page_malloc).
INTAKE_GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"


def with_huge_page_malloc(environment: dict[str, str]) -> dict[str, str]:
    """`environment` with INTAKE_GLIBC_TUNABLES added to GLIBC_TUNABLES, unless the user tunes malloc
    there or through MALLOC_* variables (as bound_malloc leaves such a user's settings alone)."""
    tunables = environment.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or any(name.startswith("MALLOC_") for name in environment):
        return dict(environment)
    return {**environment, "GLIBC_TUNABLES": ":".join(part for part in (tunables, INTAKE_GLIBC_TUNABLES) if part)}


def bound_malloc(mmap_threshold_bytes: int = MALLOC_MMAP_THRESHOLD_BYTES) -> None:
    """Fixed glibc malloc arenas and mmap threshold (see above); nothing elsewhere, or where the
    user already tunes malloc through MALLOC_* environment variables."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes)
    libc.mallopt(M_TRIM_THRESHOLD, mmap_threshold_bytes)


# The intake deserializes marker floods (5,000 markers: ~10^5 Python objects a message) that outlive
# hundreds of young collections at the default threshold (700 allocations) and pile up in the old
# generation: even with what it loaded frozen, its full collections took ~95 ms each, 68 in a minute of
# floods every 0.5 s. With a young collection every 100,000 allocations a message's objects die by
# reference counting first: no full collection in that minute (bench/gc_pauses.py, ad-hoc A/B; the
# serving process keeps the defaults).
INTAKE_GC_THRESHOLDS = (100_000, 20, 20)


def freeze_loaded_objects(thresholds: tuple[int, int, int] | None = None) -> None:
    """Moves every object alive now into the garbage collector's permanent generation (gc.freeze), after a
    collection. A full collection walks every tracked object with the GIL held, stalling all threads: once
    torch, rclpy and both engines are loaded that is ~330,000 objects and 165 ms on the 2-core development
    machine, and the objects marker floods leave alive set one off now and then (full collections of
    169-182 ms in the serving process, 110-168 ms in the intake, during 5,000-marker floods:
    bench/gc_pauses.py). Frozen objects are skipped by every collection, so a reference cycle among them is
    never freed: call it when what is loaded is there to stay. `thresholds` replaces the collector's
    (gc.set_threshold)."""
    gc.collect()
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)


# See the file's comment: service replies and requests whose DDS payloads are freed once delivered or taken.
REPLY_WRITER_PROFILES = "fastdds_reply_writers.xml"
# Any of these means the user configures Fast DDS (or another middleware) and keeps their settings.
USER_MIDDLEWARE_SETTINGS = (
    "FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML",
    "RMW_FASTRTPS_PUBLICATION_MODE")
FAST_DDS_RMWS = ("rmw_fastrtps_cpp", "rmw_fastrtps_dynamic_cpp")


def free_reply_buffers(config_dir: Path) -> bool:
    """Makes Fast DDS free each service reply's buffer once delivered, and each request's once taken
    (config/fastdds_reply_writers.xml): by default a reply writer or request reader keeps ~10 buffers, each
    grown to the largest sample it carried. Must run
    before rclpy.init. Only under Fast DDS (the default middleware) and where the user sets none of
    USER_MIDDLEWARE_SETTINGS; True if it applied."""
    profiles = config_dir / REPLY_WRITER_PROFILES
    if (os.environ.get("RMW_IMPLEMENTATION", FAST_DDS_RMWS[0]) not in FAST_DDS_RMWS
            or any(name in os.environ for name in USER_MIDDLEWARE_SETTINGS) or not profiles.is_file()):
        return False
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profiles)
    # Without it rmw_fastrtps overrides every writer's memory policy with its own default.
    os.environ["RMW_FASTRTPS_USE_QOS_FROM_XML"] = "1"
    return True


def without_reply_buffer_settings(environment: dict[str, str], config_dir: Path) -> dict[str, str]:
    """`environment` less what free_reply_buffers set: the intake process has no services, and otherwise
    runs Fast DDS as the user configured it."""
    if environment.get("FASTDDS_DEFAULT_PROFILES_FILE") != str(config_dir / REPLY_WRITER_PROFILES):
        return dict(environment)
    return {name: value for name, value in environment.items()
            if name not in ("FASTDDS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML")}
