"""A node launched with use_sim_time:=true (the launch file's argument) and no /clock yet, as when a
simulator has not started or is paused: its periodic work runs on the steady clock, so obstacles still
reach ~/scene, the intake still matches its cloud publishers' QoS, and GetIK still answers in time; and
the intake's cloud node does not take /clock.

One node (named mace_sim) serves the module.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, Quaternion
from rosgraph_msgs.msg import Clock
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from conftest import ik_request, running_node

NODE_NAME = "mace_sim"
ARGUMENTS = ["-r", f"__node:={NODE_NAME}", "-p", "use_sim_time:=true"]


@pytest.fixture(scope="module")
def sim_node(ros_isolation, tmp_path_factory):
    """(MaceClient, log path) of the module's node."""
    log_path = tmp_path_factory.mktemp(NODE_NAME) / "mace_node.log"
    with running_node(ARGUMENTS, ros_isolation, log_path, NODE_NAME) as (client, _):
        yield client, log_path


def test_obstacles_reach_the_scene_topic_without_a_clock(sim_node):
    client, _ = sim_node
    scenes: list[MarkerArray] = []
    client.node.create_subscription(MarkerArray, f"/{NODE_NAME}/scene", scenes.append,
                                    QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    publisher = client.node.create_publisher(MarkerArray, f"/{NODE_NAME}/obstacles", 10)
    cube = Marker(header=Header(frame_id="panda_link0"), ns="sim", id=1, action=Marker.ADD, type=Marker.CUBE,
                  pose=Pose(position=Point(x=0.5, y=0.4, z=0.3), orientation=Quaternion(w=1.0)))
    cube.scale.x = cube.scale.y = cube.scale.z = 0.1
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        publisher.publish(MarkerArray(markers=[cube]))  # again until the intake has subscribed
        client.executor.spin_once(timeout_sec=0.5)
        if any(any(marker.type == Marker.CUBE for marker in scene.markers) for scene in scenes):
            break
    else:
        pytest.fail("~/scene never showed the published cube (its timer waits for a /clock that never comes?)")
    client.node.destroy_publisher(publisher)


def test_the_cloud_subscription_matches_a_reliable_publisher_without_a_clock(sim_node):
    """The intake starts best effort and turns reliable once every publisher of the topic is (checked each
    second): without that, a camera cloud's lost fragments lose it over best effort."""
    client, log_path = sim_node
    publisher = client.node.create_publisher(PointCloud2, f"/{NODE_NAME}/obstacle_cloud", 1)  # reliable
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and "subscribed reliable to match its publishers" not in log_path.read_text():
        client.executor.spin_once(timeout_sec=0.2)
    client.node.destroy_publisher(publisher)
    assert "subscribed reliable to match its publishers" in log_path.read_text()


def test_get_ik_answers_within_its_deadline_without_a_clock(sim_node):
    client, _ = sim_node
    response = client.when_loaded(client.get_ik, ik_request(num_solutions=1, timeout_s=1.0))
    assert response.success, response.message
    assert response.elapsed_s <= 1.1


def test_only_the_nodes_that_read_the_clock_take_clock_messages(sim_node):
    """The serving node and the intake's node follow /clock; the intake's cloud node reads no clock and must not
    take a simulator's 1 kHz /clock messages in the thread that takes camera clouds."""
    client, _ = sim_node
    deadline, subscribers = time.monotonic() + 10.0, set()
    while time.monotonic() < deadline and not {NODE_NAME, f"{NODE_NAME}_intake"} <= subscribers:
        client.executor.spin_once(timeout_sec=0.2)
        subscribers = {info.node_name for info in client.node.get_subscriptions_info_by_topic("/clock")}
    assert {NODE_NAME, f"{NODE_NAME}_intake"} <= subscribers
    assert f"{NODE_NAME}_intake_clouds" not in subscribers


def test_markers_with_a_lifetime_leave_when_the_clock_goes_back(sim_node):
    """A simulation restarted (/clock back from 50 s to 1 s): a marker given 30 s of simulated lifetime at 50 s
    used to stay until the clock reached 80 s again; as rviz resets its displays, it goes. (Last in the module:
    the others need a node without a clock.)"""
    client, _ = sim_node
    scenes: list[MarkerArray] = []
    client.node.create_subscription(MarkerArray, f"/{NODE_NAME}/scene", scenes.append,
                                    QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    clock = client.node.create_publisher(Clock, "/clock", 10)
    markers = client.node.create_publisher(MarkerArray, f"/{NODE_NAME}/obstacles", 10)
    sphere = Marker(header=Header(frame_id="panda_link0"), ns="short_lived", id=1, action=Marker.ADD, type=Marker.SPHERE,
                    pose=Pose(position=Point(x=0.3, y=-0.4, z=0.3), orientation=Quaternion(w=1.0)))
    sphere.scale.x = sphere.scale.y = sphere.scale.z = 0.1
    sphere.lifetime.sec = 30

    def shown() -> bool:
        return bool(scenes) and any(marker.type == Marker.SPHERE for marker in scenes[-1].markers)

    def publish_until(seconds: int, done: Callable[[], bool], also: Callable[[], None] = lambda: None) -> bool:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and not done():
            clock.publish(Clock(clock=Time(sec=seconds)))
            also()
            client.executor.spin_once(timeout_sec=0.1)
        return done()

    assert publish_until(50, shown, lambda: markers.publish(MarkerArray(markers=[sphere]))), "the sphere never reached ~/scene"
    settle_until = time.monotonic() + 1.0  # the last copies sent arrive before the clock goes back (else re-added at 1 s)
    publish_until(50, lambda: time.monotonic() > settle_until)
    assert shown(), "the sphere left before its time"
    assert publish_until(1, lambda: not shown()), "the sphere stayed after /clock went back"
