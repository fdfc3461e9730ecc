"""Entry point of the installed `mace_node` executable (`ros2 run mace_ros mace_node`)."""
from __future__ import annotations

import sys

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from mace_ros.ros.node import MaceNode

# GetIK and InferShape may each hold a thread for seconds; the rest keep topics flowing.
EXECUTOR_THREADS = 4


def main(args: list[str] | None = None) -> int:
    try:
        with rclpy.init(args=args):
            node = MaceNode()
            executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass  # Ctrl-C / SIGINT / SIGTERM: a normal way to stop a node
    return 0


if __name__ == "__main__":
    sys.exit(main())
