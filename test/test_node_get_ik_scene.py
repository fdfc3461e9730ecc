"""GetIK through ROS in a cluttered scene, checked against ground truth: PyBullet's exact meshes and FK.

Obstacles reach the node the way a perception stack sends them (a MarkerArray on ~/obstacles);
every returned configuration must be collision-free for PyBullet's collision meshes and put the
hand on the goal within the requested tolerance according to PyBullet's own kinematics.
"""
from __future__ import annotations

import time

import numpy as np
import pybullet
import pybullet_data
import pytest
import torch
from geometry_msgs.msg import Point
from rclpy.qos import QoSProfile
from visualization_msgs.msg import Marker, MarkerArray

from mace_ros.core.kinematics import FINGER_OPENING_M
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.resources import scene_path
from mace_ros.core.scene import Scene
from mace_ros.srv import GetIK
from test_node_services import Latest, when_ready

BOX_SCENE = Scene.load_yaml(scene_path("box"))
# Goals inside the open box (config/scenes/box.yaml): position-only, then hand pointing down.
GOALS = [((0.5, 0.0, 0.2), None), ((0.5, 0.0, 0.18), (0.0, 1.0, 0.0, 0.0))]


def box_markers(scene: Scene) -> MarkerArray:
    markers = MarkerArray()
    for index, box in enumerate(scene.boxes):
        marker = Marker(ns="test_box", id=index, type=Marker.CUBE, action=Marker.ADD)
        marker.header.frame_id = "panda_link0"
        marker.pose.position = Point(x=float(box.center[0]), y=float(box.center[1]), z=float(box.center[2]))
        w, x, y, z = (float(v) for v in box.quaternion_wxyz)
        marker.pose.orientation.w, marker.pose.orientation.x = w, x
        marker.pose.orientation.y, marker.pose.orientation.z = y, z
        marker.scale.x, marker.scale.y, marker.scale.z = (float(2 * h) for h in box.half_extents)
        markers.markers.append(marker)
    return markers


def pybullet_hand_poses(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """panda_hand positions [K, 3] and rotations [K, 3, 3] by PyBullet's forward kinematics."""
    client = pybullet.connect(pybullet.DIRECT)
    try:
        robot = pybullet.loadURDF(pybullet_data.getDataPath() + "/franka_panda/panda.urdf", useFixedBase=True, physicsClientId=client)
        joints, links = {}, {}
        for index in range(pybullet.getNumJoints(robot, physicsClientId=client)):
            info = pybullet.getJointInfo(robot, index, physicsClientId=client)
            joints[info[1].decode()], links[info[12].decode()] = index, index
        positions, rotations = [], []
        for configuration in q:
            for j, angle in enumerate(configuration):
                pybullet.resetJointState(robot, joints[f"panda_joint{j + 1}"], float(angle), physicsClientId=client)
            for finger in ("panda_finger_joint1", "panda_finger_joint2"):
                pybullet.resetJointState(robot, joints[finger], FINGER_OPENING_M, physicsClientId=client)
            state = pybullet.getLinkState(robot, links["panda_hand"], computeForwardKinematics=True, physicsClientId=client)
            positions.append(state[4])
            rotations.append(np.array(pybullet.getMatrixFromQuaternion(state[5])).reshape(3, 3))
        return np.array(positions), np.array(rotations)
    finally:
        pybullet.disconnect(client)


@pytest.fixture
def box_obstacles(mace):
    """The box scene published as markers; removed again afterwards (the node is shared by the session)."""
    publisher = mace.node.create_publisher(MarkerArray, "/mace/obstacles", QoSProfile(depth=10))
    scene_topic = Latest(mace, MarkerArray, "/mace/scene")
    expected = len(BOX_SCENE.boxes)
    deadline = time.monotonic() + 10.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    publisher.publish(box_markers(BOX_SCENE))
    scene_topic.wait_for(lambda markers: sum(m.type == Marker.CUBE for m in markers.markers) >= expected, timeout_s=20.0)
    yield BOX_SCENE
    scene_topic.messages.clear()  # wait for a ~/scene published after the DELETEALL, not an earlier one
    publisher.publish(MarkerArray(markers=[Marker(ns="test_box", action=Marker.DELETEALL)]))
    scene_topic.wait_for(lambda markers: sum(m.type == Marker.CUBE for m in markers.markers) == 0, timeout_s=20.0)
    mace.node.destroy_publisher(publisher)


@pytest.mark.parametrize("goal_position, goal_quaternion_wxyz", GOALS)
def test_get_ik_inside_the_box_is_collision_free_for_exact_meshes(mace, box_obstacles, goal_position, goal_quaternion_wxyz):
    request = GetIK.Request()
    request.goal.header.frame_id = "panda_link0"
    request.goal.pose.position = Point(x=goal_position[0], y=goal_position[1], z=goal_position[2])
    request.position_only = goal_quaternion_wxyz is None
    if goal_quaternion_wxyz is not None:
        orientation = request.goal.pose.orientation
        orientation.w, orientation.x, orientation.y, orientation.z = goal_quaternion_wxyz
    request.num_solutions = 4
    request.tuning_iterations = -1
    request.timeout_s = 10.0
    response = when_ready(mace.get_ik, request)
    assert response.success, response.message

    q = np.array([state.position for state in response.solutions])
    assert q.shape[1] == 7
    with PyBulletCollisionChecker() as exact:
        exact_collision = exact.check(torch.as_tensor(q), box_obstacles).in_collision.numpy()
    assert not exact_collision.any(), f"exact meshes collide for solutions {np.nonzero(exact_collision)[0]}"

    positions, rotations = pybullet_hand_poses(q)
    position_errors = np.linalg.norm(positions - np.array(goal_position), axis=1)
    # PyBullet and our FK agree to < 1e-6 m; the node polishes to 1e-6 m.
    assert position_errors.max() < 1e-5, position_errors
    np.testing.assert_allclose(response.position_errors_m, position_errors, atol=2e-6)
    if goal_quaternion_wxyz is not None:
        w, x, y, z = goal_quaternion_wxyz
        goal_rotation = np.array(pybullet.getMatrixFromQuaternion((x, y, z, w))).reshape(3, 3)
        cosine = np.clip((np.einsum("kij,ij->k", rotations, goal_rotation) - 1) / 2, -1, 1)
        assert np.arccos(cosine).max() < 1e-3


def test_get_ik_lets_the_exact_check_decide_within_the_fast_checkers_padding(mace):
    """A goal whose free solutions graze the fast checker's ~1 mm padding (no obstacles): GetIK answers with
    an exactly collision-free solution instead of failing at the deadline."""
    from test_ik_engine import grazing_goal

    position, quaternion = grazing_goal()
    request = GetIK.Request()
    request.goal.header.frame_id = "panda_link0"
    request.goal.pose.position = Point(**dict(zip("xyz", position[0].tolist())))
    orientation = request.goal.pose.orientation
    orientation.w, orientation.x, orientation.y, orientation.z = quaternion[0].tolist()
    request.num_solutions = 1
    request.timeout_s = 5.0
    response = when_ready(mace.get_ik, request)
    assert response.success, response.message
    q = np.array([state.position for state in response.solutions])
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(torch.as_tensor(q), Scene()).in_collision.any()
    positions, _ = pybullet_hand_poses(q)
    assert np.linalg.norm(positions - position.numpy(), axis=1).max() < 1e-5


def test_a_marker_with_a_lifetime_leaves_the_scene_when_it_expires(mace):
    """A perception stack's marker with a lifetime (here with an uninitialized, all-zero orientation, which rviz
    draws unrotated) is an obstacle until its lifetime has passed, then leaves ~/scene with no further message."""
    publisher = mace.node.create_publisher(MarkerArray, "/mace/obstacles", QoSProfile(depth=10))
    scene_topic = Latest(mace, MarkerArray, "/mace/scene")
    center, lifetime_s = (0.3, -0.6, 0.9), 2.0

    def shows_it(markers: MarkerArray) -> bool:
        return any(m.type == Marker.SPHERE and np.allclose([m.pose.position.x, m.pose.position.y, m.pose.position.z], center)
                   for m in markers.markers)

    try:
        deadline = time.monotonic() + 10.0
        while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        marker = Marker(ns="test_lifetime", id=0, type=Marker.SPHERE, action=Marker.ADD)
        marker.header.frame_id = "panda_link0"
        marker.pose.position = Point(x=center[0], y=center[1], z=center[2])
        marker.pose.orientation.w = 0.0  # all zero
        marker.scale.x = marker.scale.y = marker.scale.z = 0.1
        marker.lifetime.sec = int(lifetime_s)
        published = time.monotonic()
        publisher.publish(MarkerArray(markers=[marker]))
        scene_topic.wait_for(shows_it, timeout_s=20.0)
        scene_topic.messages.clear()
        scene_topic.wait_for(lambda markers: not shows_it(markers), timeout_s=20.0)
        assert time.monotonic() - published >= lifetime_s - 0.1, "removed before its lifetime had passed"
    finally:
        mace.node.destroy_publisher(publisher)
