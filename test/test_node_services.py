"""The installed node serves real answers through ROS: services, topics in and out."""
from __future__ import annotations

import math
import time

import numpy as np
from geometry_msgs.msg import Point, Pose, PoseArray, Quaternion, Vector3
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from mace_ros.ros.conversions import pointcloud2_to_array, pointcloud2_to_xyz, xyz_to_pointcloud2
from mace_ros.ros.node import LATCHED
from conftest import ik_request, running_node
from mace_ros.srv import InferShape

ENGINE_WAIT_S = 180.0
ORIGIN = Point(x=0.5, y=0.0, z=0.1)
# The two fingertips of a Panda hand pointing down (the default finger set) on a ~8 cm object at ORIGIN.
CONTACTS = [Point(x=0.5, y=0.04, z=0.1), Point(x=0.5, y=-0.04, z=0.1)]


def when_ready(call, request):
    """Call until the engine has loaded (it loads in the background at start-up)."""
    deadline = time.monotonic() + ENGINE_WAIT_S
    response = call(request)
    while "still loading" in response.message and time.monotonic() < deadline:
        time.sleep(0.5)
        response = call(request)
    return response


def shape_request(**fields) -> InferShape.Request:
    request = InferShape.Request(header=Header(frame_id="panda_link0"), contacts=CONTACTS, object_origin=ORIGIN)
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def answer_when(mace, request: InferShape.Request, done, timeout_s: float = 20.0) -> InferShape.Response:
    """The answer to `request`, asked again until done(answer) or timeout_s: topics reach the node through
    its intake process, which right after start-up is still importing torch, and a reliable message sent
    before discovery has finished on the subscriber's side arrives only on the publisher's next heartbeat."""
    deadline = time.monotonic() + timeout_s
    response = when_ready(mace.infer_shape, request)
    while not done(response) and time.monotonic() < deadline:
        time.sleep(0.25)
        response = mace.infer_shape(request)
    return response


class Latest:
    """Messages on a latched topic of the node, to wait for one that matches."""

    def __init__(self, mace, message_type, topic: str):
        self.messages = []
        mace.node.create_subscription(message_type, topic, self.messages.append, LATCHED)
        self.mace = mace

    def wait_for(self, matches, timeout_s: float = 5.0):
        """The first message for which matches(message) holds (an earlier test's latched one may come first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.messages:
                if matches(message):
                    return message
            self.mace.executor.spin_once(timeout_sec=0.1)
        raise AssertionError(f"no matching message among {len(self.messages)} received")


def test_infer_shape_returns_ranked_clouds_in_the_request_frame(mace):
    shape_topic = Latest(mace, PointCloud2, "/mace/shape_samples")
    response = when_ready(mace.infer_shape, shape_request(num_samples=4, tuning_iterations=2, timeout_s=20.0))
    assert response.success, response.message
    assert len(response.samples) == len(response.scores) == 4
    assert list(response.scores) == sorted(response.scores, reverse=True)
    assert 0.0 < response.mean_score <= 1.0 and response.diversity >= 0.0
    for cloud in response.samples:
        assert cloud.header.frame_id == "panda_link0"
        xyz = pointcloud2_to_xyz(cloud)
        assert xyz.shape[0] > 0
        assert np.linalg.norm(xyz.mean(axis=0) - [0.5, 0.0, 0.1]) < 0.1  # around the object origin
    def sample_indices(cloud: PointCloud2) -> list[int]:
        return sorted(set(pointcloud2_to_array(cloud)["sample_index"].tolist()))

    shape_topic.wait_for(lambda cloud: sample_indices(cloud) == [0, 1, 2, 3])


def test_infer_shape_uses_the_latest_contacts_topic_until_cleared(mace):
    publisher = mace.node.create_publisher(PoseArray, "/mace/contacts", 10)
    deadline = time.monotonic() + 5.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    publisher.publish(PoseArray(header=Header(frame_id="panda_link0"), poses=[Pose(position=p) for p in CONTACTS]))

    try:
        response = answer_when(mace, shape_request(contacts=[], num_samples=2, tuning_iterations=0), lambda r: r.success)
        assert response.success, response.message
        assert len(response.samples) == 2
    finally:
        # An empty PoseArray clears them (and leaves the node as the other tests expect it).
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0")))
    assert "no observation" in answer_when(mace, shape_request(contacts=[]), lambda r: "no observation" in r.message).message


def test_a_long_request_does_not_block_the_other_service(mace):
    when_ready(mace.infer_shape, shape_request(num_samples=1, tuning_iterations=0))
    long_request = shape_request(num_samples=4, tuning_iterations=100_000, timeout_s=4.0)
    started = time.monotonic()
    shape_future = mace.infer_shape_client.call_async(long_request)
    mace.executor.spin_once(timeout_sec=0.5)
    response = mace.get_ik(ik_request(num_samples=64, tuning_iterations=0, timeout_s=0.5), timeout_s=30.0)
    ik_answered_after = time.monotonic() - started
    mace.executor.spin_until_future_complete(shape_future, timeout_sec=60.0)
    assert shape_future.done() and shape_future.result().success, shape_future.result()
    shape_answered_after = time.monotonic() - started
    assert response.message
    assert ik_answered_after < shape_answered_after - 1.0, (ik_answered_after, shape_answered_after)


def test_many_samples_are_answered_whole_well_before_the_timeout(mace):
    """200 samples of 16 x 200 draws: the greedy diverse selection (200 passes over 3200 draws) ran until
    the deadline, using the whole timeout, and could leave no time to send them all; it now stops at
    its share of the timeout and takes the rest by score."""
    when_ready(mace.infer_shape, shape_request(num_samples=1, tuning_iterations=0))
    started = time.monotonic()
    response = mace.infer_shape(shape_request(num_samples=200, tuning_iterations=2, timeout_s=20.0), timeout_s=60.0)
    answered_after_s = time.monotonic() - started
    assert response.success, response.message
    assert len(response.samples) == 200, response.message
    assert answered_after_s < 10.0, f"answered after {answered_after_s:.2f} s: {response.message}"


def test_a_burst_of_requests_is_answered_in_full(mace):
    """More GetIK requests at once than the node has executor threads (16) and ROS's default service queue
    holds (10): each is answered, solved or TIMED_OUT behind the others, none lost (11 of 24 were)."""
    when_ready(mace.get_ik, ik_request(num_samples=64, tuning_iterations=0, timeout_s=1.0))
    calls = [mace.get_ik_client.call_async(ik_request(num_solutions=1, tuning_iterations=0, timeout_s=3.0))
             for _ in range(24)]
    deadline = time.monotonic() + 30.0
    while not all(call.done() for call in calls) and time.monotonic() < deadline:
        mace.executor.spin_once(timeout_sec=0.05)
    answered = [call.result() for call in calls if call.done()]
    assert len(answered) == len(calls), f"{len(calls) - len(answered)} of {len(calls)} requests never answered"
    assert all(r.success or r.error_code == r.TIMED_OUT for r in answered), [r.message for r in answered if not r.success]


def test_a_client_with_the_default_service_qos_is_served(mace):
    """As the README's snippet and rclcpp clients call: ROS's default service QoS (depth 10) against the node's 100."""
    from mace_ros.srv import GetIK

    when_ready(mace.get_ik, ik_request(num_samples=64, tuning_iterations=0, timeout_s=1.0))
    client = mace.node.create_client(GetIK, "/mace/get_ik")
    try:
        assert client.wait_for_service(timeout_sec=10.0)
        call = client.call_async(ik_request(num_solutions=1, tuning_iterations=0, timeout_s=2.0))
        mace.executor.spin_until_future_complete(call, timeout_sec=30.0)
        assert call.done(), "no answer"
        assert call.result().success, call.result().message
    finally:
        mace.node.destroy_client(client)


def test_get_ik_returns_moveit_ready_joint_states(mace):
    markers_topic = Latest(mace, MarkerArray, "/mace/ik_solutions")
    response = when_ready(mace.get_ik, ik_request(num_solutions=4, tuning_iterations=-1, timeout_s=5.0))
    assert response.success, response.message
    assert 1 <= len(response.solutions) <= 4
    assert len(response.scores) == len(response.position_errors_m) == len(response.solutions)
    for state in response.solutions:
        assert list(state.name) == [f"panda_joint{i}" for i in range(1, 8)]
        assert state.header.frame_id == "panda_link0"
    assert response.position_errors_m[0] < 1e-3 and response.orientation_errors_rad[0] < 1e-2

    def shows_this_answer(markers: MarkerArray) -> bool:
        skeletons = [marker for marker in markers.markers if marker.ns == "ik_solutions"]
        return len(skeletons) == len(response.solutions) and any(marker.ns == "ik_goal" for marker in markers.markers)

    markers_topic.wait_for(shows_this_answer)


# A Panda hand (2 fingers closing toward each other) grasping an ~7 cm object from the side, along y,
# 2 cm above and 3 cm beside the object origin: refused before contacts carried their directions
# ("90° away from the side of its best-matching finger").
SIDE_GRASP = [Point(x=0.53, y=0.035, z=0.12), Point(x=0.53, y=-0.035, z=0.12)]
SIDE_DIRECTIONS = [Vector3(y=-1.0), Vector3(y=1.0)]
# A second grasp of the same object, along x.
FRONT_GRASP = [Point(x=0.54, y=0.0, z=0.1), Point(x=0.46, y=0.0, z=0.1)]
FRONT_DIRECTIONS = [Vector3(x=-1.0), Vector3(x=1.0)]


def test_infer_shape_accepts_a_side_grasp_and_combined_grasps_with_directions(mace):
    side = when_ready(mace.infer_shape, shape_request(
        contacts=SIDE_GRASP, contact_directions=SIDE_DIRECTIONS, num_samples=4, tuning_iterations=3, timeout_s=20.0))
    assert side.success and side.error_code == InferShape.Response.SUCCESS, side.message
    assert len(side.samples) == 4 and 0.0 < side.mean_score <= 1.0
    both = mace.infer_shape(shape_request(
        contacts=SIDE_GRASP + FRONT_GRASP, contact_directions=SIDE_DIRECTIONS + FRONT_DIRECTIONS,
        num_samples=4, tuning_iterations=3, timeout_s=20.0))
    assert both.success, both.message
    assert len(both.samples) == 4 and 0.0 < both.mean_score <= 1.0
    mismatched = mace.infer_shape(shape_request(contacts=SIDE_GRASP, contact_directions=SIDE_DIRECTIONS[:1]))
    assert not mismatched.success and "contact_directions has 1 entries for 2 contacts" in mismatched.message


def test_infer_shape_accepts_a_top_down_grasp_above_the_origin_without_directions(mace):
    """A Panda grasp from above near the top of a tall object, its fingertips 5 cm above the object's
    centre and 1 cm off it along x, reported without directions: each belongs to the finger on its side
    along y (refused before, 51° away from the fingers' level) and is scored on its own finger's line."""
    above = [Point(x=0.51, y=0.04, z=0.15), Point(x=0.51, y=-0.04, z=0.15)]
    response = when_ready(mace.infer_shape, shape_request(contacts=above, num_samples=4, tuning_iterations=3, timeout_s=20.0))
    assert response.success and response.error_code == InferShape.Response.SUCCESS, response.message
    assert len(response.samples) == 4 and 0.0 < response.mean_score <= 1.0


def test_a_grasp_no_object_fits_answers_no_solution(mace):
    """Fingertips 80 cm apart, wider than any object of the prior (at most 25 cm): answered, with samples,
    but NO_SOLUTION, which a client tells from an engine bug (FAILURE) without parsing the message."""
    wide = [Point(x=0.5, y=0.4, z=0.1), Point(x=0.5, y=-0.4, z=0.1)]
    response = when_ready(mace.infer_shape, shape_request(
        contacts=wide, contact_directions=[Vector3(y=-1.0), Vector3(y=1.0)], num_samples=2, tuning_iterations=0))
    assert not response.success and response.error_code == InferShape.Response.NO_SOLUTION, response.message
    assert "no sample is consistent with the observation" in response.message and len(response.samples) == 2
    assert "is object_origin the object's centre?" in response.message  # 0.4 m from it: no shape reaches that far


def test_contacts_topic_accumulates_grasps_with_their_directions_until_cleared(mace):
    publisher = mace.node.create_publisher(PoseArray, "/mace/contacts", 10)
    deadline = time.monotonic() + 5.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    def publish(poses: list[Pose]) -> None:
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0"), poses=poses))

    # The pose's +z axis is the finger's travel direction: a rotation of +-90° about x turns +z into -+y.
    half = math.sqrt(0.5)
    side = [Pose(position=SIDE_GRASP[0], orientation=Quaternion(x=half, w=half)),
            Pose(position=SIDE_GRASP[1], orientation=Quaternion(x=-half, w=half))]
    # ... and of -+90° about y turns it into -+x.
    front = [Pose(position=FRONT_GRASP[0], orientation=Quaternion(y=-half, w=half)),
             Pose(position=FRONT_GRASP[1], orientation=Quaternion(y=half, w=half))]
    prior_only = shape_request(contacts=[], num_samples=2, tuning_iterations=0)
    try:
        # Without orientations (identity), contacts are matched to the 2 configured fingers: two
        # messages of 2 make 4, which shows that they accumulate.
        publish([Pose(position=p) for p in CONTACTS])
        publish([Pose(position=p) for p in CONTACTS])
        crowded = answer_when(mace, prior_only, lambda r: "4 contacts without a direction" in r.message)
        assert not crowded.success and "4 contacts without a direction" in crowded.message, crowded.message
        publish([])
        assert "no observation" in answer_when(mace, prior_only, lambda r: "no observation" in r.message).message
        publish(side)
        publish(front)
        response = answer_when(mace, prior_only, lambda r: r.success)
        assert response.success, response.message
        # 100 in one message: the latest 64 (shape.max_contacts) are kept, not refused as too many
        # (the request's own limit); cleared first, so that only this message can make the answer a success.
        publish([])
        assert "no observation" in answer_when(mace, prior_only, lambda r: "no observation" in r.message).message
        publish(side * 50)
        capped = answer_when(mace, prior_only, lambda r: r.success)
        assert capped.success, capped.message
    finally:
        publish([])  # clears them (and leaves the node as the other tests expect it)
    assert "no observation" in answer_when(mace, shape_request(contacts=[]), lambda r: "no observation" in r.message).message


def test_the_posterior_never_scores_below_the_prior(mace):
    """Same seed, same observation: tuning (the configured default, cut by a short timeout) returns
    samples whose mean score is at least the prior samples'."""
    observations = [
        {"contacts": CONTACTS},
        {"contacts": SIDE_GRASP, "contact_directions": SIDE_DIRECTIONS},
        # An off-centre grasp of something thin: far from what the prior proposes.
        {"contacts": [Point(x=0.56, y=0.005, z=0.16), Point(x=0.56, y=-0.005, z=0.16)],
         "contact_directions": [Vector3(y=-1.0), Vector3(y=1.0)]},
    ]
    for seed, observation in enumerate(observations, start=1):
        prior = when_ready(mace.infer_shape, shape_request(**observation, num_samples=6, tuning_iterations=0, random_seed=seed))
        tuned = mace.infer_shape(shape_request(**observation, num_samples=6, tuning_iterations=-1, timeout_s=3.0, random_seed=seed))
        assert prior.error_code == tuned.error_code == InferShape.Response.SUCCESS, (prior.message, tuned.message)
        assert tuned.mean_score >= prior.mean_score, (observation, prior.message, tuned.message)


def test_a_partial_cloud_in_the_base_frame_fits_an_empty_request_frame(mace):
    """An empty header frame_id is the base frame, so a cloud stamped panda_link0 agrees with it."""
    points = np.random.default_rng(0).normal([0.5, 0.0, 0.1], 0.02, (100, 3))
    request = shape_request(contacts=[], partial_cloud=xyz_to_pointcloud2(points, Header(frame_id="panda_link0")),
                            num_samples=2, tuning_iterations=0)
    request.header.frame_id = ""
    response = when_ready(mace.infer_shape, request)
    assert response.success, response.message
    assert all(cloud.header.frame_id == "panda_link0" for cloud in response.samples)
    request.partial_cloud.header.frame_id = "panda_hand"
    refused = mace.infer_shape(request)
    assert refused.error_code == InferShape.Response.FRAME_TRANSFORM_FAILURE, refused.message


def test_contacts_from_the_topic_are_validated_as_the_requests_own(mace):
    """~/contacts far from object_origin are refused as INVALID_REQUEST at once, as the same contacts in
    the request are, not tuned into a vague FAILURE."""
    far = [Point(x=0.5, y=1.5, z=0.1), Point(x=0.5, y=-0.035, z=0.1)]
    explicit = when_ready(mace.infer_shape, shape_request(contacts=far, tuning_iterations=3))
    assert explicit.error_code == InferShape.Response.INVALID_REQUEST, explicit.message
    publisher = mace.node.create_publisher(PoseArray, "/mace/contacts", 10)
    try:
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0")))
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0"), poses=[Pose(position=p) for p in far]))
        response = answer_when(mace, shape_request(contacts=[], tuning_iterations=3),
                               lambda r: "no observation" not in r.message)
        assert response.error_code == InferShape.Response.INVALID_REQUEST, response.message
        assert "contacts from ~/contacts: 1 lie farther than 1.0 m from object_origin" in response.message
        # A grasp along x without orientations: the engine's refusal says where such contacts' directions come from.
        along_x = [Point(x=0.535, y=0.001, z=0.1), Point(x=0.465, y=-0.001, z=0.1)]
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0")))  # clears the far ones (contacts accumulate)
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0"), poses=[Pose(position=p) for p in along_x]))
        response = answer_when(mace, shape_request(contacts=[], tuning_iterations=3), lambda r: "closing axis" in r.message)
        assert response.error_code == InferShape.Response.INVALID_REQUEST, response.message
        assert "these contacts came from ~/contacts, where each pose's +z axis is its finger's travel direction" in response.message
    finally:
        publisher.publish(PoseArray(header=Header(frame_id="panda_link0")))
    assert "no observation" in answer_when(mace, shape_request(contacts=[]), lambda r: "no observation" in r.message).message


def test_contact_directions_of_any_nonzero_length_are_directions(mace):
    """Huge and tiny travel directions mean the same as unit ones (the side grasp needs them: without a
    direction it is refused); they were refused above 1e4 "m", and below 1e-9 taken as no direction."""
    def scores(length: float) -> list[float]:
        directions = [Vector3(y=-length), Vector3(y=length)]
        response = when_ready(mace.infer_shape, shape_request(
            contacts=SIDE_GRASP, contact_directions=directions, num_samples=4, tuning_iterations=0, random_seed=7))
        assert response.success, (length, response.message)
        return list(response.scores)

    unit = scores(1.0)
    for length in (1e5, 1e300, 1e-12):
        assert np.allclose(scores(length), unit, rtol=0.0, atol=1e-6), length


def test_every_parameter_reads_back_in_one_get_parameters_call(mace):
    """What `ros2 param dump /mace` asks: every listed parameter at once. An empty array default declared unset
    (shape.finger_directions) made rclpy answer such a call with no values at all."""
    from rcl_interfaces.msg import ParameterType
    from rcl_interfaces.srv import GetParameters, ListParameters

    def call(service_type, name: str, request):
        client = mace.node.create_client(service_type, name)
        try:
            assert client.wait_for_service(timeout_sec=10.0)
            future = client.call_async(request)
            mace.executor.spin_until_future_complete(future, timeout_sec=10.0)
            return future.result()
        finally:
            mace.node.destroy_client(client)

    names = list(call(ListParameters, "/mace/list_parameters", ListParameters.Request()).result.names)
    assert "shape.finger_directions" in names and len(names) > 50
    values = call(GetParameters, "/mace/get_parameters", GetParameters.Request(names=names)).values
    assert len(values) == len(names)
    assert all(value.type != ParameterType.PARAMETER_NOT_SET for value in values)
    finger_directions = values[names.index("shape.finger_directions")]  # [] (declared dynamically typed)
    assert not finger_directions.double_array_value and not finger_directions.byte_array_value


def test_answers_are_drawn_for_a_subscriber_that_comes_after_them(ros_isolation, tmp_path):
    """~/ik_solutions is latched, but drawn only once someone subscribes (WatchedLatchedTopic): a subscriber
    that comes after two answers still gets the latest one's skeletons."""
    node_name = "mace_drawn_later"
    with running_node(["-r", f"__node:={node_name}"], ros_isolation, tmp_path / "mace_node.log", node_name) as (client, _):
        first = client.when_loaded(client.get_ik, ik_request(num_solutions=1, timeout_s=5.0))
        latest = client.get_ik(ik_request(num_solutions=3, timeout_s=5.0))
        assert first.success and latest.success and len(latest.solutions) != len(first.solutions), (first.message, latest.message)
        topic = Latest(client, MarkerArray, f"/{node_name}/ik_solutions")
        shown = topic.wait_for(lambda markers: any(marker.ns == "ik_goal" for marker in markers.markers), timeout_s=10.0)
    assert len([marker for marker in shown.markers if marker.ns == "ik_solutions"]) == len(latest.solutions)
