"""Which frames the node accepts, and the rigid transforms that bring data into the base frame.

A frame resolves, in this order, as: the base frame (panda_link0); a fixed frame of the
`static_transforms` parameter, e.g. a camera on the table, `"camera_link 0.5 0.0 0.8 0.0 0.0 0.0 1.0"`
= camera_link's pose in the base frame (x y z qx qy qz qw); a robot link or a frame fixed to one
(`attached_frames`, e.g. an eye-in-hand camera), placed by the node's forward kinematics at the
/joint_states closest to the data's stamp; and, where tf2_ros is installed, any frame tf2 knows.
tf2 is not available from PyPI, so here the first three are all there is.
"""
from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from mace_ros.core.kinematics import LINK_INDEX, LINK_NAMES, PandaKinematics

# Joint states kept to place data by its own stamp (a cloud arrives some 10-100 ms after its capture).
JOINT_STATE_HISTORY_S = 2.0
# Most states kept, whatever their stamps say (a 1 kHz driver fills 2 s with 2000).
JOINT_STATE_HISTORY_MAX = 4096


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

    def compose(self, inner: RigidTransform) -> RigidTransform:
        """self ∘ inner: maps inner's source frame through inner, then self."""
        return RigidTransform(self.rotation @ inner.rotation, self.rotation @ inner.translation + self.translation)

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


class JointStateHistory:
    """Recent arm joint positions [7] by stamp (ns), thread-safe."""

    def __init__(self, span_s: float = JOINT_STATE_HISTORY_S) -> None:
        self._span_ns = int(span_s * 1e9)
        self._lock = threading.Lock()
        self._states: deque[tuple[int, np.ndarray]] = deque(maxlen=JOINT_STATE_HISTORY_MAX)

    def add(self, stamp_ns: int, positions: np.ndarray) -> None:
        with self._lock:
            if self._states and stamp_ns < self._states[-1][0]:
                self._states.clear()  # time went back (a simulation or bag restarted)
            self._states.append((stamp_ns, positions))
            while self._states[0][0] < stamp_ns - self._span_ns:
                self._states.popleft()

    def latest_stamp_ns(self) -> int | None:
        """The stamp of the latest state (the one requests use); None before the first."""
        with self._lock:
            return self._states[-1][0] if self._states else None

    def at(self, stamp_ns: int = 0) -> np.ndarray | None:
        """The positions stamped closest to `stamp_ns` (0: the latest); None before the first state."""
        closest = self.closest(stamp_ns)
        return None if closest is None else closest[1]

    def closest(self, stamp_ns: int = 0) -> tuple[int, np.ndarray] | None:
        """(stamp, positions) of the state stamped closest to `stamp_ns` (0: the latest); None before the first."""
        with self._lock:
            if not self._states:
                return None
            if stamp_ns == 0:
                return self._states[-1]
            # In stamp order (a stamp going back clears the history), so the closest is beside the insertion
            # point: a scan of a 1 kHz controller's 2 s took 0.2 ms, per cloud and per request.
            index = bisect.bisect_left(self._states, stamp_ns, key=lambda state: state[0])
            beside = [self._states[i] for i in (index - 1, index) if 0 <= i < len(self._states)]
            return min(beside, key=lambda state: abs(state[0] - stamp_ns))


class RobotFrames:
    """Poses of the robot's links (core names) in the base frame at the recorded joint states."""

    def __init__(self) -> None:
        self.joint_states = JointStateHistory()
        self._kinematics = PandaKinematics(dtype=torch.float64)

    def link_transforms(self, positions: np.ndarray) -> np.ndarray:
        """[L, 4, 4] pose of every link (LINK_NAMES order) at joint positions [7]."""
        return self._kinematics.link_transforms(torch.as_tensor(positions, dtype=torch.float64)[None])[0].numpy()

    def link_pose(self, link: str, stamp_ns: int = 0, frame_id: str = "") -> RigidTransform:
        """The pose of `link` (core name) at the joint state closest to `stamp_ns`; `frame_id`, the frame asked
        for as the user named it, is what an error names."""
        positions = self.joint_states.at(stamp_ns)
        if positions is None:
            raise UnknownFrameError(f"frame '{frame_id or link}' is on the robot and needs /joint_states, and none has arrived yet")
        transform = self.link_transforms(positions)[LINK_INDEX[link]]
        return RigidTransform(transform[:3, :3], transform[:3, 3])


@dataclass(frozen=True)
class AttachedFrame:
    """A frame fixed to a robot link: its pose `offset` in the link (core name)."""

    link: str
    offset: RigidTransform


class FrameTable:
    """Transforms from accepted frames into the base frame; '' means the base frame."""

    def __init__(
        self, base_frame: str, static_transforms: dict[str, RigidTransform] | None = None,
        attached: dict[str, AttachedFrame] | None = None, robot: RobotFrames | None = None,
        fallback: Callable[[str, int], RigidTransform] | None = None,
    ):
        self.base_frame = base_frame
        self._to_base = {"": RigidTransform.identity(), base_frame: RigidTransform.identity(), **(static_transforms or {})}
        self._attached = attached or {}
        self._robot = robot
        self._fallback = fallback  # tf2 where installed: (frame_id, stamp_ns) -> transform, or UnknownFrameError

    @staticmethod
    def _parse(text: str, fields: int, form: str) -> list[tuple[list[str], RigidTransform]]:
        """'name... x y z qx qy qz qw; ...' entries as (the first `fields` words, pose)."""
        entries = []
        for entry in filter(None, (part.strip() for part in text.split(";"))):
            words = entry.split()
            if len(words) != fields + 7:
                raise ValueError(f"'{entry}' must be '{form}'")
            values = np.array([float(v) for v in words[fields:]])
            if not np.isfinite(values).all() or np.linalg.norm(values[3:]) < 1e-9:
                raise ValueError(f"'{entry}' has NaN values or a zero quaternion")
            rotation = Rotation.from_quat(values[3:] / np.linalg.norm(values[3:])).as_matrix()
            entries.append((words[:fields], RigidTransform(rotation, values[:3])))
        return entries

    @staticmethod
    def parse_static_transforms(text: str) -> dict[str, RigidTransform]:
        """'frame x y z qx qy qz qw; frame2 ...' -> {frame: pose of frame in the base frame}."""
        return {words[0]: pose for words, pose in FrameTable._parse(text, 1, "frame x y z qx qy qz qw")}

    @staticmethod
    def parse_attached_frames(text: str, to_core: Callable[[str], str | None]) -> dict[str, AttachedFrame]:
        """'frame link x y z qx qy qz qw; ...' -> {frame: its pose in the robot link}; `to_core` maps link names."""
        attached = {}
        for (frame, link), pose in FrameTable._parse(text, 2, "frame link x y z qx qy qz qw"):
            core_link = to_core(link)
            if core_link not in LINK_INDEX:
                raise ValueError(f"attached frame '{frame}': '{link}' is not a link of the robot")
            attached[frame] = AttachedFrame(core_link, pose)
        return attached

    @staticmethod
    def for_robot(
        base_frame: str, static_transforms: str, attached_frames: str, to_ros: Callable[[str], str],
        to_core: Callable[[str], str | None], robot: RobotFrames, fallback: Callable[[str, int], RigidTransform] | None,
    ) -> FrameTable:
        """The node's frames from its parameters' texts: the base frame, the static transforms, every robot
        link (a goal in <prefix>hand_tcp) and the attached frames, then `fallback` (tf2)."""
        attached = {to_ros(link): AttachedFrame(link, RigidTransform.identity()) for link in LINK_NAMES}
        attached.update(FrameTable.parse_attached_frames(attached_frames, to_core))
        return FrameTable(base_frame, FrameTable.parse_static_transforms(static_transforms), attached, robot, fallback)

    @property
    def accepted(self) -> list[str]:
        # A set: the base frame is also a robot link (an attached frame), and must be listed once.
        return sorted({*(frame for frame in self._to_base if frame), *self._attached})

    def robot_state_stamp_ns(self, frame_id: str) -> int | None:
        """For a frame on the robot, the stamp of the latest joint state (what to_base(frame_id) uses); else None."""
        if frame_id in self._attached and frame_id not in self._to_base and self._robot is not None:
            return self._robot.joint_states.latest_stamp_ns()
        return None

    def to_base(self, frame_id: str, stamp_ns: int = 0) -> RigidTransform:
        """The transform of `frame_id` at `stamp_ns` (0: now); robot frames use the joint state closest to it."""
        if frame_id in self._to_base:
            return self._to_base[frame_id]
        if frame_id in self._attached and self._robot is not None:
            attached = self._attached[frame_id]
            return self._robot.link_pose(attached.link, stamp_ns, frame_id).compose(attached.offset)
        if self._fallback is not None:
            return self._fallback(frame_id, stamp_ns)
        raise UnknownFrameError(
            f"unknown frame '{frame_id}': accepted frames are {', '.join(self.accepted)} or '' "
            f"(add a fixed frame with the static_transforms parameter, one on the robot with attached_frames; "
            f"tf2 is not installed)")



class Tf2Frames:
    """Lookups of any frame through tf2_ros (users' ROS installs; `create` gives None without tf2_ros).

    The listener spins its own thread (/tf_static is latched), and lookups never wait (geometry2 #327:
    blocking lookups stall executors): a transform not yet in the buffer is refused at once.
    """

    def __init__(self, tf2_ros, node, base_frame: str) -> None:
        self._tf2_ros = tf2_ros
        self._buffer = tf2_ros.Buffer()
        self._listener = tf2_ros.TransformListener(self._buffer, node, spin_thread=True)
        self._base_frame = base_frame

    @staticmethod
    def create(node, base_frame: str) -> Tf2Frames | None:
        try:
            import tf2_ros
        except ImportError:
            return None
        return Tf2Frames(tf2_ros, node, base_frame)

    def __call__(self, frame_id: str, stamp_ns: int) -> RigidTransform:
        from rclpy.time import Time

        try:
            transform = self._buffer.lookup_transform(self._base_frame, frame_id, Time(nanoseconds=stamp_ns)).transform
        except self._tf2_ros.TransformException as error:
            raise UnknownFrameError(f"no transform from '{frame_id}' to '{self._base_frame}' in tf2: {error}") from None
        t, r = transform.translation, transform.rotation
        return RigidTransform(Rotation.from_quat([r.x, r.y, r.z, r.w]).as_matrix(), np.array([t.x, t.y, t.z]))
