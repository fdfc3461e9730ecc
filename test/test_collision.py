"""Torch sphere-model collision checking against PyBullet's exact meshes and brute-force references."""
import math
import threading
from pathlib import Path

import numpy as np
import pybullet
import pybullet_data
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from mace_ros.core.collision import (
    DISABLED_COLLISION_PAIRS,
    WRIST_LINK,
    WRIST_TABLE_LINKS,
    WRIST_TABLE_PAIRS,
    PointDistanceField,
    RobotSphereModel,
    TorchCollisionChecker,
    box_signed_distance,
    checked_link_pairs,
    cylinder_signed_distance,
    sphere_signed_distance,
)
from mace_ros.core.kinematics import LINK_NAMES, PandaKinematics
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Box, Cylinder, Scene, Sphere, quaternion_wxyz_to_matrix

ROOT = Path(__file__).resolve().parents[1]
SCENE_NAMES = ["wall", "window", "box", "shelf", "table"]
MESH_DIR = Path(pybullet_data.getDataPath()) / "franka_panda" / "meshes" / "collision"
# link -> (mesh, yaw of the URDF collision origin)
LINK_MESHES = {
    "panda_link0": ("link0.obj", 0.0), "panda_link1": ("link1.obj", 0.0), "panda_link2": ("link2.obj", 0.0),
    "panda_link3": ("link3.obj", 0.0), "panda_link4": ("link4.obj", 0.0), "panda_link5": ("link5.obj", 0.0),
    "panda_link6": ("link6.obj", 0.0), "panda_link7": ("link7.obj", 0.0), "panda_hand": ("hand.obj", 0.0),
    "panda_leftfinger": ("finger.obj", 0.0), "panda_rightfinger": ("finger.obj", math.pi),
}
FALSE_FREE_LIMIT = 0.005  # DESIGN.md §6: against exact meshes, false "free" <= 0.5% of configurations


@pytest.fixture(scope="module")
def checker():
    return TorchCollisionChecker(dtype=torch.float32)


@pytest.fixture(scope="module")
def exact():
    with PyBulletCollisionChecker() as bullet:
        yield bullet


def shipped_scene(name: str) -> Scene:
    return Scene.load_yaml(ROOT / "config" / "scenes" / f"{name}.yaml")


def random_rotations(count: int, rng: np.random.Generator) -> np.ndarray:
    quaternions = rng.normal(size=(count, 4))
    return np.stack([quaternion_wxyz_to_matrix(q) for q in quaternions])


# --- the sphere model --------------------------------------------------------------------------------

@pytest.mark.parametrize("link", list(LINK_MESHES))
def test_spheres_cover_the_collision_mesh(link):
    mesh_file, yaw = LINK_MESHES[link]
    mesh = trimesh.load(MESH_DIR / mesh_file, force="mesh")
    mesh.apply_transform(trimesh.transformations.rotation_matrix(yaw, (0.0, 0.0, 1.0)))
    surface, _ = trimesh.sample.sample_surface(mesh.convex_hull, 20000, seed=7)
    points = np.concatenate([mesh.vertices, surface])
    model = RobotSphereModel.load(dtype=torch.float64)
    mine = [i for i, name in enumerate(model.link_names) if name == link]
    centers, radii = model.centers[mine].numpy(), model.radii[mine].numpy()
    depth = (radii[None] - np.linalg.norm(points[:, None] - centers[None], axis=-1)).max(1)
    # Bullet inflates meshes by 1 mm; the fit keeps 2 mm to spare, so 1 mm must hold at every sample.
    assert depth.min() >= 0.001, f"{link}: a mesh point lies {1000 * -depth.min():.2f} mm outside the spheres' 1 mm margin"


def test_sphere_count_is_moderate():
    assert 50 <= RobotSphereModel.load().radii.shape[0] <= 70


def test_self_collision_blocks_cover_exactly_the_checked_pairs():
    model = RobotSphereModel.load()
    names = model.link_names
    from_blocks = set()
    for own, partners in model.self_blocks:
        for i in range(own.start, own.stop):
            for j in range(partners.start, partners.stop):
                from_blocks.add(frozenset((i, j)))
    links = [name for name in LINK_NAMES if name in names]
    expected = {
        frozenset((i, j))
        for a, b in checked_link_pairs(links) if frozenset((a, b)) not in WRIST_TABLE_PAIRS
        for i, name_i in enumerate(names) if name_i == a
        for j, name_j in enumerate(names) if name_j == b
    }
    assert from_blocks == expected


def test_disabled_pairs_are_the_srdf_ones():
    checked = {frozenset(pair) for pair in checked_link_pairs(list(LINK_MESHES))}
    assert len(checked) == 21
    assert frozenset(("panda_link5", "panda_hand")) in checked  # the hand can fold onto link5
    assert frozenset(("panda_link6", "panda_link7")) not in checked and frozenset(("panda_link6", "panda_link7")) in DISABLED_COLLISION_PAIRS
    assert WRIST_TABLE_PAIRS <= checked


def test_wrist_table_never_overestimates_the_mesh_clearance(checker, exact):
    rng = np.random.default_rng(3)
    q6 = rng.uniform(-0.0175, 3.7525, 300)
    q7 = rng.uniform(-2.8973, 2.8973, 300)
    bound = checker.wrist_table.lower_bound(torch.tensor(q6, dtype=torch.float32), torch.tensor(q7, dtype=torch.float32)).numpy()
    wrist = exact.link_index[WRIST_LINK]
    distal = [exact.link_index[name] for name in WRIST_TABLE_LINKS]
    for angle6, angle7, lower in zip(q6, q7, bound):
        pybullet.resetJointState(exact.robot, exact.arm_joints[5], angle6, physicsClientId=exact.client)
        pybullet.resetJointState(exact.robot, exact.arm_joints[6], angle7, physicsClientId=exact.client)
        clearance = min(
            contact[8]
            for link in distal
            for contact in pybullet.getClosestPoints(exact.robot, exact.robot, 1.0, linkIndexA=wrist, linkIndexB=link, physicsClientId=exact.client)
        )
        assert lower <= min(clearance, 0.05) + 1e-5
        assert lower >= min(clearance, 0.05) - 0.004  # and it is tight: <= half a cell of Lipschitz slack


# --- torch vs exact meshes ----------------------------------------------------------------------------

def compare(checker: TorchCollisionChecker, exact: PyBulletCollisionChecker, q: torch.Tensor, scene: Scene) -> dict[str, float]:
    mine = checker.check(q, scene)
    truth = exact.check(q, scene)
    return {
        "false_free": float((~mine.in_collision & truth.in_collision).float().mean()),
        "false_collision": float((mine.in_collision & ~truth.in_collision).float().mean()),
        "self_false_free": float((~mine.self_collision & truth.self_collision).float().mean()),
        "self_false_collision": float((mine.self_collision & ~truth.self_collision).float().mean()),
    }


def test_self_collision_agrees_with_pybullet(checker, exact):
    q = PandaKinematics().random_configurations(2000, torch.Generator().manual_seed(11))
    rates = compare(checker, exact, q, Scene())
    assert rates["self_false_free"] <= FALSE_FREE_LIMIT
    # PyBullet-free configurations are free for the spheres too, up to their conservativeness.
    assert rates["self_false_collision"] <= 0.05, rates


@pytest.mark.parametrize("name", SCENE_NAMES)
def test_scene_false_free_rate_against_exact_meshes(checker, exact, name):
    scene = shipped_scene(name)
    q = PandaKinematics().random_configurations(2000, torch.Generator().manual_seed(5))
    rates = compare(checker, exact, q, scene)
    assert rates["false_free"] <= FALSE_FREE_LIMIT, rates
    assert rates["false_collision"] <= 0.08, rates


@pytest.mark.parametrize("name", SCENE_NAMES)
def test_false_free_rate_near_obstacles(checker, exact, name):
    """Configurations scattered around the goals' solutions, where obstacles are close."""
    import yaml

    goals = yaml.safe_load((ROOT / "config" / "scenes" / f"{name}.yaml").read_text())["goals"]
    solutions = torch.tensor([goal["example_q"] for goal in goals], dtype=torch.float32)
    generator = torch.Generator().manual_seed(2)
    kinematics = PandaKinematics()
    q = solutions.repeat_interleave(600 // len(goals) + 1, 0)
    q = kinematics.clamp_to_limits(q + 0.15 * torch.randn(q.shape, generator=generator))
    rates = compare(checker, exact, q, shipped_scene(name))
    assert rates["false_free"] <= FALSE_FREE_LIMIT, rates


def test_point_cloud_obstacles_against_exact(checker, exact):
    rng = np.random.default_rng(4)
    # A cloud sampled from a 30 x 60 cm plate in front of the robot, like a depth camera sees a wall.
    points = np.stack([np.full(1500, 0.45) + rng.normal(0, 0.003, 1500), rng.uniform(-0.3, 0.3, 1500), rng.uniform(0.2, 0.8, 1500)], 1)
    scene = Scene(boxes=[Box("floor", (0, 0, -0.01), (1, 0, 0, 0), (1.5, 1.5, 0.01))]).with_points(points)
    q = PandaKinematics().random_configurations(800, torch.Generator().manual_seed(8))
    rates = compare(checker, exact, q, scene)
    assert rates["false_free"] <= FALSE_FREE_LIMIT, rates
    # Every robot sphere of a configuration called free keeps clear of every point (brute force).
    free = ~checker.check(q, scene).in_collision
    centers = checker.sphere_centers(q[free])[:, checker.spheres.scene_index].double()
    radii = checker.spheres.radii[checker.spheres.scene_index].double()
    nearest = torch.cdist(centers.reshape(-1, 3), torch.as_tensor(points)).amin(-1).view(centers.shape[:2])
    assert bool((nearest >= radii).all())
    assert float((~free).float().mean()) > 0.1  # the plate does block configurations


# --- distance functions vs brute force ------------------------------------------------------------

def surface_distance(surface: np.ndarray, inside: np.ndarray, points: np.ndarray) -> np.ndarray:
    distance, _ = cKDTree(surface).query(points)
    return np.where(inside, -distance, distance)


def test_box_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    rotations = random_rotations(3, rng)
    centers = rng.uniform(-0.2, 0.2, (3, 3))
    halves = rng.uniform(0.03, 0.2, (3, 3))
    points = rng.uniform(-0.5, 0.5, (2000, 3))
    mine = box_signed_distance(torch.as_tensor(points.T), torch.as_tensor(centers), torch.as_tensor(rotations), torch.as_tensor(halves)).numpy()
    grid = np.linspace(-1, 1, 121)
    for k in range(3):
        faces = []
        for axis in range(3):
            u, v = np.meshgrid(grid, grid, indexing="ij")
            for sign in (-1.0, 1.0):
                face = np.zeros((u.size, 3))
                others = [a for a in range(3) if a != axis]
                face[:, axis] = sign
                face[:, others[0]], face[:, others[1]] = u.ravel(), v.ravel()
                faces.append(face * halves[k])
        surface = np.concatenate(faces) @ rotations[k].T + centers[k]
        local = (points - centers[k]) @ rotations[k]
        inside = (np.abs(local) < halves[k]).all(1)
        reference = surface_distance(surface, inside, points)
        spacing = 2 * halves[k].max() / 120
        assert np.abs(mine[k] - reference).max() <= spacing


def test_sphere_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    centers, radii = rng.uniform(-0.2, 0.2, (2, 3)), np.array([0.05, 0.15])
    points = rng.uniform(-0.5, 0.5, (2000, 3))
    mine = sphere_signed_distance(torch.as_tensor(points.T), torch.as_tensor(centers), torch.as_tensor(radii)).numpy()
    directions = rng.normal(size=(200000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for k in range(2):
        inside = np.linalg.norm(points - centers[k], axis=1) < radii[k]
        reference = surface_distance(centers[k] + radii[k] * directions, inside, points)
        assert np.abs(mine[k] - reference).max() <= 0.004 * radii[k] / 0.05


def test_cylinder_distance_matches_brute_force():
    rng = np.random.default_rng(2)
    rotations = random_rotations(2, rng)
    centers = rng.uniform(-0.2, 0.2, (2, 3))
    radii, halves = np.array([0.05, 0.12]), np.array([0.15, 0.04])
    points = rng.uniform(-0.5, 0.5, (2000, 3))
    mine = cylinder_signed_distance(
        torch.as_tensor(points.T), torch.as_tensor(centers), torch.as_tensor(rotations), torch.as_tensor(radii), torch.as_tensor(halves)
    ).numpy()
    angles = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    for k in range(2):
        heights = np.linspace(-halves[k], halves[k], 200)
        side = np.stack([np.repeat(radii[k] * np.cos(angles)[None], len(heights), 0).ravel(),
                         np.repeat(radii[k] * np.sin(angles)[None], len(heights), 0).ravel(),
                         np.repeat(heights[:, None], len(angles), 1).ravel()], 1)
        rings = np.linspace(0, radii[k], 100)
        disk = np.stack([np.outer(rings, np.cos(angles)).ravel(), np.outer(rings, np.sin(angles)).ravel()], 1)
        caps = [np.concatenate([disk, np.full((len(disk), 1), sign * halves[k])], 1) for sign in (-1, 1)]
        surface = np.concatenate([side, *caps]) @ rotations[k].T + centers[k]
        local = (points - centers[k]) @ rotations[k]
        inside = (np.linalg.norm(local[:, :2], axis=1) < radii[k]) & (np.abs(local[:, 2]) < halves[k])
        reference = surface_distance(surface, inside, points)
        assert np.abs(mine[k] - reference).max() <= 2 * np.pi * radii[k] / 400 + 2 * halves[k] / 199


def test_point_field_is_a_tight_lower_bound():
    rng = np.random.default_rng(3)
    cloud = rng.uniform(-0.3, 0.3, (500, 3))
    field = PointDistanceField.build(cloud, 0.01, 0.15, torch.device("cpu"), torch.float64)
    queries = rng.uniform(-0.6, 0.6, (5000, 3))
    exact_distance, _ = cKDTree(cloud).query(queries)
    bound = field.lower_bound(torch.as_tensor(queries.T)).numpy()
    assert (bound <= exact_distance + 1e-9).all()
    assert (bound >= np.minimum(exact_distance, 0.15) - 0.01 * math.sqrt(3) - 1e-9).all()
    assert np.median(np.minimum(exact_distance, 0.15) - bound) < 0.005


# --- API behaviour -----------------------------------------------------------------------------------

def all_primitives_scene() -> Scene:
    rng = np.random.default_rng(9)
    return Scene(
        boxes=[Box("floor", (0, 0, -0.01), (1, 0, 0, 0), (1.5, 1.5, 0.01)), Box("tilted", (0.5, 0.2, 0.4), (0.9, 0.1, 0.3, 0.2), (0.1, 0.05, 0.2))],
        spheres=[Sphere("ball", (0.4, -0.3, 0.5), 0.1)],
        cylinders=[Cylinder("post", (0.3, 0.4, 0.3), (0.8, 0.5, 0.0, 0.2), 0.05, 0.2)],
        points=rng.uniform([0.5, -0.2, 0.6], [0.7, 0.2, 0.9], (300, 3)),
    )


def test_float32_and_float64_agree():
    scene = all_primitives_scene()
    q = PandaKinematics(dtype=torch.float64).random_configurations(3000, torch.Generator().manual_seed(1))
    single = TorchCollisionChecker(dtype=torch.float32).check(q, scene)
    double = TorchCollisionChecker(dtype=torch.float64).check(q, scene)
    assert single.signed_distance.dtype == torch.float32 and double.signed_distance.dtype == torch.float64
    assert torch.allclose(single.signed_distance.double(), double.signed_distance, atol=1e-4)
    decisive = double.signed_distance.abs() > 1e-4
    assert bool((single.in_collision == double.in_collision)[decisive].all())
    assert float(double.in_collision.float().mean()) > 0.2  # the scene is not trivially empty


def test_batching_and_scene_reuse_do_not_change_results():
    scene = all_primitives_scene()
    q = PandaKinematics().random_configurations(1000, torch.Generator().manual_seed(2))
    whole = TorchCollisionChecker().check(q, scene)
    chunked_checker = TorchCollisionChecker(max_batch=128)
    prepared = chunked_checker.set_scene(scene)
    for result in (chunked_checker.check(q), chunked_checker.check(q, prepared), chunked_checker.check(q, scene)):
        assert torch.equal(result.in_collision, whole.in_collision)
        assert torch.allclose(result.signed_distance, whole.signed_distance)
    empty = chunked_checker.check(q[:0], scene)
    assert empty.in_collision.shape == (0,)


def test_collision_margin_pads_the_world_only():
    scene = all_primitives_scene()
    q = PandaKinematics().random_configurations(2000, torch.Generator().manual_seed(3))
    plain = TorchCollisionChecker().check(q, scene)
    padded = TorchCollisionChecker(collision_margin_m=0.05).check(q, scene)
    assert torch.equal(plain.self_collision, padded.self_collision)
    assert bool((padded.scene_collision | ~plain.scene_collision).all())  # padding only adds collisions
    assert int(padded.scene_collision.sum()) > int(plain.scene_collision.sum())
    assert torch.equal(padded.in_collision, padded.signed_distance < 0)


def test_signed_distance_gradient_matches_finite_differences():
    checker = TorchCollisionChecker(dtype=torch.float64)
    scene = all_primitives_scene()
    q = PandaKinematics(dtype=torch.float64).random_configurations(6, torch.Generator().manual_seed(4)).requires_grad_(True)
    distance = checker.signed_distance(q, scene)
    (gradient,) = torch.autograd.grad(distance.sum(), q)
    assert torch.isfinite(gradient).all()
    step = 1e-6
    with torch.no_grad():
        for joint in range(7):
            offset = torch.zeros_like(q)
            offset[:, joint] = step
            numeric = (checker.signed_distance(q + offset, scene) - checker.signed_distance(q - offset, scene)) / (2 * step)
            assert torch.allclose(gradient[:, joint], numeric, atol=1e-5)


def test_pybullet_checkers_in_threads_agree():
    scene = all_primitives_scene()
    q = PandaKinematics().random_configurations(200, torch.Generator().manual_seed(6))
    results = {}

    def run(key: int) -> None:
        with PyBulletCollisionChecker() as bullet:
            results[key] = bullet.check(q, scene).in_collision

    threads = [threading.Thread(target=run, args=(key,)) for key in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results[0], results[1])
