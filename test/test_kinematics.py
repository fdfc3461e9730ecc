"""Forward kinematics and Jacobians against PyBullet's Panda (pybullet_data/franka_panda)."""
import numpy as np
import pybullet
import pybullet_data
import pytest
import torch

from mace_ros.core.kinematics import (
    FINGER_OPENING_M,
    LINK_INDEX,
    LINK_NAMES,
    TCP_OFFSET_M,
    PandaKinematics,
    matrix_to_quaternion,
    quaternion_to_matrix,
    reach_bound,
    rotation_angle_between,
)

CHECKED_LINKS = ["panda_link2", "panda_link4", "panda_link7", "panda_hand", "panda_leftfinger", "panda_rightfinger", "panda_grasptarget"]


@pytest.fixture(scope="module")
def bullet_panda():
    client = pybullet.connect(pybullet.DIRECT)
    robot = pybullet.loadURDF(pybullet_data.getDataPath() + "/franka_panda/panda.urdf", useFixedBase=True, physicsClientId=client)
    joints = {}
    links = {}
    for index in range(pybullet.getNumJoints(robot, physicsClientId=client)):
        info = pybullet.getJointInfo(robot, index, physicsClientId=client)
        joints[info[1].decode()] = index
        links[info[12].decode()] = index
    yield client, robot, joints, links
    pybullet.disconnect(client)


def test_forward_kinematics_matches_pybullet(bullet_panda):
    client, robot, joints, links = bullet_panda
    kinematics = PandaKinematics(dtype=torch.float64)
    q = kinematics.random_configurations(100, torch.Generator().manual_seed(3))
    frames = kinematics.link_transforms(q)
    worst = 0.0
    for b in range(q.shape[0]):
        for j in range(7):
            pybullet.resetJointState(robot, joints[f"panda_joint{j + 1}"], float(q[b, j]), physicsClientId=client)
        for finger in ("panda_finger_joint1", "panda_finger_joint2"):
            pybullet.resetJointState(robot, joints[finger], FINGER_OPENING_M, physicsClientId=client)
        for link in CHECKED_LINKS:
            state = pybullet.getLinkState(robot, links[link], computeForwardKinematics=True, physicsClientId=client)
            position = np.array(state[4])
            rotation = np.array(pybullet.getMatrixFromQuaternion(state[5])).reshape(3, 3)
            frame = frames[b, LINK_INDEX[link]].numpy()
            worst = max(worst, np.abs(position - frame[:3, 3]).max(), np.abs(rotation - frame[:3, :3]).max())
    assert worst < 1e-6


@pytest.mark.parametrize("tip_link", ["panda_hand", "panda_link7", "panda_link4", "panda_grasptarget", "panda_hand_tcp"])
def test_jacobian_matches_finite_differences(tip_link):
    kinematics = PandaKinematics(dtype=torch.float64)
    q = kinematics.random_configurations(8, torch.Generator().manual_seed(4))
    jacobian, _, rotation = kinematics.jacobian(q, tip_link)
    step = 1e-6
    for joint in range(7):
        delta = torch.zeros(7, dtype=torch.float64)
        delta[joint] = step
        plus_position, plus_rotation = kinematics.forward(q + delta, tip_link)
        minus_position, minus_rotation = kinematics.forward(q - delta, tip_link)
        linear = (plus_position - minus_position) / (2 * step)
        # Angular velocity from the skew part of dR R^T.
        d_rotation = (plus_rotation - minus_rotation) / (2 * step) @ rotation.transpose(1, 2)
        angular = torch.stack([d_rotation[:, 2, 1], d_rotation[:, 0, 2], d_rotation[:, 1, 0]], -1)
        assert torch.allclose(jacobian[:, :3, joint], linear, atol=1e-7)
        assert torch.allclose(jacobian[:, 3:, joint], angular, atol=1e-7)


def test_hand_tcp_is_franka_tcp_offset_along_the_hand_z_axis():
    """panda_hand_tcp = panda_hand + 0.1034 m along the hand's z axis, same orientation (franka_description)."""
    kinematics = PandaKinematics(dtype=torch.float64)
    q = kinematics.random_configurations(16, torch.Generator().manual_seed(5))
    hand_position, hand_rotation = kinematics.forward(q, "panda_hand")
    tcp_position, tcp_rotation = kinematics.forward(q, "panda_hand_tcp")
    assert TCP_OFFSET_M == 0.1034
    torch.testing.assert_close(tcp_position, hand_position + TCP_OFFSET_M * hand_rotation[:, :, 2], rtol=0, atol=1e-12)
    torch.testing.assert_close(tcp_rotation, hand_rotation, rtol=0, atol=0)


def test_batch_device_dtype_follow_arguments():
    kinematics = PandaKinematics(dtype=torch.float32)
    position, rotation = kinematics.forward(torch.zeros(5, 7))
    assert position.shape == (5, 3) and rotation.shape == (5, 3, 3)
    assert position.dtype == torch.float32
    q = kinematics.random_configurations(1000)
    assert bool(kinematics.within_limits(q).all())
    assert bool(kinematics.within_limits(kinematics.clamp_to_limits(q * 3)).all())


def test_quaternion_round_trip_and_angles():
    quaternion = torch.randn(500, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rotation = quaternion_to_matrix(quaternion)
    back = quaternion_to_matrix(matrix_to_quaternion(rotation))
    assert torch.allclose(rotation, back, atol=1e-12)
    # Each of the four candidate rows decides for some matrices (w, x, y or z largest); the result is
    # the input quaternion normalized with w >= 0, for any leading shape.
    dominant = torch.eye(4, dtype=torch.float64) * 3 + torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for quaternions in (quaternion, dominant, -dominant):
        expected = quaternions / quaternions.norm(dim=-1, keepdim=True)
        expected = torch.where(expected[:, :1] < 0, -expected, expected)
        assert torch.allclose(matrix_to_quaternion(quaternion_to_matrix(quaternions)), expected, atol=1e-12)
    assert torch.allclose(matrix_to_quaternion(rotation.reshape(20, 25, 3, 3)).reshape(500, 4), matrix_to_quaternion(rotation))
    assert matrix_to_quaternion(rotation[0]).shape == (4,)
    assert torch.allclose(matrix_to_quaternion(rotation.float()).double(), matrix_to_quaternion(rotation), atol=1e-6)
    # A rotation of angle a about z is a away from the identity, also near pi.
    for angle in (0.0, 1e-7, 0.5, 3.0, np.pi - 1e-6):
        half = torch.tensor(angle / 2, dtype=torch.float64)
        rz = quaternion_to_matrix(torch.stack([half.cos(), half * 0, half * 0, half.sin()])[None])
        measured = rotation_angle_between(torch.eye(3, dtype=torch.float64)[None], rz)
        assert abs(float(measured) - angle) < 1e-6


@pytest.mark.parametrize("tip_link", LINK_NAMES)
def test_no_configuration_puts_a_tip_beyond_its_reach_bound(tip_link):
    """Sound: the pose of any configuration, joint limits ignored, lies within its tip's bound (the
    position and, with the orientation, every point of the last axis); tight: as far as the
    configurations that reach farthest, within 5 mm."""
    kinematics = PandaKinematics(dtype=torch.float64)
    q = (torch.rand(100_000, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2.0 - 1.0) * torch.pi
    position, rotation = kinematics.forward(q, tip_link)
    bound = reach_bound(tip_link)
    assert float(bound.excess_m(position, None).max()) <= 1e-9
    assert float(bound.excess_m(position, rotation).max()) <= 1e-9
    farthest = float((position - bound.center).norm(dim=-1).max())
    assert float(bound.excess_m(bound.center[None] + torch.tensor([[farthest + 0.005, 0.0, 0.0]], dtype=torch.float64), None)) > 0.0


def test_an_orientation_can_put_a_position_within_reach_out_of_it():
    """The hand 0.8 m from the shoulder (within its 0.858 m reach) pointing back at the shoulder: the wrist
    would be 0.9 m out; pointing outward, the same position is reachable."""
    bound = reach_bound("panda_hand")
    position = torch.tensor([[0.8, 0.0, 0.333]], dtype=torch.float64)
    assert float(bound.excess_m(position, None)) < 0.0
    pointing_back = quaternion_to_matrix(torch.tensor([[0.7071068, 0.0, -0.7071068, 0.0]], dtype=torch.float64))
    pointing_out = quaternion_to_matrix(torch.tensor([[0.7071068, 0.0, 0.7071068, 0.0]], dtype=torch.float64))
    assert float(bound.excess_m(position, pointing_back)) > 0.05
    assert float(bound.excess_m(position, pointing_out)) < 0.0
