"""Which frames the node accepts, and the rigid transforms that bring data into the base frame.

tf2 is not available from PyPI, so the node knows the base frame (panda_link0) and, optionally,
fixed frames given by the `static_transforms` parameter, e.g. a camera mounted on the table:
`"camera_link 0.5 0.0 0.8 0.0 0.0 0.0 1.0"` = camera_link's pose in the base frame (x y z qx qy qz qw).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation


class UnknownFrameError(ValueError):
    """A message names a frame the node has no transform for."""


@dataclass(frozen=True)
class RigidTransform:
    """x_target = rotation @ x_source + translation."""

    rotation: np.ndarray  # [3, 3]
    translation: np.ndarray  # [3]

    @staticmethod
    def identity() -> RigidTransform:
        return RigidTransform(np.eye(3), np.zeros(3))

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.rotation, np.eye(3)) and not self.translation.any())

    def inverse(self) -> RigidTransform:
        return RigidTransform(self.rotation.T, -self.rotation.T @ self.translation)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Points [..., 3] mapped into the target frame."""
        return points @ self.rotation.T + self.translation

    def apply_pose(self, position: np.ndarray, quaternion_wxyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A pose (position [3], quaternion [4] w, x, y, z) expressed in the target frame."""
        if self.is_identity:
            return position, quaternion_wxyz
        # scipy orders quaternions x, y, z, w (its scalar_first option needs scipy >= 1.14).
        orientation = Rotation.from_matrix(self.rotation) * Rotation.from_quat(np.roll(quaternion_wxyz, -1))
        return self.apply(position), np.roll(orientation.as_quat(), 1)


class FrameTable:
    """Transforms from accepted frames into the base frame; '' means the base frame."""

    def __init__(self, base_frame: str, static_transforms: dict[str, RigidTransform] | None = None):
        self.base_frame = base_frame
        self._to_base = {"": RigidTransform.identity(), base_frame: RigidTransform.identity(), **(static_transforms or {})}

    @staticmethod
    def parse_static_transforms(text: str) -> dict[str, RigidTransform]:
        """'frame x y z qx qy qz qw; frame2 ...' -> {frame: pose of frame in the base frame}."""
        transforms = {}
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            frame, *numbers = entry.split()
            if len(numbers) != 7:
                raise ValueError(f"static transform '{entry}' must be 'frame x y z qx qy qz qw'")
            values = np.array([float(v) for v in numbers])
            if not np.isfinite(values).all() or np.linalg.norm(values[3:]) < 1e-9:
                raise ValueError(f"static transform '{entry}' has NaN values or a zero quaternion")
            rotation = Rotation.from_quat(values[3:] / np.linalg.norm(values[3:])).as_matrix()
            transforms[frame] = RigidTransform(rotation, values[:3])
        return transforms

    @property
    def accepted(self) -> list[str]:
        return sorted(frame for frame in self._to_base if frame)

    def to_base(self, frame_id: str) -> RigidTransform:
        try:
            return self._to_base[frame_id]
        except KeyError:
            raise UnknownFrameError(
                f"unknown frame '{frame_id}': accepted frames are {', '.join(self.accepted)} or '' "
                f"(add a fixed frame with the static_transforms parameter; tf2 is not used)") from None
