"""Exact-mesh collision checking with PyBullet: the ground truth for the torch sphere model.

The robot is pybullet_data's `franka_panda/panda.urdf` (the kinematics of `kinematics.py`) with its
collision meshes, which Bullet collides as convex hulls with a 1 mm margin. The fingers are set to
the same opening as the kinematics (`FINGER_OPENING_M`). A scene's primitives become one static
body of boxes, spheres and cylinders: compound shapes of at most COMPOUND_CHILDREN primitives, the first its
base, the others links fixed to it. A point cloud is tested against the facet planes of
the same convex hulls (`TorchCollisionChecker.points_meet_links`, batched): as a body of tiny spheres
in Bullet, a 12k-point cloud took 0.1-0.2 s to build, holding the GIL, for every new camera cloud,
and Bullet's per-point checks grow with the cloud. Configurations
are checked one by one (resetJointState + fresh closest-point queries, never cached contact
manifolds, whose points can go stale after a teleport). Self-collision uses the same link pairs as
the torch backend (`collision.checked_link_pairs`), scene collision skips the base link likewise.

A compound shape holds at most COMPOUND_CHILDREN primitives: Bullet's closest-point query between the robot
and a compound shape of more children never reports a child after the 16th (PyBullet 3.2.7: a sphere
through the arm was found as child 16 of 16, missed as child 17 of 17, whatever the others; over 400
random configurations in a 384-primitive clutter the single body missed 248 of the 279 collisions, while
bodies of 8 or 16 children agreed with one body per primitive on all of 9,200 configurations in 14
clutter scenes, and this checker's one body of linked compounds on all of 2,000 in 4 more).

One DIRECT client per checker instance, so checkers in different threads or processes never share
Bullet state; call `close()` (or use `with`) to release it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pybullet
import pybullet_data
import torch

from mace_ros.core.collision import (
    BULLET_HULL_MARGIN_M, SCENE_EXCLUDED_LINKS, CollisionResult, PointDistanceField, PointGrid, TorchCollisionChecker,
    checked_link_pairs)
from mace_ros.core.kinematics import FINGER_OPENING_M, JOINT_NAMES
from mace_ros.core.scene import Box, Cylinder, Scene, Sphere

PANDA_URDF = Path(pybullet_data.getDataPath()) / "franka_panda" / "panda.urdf"
FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
# Where Bullet checked cloud points, they were spheres this small; the hull test keeps its reach.
POINT_SPHERE_RADIUS_M = 1e-4
BASE_LINK_INDEX = -1  # Bullet's index of the URDF root link (panda_link0)
RENDERER_PLUGIN = "tinyRendererPlugin"  # built into pybullet and loaded by every DIRECT client
# Scene primitives created before the client is reset to free them (~5 MB). A reset and the robot's reload
# take ~0.05 s holding the GIL: once per 200 scene changes, or per 62 changes of all of 256 markers.
MAX_SHAPES_BEFORE_RESET = 50_000
COMPOUND_CHILDREN = 16  # primitives per compound shape (see the module docstring)
# Compound shapes created before a reset: each costs ~14 kB until then (1,200 changes of a 96-primitive scene
# grew a process by 90 MB with 6 compounds per scene, 18 MB with one; ad-hoc, this CPU).
# Scene bodies created before a reset: a removed body is not freed either, and a reset's time grows with
# them (1,000 bodies of one new compound each: 75 MB, a 150 ms reset; 200: 25 ms; ad-hoc, this CPU).
# What they hold between resets stays in the process's RSS at its peak (glibc keeps the freed heap): 3,000
# GetIK requests on changing scenes levelled off at +33 MB with limits of 1,000 compounds and 200 bodies,
# at +13 MB with 250 and 50, whose resets take 15-20 ms instead of 25-50 (BENCHMARKS.md, "Scene changes
# in the exact checker").
MAX_COMPOUNDS_BEFORE_RESET = 250
MAX_BODIES_BEFORE_RESET = 50


def _xyzw(quaternion_wxyz: np.ndarray) -> list[float]:
    w, x, y, z = quaternion_wxyz
    return [x, y, z, w]


class PyBulletCollisionChecker:
    """Mesh collision checks of configurations q [B, 7] against a Scene (CPU, one configuration at a time)."""

    def __init__(self, collision_margin_m: float = 0.0, cloud_point_radius_m: float = 0.0):
        if collision_margin_m < 0 or cloud_point_radius_m < 0:
            raise ValueError(f"collision_margin_m and cloud_point_radius_m must be >= 0, got {collision_margin_m}, {cloud_point_radius_m}")
        self.collision_margin_m = float(collision_margin_m)
        self.cloud_point_radius_m = float(cloud_point_radius_m)  # cloud points are balls (TorchCollisionChecker's)
        self.client = pybullet.connect(pybullet.DIRECT)
        # A DIRECT client draws with its TinyRenderer plugin, which tessellates every collision shape created
        # into a visual mesh: 4-5 ms per compound of 16 primitives, ~50 ms for a scene change of 256 markers,
        # all of it holding the GIL. This checker never draws; without the plugin that change takes ~1 ms.
        renderer = pybullet.loadPlugin(RENDERER_PLUGIN, physicsClientId=self.client)  # the loaded one's id
        if renderer >= 0:
            pybullet.unloadPlugin(renderer, physicsClientId=self.client)
        self._load_robot()
        colliding_links = [name for name, index in self.link_index.items() if self._has_collision_shape(index)]
        self.self_pairs = [(self.link_index[a], self.link_index[b]) for a, b in checked_link_pairs(colliding_links)]
        self.scene_links = {self.link_index[name] for name in colliding_links if name not in SCENE_EXCLUDED_LINKS}
        self._scene: tuple[tuple, int | None] | None = None  # (the primitives, their body)
        self._shapes_since_reset = 0  # primitive shapes created since the client was last reset
        self._compounds_since_reset = 0  # and the compound shapes holding them
        self._bodies_since_reset = 0  # and the scene bodies
        self._compound_shapes: dict[tuple[int, ...], tuple[int, tuple]] = {}  # the scene body's: ids of the primitives -> shape
        # Clouds against the same hulls (see the module docstring), in float64 on the CPU.
        self._hull_checker = TorchCollisionChecker("cpu", torch.float64, collision_margin_m)
        self._cloud: tuple[np.ndarray, tuple, PointGrid] | None = None  # the last cloud, its digest and its cells

    def _point_grid(self, points: np.ndarray) -> PointGrid:
        """The cloud's cells, kept while it stays the same (scenes are snapshots that may copy an unchanged cloud)."""
        if self._cloud is not None and self._cloud[0] is points:
            return self._cloud[2]
        digest = PointDistanceField.points_digest(points)
        if self._cloud is None or self._cloud[1] != digest:
            self._cloud = (points, digest, PointGrid(torch.tensor(points, dtype=torch.float64)))
        else:
            self._cloud = (points, digest, self._cloud[2])
        return self._cloud[2]

    def _load_robot(self) -> None:
        """The Panda in the (empty) client, its fingers at the kinematics' opening, and its link indices."""
        # Without the visual meshes (9 MB of OBJ, unused here) a load takes ~25 ms instead of ~100 ms, all of
        # it holding the GIL: in the node a reload delayed other threads' answers by as much.
        self.robot = pybullet.loadURDF(
            str(PANDA_URDF), useFixedBase=True, flags=pybullet.URDF_IGNORE_VISUAL_SHAPES, physicsClientId=self.client)
        joint_index: dict[str, int] = {}
        self.link_index: dict[str, int] = {pybullet.getBodyInfo(self.robot, physicsClientId=self.client)[0].decode(): BASE_LINK_INDEX}
        for index in range(pybullet.getNumJoints(self.robot, physicsClientId=self.client)):
            info = pybullet.getJointInfo(self.robot, index, physicsClientId=self.client)
            joint_index[info[1].decode()] = index
            self.link_index[info[12].decode()] = index
        self.arm_joints = [joint_index[name] for name in JOINT_NAMES]
        for name in FINGER_JOINTS:
            pybullet.resetJointState(self.robot, joint_index[name], FINGER_OPENING_M, physicsClientId=self.client)

    def _has_collision_shape(self, link: int) -> bool:
        return len(pybullet.getCollisionShapeData(self.robot, link, physicsClientId=self.client)) > 0

    def __enter__(self) -> "PyBulletCollisionChecker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None and pybullet.isConnected(self.client):
            pybullet.disconnect(self.client)
        self.client = None

    def _scene_body(self, scene: Scene) -> int | None:
        """The body holding the scene's primitives (None without any), in compounds of COMPOUND_CHILDREN (rebuilt
        when they change; scenes that share them, e.g. snapshots that differ by their cloud, share the body).

        Each type's primitives are cut into compounds in order, and a compound whose primitives are the
        previous scene's (the same objects) is reused: when one marker of many moves, one compound is new."""
        primitives = (*scene.boxes, *scene.spheres, *scene.cylinders)
        if self._scene is not None and len(self._scene[0]) == len(primitives) and all(
                kept is new for kept, new in zip(self._scene[0], primitives)):
            return self._scene[1]
        if self._scene is not None and self._scene[1] is not None:
            pybullet.removeBody(self._scene[1], physicsClientId=self.client)
        if (self._shapes_since_reset > MAX_SHAPES_BEFORE_RESET or self._compounds_since_reset > MAX_COMPOUNDS_BEFORE_RESET
                or self._bodies_since_reset > MAX_BODIES_BEFORE_RESET):
            # Bullet frees a body's collision shapes only on a reset (removeCollisionShape refuses a
            # shape a removed body used): without one, every scene change leaked ~100 B per primitive.
            pybullet.resetSimulation(physicsClientId=self.client)
            self._load_robot()
            self._shapes_since_reset = self._compounds_since_reset = self._bodies_since_reset = 0
            self._compound_shapes = {}
        compounds: dict[tuple[int, ...], tuple[int, tuple]] = {}
        for of_one_type in (scene.boxes, scene.spheres, scene.cylinders):
            for start in range(0, len(of_one_type), COMPOUND_CHILDREN):
                chunk = tuple(of_one_type[start:start + COMPOUND_CHILDREN])
                key = tuple(map(id, chunk))
                compounds[key] = self._compound_shapes.get(key) or (self._compound_shape(chunk), chunk)
        self._compound_shapes = compounds  # the chunks keep their primitives, and so their ids, alive
        shapes = [shape for shape, _ in compounds.values()]
        body = None
        if shapes:
            # One body, each further compound a link fixed to its base: one closest-point query per configuration.
            identity = [0.0, 0.0, 0.0, 1.0]
            links = len(shapes) - 1
            body = pybullet.createMultiBody(
                baseMass=0.0, baseCollisionShapeIndex=shapes[0], linkMasses=[0.0] * links, linkCollisionShapeIndices=shapes[1:],
                linkVisualShapeIndices=[-1] * links, linkPositions=[[0.0, 0.0, 0.0]] * links, linkOrientations=[identity] * links,
                linkInertialFramePositions=[[0.0, 0.0, 0.0]] * links, linkInertialFrameOrientations=[identity] * links,
                linkParentIndices=[0] * links, linkJointTypes=[pybullet.JOINT_FIXED] * links, linkJointAxis=[[0.0, 0.0, 1.0]] * links,
                physicsClientId=self.client)
            self._bodies_since_reset += 1
        self._scene = (primitives, body)
        return body

    def _compound_shape(self, primitives: tuple[Box | Sphere | Cylinder, ...]) -> int:
        """One compound collision shape of at most COMPOUND_CHILDREN primitives."""
        identity = [0.0, 0.0, 0.0, 1.0]
        shape_types, radii, half_extents, lengths, orientations = [], [], [], [], []
        for primitive in primitives:
            box, cylinder = isinstance(primitive, Box), isinstance(primitive, Cylinder)
            shape_types.append(pybullet.GEOM_BOX if box else pybullet.GEOM_CYLINDER if cylinder else pybullet.GEOM_SPHERE)
            radii.append(0.0 if box else primitive.radius)
            half_extents.append(primitive.half_extents.tolist() if box else [0.0, 0.0, 0.0])
            lengths.append(2 * primitive.half_height if cylinder else 0.0)
            orientations.append(_xyzw(primitive.quaternion_wxyz) if box or cylinder else identity)
        self._shapes_since_reset += len(primitives)
        self._compounds_since_reset += 1
        return pybullet.createCollisionShapeArray(
            shapeTypes=shape_types, radii=radii, halfExtents=half_extents, lengths=lengths,
            collisionFramePositions=[primitive.center.tolist() for primitive in primitives],
            collisionFrameOrientations=orientations, physicsClientId=self.client)

    def _set_configuration(self, q: np.ndarray) -> None:
        # One call for the arm (16 us here against 78 for a resetJointState per joint).
        pybullet.resetJointStatesMultiDof(self.robot, self.arm_joints, [[float(angle)] for angle in q], physicsClientId=self.client)

    def _scene_collision(self, body: int | None) -> bool:
        if body is None:
            return False
        contacts = pybullet.getClosestPoints(self.robot, body, self.collision_margin_m, physicsClientId=self.client)
        return any(contact[3] in self.scene_links and contact[8] < self.collision_margin_m for contact in contacts)

    def _self_collision(self) -> bool:
        for link_a, link_b in self.self_pairs:
            contacts = pybullet.getClosestPoints(
                self.robot, self.robot, 0.0, linkIndexA=link_a, linkIndexB=link_b, physicsClientId=self.client
            )
            if any(contact[8] < 0.0 for contact in contacts):
                return True
        return False

    def check(self, q: torch.Tensor | np.ndarray, scene: Scene) -> CollisionResult:
        """Exact collision flags for configurations q [B, 7]; signed_distance is not computed (None)."""
        if self.client is None:
            raise RuntimeError("PyBulletCollisionChecker is closed")
        configurations = q.detach().cpu().double().numpy() if isinstance(q, torch.Tensor) else np.asarray(q, dtype=np.float64)
        body = self._scene_body(scene)
        self_collision = np.zeros(len(configurations), dtype=bool)
        scene_collision = np.zeros(len(configurations), dtype=bool)
        if scene.points is not None:
            cells = self._point_grid(scene.points)  # kept for the cloud even when nothing is checked (a scene's preparation)
            if len(configurations):
                scene_collision = self._hull_checker.points_meet_links(
                    torch.from_numpy(configurations), cells,
                    self.collision_margin_m + BULLET_HULL_MARGIN_M + POINT_SPHERE_RADIUS_M + self.cloud_point_radius_m).numpy()
        for index, configuration in enumerate(configurations):
            self._set_configuration(configuration)
            self_collision[index] = self._self_collision()
            scene_collision[index] |= self._scene_collision(body)
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        self_flags = torch.as_tensor(self_collision, device=device)
        scene_flags = torch.as_tensor(scene_collision, device=device)
        return CollisionResult(in_collision=self_flags | scene_flags, self_collision=self_flags, scene_collision=scene_flags)
