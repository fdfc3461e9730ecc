"""The node's obstacle model: static scene + markers from ~/obstacles + the latest ~/obstacle_cloud.

Topic callbacks update it while requests run; each request takes an immutable Scene snapshot.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mace_ros.core.scene import Box, Cylinder, Scene, Sphere


def voxel_downsample(points: np.ndarray, voxel_size_m: float) -> np.ndarray:
    """One point (the first) per occupied voxel; voxel_size_m <= 0 keeps every point."""
    if voxel_size_m <= 0.0 or points.shape[0] == 0:
        return points
    _, first = np.unique(np.floor(points / voxel_size_m).astype(np.int64), axis=0, return_index=True)
    return points[np.sort(first)]


class ObstacleModel:
    """Thread-safe obstacle state, keyed like rviz markers ("ns/id")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._static: Scene | None = None
        self._primitives: dict[str, Box | Sphere | Cylinder] = {}
        self._points: np.ndarray | None = None
        # The last snapshot, reused while nothing changes: the IK engine keys its tensorized scene
        # (a cloud's distance field takes up to a second to build) on the Scene object.
        self._snapshot: Scene | None = None

    def set_static_scene(self, scene: Scene) -> None:
        with self._lock:
            self._static = scene
            self._snapshot = None

    def put(self, key: str, primitive: Box | Sphere | Cylinder) -> None:
        with self._lock:
            self._primitives[key] = primitive
            self._snapshot = None

    def remove(self, key: str) -> None:
        with self._lock:
            self._primitives.pop(key, None)
            self._snapshot = None

    def clear(self, namespace: str = "") -> None:
        """DELETEALL: every marker obstacle, or only those of `namespace` when one is given."""
        with self._lock:
            if namespace:
                self._primitives = {k: v for k, v in self._primitives.items() if not k.startswith(f"{namespace}/")}
            else:
                self._primitives.clear()
            self._snapshot = None

    def set_points(self, points: np.ndarray | None) -> None:
        with self._lock:
            self._points = points
            self._snapshot = None

    def snapshot(self) -> Scene:
        """The current obstacles as one immutable Scene (static scene first, then markers, then the cloud)."""
        from mace_ros.core.scene import Box, Cylinder, Scene, Sphere

        with self._lock:
            if self._snapshot is not None:
                return self._snapshot
            static = self._static or Scene()
            primitives = list(self._primitives.values())
            points = self._points
            if static.points is not None:
                points = static.points if points is None else np.concatenate([static.points, points])
            self._snapshot = Scene(
                boxes=[*static.boxes, *(p for p in primitives if isinstance(p, Box))],
                spheres=[*static.spheres, *(p for p in primitives if isinstance(p, Sphere))],
                cylinders=[*static.cylinders, *(p for p in primitives if isinstance(p, Cylinder))],
                points=points,
            )
            return self._snapshot
