"""Scene primitives, YAML round trips, and the shipped scenes' goals (reachable and collision-free)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mace_ros.core.collision import TorchCollisionChecker
from mace_ros.core.kinematics import PandaKinematics, quaternion_to_matrix, rotation_angle_between
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Box, Cylinder, Scene, Sphere, load_goals

ROOT = Path(__file__).resolve().parents[1]
SCENE_NAMES = ["wall", "window", "box", "shelf", "table"]


def test_primitives_validate_and_normalize():
    box = Box("b", [0, 0, 1], [2, 0, 0, 0], [0.1, 0.2, 0.3])
    assert np.allclose(box.quaternion_wxyz, [1, 0, 0, 0])
    assert np.allclose(box.rotation, np.eye(3))
    with pytest.raises(ValueError):
        Box("b", [0, 0], [1, 0, 0, 0], [0.1, 0.1, 0.1])
    with pytest.raises(ValueError):
        Box("b", [0, 0, 0], [1, 0, 0, 0], [0.1, -0.1, 0.1])
    with pytest.raises(ValueError):
        Sphere("s", [0, 0, 0], 0.0)
    with pytest.raises(ValueError):
        Cylinder("c", [0, 0, 0], [0, 0, 0, 0], 0.1, 0.1)
    with pytest.raises(ValueError):  # absurd sizes and places (float32 distances would overflow)
        Box("b", [0, 0, 0], [1, 0, 0, 0], [0.1, 1e300, 0.1])
    with pytest.raises(ValueError):
        Sphere("s", [1e30, 0, 0], 0.1)
    with pytest.raises(ValueError):
        Cylinder("c", [0, 0, 0], [1, 0, 0, 0], 0.1, 3.4e38)
    with pytest.raises(ValueError):
        Scene(points=np.zeros((4, 2)))
    with pytest.raises(TypeError):
        Scene(boxes=[Sphere("s", [0, 0, 0], 0.1)])


def test_scene_is_an_immutable_snapshot():
    points = np.random.default_rng(0).uniform(size=(10, 3))
    scene = Scene(boxes=[Box("b", [0, 0, 0], [1, 0, 0, 0], [1, 1, 1])], points=points)
    points[0] = 100.0
    assert scene.points[0, 0] != 100.0
    with pytest.raises(ValueError):
        scene.points[0, 0] = 1.0
    assert isinstance(scene.boxes, tuple)
    assert Scene().is_empty and not scene.is_empty
    assert scene.with_points(None).points is None and scene.with_points(None).boxes == scene.boxes
    assert scene.with_points(np.zeros((0, 3))).points is None


def test_yaml_round_trip(tmp_path):
    scene = Scene(
        boxes=[Box("b", [0.1, 0.2, 0.3], [0.9, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3])],
        spheres=[Sphere("s", [0.5, 0, 0.5], 0.1)],
        cylinders=[Cylinder("c", [0.3, 0.3, 0.3], [1, 0, 0, 0], 0.05, 0.2)],
        points=np.random.default_rng(1).uniform(size=(5, 3)),
    )
    path = tmp_path / "scene.yaml"
    scene.save_yaml(path)
    loaded = Scene.load_yaml(path)
    assert np.allclose(loaded.boxes[0].quaternion_wxyz, scene.boxes[0].quaternion_wxyz)
    assert np.allclose(loaded.cylinders[0].center, scene.cylinders[0].center)
    assert loaded.spheres[0].radius == scene.spheres[0].radius
    assert np.allclose(loaded.points, scene.points)


def test_wrong_frame_is_rejected(tmp_path):
    path = tmp_path / "scene.yaml"
    path.write_text("frame: camera\nboxes: []\n")
    with pytest.raises(ValueError, match="frame"):
        Scene.load_yaml(path)


@pytest.fixture(scope="module")
def exact():
    with PyBulletCollisionChecker() as bullet:
        yield bullet


@pytest.mark.parametrize("name", SCENE_NAMES)
def test_shipped_goals_are_reachable_collision_free(name, exact):
    path = ROOT / "config" / "scenes" / f"{name}.yaml"
    scene = Scene.load_yaml(path)
    goals = load_goals(path)
    assert len(goals) >= (10 if name == "wall" else 5)  # the paper's Table 1 uses 10 wall goals
    import yaml

    data = yaml.safe_load(path.read_text())
    assert data["goal_tip_link"] == "panda_hand"
    q = torch.tensor([goal["example_q"] for goal in data["goals"]], dtype=torch.float64)
    kinematics = PandaKinematics(dtype=torch.float64)
    assert bool(kinematics.within_limits(q).all())
    position, rotation = kinematics.forward(q, "panda_hand")
    for index, goal in enumerate(goals):
        assert float((position[index] - torch.as_tensor(goal.position)).norm()) < 1e-5
        if goal.quaternion_wxyz is not None:
            goal_rotation = quaternion_to_matrix(torch.as_tensor(goal.quaternion_wxyz))
            assert float(rotation_angle_between(rotation[index: index + 1], goal_rotation[None])[0]) < 1e-4
    assert not bool(TorchCollisionChecker(dtype=torch.float64).check(q, scene).in_collision.any())
    assert not bool(exact.check(q, scene).in_collision.any())
