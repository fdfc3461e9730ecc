"""Batched collision checking of Panda configurations: the backend protocol and the torch backend.

The torch backend models the robot as spheres rigidly attached to its links (fitted to PyBullet's
collision meshes by `scripts/fit_robot_spheres.py`, so that the sphere union contains every mesh:
a configuration the spheres call free is free for the meshes too, up to the fit's sampling). The
obstacles are exact: signed distances of sphere centres to oriented boxes, spheres and capped
cylinders are closed-form; a point cloud becomes a distance field whose lookups are rigorous lower
bounds of the distance to the nearest point (see `PointDistanceField`). One call checks a whole
batch of configurations with tensor operations on the checker's device and dtype.

Self-collision checks every pair of links that the Panda SRDF of franka_description /
moveit_resources (`panda.srdf`) does not disable: adjacent links, the hand and its fingers, and
pairs that can never touch within the joint limits. Spheres test all of them except panda_link5
against the links after joint 6, which usually keep only ~2 cm apart (less than the spheres' bloat)
and whose relative pose depends on (q6, q7) alone: their exact mesh clearance comes from a table
over (q6, q7) built with PyBullet (`WristClearanceTable`). The base link `panda_link0` is bolted to its
support and cannot move, so it is left out of scene checks (a floor, table or mounting plate touching
it would otherwise put every configuration in collision); it stays in self-collision checks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from safetensors import safe_open
from scipy.spatial import cKDTree

from mace_ros.core.kinematics import LINK_INDEX, LINK_NAMES, PandaKinematics
from mace_ros.core.scene import Scene

SPHERES_PATH = Path(__file__).resolve().parent / "data" / "panda_spheres.yaml"
WRIST_TABLE_PATH = Path(__file__).resolve().parent / "data" / "panda_wrist_clearance.safetensors"

# Link pairs never checked against each other: moveit_resources panda_moveit_config/config/panda.srdf
# (generated from franka_description's panda_arm_hand.srdf.xacro). panda_link8 carries no geometry.
DISABLED_COLLISION_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(pair)
    for pair in (
        ("panda_link0", "panda_link1"), ("panda_link0", "panda_link2"), ("panda_link0", "panda_link3"),
        ("panda_link0", "panda_link4"), ("panda_link1", "panda_link2"), ("panda_link1", "panda_link3"),
        ("panda_link1", "panda_link4"), ("panda_link2", "panda_link3"), ("panda_link2", "panda_link4"),
        ("panda_link2", "panda_link6"), ("panda_link3", "panda_link4"), ("panda_link3", "panda_link5"),
        ("panda_link3", "panda_link6"), ("panda_link3", "panda_link7"), ("panda_link4", "panda_link5"),
        ("panda_link4", "panda_link6"), ("panda_link4", "panda_link7"), ("panda_link5", "panda_link6"),
        ("panda_link6", "panda_link7"),
        ("panda_hand", "panda_leftfinger"), ("panda_hand", "panda_rightfinger"),
        ("panda_leftfinger", "panda_rightfinger"),
        ("panda_hand", "panda_link3"), ("panda_hand", "panda_link4"), ("panda_hand", "panda_link6"),
        ("panda_hand", "panda_link7"),
        ("panda_leftfinger", "panda_link3"), ("panda_leftfinger", "panda_link4"),
        ("panda_leftfinger", "panda_link6"), ("panda_leftfinger", "panda_link7"),
        ("panda_rightfinger", "panda_link3"), ("panda_rightfinger", "panda_link4"),
        ("panda_rightfinger", "panda_link6"), ("panda_rightfinger", "panda_link7"),
    )
)

# The base cannot move: obstacles touching it say nothing about a configuration (see module docstring).
SCENE_EXCLUDED_LINKS: frozenset[str] = frozenset({"panda_link0"})

# Checked pairs whose relative pose depends on (q6, q7) only: the torch backend looks their exact mesh
# clearance up in a table (`WristClearanceTable`) instead of testing spheres, which bloat more than
# the ~2 cm these links usually keep between them.
WRIST_LINK = "panda_link5"
WRIST_TABLE_LINKS: tuple[str, ...] = ("panda_link7", "panda_hand", "panda_leftfinger", "panda_rightfinger")
WRIST_TABLE_PAIRS: frozenset[frozenset[str]] = frozenset(frozenset((WRIST_LINK, link)) for link in WRIST_TABLE_LINKS)


def checked_link_pairs(link_names: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Pairs of the given links (in their order) that self-collision checking must test."""
    return [
        (a, b)
        for i, a in enumerate(link_names)
        for b in link_names[i + 1:]
        if frozenset((a, b)) not in DISABLED_COLLISION_PAIRS
    ]


@dataclass(frozen=True)
class CollisionResult:
    """Per configuration [B]: collision flags and, where the backend computes it, the clearance (m)."""

    in_collision: torch.Tensor  # bool: self or scene
    self_collision: torch.Tensor  # bool
    scene_collision: torch.Tensor  # bool (closer than the collision margin to an obstacle)
    signed_distance: torch.Tensor | None = None  # min(scene clearance - margin, self clearance); < 0 iff in_collision


class CollisionBackend(Protocol):
    """What the IK domain needs from a collision checker; an IsaacGym/Isaac Lab backend fits here too."""

    def check(self, q: torch.Tensor, scene: Scene) -> CollisionResult:
        """Check configurations q [B, 7] (joint order panda_joint1..7, fingers open) against a scene."""
        ...


# --- planar tensor helpers --------------------------------------------------------------------------
# Geometry runs "coordinates first": points are [3, N] planes and distances [K, N], so every operation
# is elementwise on contiguous planes and every reduction runs over a leading axis. On CPU this is
# ~10x faster than [N, K, 3] with reductions over the trailing size-3 axis; on GPU it is as fast.

# Squared lengths are clamped here before the square root: the gradient of sqrt at 0 is infinite,
# and the clamp (1e-10 m of error at exact contact) keeps gradients finite without a branch.
_SQUARED_FLOOR = 1e-20


def _length(*components: torch.Tensor) -> torch.Tensor:
    squared = components[0] * components[0]
    for component in components[1:]:
        squared = squared + component * component
    return squared.clamp_min(_SQUARED_FLOOR).sqrt()


def _box_like_distance(excess: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Signed distance from per-axis excesses over a convex extent (|local| - half size): exact for boxes/cylinders."""
    outside = _length(*(e.clamp_min(0.0) for e in excess))
    largest = excess[0]
    for e in excess[1:]:
        largest = torch.maximum(largest, e)
    return outside + largest.clamp_max(0.0)


def _to_local(points: torch.Tensor, center: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Points [3, N] in the frames of K posed primitives -> [3, K, N] (one GEMM for all of them)."""
    # Row (axis i, primitive k) of `axes` is primitive k's local axis i in the base frame.
    axes = rotation.permute(2, 0, 1).reshape(-1, 3)  # [3K, 3]
    offsets = (axes * center.repeat(3, 1)).sum(-1, keepdim=True)  # [3K, 1]: axis . centre
    return (axes @ points - offsets).view(3, center.shape[0], points.shape[1])


def box_signed_distance(points: torch.Tensor, center: torch.Tensor, rotation: torch.Tensor, half_extents: torch.Tensor) -> torch.Tensor:
    """Exact signed distance [K, N] of points [3, N] to K oriented boxes (centre [K, 3], base-from-box rotation [K, 3, 3], half extents [K, 3])."""
    local = _to_local(points, center, rotation)
    return _box_like_distance(tuple(local[i].abs() - half_extents[:, i, None] for i in range(3)))


def sphere_signed_distance(points: torch.Tensor, center: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Exact signed distance [K, N] of points [3, N] to K spheres (centre [K, 3], radius [K])."""
    return _length(*(points[i] - center[:, i, None] for i in range(3))) - radius[:, None]


def cylinder_signed_distance(
    points: torch.Tensor, center: torch.Tensor, rotation: torch.Tensor, radius: torch.Tensor, half_height: torch.Tensor
) -> torch.Tensor:
    """Exact signed distance [K, N] of points [3, N] to K capped cylinders around their local z axes."""
    local = _to_local(points, center, rotation)
    radial = _length(local[0], local[1]) - radius[:, None]
    axial = local[2].abs() - half_height[:, None]
    return _box_like_distance((radial, axial))


# --- the robot as spheres -----------------------------------------------------------------------

@dataclass(frozen=True)
class RobotSphereModel:
    """Spheres attached to links (S spheres, grouped by link in kinematic order) and the self-collision blocks.

    Self-collision is tested block by block: a block is two contiguous sphere ranges whose links
    must all be tested against each other (e.g. the spheres of panda_link0..1 against those of
    panda_link5..rightfinger). Slices are views, so no [3, Q, B] gather of sphere pairs is needed.
    """

    link_index: torch.Tensor  # [S] long, index into LINK_NAMES (and into link_transforms' output)
    centers: torch.Tensor  # [S, 3] in the link frame
    radii: torch.Tensor  # [S]
    scene_index: torch.Tensor  # [S'] long: the spheres checked against the scene (not SCENE_EXCLUDED_LINKS')
    self_blocks: tuple[tuple[slice, slice], ...]  # sphere ranges tested against each other

    @staticmethod
    def load(path: Path = SPHERES_PATH, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "RobotSphereModel":
        data = yaml.safe_load(Path(path).read_text())
        unknown = set(data) - set(LINK_NAMES)
        if unknown:
            raise ValueError(f"{path}: unknown link(s) {sorted(unknown)}")
        links = [name for name in LINK_NAMES if data.get(name)]  # kinematic order
        link_of_sphere: list[str] = []
        spheres: list[list[float]] = []
        for name in links:
            for sphere in data[name]:
                if len(sphere) != 4 or sphere[3] <= 0:
                    raise ValueError(f"{path}: {name} sphere {sphere} is not [x, y, z, r>0]")
                link_of_sphere.append(name)
                spheres.append(sphere)
        table = torch.tensor(spheres, dtype=torch.float64)
        return RobotSphereModel(
            link_index=torch.tensor([LINK_INDEX[name] for name in link_of_sphere], device=device),
            centers=table[:, :3].to(device=device, dtype=dtype),
            radii=table[:, 3].to(device=device, dtype=dtype),
            scene_index=torch.tensor([i for i, name in enumerate(link_of_sphere) if name not in SCENE_EXCLUDED_LINKS], device=device),
            self_blocks=_self_collision_blocks(links, link_of_sphere),
        )

    @property
    def link_names(self) -> list[str]:
        """The link of each sphere."""
        return [LINK_NAMES[index] for index in self.link_index.tolist()]

    def world_centers(self, link_frames: torch.Tensor) -> torch.Tensor:
        """Sphere centres in the base frame, planar [3, S, B], from link poses [B, L, 4, 4]."""
        rows = link_frames[:, :, :3, :].permute(2, 3, 1, 0).contiguous()  # [3, 4, L, B]
        rows = rows.index_select(2, self.link_index)  # [3, 4, S, B]: copies of contiguous B-rows
        homogeneous = torch.cat([self.centers, torch.ones_like(self.centers[:, :1])], 1)  # [S, 4]
        return (rows * homogeneous.T[None, :, :, None]).sum(1)


def _contiguous_runs(indices: list[int]) -> list[slice]:
    """Sorted integers -> the slices of their maximal runs of consecutive values."""
    runs: list[slice] = []
    for index in indices:
        if runs and runs[-1].stop == index:
            runs[-1] = slice(runs[-1].start, index + 1)
        else:
            runs.append(slice(index, index + 1))
    return runs


def _self_collision_blocks(links: list[str], link_of_sphere: list[str]) -> tuple[tuple[slice, slice], ...]:
    """Pairs of sphere ranges covering exactly the sphere pairs of the checked link pairs (minus the wrist table's)."""
    pairs = {frozenset(pair) for pair in checked_link_pairs(links) if frozenset(pair) not in WRIST_TABLE_PAIRS}
    spheres_of = {name: [i for i, link in enumerate(link_of_sphere) if link == name] for name in links}
    # Partners of each link that come after it, as sphere ranges; links with equal partners merge.
    rows: list[tuple[list[int], tuple[tuple[int, int], ...]]] = []
    for position, name in enumerate(links):
        partners = [i for other in links[position + 1:] if frozenset((name, other)) in pairs for i in spheres_of[other]]
        runs = tuple((run.start, run.stop) for run in _contiguous_runs(partners))
        if rows and rows[-1][1] == runs and rows[-1][0][-1] + 1 == spheres_of[name][0]:
            rows[-1][0].extend(spheres_of[name])
        else:
            rows.append((list(spheres_of[name]), runs))
    return tuple((slice(own[0], own[-1] + 1), slice(start, stop)) for own, runs in rows for start, stop in runs)


@dataclass(frozen=True)
class WristClearanceTable:
    """Exact mesh clearance between panda_link5 and the links after joint 6, tabulated over (q6, q7).

    Built by `scripts/build_wrist_clearance.py` from PyBullet's meshes. Lookups are bilinear minus a
    Lipschitz slack: the clearance changes by at most L6 |dq6| + L7 |dq7| (L = the farthest any
    distal point lies from the joint's axis), so the value at q is at least every grid node's value
    minus that bound, and the weighted sum of those bounds is what `lower_bound` returns.
    """

    clearance_m: torch.Tensor  # [n6, n7] at evenly spaced nodes spanning the joint ranges
    q6_range: tuple[float, float]
    q7_range: tuple[float, float]
    lipschitz_m_per_rad: tuple[float, float]

    @staticmethod
    def load(path: Path = WRIST_TABLE_PATH, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "WristClearanceTable":
        with safe_open(str(path), framework="pt") as table:
            metadata = table.metadata()
            clearance = table.get_tensor("clearance_m")
        return WristClearanceTable(
            clearance_m=clearance.to(device=device, dtype=dtype),
            q6_range=tuple(json.loads(metadata["q6_range"])),
            q7_range=tuple(json.loads(metadata["q7_range"])),
            lipschitz_m_per_rad=tuple(json.loads(metadata["lipschitz_m_per_rad"])),
        )

    def lower_bound(self, q6: torch.Tensor, q7: torch.Tensor) -> torch.Tensor:
        """[B] lower bounds of the wrist clearance; joint values are clamped into the table's ranges."""
        size6, size7 = self.clearance_m.shape
        step6 = (self.q6_range[1] - self.q6_range[0]) / (size6 - 1)
        step7 = (self.q7_range[1] - self.q7_range[0]) / (size7 - 1)
        scaled6 = ((q6 - self.q6_range[0]) / step6).clamp(0.0, size6 - 1.0)
        scaled7 = ((q7 - self.q7_range[0]) / step7).clamp(0.0, size7 - 1.0)
        cell6 = scaled6.detach().floor().long().clamp_max(size6 - 2)
        cell7 = scaled7.detach().floor().long().clamp_max(size7 - 2)
        fraction6, fraction7 = scaled6 - cell6, scaled7 - cell7
        # Metres of possible motion per unit of grid fraction, along each axis.
        reach6 = self.lipschitz_m_per_rad[0] * step6
        reach7 = self.lipschitz_m_per_rad[1] * step7
        bound = torch.zeros_like(scaled6)
        for corner6 in (0, 1):
            weight6 = fraction6 if corner6 else 1.0 - fraction6
            for corner7 in (0, 1):
                weight7 = fraction7 if corner7 else 1.0 - fraction7
                value = self.clearance_m[cell6 + corner6, cell7 + corner7]
                slack = reach6 * (fraction6 - corner6).abs() + reach7 * (fraction7 - corner7).abs()
                bound = bound + weight6 * weight7 * (value - slack)
        return bound


# --- obstacles -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointDistanceField:
    """Distance to a point cloud, sampled on a regular grid, with conservative trilinear lookups.

    Why a grid and not nearest-point search per query: a camera cloud has 10^4-10^5 points and a
    batch of 4096 configurations has ~2.5x10^5 sphere centres, so brute-force distances cost
    ~10^10 operations per check, while a grid lookup costs the same for any cloud size. The grid
    nodes hold the exact distance D to the nearest cloud point (cKDTree, truncated at
    `truncation_m`). Because D is 1-Lipschitz, D(x) >= D(c_i) - |x - c_i| for every corner c_i of
    x's cell, so the trilinear blend f(x) = sum_i w_i D(c_i) satisfies D(x) >= f(x) - sum_i w_i |x - c_i|
    >= f(x) - h sqrt(sum_axes f_a (1 - f_a)) (Jensen; h the resolution, f_a the position in the
    cell), which `lower_bound` returns: exact at the nodes, never above D, at most 1.73 h below it
    (17 mm at 1 cm, worst case; a few mm typically). Outside the grid (the cloud's bounding box
    padded by the truncation distance) D >= truncation_m holds and is returned.
    """

    origin: torch.Tensor  # [3] position of node (0, 0, 0)
    resolution_m: float
    values: torch.Tensor  # [nx, ny, nz] truncated distances at the nodes
    truncation_m: float

    @staticmethod
    def build(points: np.ndarray, resolution_m: float, truncation_m: float, device: torch.device, dtype: torch.dtype) -> "PointDistanceField":
        pad = truncation_m + resolution_m
        low = points.min(0) - pad
        shape = np.ceil((points.max(0) + pad - low) / resolution_m).astype(int) + 1
        axes = [low[d] + resolution_m * np.arange(shape[d]) for d in range(3)]
        nodes = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        distances, _ = cKDTree(points).query(nodes, distance_upper_bound=truncation_m, workers=-1)
        values = np.minimum(distances, truncation_m).reshape(*shape)
        return PointDistanceField(
            origin=torch.as_tensor(low, dtype=dtype, device=device),
            resolution_m=float(resolution_m),
            values=torch.as_tensor(values, dtype=dtype, device=device),
            truncation_m=float(truncation_m),
        )

    def lower_bound(self, points: torch.Tensor) -> torch.Tensor:
        """Lower bounds [N] of the distance from points [3, N] to the cloud (capped at truncation_m)."""
        sizes = self.values.shape
        scaled = (points - self.origin[:, None]) / self.resolution_m  # [3, N] in grid units
        upper = torch.tensor([size - 1.0 for size in sizes], dtype=scaled.dtype, device=scaled.device)[:, None]
        inside = ((scaled >= 0) & (scaled <= upper)).all(0)
        # Trilinear interpolation by grid_sample (align_corners: -1 and +1 are the first and last
        # node; its coordinate order is (W, H, D) = (z, y, x) of this grid).
        normalized = (2.0 * scaled / upper - 1.0).flip(0).T.reshape(1, 1, 1, -1, 3)
        interpolated = torch.nn.functional.grid_sample(
            self.values[None, None], normalized, mode="bilinear", padding_mode="border", align_corners=True
        ).reshape(-1)
        fraction = scaled - scaled.detach().floor()
        # sum_i w_i |x - c_i| <= sqrt(sum_i w_i |x - c_i|^2) = h sqrt(sum_axes f (1 - f)) (Jensen).
        slack = self.resolution_m * (fraction * (1.0 - fraction)).sum(0).clamp_min(_SQUARED_FLOOR).sqrt()
        bound = interpolated - slack
        return torch.where(inside, bound, torch.full_like(bound, self.truncation_m))


@dataclass(frozen=True)
class TensorScene:
    """A Scene as tensors on one device/dtype, ready for batched distance queries."""

    box_center: torch.Tensor  # [Kb, 3]
    box_rotation: torch.Tensor  # [Kb, 3, 3] base from box
    box_half_extents: torch.Tensor  # [Kb, 3]
    sphere_center: torch.Tensor  # [Ks, 3]
    sphere_radius: torch.Tensor  # [Ks]
    cylinder_center: torch.Tensor  # [Kc, 3]
    cylinder_rotation: torch.Tensor  # [Kc, 3, 3]
    cylinder_radius: torch.Tensor  # [Kc]
    cylinder_half_height: torch.Tensor  # [Kc]
    point_field: PointDistanceField | None

    @staticmethod
    def from_scene(scene: Scene, device: torch.device, dtype: torch.dtype, point_resolution_m: float, point_truncation_m: float) -> "TensorScene":
        def tensor(rows: list, width: tuple[int, ...]) -> torch.Tensor:
            array = np.asarray(rows, dtype=np.float64).reshape(len(rows), *width)
            return torch.as_tensor(array, dtype=dtype, device=device)

        return TensorScene(
            box_center=tensor([b.center for b in scene.boxes], (3,)),
            box_rotation=tensor([b.rotation for b in scene.boxes], (3, 3)),
            box_half_extents=tensor([b.half_extents for b in scene.boxes], (3,)),
            sphere_center=tensor([s.center for s in scene.spheres], (3,)),
            sphere_radius=tensor([s.radius for s in scene.spheres], ()),
            cylinder_center=tensor([c.center for c in scene.cylinders], (3,)),
            cylinder_rotation=tensor([c.rotation for c in scene.cylinders], (3, 3)),
            cylinder_radius=tensor([c.radius for c in scene.cylinders], ()),
            cylinder_half_height=tensor([c.half_height for c in scene.cylinders], ()),
            point_field=None if scene.points is None else PointDistanceField.build(scene.points, point_resolution_m, point_truncation_m, device, dtype),
        )

    @property
    def is_empty(self) -> bool:
        return self.box_center.shape[0] + self.sphere_center.shape[0] + self.cylinder_center.shape[0] == 0 and self.point_field is None

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance [N] of points [3, N] to the nearest obstacle (+inf in an empty scene)."""
        nearest = torch.full_like(points[0], float("inf"))
        if self.box_center.shape[0]:
            nearest = torch.minimum(nearest, box_signed_distance(points, self.box_center, self.box_rotation, self.box_half_extents).amin(0))
        if self.sphere_center.shape[0]:
            nearest = torch.minimum(nearest, sphere_signed_distance(points, self.sphere_center, self.sphere_radius).amin(0))
        if self.cylinder_center.shape[0]:
            cylinders = cylinder_signed_distance(points, self.cylinder_center, self.cylinder_rotation, self.cylinder_radius, self.cylinder_half_height)
            nearest = torch.minimum(nearest, cylinders.amin(0))
        if self.point_field is not None:
            nearest = torch.minimum(nearest, self.point_field.lower_bound(points))
        return nearest


# --- the checker -----------------------------------------------------------------------------------

class TorchCollisionChecker:
    """Sphere-model collision checks of configuration batches q [B, 7] on any torch device.

    A configuration is in scene collision when a robot sphere comes closer than `collision_margin_m`
    to an obstacle, and in self-collision when two spheres on a checked link pair overlap or the
    wrist table reports contact (the margin pads the robot against the world only, as MoveIt's link
    padding does).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        collision_margin_m: float = 0.0,
        spheres_path: Path = SPHERES_PATH,
        wrist_table_path: Path = WRIST_TABLE_PATH,
        point_resolution_m: float = 0.01,
        max_batch: int | None = None,
    ):
        if collision_margin_m < 0:
            raise ValueError(f"collision_margin_m must be >= 0, got {collision_margin_m}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.collision_margin_m = float(collision_margin_m)
        self.point_resolution_m = float(point_resolution_m)
        # Configurations per tensor pass (results do not depend on it). On CPU, passes of ~1024 keep
        # the temporaries in cache and run ~2x faster than one big pass (measured on 2 cores); a GPU
        # wants passes as large as memory allows.
        self.max_batch = max_batch or (1024 if self.device.type == "cpu" else 65536)
        self.kinematics = PandaKinematics(self.device, dtype)
        self.spheres = RobotSphereModel.load(spheres_path, self.device, dtype)
        self.wrist_table = WristClearanceTable.load(wrist_table_path, self.device, dtype)
        self._scene_radii = self.spheres.radii[self.spheres.scene_index]
        # A cloud's distance field only has to be right below the largest distance that can decide a
        # collision; two cells more absorb the lookup's slack.
        self._point_truncation_m = float(self.spheres.radii.max()) + self.collision_margin_m + 2 * self.point_resolution_m
        self._prepared: tuple[Scene, TensorScene] | None = None

    def prepare(self, scene: Scene) -> TensorScene:
        """Tensorize a scene for this checker's device/dtype (builds the point-cloud distance field)."""
        return TensorScene.from_scene(scene, self.device, self.dtype, self.point_resolution_m, self._point_truncation_m)

    def set_scene(self, scene: Scene) -> TensorScene:
        """Prepare `scene` and keep it: later calls with this Scene object (or scene=None) reuse it."""
        prepared = self.prepare(scene)
        self._prepared = (scene, prepared)
        return prepared

    def _tensor_scene(self, scene: Scene | TensorScene | None) -> TensorScene:
        if isinstance(scene, TensorScene):
            return scene
        cached = self._prepared  # one read: another thread may replace the cache meanwhile
        if scene is None:
            if cached is None:
                raise ValueError("no scene: pass one or call set_scene first")
            return cached[1]
        if cached is not None and cached[0] is scene:
            return cached[1]
        return self.set_scene(scene)

    def sphere_centers(self, q: torch.Tensor) -> torch.Tensor:
        """Robot sphere centres in the base frame [B, S, 3] (e.g. for visualization)."""
        q = q.to(device=self.device, dtype=self.dtype)
        return self.spheres.world_centers(self.kinematics.link_transforms(q)).permute(2, 1, 0)

    def clearances(self, q: torch.Tensor, scene: Scene | TensorScene | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scene clearance, self clearance) [B] each in metres, differentiable wrt q.

        Scene clearance: min over robot spheres of (distance of the centre to the nearest obstacle
        minus the radius), +inf without obstacles. Self clearance: min over checked sphere pairs of
        (centre distance minus both radii) and the wrist table's bound. Negative values are
        penetration depths (of the spheres, or of the meshes for the wrist pairs).
        """
        q = q.to(device=self.device, dtype=self.dtype)
        tensor_scene = self._tensor_scene(scene)
        centers = self.spheres.world_centers(self.kinematics.link_transforms(q))  # [3, S, B]
        batch = q.shape[0]
        if tensor_scene.is_empty:
            scene_clearance = torch.full((batch,), float("inf"), dtype=self.dtype, device=self.device)
        else:
            scene_centers = centers.index_select(1, self.spheres.scene_index)  # [3, S', B]
            distance = tensor_scene.distance(scene_centers.reshape(3, -1)).view(self._scene_radii.shape[0], batch)
            scene_clearance = (distance - self._scene_radii[:, None]).amin(0)
        self_clearance = self.wrist_table.lower_bound(q[:, 5], q[:, 6])
        radii = self.spheres.radii
        for own, partners in self.spheres.self_blocks:
            difference = centers[:, own, None, :] - centers[:, None, partners, :]  # [3, n, m, B]
            gap = _length(difference[0], difference[1], difference[2]) - (radii[own, None] + radii[None, partners])[..., None]
            self_clearance = torch.minimum(self_clearance, gap.amin((0, 1)))
        return scene_clearance, self_clearance

    def signed_distance(self, q: torch.Tensor, scene: Scene | TensorScene | None = None) -> torch.Tensor:
        """[B] min(scene clearance - margin, self clearance): negative iff in collision; differentiable wrt q."""
        scene_clearance, self_clearance = self.clearances(q, scene)
        return torch.minimum(scene_clearance - self.collision_margin_m, self_clearance)

    def check(self, q: torch.Tensor, scene: Scene | TensorScene | None = None) -> CollisionResult:
        """Collision flags and signed distance for configurations q [B, 7] (no gradients)."""
        q = q.to(device=self.device, dtype=self.dtype)
        tensor_scene = self._tensor_scene(scene)
        with torch.no_grad():
            parts = [self.clearances(chunk, tensor_scene) for chunk in q.split(self.max_batch)]
        scene_clearance = torch.cat([part[0] for part in parts]) if parts else q.new_zeros(0)
        self_clearance = torch.cat([part[1] for part in parts]) if parts else q.new_zeros(0)
        scene_collision = scene_clearance < self.collision_margin_m
        self_collision = self_clearance < 0.0
        return CollisionResult(
            in_collision=scene_collision | self_collision,
            self_collision=self_collision,
            scene_collision=scene_collision,
            signed_distance=torch.minimum(scene_clearance - self.collision_margin_m, self_clearance),
        )
