"""The node's obstacle model: static scene + markers from ~/obstacles + the latest ~/obstacle_cloud per sensor.

Topic callbacks update it while requests run; each request takes an immutable Scene snapshot.
What enters it is bounded by the workspace (points and primitives beyond the robot's reach are
dropped), and clouds lose the robot's own points (`SelfFilter`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mace_ros.core.scene import Box, Cylinder, Scene, Sphere
    from mace_ros.ros.frames import RigidTransform


# Workspace voxel grids up to this many cells are thinned with a reusable occupancy array (the
# default workspace at 1 cm has 9.3M cells, 9.3 MB); larger grids sort the occupied cells' keys.
MAX_DENSE_VOXELS = 1 << 24
# Self-filter candidates per matrix product: bounds its [chunk, spheres] temporaries (~4 MB).
SELF_FILTER_CHUNK = 8192


@dataclass(frozen=True)
class Workspace:
    """The axis-aligned box (base frame) where obstacles can matter: the robot's reach plus a margin.

    It bounds what the obstacle model holds, so that no input (a far point, markers kilometres away)
    can make the distance field or the collision checks large.
    """

    low: np.ndarray  # [3]
    high: np.ndarray  # [3]

    @staticmethod
    def from_bounds(low: list[float], high: list[float]) -> Workspace:
        low_array, high_array = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        if low_array.shape != (3,) or high_array.shape != (3,) or not (low_array < high_array).all():
            raise ValueError(f"workspace bounds must be [x, y, z] with min < max, got {low} and {high}")
        return Workspace(low_array, high_array)

    def meets(self, primitive: Box | Sphere | Cylinder) -> bool:
        """Whether the primitive's bounding sphere reaches into the box."""
        from mace_ros.core.scene import Box, Sphere

        if isinstance(primitive, Box):
            radius = float(np.linalg.norm(primitive.half_extents))
        elif isinstance(primitive, Sphere):
            radius = primitive.radius
        else:
            radius = float(np.hypot(primitive.radius, primitive.half_height))
        center = np.asarray(primitive.center, dtype=np.float64)
        return bool(np.linalg.norm(center - np.clip(center, self.low, self.high)) <= radius)


@dataclass(frozen=True)
class CroppedCloud:
    """A cloud cropped to the workspace and thinned (CloudVoxelizer.voxelize)."""

    points: np.ndarray  # [M, 3] float64 in the base frame: occupied voxels' centres (every point if unthinned)
    inside: int  # points that fell inside the workspace
    outside: int  # finite points that fell outside it (dropped)


class CloudVoxelizer:
    """Camera clouds into the obstacle model's points: into the base frame, cropped to the workspace
    and thinned to the centre of each occupied voxel of a grid fixed to the workspace, in one pass over
    the message's coordinates in their own precision.

    Why one pass: as separate steps (decode to float64, transform, crop, thin), each copying every
    point, a 640 x 480 cloud took 26.5 ms (1280 x 720: 95.7 ms); this takes 7.4 (22.3) ms, 8.3 (26.7)
    from a rotated camera frame, in one process on the 2-core development CPU (BENCHMARKS.md,
    "Depth-camera streams"). Voxel centres
    (as OctoMap keeps) lie within sqrt(3)/2 voxel of every point they stand for, half the distance a
    voxel's first point can lie from the others.
    Not thread-safe: one instance per processing thread (the occupancy array is reused).
    """

    def __init__(self, workspace: Workspace, voxel_size_m: float) -> None:
        self.workspace = workspace
        self.voxel_size_m = voxel_size_m
        if voxel_size_m > 0.0:
            self._cells = (np.floor((workspace.high - workspace.low) / voxel_size_m).astype(np.int64) + 1)
            self._cell_count = float(np.prod(self._cells.astype(np.float64)))
        self._occupied: np.ndarray | None = None  # allocated on first use, for dense grids

    def voxelize(self, xyz: np.ndarray, to_base: RigidTransform) -> CroppedCloud:
        """xyz: [N, 3] in the sensor frame (float32 or float64, a strided view of the message welcome;
        NaN = no return); to_base: the sensor-to-base RigidTransform."""
        low = self.workspace.low
        thinned = self.voxel_size_m > 0.0
        scale = 1.0 / self.voxel_size_m if thinned else 1.0
        dtype = np.result_type(xyz.dtype, np.float32)
        # Base-frame coordinates relative to the workspace's corner, in voxels (metres unthinned), as
        # [3, N] rows from one matrix product (a camera frame's rotation costs no more than none).
        # Values far beyond the workspace may overflow to inf: they are dropped, so not warned about.
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (to_base.rotation * scale).astype(dtype) @ xyz.T
            scaled += ((to_base.translation - low) * scale).astype(dtype)[:, None]
        bound = (self._cells if thinned else self.workspace.high - low).astype(dtype)[:, None]
        inside = ((scaled >= 0) & ((scaled < bound) if thinned else (scaled <= bound))).all(0)
        kept = np.flatnonzero(inside)
        outside = 0
        if kept.size < inside.size:  # NaN compares false, so count the finite points among those dropped
            dropped = np.flatnonzero(~inside)
            outside = int(np.count_nonzero(np.isfinite(xyz[:, 0][dropped]) & np.isfinite(xyz[:, 1][dropped])
                                           & np.isfinite(xyz[:, 2][dropped])))
        # A driver that writes 0 for "no return" (librealsense deprojects depth 0 to the origin) puts those points
        # at the sensor's origin, where no camera sees anything (an eye-in-hand camera's would block the hand):
        # dropped as NaN is. Only where that origin is kept, and on the main path found by its voxel's key
        # rather than by comparing every point (a pass over a 9.8 MB cloud costs milliseconds).
        origin = ((to_base.translation - low) * scale).astype(dtype)
        origin_kept = bool(((origin >= 0) & ((origin < bound[:, 0]) if thinned else (origin <= bound[:, 0]))).all())
        if origin_kept and (not thinned or self._cell_count > 2.0**53):
            kept = kept[~(xyz[kept] == 0).all(1)]
        if not thinned:
            return CroppedCloud(scaled[:, kept].T + low, kept.size, outside)
        np.floor(scaled, out=scaled)
        kept_count = kept.size
        if self._cell_count > 2.0**53:  # no exact floating-point key per voxel
            occupied_cells = np.unique(scaled[:, kept].T.astype(np.int64), axis=0)
        else:
            # Each voxel's key from whole rows, then only the kept points' keys (one gather, not three):
            # exact while every key fits the mantissa (float32 up to 2^24 cells, float64 up to 2^53).
            key_dtype = np.float32 if dtype == np.float32 and self._cell_count <= 2.0**24 else np.float64
            with np.errstate(over="ignore", invalid="ignore"):
                key = scaled[0].astype(key_dtype)
                key *= key_dtype(self._cells[1])
                key += scaled[1]
                key *= key_dtype(self._cells[2])
                key += scaled[2]
            keys = key[kept].astype(np.int64)
            if origin_kept:
                cell = np.floor(origin).astype(np.int64)
                at_origin = np.flatnonzero(keys == (cell[0] * self._cells[1] + cell[1]) * self._cells[2] + cell[2])
                no_return = at_origin[(xyz[kept[at_origin]] == 0).all(1)] if at_origin.size else at_origin
                keys, kept_count = np.delete(keys, no_return), kept_count - no_return.size
            if self._cell_count <= MAX_DENSE_VOXELS:
                if self._occupied is None:
                    self._occupied = np.zeros(int(self._cell_count), dtype=bool)
                if keys.size:
                    self._occupied[keys] = True
                    # Scanned between the lowest and highest key only: a camera sees a part of the workspace.
                    first = int(keys.min())
                    keys = np.flatnonzero(self._occupied[first:int(keys.max()) + 1]) + first
                    self._occupied[keys] = False  # cleared for the next cloud at the cost of the occupied cells only
            else:
                keys = np.unique(keys)
            occupied_cells = np.empty((keys.size, 3), dtype=np.int64)
            for axis in (2, 1, 0):
                keys, occupied_cells[:, axis] = np.divmod(keys, self._cells[axis])
        points = (occupied_cells + 0.5) * self.voxel_size_m + low
        return CroppedCloud(points, kept_count, outside)


class SelfFilter:
    """Removes the robot's own points: those within a padding of its collision spheres (fitted to
    contain every link's mesh) at a configuration, as cuRobo's robot segmenter does."""

    def __init__(self) -> None:
        import torch

        from mace_ros.core.collision import RobotSphereModel

        spheres = RobotSphereModel.load(dtype=torch.float64)
        self._link_index = spheres.link_index.numpy()
        self._centers = spheres.centers.numpy()
        self._radii = spheres.radii.numpy()

    def sphere_centers(self, link_transforms: np.ndarray) -> np.ndarray:
        """[S, 3] sphere centres in the base frame from link poses [L, 4, 4]."""
        frames = link_transforms[self._link_index]
        return np.einsum("sij,sj->si", frames[:, :3, :3], self._centers) + frames[:, :3, 3]

    def keep(self, points: np.ndarray, link_transforms: np.ndarray, padding_m: float) -> np.ndarray:
        """[N] bool: points [N, 3] outside every sphere grown by padding_m."""
        centers, reach = self.sphere_centers(link_transforms), self._radii + padding_m
        keep = np.ones(points.shape[0], dtype=bool)
        # Only points in the box around all spheres need the per-sphere test (MoveIt's shape_mask
        # rejects by a bounding sphere first in the same spirit).
        near = np.flatnonzero(((points >= (centers - reach[:, None]).min(0)) & (points <= (centers + reach[:, None]).max(0))).all(1))
        squared_reach, squared_centers = reach * reach, (centers * centers).sum(1)
        for start in range(0, near.size, SELF_FILTER_CHUNK):
            candidates = points[near[start:start + SELF_FILTER_CHUNK]]
            # Squared distances to every sphere as |p|^2 + |c|^2 - 2 p.c: one matrix product instead of
            # a pass per sphere (~7x faster for a camera cloud's ~1000 candidates near the arm).
            squared = (candidates * candidates).sum(1)[:, None] + squared_centers - 2.0 * (candidates @ centers.T)
            keep[near[start:start + SELF_FILTER_CHUNK][(squared <= squared_reach).any(1)]] = False
        return keep


# One ~/obstacles message's change to the model: ("put", key, primitive), ("remove", key, None) or
# ("clear", namespace, None), applied in order (see ObstacleModel.apply).
# ("put", key, primitive, lifetime_ns: 0 = until removed), ("remove", key, None, 0), ("clear", namespace, None, 0)
Operation = tuple[str, str, "Box | Sphere | Cylinder | None", int]


class ObstacleModel:
    """Thread-safe obstacle state, keyed like rviz markers ("ns/id").

    Marker primitives are capped (`max_primitives`): every collision check costs time in proportion
    to their number (5000 small markers made one GetIK sampling pass take seconds), and the cap also
    bounds their memory. Beyond it, new keys are refused (updates of kept ones still apply).
    A message that changes nothing (a publisher re-sending the same markers) keeps the snapshot: the
    engines keep their prepared scene, and the exact checker its Bullet body.
    A marker with a lifetime is removed once `clock_ns` has passed its arrival plus the lifetime, as rviz
    expires it (re-sending it starts the lifetime again); when the clock goes back (a simulation or bag
    restarted, with use_sim_time), every marker with a lifetime is removed, as rviz resets its displays:
    otherwise they stayed for as long as the simulation had run.
    """

    def __init__(self, max_primitives: int | None = None, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._lock = threading.Lock()
        self._static: Scene | None = None
        self._primitives: dict[str, Box | Sphere | Cylinder] = {}
        self.max_primitives = max_primitives
        self._clock_ns = clock_ns
        self._expiry_ns: dict[str, int] = {}  # keys of primitives with a lifetime: when they expire
        self._next_expiry_ns: int | None = None  # the earliest of those
        self._latest_clock_ns: int | None = None  # the latest clock reading seen, to notice it going back
        # Incremented when the primitives (static scene or markers) change, so that ~/scene is
        # republished only then (clouds have their own topic).
        self.primitives_version = 0
        self._clouds: dict[str, np.ndarray] = {}  # the latest cloud of each sensor (frame_id), base frame
        # The last snapshot, reused while nothing changes: the IK engine keys its tensorized scene
        # (a cloud's distance field takes up to a second to build) on the Scene object.
        self._snapshot: Scene | None = None

    def set_static_scene(self, scene: Scene) -> None:
        with self._lock:
            self._static = scene
            self._primitives_changed()

    def apply(self, operations: list[Operation]) -> int:
        """One message's puts, removes and clears, in order, under one lock hold (a request's snapshot
        waits for dictionary updates only, never for a message's conversion); returns how many puts
        the cap refused."""
        from mace_ros.core.scene import same_primitive

        refused = 0
        changed = False
        with self._lock:
            now_ns = self._clock_ns()
            for kind, key, primitive, lifetime_ns in operations:
                if kind == "put":
                    kept = self._primitives.get(key)
                    if kept is None and self.max_primitives is not None and len(self._primitives) >= self.max_primitives:
                        refused += 1
                        continue
                    if kept is None or not same_primitive(kept, primitive):
                        self._primitives[key] = primitive
                        changed = True
                    if lifetime_ns > 0:
                        self._expiry_ns[key] = now_ns + lifetime_ns
                    else:
                        self._expiry_ns.pop(key, None)
                elif kind == "remove":
                    changed |= self._primitives.pop(key, None) is not None
                    self._expiry_ns.pop(key, None)
                elif key:  # clear one namespace
                    remaining = {k: v for k, v in self._primitives.items() if not k.startswith(f"{key}/")}
                    changed |= len(remaining) != len(self._primitives)
                    self._primitives = remaining
                    self._expiry_ns = {k: t for k, t in self._expiry_ns.items() if k in remaining}
                else:
                    changed |= bool(self._primitives)
                    self._primitives.clear()
                    self._expiry_ns.clear()
            self._next_expiry_ns = min(self._expiry_ns.values(), default=None)
            changed |= self._expire(now_ns)
            if changed:
                self._primitives_changed()
        return refused

    def expire(self) -> None:
        """Removes the markers whose lifetime has passed (snapshots do it too)."""
        with self._lock:
            if self._expire(self._clock_ns()):
                self._primitives_changed()

    def _expire(self, now_ns: int) -> bool:
        """Under the lock: drops expired markers (all with a lifetime if the clock went back); whether any was."""
        went_back = self._latest_clock_ns is not None and now_ns < self._latest_clock_ns
        self._latest_clock_ns = now_ns
        if self._next_expiry_ns is None or (now_ns < self._next_expiry_ns and not went_back):
            return False
        expired = [key for key, expiry_ns in self._expiry_ns.items() if expiry_ns <= now_ns or went_back]
        for key in expired:
            del self._expiry_ns[key]
            self._primitives.pop(key, None)
        self._next_expiry_ns = min(self._expiry_ns.values(), default=None)
        return True

    def _primitives_changed(self) -> None:
        self._snapshot = None
        self.primitives_version += 1

    def put(self, key: str, primitive: Box | Sphere | Cylinder, lifetime_ns: int = 0) -> bool:
        """False when the cap refused it."""
        return self.apply([("put", key, primitive, lifetime_ns)]) == 0

    def remove(self, key: str) -> None:
        self.apply([("remove", key, None, 0)])

    def clear(self, namespace: str = "") -> None:
        """DELETEALL: every marker obstacle, or only those of `namespace` when one is given."""
        self.apply([("clear", namespace, None, 0)])

    def set_cloud(self, sensor: str, points: np.ndarray | None) -> None:
        """The latest cloud of `sensor` (its frame_id) replaces its previous one; None or no points clear it."""
        with self._lock:
            if points is None or points.shape[0] == 0:
                self._clouds.pop(sensor, None)
            else:
                self._clouds[sensor] = points
            self._snapshot = None

    def clouds(self) -> dict[str, np.ndarray]:
        """Each sensor's latest cloud (base frame)."""
        with self._lock:
            return dict(self._clouds)

    def points_with(self, sensor: str, points: np.ndarray | None) -> np.ndarray | None:
        """The model's points (static scene's, then each sensor's) as they would be after set_cloud(sensor, points)."""
        with self._lock:
            clouds = {**self._clouds, sensor: points}
            static = self._static.points if self._static is not None else None
        parts = [static] if static is not None else []
        parts += [clouds[name] for name in sorted(clouds) if clouds[name] is not None and clouds[name].shape[0]]
        return np.concatenate(parts) if parts else None

    def snapshot(self) -> Scene:
        """The current obstacles as one immutable Scene (static scene first, then markers, then the clouds by sensor)."""
        from mace_ros.core.scene import Box, Cylinder, Scene, Sphere

        with self._lock:
            if self._expire(self._clock_ns()):
                self._primitives_changed()
            if self._snapshot is not None:
                return self._snapshot
            static = self._static or Scene()
            primitives = list(self._primitives.values())
            parts = [static.points] if static.points is not None else []
            parts += [self._clouds[name] for name in sorted(self._clouds)]
            points = np.concatenate(parts) if parts else None
            self._snapshot = Scene(
                boxes=[*static.boxes, *(p for p in primitives if isinstance(p, Box))],
                spheres=[*static.spheres, *(p for p in primitives if isinstance(p, Sphere))],
                cylinders=[*static.cylinders, *(p for p in primitives if isinstance(p, Cylinder))],
                points=points,
            )
            return self._snapshot
