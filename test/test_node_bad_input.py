"""The installed node refuses bad requests with success=false, a reason and an error code, and keeps serving.

Validation comes before the engines are consulted, so these hold whether or not the engines
have loaded (or could load) on this machine. Finite but absurd values (1e300, ...) are refused
as clearly as NaN: no input may reach the engines and come back as an "engine error".
"""
from __future__ import annotations

import math
import struct
import time

import pytest
from geometry_msgs.msg import Point, Pose, PoseArray, Quaternion
from sensor_msgs.msg import JointState, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from conftest import ik_request
from mace_ros.srv import InferShape


def shape_request(**fields) -> InferShape.Request:
    request = InferShape.Request()
    request.header.frame_id = "panda_link0"
    request.contacts = [Point(x=0.54, y=0.0, z=0.1), Point(x=0.46, y=0.0, z=0.1)]
    request.object_origin = Point(x=0.5, y=0.0, z=0.1)
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def cloud_without_z() -> PointCloud2:
    cloud = PointCloud2(header=Header(frame_id="panda_link0"), height=1, width=2, point_step=8, row_step=16)
    cloud.fields = [PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
                    PointField(name="y", offset=4, datatype=PointField.FLOAT32, count=1)]
    cloud.data = struct.pack("<ffff", 0.5, 0.0, 0.5, 0.01)
    return cloud


def truncated_cloud() -> PointCloud2:
    cloud = PointCloud2(header=Header(frame_id="panda_link0"), height=1, width=100, point_step=12, row_step=1200)
    cloud.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyz")]
    cloud.data = struct.pack("<fff", 0.5, 0.0, 0.1)
    return cloud


def far_point_cloud(far: float) -> PointCloud2:
    """20 points of a small object at (0.5, 0, 0.1), and one at x = `far` (float64 fields)."""
    points = [(0.5 + 0.001 * i, 0.0, 0.1) for i in range(20)] + [(far, 0.0, 0.1)]
    cloud = PointCloud2(header=Header(frame_id="panda_link0"), height=1, width=len(points), point_step=24)
    cloud.row_step = cloud.point_step * cloud.width
    cloud.fields = [PointField(name=n, offset=8 * i, datatype=PointField.FLOAT64, count=1) for i, n in enumerate("xyz")]
    cloud.data = b"".join(struct.pack("<ddd", *p) for p in points)
    return cloud


def repeated_point_cloud(count: int) -> PointCloud2:
    """One point of an object at (0.5, 0, 0.1), `count` times (float32 fields)."""
    cloud = PointCloud2(header=Header(frame_id="panda_link0"), height=1, width=count, point_step=12, row_step=12 * count)
    cloud.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyz")]
    cloud.data = struct.pack("<fff", 0.5, 0.0, 0.1) * count
    return cloud


def refused(response, *fragments: str, code: str = "") -> None:
    """success false, no result, the message contains `fragments` and the error code is the constant `code`."""
    assert not response.success, response.message
    for fragment in fragments:
        assert fragment in response.message, response.message
    assert "engine error" not in response.message, response.message
    assert len(getattr(response, "solutions", getattr(response, "samples", []))) == 0
    if code:
        assert response.error_code == getattr(type(response), code), (response.error_code, response.message)


def test_nan_goal(mace):
    request = ik_request()
    request.goal.pose.position.y = math.nan
    refused(mace.get_ik(request), "goal position contains NaN", code="INVALID_GOAL")


def test_zero_quaternion_unless_position_only(mace):
    request = ik_request()
    request.goal.pose.orientation.x = 0.0
    refused(mace.get_ik(request), "goal orientation", "not a valid quaternion", "position_only", code="INVALID_GOAL")


@pytest.mark.parametrize("orientation", [
    Quaternion(x=1e300, y=0.0, z=0.0, w=0.0),  # its norm overflowed to inf: an engine RuntimeError before
    Quaternion(x=1e300, y=1e300, z=1e300, w=1e300),
    Quaternion(x=1e-300, y=0.0, z=0.0, w=0.0),
    Quaternion(x=50.0, y=0.0, z=0.0, w=0.0),
])
def test_absurd_quaternion_norms(mace, orientation):
    request = ik_request()
    request.goal.pose.orientation = orientation
    refused(mace.get_ik(request), "goal orientation", "not a valid quaternion (norm", code="INVALID_GOAL")


def test_absurd_goal_position(mace):
    request = ik_request()
    request.goal.pose.position = Point(x=1e300, y=-1e300, z=0.3)
    refused(mace.get_ik(request), "goal position contains a coordinate of 1e+300 m", code="INVALID_GOAL")
    request.position_only = True
    refused(mace.get_ik(request), "goal position contains a coordinate of 1e+300 m", code="INVALID_GOAL")


def test_unknown_frame(mace):
    request = ik_request()
    request.goal.header.frame_id = "world"
    refused(mace.get_ik(request), "unknown frame 'world'", "panda_link0", code="FRAME_TRANSFORM_FAILURE")


def test_goal_out_of_reach(mace):
    request = ik_request()
    request.goal.pose.position = Point(x=500.0, y=0.0, z=300.0)  # millimetres by mistake
    refused(mace.get_ik(request), "goal out of reach", code="INVALID_GOAL")


def test_unknown_tip_link(mace):
    refused(mace.get_ik(ik_request(tip_link="panda_link42")), "unknown tip_link 'panda_link42'", "panda_hand_tcp",
            code="INVALID_LINK_NAME")


@pytest.mark.parametrize("seed_state, message", [
    (JointState(position=[0.0] * 6), "seed_state: a JointState without names needs 7 positions"),
    (JointState(name=["panda_joint1"], position=[0.0]), "seed_state: JointState lacks joint(s) panda_joint2"),
    (JointState(name=[f"fr3_joint{i}" for i in range(1, 8)], position=[0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.0]),
     "(it names fr3_joint1..7: this node's robot_prefix is 'panda_')"),
    (JointState(name=[f"panda_joint{i}" for i in (1, 2, 3, 4, 5, 6, 7, 1)], position=[0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.0, 0.3]),
     "seed_state: JointState names joint(s) panda_joint1 more than once"),
    (JointState(position=[0.0, 0.0, 0.0, -1.5, 0.0, 1.5, math.nan]), "NaN"),
    (JointState(position=[0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 1e300]), "panda_joint7 = 1e+300 rad is outside its limits"),
    (JointState(position=[0.0, 0.0, 0.0, 1.5, 0.0, 1.5, 0.0]), "panda_joint4 = 1.5 rad is outside its limits"),
])
def test_bad_seed_states(mace, seed_state, message):
    refused(mace.get_ik(ik_request(seed_state=seed_state)), message, code="INVALID_ROBOT_STATE")


@pytest.mark.parametrize("fields, message", [
    ({"num_solutions": 5000}, "num_solutions = 5000 is too large"),
    ({"num_samples": 10_000_000}, "num_samples = 10000000 is too large"),
    ({"tuning_iterations": -7}, "tuning_iterations = -7 is invalid"),
    ({"tuning_iterations": 2_000_000_000}, "tuning_iterations = 2000000000 is too large"),
])
def test_absurd_counts(mace, fields, message):
    refused(mace.get_ik(ik_request(**fields)), message, code="INVALID_REQUEST")


@pytest.mark.parametrize("timeout_s, message", [
    (-1.0, "timeout_s = -1.0 is negative"),
    (math.inf, "not a finite number"),
    (1e6, "too long"),
])
def test_bad_timeouts(mace, timeout_s, message):
    refused(mace.get_ik(ik_request(timeout_s=timeout_s)), message, code="INVALID_REQUEST")
    refused(mace.infer_shape(shape_request(timeout_s=timeout_s)), message, code="INVALID_REQUEST")


@pytest.mark.parametrize("fields, message", [
    # "shape engine error: ValueError: data must be finite" before
    ({"object_origin": Point(x=1e308, y=0.0, z=0.1)}, "object_origin contains a coordinate of 1e+308 m"),
    ({"object_origin": Point(x=50.0, y=0.0, z=0.1), "contacts": [Point(x=50.04, z=0.1), Point(x=49.96, z=0.1)]},
     "object_origin is 50 m from panda_link0, more than 10.0 m"),
    ({"contacts": [Point(x=0.54, z=0.1), Point(x=3e30, z=0.1)]}, "contacts contain a coordinate of 3e+30 m"),
    ({"contacts": [Point(x=0.54, z=0.1), Point(x=5.0, z=0.1)]}, "contacts: 1 lie farther than 1.0 m from object_origin"),
    ({"partial_cloud": far_point_cloud(1e300)}, "partial_cloud points: 1 lie farther than 1.0 m from object_origin"),
    ({"partial_cloud": far_point_cloud(3.0), "contacts": []}, "partial_cloud points: 1 lie farther"),
    # Accepted before, and fit by more shapes than a real view of the object, it scored higher than one.
    ({"partial_cloud": repeated_point_cloud(500), "contacts": []}, "500 points but only 1 at least 1 mm apart"),
    # A grasp along x, 1 mm across the Panda hand's closing axis y: it was read as a 1 mm wide grasp along y.
    ({"contacts": [Point(x=0.54, y=0.0005, z=0.1), Point(x=0.46, y=-0.0005, z=0.1)]}, "to the configured fingers' closing axis"),
    ({"num_samples": 1_000_000}, "num_samples = 1000000 is too large"),
    ({"tuning_iterations": -5}, "tuning_iterations = -5 is invalid"),
])
def test_absurd_shape_requests(mace, fields, message):
    refused(mace.infer_shape(shape_request(**fields)), message, code="INVALID_REQUEST")


def test_oversized_partial_cloud_is_refused_before_decoding(mace):
    cloud = far_point_cloud(0.5)
    cloud.height, cloud.width = 100_000, 100_000  # claims 10^10 points
    cloud.row_step = cloud.point_step * cloud.width
    refused(mace.infer_shape(shape_request(partial_cloud=cloud)), "partial_cloud has 10000000000 points, more than",
            code="INVALID_REQUEST")


@pytest.mark.parametrize("cloud, message", [
    (cloud_without_z(), "partial_cloud: PointCloud2 lacks field(s) z"),
    (truncated_cloud(), "partial_cloud: PointCloud2 data has 12 bytes"),
])
def test_malformed_partial_cloud(mace, cloud, message):
    refused(mace.infer_shape(shape_request(partial_cloud=cloud)), message, code="INVALID_REQUEST")


def test_shape_request_frames_must_agree(mace):
    cloud = cloud_without_z()
    cloud.header.frame_id = "camera_link"
    refused(mace.infer_shape(shape_request(partial_cloud=cloud)), "partial_cloud is in frame 'camera_link'",
            code="FRAME_TRANSFORM_FAILURE")
    request = shape_request()
    request.header.frame_id = "world"
    refused(mace.infer_shape(request), "unknown frame 'world'", code="FRAME_TRANSFORM_FAILURE")


def test_nan_contacts_and_no_observation(mace):
    refused(mace.infer_shape(shape_request(contacts=[Point(x=math.nan)])), "contacts contain NaN")
    refused(mace.infer_shape(shape_request(contacts=[])), "no observation")


def test_garbage_on_topics_leaves_the_node_serving(mace):
    """Malformed clouds, markers in unknown frames and NaN contacts are dropped with a warning."""
    node = mace.node
    cloud_publisher = node.create_publisher(PointCloud2, "/mace/obstacle_cloud", 10)
    marker_publisher = node.create_publisher(MarkerArray, "/mace/obstacles", 10)
    contacts_publisher = node.create_publisher(PoseArray, "/mace/contacts", 10)
    bad_marker = Marker(header=Header(frame_id="world"), ns="bad", id=1, type=Marker.CUBE)
    nan_contacts = PoseArray(header=Header(frame_id="panda_link0"), poses=[Pose(position=Point(x=math.nan))])
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (
            cloud_publisher.get_subscription_count() == 0 or marker_publisher.get_subscription_count() == 0):
        time.sleep(0.05)
    for _ in range(3):
        cloud_publisher.publish(cloud_without_z())
        cloud_publisher.publish(truncated_cloud())
        marker_publisher.publish(MarkerArray(markers=[bad_marker]))
        contacts_publisher.publish(nan_contacts)
    time.sleep(0.5)
    # Still answering, and a NaN contact message did not become "the latest contacts".
    refused(mace.infer_shape(shape_request(contacts=[])), "no observation")
    response = mace.get_ik(ik_request(timeout_s=1.0))
    assert response.message  # answered: solved, or why not (e.g. engine unavailable)


def obstacles_and_scene(mace):
    """A publisher on the node's ~/obstacles, once the intake subscribes, and a reader of its ~/scene."""
    from test_node_services import Latest

    publisher = mace.node.create_publisher(MarkerArray, "/mace/obstacles", 10)
    scene_topic = Latest(mace, MarkerArray, "/mace/scene")
    deadline = time.monotonic() + 10.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return publisher, scene_topic


def test_an_invalid_marker_replaces_the_obstacle_of_its_key(mace):
    """rviz replaces a key's marker with whatever is sent under it: an ARROW sent as ns/id of a cube left the
    cube in the obstacle model while rviz showed an arrow. The ARROW is refused, and the cube is gone."""
    publisher, scene_topic = obstacles_and_scene(mace)
    cube = Marker(header=Header(frame_id="panda_link0"), ns="replaced", id=1, type=Marker.CUBE, action=Marker.ADD,
                  pose=Pose(position=Point(x=-0.5, y=0.5, z=0.05), orientation=Quaternion(w=1.0)))
    cube.scale.x = cube.scale.y = cube.scale.z = 0.0321
    is_cube = lambda m: m.type == Marker.CUBE and abs(m.scale.x - 0.0321) < 1e-6  # noqa: E731
    try:
        publisher.publish(MarkerArray(markers=[cube]))
        scene_topic.wait_for(lambda markers: any(is_cube(m) for m in markers.markers), timeout_s=20.0)
        scene_topic.messages.clear()
        arrow = Marker(header=cube.header, ns="replaced", id=1, type=Marker.ARROW, action=Marker.ADD, pose=cube.pose, scale=cube.scale)
        publisher.publish(MarkerArray(markers=[arrow]))
        scene_topic.wait_for(lambda markers: not any(is_cube(m) for m in markers.markers), timeout_s=20.0)
    finally:
        publisher.publish(MarkerArray(markers=[Marker(ns="replaced", action=Marker.DELETEALL)]))
        mace.node.destroy_publisher(publisher)


def test_a_marker_of_absurd_size_is_refused_and_get_ik_keeps_working(mace):
    """A cube of 1e300 m would swallow the robot (and overflow float32 distances into NaN gradients):
    it is refused like any invalid marker, while a normal marker of the same message is applied."""
    from test_node_services import when_ready

    publisher, scene_topic = obstacles_and_scene(mace)
    absurd = Marker(header=Header(frame_id="panda_link0"), ns="absurd", id=1, type=Marker.CUBE, action=Marker.ADD,
                    pose=Pose(position=Point(x=0.5, z=0.3), orientation=Quaternion(w=1.0)))
    absurd.scale.x = absurd.scale.y = absurd.scale.z = 1e300
    sentinel = Marker(header=Header(frame_id="panda_link0"), ns="absurd", id=2, type=Marker.SPHERE, action=Marker.ADD,
                      pose=Pose(position=Point(x=-0.5, y=-0.5, z=0.05), orientation=Quaternion(w=1.0)))
    sentinel.scale.x = sentinel.scale.y = sentinel.scale.z = 0.0123
    publisher.publish(MarkerArray(markers=[absurd, sentinel]))
    try:
        applied = scene_topic.wait_for(
            lambda markers: any(m.type == Marker.SPHERE and abs(m.scale.x - 0.0123) < 1e-6 for m in markers.markers), timeout_s=20.0)
        assert max(max(m.scale.x, m.scale.y, m.scale.z) for m in applied.markers) < 1e3
        response = when_ready(mace.get_ik, ik_request(timeout_s=2.0))
        assert response.success, response.message
    finally:  # the node is shared by the session: wait until the sentinel is gone again
        scene_topic.messages.clear()
        publisher.publish(MarkerArray(markers=[Marker(ns="absurd", action=Marker.DELETEALL)]))
        scene_topic.wait_for(lambda markers: not any(abs(m.scale.x - 0.0123) < 1e-6 for m in markers.markers), timeout_s=20.0)
        mace.node.destroy_publisher(publisher)
