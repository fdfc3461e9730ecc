"""GetIK through ROS answers from the seed, as MoveIt's IK does: the solution nearest the seed comes first."""
from __future__ import annotations

import numpy as np
import torch
from geometry_msgs.msg import Point
from sensor_msgs.msg import JointState

from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion
from test_node_services import ik_request, when_ready

SEED = np.array([0.1, -0.3, 0.1, -2.2, 0.1, 2.0, 0.8])
GOAL_OFFSET_M = np.array([0.03, 0.02, -0.03])


def test_get_ik_ranks_solutions_by_distance_to_the_seed(mace):
    position, rotation = PandaKinematics("cpu", torch.float64).forward(torch.as_tensor(SEED)[None])
    goal = position[0].numpy() + GOAL_OFFSET_M
    w, x, y, z = matrix_to_quaternion(rotation[0]).tolist()
    request = ik_request(num_solutions=4, tuning_iterations=-1, timeout_s=5.0)
    request.goal.pose.position = Point(x=float(goal[0]), y=float(goal[1]), z=float(goal[2]))
    orientation = request.goal.pose.orientation
    orientation.x, orientation.y, orientation.z, orientation.w = x, y, z, w
    request.seed_state = JointState(name=[f"panda_joint{i}" for i in range(1, 8)], position=SEED.tolist())
    response = when_ready(mace.get_ik, request)
    assert response.success, response.message

    distances = np.linalg.norm(np.array([state.position for state in response.solutions]) - SEED, axis=1)
    assert list(distances) == sorted(distances), distances  # ranked by Euclidean joint distance to the seed
    # A 4.7 cm move of the hand: the first answer stays near the seed instead of flipping to another mode.
    assert distances[0] < 0.3, distances
