"""The installed node refuses bad requests with success=false and a reason, and keeps serving.

Validation comes before the engines are consulted, so these hold whether or not the engines
have loaded (or could load) on this machine.
"""
from __future__ import annotations

import math
import struct
import time

import pytest
from geometry_msgs.msg import Point, Pose, PoseArray
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from mace_ros.srv import GetIK, InferShape


def ik_request(**fields) -> GetIK.Request:
    """A valid GetIK request (0.5 m in front of the robot, 0.3 m up) with `fields` changed."""
    request = GetIK.Request()
    request.goal.header.frame_id = "panda_link0"
    request.goal.pose.position = Point(x=0.5, y=0.0, z=0.3)
    request.goal.pose.orientation.x = 1.0
    request.goal.pose.orientation.w = 0.0
    for name, value in fields.items():
        setattr(request, name, value)
    return request


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


def refused(response, *fragments: str) -> None:
    assert not response.success, response.message
    for fragment in fragments:
        assert fragment in response.message, response.message
    assert len(getattr(response, "solutions", getattr(response, "samples", []))) == 0


def test_nan_goal(mace):
    request = ik_request()
    request.goal.pose.position.y = math.nan
    refused(mace.get_ik(request), "goal position contains NaN")


def test_zero_quaternion_unless_position_only(mace):
    request = ik_request()
    request.goal.pose.orientation.x = 0.0
    refused(mace.get_ik(request), "goal orientation", "not a valid quaternion", "position_only")


def test_unknown_frame(mace):
    request = ik_request()
    request.goal.header.frame_id = "world"
    refused(mace.get_ik(request), "unknown frame 'world'", "panda_link0")


def test_goal_out_of_reach(mace):
    request = ik_request()
    request.goal.pose.position = Point(x=500.0, y=0.0, z=300.0)  # millimetres by mistake
    refused(mace.get_ik(request), "goal out of reach")


def test_unknown_tip_link(mace):
    refused(mace.get_ik(ik_request(tip_link="panda_link42")), "unknown tip_link 'panda_link42'")


@pytest.mark.parametrize("fields, message", [
    ({"num_solutions": 5000}, "num_solutions = 5000 is too large"),
    ({"num_samples": 10_000_000}, "num_samples = 10000000 is too large"),
    ({"tuning_iterations": -7}, "tuning_iterations = -7 is invalid"),
    ({"tuning_iterations": 2_000_000_000}, "tuning_iterations = 2000000000 is too large"),
])
def test_absurd_counts(mace, fields, message):
    refused(mace.get_ik(ik_request(**fields)), message)


@pytest.mark.parametrize("timeout_s, message", [
    (-1.0, "timeout_s = -1.0 is negative"),
    (math.inf, "not a finite number"),
    (1e6, "too long"),
])
def test_bad_timeouts(mace, timeout_s, message):
    refused(mace.get_ik(ik_request(timeout_s=timeout_s)), message)
    refused(mace.infer_shape(shape_request(timeout_s=timeout_s)), message)


@pytest.mark.parametrize("cloud, message", [
    (cloud_without_z(), "partial_cloud: PointCloud2 lacks field(s) z"),
    (truncated_cloud(), "partial_cloud: PointCloud2 data has 12 bytes"),
])
def test_malformed_partial_cloud(mace, cloud, message):
    refused(mace.infer_shape(shape_request(partial_cloud=cloud)), message)


def test_shape_request_frames_must_agree(mace):
    cloud = cloud_without_z()
    cloud.header.frame_id = "camera_link"
    refused(mace.infer_shape(shape_request(partial_cloud=cloud)), "partial_cloud is in frame 'camera_link'")
    request = shape_request()
    request.header.frame_id = "world"
    refused(mace.infer_shape(request), "unknown frame 'world'")


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
