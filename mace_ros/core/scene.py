"""Obstacle scenes: oriented boxes, spheres, capped cylinders and point clouds in the robot base frame.

Everything is in metres in `panda_link0`. Primitives are immutable and validated on construction, so a
scene snapshot handed to a collision checker cannot change underneath it. Scene files are YAML:

    frame: panda_link0
    boxes:     [{name, center: [x, y, z], quaternion_wxyz: [w, x, y, z], half_extents: [hx, hy, hz]}]
    spheres:   [{name, center, radius}]
    cylinders: [{name, center, quaternion_wxyz, radius, half_height}]   # axis = the local z axis
    points:    [[x, y, z], ...]                                           # optional obstacle cloud
    goals:     [{position: [x, y, z], quaternion_wxyz: [w, x, y, z]}]    # optional examples, ignored here
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

BASE_FRAME = "panda_link0"
# Larger centres or sizes are refused: nothing near a robot is that big or that far, and in float32 their
# squares overflow, turning collision costs and their gradients into inf and NaN.
MAX_COORDINATE_M = 1e4
MAX_SIZE_M = 1e4


def _vector(value: Any, size: int, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    if array.shape != (size,) or not np.isfinite(array).all():
        raise ValueError(f"{what} must be {size} finite numbers, got {value!r}")
    return array


def _positive(value: Any, what: str) -> float:
    number = float(value)
    if not (np.isfinite(number) and 0.0 < number <= MAX_SIZE_M):
        raise ValueError(f"{what} must be a positive number of at most {MAX_SIZE_M:g} m, got {value!r}")
    return number


def _center(value: Any, what: str) -> np.ndarray:
    center = _vector(value, 3, what)
    if np.abs(center).max() > MAX_COORDINATE_M:
        raise ValueError(f"{what} must lie within ±{MAX_COORDINATE_M:g} m, got {center.tolist()}")
    return center


def _unit_quaternion(value: Any, what: str) -> np.ndarray:
    quaternion = _vector(value, 4, what)
    norm = np.linalg.norm(quaternion)
    if norm < 1e-9:
        raise ValueError(f"{what} must be a non-zero quaternion (w, x, y, z), got {value!r}")
    return quaternion / norm


def quaternion_wxyz_to_matrix(quaternion: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> 3x3 rotation matrix."""
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


# eq=False: fields hold numpy arrays, whose `==` is elementwise; primitives compare by identity.
@dataclass(frozen=True, eq=False)
class Box:
    """An oriented box: centre, orientation of its local axes, half edge lengths along them."""

    name: str
    center: np.ndarray
    quaternion_wxyz: np.ndarray
    half_extents: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _center(self.center, f"box {self.name} center"))
        object.__setattr__(self, "quaternion_wxyz", _unit_quaternion(self.quaternion_wxyz, f"box {self.name} quaternion_wxyz"))
        half_extents = _vector(self.half_extents, 3, f"box {self.name} half_extents")
        if not ((half_extents > 0).all() and (half_extents <= MAX_SIZE_M).all()):
            raise ValueError(f"box {self.name} half_extents must be positive, at most {MAX_SIZE_M:g} m, got {half_extents.tolist()}")
        object.__setattr__(self, "half_extents", half_extents)

    @property
    def rotation(self) -> np.ndarray:
        return quaternion_wxyz_to_matrix(self.quaternion_wxyz)

    def to_yaml_dict(self) -> dict[str, Any]:
        return {"name": self.name, "center": self.center.tolist(), "quaternion_wxyz": self.quaternion_wxyz.tolist(),
                "half_extents": self.half_extents.tolist()}


@dataclass(frozen=True, eq=False)
class Sphere:
    name: str
    center: np.ndarray
    radius: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _center(self.center, f"sphere {self.name} center"))
        object.__setattr__(self, "radius", _positive(self.radius, f"sphere {self.name} radius"))

    def to_yaml_dict(self) -> dict[str, Any]:
        return {"name": self.name, "center": self.center.tolist(), "radius": self.radius}


@dataclass(frozen=True, eq=False)
class Cylinder:
    """A capped cylinder around its local z axis, from -half_height to +half_height."""

    name: str
    center: np.ndarray
    quaternion_wxyz: np.ndarray
    radius: float
    half_height: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center", _center(self.center, f"cylinder {self.name} center"))
        object.__setattr__(self, "quaternion_wxyz", _unit_quaternion(self.quaternion_wxyz, f"cylinder {self.name} quaternion_wxyz"))
        object.__setattr__(self, "radius", _positive(self.radius, f"cylinder {self.name} radius"))
        object.__setattr__(self, "half_height", _positive(self.half_height, f"cylinder {self.name} half_height"))

    @property
    def rotation(self) -> np.ndarray:
        return quaternion_wxyz_to_matrix(self.quaternion_wxyz)

    def to_yaml_dict(self) -> dict[str, Any]:
        return {"name": self.name, "center": self.center.tolist(), "quaternion_wxyz": self.quaternion_wxyz.tolist(),
                "radius": self.radius, "half_height": self.half_height}


def same_primitive(a: Box | Sphere | Cylinder, b: Box | Sphere | Cylinder) -> bool:
    """Whether two primitives describe the same obstacle: one type and equal fields (`==` compares identity)."""
    return type(a) is type(b) and all(np.array_equal(getattr(a, item.name), getattr(b, item.name)) for item in fields(a))


def _points(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    points = np.asarray(value, dtype=np.float64)
    if points.size == 0:
        return None
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be an array [P, 3], got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values")
    points = points.copy()
    points.flags.writeable = False  # the scene is a snapshot: nobody may edit the cloud in place
    return points


@dataclass(frozen=True, eq=False)
class Scene:
    """Obstacles in the base frame. Lists are stored as tuples: a scene is an immutable snapshot."""

    boxes: Sequence[Box] = field(default_factory=tuple)
    spheres: Sequence[Sphere] = field(default_factory=tuple)
    cylinders: Sequence[Cylinder] = field(default_factory=tuple)
    points: np.ndarray | None = None

    def __post_init__(self) -> None:
        for attribute, kind in (("boxes", Box), ("spheres", Sphere), ("cylinders", Cylinder)):
            items = tuple(getattr(self, attribute))
            for item in items:
                if not isinstance(item, kind):
                    raise TypeError(f"Scene.{attribute} takes {kind.__name__} objects, got {type(item).__name__}")
            object.__setattr__(self, attribute, items)
        object.__setattr__(self, "points", _points(self.points))

    @property
    def is_empty(self) -> bool:
        return not (self.boxes or self.spheres or self.cylinders or self.points is not None)

    @property
    def num_points(self) -> int:
        return 0 if self.points is None else int(self.points.shape[0])

    def with_points(self, points: np.ndarray | None) -> "Scene":
        """The same primitives with the obstacle cloud replaced (None or an empty array removes it)."""
        return replace(self, points=points)

    def with_clutter(self, count: int, seed: int, low: Sequence[float] = (-0.8, -0.8, 0.0), high: Sequence[float] = (0.8, 0.8, 1.1)) -> "Scene":
        """This scene plus `count` small boxes and count // 4 spheres and cylinders each (1-8 cm, random poses
        between `low` and `high`), as a marker flood or a voxelized sensor brings them: for stress tests."""
        rng = np.random.default_rng(seed)

        def pose() -> tuple[np.ndarray, np.ndarray]:
            quaternion = rng.normal(size=4)
            return rng.uniform(low, high), quaternion / np.linalg.norm(quaternion)

        boxes = [Box(f"clutter_box_{i}", *pose(), rng.uniform(0.005, 0.04, 3)) for i in range(count)]
        spheres = [Sphere(f"clutter_sphere_{i}", pose()[0], rng.uniform(0.01, 0.05)) for i in range(count // 4)]
        cylinders = [Cylinder(f"clutter_cylinder_{i}", *pose(), rng.uniform(0.01, 0.04), rng.uniform(0.01, 0.08)) for i in range(count // 4)]
        return replace(self, boxes=(*self.boxes, *boxes), spheres=(*self.spheres, *spheres), cylinders=(*self.cylinders, *cylinders))

    def to_yaml_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "frame": BASE_FRAME,
            "boxes": [box.to_yaml_dict() for box in self.boxes],
            "spheres": [sphere.to_yaml_dict() for sphere in self.spheres],
            "cylinders": [cylinder.to_yaml_dict() for cylinder in self.cylinders],
        }
        if self.points is not None:
            data["points"] = self.points.tolist()
        return data

    @staticmethod
    def from_yaml_dict(data: dict[str, Any]) -> "Scene":
        frame = data.get("frame", BASE_FRAME)
        if frame != BASE_FRAME:
            raise ValueError(f"scene frame must be {BASE_FRAME}, got {frame!r}")

        def entries(key: str) -> list[dict[str, Any]]:
            return list(data.get(key) or [])

        try:
            return Scene(
                boxes=[Box(e["name"], e["center"], e.get("quaternion_wxyz", (1.0, 0.0, 0.0, 0.0)), e["half_extents"]) for e in entries("boxes")],
                spheres=[Sphere(e["name"], e["center"], e["radius"]) for e in entries("spheres")],
                cylinders=[
                    Cylinder(e["name"], e["center"], e.get("quaternion_wxyz", (1.0, 0.0, 0.0, 0.0)), e["radius"], e["half_height"])
                    for e in entries("cylinders")
                ],
                points=data.get("points"),
            )
        except KeyError as missing:
            raise ValueError(f"scene entry lacks the field {missing}") from None

    @staticmethod
    def load_yaml(path: str | Path) -> "Scene":
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a scene file is a YAML mapping")
        try:
            return Scene.from_yaml_dict(data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_yaml_dict(), sort_keys=False))


@dataclass(frozen=True, eq=False)
class SceneGoal:
    """An example goal shipped with a scene file: a position and optionally an orientation."""

    position: np.ndarray  # [3]
    quaternion_wxyz: np.ndarray | None  # [4] or None for position-only


def load_goals(path: str | Path) -> list[SceneGoal]:
    """The `goals:` list of a scene file (empty if it has none)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    goals = []
    for index, entry in enumerate(data.get("goals") or []):
        position = _vector(entry["position"], 3, f"{path}: goal {index} position")
        quaternion = entry.get("quaternion_wxyz")
        goals.append(SceneGoal(position, None if quaternion is None else _unit_quaternion(quaternion, f"{path}: goal {index} quaternion_wxyz")))
    return goals
