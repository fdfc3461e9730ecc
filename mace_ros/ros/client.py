"""Run the installed `mace_node` as a child process and call its services from Python.

What `ros2 run mace_ros mace_node` plus `ros2 service call` would do, for the tests and the demo
(the ros2 CLI and launch are not available from PyPI).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import rclpy
from ament_index_python.packages import get_package_prefix
from rclpy.action import ActionClient
from rclpy.action.client import ClientGoalHandle
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from mace_ros.action import InferShape as InferShapeAction
from mace_ros.ros.executors import SERVICE_QOS
from mace_ros.srv import GetIK, GetIKBatch, InferShape

NODE_NAME = "mace"


def installed_executable(name: str = "mace_node") -> Path:
    """lib/mace_ros/<name> of the mace_ros install found through AMENT_PREFIX_PATH."""
    return Path(get_package_prefix("mace_ros")) / "lib" / "mace_ros" / name


class NodeProcess:
    """A node executable started with `--ros-args ...`, stopped with SIGINT like Ctrl-C."""

    def __init__(self, executable: Path, ros_arguments: list[str] | None = None,
                 env: dict[str, str] | None = None, log: TextIO | None = None) -> None:
        command = [str(executable)]
        if ros_arguments:
            command += ["--ros-args", *ros_arguments]
        self.process = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT, then wait; a node that does not exit in time is killed and gets return code -9."""
        if self.running():
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -signal.SIGKILL


def server_prefix(node_name: str = NODE_NAME, namespace: str = "") -> str:
    """Fully qualified name of the mace node, the prefix of its services and topics: '/mace', '/robot1/mace'."""
    namespace = namespace.strip("/")
    return f"/{namespace}/{node_name}" if namespace else f"/{node_name}"


class MaceClient:
    """A client of the mace node's get_ik, get_ik_batch and infer_shape services, in its own rclpy context.

    The services are `<namespace>/<server_name>/get_ik`, `.../get_ik_batch` and `.../infer_shape`
    (`/mace/...` by default, as `ros2 launch mace_ros mace.launch.py namespace:=NS` serves them under
    `/NS/mace/...`); explicit service names (e.g. after a remapping) take precedence. The InferShape
    action is named as the service unless `infer_shape_action_name` says otherwise (`-r ~/infer_shape:=X`
    moves both).
    """

    def __init__(self, node_name: str = "mace_client", server_name: str = NODE_NAME, namespace: str = "",
                 get_ik_service: str | None = None, infer_shape_service: str | None = None,
                 get_ik_batch_service: str | None = None, infer_shape_action_name: str | None = None) -> None:
        self.server = server_prefix(server_name, namespace)
        self.infer_shape_action_name = infer_shape_action_name or infer_shape_service or self.topic("infer_shape")
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node(node_name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        # As deep as the node's queues: replies to many calls in flight wait until this client spins.
        self.get_ik_client = self.node.create_client(GetIK, get_ik_service or self.topic("get_ik"), qos_profile=SERVICE_QOS)
        self.infer_shape_client = self.node.create_client(
            InferShape, infer_shape_service or self.topic("infer_shape"), qos_profile=SERVICE_QOS)
        self.get_ik_batch_client = self.node.create_client(
            GetIKBatch, get_ik_batch_service or self.topic("get_ik_batch"), qos_profile=SERVICE_QOS)

    def topic(self, name: str) -> str:
        """The server's `~/<name>` (a service or topic) as an absolute name."""
        return f"{self.server}/{name}"

    def wait_for_services(self, timeout_s: float, alive: NodeProcess | None = None) -> None:
        """Wait until both services are up; TimeoutError (or RuntimeError if `alive` exited) otherwise."""
        deadline = time.monotonic() + timeout_s
        for client in (self.get_ik_client, self.infer_shape_client):
            while not client.wait_for_service(timeout_sec=0.25):
                if alive is not None and not alive.running():
                    raise RuntimeError(f"the node exited with code {alive.process.returncode} before serving {client.srv_name}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{client.srv_name} not available after {timeout_s:.0f} s")

    def call(self, client: Any, request: Any, timeout_s: float) -> Any:
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if not future.done():
            client.remove_pending_request(future)
            raise TimeoutError(f"{client.srv_name} did not answer within {timeout_s:.0f} s")
        return future.result()

    @staticmethod
    def when_loaded(call: Callable[[Any], Any], request: Any, wait_s: float = 180.0) -> Any:
        """call(request), repeated while the answer is ENGINE_LOADING (engines load in the background at start-up)."""
        deadline = time.monotonic() + wait_s
        response = call(request)
        while response.error_code == type(response).ENGINE_LOADING and time.monotonic() < deadline:
            time.sleep(0.5)
            response = call(request)
        return response

    def get_ik(self, request: GetIK.Request, timeout_s: float = 60.0) -> GetIK.Response:
        return self.call(self.get_ik_client, request, timeout_s)

    def get_ik_batch(self, request: GetIKBatch.Request, timeout_s: float = 60.0) -> GetIKBatch.Response:
        return self.call(self.get_ik_batch_client, request, timeout_s)

    def infer_shape(self, request: InferShape.Request, timeout_s: float = 60.0) -> InferShape.Response:
        return self.call(self.infer_shape_client, request, timeout_s)

    @property
    def infer_shape_action(self) -> ActionClient:
        """A client of the `~/infer_shape` action (created on first use)."""
        if getattr(self, "_infer_shape_action", None) is None:
            self._infer_shape_action = ActionClient(
                self.node, InferShapeAction, self.infer_shape_action_name, goal_service_qos_profile=SERVICE_QOS,
                result_service_qos_profile=SERVICE_QOS, cancel_service_qos_profile=SERVICE_QOS)
        return self._infer_shape_action

    def wait_for_action_server(self, timeout_s: float) -> None:
        if not self.infer_shape_action.wait_for_server(timeout_sec=timeout_s):
            raise TimeoutError(f"action {self.infer_shape_action_name} not available after {timeout_s:.0f} s")

    def _spin_until(self, future: Any, timeout_s: float, what: str) -> Any:
        self.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if not future.done():
            raise TimeoutError(f"{what} not answered within {timeout_s:.0f} s")
        return future.result()

    def send_shape_goal(self, goal: InferShapeAction.Goal, feedback: Callable[[Any], None] | None = None,
                        timeout_s: float = 10.0) -> ClientGoalHandle:
        """Sends an InferShape action goal and waits until it is accepted; `feedback(InferShapeAction.Feedback)`
        is called while this client spins (in shape_goal_result or spin_once)."""
        callback = None if feedback is None else (lambda message: feedback(message.feedback))
        handle = self._spin_until(
            self.infer_shape_action.send_goal_async(goal, feedback_callback=callback), timeout_s, "InferShape goal")
        if not handle.accepted:
            raise RuntimeError("the InferShape goal was rejected")
        return handle

    def cancel_shape_goal(self, handle: ClientGoalHandle, timeout_s: float = 10.0) -> Any:
        """Requests the goal's cancel; the action_msgs CancelGoal response."""
        return self._spin_until(handle.cancel_goal_async(), timeout_s, "InferShape cancel")

    def shape_goal_result(self, handle: ClientGoalHandle, timeout_s: float = 60.0) -> tuple[int, InferShapeAction.Result]:
        """(the goal's final status, action_msgs GoalStatus.STATUS_*; its result)."""
        response = self._spin_until(handle.get_result_async(), timeout_s, "InferShape result")
        return response.status, response.result

    def infer_shape_goal(self, goal: InferShapeAction.Goal, feedback: Callable[[Any], None] | None = None,
                         timeout_s: float = 60.0) -> tuple[int, InferShapeAction.Result]:
        """The action's (status, result) for `goal`, feedback passed to `feedback` meanwhile."""
        return self.shape_goal_result(self.send_shape_goal(goal, feedback), timeout_s)

    def close(self) -> None:
        if getattr(self, "_infer_shape_action", None) is not None:
            self._infer_shape_action.destroy()
        self.executor.shutdown()
        self.node.destroy_node()
        self.context.try_shutdown()
