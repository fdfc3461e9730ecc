"""Entry point of the installed `mace_node` executable (`ros2 run mace_ros mace_node`)."""
from __future__ import annotations

import ctypes
import os
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from mace_ros.ros.node import MaceNode

# Each request holds a thread while it waits for its engine's turn (its deadline running) and while
# it is served; with this many, a dozen waiting requests still leave threads for the topics.
EXECUTOR_THREADS = 16
# On SIGINT, requests in flight get this long to finish; then the process exits without them, so that
# it ends within 1 s: engine work cannot be interrupted from another thread, and after shutdown their
# answers could not be sent anyway.
SHUTDOWN_GRACE_S = 0.5


# glibc malloc settings (mallopt parameter numbers from malloc.h). Each executor thread allocating
# multi-MB buffers (clouds, marker arrays, their numpy copies) gets a malloc arena of its own, and
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


def main(args: list[str] | None = None) -> int:
    bound_malloc()
    node: MaceNode | None = None
    try:
        with rclpy.init(args=args):
            node = MaceNode()
            executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C / SIGINT / SIGTERM: a normal way to stop a node
    if node is not None:
        node.wait_for_requests(SHUTDOWN_GRACE_S)
        # Python would join the executor's threads at exit, and a topic callback may still be busy
        # (a 200k-point cloud's distance field takes seconds; SIGINT exit took 1.2-1.5 s): leave them.
        # rclpy is shut down by now, so nothing is lost.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
