"""GetIKBatch through the installed node: many goals in one request, one exact solution each."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion
from std_msgs.msg import Header

from mace_ros.core.kinematics import LINK_INDEX, PandaKinematics, matrix_to_quaternion
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Scene
from mace_ros.srv import GetIK, GetIKBatch
from test_node_services import when_ready

_kinematics = PandaKinematics(dtype=torch.float64)


def reachable_poses(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hand poses (positions [G, 3], quaternions wxyz [G, 4]) of random self-collision-free configurations."""
    generator = torch.Generator().manual_seed(seed)
    with PyBulletCollisionChecker() as exact:
        q = _kinematics.random_configurations(4 * count, generator)
        q = q[~exact.check(q, Scene()).in_collision][:count]
    hand = _kinematics.link_transforms(q)[:, LINK_INDEX["panda_hand"]]
    return hand[:, :3, 3].numpy(), matrix_to_quaternion(hand[:, :3, :3]).numpy()


def batch_request(positions: np.ndarray, quaternions: np.ndarray, frame_id: str = "panda_link0", **fields) -> GetIKBatch.Request:
    request = GetIKBatch.Request(**{"timeout_s": 20.0, **fields})
    for position, (w, x, y, z) in zip(positions, quaternions):
        request.goals.append(PoseStamped(header=Header(frame_id=frame_id), pose=Pose(
            position=Point(x=float(position[0]), y=float(position[1]), z=float(position[2])),
            orientation=Quaternion(w=float(w), x=float(x), y=float(y), z=float(z)))))
    return request


def test_every_goal_of_a_batch_gets_an_exact_collision_free_solution(mace):
    positions, quaternions = reachable_poses(24, seed=3)
    response = when_ready(mace.get_ik_batch, batch_request(positions, quaternions))
    assert response.success and response.error_code == GetIKBatch.Response.SUCCESS, response.message
    assert response.solved == [True] * len(positions) and response.solved_count == len(positions)
    q = torch.tensor([list(state.position) for state in response.solutions], dtype=torch.float64)
    assert all(list(state.name) == [f"panda_joint{i}" for i in range(1, 8)] for state in response.solutions)
    hand = _kinematics.link_transforms(q)[:, LINK_INDEX["panda_hand"]]
    assert float((hand[:, :3, 3] - torch.as_tensor(positions)).norm(dim=-1).max()) < 1e-6
    alignment = (matrix_to_quaternion(hand[:, :3, :3]) * torch.as_tensor(quaternions)).sum(-1).abs()
    assert float(alignment.min()) > math.cos(1e-4 / 2)
    assert max(response.position_errors_m) < 1e-6
    with PyBulletCollisionChecker() as exact:
        assert not bool(exact.check(q, Scene()).in_collision.any())


def test_a_goal_without_solution_is_reported_per_goal(mace):
    positions, quaternions = reachable_poses(4, seed=5)
    # The hand inside the robot's base, pointing down: no collision-free configuration reaches it.
    positions = np.concatenate([positions[:2], [[0.0, 0.0, 0.05]], positions[2:]])
    quaternions = np.concatenate([quaternions[:2], [[0.0, 1.0, 0.0, 0.0]], quaternions[2:]])
    response = when_ready(mace.get_ik_batch, batch_request(positions, quaternions, timeout_s=2.0))
    assert not response.success and response.error_code == GetIKBatch.Response.NO_IK_SOLUTION, response.message
    assert response.solved == [True, True, False, True, True]
    assert len(response.solutions[2].position) == 0 and math.isinf(response.position_errors_m[2])
    assert response.elapsed_s <= 2.0 + 0.1


def test_a_goal_out_of_reach_is_answered_at_once_alone_and_in_a_batch(mace):
    """0.96 m from the shoulder, beyond the hand's 0.858 m: GetIK says so without waiting for its deadline,
    and a batch with it answers once the others are solved."""
    request = GetIK.Request(num_solutions=2, timeout_s=5.0, position_only=True)
    request.goal.header.frame_id = "panda_link0"
    request.goal.pose.position = Point(x=0.95, y=0.0, z=0.2)
    response = when_ready(mace.get_ik, request)
    assert response.error_code == GetIK.Response.NO_IK_SOLUTION and "out of reach" in response.message, response.message
    assert response.elapsed_s < 2.5
    positions, quaternions = reachable_poses(3, seed=11)
    positions = np.concatenate([positions, [[0.95, 0.0, 0.2]]])
    quaternions = np.concatenate([quaternions, [[1.0, 0.0, 0.0, 0.0]]])
    response = mace.get_ik_batch(batch_request(positions, quaternions, timeout_s=5.0))
    assert response.solved == [True, True, True, False], response.message
    assert response.error_code == GetIKBatch.Response.NO_IK_SOLUTION and "1 out of reach" in response.message, response.message
    assert response.elapsed_s < 2.5


def test_invalid_batches_are_refused_with_the_goal_named(mace):
    positions, quaternions = reachable_poses(3, seed=7)
    request = batch_request(positions, quaternions)
    request.goals[1].pose.position.x = math.nan
    response = when_ready(mace.get_ik_batch, request)
    assert response.error_code == GetIKBatch.Response.INVALID_GOAL and "goals[1]" in response.message, response.message
    response = mace.get_ik_batch(batch_request(positions, quaternions, frame_id="camera_nowhere"))
    assert response.error_code == GetIKBatch.Response.FRAME_TRANSFORM_FAILURE, response.message
    response = mace.get_ik_batch(GetIKBatch.Request())
    assert response.error_code == GetIKBatch.Response.INVALID_GOAL and "no goals" in response.message
    many = batch_request(np.repeat(positions[:1], 10_001, 0), np.repeat(quaternions[:1], 10_001, 0))
    response = mace.get_ik_batch(many)
    assert response.error_code == GetIKBatch.Response.INVALID_REQUEST and "too many" in response.message
    response = mace.get_ik_batch(batch_request(positions, quaternions, tip_link="panda_nose"))
    assert response.error_code == GetIKBatch.Response.INVALID_LINK_NAME, response.message


def test_a_batch_too_large_for_its_timeout_answers_in_time_with_what_is_solved(mace):
    positions, quaternions = reachable_poses(100, seed=9)
    when_ready(mace.get_ik_batch, batch_request(positions[:2], quaternions[:2]))  # the engine is loaded
    # 2000 goals in 1 s (~250 solved here). With 0.5 s, 1 of 4 runs after test_node_deadlines' modules solved none,
    # answering at 0.35 s (the same before and after the nineteenth session's changes): the first pass began late.
    request = batch_request(np.tile(positions, (20, 1)), np.tile(quaternions, (20, 1)), timeout_s=1.0)
    started = time.monotonic()
    response = mace.get_ik_batch(request)
    # The node answers within timeout_s + 0.1 s; the round trip carries 2000 results through this test
    # process, which shares the 2-core CPU with the node (0.75 s for 0.5 s seen once in a full test run).
    assert response.elapsed_s <= 1.0 + 0.1
    assert time.monotonic() - started <= 1.0 + 0.1 + 0.25
    # What was solved by the deadline comes back: passes are sized to end before it (a pass that overran it
    # used to make the node drop every result and answer TIMED_OUT).
    assert response.error_code == GetIKBatch.Response.NO_IK_SOLUTION, response.message
    assert len(response.solved) == 2000 and 0 < response.solved_count == sum(response.solved) < 2000
