"""Entry point of the installed `mace_node` executable (`ros2 run mace_ros mace_node`)."""
from __future__ import annotations

import os
import sys

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException

from mace_ros.core.resources import config_dir
from mace_ros.ros.executors import MultiThreadedExecutor
from mace_ros.ros.memory import bound_malloc, free_reply_buffers
from mace_ros.ros.node import MaceNode
from mace_ros.ros.parameters import InvalidParameterError

# Each request holds a thread while it waits for its engine's turn (its deadline running) and while
# it is served; with this many, a dozen waiting requests still leave threads for the topics.
EXECUTOR_THREADS = 16
# On SIGINT, requests in flight get this long to finish; then the process exits without them, so that
# it ends within 1 s: engine work cannot be interrupted from another thread, and after shutdown their
# answers could not be sent anyway.
SHUTDOWN_GRACE_S = 0.5


def main(args: list[str] | None = None) -> int:
    bound_malloc()
    free_reply_buffers(config_dir())
    node: MaceNode | None = None
    # rclpy.init and try_shutdown rather than `with rclpy.init(...)`: the context manager is Kilted's, and on
    # Jazzy's rclpy init returns None (the node could not start there).
    rclpy.init(args=args)
    try:
        try:
            node = MaceNode()
        except (ParameterException, InvalidParameterError) as error:
            # A wrong parameter (type, range, value) is the user's to fix: say which, without a traceback.
            print(f"mace_node: cannot start: {error}", file=sys.stderr)
            return 1
        except Exception:
            if rclpy.ok():
                raise
            # SIGINT or SIGTERM while the node was being built: rclpy's context went first, and the build
            # failed on it (RCLError). A stop, not a crash (see the end).
            raise ExternalShutdownException() from None
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C / SIGINT / SIGTERM: a normal way to stop a node
    finally:
        rclpy.try_shutdown()
    if node is not None:
        node.wait_for_requests(SHUTDOWN_GRACE_S)
        # Fast DDS removes the participant's shared-memory files (/dev/shm/fastdds_*) only once the
        # node's entities are gone: each run left ~1 MB there without this. Entities a callback still
        # uses are destroyed when it returns, if the process is still there.
        node.destroy_node()
    # Without a node, stopped while it was being built: threads it had started (engine loaders, the intake's)
    # still run, and the interpreter's exit aborted on them (SIGABRT). With one, Python would join the
    # executor's threads at exit, and a topic callback may still be busy (a 200k-point cloud's distance field
    # takes seconds; SIGINT exit took 1.2-1.5 s): leave them. rclpy is shut down by now, so nothing is lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
