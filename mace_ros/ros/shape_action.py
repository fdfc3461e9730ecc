"""The `~/infer_shape` action: InferShape for long inferences, with feedback while MACE tunes, and cancel.

A goal is served exactly as an InferShape service request: its fields are copied into one and
handed to the node's service path (MaceNode._serve_infer_shape), so validation, defaults, the
deadline (timeout_s from the goal's start), the engine's turn and the response are the service's.
What the action adds:
- feedback after MACE iterations, at most every FEEDBACK_PERIOD_S (each one reads the scores back
  from the engine's device, so not after every iteration);
- cancel: accepted at any time and honoured within ~0.1 s in every phase: while the goal waits for the
  engine behind other requests, while MACE tunes (after the current iteration), during the final
  sampling, selection and diversity (between chunks), without tuning; `Progress.check` raises
  InferenceCanceled there. The goal ends CANCELED with error_code CANCELED and no samples. A goal
  whose inference finished before the cancel took effect ends as it finished.
The goal ends SUCCEEDED when the result's `success` is true, ABORTED otherwise (the result's
error_code and message say why, as the service's would).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import CallbackGroup

from mace_ros.action import InferShape as InferShapeAction
from mace_ros.ros.executors import SERVICE_QOS
from mace_ros.srv import InferShape

if TYPE_CHECKING:  # torch is imported with the engines, not with the node
    import torch

# Feedback at most this often (the first iteration's always).
FEEDBACK_PERIOD_S = 0.1


class InferenceCanceled(BaseException):
    """Raised from the engine's per-iteration callback when the goal is canceled.

    A BaseException (like KeyboardInterrupt): the service path answers every Exception from the
    engine as an engine bug (FAILURE, with a traceback in the log); a cancel must pass through it.
    """


def copy_fields(source: Any, target: Any) -> Any:
    """The fields `target` shares with `source` (InferShape goal -> request, response -> result), by name."""
    shared = set(type(source).get_fields_and_field_types())
    for name in type(target).get_fields_and_field_types():
        if name in shared:
            setattr(target, name, getattr(source, name))
    return target


class Progress:
    """The engine's on_iteration callback for one goal: stops on cancel, publishes feedback."""

    def __init__(self, goal_handle: ServerGoalHandle, started: float, context_ok) -> None:
        self.goal_handle = goal_handle
        self.started = started
        self.context_ok = context_ok
        self.iterations = 0
        self._best: torch.Tensor | None = None
        self._last_feedback = float("-inf")

    def check(self) -> None:
        """Raise InferenceCanceled once the goal is canceled (the engine's and the wait's checkpoint)."""
        # Ended too: a goal answered TIMED_OUT while its engine overran frees the engine sooner.
        if self.goal_handle.is_cancel_requested or not self.goal_handle.is_active:
            raise InferenceCanceled()

    def __call__(self, iteration: int, scores: torch.Tensor) -> None:
        self.check()
        self.iterations = iteration + 1
        batch_best = scores.max()  # stays on the device until feedback is due
        self._best = batch_best if self._best is None else self._best.maximum(batch_best)
        now = time.monotonic()
        if now - self._last_feedback < FEEDBACK_PERIOD_S or not self.context_ok():
            return
        self._last_feedback = now
        self.goal_handle.publish_feedback(InferShapeAction.Feedback(
            iteration=self.iterations, best_score=float(self._best), mean_score=float(scores.mean()),
            elapsed_s=now - self.started))


class ShapeActionServer:
    """Serves `~/infer_shape` (mace_ros/action/InferShape) through `node`'s InferShape service path."""

    def __init__(self, node: Any, callback_group: CallbackGroup) -> None:
        self.node = node
        self.server = ActionServer(
            node, InferShapeAction, "~/infer_shape", execute_callback=self.execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT, cancel_callback=lambda cancel: CancelResponse.ACCEPT,
            goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
            cancel_service_qos_profile=SERVICE_QOS, callback_group=callback_group)

    def execute(self, goal_handle: ServerGoalHandle) -> InferShapeAction.Result:
        started = time.monotonic()  # timeout_s counts from here, as the service's from its callback
        request = copy_fields(goal_handle.request, InferShape.Request())
        progress = Progress(goal_handle, started, self.node.context.ok)
        result = InferShapeAction.Result()
        with self.node._in_flight():
            try:
                progress.check()  # canceled before it started
                copy_fields(
                    self.node._serve_infer_shape(request, InferShape.Response(), started, progress, progress.check), result)
            except InferenceCanceled:
                result.success = False
                result.error_code = InferShapeAction.Result.CANCELED
                result.message = f"canceled after {progress.iterations} MACE iteration(s)"
                result.tuning_iterations_done = progress.iterations
                result.elapsed_s = time.monotonic() - started
                self.node.get_logger().info(f"InferShape action: {result.message}")
                goal_handle.canceled()
                return result
        if result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result
