"""A node configured as for a real arm: another arm_id, an integer for a double parameter, concurrent
callers whose deadlines run while they wait, SIGINT with a request in flight, and what a stopped node
leaves behind.

One node (named mace_fr3, so that it never meets the session's `mace`) serves the whole module;
the last test stops it with SIGINT.
"""
from __future__ import annotations

import random
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from geometry_msgs.msg import Point
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from conftest import answer, ik_request as panda_ik_request, running_node
from mace_ros.ros.client import NodeProcess, installed_executable
from mace_ros.core.kinematics import PandaKinematics
from mace_ros.ros.parameters import default_parameters_file
from mace_ros.srv import GetIK, InferShape

NODE_NAME = "mace_fr3"
# An integer for the double ik.timeout_s crashed the node at start-up (InvalidParameterTypeException).
# The shape engine's oversampling, configured (3 instead of the shipped 8), reaches requests too; so do
# explicit finger directions (the Panda hand's, as the default set: the empty default is declared dynamically typed).
FINGER_DIRECTIONS = [0.0, -1.0, 0.0, 0.0, 1.0, 0.0]
ARGUMENTS = ["-r", f"__node:={NODE_NAME}", "-p", "robot_prefix:=fr3_", "-p", "ik.timeout_s:=5", "-p", "workspace.min_m:=[-2,-2,-1]",
             "-p", "shape.result_oversampling:=3", "-p", f"shape.finger_directions:={FINGER_DIRECTIONS}"]
ENGINE_WAIT_S = 180.0
FR3_JOINTS = [f"fr3_joint{i}" for i in range(1, 8)]
CONTACTS = [Point(x=0.5, y=0.04, z=0.1), Point(x=0.5, y=-0.04, z=0.1)]  # a Panda hand's top-down grasp


@pytest.fixture(scope="module")
def fr3(ros_isolation, tmp_path_factory):
    """(MaceClient, NodeProcess) of the module's node."""
    log_path = tmp_path_factory.mktemp(NODE_NAME) / "mace_node.log"
    with running_node(ARGUMENTS, ros_isolation, log_path, NODE_NAME) as client_and_node:
        yield client_and_node


def ik_request(**fields) -> GetIK.Request:
    return panda_ik_request("fr3_link0", **fields)


def long_shape_request(timeout_s: float) -> InferShape.Request:
    """A shape request that tunes until its deadline (far more iterations than fit in timeout_s)."""
    return InferShape.Request(header=Header(frame_id="fr3_link0"), contacts=CONTACTS, object_origin=Point(x=0.5, z=0.1),
                              num_samples=4, tuning_iterations=100_000, timeout_s=timeout_s)


def test_integer_for_a_double_parameter(fr3):
    client, _ = fr3
    parameters = AsyncParameterClient(client.node, NODE_NAME)
    assert parameters.wait_for_services(10.0)

    def timeout_parameter():
        return answer(client.executor, lambda: parameters.get_parameters(["ik.timeout_s"])).values[0]

    value = timeout_parameter()
    assert (value.type, value.double_value) == (ParameterType.PARAMETER_DOUBLE, 5.0)
    value = answer(client.executor, lambda: parameters.get_parameters(["workspace.min_m"])).values[0]
    assert (value.type, list(value.double_array_value)) == (ParameterType.PARAMETER_DOUBLE_ARRAY, [-2.0, -2.0, -1.0])
    value = answer(client.executor, lambda: parameters.get_parameters(["shape.finger_directions"])).values[0]
    assert (value.type, list(value.double_array_value)) == (ParameterType.PARAMETER_DOUBLE_ARRAY, FINGER_DIRECTIONS)
    # At run time too (`ros2 param set /mace_fr3 ik.timeout_s 3`).
    result = answer(client.executor, lambda: parameters.set_parameters([Parameter("ik.timeout_s", Parameter.Type.INTEGER, 3)])).results[0]
    assert result.successful, result.reason
    value = timeout_parameter()
    assert (value.type, value.double_value) == (ParameterType.PARAMETER_DOUBLE, 3.0)


@pytest.mark.parametrize("override, message", [
    ("ik.timeout_s:=fast", "parameter 'ik.timeout_s' must be a number, got 'fast'"),
    ("ik.timeout_s:=1000.0", "ik.timeout_s"),  # beyond its range
    ("shape.finger_directions:=down", "parameter 'shape.finger_directions' must be an array of numbers"),
    # These left the node running, answering ENGINE_UNAVAILABLE to every request, or ended it with a traceback.
    ("scene:=no_such_scene", "parameter 'scene': unknown scene 'no_such_scene'"),
    ("dtype:=float16", "parameter 'dtype' must be one of float32, float64"),
    ("device:=tpu", "parameter 'device' must be auto, cpu, cuda or cuda:N"),
    ("device:=cuda:64", "parameter 'device' is 'cuda:64'"),
    ("workspace.min_m:=[2.0,2.0,2.0]", "workspace bounds must be [x, y, z] with min < max"),
    ("static_transforms:=cam 1 2", "parameters static_transforms, attached_frames: 'cam 1 2' must be"),
    ("attached_frames:=cam panda_nolink 0 0 0 0 0 0 1", "'panda_nolink' is not a link of the robot"),
])
def test_a_wrong_parameter_stops_the_start_with_a_message(ros_isolation, tmp_path, override, message):
    """A wrong value at start-up: one line that names the parameter, exit status 1, no traceback (a string
    for shape.finger_directions was even taken, and failed later in the engine without its name)."""
    log_path = tmp_path / "mace_node.log"
    with log_path.open("w") as log:
        node = NodeProcess(installed_executable(), ["-r", "__node:=mace_wrong", "-p", override], env=ros_isolation, log=log)
        try:
            assert node.process.wait(60.0) == 1, log_path.read_text()
        finally:
            node.stop()
    output = log_path.read_text()
    assert message in output and "Traceback" not in output, output


def test_a_scene_file_with_a_typo_stops_the_start(ros_isolation, tmp_path):
    """It left the node running, answering ENGINE_UNAVAILABLE to every GetIK."""
    scene = tmp_path / "my_scene.yaml"
    scene.write_text("boxes:\n  - name: table\n    center: [0.5, 0.0, -0.01]\n    half_extent: [0.4, 0.4, 0.01]\n")
    log_path = tmp_path / "mace_node.log"
    with log_path.open("w") as log:
        node = NodeProcess(installed_executable(), ["-r", "__node:=mace_bad_scene", "-p", f"scene:={scene}"], env=ros_isolation, log=log)
        try:
            assert node.process.wait(60.0) == 1, log_path.read_text()
        finally:
            node.stop()
    output = log_path.read_text()
    assert "mace_node: cannot start: parameter 'scene':" in output and "half_extents" in output and "Traceback" not in output, output


def test_the_shipped_defaults_as_a_params_file_start_both_engines(ros_isolation, tmp_path):
    """A user's params file begun as a copy of config/mace.yaml: its `finger_directions: []` arrives unset (rcl's
    YAML parser cannot type an empty list) and reached the shape engine as None, which then failed to load."""
    copied = tmp_path / "my_mace.yaml"  # for any node name (the shipped file's section is `mace:`)
    copied.write_text(re.sub(r"^mace:", "/**:", default_parameters_file().read_text(), flags=re.MULTILINE))
    arguments = ["-r", "__node:=mace_copied", "--params-file", str(copied)]
    with running_node(arguments, ros_isolation, tmp_path / "mace_node.log", "mace_copied") as (client, _):
        request = InferShape.Request(header=Header(frame_id="panda_link0"), contacts=CONTACTS, object_origin=Point(x=0.5, z=0.1),
                                     num_samples=4, tuning_iterations=2)
        response = client.when_loaded(client.infer_shape, request, ENGINE_WAIT_S)
        assert response.success, response.message


def test_requests_sent_at_start_up_see_what_was_published_at_start_up(ros_isolation, tmp_path):
    """As soon as the services appear: a cube on the goal is published, and /joint_states from a best-effort
    (SensorDataQoS) publisher begin. GetIK for the goal in the cube used to succeed (its obstacles were read
    before the engine had loaded, with nothing in them), a goal in panda_hand was refused for want of
    /joint_states, and best-effort joint states were never heard at all."""
    with running_node(["-r", "__node:=mace_startup"], ros_isolation, tmp_path / "mace_node.log", "mace_startup") as (client, _):
        obstacles = client.node.create_publisher(MarkerArray, client.topic("obstacles"), 10)
        joint_states = client.node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        deadline = time.monotonic() + 10.0
        while obstacles.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        cube = Marker(ns="start_up", id=0, type=Marker.CUBE, action=Marker.ADD, header=Header(frame_id="panda_link0"))
        cube.pose.position, cube.pose.orientation.w = Point(x=0.5, y=0.3, z=0.3), 1.0
        cube.scale.x = cube.scale.y = cube.scale.z = 0.2
        obstacles.publish(MarkerArray(markers=[cube]))
        stop = threading.Event()

        def publish_joint_states() -> None:
            while not stop.wait(0.02):
                joint_states.publish(JointState(name=[f"panda_joint{i}" for i in range(1, 8)],
                                                position=[0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8]))

        publisher = threading.Thread(target=publish_joint_states, daemon=True)
        publisher.start()
        try:
            in_cube = panda_ik_request("panda_link0", num_solutions=1, position_only=True, timeout_s=30.0)
            in_cube.goal.pose.position = cube.pose.position
            in_cube = client.get_ik(in_cube, 90.0)
            assert not in_cube.success and in_cube.error_code == GetIK.Response.GOAL_IN_COLLISION, in_cube.message
            in_hand = panda_ik_request("panda_hand", num_solutions=1, position_only=True, timeout_s=30.0)
            in_hand.goal.pose.position = Point(x=0.0, y=0.0, z=0.1)  # (0.48, 0, 0.42) in the base frame, clear of the cube
            response = client.get_ik(in_hand, 90.0)
            assert response.success, response.message
        finally:
            stop.set()
            publisher.join()


def test_a_misspelled_parameter_is_named_in_a_warning(ros_isolation, tmp_path):
    """rclpy ignores an override of a parameter the node does not declare: `ik.timeout: 5.0` for ik.timeout_s
    left the default without a word."""
    log_path = tmp_path / "mace_node.log"
    with log_path.open("w") as log:
        node = NodeProcess(installed_executable(), ["-r", "__node:=mace_typo", "-p", "ik.timeout:=5.0"], env=ros_isolation, log=log)
        try:
            deadline = time.monotonic() + 60.0
            while "ik.timeout (misspelled?)" not in log_path.read_text() and node.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "ignoring parameter(s) this node does not have: ik.timeout (misspelled?)" in log_path.read_text()
        finally:
            assert node.stop() == 0


def test_a_default_tip_link_of_another_robot_is_refused_when_set(fr3):
    """`ros2 param set /mace_fr3 ik.tip_link panda_hand` would make every request without a tip link fail."""
    client, _ = fr3
    parameters = AsyncParameterClient(client.node, NODE_NAME)
    assert parameters.wait_for_services(10.0)

    def set_tip_link(value: str):
        return answer(client.executor, lambda: parameters.set_parameters([Parameter("ik.tip_link", Parameter.Type.STRING, value)])).results[0]

    refused = set_tip_link("panda_hand")
    assert not refused.successful and "unknown tip_link 'panda_hand'" in refused.reason and "fr3_hand_tcp" in refused.reason
    try:
        assert set_tip_link("fr3_hand_tcp").successful
    finally:
        assert set_tip_link("").successful


def test_names_carry_the_robot_prefix(fr3):
    client, _ = fr3
    response = client.get_ik(ik_request(tip_link="panda_hand"))
    assert response.error_code == GetIK.Response.INVALID_LINK_NAME, response.message
    assert "fr3_hand_tcp" in response.message
    request = ik_request()
    request.goal.header.frame_id = "panda_link0"
    assert client.get_ik(request).error_code == GetIK.Response.FRAME_TRANSFORM_FAILURE
    seed = JointState(name=["panda_joint1"], position=[0.0])
    response = client.get_ik(ik_request(seed_state=seed))
    assert response.error_code == GetIK.Response.INVALID_ROBOT_STATE and "fr3_joint1" in response.message
    # The engines' own messages too (they work in panda_* names).
    far = ik_request(tip_link="fr3_hand_tcp", timeout_s=10.0)
    far.goal.pose.position.x = 1.0
    response = client.when_loaded(client.get_ik, far, ENGINE_WAIT_S)
    assert response.error_code == GetIK.Response.NO_IK_SOLUTION and "where fr3_hand_tcp can be" in response.message, response.message
    assert "panda_" not in response.message


def test_get_ik_for_the_hand_tcp_in_the_robot_names(fr3):
    client, _ = fr3
    seed = JointState(name=[*reversed(FR3_JOINTS), "fr3_finger_joint1"],
                      position=[*reversed([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8]), 0.04])
    request = ik_request(tip_link="fr3_hand_tcp", num_solutions=2, timeout_s=10.0, seed_state=seed)
    response = client.when_loaded(client.get_ik, request, ENGINE_WAIT_S)
    assert response.success and response.error_code == GetIK.Response.SUCCESS, response.message
    kinematics = PandaKinematics(dtype=torch.float64)
    for solution in response.solutions:
        assert list(solution.name) == FR3_JOINTS and solution.header.frame_id == "fr3_link0"
        position, _ = kinematics.forward(torch.tensor([list(solution.position)]), "panda_hand_tcp")
        np.testing.assert_allclose(position[0].numpy(), [0.5, 0.0, 0.3], atol=1e-3)


def test_the_configured_oversampling_shapes_the_answer(fr3):
    client, _ = fr3
    request = InferShape.Request(header=Header(frame_id="fr3_link0"), contacts=CONTACTS, object_origin=Point(x=0.5, z=0.1),
                                 num_samples=4, tuning_iterations=2, timeout_s=20.0)
    response = client.when_loaded(client.infer_shape, request, ENGINE_WAIT_S)
    assert response.success, response.message
    assert "best of 3 x as many draws" in response.message and len(response.samples) == 4
    assert list(response.scores) == sorted(response.scores, reverse=True)


def test_a_request_whose_deadline_passes_in_the_queue_times_out_unworked(fr3):
    client, _ = fr3
    # The shape engine loaded (a short call), then one long request holds it while a short one waits.
    assert client.when_loaded(client.infer_shape, long_shape_request(0.5), ENGINE_WAIT_S).error_code != \
        InferShape.Response.ENGINE_LOADING
    long_call = client.infer_shape_client.call_async(long_shape_request(3.0))
    time.sleep(0.3)  # the long request reaches the node first (call_async sent it; spin_once may return at once)
    sent = time.monotonic()
    short_call = client.infer_shape_client.call_async(long_shape_request(0.5))
    client.executor.spin_until_future_complete(short_call, timeout_sec=10.0)
    answered_after_s = time.monotonic() - sent
    short = short_call.result()
    assert short.error_code == InferShape.Response.TIMED_OUT and not short.success, short.message
    assert "busy with other requests" in short.message
    assert answered_after_s < 0.5 + 0.3 and short.elapsed_s < 0.5 + 0.1, (answered_after_s, short.elapsed_s)
    client.executor.spin_until_future_complete(long_call, timeout_sec=10.0)
    assert long_call.result().elapsed_s < 3.0 + 0.5, long_call.result().message


# A DDS participant's own shared-memory files; Fast DDS's fastdds_port* files are shared and stay by design.
PARTICIPANT_SHM = re.compile(r"/dev/shm/(fastdds_[0-9a-f]{16}|fast_datasharing_\S+)$")


def shared_memory_files(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {match.group(0) for line in lines if (match := PARTICIPANT_SHM.search(line.split(maxsplit=5)[-1]))}


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its new parent, counts as ended)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_stopped_node_leaves_no_shared_memory_behind(tmp_path):
    """Fast DDS unlinks a participant's /dev/shm files only when it is deleted, which os._exit and a node
    with entities left (an action server) skipped: each start and stop of the node left ~1 MB in RAM."""
    domain = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(150, 200))}  # nobody else's
    # Fast DDS's shared-memory ports are shared across domains, so the node also maps segments of participants
    # running already (this module's node and client); those are theirs, not left behind by this node.
    earlier = set(map(str, Path("/dev/shm").glob("fastdds_*")))
    with (tmp_path / "mace_node.log").open("w") as log:
        node = NodeProcess(installed_executable(), ["-r", "__node:=mace_shm"], env=domain, log=log)
        try:
            log_path, deadline = tmp_path / "mace_node.log", time.monotonic() + ENGINE_WAIT_S
            while time.monotonic() < deadline and log_path.read_text().count("engine ready") < 2 and node.running():
                time.sleep(0.2)
            assert log_path.read_text().count("engine ready") == 2, log_path.read_text()
            children = [int(child) for task in Path(f"/proc/{node.process.pid}/task").glob("*/children")
                        for child in task.read_text().split()]
            assert len(children) == 1, "the intake process is not running"
            intake = children[0]
            files = shared_memory_files(node.process.pid) | shared_memory_files(intake)
            assert any("fastdds_" in name for name in files), files
        finally:
            assert node.stop() == 0
    deadline = time.monotonic() + 5.0
    while alive(intake) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(intake)
    assert not [name for name in files - earlier if Path(name).exists()]


def test_topics_reach_a_node_started_with_ros_localhost_only(tmp_path, monkeypatch):
    """The intake forced Fast DDS's LARGE_DATA transports on itself, and under ROS_LOCALHOST_ONLY=1 (or the
    default discovery range) it then never discovered publishers on the default transports: /joint_states,
    clouds, markers and contacts went unheard, silently. A goal in panda_hand needs a joint state."""
    monkeypatch.delenv("ROS_AUTOMATIC_DISCOVERY_RANGE", raising=False)
    monkeypatch.setenv("ROS_LOCALHOST_ONLY", "1")
    monkeypatch.setenv("ROS_DOMAIN_ID", str(random.SystemRandom().randint(150, 200)))
    with running_node(["-r", "__node:=mace_localhost"], {}, tmp_path / "mace_node.log", "mace_localhost") as (client, _):
        joints = client.node.create_publisher(JointState, "/joint_states", 10)
        state = JointState(name=[f"panda_joint{i}" for i in range(1, 8)], position=[0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8])
        request = panda_ik_request("panda_hand", timeout_s=5.0)
        request.goal.pose.position = Point(x=0.0, y=0.0, z=0.05)  # 5 cm ahead of the hand, pointing as it does
        request.goal.pose.orientation.x, request.goal.pose.orientation.w = 0.0, 1.0
        deadline = time.monotonic() + 30.0
        while True:
            joints.publish(state)
            response = client.when_loaded(client.get_ik, request, ENGINE_WAIT_S)
            if response.error_code != GetIK.Response.FRAME_TRANSFORM_FAILURE or time.monotonic() > deadline:
                break
            client.executor.spin_once(timeout_sec=0.5)
        assert response.success, response.message


def test_each_answer_is_logged_at_its_level(ros_isolation, tmp_path):
    """Successes at DEBUG, failures at INFO, refusals as warnings, each answer one line. rclpy ties a severity
    to each call site and raises at another, and every answer's line went through one call: only lines at
    the level of the node's first logged answer appeared, the others' errors vanished in a thread pool."""
    log_path = tmp_path / "mace_node.log"
    arguments = ["-r", "__node:=mace_log", "--log-level", "mace_log:=debug"]
    with running_node(arguments, ros_isolation, log_path, "mace_log") as (client, _):
        solved = client.when_loaded(client.get_ik, panda_ik_request(timeout_s=5.0), ENGINE_WAIT_S)
        assert solved.success, solved.message
        refused = client.get_ik(panda_ik_request(timeout_s=-1.0))
        assert refused.error_code == GetIK.Response.INVALID_REQUEST, refused.message
        beyond_reach = panda_ik_request(timeout_s=0.3)
        beyond_reach.goal.pose.position = Point(x=1.05, y=0.0, z=0.333)  # inside the validation's radius
        failed = client.get_ik(beyond_reach)
        assert not failed.success and failed.error_code != GetIK.Response.INVALID_GOAL, failed.message
        expected = ["GetIK: success", "GetIK refused:", "GetIK: failure"]
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not all(line in log_path.read_text() for line in expected):
            time.sleep(0.1)
        log = log_path.read_text()
        assert all(line in log for line in expected), log
        assert "after an answer" not in log, log


def test_sigint_with_a_request_in_flight_exits_within_one_second(fr3):
    client, node = fr3
    in_flight = client.infer_shape_client.call_async(long_shape_request(8.0))
    client.executor.spin_once(timeout_sec=1.0)
    time.sleep(0.5)  # well inside the engine
    assert not in_flight.done()
    signalled = time.monotonic()
    node.process.send_signal(signal.SIGINT)
    return_code = node.process.wait(timeout=10.0)
    assert time.monotonic() - signalled < 1.0 and return_code == 0


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_start_up_is_a_stop(ros_isolation, tmp_path, signal_number):
    """SIGTERM or SIGINT while the node is being built (2.5-4.5 s after its start here, as launch's shutdown may
    send it): the build failed on rclpy's invalid context and the process aborted (SIGABRT). Now it exits
    as after a normal stop. Several moments, since the window moves with the machine's load."""
    for delay_s in (1.5, 2.5, 3.5):
        log_path = tmp_path / f"mace_node_{delay_s}.log"
        with log_path.open("w") as log:
            node = NodeProcess(installed_executable(), ["-r", "__node:=mace_stopped_early"], env=ros_isolation, log=log)
            try:
                time.sleep(delay_s)
                node.process.send_signal(signal_number)
                return_code = node.process.wait(30.0)
            finally:
                node.stop()
        output = log_path.read_text()
        assert return_code in (0, -signal_number), (delay_s, return_code, output)
        # (Before rclpy is initialized, Python's own KeyboardInterrupt ends the imports: -SIGINT, as for any node.)
        assert "terminate called" not in output and "RCLError" not in output, (delay_s, output)
