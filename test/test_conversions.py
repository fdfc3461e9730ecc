"""Message <-> numpy conversions against messages built by hand with struct."""
from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from sensor_msgs.msg import JointState, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from mace_ros.core.kinematics import LINK_INDEX
from mace_ros.core.scene import Box, Cylinder, Sphere
from mace_ros.ros import conversions
from mace_ros.ros.frames import FrameTable, JointStateHistory, RigidTransform, RobotFrames, UnknownFrameError
from mace_ros.ros import obstacles
from mace_ros.ros.obstacles import CloudVoxelizer, ObstacleModel, SelfFilter, Workspace

F32, F64, U32 = PointField.FLOAT32, PointField.FLOAT64, PointField.UINT32


def make_cloud(fields: list[tuple[str, int, int]], point_step: int, rows: list[bytes], *,
               width: int, big_endian: bool = False, row_step: int | None = None) -> PointCloud2:
    """A PointCloud2 from (name, offset, datatype) fields and raw rows of packed points."""
    cloud = PointCloud2(header=Header(frame_id="panda_link0"), height=len(rows), width=width)
    cloud.fields = [PointField(name=n, offset=o, datatype=d, count=1) for n, o, d in fields]
    cloud.is_bigendian = big_endian
    cloud.point_step = point_step
    cloud.row_step = row_step if row_step is not None else width * point_step
    cloud.data = b"".join(rows)
    return cloud


XYZ_F32 = [("x", 0, F32), ("y", 4, F32), ("z", 8, F32)]
POINTS = [(0.1, -0.2, 0.3), (1.5, 2.25, -3.0), (0.0, 0.0, 1.0)]


def test_float32_xyz_with_point_step_padding():
    # 12 bytes of x, y, z then 4 bytes of padding, as many drivers align points to 16 bytes.
    cloud = make_cloud(XYZ_F32, 16, [b"".join(struct.pack("<fff4x", *p) for p in POINTS)], width=3)
    np.testing.assert_allclose(conversions.pointcloud2_to_xyz(cloud), POINTS, rtol=1e-6)


def test_driver_layout_xyz_is_a_view_of_the_message_and_other_layouts_a_float64_copy():
    cloud = make_cloud(XYZ_F32 + [("rgb", 16, F32)], 32, [b"".join(struct.pack("<fff4xf12x", *p, 1.0) for p in POINTS)], width=3)
    xyz = conversions.pointcloud2_xyz(cloud)
    assert xyz.dtype == np.float32 and xyz.strides == (32, 4) and not xyz.flags.owndata  # nothing copied
    np.testing.assert_allclose(xyz, POINTS, rtol=1e-6)
    shuffled = make_cloud([("y", 0, F32), ("x", 4, F32), ("z", 8, F32)], 12,
                          [b"".join(struct.pack("<fff", p[1], p[0], p[2]) for p in POINTS)], width=3)
    copied = conversions.pointcloud2_xyz(shuffled)
    assert copied.dtype == np.float64 and copied.flags.c_contiguous
    np.testing.assert_allclose(copied, POINTS, rtol=1e-6)


def test_point_subsample_takes_every_nth_row_and_column_or_point():
    grid = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)  # an organized 7 x 5 cloud's x, y, z
    rows = [b"".join(struct.pack("<fff4x", *point) for point in row) + bytes(8) for row in grid]  # padded rows
    organized = make_cloud(XYZ_F32, 16, rows, width=7, row_step=7 * 16 + 8)
    np.testing.assert_array_equal(conversions.pointcloud2_xyz(organized, 2), grid[::2, ::2].reshape(-1, 3))
    np.testing.assert_array_equal(conversions.pointcloud2_xyz(organized, 1), grid.reshape(-1, 3))
    flat = make_cloud(XYZ_F32, 16, [b"".join(struct.pack("<fff4x", *point) for point in grid.reshape(-1, 3))], width=35)
    np.testing.assert_array_equal(conversions.pointcloud2_xyz(flat, 3), grid.reshape(-1, 3)[::3])
    assert conversions.pointcloud2_xyz(make_cloud(XYZ_F32, 12, [b""], width=0), 4).shape == (0, 3)


def test_float64_fields_and_an_extra_field():
    fields = [("x", 0, F64), ("y", 8, F64), ("z", 16, F64), ("intensity", 24, F32)]
    data = b"".join(struct.pack("<dddf4x", *p, 7.0) for p in POINTS)
    cloud = make_cloud(fields, 32, [data], width=3)
    xyz = conversions.pointcloud2_to_xyz(cloud)
    assert xyz.dtype == np.float64
    np.testing.assert_array_equal(xyz, POINTS)  # float64 survives exactly
    np.testing.assert_array_equal(conversions.pointcloud2_to_array(cloud)["intensity"], [7.0, 7.0, 7.0])


def test_big_endian_and_fields_out_of_order():
    fields = [("z", 0, F32), ("x", 4, F32), ("y", 8, F32)]
    data = b"".join(struct.pack(">fff", p[2], p[0], p[1]) for p in POINTS)
    cloud = make_cloud(fields, 12, [data], width=3, big_endian=True)
    np.testing.assert_allclose(conversions.pointcloud2_to_xyz(cloud), POINTS, rtol=1e-6)


def test_organized_cloud_with_row_padding():
    # Two rows of two points; each row padded to 32 bytes (row_step > width * point_step).
    rows = [struct.pack("<ffffff", *POINTS[0], *POINTS[1]) + bytes(8),
            struct.pack("<ffffff", *POINTS[2], 4.0, 5.0, 6.0) + bytes(8)]
    cloud = make_cloud(XYZ_F32, 12, rows, width=2, row_step=32)
    expected = [*POINTS, (4.0, 5.0, 6.0)]
    np.testing.assert_allclose(conversions.pointcloud2_to_xyz(cloud), expected, rtol=1e-6)


def test_nan_and_infinite_points_are_dropped():
    points = [(0.1, 0.2, 0.3), (math.nan, 0.0, 0.0), (0.0, math.inf, 0.0), (1.0, 1.0, 1.0)]
    cloud = make_cloud(XYZ_F32, 12, [b"".join(struct.pack("<fff", *p) for p in points)], width=4)
    np.testing.assert_allclose(conversions.pointcloud2_to_xyz(cloud), [points[0], points[3]], rtol=1e-6)


def test_missing_z_is_a_clear_error():
    cloud = make_cloud(XYZ_F32[:2], 8, [struct.pack("<ff", 1.0, 2.0)], width=1)
    with pytest.raises(ValueError, match=r"lacks field\(s\) z \(fields: x, y\)"):
        conversions.pointcloud2_to_xyz(cloud)


def test_integer_coordinates_are_a_clear_error():
    """An INT16 cloud in millimetres was read as metres: phantom obstacles a metre away."""
    cloud = make_cloud([("x", 0, PointField.INT16), ("y", 2, PointField.INT16), ("z", 4, PointField.INT16)], 6,
                       [struct.pack("<hhh", 1, 0, 0)], width=1)
    with pytest.raises(ValueError, match="x, y, z are integers"):
        conversions.pointcloud2_to_xyz(cloud)


def test_truncated_data_and_fields_past_point_step_are_errors():
    short = make_cloud(XYZ_F32, 12, [struct.pack("<fff", *POINTS[0])], width=2)
    with pytest.raises(ValueError, match="data has 12 bytes"):
        conversions.pointcloud2_to_xyz(short)
    overlong = make_cloud(XYZ_F32, 8, [bytes(8)], width=1)
    with pytest.raises(ValueError, match="past point_step 8"):
        conversions.pointcloud2_to_xyz(overlong)


def test_empty_cloud_gives_no_points():
    cloud = make_cloud(XYZ_F32, 12, [], width=0)
    assert conversions.pointcloud2_to_xyz(cloud).shape == (0, 3)
    # A default-constructed message (no fields at all) is empty too: it clears its sensor like any other.
    assert conversions.pointcloud2_to_xyz(PointCloud2(header=Header(frame_id="camera"))).shape == (0, 3)


def test_only_the_xyz_fields_need_to_be_well_formed():
    """A driver's other fields (an unknown datatype, repeated padding names) do not cost the cloud;
    an ambiguous x, y or z still does."""
    point = struct.pack("<fff4xI", *POINTS[0], 7)
    odd_fields = XYZ_F32 + [("_", 12, PointField.UINT8), ("_", 13, PointField.UINT8), ("rgb", 16, 0)]
    cloud = make_cloud(odd_fields, 20, [point], width=1)
    np.testing.assert_allclose(conversions.pointcloud2_to_xyz(cloud), [POINTS[0]], rtol=1e-6)
    with pytest.raises(ValueError, match="field 'x' appears twice"):
        conversions.pointcloud2_to_xyz(make_cloud(XYZ_F32 + [("x", 16, F32)], 20, [point], width=1))


def test_written_cloud_matches_a_hand_packed_layout_and_round_trips():
    xyz = np.array(POINTS)
    sample_index = np.array([0, 0, 1], dtype=np.uint32)
    cloud = conversions.xyz_to_pointcloud2(xyz, Header(frame_id="panda_link0"), sample_index=sample_index)
    assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
        ("x", 0, F32, 1), ("y", 4, F32, 1), ("z", 8, F32, 1), ("sample_index", 12, U32, 1)]
    assert (cloud.height, cloud.width, cloud.point_step, cloud.row_step) == (1, 3, 16, 48)
    assert bytes(cloud.data) == b"".join(struct.pack("<fffI", *p, i) for p, i in zip(POINTS, sample_index))
    np.testing.assert_allclose(conversions.pointcloud2_to_xyz(cloud), xyz, rtol=1e-6)
    np.testing.assert_array_equal(conversions.pointcloud2_to_array(cloud)["sample_index"], sample_index)


def test_pose_quaternion_is_normalized_and_invalid_ones_rejected():
    pose = Pose(position=Point(x=0.5, y=0.0, z=0.2), orientation=Quaternion(x=0.0, y=2.0, z=0.0, w=0.0))
    position, quaternion = conversions.pose_to_position_quaternion(pose)
    np.testing.assert_array_equal(position, [0.5, 0.0, 0.2])
    np.testing.assert_array_equal(quaternion, [0.0, 0.0, 1.0, 0.0])  # (w, x, y, z)
    with pytest.raises(ValueError, match="not a valid quaternion"):
        conversions.pose_to_position_quaternion(Pose(orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=0.0)))
    with pytest.raises(ValueError, match="position contains NaN"):
        conversions.pose_to_position_quaternion(Pose(position=Point(x=math.nan)))


def test_joint_states_use_panda_joint_names_in_order():
    state = conversions.joint_state_from_positions(np.arange(7.0), Header(frame_id="panda_link0"))
    assert list(state.name) == [f"panda_joint{i}" for i in range(1, 8)]
    shuffled = JointState(name=[*reversed(state.name), "panda_finger_joint1"], position=[*reversed(range(7)), 0.04])
    np.testing.assert_array_equal(conversions.joint_state_to_positions(shuffled), np.arange(7.0))
    assert conversions.joint_state_to_positions(JointState()) is None
    with pytest.raises(ValueError, match="lacks joint"):
        conversions.joint_state_to_positions(JointState(name=["panda_joint1"], position=[0.0]))
    with pytest.raises(ValueError, match="panda_joint1 more than once"):  # accepted before: which value was meant?
        conversions.joint_state_to_positions(JointState(name=[*state.name, "panda_joint1"], position=[*range(7), 0.5]))


def test_joint_states_of_another_prefix_say_so_and_a_grippers_are_ignored():
    names = conversions.RobotNames()
    fr3 = JointState(name=[f"fr3_joint{i}" for i in range(1, 8)], position=[0.0] * 7)
    with pytest.raises(ValueError, match="fr3_joint1..7.*panda_joint1..7.*robot_prefix parameter to 'fr3_'"):
        conversions.joint_state_entry(fr3, names, 1)
    gripper = JointState(name=["panda_finger_joint1", "panda_finger_joint2"], position=[0.04, 0.04])
    assert conversions.joint_state_entry(gripper, names, 1) is None
    assert conversions.joint_state_entry(fr3, conversions.RobotNames("fr3_"), 1)[0] == 1
    assert conversions.RobotNames("fr3_").in_text("beyond where panda_hand_tcp can be; panda_joint7, panda_x") == (
        "beyond where fr3_hand_tcp can be; fr3_joint7, panda_x")
    assert names.in_text("panda_hand") == "panda_hand"


def marker(marker_type: int, scale: tuple[float, float, float], frame: str = "panda_link0") -> Marker:
    return Marker(header=Header(frame_id=frame), ns="table", id=3, type=marker_type,
                  pose=Pose(position=Point(x=0.5, y=0.0, z=0.1), orientation=Quaternion(w=1.0)),
                  scale=Vector3(x=scale[0], y=scale[1], z=scale[2]))


def test_markers_become_primitives_with_rviz_scale_semantics():
    identity = RigidTransform.identity()
    box = conversions.marker_to_primitive(marker(Marker.CUBE, (0.4, 0.2, 0.1)), identity)
    assert isinstance(box, Box) and box.name == "table/3"
    np.testing.assert_allclose(box.half_extents, [0.2, 0.1, 0.05])
    sphere = conversions.marker_to_primitive(marker(Marker.SPHERE, (0.1, 0.2, 0.1)), identity)
    assert isinstance(sphere, Sphere) and sphere.radius == pytest.approx(0.1)  # enclosing sphere
    cylinder = conversions.marker_to_primitive(marker(Marker.CYLINDER, (0.1, 0.1, 0.3)), identity)
    assert isinstance(cylinder, Cylinder)
    assert (cylinder.radius, cylinder.half_height) == pytest.approx((0.05, 0.15))
    with pytest.raises(ValueError, match="CUBE, SPHERE or CYLINDER"):
        conversions.marker_to_primitive(marker(Marker.ARROW, (0.1, 0.1, 0.1)), identity)
    with pytest.raises(ValueError, match="non-positive"):
        conversions.marker_to_primitive(marker(Marker.CUBE, (0.1, 0.0, 0.1)), identity)


def test_rotated_markers_turn_their_primitives_as_rviz_draws_them():
    """rviz draws a marker's scale along the axes of its pose: a CUBE 0.4 m long in x, turned 90° about z,
    reaches 0.2 m along the base's y, and a CYLINDER (axis: its z) turned 90° about x lies along the base's y."""
    half = math.sqrt(0.5)

    def inside(primitive, point) -> bool:
        local = primitive.rotation.T @ (np.asarray(point) - primitive.center)
        if isinstance(primitive, Box):
            return bool((np.abs(local) <= primitive.half_extents + 1e-9).all())
        return bool(abs(local[2]) <= primitive.half_height + 1e-9 and math.hypot(local[0], local[1]) <= primitive.radius + 1e-9)

    cube = marker(Marker.CUBE, (0.4, 0.1, 0.1))
    cube.pose.orientation = Quaternion(z=half, w=half)
    box = conversions.marker_to_primitive(cube, RigidTransform.identity())
    assert inside(box, (0.5, 0.18, 0.1)) and not inside(box, (0.68, 0.0, 0.1))
    rod = marker(Marker.CYLINDER, (0.04, 0.04, 0.3))
    rod.pose.orientation = Quaternion(x=half, w=half)
    cylinder = conversions.marker_to_primitive(rod, RigidTransform.identity())
    assert inside(cylinder, (0.5, 0.14, 0.1)) and not inside(cylinder, (0.5, 0.0, 0.24))


def test_static_transforms_move_markers_and_reject_unknown_frames():
    # camera_link sits 1 m above the base, turned 90 degrees about z.
    half = math.sqrt(0.5)
    frames = FrameTable("panda_link0", FrameTable.parse_static_transforms(f"camera_link 0 0 1 0 0 {half} {half}"))
    box = conversions.marker_to_primitive(marker(Marker.CUBE, (0.4, 0.2, 0.1), "camera_link"), frames.to_base("camera_link"))
    np.testing.assert_allclose(box.center, [0.0, 0.5, 1.1], atol=1e-12)
    np.testing.assert_allclose(box.quaternion_wxyz, [half, 0.0, 0.0, half], atol=1e-12)
    assert frames.to_base("").is_identity and frames.to_base("panda_link0").is_identity
    with pytest.raises(UnknownFrameError, match="unknown frame 'world'"):
        frames.to_base("world")


def test_unknown_frame_message_lists_each_frame_once():
    # The base frame is also a robot link (an attached frame): it was listed twice.
    attached = FrameTable.parse_attached_frames("panda_link0 panda_link0 0 0 0 0 0 0 1; camera panda_hand 0 0 0 0 0 0 1",
                                                lambda name: name)
    frames = FrameTable("panda_link0", {}, attached, RobotFrames())
    with pytest.raises(UnknownFrameError) as raised:
        frames.to_base("world")
    assert str(raised.value).count("panda_link0") == 1
    assert frames.accepted == ["camera", "panda_link0"]


def test_obstacle_model_caps_marker_primitives_and_applies_a_message_in_order():
    model = ObstacleModel(max_primitives=2)
    box = Box("b", (0.5, 0, 0.5), (1, 0, 0, 0), (0.1, 0.1, 0.1))
    assert model.apply([("put", "a/1", box, 0), ("put", "a/2", box, 0), ("put", "a/3", box, 0), ("put", "a/1", box, 0)]) == 1
    assert len(model.snapshot().boxes) == 2  # a/3 refused, a/1 updated
    assert model.apply([("clear", "a", None, 0), ("put", "b/1", box, 0)]) == 0
    assert len(model.snapshot().boxes) == 1
    model.clear()
    assert not model.snapshot().boxes


def test_obstacle_model_keeps_its_snapshot_when_a_message_changes_nothing():
    """A publisher re-sending the same markers keeps the snapshot (so engines keep their prepared scene and
    the exact checker its body); any real change, however small, makes a new one."""
    model = ObstacleModel()

    def box(x: float) -> Box:
        return Box("b", (x, 0, 0.5), (1, 0, 0, 0), (0.1, 0.1, 0.1))

    model.apply([("put", "a/1", box(0.5), 0), ("put", "a/2", Sphere("s", (0.3, 0.2, 0.1), 0.05), 0)])
    first, version = model.snapshot(), model.primitives_version
    model.apply([("put", "a/1", box(0.5), 0), ("put", "a/2", Sphere("s", (0.3, 0.2, 0.1), 0.05), 0),
                 ("remove", "a/9", None, 0), ("clear", "other", None, 0)])
    assert model.snapshot() is first and model.primitives_version == version
    model.apply([("put", "a/1", box(0.5 + 1e-9), 0)])
    moved = model.snapshot()
    assert moved is not first and model.primitives_version == version + 1
    assert moved.boxes[0].center[0] == 0.5 + 1e-9
    model.apply([("put", "a/2", Box("s", (0.3, 0.2, 0.1), (1, 0, 0, 0), (0.05, 0.05, 0.05)), 0)])  # same place, new type
    assert len(model.snapshot().boxes) == 2 and not model.snapshot().spheres
    model.clear("a")
    assert model.snapshot().is_empty and model.primitives_version == version + 3


def test_markers_with_a_lifetime_expire_as_rviz_expires_them():
    """A marker with a lifetime leaves the model once its lifetime has passed since it arrived; re-sending it
    starts the lifetime again; lifetime 0 keeps it until deleted."""
    now_ns = [0]
    model = ObstacleModel(clock_ns=lambda: now_ns[0])
    box = Box("b", (0.5, 0, 0.5), (1, 0, 0, 0), (0.1, 0.1, 0.1))
    model.apply([("put", "a/1", box, 1_000_000_000), ("put", "a/2", box, 0), ("put", "a/3", box, 3_000_000_000)])
    version = model.primitives_version
    now_ns[0] = 999_999_999
    assert len(model.snapshot().boxes) == 3
    now_ns[0] = 1_000_000_000
    model.expire()
    assert len(model.snapshot().boxes) == 2 and model.primitives_version == version + 1
    model.apply([("put", "a/3", box, 3_000_000_000)])  # re-sent: lives until 4 s; unchanged, so the snapshot stays
    assert model.primitives_version == version + 1
    now_ns[0] = 3_500_000_000
    assert len(model.snapshot().boxes) == 2
    model.apply([("put", "a/3", box, 0)])  # lifetime 0: until deleted
    now_ns[0] = 10**12
    assert len(model.snapshot().boxes) == 2


def test_marker_lifetime_and_an_uninitialized_quaternion():
    cube = marker(Marker.CUBE, (0.4, 0.2, 0.1))
    assert conversions.marker_lifetime_ns(cube) == 0
    cube.lifetime.sec, cube.lifetime.nanosec = 1, 500_000_000
    assert conversions.marker_lifetime_ns(cube) == 1_500_000_000
    cube.lifetime.sec = -2
    with pytest.raises(ValueError, match="negative lifetime"):
        conversions.marker_lifetime_ns(cube)
    cube.pose.orientation = Quaternion(x=0.0, y=0.0, z=0.0, w=0.0)  # as rviz: drawn unrotated
    np.testing.assert_array_equal(conversions.marker_to_primitive(cube, RigidTransform.identity()).quaternion_wxyz, [1, 0, 0, 0])
    cube.pose.orientation = Quaternion(x=0.0, y=0.0, z=0.0, w=1e-3)  # not all zero: still refused
    with pytest.raises(ValueError, match="not a valid quaternion"):
        conversions.marker_to_primitive(cube, RigidTransform.identity())


def _strided_xyz(points: np.ndarray, dtype=np.float32) -> np.ndarray:
    """x, y, z [N, 3] as a strided view of 32-byte points, as a camera driver's padded cloud gives them."""
    padded = np.zeros((points.shape[0], 8), dtype=dtype)
    padded[:, :3] = points
    return padded[:, :3]


def test_cloud_voxelizer_keeps_occupied_voxel_centres_inside_the_workspace():
    workspace = Workspace.from_bounds([-1, -1, 0], [1, 1, 1])
    points = np.array([[0.501, 0.002, 0.503], [0.508, 0.009, 0.507],  # one voxel
                       [0.203, -0.296, 0.254], [8.0, 0, 0.5], [1e30, 0, 0], [0, 0, -0.01], [np.nan, 0.1, 0.1], [0.1, np.inf, 0.1],
                       [3e38, -3e38, 0.5]])  # finite in float32, infinite once scaled to voxels: still outside
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no overflow warning for what is dropped anyway
        cropped = CloudVoxelizer(workspace, 0.01).voxelize(_strided_xyz(points), RigidTransform.identity())
    assert (cropped.inside, cropped.outside) == (3, 4)  # NaN and inf are neither
    np.testing.assert_allclose(cropped.points[np.lexsort(cropped.points.T[::-1])],
                               [[0.205, -0.295, 0.255], [0.505, 0.005, 0.505]], atol=1e-9)
    unthinned = CloudVoxelizer(workspace, 0.0).voxelize(_strided_xyz(points, np.float64), RigidTransform.identity())
    np.testing.assert_allclose(unthinned.points, points[:3], atol=1e-12)


def test_cloud_voxelizer_takes_points_at_the_sensors_origin_for_no_return():
    """Drivers that write 0 for "no return" (librealsense deprojects depth 0 to the origin) would put a phantom
    obstacle at an eye-in-hand camera: such points are dropped as NaN is, and counted as neither."""
    workspace = Workspace.from_bounds([-1, -1, 0], [1, 1, 1])
    in_hand = RigidTransform(Rotation.from_rotvec([3.0, 0.1, 0.0]).as_matrix(), np.array([0.4, 0.1, 0.5]))
    seen = np.array([[0.0, 0.0, 0.3], [0.05, -0.02, 0.25]])
    points = np.concatenate([seen, np.zeros((50, 3)), [[0.0, 0.0, 9.0]]])
    cropped = CloudVoxelizer(workspace, 0.01).voxelize(_strided_xyz(points), in_hand)
    assert (cropped.inside, cropped.outside) == (2, 1)
    assert np.linalg.norm(cropped.points - in_hand.translation, axis=1).min() > 0.2
    unthinned = CloudVoxelizer(workspace, 0.0).voxelize(_strided_xyz(points, np.float64), in_hand)
    np.testing.assert_allclose(unthinned.points, in_hand.apply(seen), atol=1e-12)


def test_cloud_voxelizer_transforms_into_the_base_frame_like_a_reference():
    rng = np.random.default_rng(3)
    workspace = Workspace.from_bounds([-1.15, -1.15, -0.3], [1.15, 1.15, 1.45])
    to_base = RigidTransform(Rotation.from_rotvec([0.3, -1.1, 0.7]).as_matrix(), np.array([0.4, -0.2, 0.9]))
    for voxel_size_m in (0.02, 1e-4):  # a dense occupancy array, then sorted keys (2.3e4 cells per axis)
        # Near voxel centres in the base frame (no ties at voxel faces), some beyond the workspace.
        spread = (rng.integers(-70, 70, (4000, 3)) + 0.5) * 0.02
        cells = np.floor((spread - workspace.low) / voxel_size_m)
        base = workspace.low + (cells + 0.5 + rng.uniform(-0.3, 0.3, cells.shape)) * voxel_size_m
        cropped = CloudVoxelizer(workspace, voxel_size_m).voxelize(_strided_xyz(to_base.inverse().apply(base), np.float64), to_base)
        inside = ((base >= workspace.low) & (base <= workspace.high)).all(1)
        occupied = np.unique(cells[inside], axis=0)
        np.testing.assert_allclose(cropped.points[np.lexsort(cropped.points.T[::-1])],
                                   workspace.low + (occupied + 0.5) * voxel_size_m, atol=1e-9)
        assert 0 < cropped.outside == int((~inside).sum()) and cropped.inside == int(inside.sum())


@pytest.mark.parametrize("chunk", [8192, 97])
def test_self_filter_drops_exactly_the_points_within_padding_of_a_sphere(chunk, monkeypatch):
    """Against each sphere by itself, at random arm configurations, with points spread around the arm
    (chunks smaller than the candidates exercise the chunking)."""
    monkeypatch.setattr(obstacles, "SELF_FILTER_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    self_filter, robot, padding_m = SelfFilter(), RobotFrames(), 0.02
    for _ in range(5):
        links = robot.link_transforms(rng.uniform(-1.5, 1.5, 7))
        centers = self_filter.sphere_centers(links)
        points = np.concatenate([rng.uniform(-1.0, 1.0, (3000, 3)), centers[rng.integers(len(centers), size=2000)]
                                 + rng.normal(0.0, 0.08, (2000, 3))])
        distances = np.linalg.norm(points[:, None, :] - centers[None], axis=2) - self_filter._radii
        keep = self_filter.keep(points, links, padding_m)
        np.testing.assert_array_equal(keep, (distances > padding_m).all(1))
        assert 0 < (~keep).sum() < len(points)


def test_workspace_drops_far_primitives():
    workspace = Workspace.from_bounds([-1, -1, 0], [1, 1, 1])
    assert workspace.meets(Box("edge", (1.05, 0, 0.5), (1, 0, 0, 0), (0.1, 0.1, 0.1)))
    assert not workspace.meets(Sphere("far", (2.0, 0, 0.5), 0.05))
    with pytest.raises(ValueError):
        Workspace.from_bounds([0, 0, 0], [1, -1, 1])


def test_attached_frames_follow_the_joint_state_closest_to_the_stamp():
    robot = RobotFrames()
    attached = FrameTable.parse_attached_frames("camera panda_hand 0 0 0.1 0 0 0 1", lambda name: name)
    frames = FrameTable("panda_link0", {}, attached, robot)
    with pytest.raises(ValueError, match="joint_states"):
        frames.to_base("camera")
    q0, q1 = np.zeros(7), np.array([0.5, 0, 0, -1.5, 0, 1.5, 0])
    robot.joint_states.add(1_000_000_000, q0)
    robot.joint_states.add(1_100_000_000, q1)
    hand = robot.link_transforms(q0)[LINK_INDEX["panda_hand"]]
    np.testing.assert_allclose(frames.to_base("camera", 1_020_000_000).apply(np.zeros(3)), hand[:3, :3] @ [0, 0, 0.1] + hand[:3, 3])
    assert not np.allclose(frames.to_base("camera").translation, frames.to_base("camera", 1_000_000_000).translation)
    with pytest.raises(ValueError, match="not a link"):
        FrameTable.parse_attached_frames("camera panda_nose 0 0 0 0 0 0 1", lambda name: name)


def test_joint_state_history_returns_the_state_stamped_closest():
    history = JointStateHistory()
    assert history.at() is None and history.at(5) is None
    rng = np.random.default_rng(0)
    stamps = np.cumsum(rng.integers(1, 3_000_000, 500)) + 1_000_000_000  # 1 kHz-like, irregular, increasing
    for stamp in stamps:
        history.add(int(stamp), np.full(7, float(stamp)))
    for query in [0, 1, int(stamps[0]), int(stamps[-1]) + 10**9, *rng.integers(stamps[0] - 10**6, stamps[-1] + 10**6, 200)]:
        expected = stamps[-1] if query == 0 else stamps[np.argmin(np.abs(stamps - query))]
        assert history.at(int(query))[0] == float(expected), query
    history.add(int(stamps[0]), np.zeros(7))  # time went back (a restarted bag): only the new state remains
    assert history.at(int(stamps[-1]))[0] == 0.0


def test_contact_poses_carry_their_fingers_travel_direction_on_their_z_axis():
    from mace_ros.ros.conversions import contact_travel_directions

    half = math.sqrt(0.5)
    poses = [Pose(), Pose(orientation=Quaternion(w=0.0)), Pose(orientation=Quaternion(x=half, w=half)),
             Pose(orientation=Quaternion(z=1.0, w=0.0)), Pose(orientation=Quaternion(y=-2 * half, w=2 * half))]
    directions = contact_travel_directions(poses)
    # identity and all-zero = no direction; +90° about x: -y; 180° about z: +z; -90° about y (unnormalized): -x
    assert np.allclose(directions, [[0, 0, 0], [0, 0, 0], [0, -1, 0], [0, 0, 1], [-1, 0, 0]])
    with pytest.raises(ValueError, match=r"contacts\[0\] orientation"):
        contact_travel_directions([Pose(orientation=Quaternion(x=math.nan))])
