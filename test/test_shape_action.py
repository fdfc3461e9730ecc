"""The ~/infer_shape action through the installed node: the service's answer, feedback while MACE
tunes, and cancel."""
from __future__ import annotations

import time

import numpy as np
from action_msgs.msg import GoalStatus
from std_msgs.msg import Header

from mace_ros.action import InferShape as InferShapeAction
from mace_ros.ros.conversions import xyz_to_pointcloud2
from mace_ros.ros.shape_action import copy_fields
from mace_ros.srv import InferShape
from test_node_services import shape_request


def shape_goal(**fields) -> InferShapeAction.Goal:
    return copy_fields(shape_request(**fields), InferShapeAction.Goal())


def test_goal_and_result_carry_the_service_fields():
    """The action's goal and result are the service's request and response (the .action repeats them):
    a field added to one must be added to the other."""
    assert InferShapeAction.Goal.get_fields_and_field_types() == InferShape.Request.get_fields_and_field_types()
    assert InferShapeAction.Result.get_fields_and_field_types() == InferShape.Response.get_fields_and_field_types()
    for name in ("SUCCESS", "FAILURE", "NO_SOLUTION", "TIMED_OUT", "FRAME_TRANSFORM_FAILURE", "INVALID_REQUEST",
                 "ENGINE_LOADING", "ENGINE_UNAVAILABLE"):
        assert getattr(InferShapeAction.Result, name) == getattr(InferShape.Response, name), name


def test_action_answers_as_the_service_with_increasing_feedback(mace):
    mace.wait_for_action_server(30.0)
    # The service first: it waits for the engine to load, and gives the answer the action must match.
    service = mace.when_loaded(mace.infer_shape, shape_request(tuning_iterations=25, num_samples=8, timeout_s=60.0))
    assert service.success, service.message
    feedback = []
    status, result = mace.infer_shape_goal(
        shape_goal(tuning_iterations=25, num_samples=8, timeout_s=60.0), feedback.append, timeout_s=90.0)
    assert status == GoalStatus.STATUS_SUCCEEDED, result.message
    assert result.success and result.error_code == InferShapeAction.Result.SUCCESS, result.message
    assert result.tuning_iterations_done == 25 == service.tuning_iterations_done
    assert len(result.samples) == 8
    # Same seed, same iteration count: the same samples as the service's.
    assert list(result.scores) == list(service.scores)
    assert feedback, "no feedback"
    iterations = [message.iteration for message in feedback]
    assert iterations == sorted(set(iterations)) and 1 <= iterations[0] and iterations[-1] <= 25
    bests = [message.best_score for message in feedback]
    assert bests == sorted(bests)  # the best so far never falls
    assert all(0.0 <= m.mean_score <= m.best_score <= 1.0 for m in feedback)
    assert all(0.0 < m.elapsed_s < 90.0 for m in feedback)


def test_invalid_goal_is_refused_as_the_service_refuses_it(mace):
    mace.wait_for_action_server(30.0)
    request = shape_request(num_samples=5000)
    service = mace.infer_shape(request)
    status, result = mace.infer_shape_goal(copy_fields(request, InferShapeAction.Goal()), timeout_s=30.0)
    assert status == GoalStatus.STATUS_ABORTED
    assert not result.success and result.error_code == InferShapeAction.Result.INVALID_REQUEST
    assert result.message == service.message


def test_cancel_after_the_first_feedback_stops_promptly(mace):
    mace.wait_for_action_server(30.0)
    mace.when_loaded(mace.infer_shape, shape_request(tuning_iterations=0))
    feedback = []
    handle = mace.send_shape_goal(
        shape_goal(tuning_iterations=100_000, timeout_s=300.0), feedback.append)
    deadline = time.monotonic() + 60.0
    while not feedback and time.monotonic() < deadline:
        mace.executor.spin_once(timeout_sec=0.05)
    assert feedback, "no feedback within 60 s"
    cancel_sent = time.monotonic()
    cancel = mace.cancel_shape_goal(handle)
    assert len(cancel.goals_canceling) == 1
    status, result = mace.shape_goal_result(handle, timeout_s=30.0)
    took_s = time.monotonic() - cancel_sent
    assert status == GoalStatus.STATUS_CANCELED, result.message
    assert not result.success and result.error_code == InferShapeAction.Result.CANCELED
    assert not result.samples
    assert 1 <= result.tuning_iterations_done < 100_000
    assert took_s < 2.0, f"the canceled result took {took_s:.2f} s"
    # The engine is free again: the service answers at once.
    response = mace.infer_shape(shape_request(tuning_iterations=0, timeout_s=5.0))
    assert response.success, response.message


def spin_until(mace, done, timeout_s: float = 60.0) -> None:
    """Spin the client (feedback, responses) until done() or timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        mace.executor.spin_once(timeout_sec=0.02)


def assert_canceled_promptly(mace, handle) -> float:
    """Cancel the goal of `handle`; it must end CANCELED, without samples, within a second (ROS round trips
    included; the node looks at the cancel every ~0.05 s). The seconds it took."""
    sent = time.monotonic()
    assert len(mace.cancel_shape_goal(handle).goals_canceling) == 1
    status, result = mace.shape_goal_result(handle, timeout_s=60.0)
    took_s = time.monotonic() - sent
    assert status == GoalStatus.STATUS_CANCELED, result.message
    assert result.error_code == InferShapeAction.Result.CANCELED and not result.samples, result.message
    assert took_s < 1.0, f"the canceled result took {took_s:.2f} s: {result.message}"
    return took_s


def test_cancel_is_honoured_while_queued_while_sampling_and_without_tuning(mace):
    """Not only between MACE iterations: a goal waiting for the engine behind another one, a goal in its
    final sampling and selection (2 iterations, then 16 x 1000 draws: tens of seconds on a CPU), and a
    goal without tuning (1000 prior samples scored against a 4096-point cloud) all end CANCELED at once."""
    mace.wait_for_action_server(30.0)
    mace.when_loaded(mace.infer_shape, shape_request(tuning_iterations=0))
    running_feedback = []
    running = mace.send_shape_goal(shape_goal(tuning_iterations=100_000, timeout_s=20.0), running_feedback.append)
    spin_until(mace, lambda: running_feedback)
    assert running_feedback, "no feedback within 60 s"
    queued = mace.send_shape_goal(shape_goal(tuning_iterations=100_000, timeout_s=20.0))
    spin_until(mace, lambda: False, 0.3)  # it waits for the engine meanwhile
    assert_canceled_promptly(mace, queued)
    assert_canceled_promptly(mace, running)

    sampling_feedback = []
    sampling = mace.send_shape_goal(
        shape_goal(tuning_iterations=2, num_samples=1000, timeout_s=20.0), sampling_feedback.append)
    spin_until(mace, lambda: sampling_feedback)
    spin_until(mace, lambda: False, 0.5)  # the second iteration ends, the final draws begin
    assert_canceled_promptly(mace, sampling)

    cloud_points = np.random.default_rng(0).normal([0.5, 0.0, 0.1], 0.03, (4096, 3))
    cloud = xyz_to_pointcloud2(cloud_points, Header(frame_id="panda_link0"))
    untuned = mace.send_shape_goal(shape_goal(tuning_iterations=0, num_samples=1000, partial_cloud=cloud, timeout_s=20.0))
    spin_until(mace, lambda: False, 0.3)
    assert_canceled_promptly(mace, untuned)
    # The engine is free again: the service answers at once.
    response = mace.infer_shape(shape_request(tuning_iterations=0, timeout_s=5.0))
    assert response.success, response.message
