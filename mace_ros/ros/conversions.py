"""Every conversion between ROS messages and numpy arrays used by the node, in one place.

PointCloud2 is read and written through numpy structured dtypes built from the message's own
fields (offsets, datatypes, point_step padding, endianness), so any layout a driver publishes
is accepted without sensor_msgs_py, which the PyPI wheels do not include.
"""
from __future__ import annotations

import array
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from geometry_msgs.msg import Point, Pose
from sensor_msgs.msg import JointState, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from mace_ros.core.kinematics import JOINT_NAMES, LINK_NAMES
from mace_ros.ros.frames import RigidTransform

if TYPE_CHECKING:
    from mace_ros.core.scene import Box, Cylinder, Sphere

# PointField datatype <-> numpy scalar type (byte order applied separately).
FIELD_TYPES: dict[int, np.dtype] = {
    PointField.INT8: np.dtype(np.int8),
    PointField.UINT8: np.dtype(np.uint8),
    PointField.INT16: np.dtype(np.int16),
    PointField.UINT16: np.dtype(np.uint16),
    PointField.INT32: np.dtype(np.int32),
    PointField.UINT32: np.dtype(np.uint32),
    PointField.FLOAT32: np.dtype(np.float32),
    PointField.FLOAT64: np.dtype(np.float64),
}
NUMPY_TO_FIELD_TYPE: dict[np.dtype, int] = {dtype: datatype for datatype, dtype in FIELD_TYPES.items()}
XYZ = ("x", "y", "z")
# Coordinates beyond this (m) are refused: no robot scene is 10 km wide, and such values (1e300, ...)
# come from unit or encoding errors and would overflow the engines' arithmetic.
MAX_COORDINATE_M = 1e4
# A quaternion is normalized, but its norm must be about 1: outside these bounds it is refused as a
# mistake (a zero quaternion, a number from another field) rather than silently turned into a rotation.
MIN_QUATERNION_NORM = 0.1
MAX_QUATERNION_NORM = 10.0
# mace_ros.core names every joint and link panda_*; RobotNames maps them to the robot's names.
CORE_PREFIX = "panda_"


# --- PointCloud2 -----------------------------------------------------------------------------

def cloud_dtype(cloud: PointCloud2, only: Sequence[str] | None = None) -> np.dtype:
    """The structured dtype of one point of `cloud`, itemsize = point_step (padding included); with `only`,
    of those fields alone (what is wrong with the others, e.g. a driver's unknown datatype, does not matter)."""
    byte_order = ">" if cloud.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for field in cloud.fields:
        if only is not None and field.name not in only:
            continue
        if field.datatype not in FIELD_TYPES:
            raise ValueError(f"PointCloud2 field '{field.name}' has unknown datatype {field.datatype}")
        if field.name in names:
            raise ValueError(f"PointCloud2 field '{field.name}' appears twice")
        scalar = FIELD_TYPES[field.datatype].newbyteorder(byte_order)
        names.append(field.name)
        formats.append(scalar if field.count <= 1 else np.dtype((scalar, (field.count,))))
        offsets.append(field.offset)
    end = max((offset + np.dtype(fmt).itemsize for offset, fmt in zip(offsets, formats)), default=0)
    if end > cloud.point_step:
        raise ValueError(f"PointCloud2 fields end at byte {end}, past point_step {cloud.point_step}")
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": cloud.point_step})


def _points_view(cloud: PointCloud2, dtype: np.dtype) -> np.ndarray:
    """The points of `cloud` as a flat array of `dtype` (itemsize = point_step): a view of the message's
    buffer, or, when rows are padded (row_step > width x point_step), a copy without the padding."""
    num_points = cloud.width * cloud.height
    if num_points == 0:
        return np.zeros(0, dtype=dtype)
    row_bytes = cloud.width * cloud.point_step
    if cloud.row_step < row_bytes:
        raise ValueError(f"PointCloud2 row_step {cloud.row_step} < width {cloud.width} x point_step {cloud.point_step}")
    data = np.frombuffer(cloud.data, dtype=np.uint8)
    if data.size < cloud.row_step * (cloud.height - 1) + row_bytes:
        raise ValueError(
            f"PointCloud2 data has {data.size} bytes; {cloud.height} rows of {cloud.row_step} bytes need "
            f"{cloud.row_step * cloud.height}")
    if cloud.row_step == row_bytes or cloud.height == 1:
        return data[:num_points * cloud.point_step].view(dtype)
    rows = np.lib.stride_tricks.as_strided(data, shape=(cloud.height, row_bytes), strides=(cloud.row_step, 1))
    return np.ascontiguousarray(rows).view(dtype).reshape(-1)


def pointcloud2_to_array(cloud: PointCloud2) -> np.ndarray:
    """All points of `cloud` as a flat structured array (row_step padding removed), in native byte order."""
    dtype = cloud_dtype(cloud)
    return _points_view(cloud, dtype).astype(dtype.newbyteorder("="))


def pointcloud2_xyz(cloud: PointCloud2, subsample: int = 1) -> np.ndarray:
    """[N, 3] x, y, z of every point (NaN and infinite values kept). When they are consecutive fields
    of one native floating type, as drivers send them, a strided view of the message's buffer
    (nothing is copied unless rows are padded); otherwise a float64 copy. With `subsample` n > 1,
    every n-th row and column of an organized cloud (every n-th point of an unorganized one), as
    MoveIt's point cloud updater's point_subsample takes them: a copy of those points."""
    xyz = _all_xyz(cloud)
    if subsample <= 1:
        return xyz
    return xyz.reshape(cloud.height, cloud.width, 3)[::subsample, ::subsample].reshape(-1, 3)


def _all_xyz(cloud: PointCloud2) -> np.ndarray:
    """pointcloud2_xyz without subsampling."""
    if cloud.width * cloud.height == 0:
        return np.zeros((0, 3))  # no points, whatever the fields (a default-constructed message clears too)
    missing = [name for name in XYZ if name not in (field.name for field in cloud.fields)]
    if missing:
        present = ", ".join(field.name for field in cloud.fields) or "none"
        raise ValueError(f"PointCloud2 lacks field(s) {', '.join(missing)} (fields: {present})")
    dtype = cloud_dtype(cloud, XYZ)
    integral = [name for name in XYZ if dtype.fields[name][0].kind != "f"]
    if integral:  # integers in some unit (a driver's millimetres) read as metres would place phantom obstacles
        raise ValueError(f"PointCloud2 field(s) {', '.join(integral)} are integers: x, y, z must be FLOAT32 or FLOAT64 metres")
    formats = [dtype.fields[name][0] for name in XYZ]
    offsets = [dtype.fields[name][1] for name in XYZ]
    scalar = formats[0]
    if (scalar.kind == "f" and scalar.isnative and formats[1] == formats[2] == scalar
            and offsets[1] == offsets[0] + scalar.itemsize and offsets[2] == offsets[1] + scalar.itemsize):
        xyz_dtype = np.dtype({"names": ["xyz"], "formats": [(scalar, (3,))], "offsets": [offsets[0]], "itemsize": dtype.itemsize})
        return _points_view(cloud, xyz_dtype)["xyz"]
    xyz_dtype = np.dtype({"names": list(XYZ), "formats": formats, "offsets": offsets, "itemsize": dtype.itemsize})
    points = _points_view(cloud, xyz_dtype)
    xyz = np.empty((points.size, 3), dtype=np.float64)
    for axis, name in enumerate(XYZ):
        xyz[:, axis] = points[name] if points[name].ndim == 1 else points[name][:, 0]  # count > 1: the first
    return xyz


def pointcloud2_to_xyz(cloud: PointCloud2) -> np.ndarray:
    """[N, 3] float64 positions from the x, y, z fields; points with a NaN or infinite coordinate are dropped."""
    view = pointcloud2_xyz(cloud)
    columns = [view[:, axis] for axis in range(3)]
    # Per-coordinate 1-D passes: a mask over an [N, 3] array's short rows costs ~3x more.
    finite = np.isfinite(columns[0]) & np.isfinite(columns[1]) & np.isfinite(columns[2])
    xyz = np.empty((int(np.count_nonzero(finite)), 3), dtype=np.float64)
    for axis, column in enumerate(columns):
        xyz[:, axis] = column[finite]
    return xyz


def array_to_pointcloud2(points: np.ndarray, header: Header) -> PointCloud2:
    """An unorganized (height 1) cloud from a flat structured array; one PointField per array field."""
    if points.dtype.names is None:
        raise ValueError("array_to_pointcloud2 needs a structured array")
    points = np.ascontiguousarray(points)
    fields = []
    for name in points.dtype.names:
        field_dtype, offset = points.dtype.fields[name][:2]
        base = field_dtype.base if field_dtype.subdtype else field_dtype
        count = int(np.prod(field_dtype.shape)) if field_dtype.subdtype else 1
        datatype = NUMPY_TO_FIELD_TYPE.get(base.newbyteorder("="))
        if datatype is None:
            raise ValueError(f"field '{name}' has dtype {base}, which PointCloud2 cannot carry")
        fields.append(PointField(name=name, offset=offset, datatype=datatype, count=count))
    cloud = PointCloud2(header=header, height=1, width=points.shape[0], fields=fields)
    cloud.is_bigendian = sys.byteorder == "big"
    cloud.point_step = points.dtype.itemsize
    cloud.row_step = cloud.point_step * cloud.width
    cloud.is_dense = bool(all(np.isfinite(points[name]).all() for name in points.dtype.names))
    # An array.array is stored as is; other sequences are checked element by element (slow).
    cloud.data = array.array("B", points.tobytes())
    return cloud


def xyz_to_pointcloud2(xyz: np.ndarray, header: Header, **extra_fields: np.ndarray) -> PointCloud2:
    """A float32 x, y, z cloud, plus one field per keyword array of length N (e.g. sample_index)."""
    xyz = np.asarray(xyz).reshape(-1, 3)
    dtype = [(name, np.float32) for name in XYZ] + [(name, np.asarray(v).dtype) for name, v in extra_fields.items()]
    points = np.zeros(xyz.shape[0], dtype=dtype)
    for axis, name in enumerate(XYZ):
        points[name] = xyz[:, axis]
    for name, values in extra_fields.items():
        points[name] = values
    return array_to_pointcloud2(points, header)


def xyz_clouds_to_pointcloud2s(clouds: np.ndarray, header: Header) -> Iterator[PointCloud2]:
    """float32 x, y, z clouds from [n, P, 3], as xyz_to_pointcloud2 writes them, one at a time (a caller
    with a deadline may stop early); all share `header` and one fields list (~3x faster per cloud)."""
    data = np.ascontiguousarray(clouds, dtype=np.float32).reshape(clouds.shape[0], -1, 3)
    count, width = data.shape[:2]
    fields = [PointField(name=name, offset=4 * axis, datatype=PointField.FLOAT32, count=1) for axis, name in enumerate(XYZ)]
    dense = np.isfinite(data).all(axis=(1, 2))
    for index in range(count):
        yield PointCloud2(header=header, height=1, width=width, fields=fields, is_bigendian=sys.byteorder == "big",
                          point_step=12, row_step=12 * width, is_dense=bool(dense[index]),
                          data=array.array("B", data[index].tobytes()))


def stamp_to_ns(stamp) -> int:
    """A builtin_interfaces/Time as integer nanoseconds (0 for an unset stamp)."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# --- Poses and points --------------------------------------------------------------------------

def _check_coordinates(xyz: np.ndarray, what: str, verb: str) -> np.ndarray:
    if not np.isfinite(xyz).all():
        raise ValueError(f"{what} {verb} NaN or infinite values")
    largest = float(np.abs(xyz).max(initial=0.0))
    if largest > MAX_COORDINATE_M:
        raise ValueError(f"{what} {verb} a coordinate of {largest:.3g} m, beyond ±{MAX_COORDINATE_M:.0f} m")
    return xyz


def point_to_array(point: Point, what: str = "point") -> np.ndarray:
    """[3] float64; ValueError naming `what` if a coordinate is NaN, infinite or beyond MAX_COORDINATE_M."""
    return _check_coordinates(np.array([point.x, point.y, point.z], dtype=np.float64), what, "contains")


def points_to_array(points: Sequence[Point], what: str = "points") -> np.ndarray:
    """[k, 3] float64 from a Point list; ValueError if a coordinate is NaN, infinite or beyond MAX_COORDINATE_M."""
    return _check_coordinates(np.array([[p.x, p.y, p.z] for p in points], dtype=np.float64).reshape(-1, 3), what, "contain")


def vectors_to_array(vectors: Sequence, what: str = "vectors") -> np.ndarray:
    """[k, 3] float64 from a geometry_msgs Vector3 list; ValueError if a value is NaN or infinite. Any
    magnitude: these are directions (contact_directions), not coordinates in metres."""
    array = np.array([[v.x, v.y, v.z] for v in vectors], dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


def contact_travel_directions(poses: Sequence[Pose], what: str = "contacts") -> np.ndarray:
    """[k, 3] finger travel directions of contact poses (~/contacts): each pose's +z axis.

    Convention: a contact pose's +z axis is its finger's travel direction, toward the object. An
    identity quaternion (the message's default) or an all-zero one means "no direction" (a zero row):
    the contact is matched to the configured finger set. For a finger that really travels along +z, use
    any other rotation about z, e.g. (x, y, z, w) = (0, 0, 1, 0). ValueError for an invalid quaternion.
    """
    directions = np.zeros((len(poses), 3))
    for index, pose in enumerate(poses):
        q = pose.orientation
        if (q.x, q.y, q.z) == (0.0, 0.0, 0.0) and q.w in (0.0, 1.0, -1.0):
            continue
        w, x, y, z = quaternion_to_array(q, f"{what}[{index}] orientation")
        directions[index] = (2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y))  # R @ (0, 0, 1)
    return directions


def quaternion_to_array(orientation, what: str = "orientation") -> np.ndarray:
    """Unit quaternion [4] as (w, x, y, z) from a geometry_msgs Quaternion whose norm is about 1.

    ValueError if a value is NaN or infinite or the norm lies outside [MIN_QUATERNION_NORM,
    MAX_QUATERNION_NORM]. The norm is taken after scaling by the largest magnitude, so that huge
    values (1e300) cannot overflow it to inf and tiny ones cannot underflow it to 0.
    """
    wxyz = np.array([orientation.w, orientation.x, orientation.y, orientation.z], dtype=np.float64)
    if not np.isfinite(wxyz).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    largest = float(np.abs(wxyz).max())
    if largest == 0.0:
        raise ValueError(f"{what} is not a valid quaternion (all zero)")
    unit = wxyz / largest
    norm = float(np.linalg.norm(unit)) * largest
    if not MIN_QUATERNION_NORM <= norm <= MAX_QUATERNION_NORM:
        raise ValueError(
            f"{what} is not a valid quaternion (norm {norm:.3g}; a norm between {MIN_QUATERNION_NORM:g} and "
            f"{MAX_QUATERNION_NORM:g} is accepted and normalized)")
    return unit / np.linalg.norm(unit)


def pose_to_position_quaternion(pose: Pose, what: str = "pose") -> tuple[np.ndarray, np.ndarray]:
    """Position [3] and normalized quaternion [4] (w, x, y, z); ValueError if NaN/inf or a zero quaternion."""
    return point_to_array(pose.position, f"{what} position"), quaternion_to_array(pose.orientation, f"{what} orientation")


# --- Robot names and joint states --------------------------------------------------------------

@dataclass(frozen=True)
class RobotNames:
    """Joint and link names as the robot's ROS graph spells them: the core's `panda_<x>` is `<prefix><x>`.

    The prefix follows Franka's arm_id convention (`fr3_` gives fr3_joint1, fr3_link0, fr3_hand_tcp);
    the engines keep their panda_* names, and only messages and request fields are translated.
    """

    prefix: str = CORE_PREFIX

    def to_ros(self, core_name: str) -> str:
        return self.prefix + core_name.removeprefix(CORE_PREFIX)

    def to_core(self, ros_name: str) -> str | None:
        """The core name of the joint or link `ros_name`, or None if the robot has none of that name."""
        if not ros_name.startswith(self.prefix):
            return None
        core_name = CORE_PREFIX + ros_name[len(self.prefix):]
        return core_name if core_name in JOINT_NAMES or core_name in LINK_NAMES else None

    def in_text(self, text: str) -> str:
        """`text` (an engine's message) with the core's joint and link names as the robot spells them."""
        if self.prefix == CORE_PREFIX:
            return text
        return re.sub(rf"\b{CORE_PREFIX}\w+", lambda found: self.to_ros(found[0])
                      if found[0] in JOINT_NAMES or found[0] in LINK_NAMES else found[0], text)

    @property
    def joint_names(self) -> list[str]:
        return [self.to_ros(name) for name in JOINT_NAMES]

    @property
    def link_names(self) -> list[str]:
        return [self.to_ros(name) for name in LINK_NAMES]


def joint_state_from_positions(positions: np.ndarray, header: Header, names: RobotNames = RobotNames()) -> JointState:
    """A JointState of the 7 arm joints (<prefix>joint1..7), usable as a MoveIt IK seed."""
    return JointState(header=header, name=names.joint_names, position=[float(v) for v in positions])


def joint_state_to_positions(state: JointState, names: RobotNames = RobotNames()) -> np.ndarray | None:
    """[7] arm joint positions ordered <prefix>joint1..7, or None when the state has no positions.

    Names select and order the joints (other joints, e.g. the fingers, are ignored); a nameless
    state must list exactly the 7 arm joints in order.
    """
    if len(state.position) == 0:
        return None
    positions = np.asarray(state.position, dtype=np.float64)
    joint_names = names.joint_names
    if len(state.name) == 0:
        if positions.size != len(joint_names):
            raise ValueError(f"a JointState without names needs {len(joint_names)} positions, got {positions.size}")
        ordered = positions
    else:
        if len(state.name) != positions.size:
            raise ValueError(f"JointState has {len(state.name)} names but {positions.size} positions")
        by_name = dict(zip(state.name, positions))
        if len(by_name) != len(state.name):  # which of a name's values would be meant?
            repeated = sorted({name for name in state.name if list(state.name).count(name) > 1})
            raise ValueError(f"JointState names joint(s) {', '.join(repeated)} more than once")
        missing = [name for name in joint_names if name not in by_name]
        if missing:
            other_prefix = _arm_prefix(state.name)
            hint = "" if other_prefix is None else (
                f" (it names {other_prefix}joint1..7: this node's robot_prefix is '{names.prefix}')")
            raise ValueError(f"JointState lacks joint(s) {', '.join(missing)}{hint}")
        ordered = np.array([by_name[name] for name in joint_names])
    if not np.isfinite(ordered).all():
        raise ValueError("JointState positions contain NaN or infinite values")
    return ordered


def _arm_prefix(joint_names: Sequence[str]) -> str | None:
    """The prefix p for which `joint_names` hold p + joint1 .. p + joint7 (a 7-joint arm's names), if any."""
    present = set(joint_names)
    for name in joint_names:
        if name.endswith("joint1"):
            prefix = name.removesuffix("joint1")
            if all(f"{prefix}joint{index}" in present for index in range(2, 8)):
                return prefix
    return None


def joint_state_entry(state: JointState, names: RobotNames, now_ns: int) -> tuple[int, np.ndarray] | None:
    """(stamp ns, arm positions [7]) of a /joint_states message (stamped now_ns when it has no stamp);
    None for a state without positions or another joint group's (e.g. the gripper's). ValueError, with
    what was wrong, for a malformed one."""
    try:
        positions = joint_state_to_positions(state, names)
    except ValueError as error:
        if state.name and not set(state.name) & set(names.joint_names):
            other_prefix = _arm_prefix(state.name)
            if other_prefix is not None:  # the arm's joints under another name: a robot_prefix mismatch, not a gripper
                raise ValueError(
                    f"/joint_states ignored: it names the arm's joints {other_prefix}joint1..7, and this node expects "
                    f"{names.prefix}joint1..7 (set the robot_prefix parameter to '{other_prefix}')") from None
            return None
        raise ValueError(f"/joint_states ignored: {error}") from None
    if positions is None:
        return None
    return stamp_to_ns(state.header.stamp) or now_ns, positions


# --- Markers -> scene primitives ---------------------------------------------------------------

def marker_key(marker: Marker) -> str:
    """The identity of an obstacle marker, as rviz keys markers: namespace and id."""
    return f"{marker.ns}/{marker.id}"


def marker_lifetime_ns(marker: Marker) -> int:
    """The marker's lifetime in ns, 0 for one that stays until deleted (rviz's meaning of a zero lifetime)."""
    lifetime_ns = int(marker.lifetime.sec) * 1_000_000_000 + int(marker.lifetime.nanosec)
    if lifetime_ns < 0:
        raise ValueError(f"marker {marker_key(marker)} has a negative lifetime ({lifetime_ns * 1e-9:g} s)")
    return lifetime_ns


def marker_to_primitive(marker: Marker, to_base: RigidTransform) -> Box | Sphere | Cylinder:
    """A CUBE, SPHERE or CYLINDER marker as a scene primitive in the base frame.

    rviz scales are full sizes: CUBE edge lengths; SPHERE diameters (an ellipsoid is replaced by
    its enclosing sphere, which keeps the obstacle conservative); CYLINDER x/y diameters and z height.
    """
    from mace_ros.core.scene import Box, Cylinder, Sphere

    name = marker_key(marker)
    orientation = marker.pose.orientation
    if orientation.w == orientation.x == orientation.y == orientation.z == 0.0:
        # rviz draws a marker with an uninitialized (all-zero) quaternion unrotated; so does the model
        center, quaternion = point_to_array(marker.pose.position, f"marker {name} pose position"), np.array([1.0, 0.0, 0.0, 0.0])
    else:
        center, quaternion = pose_to_position_quaternion(marker.pose, f"marker {name} pose")
    center, quaternion = to_base.apply_pose(center, quaternion)
    scale = np.array([marker.scale.x, marker.scale.y, marker.scale.z], dtype=np.float64)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"marker {name} has a non-positive or non-finite scale {scale.tolist()}")
    if marker.type == Marker.CUBE:
        return Box(name, center, quaternion, scale / 2.0)
    if marker.type == Marker.SPHERE:
        return Sphere(name, center, float(scale.max()) / 2.0)
    if marker.type == Marker.CYLINDER:
        return Cylinder(name, center, quaternion, float(max(scale[0], scale[1])) / 2.0, float(scale[2]) / 2.0)
    raise ValueError(f"marker {name} has type {marker.type}; obstacles must be CUBE, SPHERE or CYLINDER")
