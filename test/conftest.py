"""Fixtures that run the INSTALLED node (install/mace_ros/lib/mace_ros/mace_node) and talk to it.

Run through `make test` (or `pytest test/` with install/setup.bash sourced), so that `mace_ros`
is the colcon install, which alone holds the generated `mace_ros.srv` types, and the node is the
one found through the sourced AMENT_PREFIX_PATH.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SERVICE_WAIT_S = 120.0


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread, as the node runs (torch_threads): on a busy 2-core machine, OpenMP threads
    wait for CPU slices and each small op costs milliseconds (a 1000-configuration check took 4 s with
    2 threads, 40 ms with 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)  # a cold start imports torch and rclpy on a 2-core machine


@pytest.fixture(scope="session")
def ros_isolation() -> dict[str, str]:
    """DDS traffic kept on this machine and on a domain of its own, so parallel runs don't meet.

    Set in this process too: the client's rclpy context reads them when it initializes. The domain comes from
    the OS's randomness: the `random` module's state was the same in every run (some import seeds it), so every
    run met the same domain, and the nodes of any run another one left behind.
    """
    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.SystemRandom().randint(1, 101))}
    os.environ.update(isolation)
    return isolation


@pytest.fixture(scope="session")
def mace_node_arguments() -> list[str]:
    """--ros-args of the node under test (override in a conftest to test another configuration)."""
    return []


@contextmanager
def running_node(arguments: list[str], isolation: dict[str, str], log_path: Path, node_name: str = "mace") -> Iterator:
    """(MaceClient, NodeProcess) of a freshly started installed node named `node_name`; on exit the node
    must stop cleanly on SIGINT (a test may have stopped it already). It is stopped however the `with` body
    ends: a failing test must not leave a node serving its names to later runs."""
    try:
        from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable

        executable = installed_executable()
    except (ImportError, LookupError) as error:
        pytest.fail(f"{error}: build (make build) and run the tests with install/setup.bash sourced (make test)")

    with log_path.open("w") as log:
        node = NodeProcess(executable, arguments, env=isolation, log=log)
        client = MaceClient(f"{node_name}_client", server_name=node_name)
        try:
            client.wait_for_services(SERVICE_WAIT_S, alive=node)
        except (TimeoutError, RuntimeError) as error:
            client.close()
            node.stop()
            pytest.fail(f"{error}; node log:\n{log_path.read_text()}")
        try:
            yield client, node
        finally:
            client.close()
            return_code = node.stop()
    assert return_code == 0, f"mace_node exited with {return_code} on SIGINT; log:\n{log_path.read_text()}"


@pytest.fixture(scope="session")
def mace(ros_isolation, mace_node_arguments, tmp_path_factory) -> Iterator:
    """A MaceClient connected to a freshly started installed node; at teardown the node must exit cleanly on SIGINT."""
    log_path = tmp_path_factory.mktemp("mace_node") / "mace_node.log"
    with running_node(mace_node_arguments, ros_isolation, log_path) as (client, _):
        yield client


def answer(executor, send, timeout_s: float = 10.0, attempts: int = 3):
    """The result of the future that `send()` returns, spun on `executor`, sent again if no answer came in
    `timeout_s`: a node's first reply can be lost while DDS still matches the caller's reply reader to the
    service's writer (a GetParameters call right after start-up went unanswered once in a full run)."""
    for _ in range(attempts):
        future = send()
        executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if future.done():
            return future.result()
    raise AssertionError(f"no answer in {attempts} attempts of {timeout_s} s")


def ik_request(frame_id: str = "panda_link0", **fields):
    """A valid GetIK request (hand pointing down, 0.5 m in front of the robot, 0.3 m up) with `fields` changed."""
    from geometry_msgs.msg import Point

    from mace_ros.srv import GetIK

    request = GetIK.Request()
    request.goal.header.frame_id = frame_id
    request.goal.pose.position = Point(x=0.5, y=0.0, z=0.3)
    request.goal.pose.orientation.x, request.goal.pose.orientation.w = 1.0, 0.0
    for name, value in fields.items():
        setattr(request, name, value)
    return request
