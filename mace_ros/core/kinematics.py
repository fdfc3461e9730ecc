"""Batched forward kinematics and geometric Jacobians of the Franka Emika Panda in torch.

The kinematic chain (joint origins) is the one of the Panda URDF shipped in the `pybullet`
wheel (`pybullet_data/franka_panda/panda.urdf`, itself from Franka's `franka_description`),
so that FK matches PyBullet to machine precision. Joint limits are Franka's published
limits (Franka Control Interface documentation, "Robot and interface specifications"),
which are tighter than the URDF's.

Every function takes a leading batch dimension; device and dtype follow the inputs.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

# The URDF writes pi/2 as 1.57079632679; keeping its literal keeps FK bit-compatible with PyBullet.
HALF_PI_URDF = 1.57079632679

JOINT_NAMES: tuple[str, ...] = tuple(f"panda_joint{i}" for i in range(1, 8))

# Franka's published position limits (rad).
JOINT_LOWER = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973)
JOINT_UPPER = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973)

FINGER_OPENING_M = 0.04  # each finger's prismatic joint; the gripper is modelled open.
TCP_OFFSET_M = 0.1034  # panda_hand to panda_hand_tcp along the hand's z axis (franka_description)


@dataclass(frozen=True)
class LinkSpec:
    """A link and the joint that attaches it to its parent."""

    name: str
    parent: str | None
    xyz: tuple[float, float, float]
    rpy: tuple[float, float, float]
    joint_index: int | None = None  # index into the 7 arm joints if revolute about local z
    prismatic_axis: tuple[float, float, float] | None = None  # fingers, fixed at FINGER_OPENING_M


# Order matters: parents come before children.
PANDA_LINKS: tuple[LinkSpec, ...] = (
    LinkSpec("panda_link0", None, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    LinkSpec("panda_link1", "panda_link0", (0.0, 0.0, 0.333), (0.0, 0.0, 0.0), 0),
    LinkSpec("panda_link2", "panda_link1", (0.0, 0.0, 0.0), (-HALF_PI_URDF, 0.0, 0.0), 1),
    LinkSpec("panda_link3", "panda_link2", (0.0, -0.316, 0.0), (HALF_PI_URDF, 0.0, 0.0), 2),
    LinkSpec("panda_link4", "panda_link3", (0.0825, 0.0, 0.0), (HALF_PI_URDF, 0.0, 0.0), 3),
    LinkSpec("panda_link5", "panda_link4", (-0.0825, 0.384, 0.0), (-HALF_PI_URDF, 0.0, 0.0), 4),
    LinkSpec("panda_link6", "panda_link5", (0.0, 0.0, 0.0), (HALF_PI_URDF, 0.0, 0.0), 5),
    LinkSpec("panda_link7", "panda_link6", (0.088, 0.0, 0.0), (HALF_PI_URDF, 0.0, 0.0), 6),
    LinkSpec("panda_link8", "panda_link7", (0.0, 0.0, 0.107), (0.0, 0.0, 0.0)),
    LinkSpec("panda_hand", "panda_link8", (0.0, 0.0, 0.0), (0.0, 0.0, -0.785398163397)),
    LinkSpec("panda_leftfinger", "panda_hand", (0.0, 0.0, 0.0584), (0.0, 0.0, 0.0),
             prismatic_axis=(0.0, 1.0, 0.0)),
    LinkSpec("panda_rightfinger", "panda_hand", (0.0, 0.0, 0.0584), (0.0, 0.0, 0.0),
             prismatic_axis=(0.0, -1.0, 0.0)),
    LinkSpec("panda_grasptarget", "panda_hand", (0.0, 0.0, 0.105), (0.0, 0.0, 0.0)),
    # Franka's TCP frame (franka_description's panda_hand_tcp_joint), the usual MoveIt tip link.
    LinkSpec("panda_hand_tcp", "panda_hand", (0.0, 0.0, TCP_OFFSET_M), (0.0, 0.0, 0.0)),
)

LINK_NAMES: tuple[str, ...] = tuple(link.name for link in PANDA_LINKS)
LINK_INDEX: dict[str, int] = {name: i for i, name in enumerate(LINK_NAMES)}


def rpy_to_matrix(rpy: torch.Tensor) -> torch.Tensor:
    """URDF fixed-axis roll-pitch-yaw [..., 3] -> rotation matrices [..., 3, 3] (R = Rz Ry Rx)."""
    roll, pitch, yaw = rpy.unbind(-1)
    cr, sr, cp, sp, cy, sy = roll.cos(), roll.sin(), pitch.cos(), pitch.sin(), yaw.cos(), yaw.sin()
    rows = (
        torch.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
        torch.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
        torch.stack([-sp, cp * sr, cp * cr], -1),
    )
    return torch.stack(rows, -2)


def _origin_transform(link: LinkSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3] = rpy_to_matrix(torch.tensor(link.rpy, dtype=torch.float64))
    transform[:3, 3] = torch.tensor(link.xyz, dtype=torch.float64)
    if link.prismatic_axis is not None:
        transform[:3, 3] += FINGER_OPENING_M * torch.tensor(link.prismatic_axis, dtype=torch.float64)
    return transform.to(device=device, dtype=dtype)


class PandaKinematics:
    """Forward kinematics and Jacobians for batches of Panda arm configurations q [B, 7]."""

    num_joints = 7
    joint_names = JOINT_NAMES
    link_names = LINK_NAMES

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.origins = torch.stack([_origin_transform(link, dtype, self.device) for link in PANDA_LINKS])
        self.parent_index = [LINK_INDEX[link.parent] if link.parent else -1 for link in PANDA_LINKS]
        # Origins of the joints' links in joint order [7, 4, 4], for the batched joint rotations.
        self._joint_origins = torch.stack([
            self.origins[index] for joint in range(self.num_joints)
            for index, link in enumerate(PANDA_LINKS) if link.joint_index == joint])
        self.joint_lower = torch.tensor(JOINT_LOWER, dtype=dtype, device=self.device)
        self.joint_upper = torch.tensor(JOINT_UPPER, dtype=dtype, device=self.device)

    def link_transforms(self, q: torch.Tensor) -> torch.Tensor:
        """Poses of every link in the base frame: q [B, 7] -> [B, L, 4, 4] (order of LINK_NAMES)."""
        q = q.to(device=self.device, dtype=self.dtype)
        batch = q.shape[0]
        # Every joint's local transform at once: its fixed origin, then the rotation about its local z.
        # (Per link, the same took ~10 small ops each: ~1 ms per call for small batches on a CPU.)
        c, s = q.cos()[..., None], q.sin()[..., None]  # [B, 7, 1]
        origins = self._joint_origins
        x_axis, y_axis = origins[:, :3, 0], origins[:, :3, 1]  # [7, 3]
        top = torch.stack([
            x_axis * c + y_axis * s, y_axis * c - x_axis * s,  # the origin's x and y axes turned by q about its z
            origins[:, :3, 2].expand(batch, -1, -1), origins[:, :3, 3].expand(batch, -1, -1)], -1)  # [B, 7, 3, 4]
        joint_locals = torch.cat([top, origins[:, 3:, :].expand(batch, -1, -1, -1)], -2)  # [B, 7, 4, 4]
        frames: list[torch.Tensor] = []
        for index, link in enumerate(PANDA_LINKS):
            if link.parent is None:
                frames.append(self.origins[index].expand(batch, 4, 4))
            elif link.joint_index is not None:
                frames.append(frames[self.parent_index[index]] @ joint_locals[:, link.joint_index])
            else:
                frames.append(frames[self.parent_index[index]] @ self.origins[index])
        return torch.stack(frames, 1)

    def forward(self, q: torch.Tensor, tip_link: str = "panda_hand") -> tuple[torch.Tensor, torch.Tensor]:
        """Tip position [B, 3] and rotation [B, 3, 3] in the base frame."""
        frames = self.link_transforms(q)[:, LINK_INDEX[tip_link]]
        return frames[:, :3, 3], frames[:, :3, :3]

    def jacobian(self, q: torch.Tensor, tip_link: str = "panda_hand") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Geometric Jacobian [B, 6, 7] (linear rows first) of tip_link, with its position and rotation."""
        frames = self.link_transforms(q)
        tip = frames[:, LINK_INDEX[tip_link]]
        tip_position = tip[:, :3, 3]
        # Joint i rotates about the z axis of the frame of the link it moves (panda_link{i+1}).
        joint_frames = frames[:, 1:8]
        axes = joint_frames[:, :, :3, 2]
        origins = joint_frames[:, :, :3, 3]
        linear = torch.linalg.cross(axes, tip_position[:, None, :] - origins, dim=-1)
        jac = torch.cat([linear, axes], -1).transpose(1, 2)
        # Joints after the tip's chain do not move it (only relevant for tips before panda_link7).
        tip_index = LINK_INDEX[tip_link]
        if tip_index < 8:
            jac[:, :, tip_index:] = 0.0
        return jac, tip_position, tip[:, :3, :3]

    def within_limits(self, q: torch.Tensor) -> torch.Tensor:
        """[B] bool: every joint inside Franka's published limits."""
        return ((q >= self.joint_lower) & (q <= self.joint_upper)).all(-1)

    def clamp_to_limits(self, q: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(q, self.joint_upper), self.joint_lower)

    def random_configurations(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n configurations uniform within the joint limits, [n, 7]."""
        u = torch.rand(n, 7, generator=generator, device=self.device, dtype=self.dtype)
        return self.joint_lower + u * (self.joint_upper - self.joint_lower)


# Reach bounds follow each joint axis this far either side of the joint's origin, at this spacing.
REACH_AXIS_HALF_LENGTH_M = 1.0
REACH_AXIS_STEP_M = 0.002
# A pose goal's check places every this-many-th of those points on the tip's last axis (each is a valid test).
REACH_POSE_POINT_STRIDE = 5
REACH_GOALS_PER_CHUNK = 2048


@dataclass(frozen=True)
class ReachBound:
    """Where no configuration puts a tip link, even ignoring joint limits and obstacles.

    A joint turns everything after it about its axis, so the distance between a point on axis k and one on
    axis k + 1 (both fixed in the link between them) never changes, nor does that between a point on the
    tip's last axis and the tip. By the triangle inequality the tip is never farther from `center` (on the
    first axis) than the shortest path center -> axis 1 -> ... -> last axis -> tip through such points,
    found by dynamic programming over points along each axis. A goal orientation fixes every point on the
    last axis too: each must lie within its own path's length of `center`. Points and lengths in float64."""

    center: torch.Tensor  # [3], base frame
    path_m: torch.Tensor  # [M] shortest path from center to each point on the tip's last axis
    points_in_tip: torch.Tensor  # [M, 3] those points in the tip link's frame

    def excess_m(self, position: torch.Tensor, rotation: torch.Tensor | None, orientation_tolerance_rad: float = 0.0) -> torch.Tensor:
        """How far (m) each goal, position [B, 3] and rotation [B, 3, 3] or None, lies beyond the bound: > 0 is
        out of reach. An orientation within `orientation_tolerance_rad` of the goal's moves each point by at
        most that times its distance from the tip, which the pose test allows for."""
        center, path_m, points = (value.to(position.device) for value in (self.center, self.path_m, self.points_in_tip))
        position = position.to(torch.float64)
        lever_m = points.norm(dim=-1)
        if rotation is None:
            return (position - center).norm(dim=-1) - (path_m + lever_m).min()
        allowed_m = (path_m + orientation_tolerance_rad * lever_m)[::REACH_POSE_POINT_STRIDE]
        points = points[::REACH_POSE_POINT_STRIDE]
        rotation = rotation.to(torch.float64)
        excess = []
        for start in range(0, position.shape[0], REACH_GOALS_PER_CHUNK):
            chunk = slice(start, start + REACH_GOALS_PER_CHUNK)
            placed = position[chunk, None, :] + points @ rotation[chunk].transpose(-1, -2)  # [b, M', 3]
            excess.append(((placed - center).norm(dim=-1) - allowed_m).max(-1).values)
        return torch.cat(excess)


def _closest_point_on_first_line(origin_a: torch.Tensor, direction_a: torch.Tensor, origin_b: torch.Tensor, direction_b: torch.Tensor) -> torch.Tensor:
    """The point of line a nearest line b (a's origin when they are parallel); unit directions."""
    cross = torch.linalg.cross(direction_a, direction_b)
    if float(cross.norm()) < 1e-9:
        return origin_a
    offset = origin_b - origin_a
    t = torch.dot(torch.linalg.cross(offset, direction_b), cross) / torch.dot(cross, cross)
    return origin_a + t * direction_a


@functools.lru_cache(maxsize=None)
def _reach_paths(last_joint: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(center [3], points along joint `last_joint`'s axis [M, 3], shortest path from center to each [M]) at q = 0."""
    frames = PandaKinematics(dtype=torch.float64).link_transforms(torch.zeros(1, 7, dtype=torch.float64))[0]
    joint_links = [next(i for i, link in enumerate(PANDA_LINKS) if link.joint_index == joint) for joint in range(last_joint + 1)]
    axes = [(frames[index, :3, 3], frames[index, :3, 2]) for index in joint_links]
    steps = torch.arange(-REACH_AXIS_HALF_LENGTH_M, REACH_AXIS_HALF_LENGTH_M + REACH_AXIS_STEP_M / 2, REACH_AXIS_STEP_M, dtype=torch.float64)
    axis_points = [origin + steps[:, None] * direction for origin, direction in axes]
    center = _closest_point_on_first_line(*axes[0], *axes[1]) if len(axes) > 1 else axes[0][0]
    path_m = (axis_points[0] - center).norm(dim=-1)
    for before, after in zip(axis_points, axis_points[1:]):
        path_m = (path_m[:, None] + torch.cdist(before, after)).min(0).values
    return center, axis_points[-1], path_m


@functools.lru_cache(maxsize=None)
def reach_bound(tip_link: str) -> ReachBound:
    """The ReachBound of `tip_link` (a name of LINK_NAMES), made once per link."""
    tip_frame = PandaKinematics(dtype=torch.float64).link_transforms(torch.zeros(1, 7, dtype=torch.float64))[0, LINK_INDEX[tip_link]]
    ancestor = LINK_INDEX[tip_link]  # the tip's last joint is that of its nearest ancestor (or itself) with one
    while PANDA_LINKS[ancestor].joint_index is None and PANDA_LINKS[ancestor].parent is not None:
        ancestor = LINK_INDEX[PANDA_LINKS[ancestor].parent]
    last_joint = PANDA_LINKS[ancestor].joint_index
    if last_joint is None:  # the base: it never moves
        return ReachBound(tip_frame[:3, 3], torch.zeros(1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    center, last_axis_points, path_m = _reach_paths(last_joint)
    return ReachBound(center, path_m, (last_axis_points - tip_frame[:3, 3]) @ tip_frame[:3, :3])


def rotation_angle_between(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Angle (rad) of the relative rotation between [B, 3, 3] matrices, numerically safe near 0 and pi."""
    relative = rot_a.transpose(-1, -2) @ rot_b
    rotvec = matrix_to_rotation_vector(relative)
    return rotvec.norm(dim=-1)


def matrix_to_rotation_vector(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> axis-angle vectors [..., 3], via quaternions for stability."""
    quat = matrix_to_quaternion(rot)
    w = quat[..., 0].clamp(-1.0, 1.0)
    xyz = quat[..., 1:]
    sin_half = xyz.norm(dim=-1)
    angle = 2.0 * torch.atan2(sin_half, w)
    scale = torch.where(sin_half > 1e-12, angle / sin_half.clamp_min(1e-12), 2.0 / w.clamp_min(1e-12))
    return xyz * scale[..., None]


@functools.lru_cache(maxsize=None)
def _shepperd_map(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients [9, 16], constant [16]) such that m.flatten() @ coefficients + constant is the
    symmetric 4 x 4 matrix K of rotation matrix m whose row i is 4 q_i (w, x, y, z) q (Shepperd's method).
    Made once per device and dtype, so that calls inside a CUDA graph copy nothing from the host."""
    coefficients = torch.zeros(3, 3, 4, 4, dtype=torch.float64)
    constant = torch.zeros(4, 4, dtype=torch.float64)
    for row, signs in enumerate(((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1))):  # 1 +- m00 +- m11 +- m22
        constant[row, row] = 1.0
        for axis, sign in enumerate(signs):
            coefficients[axis, axis, row, row] = sign
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):  # w with axis a: m[c, b] - m[b, c]
        for row, col in ((0, a + 1), (a + 1, 0)):
            coefficients[c, b, row, col], coefficients[b, c, row, col] = 1.0, -1.0
    for a, b in ((0, 1), (0, 2), (1, 2)):  # axes a and b: m[a, b] + m[b, a]
        for row, col in ((a + 1, b + 1), (b + 1, a + 1)):
            coefficients[a, b, row, col] = coefficients[b, a, row, col] = 1.0
    return coefficients.reshape(9, 16).to(device, dtype), constant.reshape(16).to(device, dtype)


def matrix_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] as (w, x, y, z) with w >= 0.

    All four of Shepperd's candidate rows come from one matrix product (a row per stack took ~4x the
    time for a batch of 64, most of an LM iteration's rotation error); the best-conditioned one, that
    of the largest diagonal term, is kept per matrix."""
    coefficients, constant = _shepperd_map(rot.device, rot.dtype)
    candidates = (rot.reshape(*rot.shape[:-2], 9) @ coefficients + constant).reshape(*rot.shape[:-2], 4, 4)
    best = candidates.diagonal(dim1=-2, dim2=-1).argmax(-1)
    quat = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    quat = quat / quat.norm(dim=-1, keepdim=True)
    return torch.where(quat[..., :1] < 0, -quat, quat)


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Quaternions [..., 4] as (w, x, y, z), normalized here -> rotation matrices [..., 3, 3]."""
    quat = quat / quat.norm(dim=-1, keepdim=True)
    w, x, y, z = quat.unbind(-1)
    rows = (
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    )
    return torch.stack(rows, -2)
