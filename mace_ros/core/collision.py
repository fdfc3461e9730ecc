"""Batched collision checking of Panda configurations: the backend protocol and the torch backend.

The torch backend runs a broad and a narrow phase, both batched tensor operations on the checker's
device and dtype:
- Broad phase: the robot as spheres rigidly attached to its links (fitted by
  `scripts/fit_robot_spheres.py` so that their union contains every link's mesh hull). Signed
  distances of sphere centres to oriented boxes, spheres and capped cylinders are closed-form; a
  point cloud becomes a distance field whose lookups are rigorous lower bounds. A link whose
  spheres all keep clear of an obstacle is free of it.
- Narrow phase, for the (configuration, link, obstacle) and (configuration, link, link) triples the
  spheres could not clear: links are tight convex polytopes (`LinkPolytopes`, fitted by
  `scripts/build_link_polytopes.py`: the mesh hulls against obstacles, and coarser polytopes at most
  1 mm beyond them between links), boxes are exact polytopes and cylinders circumscribed prisms. Two convex polytopes meet
  iff an edge of one meets the other (`segments_meet_polytopes`), so the test is exact up to the
  polytope fit, and padding every half-space by a distance d turns it into a conservative
  "closer than d" test. A sphere obstacle meets a link when its centre lies within r + d of every
  facet plane of the link (a conservative bound of the exact point-polytope distance). Spheres alone (6-8 % false collisions near obstacles) rejected many valid
  configurations; this keeps false "free" at zero with far fewer false collisions.
Point clouds are decided by the sphere model alone.

Self-collision checks every pair of links that the Panda SRDF of franka_description /
moveit_resources (`panda.srdf`) does not disable: adjacent links, the hand and its fingers, and
pairs that can never touch within the joint limits. panda_link5 against the links after joint 6
(~2 cm apart, with a relative pose depending on (q6, q7) alone) uses an exact mesh clearance table
over (q6, q7) built with PyBullet (`WristClearanceTable`). The base link `panda_link0` is bolted to
its support and cannot move, so it is left out of scene checks (a floor, table or mounting plate
touching it would otherwise put every configuration in collision); it stays in self-collision checks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from safetensors import safe_open
from scipy.ndimage import distance_transform_edt
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection, cKDTree

from mace_ros.core.cuda_graph import GraphedCall, padded_size, write_padded
from mace_ros.core.kinematics import LINK_INDEX, LINK_NAMES, PandaKinematics
from mace_ros.core.scene import Scene

SPHERES_PATH = Path(__file__).resolve().parent / "data" / "panda_spheres.yaml"
WRIST_TABLE_PATH = Path(__file__).resolve().parent / "data" / "panda_wrist_clearance.safetensors"
LINK_POLYTOPES_PATH = Path(__file__).resolve().parent / "data" / "panda_link_polytopes.yaml"

# Bullet collides a mesh as its convex hull grown by a 1 mm collision margin (measured, see
# scripts/fit_robot_spheres.py); boxes, spheres and cylinders keep their exact size. The narrow
# phase pads by that margin plus a slack for float32 rounding of ~1 m coordinates.
BULLET_HULL_MARGIN_M = 0.001
NARROW_PHASE_SLACK_M = 0.0002
# The narrow phase's cloud cells (m). Among a 1 cm cloud (200k points) cells of 0.07-0.14 m checked about equally
# fast on a CPU, 0.035-0.05 and 0.2 slower: larger cells hold more points outside a link's ball (radius <= ~0.19 m),
# smaller ones cost more lookups.
POINT_GRID_CELL_M = 0.1
# Candidate points per query of the cloud's cells, roughly, in units of the checker's element budget: bounds
# what is held at once (256 (link, configuration) pairs a query on a CPU).
POINT_GRID_POINTS_PER_PAIR = 32768
# Cylinders enter the narrow phase as circumscribed prisms, which reach at most r (1/cos(pi/sides) - 1)
# beyond the true surface (2 % of the radius).
CYLINDER_SIDES = 16
# Link-level prefilter of the scene broad phase: each scene link's bounding sphere against each
# primitive's. Where at most this fraction of (link, primitive, configuration) triples is near,
# only those get per-sphere distances (256 scattered markers: ~10x faster); denser scenes (a few
# walls around the robot) take the dense pass, which is then cheaper than gathering.
SPARSE_BROAD_PHASE_MAX_NEAR_FRACTION = 0.25
SPARSE_BROAD_PHASE_MIN_PRIMITIVES = 16  # below, the dense pass costs about as little as the prefilter or less
# The smallest batch a broad-phase CUDA graph is captured for: on a GPU a few configurations cost as much as this many.
GRAPH_MIN_BATCH = 128

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


def padded_groups(sizes: list[int], device: torch.device | str) -> torch.Tensor:
    """[G, most] indices of G consecutive groups of the given sizes in a flat list, each row padded with its
    group's first index: gathered, then reduced over the last axis with min or max, every group at once
    (a repeated element changes neither)."""
    most, rows, start = max(sizes), [], 0
    for size in sizes:
        rows.append(list(range(start, start + size)) + [start] * (most - size))
        start += size
    return torch.tensor(rows, dtype=torch.long, device=device)


def _group_min(values: torch.Tensor, groups: torch.Tensor, dim: int) -> torch.Tensor:
    """values with axis `dim` reduced per group of `padded_groups` (a [G, most] index): that axis becomes G."""
    gathered = values.index_select(dim, groups.flatten())
    return gathered.view(*values.shape[:dim], *groups.shape, *values.shape[dim + 1:]).amin(dim + 1)


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


def _pairwise_to_local(points: torch.Tensor, center: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Points [T, M, 3], each row in the frame of its own posed primitive (centre [T, 3], rotation [T, 3, 3]) -> [T, M, 3]."""
    return (points - center[:, None]) @ rotation


def pairwise_primitive_distances(points: torch.Tensor, tensor_scene: "TensorScene", primitive: torch.Tensor) -> torch.Tensor:
    """Signed distance [T, M] of points [T, M, 3] to one primitive per row (index [T] into the scene's
    boxes, then spheres, then cylinders, as in primitive_distances)."""
    distance = points.new_empty(points.shape[:2])
    num_boxes, num_spheres = tensor_scene.box_center.shape[0], tensor_scene.sphere_center.shape[0]
    boxes = torch.nonzero(primitive < num_boxes).squeeze(-1)
    if boxes.numel():
        index = primitive[boxes]
        local = _pairwise_to_local(points[boxes], tensor_scene.box_center[index], tensor_scene.box_rotation[index])
        excess = local.abs() - tensor_scene.box_half_extents[index][:, None]
        distance[boxes] = _box_like_distance(tuple(excess[..., i] for i in range(3)))
    spheres = torch.nonzero((primitive >= num_boxes) & (primitive < num_boxes + num_spheres)).squeeze(-1)
    if spheres.numel():
        index = primitive[spheres] - num_boxes
        offset = points[spheres] - tensor_scene.sphere_center[index][:, None]
        distance[spheres] = _length(offset[..., 0], offset[..., 1], offset[..., 2]) - tensor_scene.sphere_radius[index][:, None]
    cylinders = torch.nonzero(primitive >= num_boxes + num_spheres).squeeze(-1)
    if cylinders.numel():
        index = primitive[cylinders] - num_boxes - num_spheres
        local = _pairwise_to_local(points[cylinders], tensor_scene.cylinder_center[index], tensor_scene.cylinder_rotation[index])
        radial = _length(local[..., 0], local[..., 1]) - tensor_scene.cylinder_radius[index][:, None]
        axial = local[..., 2].abs() - tensor_scene.cylinder_half_height[index][:, None]
        distance[cylinders] = _box_like_distance((radial, axial))
    return distance


# --- convex polytopes ------------------------------------------------------------------------------

def polytope_from_halfspaces(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] and edges [E, 2, 3] of the bounded polytope {x : n . x <= d} of planes [F, 4] (n, d).

    Edges are the polytope's true edges: segments between two facets of different planes (the
    diagonals that triangulate a flat facet are dropped).
    """
    planes = np.asarray(planes, dtype=np.float64)
    normals, offsets = planes[:, :3], planes[:, 3]
    # Chebyshev centre: the interior point HalfspaceIntersection needs, as deep inside as possible.
    norms = np.linalg.norm(normals, axis=1)
    center = linprog(
        np.r_[0.0, 0.0, 0.0, -1.0], A_ub=np.c_[normals, norms], b_ub=offsets, bounds=[(None, None)] * 3 + [(0, None)]
    )
    if center.status != 0 or center.x[3] <= 0:
        raise ValueError("the half-spaces do not bound a polytope with an interior")
    intersection = HalfspaceIntersection(np.c_[normals, -offsets], center.x[:3])
    # A vertex where more than three planes meet comes out as a cluster of nearly equal points: merge them.
    points = intersection.intersections
    neighbours_within = cKDTree(points).query_ball_point(points, r=1e-6)
    vertices = points[np.unique([min(group) for group in neighbours_within])]
    hull = ConvexHull(vertices)
    edges: set[tuple[int, int]] = set()
    for facet, (simplex, neighbours) in enumerate(zip(hull.simplices, hull.neighbors)):
        for corner in range(3):
            # neighbours[corner] is the facet across the edge opposite simplex[corner].
            if np.abs(hull.equations[facet] - hull.equations[neighbours[corner]]).max() > 1e-9:
                a, b = np.delete(simplex, corner)
                edges.add((min(a, b), max(a, b)))
    edge_index = np.array(sorted(edges))
    return vertices, vertices[edge_index]


def _unit_cylinder_planes(sides: int) -> np.ndarray:
    """Planes [sides + 2, 4] of the prism circumscribing the cylinder of radius 1 and half height 1 about z."""
    angle = 2.0 * np.pi * np.arange(sides) / sides
    side_planes = np.stack([np.cos(angle), np.sin(angle), np.zeros(sides), np.ones(sides)], 1)
    return np.concatenate([side_planes, [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, 1.0]]])


@functools.cache
def _unit_polytope(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(planes, vertices, edges) of the unit box or the prism circumscribing the unit cylinder, computed once."""
    planes = {
        "box": np.concatenate([np.c_[np.eye(3), np.ones(3)], np.c_[-np.eye(3), np.ones(3)]]),
        "cylinder": _unit_cylinder_planes(CYLINDER_SIDES),
    }[kind]
    return (planes, *polytope_from_halfspaces(planes))


def _posed_polytope(kind: str, scale: np.ndarray, rotation: np.ndarray, center: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A unit polytope scaled per axis, rotated and moved: (planes [F, 4], vertices [V, 3], edges [E, 2, 3]) in the base frame."""
    planes, vertices, edges = _unit_polytope(kind)
    # n . u <= d with u = x / scale  <=>  (n / scale) . x <= d, normalized.
    normals = planes[:, :3] / scale
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals, offsets = normals / lengths @ rotation.T, planes[:, 3] / lengths[:, 0]
    return np.c_[normals, offsets + normals @ center], (vertices * scale) @ rotation.T + center, (edges * scale) @ rotation.T + center


@dataclass(frozen=True)
class Polytopes:
    """K convex polytopes, padded to common sizes: half-spaces [K, F, 4] (n . x <= d), vertices [K, V, 3], edges [K, E, 2, 3].

    Padding planes are 0 . x <= 1 (no constraint); padding vertices and edges repeat real ones.
    """

    planes: torch.Tensor
    vertices: torch.Tensor
    edges: torch.Tensor

    @staticmethod
    def from_planes(planes: list[np.ndarray], device: torch.device | str, dtype: torch.dtype) -> "Polytopes":
        """Polytopes of the given half-spaces [F_k, 4] each."""
        return Polytopes.stack([(p, *polytope_from_halfspaces(p)) for p in planes], device, dtype)

    @staticmethod
    def stack(shapes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device | str, dtype: torch.dtype) -> "Polytopes":
        """Pad and stack (planes, vertices, edges) triples."""
        sizes = [max((len(shape[part]) for shape in shapes), default=1) for part in range(3)]
        planes = np.zeros((len(shapes), sizes[0], 4))
        planes[:, :, 3] = 1.0
        vertices = np.zeros((len(shapes), sizes[1], 3))
        edges = np.zeros((len(shapes), sizes[2], 2, 3))
        for k, (shape_planes, shape_vertices, shape_edges) in enumerate(shapes):
            planes[k, : len(shape_planes)] = shape_planes
            vertices[k] = shape_vertices[np.arange(sizes[1]) % len(shape_vertices)]
            edges[k] = shape_edges[np.arange(sizes[2]) % len(shape_edges)]
        return Polytopes(*(torch.as_tensor(array, dtype=dtype, device=device) for array in (planes, vertices, edges)))

    def __len__(self) -> int:
        return self.planes.shape[0]


def segments_meet_polytopes(segments: torch.Tensor, planes: torch.Tensor, pad_m: float) -> torch.Tensor:
    """[P] whether any of the segments [P, E, 2, 3] meets its polytope [P, F, 4] grown by pad_m (every plane moved out).

    Clips each segment a + t (b - a), t in [0, 1], against every half-space (Cyrus-Beck): the
    segment meets the polytope iff the largest entering t is at most the smallest leaving t.
    """
    start = segments[:, :, 0]
    direction = segments[:, :, 1] - start
    normals = planes[..., :3].transpose(1, 2)  # [P, 3, F]
    room = (planes[..., 3] + pad_m)[:, None, :] - start @ normals  # [P, E, F]: unit normals, so + pad_m grows by pad_m
    rate = direction @ normals
    ratio = room / rate
    entering = torch.where(rate < 0, ratio, torch.full_like(ratio, -float("inf"))).amax(-1).clamp_min(0.0)
    leaving = torch.where(rate > 0, ratio, torch.full_like(ratio, float("inf"))).amin(-1).clamp_max(1.0)
    blocked = ((rate == 0) & (room < 0)).any(-1)
    return ((entering <= leaving) & ~blocked).any(-1)


def polytopes_meet(
    edges_a: torch.Tensor, planes_a: torch.Tensor, edges_b: torch.Tensor, planes_b: torch.Tensor, pad_m: float
) -> torch.Tensor:
    """[P] whether polytopes A and B (edges [P, E, 2, 3], planes [P, F, 4], one frame) come closer than pad_m.

    Conservative: if they are closer than pad_m, the closest points lie on an edge of one of them
    (or their faces are parallel and an edge is as close), and that edge meets the other grown by pad_m.
    """
    return segments_meet_polytopes(edges_a, planes_b, pad_m) | segments_meet_polytopes(edges_b, planes_a, pad_m)


def _vertex_tests(vertices: torch.Tensor, planes: torch.Tensor, pad_m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quick verdicts for polytope A (vertices [P, V, 3]) against polytope B (planes [P, F, 4]) grown by pad_m.

    Returns (hit, undecided) [P]: hit when a vertex of A lies inside grown B; undecided unless hit or
    all of A lies beyond one facet of grown B (a separating plane). Undecided pairs need the edge test.
    """
    excess = vertices @ planes[..., :3].transpose(1, 2) - (planes[..., 3] + pad_m)[:, None, :]  # [P, V, F]
    hit = (excess.amax(2) <= 0).any(-1)
    separated = (excess.amin(1) > 0).any(-1)
    return hit, ~hit & ~separated


def transform_planes(planes: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Planes [P, F, 4] moved by x -> R x + t (R [P, 3, 3], t [P, 3])."""
    normals = planes[..., :3] @ rotation.transpose(1, 2)
    return torch.cat([normals, (planes[..., 3] + (normals * translation[:, None]).sum(-1))[..., None]], -1)


@functools.lru_cache(maxsize=8)
def _load_link_table(path: Path) -> tuple[dict, list[str]]:
    """A YAML file keyed by link name, and its links with data in kinematic order (read-only: cached
    per path, since every checker loads the same files, and parsed by libyaml where PyYAML has it: the
    polytope table took ~3-7 s with the pure-Python parser on this CPU, ~10x less with libyaml)."""
    data = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    unknown = set(data) - set(LINK_NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown link(s) {sorted(unknown)}")
    return data, [name for name in LINK_NAMES if data.get(name)]


@dataclass(frozen=True)
class LinkPolytopes:
    """Two convex polytopes per link in its link frame, rows in `link_index` order.

    `hull`: the exact convex hull of the link's collision mesh (what PyBullet collides), tested
    against obstacles. `coarse`: a polytope with far fewer facets reaching at most ~1 mm beyond the
    hull, tested against other links, where the cost is edges x facets of both.
    """

    link_index: torch.Tensor  # [Lp] long, index into LINK_NAMES
    hull: Polytopes
    coarse: Polytopes
    row_of_link: dict[str, int]

    @staticmethod
    def load(path: Path = LINK_POLYTOPES_PATH, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "LinkPolytopes":
        data, links = _load_link_table(path)

        def shapes(kind: str) -> Polytopes:
            return Polytopes.from_planes([np.asarray(data[name][kind], dtype=np.float64) for name in links], device, dtype)

        return LinkPolytopes(
            link_index=torch.tensor([LINK_INDEX[name] for name in links], device=device),
            hull=shapes("hull"),
            coarse=shapes("coarse"),
            row_of_link={name: row for row, name in enumerate(links)},
        )


# --- the robot as spheres -----------------------------------------------------------------------

@dataclass(frozen=True)
class RobotSphereModel:
    """Spheres attached to links (S spheres, grouped by link in kinematic order)."""

    link_index: torch.Tensor  # [S] long, index into LINK_NAMES (and into link_transforms' output)
    centers: torch.Tensor  # [S, 3] in the link frame
    radii: torch.Tensor  # [S]
    link_slices: dict[str, slice]  # each link's sphere range, in kinematic order

    @staticmethod
    def load(path: Path = SPHERES_PATH, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "RobotSphereModel":
        data, links = _load_link_table(path)
        link_of_sphere: list[str] = []
        spheres: list[list[float]] = []
        link_slices: dict[str, slice] = {}
        for name in links:
            link_slices[name] = slice(len(spheres), len(spheres) + len(data[name]))
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
            link_slices=link_slices,
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
        rest6, rest7 = 1.0 - fraction6, 1.0 - fraction7
        # The four corners (q6 low/high x q7 low/high) at once: a dozen kernels instead of fifty.
        value = self.clearance_m[torch.stack([cell6, cell6, cell6 + 1, cell6 + 1]), torch.stack([cell7, cell7 + 1, cell7, cell7 + 1])]  # [4, B]
        weight = torch.stack([rest6, rest6, fraction6, fraction6]) * torch.stack([rest7, fraction7, rest7, fraction7])
        # Metres of possible motion per unit of grid fraction, along each axis, times the fraction to the corner.
        slack = (self.lipschitz_m_per_rad[0] * step6) * torch.stack([fraction6, fraction6, rest6, rest6]) \
            + (self.lipschitz_m_per_rad[1] * step7) * torch.stack([fraction7, rest7, fraction7, rest7])
        terms = weight * (value - slack)
        return terms[0] + terms[1] + terms[2] + terms[3]


# --- obstacles -----------------------------------------------------------------------------------

# A cloud's distance field has at most this many nodes (~17 MB in float32; a 2.4 x 2.4 x 0.7 m
# workspace at 1 cm fits), whatever the cloud's extent.
MAX_FIELD_NODES = 1 << 22
# Fields whose truncation spans up to this many voxels are built by windowed minima, longer ones by
# scipy's feature transform (see _truncated_node_distances).
MAX_WINDOWED_REACH = 32
# Fields of the latest clouds, keyed by content (see PointDistanceField.cached).
FIELD_CACHE_SIZE = 2
_FIELD_CACHE: dict[tuple, "PointDistanceField"] = {}
_FIELD_CACHE_LOCK = threading.Lock()

def _truncated_node_distances(
    occupied: np.ndarray, resolution_m: float, truncation_m: float, dtype: np.dtype, threads: int = 1,
) -> np.ndarray:
    """Per node: its distance to the nearest occupied node, less h sqrt(3)/2 (no point lies farther
    than that from its node), clipped to [0, truncation_m], in `dtype`.

    An offset of `reach` voxels or more to the nearest occupied node puts a node past the truncation,
    so offsets are only needed below it. Short reaches (a camera cloud's field: 13) take windowed
    minima (`_windowed_squared_offsets`), about 3x faster than scipy's feature transform on a table
    cloud's 0.5M nodes and still faster at 40 (BENCHMARKS.md, "Depth-camera streams"); longer ones the
    feature transform, whose cost does not grow with the reach. Either gives the exact squared offset
    in whole voxels below reach^2 (and at least reach^2 otherwise), so one table lookup turns it into
    the distance.
    """
    half_diagonal = 0.5 * np.sqrt(3.0)
    reach = int(np.ceil(truncation_m / resolution_m + half_diagonal))
    if reach <= MAX_WINDOWED_REACH:
        squared = _windowed_squared_offsets(occupied, reach)
    else:
        squared = _feature_transform_squared_offsets(occupied, reach, threads)
    largest = 3 * reach * reach  # either way, no squared offset exceeds this
    distances = (np.sqrt(np.arange(largest + 1, dtype=np.float64)) - half_diagonal) * resolution_m
    return np.clip(distances, 0.0, truncation_m).astype(dtype)[squared]


def _window_minima(values: np.ndarray, reach: int) -> np.ndarray:
    """min over |k| < reach of values[:, j + k] + k^2, along axis 1 (whole contiguous blocks per step)."""
    result, shifted = values.copy(), np.empty_like(values)
    for k in range(1, min(reach, values.shape[1])):
        np.add(values, values.dtype.type(k * k), out=shifted)
        np.minimum(result[:, k:], shifted[:, :-k], out=result[:, k:])
        np.minimum(result[:, :-k], shifted[:, k:], out=result[:, :-k])
    return result


def _windowed_squared_offsets(occupied: np.ndarray, reach: int) -> np.ndarray:
    """Per node: the squared offset (voxels) to the nearest occupied node, exact below reach^2, at
    least that otherwise (uint16).

    The squared Euclidean distance transform is separable (Saito and Toriwaki): the 1-D distance
    along one axis, then, along each other axis, the minimum over neighbours of their value plus the
    squared step. Steps of `reach` or more only give values >= reach^2, so each axis needs reach - 1
    shifted minima over the whole grid and the 1-D distances can stop at reach: all vectorized,
    where the feature transform visits the nodes one by one.
    """
    # The 1-D pass steps plane by plane along the shortest axis (fewest Python steps); the window
    # passes then run along the middle axis of a C-ordered grid, where each shift moves whole blocks.
    order = sorted(range(3), key=lambda axis: occupied.shape[axis])
    free = np.logical_not(occupied.transpose(order)).astype(np.uint16)
    squared = np.empty(free.shape, dtype=np.uint16)
    np.multiply(free[0], reach, out=squared[0])
    for plane in range(1, free.shape[0]):
        np.add(squared[plane - 1], 1, out=squared[plane])
        np.minimum(squared[plane], reach, out=squared[plane])
        squared[plane] *= free[plane]
    from_above = np.empty(free.shape[1:], dtype=np.uint16)
    for plane in range(free.shape[0] - 2, -1, -1):
        np.add(squared[plane + 1], 1, out=from_above)
        np.minimum(squared[plane], from_above, out=squared[plane])
    squared *= squared  # <= reach^2, and after both windows < 3 reach^2: uint16 up to a reach of 147
    squared = _window_minima(squared, reach)
    squared = _window_minima(np.ascontiguousarray(squared.transpose(0, 2, 1)), reach)
    layout = [order[0], order[2], order[1]]  # the original axis of each of squared's axes
    return np.ascontiguousarray(squared.transpose([layout.index(axis) for axis in range(3)]))


def _feature_transform_squared_offsets(occupied: np.ndarray, reach: int, threads: int) -> np.ndarray:
    """Per node: the squared offset (voxels, int32) to the nearest occupied node by scipy's exact
    feature transform, each axis's offset clipped at `reach` (from there on the node is truncated anyway).

    Why not distance_transform_edt's distances: it turns the feature transform into float64 distances
    through several grid-sized float64 temporaries, which cost as much as the transform itself.
    With `threads` > 1 the grid is cut into slabs along its first axis, each transformed with `reach`
    planes of its neighbours in a thread of its own (scipy and numpy release the GIL). The result is
    the same: a node whose nearest occupied node lies beyond its slab's margin is more than `reach`
    voxels from any, so truncated anyway.
    """
    squared = np.empty(occupied.shape, dtype=np.int32)

    def fill(start: int, stop: int) -> None:
        low, high = max(0, start - reach), min(occupied.shape[0], stop + reach)
        part = occupied[low:high]
        if not part.any():  # nothing within `reach` planes: every node is truncated
            squared[start:stop] = 3 * reach * reach
            return
        nearest = distance_transform_edt(~part, return_distances=False, return_indices=True)[:, start - low:stop - low]
        slab = squared[start:stop]
        slab[...] = 0
        for axis in range(occupied.ndim):
            along = [1] * occupied.ndim
            along[axis] = nearest.shape[1 + axis]
            first = start - low if axis == 0 else 0  # this node's index within `part` along the axis
            offset = nearest[axis]
            offset -= np.arange(first, first + along[axis], dtype=offset.dtype).reshape(along)
            np.clip(offset, -reach, reach, out=offset)
            slab += offset * offset

    # Slabs no thinner than their two margins: thinner ones would repeat more work than they share.
    slabs = max(1, min(threads, occupied.shape[0] // (2 * reach)))
    bounds = np.linspace(0, occupied.shape[0], slabs + 1).round().astype(int).tolist()
    if slabs == 1:
        fill(0, occupied.shape[0])
    else:
        with ThreadPoolExecutor(max_workers=slabs - 1) as pool:
            others = [pool.submit(fill, start, stop) for start, stop in zip(bounds[1:-1], bounds[2:])]
            fill(bounds[0], bounds[1])
            for other in others:
                other.result()
    return squared


@dataclass(frozen=True)
class PointDistanceField:
    """Distance to a point cloud, sampled on a regular grid, with conservative trilinear lookups.

    Why a grid and not nearest-point search per query: a camera cloud has 10^4-10^5 points and a
    batch of 4096 configurations has ~2.5x10^5 sphere centres, so brute-force distances cost
    ~10^10 operations per check, while a grid lookup costs the same for any cloud size.

    The nodes hold lower bounds V(c) <= D(c) of the distance D to the nearest cloud point: each point
    marks its nearest node, an exact Euclidean distance transform gives every node's distance to the
    nearest marked node, and h sqrt(3)/2 less (no point lies farther than that from its node) is
    V, truncated at `truncation_m`. (Exact nearest-point search per node was the alternative: a
    640 x 480 camera cloud's 480k nodes took 1.1 s with a k-d tree, the transform ~0.05 s.)
    Because D is 1-Lipschitz, D(x) >= V(c_i) - |x - c_i| for every corner c_i of x's cell, so the
    trilinear blend f(x) = sum_i w_i V(c_i) satisfies D(x) >= f(x) - sum_i w_i |x - c_i| >= f(x) -
    h sqrt(sum_axes f_a (1 - f_a)) (Jensen; h the resolution, f_a the position in the cell), which
    `lower_bound` returns: never above D, at most 1.73 h below it (17 mm at 1 cm, worst case; ~5 mm
    typically). Outside the grid (the cloud's bounding box padded by the truncation distance)
    D >= truncation_m holds and is returned. Only the final, exact check of answers (the link hulls
    against the points themselves) decides how close an answer may come to a cloud.

    Memory and time are bounded whatever the cloud's extent: a grid that would exceed `max_nodes`
    is coarsened (the bound stays rigorous, only looser). Builds are cached by the cloud's content
    (`cached`), so a cloud is processed once however many scenes and requests use it.
    """

    origin: torch.Tensor  # [3] position of node (0, 0, 0)
    resolution_m: float
    values: torch.Tensor  # [nx, ny, nz] truncated distances at the nodes
    truncation_m: float

    @staticmethod
    def build(
        points: np.ndarray, resolution_m: float, truncation_m: float, device: torch.device, dtype: torch.dtype,
        max_nodes: int = MAX_FIELD_NODES, threads: int = 1,
    ) -> "PointDistanceField":
        low, high = points.min(0), points.max(0)
        while True:  # coarsen until the grid fits max_nodes (at most a few passes)
            pad = truncation_m + resolution_m
            shape = np.ceil((high - low + 2 * pad) / resolution_m).astype(np.int64) + 1
            if np.prod(shape.astype(np.float64)) <= max_nodes:
                break
            resolution_m *= max(1.01, float(np.cbrt(np.prod(shape.astype(np.float64)) / max_nodes)))
        origin = low - pad
        occupied = np.zeros(tuple(shape), dtype=bool)
        occupied[tuple(np.rint((points - origin) / resolution_m).astype(np.int64).T)] = True
        values = _truncated_node_distances(
            occupied, resolution_m, truncation_m, np.dtype(np.float64 if dtype == torch.float64 else np.float32), threads)
        del occupied
        return PointDistanceField(
            origin=torch.as_tensor(origin, dtype=dtype, device=device),
            resolution_m=float(resolution_m),
            values=torch.as_tensor(values, dtype=dtype, device=device),
            truncation_m=float(truncation_m),
        )

    @staticmethod
    def points_digest(points: np.ndarray) -> tuple:
        """What identifies a cloud's content in the field cache (its float64 bytes' hash and its shape)."""
        points = np.ascontiguousarray(points, dtype=np.float64)
        return hashlib.blake2b(points.data, digest_size=16).digest(), points.shape

    @staticmethod
    def _cache_key(digest: tuple, resolution_m: float, truncation_m: float, device: torch.device, dtype: torch.dtype) -> tuple:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and the tensors' "cuda:N" are one device
            device = torch.device("cuda", torch.cuda.current_device())
        return (*digest, resolution_m, truncation_m, str(device), dtype)

    @staticmethod
    def cached(points: np.ndarray, resolution_m: float, truncation_m: float, device: torch.device, dtype: torch.dtype) -> "PointDistanceField":
        """`build`, reused for a cloud of the same content: scenes are snapshots that copy their cloud,
        and a new snapshot (a marker moved) must not rebuild the field of an unchanged cloud."""
        digest = PointDistanceField.points_digest(points)
        key = PointDistanceField._cache_key(digest, resolution_m, truncation_m, device, dtype)
        with _FIELD_CACHE_LOCK:
            field = _FIELD_CACHE.get(key)
        if field is None:
            field = PointDistanceField.build(np.asarray(points, dtype=np.float64), resolution_m, truncation_m, device, dtype)
            field.remember(digest, resolution_m, truncation_m)
        return field

    def remember(self, digest: tuple, resolution_m: float, truncation_m: float) -> None:
        """Caches this field, built elsewhere (e.g. in another process) by `build(points, resolution_m,
        truncation_m, ...)` where `digest` is `points_digest(points)`, so that `cached` finds it for those
        points, on this field's device and dtype. The digest comes from where the field was built: a field is
        never found for points other than its own."""
        key = PointDistanceField._cache_key(digest, resolution_m, truncation_m, self.values.device, self.values.dtype)
        with _FIELD_CACHE_LOCK:
            _FIELD_CACHE[key] = self
            while len(_FIELD_CACHE) > FIELD_CACHE_SIZE:
                _FIELD_CACHE.pop(next(iter(_FIELD_CACHE)))

    @functools.cached_property
    def _upper_node(self) -> torch.Tensor:
        """[3, 1] the last node's grid coordinates, made once: a copy from a host list cannot be part of a CUDA graph."""
        return torch.tensor([size - 1.0 for size in self.values.shape], dtype=self.values.dtype, device=self.values.device)[:, None]

    def lower_bound(self, points: torch.Tensor) -> torch.Tensor:
        """Lower bounds [N] of the distance from points [3, N] to the cloud (capped at truncation_m)."""
        scaled = (points - self.origin[:, None]) / self.resolution_m  # [3, N] in grid units
        upper = self._upper_node.to(scaled.dtype)
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


class PointGrid:
    """A cloud's points sorted into cubic cells, for the narrow phase: the points within a radius of many
    centres at once come from the cells around each centre, not from a distance per (centre, point). Among a
    floor seen 4.4 m across (200k points) the distances to every point took ~5 ms a configuration on a CPU."""

    def __init__(self, points: torch.Tensor, cell_m: float = POINT_GRID_CELL_M):
        self.origin = points.amin(0) if points.shape[0] else points.new_zeros(3)
        # At most 2^20 cells per axis, so that a cell's key (one int64) cannot overflow however far points lie.
        extent = float((points.amax(0) - self.origin).max()) if points.shape[0] else 0.0
        self.cell_m = cell_m = max(cell_m, extent / 2**20)
        cells = ((points - self.origin) / cell_m).floor().long()  # [N, 3], each >= 0
        self.cells_per_axis = cells.amax(0) + 1 if points.shape[0] else cells.new_ones(3)
        keys = self._keys(cells)
        order = torch.argsort(keys)
        self.points = points[order]  # [N, 3] cell by cell
        self.cell_keys, self.cell_counts = torch.unique_consecutive(keys[order], return_counts=True)  # [C] ascending
        self.cell_starts = torch.cumsum(self.cell_counts, 0) - self.cell_counts

    def _keys(self, cells: torch.Tensor) -> torch.Tensor:
        return (cells[..., 0] * self.cells_per_axis[1] + cells[..., 1]) * self.cells_per_axis[2] + cells[..., 2]

    def near(self, centers: torch.Tensor, reach: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, point): indices into centers [P, 3] and self.points of every pair within reach[p] of its centre."""
        empty = torch.zeros(0, dtype=torch.long, device=centers.device)
        if self.cell_keys.numel() == 0 or centers.shape[0] == 0:
            return empty, empty
        span = int(math.ceil(2.0 * float(reach.max()) / self.cell_m)) + 1  # cells per axis that a ball can touch
        steps = torch.arange(span, device=centers.device)
        offsets = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)  # [S^3, 3]
        cells = ((centers - reach[:, None] - self.origin) / self.cell_m).floor().long()[:, None] + offsets  # [P, S^3, 3]
        valid = ((cells >= 0) & (cells < self.cells_per_axis)).all(-1)
        keys = self._keys(cells)
        found = torch.searchsorted(self.cell_keys, keys).clamp_max(self.cell_keys.numel() - 1)
        valid &= self.cell_keys[found] == keys
        counts = torch.where(valid, self.cell_counts[found], 0).flatten()  # points per (centre, cell)
        center = torch.arange(centers.shape[0], device=centers.device).repeat_interleave(offsets.shape[0]).repeat_interleave(counts)
        first = (self.cell_starts[found].flatten() - (torch.cumsum(counts, 0) - counts)).repeat_interleave(counts)
        point = first + torch.arange(center.numel(), device=centers.device)
        close = (self.points[point] - centers[center]).norm(dim=-1) < reach[center]
        return center[close], point[close]


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
    points: torch.Tensor  # [P, 3] the cloud ([0, 3] without one)
    box_polytopes: Polytopes  # [Kb] for the narrow phase
    cylinder_polytopes: Polytopes  # [Kc] circumscribed prisms

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
            point_field=None if scene.points is None else PointDistanceField.cached(scene.points, point_resolution_m, point_truncation_m, device, dtype),
            points=torch.zeros((0, 3), dtype=dtype, device=device) if scene.points is None else torch.tensor(scene.points, dtype=dtype, device=device),
            box_polytopes=Polytopes.stack(
                [_posed_polytope("box", np.asarray(b.half_extents), b.rotation, np.asarray(b.center)) for b in scene.boxes], device, dtype
            ),
            cylinder_polytopes=Polytopes.stack(
                [_posed_polytope("cylinder", np.array([c.radius, c.radius, c.half_height]), c.rotation, np.asarray(c.center)) for c in scene.cylinders],
                device, dtype,
            ),
        )

    @functools.cached_property
    def point_grid(self) -> PointGrid:
        """The cloud in cells, for the narrow phase: built when a check first needs it (4 / 8 / 40 ms for 20k / 50k /
        200k points on a CPU), so that a scene whose cloud no link comes near never pays for it, or ahead of the
        requests while the engine is idle (IKEngine.prepare_scene, the node after each model change)."""
        return PointGrid(self.points)

    @property
    def num_primitives(self) -> int:
        return self.box_center.shape[0] + self.sphere_center.shape[0] + self.cylinder_center.shape[0]

    def primitive_bounding_spheres(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres [K, 3] and radii [K] of spheres enclosing each primitive (order of primitive_distances)."""
        centers = torch.cat([self.box_center, self.sphere_center, self.cylinder_center])
        radii = torch.cat([
            self.box_half_extents.norm(dim=-1), self.sphere_radius,
            torch.sqrt(self.cylinder_radius.square() + self.cylinder_half_height.square())])
        return centers, radii

    @property
    def is_empty(self) -> bool:
        return self.num_primitives == 0 and self.point_field is None

    def primitive_distances(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance [K, N] of points [3, N] to each primitive: boxes, then spheres, then cylinders."""
        parts = []
        if self.box_center.shape[0]:
            parts.append(box_signed_distance(points, self.box_center, self.box_rotation, self.box_half_extents))
        if self.sphere_center.shape[0]:
            parts.append(sphere_signed_distance(points, self.sphere_center, self.sphere_radius))
        if self.cylinder_center.shape[0]:
            parts.append(cylinder_signed_distance(points, self.cylinder_center, self.cylinder_rotation, self.cylinder_radius, self.cylinder_half_height))
        return torch.cat(parts) if parts else points.new_zeros(0, points.shape[1])

    def distance(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance [N] of points [3, N] to the nearest obstacle (+inf in an empty scene)."""
        nearest = torch.full_like(points[0], float("inf"))
        if self.num_primitives:
            nearest = torch.minimum(nearest, self.primitive_distances(points).amin(0))
        if self.point_field is not None:
            nearest = torch.minimum(nearest, self.point_field.lower_bound(points))
        return nearest


# --- the checker -----------------------------------------------------------------------------------

class TorchCollisionChecker:
    """Collision checks of configuration batches q [B, 7] on any torch device: sphere broad phase, polytope narrow phase.

    A configuration is in scene collision when a link comes closer than `collision_margin_m` to an
    obstacle (the margin pads the robot against the world only, as MoveIt's link padding does), and
    in self-collision when two links of a checked pair touch or the wrist table reports contact.
    With `narrow_phase=False` the spheres alone decide (faster, far more conservative).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        collision_margin_m: float = 0.0,
        spheres_path: Path = SPHERES_PATH,
        wrist_table_path: Path = WRIST_TABLE_PATH,
        link_polytopes_path: Path = LINK_POLYTOPES_PATH,
        point_resolution_m: float = 0.01,
        max_batch: int | None = None,
        narrow_phase: bool = True,
        cloud_point_radius_m: float = 0.0,
    ):
        if collision_margin_m < 0:
            raise ValueError(f"collision_margin_m must be >= 0, got {collision_margin_m}")
        if cloud_point_radius_m < 0:
            raise ValueError(f"cloud_point_radius_m must be >= 0, got {cloud_point_radius_m}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.collision_margin_m = float(collision_margin_m)
        # Cloud points are balls of this radius: a surface sampled ~1 cm apart (a voxelized depth cloud) cannot
        # be passed through between its points (BENCHMARKS.md, "GetIK on generated scenes").
        self.cloud_point_radius_m = float(cloud_point_radius_m)
        self.point_resolution_m = float(point_resolution_m)
        self.narrow_phase = narrow_phase
        on_cpu = self.device.type == "cpu"
        # Configurations per tensor pass (results do not depend on it). On CPU, passes of 256 keep the
        # temporaries (510 sphere pairs x configurations) in cache: GetIK in the box was faster so than in
        # passes of 1024 (BENCHMARKS.md, "Prepared for the next device session"); a GPU wants passes as large
        # as memory allows.
        self.max_batch = max_batch or (256 if on_cpu else 65536)
        # Elements of the largest temporary (broad phase: obstacles x spheres x configurations; narrow
        # phase: pairs x edges x planes): bounds memory for any number of obstacles.
        self._max_elements = 1 << (23 if on_cpu else 27)
        self.kinematics = PandaKinematics(self.device, dtype)
        self.spheres = RobotSphereModel.load(spheres_path, self.device, dtype)
        self.wrist_table = WristClearanceTable.load(wrist_table_path, self.device, dtype)
        self.polytopes = LinkPolytopes.load(link_polytopes_path, self.device, dtype)
        links = list(self.spheres.link_slices)
        if set(links) != set(self.polytopes.row_of_link):
            raise ValueError(f"{spheres_path} and {link_polytopes_path} describe different links")
        self.self_pairs = [pair for pair in checked_link_pairs(links) if frozenset(pair) not in WRIST_TABLE_PAIRS]
        self._self_pair_rows = torch.tensor([[self.polytopes.row_of_link[a], self.polytopes.row_of_link[b]] for a, b in self.self_pairs], device=self.device)
        # The checked pairs' sphere gaps in one pass: every sphere of the pairs' first links against every sphere of
        # their second links (two contiguous ranges: links are in kinematic order), then each pair's minimum
        # (a few small kernels per pair made 170 of the ~300 kernels of a GPU broad phase).
        slices = self.spheres.link_slices
        sides = ({pair[side] for pair in self.self_pairs} for side in (0, 1))
        firsts, seconds = ([name for name in links if name in side] for side in sides)
        self._pair_first_spheres = slice(slices[firsts[0]].start, slices[firsts[-1]].stop)
        self._pair_second_spheres = slice(slices[seconds[0]].start, slices[seconds[-1]].stop)
        inner = [[name for name in links if part.start <= slices[name].start < part.stop]
                 for part in (self._pair_first_spheres, self._pair_second_spheres)]
        self._pair_first_groups, self._pair_second_groups = (
            padded_groups([slices[name].stop - slices[name].start for name in names], self.device) for names in inner)
        self._pair_radius_sums = (self.spheres.radii[self._pair_first_spheres, None] + self.spheres.radii[None, self._pair_second_spheres])[..., None]
        self._pair_index = torch.tensor([inner[0].index(a) * len(inner[1]) + inner[1].index(b) for a, b in self.self_pairs], device=self.device)
        scene_links = [name for name in links if name not in SCENE_EXCLUDED_LINKS]
        self.scene_sphere_index = torch.cat([torch.arange(self.spheres.link_slices[name].start, self.spheres.link_slices[name].stop) for name in scene_links]).to(self.device)
        self._scene_link_rows = torch.tensor([self.polytopes.row_of_link[name] for name in scene_links], device=self.device)
        self._scene_radii = self.spheres.radii[self.scene_sphere_index]
        # Each scene link's rows of scene_sphere_index.
        self._scene_link_groups = padded_groups([self.spheres.link_slices[name].stop - self.spheres.link_slices[name].start for name in scene_links],
                                                self.device)  # [Ls, most]
        # Each scene link's spheres, padded to the most any link has (radius -inf: gap +inf), and a sphere
        # (link frame) enclosing them all, for the broad phase's link-level prefilter.
        scene_slices = [self.spheres.link_slices[name] for name in scene_links]
        most_scene = max(part.stop - part.start for part in scene_slices)
        self._scene_link_frame_index = torch.tensor([LINK_INDEX[name] for name in scene_links], device=self.device)
        self._scene_link_sphere_centers = torch.zeros(len(scene_links), most_scene, 3, dtype=dtype, device=self.device)
        self._scene_link_sphere_radii = torch.full((len(scene_links), most_scene), -float("inf"), dtype=dtype, device=self.device)
        bound_centers, bound_radii = [], []
        for link, part in enumerate(scene_slices):
            centers, radii = self.spheres.centers[part], self.spheres.radii[part]
            self._scene_link_sphere_centers[link, :part.stop - part.start] = centers
            self._scene_link_sphere_radii[link, :part.stop - part.start] = radii
            middle = (centers.amin(0) + centers.amax(0)) / 2
            bound_centers.append(middle)
            bound_radii.append(((centers - middle).norm(dim=-1) + radii).amax())
        self._scene_link_bound_centers = torch.stack(bound_centers)  # [Ls, 3]
        self._scene_link_bound_radii = torch.stack(bound_radii)  # [Ls]
        # Bounding spheres of the link hulls (link frames), to find the cloud points near each link.
        low, high = self.polytopes.hull.vertices.amin(1), self.polytopes.hull.vertices.amax(1)
        self._hull_centers = (low + high) / 2  # [Lp, 3]
        self._hull_radii = (self.polytopes.hull.vertices - self._hull_centers[:, None]).norm(dim=-1).amax(1)  # [Lp]
        # Each polytope row's spheres (link frame), padded with radius -inf: they contain the link's hull.
        per_row = [self.spheres.link_slices[name] for name in sorted(self.polytopes.row_of_link, key=self.polytopes.row_of_link.get)]
        most = max(part.stop - part.start for part in per_row)
        self._row_sphere_centers = torch.zeros(len(per_row), most, 3, dtype=dtype, device=self.device)
        self._row_sphere_radii = torch.full((len(per_row), most), -float("inf"), dtype=dtype, device=self.device)
        for row, part in enumerate(per_row):
            self._row_sphere_centers[row, :part.stop - part.start] = self.spheres.centers[part]
            self._row_sphere_radii[row, :part.stop - part.start] = self.spheres.radii[part]
        # A cloud's distance field only has to be right below the largest distance that can decide a
        # collision; two cells more absorb the lookup's slack.
        self._point_truncation_m = (float(self.spheres.radii.max()) + self.collision_margin_m + self.cloud_point_radius_m
                                    + 2 * self.point_resolution_m)
        self._prepared: tuple[Scene, TensorScene] | None = None
        # On a GPU the broad phase is a few hundred small kernels whatever the batch: captured as CUDA graphs,
        # one per padded batch size, for the latest scene (`_broad_phase`). One lock: requests and the
        # background tuning share the graphs' buffers; a scene's graphs share one memory pool.
        self.cuda_graphs = self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.Tensor, GraphedCall]] = {}
        self._graphs_scene: TensorScene | None = None
        self._graphs_lock = threading.Lock()
        self._graph_pool: tuple[int, int] | None = None

    @property
    def point_field_settings(self) -> tuple[float, float]:
        """(resolution_m, truncation_m) of the distance fields this checker builds for clouds: a field
        built elsewhere with these and `PointDistanceField.remember`ed is used as is."""
        return self.point_resolution_m, self._point_truncation_m

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

    def _self_pair_gaps(self, centers: torch.Tensor) -> torch.Tensor:
        """[pairs, B] smallest sphere gap of each checked link pair (sphere centres [3, S, B])."""
        difference = centers[:, self._pair_first_spheres, None, :] - centers[:, None, self._pair_second_spheres, :]  # [3, firsts, seconds, B]
        gaps = _length(difference[0], difference[1], difference[2]) - self._pair_radius_sums
        link_gaps = _group_min(_group_min(gaps, self._pair_second_groups, 1), self._pair_first_groups, 0)  # [first links, second links, B]
        return link_gaps.flatten(0, 1).index_select(0, self._pair_index)

    def _scene_link_gaps(
        self, centers: torch.Tensor, tensor_scene: TensorScene, frames: torch.Tensor | None = None, exact_below_m: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sphere-model gaps to the scene: per (scene link, primitive) [Ls, K, B], and per scene link to the
        cloud [Ls, B] (+inf without one).

        With link frames [B, L, 4, 4] and `exact_below_m`, a (link, primitive) gap is exact only where it
        can be below exact_below_m; elsewhere it is a lower bound that is at least exact_below_m (from the
        link's and the primitive's bounding spheres), which is all that callers comparing gaps with a
        threshold up to exact_below_m need."""
        scene_centers = centers.index_select(1, self.scene_sphere_index)  # [3, S', B]
        count, batch = scene_centers.shape[1], scene_centers.shape[2]
        flat = scene_centers.reshape(3, -1)
        cloud_gaps = torch.full((self._scene_link_groups.shape[0], batch), float("inf"), dtype=self.dtype, device=self.device)
        if tensor_scene.point_field is not None:
            sphere_gaps = (tensor_scene.point_field.lower_bound(flat).view(count, batch) - self._scene_radii[:, None]
                           - self.cloud_point_radius_m)
            cloud_gaps = _group_min(sphere_gaps, self._scene_link_groups, 0)
        if tensor_scene.num_primitives == 0:
            return centers.new_zeros(self._scene_link_groups.shape[0], 0, batch), cloud_gaps
        if frames is not None and exact_below_m is not None and tensor_scene.num_primitives >= SPARSE_BROAD_PHASE_MIN_PRIMITIVES:
            sparse = self._sparse_link_gaps(frames, tensor_scene, exact_below_m)
            if sparse is not None:
                return sparse, cloud_gaps
        gaps = tensor_scene.primitive_distances(flat).view(tensor_scene.num_primitives, count, batch) - self._scene_radii[None, :, None]
        return _group_min(gaps, self._scene_link_groups, 1).transpose(0, 1), cloud_gaps

    def _sparse_link_gaps(self, frames: torch.Tensor, tensor_scene: TensorScene, exact_below_m: float) -> torch.Tensor | None:
        """The link gaps [Ls, K, B] of _scene_link_gaps computed per sphere only for the (link, primitive,
        configuration) triples whose bounding spheres come within exact_below_m; None when too many do
        (SPARSE_BROAD_PHASE_MAX_NEAR_FRACTION), for the dense pass."""
        link_frames = frames[:, self._scene_link_frame_index]  # [B, Ls, 4, 4]
        primitive_centers, primitive_radii = tensor_scene.primitive_bounding_spheres()
        # [Ls, K, B]: a lower bound of every sphere gap of the link to the primitive. Without gradients: where
        # it stands in for the gaps they are at least exact_below_m, where callers' costs are flat (and the
        # gradient of a distance is NaN where it is 0). Differences, not the matrix-product expansion, which
        # loses ~0.3 mm to cancellation in float32.
        with torch.no_grad():
            link_centers = (link_frames[..., :3, :3] @ self._scene_link_bound_centers[None, :, :, None]).squeeze(-1) + link_frames[..., :3, 3]
            distances = torch.cdist(link_centers.transpose(0, 1), primitive_centers[None].expand(link_centers.shape[1], -1, -1),
                                    compute_mode="donot_use_mm_for_euclid_dist")
            bound = distances.transpose(1, 2) - self._scene_link_bound_radii[:, None, None] - primitive_radii[None, :, None]
        near = bound < exact_below_m
        if int(near.sum()) > SPARSE_BROAD_PHASE_MAX_NEAR_FRACTION * near.numel():
            return None  # before gathering indices that the dense pass would not use
        link, primitive, config = torch.nonzero(near, as_tuple=True)
        gaps = bound.clone()
        if link.numel():
            exact = []
            per_triple = self._scene_link_sphere_centers.shape[1] * 3
            for part in self._narrow_chunks(link.numel(), per_triple):
                rotation = link_frames[config[part], link[part], :3, :3]  # [T, 3, 3]
                points = self._scene_link_sphere_centers[link[part]] @ rotation.transpose(1, 2) + link_frames[config[part], link[part], None, :3, 3]
                distance = pairwise_primitive_distances(points, tensor_scene, primitive[part])
                exact.append((distance - self._scene_link_sphere_radii[link[part]]).amin(1))
            gaps = gaps.index_put((link, primitive, config), torch.cat(exact))
        return gaps

    def clearances(self, q: torch.Tensor, scene: Scene | TensorScene | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sphere-model (scene clearance, self clearance) [B] each in metres, differentiable wrt q.

        Scene clearance: min over robot spheres of (distance of the centre to the nearest obstacle
        minus the radius), +inf without obstacles. Self clearance: min over checked sphere pairs of
        (centre distance minus both radii) and the wrist table's bound. Both are lower bounds of the
        meshes' clearances (negative values: penetration of the spheres, or of the wrist meshes).
        """
        q = q.to(device=self.device, dtype=self.dtype)
        tensor_scene = self._tensor_scene(scene)
        centers = self.spheres.world_centers(self.kinematics.link_transforms(q))  # [3, S, B]
        link_gaps, cloud_gaps = self._scene_link_gaps(centers, tensor_scene)
        cloud_gap = cloud_gaps.amin(0)
        scene_clearance = torch.minimum(cloud_gap, link_gaps.flatten(0, 1).amin(0)) if link_gaps.shape[1] else cloud_gap
        self_clearance = torch.minimum(self.wrist_table.lower_bound(q[:, 5], q[:, 6]), self._self_pair_gaps(centers).amin(0))
        return scene_clearance, self_clearance

    def signed_distance(self, q: torch.Tensor, scene: Scene | TensorScene | None = None) -> torch.Tensor:
        """[B] sphere-model min(scene clearance - margin, self clearance): a conservative, differentiable clearance."""
        scene_clearance, self_clearance = self.clearances(q, scene)
        return torch.minimum(scene_clearance - self.collision_margin_m, self_clearance)

    def penetration(self, q: torch.Tensor, scene: Scene | TensorScene | None = None, clearance_m: float = 0.0) -> torch.Tensor:
        """[B] sum of squared shortfalls below clearance_m of the sphere model's gaps, per (link, obstacle)
        and per checked link pair (plus the wrist table), differentiable wrt q: 0 when every gap is
        clear. Unlike the clearance (one worst pair), its gradient moves every offending link at once."""
        q = q.to(device=self.device, dtype=self.dtype)
        tensor_scene = self._tensor_scene(scene)
        frames = self.kinematics.link_transforms(q)
        centers = self.spheres.world_centers(frames)
        scene_target = clearance_m + self.collision_margin_m
        # Gaps at or above the target cost nothing: only those that can be below it need be exact.
        link_gaps, cloud_gaps = self._scene_link_gaps(centers, tensor_scene, frames, scene_target)
        cost = (scene_target - link_gaps).clamp_min(0.0).square().sum((0, 1)) + (scene_target - cloud_gaps).clamp_min(0.0).square().sum(0)
        cost = cost + (clearance_m - self._self_pair_gaps(centers)).clamp_min(0.0).square().sum(0)
        return cost + (-self.wrist_table.lower_bound(q[:, 5], q[:, 6])).clamp_min(0.0).square()

    def _narrow_chunks(self, count: int, per_pair: int) -> list[slice]:
        step = max(1, self._max_elements // max(per_pair, 1))
        return [slice(start, min(start + step, count)) for start in range(0, count, step)]

    def _links_meet_links(self, frames: torch.Tensor, config: torch.Tensor, rows: torch.Tensor, pad_m: float) -> torch.Tensor:
        """[P] whether link polytopes rows[:, 0] and rows[:, 1] of configurations `config` come closer than pad_m."""
        shapes, link_index = self.polytopes.coarse, self.polytopes.link_index
        hits = torch.zeros(len(config), dtype=torch.bool, device=self.device)
        for part in self._narrow_chunks(len(config), shapes.edges.shape[1] * shapes.planes.shape[1]):
            pairs = torch.arange(part.start, part.stop, device=self.device)
            row_a, row_b = rows[part, 0], rows[part, 1]
            frame_a = frames[config[part], link_index[row_a]]
            frame_b = frames[config[part], link_index[row_b]]
            # B in A's frame: x_a = Ra^T (Rb x_b + tb - ta).
            rotation = frame_a[:, :3, :3].transpose(1, 2) @ frame_b[:, :3, :3]
            translation = (frame_a[:, :3, :3].transpose(1, 2) @ (frame_b[:, :3, 3] - frame_a[:, :3, 3])[..., None])[..., 0]
            planes_b = transform_planes(shapes.planes[row_b], rotation, translation)
            # Vertex tests first, as against obstacles (_links_meet_polytopes): folded arms bring many pairs
            # through the spheres, and the edge test costs ~2.6 ms a pair on a CPU (367 edges x 126 planes each way).
            part_hits, undecided = _vertex_tests(shapes.vertices[row_a], planes_b, pad_m)
            hits[pairs] = part_hits
            open_pairs = torch.nonzero(undecided).squeeze(-1)
            vertices_b = shapes.vertices[row_b[open_pairs]] @ rotation[open_pairs].transpose(1, 2) + translation[open_pairs, None]
            open_hits, still_undecided = _vertex_tests(vertices_b, shapes.planes[row_a[open_pairs]], pad_m)
            hits[pairs[open_pairs]] = open_hits
            open_pairs = open_pairs[still_undecided]
            if open_pairs.numel():
                edges_b = (shapes.edges[row_b[open_pairs]] @ rotation[open_pairs, None].transpose(-1, -2)
                           + translation[open_pairs, None, None])
                hits[pairs[open_pairs]] = polytopes_meet(
                    shapes.edges[row_a[open_pairs]], shapes.planes[row_a[open_pairs]], edges_b, planes_b[open_pairs], pad_m)
        return hits

    def _link_frames(self, frames: torch.Tensor, config: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation [P, 3, 3] and translation [P, 3] taking base-frame points into the frames of links `rows` of configurations `config`."""
        frame = frames[config, self.polytopes.link_index[rows]]
        inverse_rotation = frame[:, :3, :3].transpose(1, 2)
        return inverse_rotation, -(inverse_rotation @ frame[:, :3, 3:])[..., 0]

    def _links_meet_polytopes(
        self, frames: torch.Tensor, config: torch.Tensor, rows: torch.Tensor, obstacles: Polytopes, obstacle: torch.Tensor, pad_m: float
    ) -> torch.Tensor:
        """[P] whether the hulls of links `rows` of configurations `config` come closer than pad_m to polytopes `obstacle`."""
        hull = self.polytopes.hull
        rotation, translation = self._link_frames(frames, config, rows)
        planes = transform_planes(obstacles.planes[obstacle], rotation, translation)  # [P, Fo, 4] in link frames
        # Cheap first, from the link's vertices against the obstacle's planes: most pairs the spheres
        # could not clear lie wholly beyond one obstacle facet, and most colliding pairs have a link
        # vertex inside the (padded) obstacle. Only the rest need the edge test.
        hits, undecided = _vertex_tests(hull.vertices[rows], planes, pad_m)
        # Then the same with the roles swapped: the obstacle's vertices against the link's facets.
        open_pairs = torch.nonzero(undecided).squeeze(-1)
        vertices = obstacles.vertices[obstacle[open_pairs]] @ rotation[open_pairs].transpose(1, 2) + translation[open_pairs, None]
        open_hits, still_undecided = _vertex_tests(vertices, hull.planes[rows[open_pairs]], pad_m)
        hits[open_pairs] = open_hits
        open_pairs = open_pairs[still_undecided]
        per_pair = hull.edges.shape[1] * obstacles.planes.shape[1] + obstacles.edges.shape[1] * hull.planes.shape[1]
        for part in self._narrow_chunks(len(open_pairs), per_pair):
            pairs = open_pairs[part]
            edges = obstacles.edges[obstacle[pairs]] @ rotation[pairs, None].transpose(-1, -2) + translation[pairs, None, None]
            hits[pairs] = polytopes_meet(hull.edges[rows[pairs]], hull.planes[rows[pairs]], edges, planes[pairs], pad_m)
        return hits

    def _links_meet_spheres(
        self, frames: torch.Tensor, config: torch.Tensor, rows: torch.Tensor, center: torch.Tensor, radius: torch.Tensor, pad_m: float
    ) -> torch.Tensor:
        """[P] whether sphere obstacles (centre [P, 3], radius [P]) may come closer than pad_m to the hulls of links `rows`.

        The distance from a point to a convex polytope is at least its largest facet-plane distance,
        so a centre beyond r + pad_m of some plane is clear (exact off the hull's edges and vertices).
        """
        hull = self.polytopes.hull
        rotation, translation = self._link_frames(frames, config, rows)
        local = (rotation @ center[..., None])[..., 0] + translation  # [P, 3]
        planes = hull.planes[rows]  # [P, F, 4]
        plane_distance = (planes[..., :3] @ local[..., None])[..., 0] - planes[..., 3]
        return plane_distance.amax(-1) < radius + pad_m

    def points_meet_links(self, q: torch.Tensor, points: PointGrid, pad_m: float) -> torch.Tensor:
        """[B] whether any point of the grid (base frame, on this checker's device and dtype) comes within pad_m
        of the hull of a link that collides with the scene, at configurations q [B, 7]: a cloud against the
        links' exact collision hulls (see `_links_meet_points`)."""
        q = q.to(device=self.device, dtype=self.dtype)
        rows = self._scene_link_rows
        config = torch.arange(q.shape[0], device=self.device).repeat_interleave(rows.numel())
        hits = torch.zeros(q.shape[0], dtype=torch.bool, device=self.device)
        with torch.no_grad():
            meet = self._links_meet_points(self.kinematics.link_transforms(q), config, rows.repeat(q.shape[0]), points, pad_m)
        hits[config[meet]] = True
        return hits

    def _links_meet_points(
        self, frames: torch.Tensor, config: torch.Tensor, rows: torch.Tensor, grid: PointGrid, pad_m: float
    ) -> torch.Tensor:
        """[P] whether any cloud point comes within pad_m of the hull of link rows[p] at configuration config[p].

        A point within pad_m of a convex hull is within pad_m of every facet plane, so the test never
        misses a contact; beyond the hull's edges and vertices it reports up to pad_m x (sqrt(3) - 1)
        more than the true distance would. Only the points inside the link's bounding sphere, and then
        inside one of its collision spheres (which contain the hull), meet the planes.
        """
        hits = torch.zeros(config.shape[0], dtype=torch.bool, device=self.device)
        points = grid.points
        if config.numel() == 0 or points.shape[0] == 0:
            return hits
        planes = self.polytopes.hull.planes
        frame = frames[config, self.polytopes.link_index[rows]]  # [P, 4, 4]
        rotation, translation = frame[:, :3, :3], frame[:, :3, 3]
        centers = (rotation @ self._hull_centers[rows][..., None])[..., 0] + translation  # [P, 3]
        reach = self._hull_radii[rows] + pad_m
        per_query = max(1, self._max_elements // POINT_GRID_POINTS_PER_PAIR)
        for start in range(0, config.shape[0], per_query):
            pair, point = grid.near(centers[start:start + per_query], reach[start:start + per_query])
            pair = pair + start
            for part in self._narrow_chunks(pair.numel(), self._row_sphere_radii.shape[1]):
                near = pair[part]
                local = ((points[point[part]] - translation[near])[:, None] @ rotation[near])[:, 0]  # R^T (p - t)
                row = rows[near]
                close = ((local[:, None] - self._row_sphere_centers[row]).norm(dim=-1) < self._row_sphere_radii[row] + pad_m).any(-1)
                near, local = near[close], local[close]
                # Per link: one product of its points with its planes. (Gathering each point's [F, 4] planes copied
                # ~500 planes per point: 0.26 s of a 0.29 s check with links among a 15k-point cloud.)
                near_rows = rows[near]
                for row in torch.unique(near_rows).tolist():
                    of_row = torch.nonzero(near_rows == row).squeeze(-1)
                    face = planes[row]  # [F, 4]
                    for within in self._narrow_chunks(of_row.numel(), planes.shape[1]):
                        index = of_row[within]
                        inside = (local[index] @ face[:, :3].T - face[:, 3]).amax(-1) < pad_m
                        hits[near[index][inside]] = True
        return hits

    def _sphere_gaps(self, q: torch.Tensor, tensor_scene: TensorScene) -> tuple[torch.Tensor, ...]:
        """The broad phase of `check`: link frames [B, L, 4, 4], sphere gaps per (scene link, primitive)
        [Ls, K, B] and per scene link to the cloud [Ls, B], per checked link pair [pairs, B], and the
        wrist table's bound [B]."""
        frames = self.kinematics.link_transforms(q)  # [B, L, 4, 4]
        centers = self.spheres.world_centers(frames)  # [3, S, B]
        link_gaps, cloud_gaps = self._scene_link_gaps(centers, tensor_scene, frames, self.collision_margin_m)
        return frames, link_gaps, cloud_gaps, self._self_pair_gaps(centers), self.wrist_table.lower_bound(q[:, 5], q[:, 6])

    def _broad_phase(self, q: torch.Tensor, tensor_scene: TensorScene) -> tuple[torch.Tensor, ...]:
        """`_sphere_gaps`, replayed from a CUDA graph on a GPU: q is padded to the next power of two (at
        least GRAPH_MIN_BATCH), whose graph is captured at its second use. Scenes with many primitives
        take the sparse pass, whose size depends on the data: those run eagerly."""
        count = q.shape[0]
        if not self.cuda_graphs or tensor_scene.num_primitives >= SPARSE_BROAD_PHASE_MIN_PRIMITIVES or count == 0:
            return self._sphere_gaps(q, tensor_scene)
        size = padded_size(count, GRAPH_MIN_BATCH)
        with self._graphs_lock:
            if self._graphs_scene is not tensor_scene:
                # A fresh pool with the new graphs: a pool whose graphs are all gone is released, and capturing
                # into its handle again fails (an allocator assertion, seen on an H200 with torch 2.11).
                self._graphs, self._graphs_scene = {}, tensor_scene
                self._graph_pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
            if size not in self._graphs:
                padded = q.new_zeros(size, q.shape[1])
                self._graphs[size] = (padded, GraphedCall(lambda: self._sphere_gaps(padded, tensor_scene), self.device, pool=self._graph_pool))
            padded, graphed = self._graphs[size]
            write_padded(padded, q)
            frames, link_gaps, cloud_gaps, pair_gaps, wrist = graphed()
            # Copies of the rows asked for: the next replay of any of these graphs may overwrite the buffers.
            return frames[:count].clone(), link_gaps[..., :count].clone(), cloud_gaps[:, :count].clone(), pair_gaps[:, :count].clone(), wrist[:count].clone()

    def _check_batch(self, q: torch.Tensor, tensor_scene: TensorScene, narrow_phase: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scene collision, self collision, sphere scene clearance, sphere self clearance) [B] each."""
        frames, link_gaps, cloud_gaps, pair_gaps, wrist_clearance = self._broad_phase(q, tensor_scene)
        cloud_gap = cloud_gaps.amin(0)
        # Spheres clear a (link, obstacle) pair or a (link, cloud) pair, or the narrow phase decides it.
        scene_clearance = torch.minimum(cloud_gap, link_gaps.flatten(0, 1).amin(0)) if link_gaps.shape[1] else cloud_gap
        undecided = link_gaps < self.collision_margin_m
        cloud_undecided = cloud_gaps < self.collision_margin_m  # [Ls, B]
        pad_m = self.collision_margin_m + BULLET_HULL_MARGIN_M + NARROW_PHASE_SLACK_M
        if not narrow_phase:
            scene_collision = undecided.flatten(0, 1).any(0) | cloud_undecided.any(0)
        else:
            scene_collision = torch.zeros_like(cloud_gap, dtype=torch.bool)
            link, config = torch.nonzero(cloud_undecided, as_tuple=True)
            if config.numel():
                # Each configuration's deepest link first: where it meets the cloud the configuration collides, and
                # its other links need no test (the rows the spheres reject mostly collide; each link's test
                # against a dense cloud costs ~1-5 ms on a CPU).
                deepest_first = link == cloud_gaps.argmin(0)[config]
                for stage in (deepest_first, ~deepest_first):
                    stage = stage & ~scene_collision[config]
                    hits = self._links_meet_points(frames, config[stage], self._scene_link_rows[link[stage]], tensor_scene.point_grid,
                                                   pad_m + self.cloud_point_radius_m)
                    scene_collision[config[stage][hits]] = True
            link, obstacle, config = torch.nonzero(undecided, as_tuple=True)
            if config.numel():
                rows = self._scene_link_rows[link]
                hits = torch.zeros_like(config, dtype=torch.bool)
                num_boxes, num_spheres = tensor_scene.box_center.shape[0], tensor_scene.sphere_center.shape[0]
                kind = (obstacle >= num_boxes).long() + (obstacle >= num_boxes + num_spheres).long()  # 0 box, 1 sphere, 2 cylinder
                boxes, spheres, cylinders = (torch.nonzero(kind == value).squeeze(-1) for value in range(3))
                if boxes.numel():
                    hits[boxes] = self._links_meet_polytopes(frames, config[boxes], rows[boxes], tensor_scene.box_polytopes, obstacle[boxes], pad_m)
                if spheres.numel():
                    index = obstacle[spheres] - num_boxes
                    hits[spheres] = self._links_meet_spheres(
                        frames, config[spheres], rows[spheres], tensor_scene.sphere_center[index], tensor_scene.sphere_radius[index], pad_m
                    )
                if cylinders.numel():
                    index = obstacle[cylinders] - num_boxes - num_spheres
                    hits[cylinders] = self._links_meet_polytopes(frames, config[cylinders], rows[cylinders], tensor_scene.cylinder_polytopes, index, pad_m)
                scene_collision[config[hits]] = True
        self_clearance = torch.minimum(wrist_clearance, pair_gaps.amin(0))
        self_collision = wrist_clearance < 0.0
        if not narrow_phase:
            self_collision |= (pair_gaps < 0.0).any(0)
        else:
            pair, config = torch.nonzero(pair_gaps < 0.0, as_tuple=True)
            if config.numel():
                # Both hulls carry Bullet's margin.
                pad_m = 2 * BULLET_HULL_MARGIN_M + NARROW_PHASE_SLACK_M
                hits = self._links_meet_links(frames, config, self._self_pair_rows[pair], pad_m)
                self_collision[config[hits]] = True
        return scene_collision, self_collision, scene_clearance, self_clearance

    def check(self, q: torch.Tensor, scene: Scene | TensorScene | None = None, narrow_phase: bool | None = None) -> CollisionResult:
        """Collision flags for configurations q [B, 7] (no gradients).

        narrow_phase overrides the checker's setting for this call (False: the spheres alone decide,
        several times faster and more conservative). signed_distance is the sphere model's
        clearance (where every obstacle is beyond the margin, a lower bound of it: see
        _sparse_link_gaps), clipped at 0 where the narrow phase found no contact, so that it is
        negative iff the configuration is in collision.
        """
        q = q.to(device=self.device, dtype=self.dtype)
        tensor_scene = self._tensor_scene(scene)
        spheres_per_config = max(tensor_scene.num_primitives, 1) * self.scene_sphere_index.numel()
        batch = max(1, min(self.max_batch, self._max_elements // spheres_per_config))
        narrow = self.narrow_phase if narrow_phase is None else narrow_phase
        with torch.no_grad():
            parts = [self._check_batch(chunk, tensor_scene, narrow) for chunk in q.split(batch)]
        empty = q.new_zeros(0)
        scene_collision, self_collision, scene_clearance, self_clearance = (
            torch.cat([part[i] for part in parts]) if parts else (empty.bool() if i < 2 else empty) for i in range(4)
        )
        in_collision = scene_collision | self_collision
        signed_distance = torch.minimum(scene_clearance - self.collision_margin_m, self_clearance)
        return CollisionResult(
            in_collision=in_collision,
            self_collision=self_collision,
            scene_collision=scene_collision,
            signed_distance=torch.where(in_collision, signed_distance.clamp_max(-1e-9), signed_distance.clamp_min(0.0)),
        )
