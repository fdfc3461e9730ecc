"""The `mace` node: GetIK and InferShape services over the MACE engines, fed by obstacle topics.

The node spins in a MultiThreadedExecutor with the services in a reentrant callback group, so a
long GetIK neither blocks InferShape nor the topic callbacks that keep the obstacle model current;
a request works on a snapshot of that model. Each engine serves one request at a time: concurrent
requests wait for their turn inside their callback, where their deadline (timeout_s from the
callback's start) keeps running, so one whose deadline passes while it waits is answered TIMED_OUT
without being worked on. Engines are built once, in background threads, so the node answers
(ENGINE_LOADING) from the start.
"""
from __future__ import annotations

import queue
import re
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.time import Time
from rclpy.event_handler import PublisherEventCallbacks
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import JointState, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from mace_ros.ros import conversions, markers
from mace_ros.ros.executors import SERVICE_QOS, after_callback
from mace_ros.ros.frames import FrameTable, RigidTransform, RobotFrames, Tf2Frames
from mace_ros.ros.intake import (
    CloudSettings, CloudUpdate, ContactsUpdate, FieldSettings, IntakeSettings, JointStateUpdate, MarkerUpdate, ObstacleIntake,
    SensorClouds)
from mace_ros.ros.obstacles import ObstacleModel, Workspace
from mace_ros.ros.memory import freeze_loaded_objects
from mace_ros.ros.conversions import RobotNames
from mace_ros.ros.parameters import NODE_NAME, InvalidParameterError, declare_parameters, default_parameters_file, section
from mace_ros.ros.shape_action import ShapeActionServer
from mace_ros.ros.requests import (
    MAX_TIMEOUT_S, ErrorCode, InvalidRequest, RequestDefaults, RequestRefused, ik_batch_arguments, ik_request_arguments,
    shape_request_arguments, unknown_tip_link)
from mace_ros.srv import GetIK, GetIKBatch, InferShape

# Latched: rviz (or a test) that subscribes after a result still receives it.
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
WARNING_PERIOD_S = 5.0
# ~/scene is republished at most this often, when the primitives changed: a 5000-marker flood costs
# ~0.3 s of Python to turn into markers, which must not follow each message.
SCENE_PUBLISH_PERIOD_S = 0.2
# An engine that overruns a request's deadline by this much (one chunk of its work taking longer than
# planned, e.g. on a CPU shared with topic processing) is not waited for: the request is answered
# TIMED_OUT, and the engine finishes in its thread before serving the next request. What is left of
# the 0.1 s a caller may wait beyond timeout_s is for waking the waiting callback and the answer's way
# out: on the busy 2-core CPU the callback itself woke up to ~0.05 s late, and with a grace of 0.05 s
# 2 of 20,000 fuzzed requests were answered 0.10-0.12 s late (bench/reliability.py).
ENGINE_OVERRUN_GRACE_S = 0.02
# An engine plans its work by costs it measures, and on a loaded CPU its last chunks come out slower than
# planned: with the intake busy and other processes on both cores, 1 of 3 GetIKs of a blocked goal ended
# 20-40 ms past its timeout and was answered TIMED_OUT instead of GOAL_IN_COLLISION. So each engine is given
# the time left less how far it has lately run past the time it was given: a decaying maximum (one slow
# request's excess fades over some 20 requests; fading within 10, overruns came back every 4-5 requests), at
# most OVERRUN_ALLOWANCE_MAX_SHARE of the time left (with a quarter, a 0.5-s GetIKBatch right after a 5000-marker
# flood, which GetIK had overrun by 0.25 s, solved nothing in the time it kept).
OVERRUN_ALLOWANCE_DECAY = 0.9
OVERRUN_ALLOWANCE_MAX_SHARE = 0.1
# InferShape keeps part of its timeout for its response: converting each 512-point sample to a
# PointCloud2 (70-200 us on this busy 2-core CPU) and carrying it to the client (serialization,
# transport, the client's deserialization: ~120 us, plus ~10 ms per response), at most
# RESPONSE_MAX_SHARE of the timeout. Samples that would not reach the client by the deadline are
# left out of the response. Carrying a sample is Python-object work much like converting it
# (serializing it takes about as long, the client's deserialization twice as long) and load slows
# both alike, so while the response is built its transport estimate grows by how much slower than
# RESPONSE_CONVERT_IDLE_S (an idle process here: 25-40 us) the conversion runs: a fixed estimate let one
# 592-sample answer of 20,000 fuzzed requests reach its client 0.15 s late (0.25 s to carry it).
# The time kept is that same estimate at the busy conversion speed RESPONSE_CONVERT_PER_SAMPLE_S
# (~1 ms a sample): with the idle transport estimate kept instead, an engine that used its whole time
# left a 1000-sample answer 784 samples.
RESPONSE_BASE_S = 0.01
RESPONSE_CONVERT_PER_SAMPLE_S = 2e-4
RESPONSE_CONVERT_IDLE_S = 4e-5
RESPONSE_TRANSPORT_PER_SAMPLE_S = 1.5e-4
RESPONSE_MAX_SHARE = 0.5
RESPONSE_CHUNK = 16  # samples converted between two looks at the clock
# A request with a checkpoint (the InferShape action's cancel) is looked at this often while it waits for
# the engine's turn or answer: a cancel must not wait for the request ahead or the engine's deadline.
CHECKPOINT_PERIOD_S = 0.05
INTAKE_START_WAIT_S = 20.0


def response_transport_s_per_sample(convert_s_per_sample: float) -> float:
    """Estimated seconds to carry one sample to the client when converting one takes `convert_s_per_sample`."""
    return RESPONSE_TRANSPORT_PER_SAMPLE_S * max(1.0, convert_s_per_sample / RESPONSE_CONVERT_IDLE_S)


# GetIKBatch: per goal, what a batch costs outside the engine on the 2-core CPU (10k goals: the request's
# deserialization before the callback 0.26 s, building the response 0.1 s, its serialization 0.06 s and
# the client's deserialization 0.34 s), kept from the engine's share of timeout_s.
BATCH_TRANSPORT_PER_GOAL_S = 8e-5
# GetIK error code of an unsolved IKResult by its failure_kind (mace_ros.core.ik_engine.FAILURE_KINDS).
IK_FAILURE_CODES: dict[str, ErrorCode] = {
    "": "NO_IK_SOLUTION", "collision": "GOAL_IN_COLLISION", "unreachable": "NO_IK_SOLUTION",
    "joint_limits": "NO_IK_SOLUTION", "timeout": "TIMED_OUT",
}


# A request that waited for its engine to load is served if at least this share of the time it had then is left.
LOADED_LATE_SHARE = 0.5


class EngineUnavailable(RequestRefused):
    """The engine is still loading (ENGINE_LOADING) or failed to load (ENGINE_UNAVAILABLE)."""


class EngineSlot:
    """An engine built in a background thread at start-up."""

    def __init__(self, name: str, build: Callable[[], Any], logger) -> None:
        self.name = name
        self._engine: Any = None
        self._error: str | None = None
        self._started = time.monotonic()
        self._logger = logger
        self._turn = threading.Lock()
        self._loading_ended = threading.Event()  # loaded or failed
        self._overrun_allowance_s = 0.0  # see OVERRUN_ALLOWANCE_DECAY; updated by the request holding the turn
        # Requests' work runs in one long-lived thread: torch's per-thread state, warm in it, costs a
        # fresh thread 3-4 ms of a 25 ms solve on the CPU.
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._serve_work, name=f"{name}-request", daemon=True).start()
        threading.Thread(target=self._build, args=(build,), name=f"{name}-engine-loader", daemon=True).start()

    def _build(self, build: Callable[[], Any]) -> None:
        try:
            engine = build()
        except Exception as error:  # any failure must surface as a clear answer, not a dead thread
            self._error = f"{type(error).__name__}: {error}"
            self._logger.error(f"{self.name} engine failed to load: {self._error}")
            self._loading_ended.set()
            return
        self._engine = engine
        freeze_loaded_objects()  # the engine and everything loaded before it (see mace_ros/ros/memory.py)
        self._loading_ended.set()
        self._logger.info(f"{self.name} engine ready after {time.monotonic() - self._started:.1f} s")

    def _serve_work(self) -> None:
        while True:
            self._work.get()()

    def has_loaded(self) -> bool:
        """Loading has ended (loaded or failed)."""
        return self._loading_ended.is_set()

    def loaded_by(self, deadline: float, checkpoint: Callable[[], None] | None = None) -> Any:
        """The engine, waiting while it loads: a request sent at start-up, as soon as the service appears, is
        served once the engine has loaded if that leaves it at least LOADED_LATE_SHARE of the time it had when
        it began to wait, rather than refused at once. Otherwise ENGINE_LOADING, to retry, as soon as that
        share is no longer possible: served with a sliver of time it would only fail (and a client that
        retries on ENGINE_LOADING would take that for an answer), and waiting on to the deadline would only
        risk answering late (loading holds the interpreter for long stretches). checkpoint() as in `run`."""
        waited_from = time.monotonic()
        was_loading = not self._loading_ended.is_set()
        latest_useful = deadline - LOADED_LATE_SHARE * (deadline - waited_from)
        loaded_in_time = self._wait_for(self._loading_ended, latest_useful, checkpoint)
        if loaded_in_time and self._error is not None:
            raise EngineUnavailable(f"{self.name} engine unavailable: {self._error}", "ENGINE_UNAVAILABLE")
        if loaded_in_time and self._engine is not None and (
                not was_loading or deadline - time.monotonic() >= LOADED_LATE_SHARE * (deadline - waited_from)):
            return self._engine
        raise EngineUnavailable(
            f"{self.name} engine still loading, too close to the request's timeout_s to serve it "
            f"({time.monotonic() - self._started:.0f} s since start): retry", "ENGINE_LOADING")

    def run_if_idle(self, work: Callable[[Any], None]) -> bool:
        """work(engine) now, in this thread, if the engine is loaded and serves no request; False otherwise."""
        if self._engine is None or not self._turn.acquire(blocking=False):
            return False
        try:
            work(self._engine)
        finally:
            self._turn.release()
        return True

    def run(self, deadline: float, work: Callable[[Any, float], Any],
            track: Callable[[], AbstractContextManager] = nullcontext, checkpoint: Callable[[], None] | None = None) -> Any:
        """work(engine, seconds left before `deadline` (time.monotonic()), less the engine's recent overruns:
        OVERRUN_ALLOWANCE_DECAY) for one request, answered by deadline + ENGINE_OVERRUN_GRACE_S whatever the
        engine does.

        A request waits for the engine to load (loaded_by), then for its turn: requests take turns, and
        one whose deadline passes while it waits raises TIMED_OUT instead. The
        work runs in the slot's request thread (inside `track`), holding the turn until it ends: if it
        overruns the deadline, the request is answered TIMED_OUT at once and its result is dropped.
        `checkpoint()`, when given, runs every CHECKPOINT_PERIOD_S while the request waits for its turn
        or for the work: an exception it raises (a cancel) ends the wait at once and propagates; the work
        is to stop at its own next checkpoint, which frees the turn.
        """
        engine = self.loaded_by(deadline, checkpoint)
        waiting_since = time.monotonic()
        if not self._wait_for_turn(deadline, checkpoint):
            raise RequestRefused(
                f"timed out after waiting {time.monotonic() - waiting_since:.3f} s for the {self.name} engine, "
                f"busy with other requests", "TIMED_OUT")
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0.0:
            self._turn.release()
            raise RequestRefused(f"timed out before the {self.name} engine could start", "TIMED_OUT")
        given_s = remaining_s - min(self._overrun_allowance_s, OVERRUN_ALLOWANCE_MAX_SHARE * remaining_s)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def serve() -> None:
            work_started = time.monotonic()
            try:
                with track():
                    outcome["result"] = work(engine, given_s)
            except BaseException as error:  # handed to the waiting callback
                outcome["error"] = error
            finally:
                overrun_s = time.monotonic() - (work_started + given_s)
                self._overrun_allowance_s = max(overrun_s, OVERRUN_ALLOWANCE_DECAY * self._overrun_allowance_s, 0.0)
                self._turn.release()
                done.set()

        self._work.put(serve)
        if not self._wait_for(done, deadline + ENGINE_OVERRUN_GRACE_S, checkpoint):
            self._logger.warning(
                f"{self.name} engine overran a request's deadline by more than {ENGINE_OVERRUN_GRACE_S} s; "
                f"answered TIMED_OUT, the engine's result will be dropped", throttle_duration_sec=WARNING_PERIOD_S)
            raise RequestRefused(
                f"timed out: the {self.name} engine did not finish within the timeout (its result is dropped)", "TIMED_OUT")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _wait_for_turn(self, deadline: float, checkpoint: Callable[[], None] | None) -> bool:
        """Whether this request got the engine's turn before `deadline`; checkpoint() between looks."""
        if checkpoint is None:  # one wait: the lock's own order among waiters, as always for GetIK
            return self._turn.acquire(timeout=max(0.0, deadline - time.monotonic()))
        while True:
            checkpoint()
            left_s = deadline - time.monotonic()
            if self._turn.acquire(timeout=max(0.0, min(CHECKPOINT_PERIOD_S, left_s))):
                return True
            if left_s <= CHECKPOINT_PERIOD_S:
                return False

    @staticmethod
    def _wait_for(done: threading.Event, until: float, checkpoint: Callable[[], None] | None) -> bool:
        """Whether `done` was set before `until` (time.monotonic()); checkpoint() between looks."""
        if checkpoint is None:
            return done.wait(max(0.0, until - time.monotonic()))
        while True:
            checkpoint()
            left_s = until - time.monotonic()
            if done.wait(max(0.0, min(CHECKPOINT_PERIOD_S, left_s))):
                return True
            if left_s <= CHECKPOINT_PERIOD_S:
                return False


class WatchedLatchedTopic:
    """A latched topic whose message is built only when someone subscribes: each answer's visualization
    cost the serving process 1-3 ms of Python, about 1 ms of the next back-to-back GetIK's round trip, for
    nobody when nothing listens. A subscriber that comes later still gets the latest answer's: it is built
    and published when the subscription matches (and DDS keeps it for later ones, as for any latched topic)."""

    def __init__(self, node: Node, message_type: type, topic: str, run: Callable[[Callable[[], None]], None],
                 publish: Callable[[Publisher, Any], None]) -> None:
        self._pending: Callable[[], Any] | None = None  # builds the latest message not yet published
        self._lock = threading.Lock()
        self._run, self._publish = run, publish  # where the building runs; how a message is published
        self.publisher = node.create_publisher(
            message_type, topic, LATCHED, event_callbacks=PublisherEventCallbacks(matched=self._on_matched))

    def publish(self, build: Callable[[], Any]) -> None:
        """build()'s message, now if someone subscribes, else once someone does (the latest one only)."""
        with self._lock:
            self._pending = build
        if self.publisher.get_subscription_count() > 0:
            self._publish_pending()

    def _on_matched(self, status: Any) -> None:
        if status.current_count_change > 0:
            self._run(self._publish_pending)

    def _publish_pending(self) -> None:
        with self._lock:
            build, self._pending = self._pending, None
        if build is not None:
            self._publish(self.publisher, build())


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def set_torch_threads(count: int) -> None:
    """Process-wide torch intra-op threads; 0 keeps torch's default."""
    import torch

    if count > 0:
        torch.set_num_threads(count)


DTYPE_NAMES = ("float32", "float64")


def resolve_dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got '{name}'")
    return getattr(torch, name)


def engine_parameter_error(device: str, dtype: str, scene_name: str) -> str | None:
    """What makes the engines unable to load with these values, or None. torch is imported only for a
    CUDA device (its import would delay the services by ~2 s on a CPU)."""
    import yaml

    from mace_ros.core.resources import scene_path
    from mace_ros.core.scene import Scene

    if dtype not in DTYPE_NAMES:
        return f"parameter 'dtype' must be one of {', '.join(DTYPE_NAMES)}, got '{dtype}'"
    if device not in ("auto", "cpu") and re.fullmatch(r"cuda(:\d+)?", device) is None:
        return f"parameter 'device' must be auto, cpu, cuda or cuda:N, got '{device}'"
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return (f"parameter 'device' is '{device}', but this torch sees {torch.cuda.device_count()} CUDA device(s)"
                    f"{'' if torch.version.cuda else ' (a CPU-only build)'}: use auto or cpu")
    if scene_name:
        try:  # parsed here too: a scene file with a typo left the IK engine unavailable to every request
            Scene.load_yaml(scene_path(scene_name))
        except (OSError, ValueError, yaml.YAMLError) as error:
            return f"parameter 'scene': {' '.join(str(error).split())}"
    return None


def log_at(logger: Any, level: str, message: str) -> None:
    """`message` at `level` ("debug", "info" or "warning"). rclpy ties one severity to each call site
    and raises if a site logs at another, so each level has its own call here (one shared
    getattr(logger, level) call lost every answer's line whose level differed from the first's)."""
    if level == "warning":
        logger.warning(message)
    elif level == "info":
        logger.info(message)
    else:
        logger.debug(message)


class MaceNode(Node):
    def __init__(self, defaults_file: Path | None = None) -> None:
        super().__init__(NODE_NAME)
        self._destroyed = False  # see destroy_node, which also runs on a node whose construction failed
        for name in declare_parameters(self, defaults_file or default_parameters_file()):
            self.get_logger().warning(f"parameter '{name}' has no description in mace_ros/ros/parameters.py")
        # rclpy ignores overrides of undeclared parameters: a misspelled one (ik.timeout for ik.timeout_s) would
        # silently leave the default. QoS overrides are rclpy's own, read where publishers are made.
        unknown = sorted(name for name in getattr(self, "_parameter_overrides", {})
                         if not self.has_parameter(name) and not name.startswith("qos_overrides."))
        if unknown:
            self.get_logger().warning(f"ignoring parameter(s) this node does not have: {', '.join(unknown)} (misspelled?)")
        self.names = RobotNames(self.get_parameter("robot_prefix").value)
        # A default tip link of another robot would fail every request that names none: refused when set.
        tip_link_error = self._tip_link_parameter_error([self.get_parameter("ik.tip_link")])
        if tip_link_error is not None:
            raise InvalidParameterError(f"parameter ik.tip_link: {tip_link_error}")
        self.add_on_set_parameters_callback(lambda parameters: SetParametersResult(
            successful=(error := self._tip_link_parameter_error(parameters)) is None, reason=error or ""))
        # Values the engines cannot load with end the node now, rather than leave it answering ENGINE_UNAVAILABLE.
        engine_error = engine_parameter_error(
            self.get_parameter("device").value, self.get_parameter("dtype").value, self.get_parameter("scene").value)
        if engine_error is not None:
            raise InvalidParameterError(engine_error)
        self.base_frame: str = self.get_parameter("base_frame").value or self.names.to_ros("panda_link0")
        self.robot = RobotFrames()
        try:
            self.frames = FrameTable.for_robot(
                self.base_frame, self.get_parameter("static_transforms").value, self.get_parameter("attached_frames").value,
                self.names.to_ros, self.names.to_core, self.robot, Tf2Frames.create(self, self.base_frame))
        except ValueError as error:
            raise InvalidParameterError(f"parameters static_transforms, attached_frames: {error}") from None
        # Marker lifetimes count on the node's clock (ROS time: simulated with use_sim_time), as rviz's do.
        self.obstacles = ObstacleModel(self.get_parameter("obstacles.max_markers").value,
                                       lambda: self.get_clock().now().nanoseconds)
        self._published_primitives = -1  # ObstacleModel.primitives_version last shown on ~/scene
        self._warmed_scene: Any = None  # the last snapshot the IK engine was prepared for (see _prepare_ik_engine)
        self._contacts_lock = threading.Lock()
        self._latest_contacts: np.ndarray | None = None  # accumulated over ~/contacts messages until cleared
        self._latest_directions: np.ndarray | None = None  # their travel directions, zero rows = none
        self._requests_done = threading.Condition()
        self._requests_in_flight = 0
        # Visualization and log lines of answers, off the requests' critical path (one thread keeps them
        # in order): rclpy's logger inspects the caller's frame and publishes to /rosout, 1-2 ms of a GetIK
        # round trip when logged before the answer is sent. Successes are logged at DEBUG: a planner may call
        # GetIK 30 times a second, and an INFO line each took 12 % of a core beside a camera stream.
        self._after_answer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="after-answer")

        # Obstacle topics (~/obstacle_cloud, ~/obstacles) are received and processed by the intake
        # process (mace_ros/ros/intake.py), so that clouds and marker floods never hold this one's GIL.
        self._field_device: Any = None  # the IK engine's device, once it is loaded (see on_intake_update)
        try:
            workspace = Workspace.from_bounds(self.get_parameter("workspace.min_m").value, self.get_parameter("workspace.max_m").value)
        except ValueError as error:
            raise InvalidParameterError(f"parameters workspace.min_m, workspace.max_m: {error}") from None
        self.intake = ObstacleIntake(IntakeSettings(
            node_name=f"{self.get_name()}_intake", namespace=self.get_namespace(),
            cloud_topic=self.resolve_topic_name("~/obstacle_cloud"), markers_topic=self.resolve_topic_name("~/obstacles"),
            contacts_topic=self.resolve_topic_name("~/contacts"), joint_states_topic=self.resolve_topic_name("/joint_states"),
            robot_prefix=self.names.prefix, base_frame=self.base_frame,
            static_transforms=self.get_parameter("static_transforms").value,
            attached_frames=self.get_parameter("attached_frames").value,
            workspace_min_m=tuple(workspace.low.tolist()), workspace_max_m=tuple(workspace.high.tolist()),
            voxel_size_m=self.get_parameter("obstacle_cloud.voxel_size_m").value,
            self_filter_padding_m=self.get_parameter("obstacle_cloud.self_filter_padding_m").value,
            point_subsample=self.get_parameter("obstacle_cloud.point_subsample").value,
            use_sim_time=self.get_parameter("use_sim_time").value), self.on_intake_update,
            lambda: SensorClouds(self.obstacles.clouds()), self.get_logger())
        self.add_post_set_parameters_callback(self._send_cloud_settings)
        topics_group = MutuallyExclusiveCallbackGroup()
        self.obstacle_points_publisher = self.create_publisher(PointCloud2, "~/obstacle_points", LATCHED)
        self.ik_solutions_topic = WatchedLatchedTopic(self, MarkerArray, "~/ik_solutions", self._after_answer_pool.submit, self._publish)
        self.shape_samples_topic = WatchedLatchedTopic(self, PointCloud2, "~/shape_samples", self._after_answer_pool.submit, self._publish)
        self.scene_publisher = self.create_publisher(MarkerArray, "~/scene", LATCHED)
        # On the steady clock: with use_sim_time and a simulator paused (or no /clock yet) a ROS-time timer never fires.
        self.create_timer(SCENE_PUBLISH_PERIOD_S, self._on_model_timer, callback_group=topics_group,
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        # The engines load in background threads meanwhile.
        device = self.get_parameter("device").value
        dtype = self.get_parameter("dtype").value
        set_torch_threads(self.get_parameter("torch_threads").value)
        ik_config, shape_config = section(self, "ik"), section(self, "shape")
        scene_name: str = self.get_parameter("scene").value
        self.ik_engine = EngineSlot(
            "IK", lambda: self._build_ik_engine(ik_config, scene_name, device, dtype), self.get_logger())
        self.shape_engine = EngineSlot(
            "shape", lambda: self._build_shape_engine(shape_config, device, dtype), self.get_logger())
        # Services only once the intake has subscribed: a client that finds them and publishes obstacles
        # at once must find a subscriber (the intake starts in ~1-2 s; not waited for beyond INTAKE_START_WAIT_S).
        if not self.intake.subscribed.wait(INTAKE_START_WAIT_S):
            self.get_logger().warning(f"the obstacle intake has not subscribed after {INTAKE_START_WAIT_S} s; serving anyway")
        # Reentrant: every request is taken (and its deadline starts) at once, then waits for its engine's turn.
        services_group = ReentrantCallbackGroup()
        services = [
            self.create_service(GetIK, "~/get_ik", self.on_get_ik, qos_profile=SERVICE_QOS, callback_group=services_group),
            self.create_service(GetIKBatch, "~/get_ik_batch", self.on_get_ik_batch, qos_profile=SERVICE_QOS,
                                callback_group=services_group),
            self.create_service(InferShape, "~/infer_shape", self.on_infer_shape, qos_profile=SERVICE_QOS,
                                callback_group=services_group),
        ]
        self.shape_action = ShapeActionServer(self, services_group)  # ~/infer_shape as an action, with feedback and cancel

        # The names as resolved (remappings included), so that the log says where the services are.
        self.get_logger().info(
            f"serving {', '.join(self.resolve_service_name(service.srv_name) for service in services)} "
            "(InferShape also as an action); engines loading")

    # --- Engines --------------------------------------------------------------------------------

    def _build_ik_engine(self, config: dict[str, Any], scene_name: str, device: str, dtype: str):
        # The static scene is loaded with the engine: without its obstacles, answers would be unsafe.
        from mace_ros.core.ik_engine import IKEngine
        from mace_ros.core.resources import scene_path
        from mace_ros.core.scene import Scene

        static = Scene.load_yaml(scene_path(scene_name)) if scene_name else Scene()
        if scene_name:
            self.obstacles.set_static_scene(static)
            self.publish_scene()
        engine = IKEngine(config, resolve_device(device), resolve_dtype(dtype))
        # From now on the intake process builds each new cloud's distance field as this engine would.
        self._field_device = engine.checker.device
        self.intake.send(FieldSettings(
            static.points, *engine.checker.point_field_settings, str(engine.checker.dtype).removeprefix("torch.")))
        self._wait_for_intake()
        return engine

    def _build_shape_engine(self, config: dict[str, Any], device: str, dtype: str):
        from mace_ros.core.shape_engine import ShapeEngine

        engine = ShapeEngine(config, resolve_device(device), resolve_dtype(dtype))
        self._wait_for_intake()
        return engine

    def _wait_for_intake(self) -> None:
        """An engine reports ready only once the intake applies messages as they come: obstacles or contacts
        a client published at start-up are then in the model before the first answer that could use them
        (the intake's set-up, niced, may end after the engines have loaded)."""
        if not self.intake.set_up.wait(INTAKE_START_WAIT_S):
            self.get_logger().warning(f"the obstacle intake has not set up after {INTAKE_START_WAIT_S} s; serving anyway")

    # --- Topics ---------------------------------------------------------------------------------

    def _on_model_timer(self) -> None:
        """Publishes ~/scene when the primitives changed (markers whose lifetime has passed included), and
        prepares the IK engine for a changed model."""
        self.obstacles.expire()
        version = self.obstacles.primitives_version
        if version != self._published_primitives:
            self._published_primitives = version
            self.publish_scene()
        self._prepare_ik_engine()

    def _prepare_ik_engine(self) -> None:
        """While the IK engine is idle, builds what requests in the current model reuse (IKEngine.prepare_scene),
        so that the next request finds it ready: e.g. the exact checker's body of the primitives, which pybullet
        builds holding the GIL (256 markers: tens of ms; inside a request it delayed even a timed-out answer), and
        a new cloud's cells (~5 ms for a camera's)."""
        scene = self.obstacles.snapshot()
        if scene is self._warmed_scene:
            return
        try:
            if self.ik_engine.run_if_idle(lambda engine: engine.prepare_scene(scene)):
                self._warmed_scene = scene
        except Exception as error:  # a failure here only costs the next request the build
            self._warmed_scene = scene
            self.get_logger().warning(f"could not prepare the IK engine's scene: {error}", throttle_duration_sec=WARNING_PERIOD_S)

    def on_intake_update(self, update: CloudUpdate | MarkerUpdate | ContactsUpdate | JointStateUpdate) -> None:
        """An update from the intake process (mace_ros/ros/intake.py) enters the node's state."""
        if isinstance(update, JointStateUpdate):
            for stamp_ns, positions in zip(update.stamps_ns.tolist(), update.positions):
                self.robot.joint_states.add(stamp_ns, positions)
            return
        if isinstance(update, ContactsUpdate):
            self._add_contacts(update.contacts, update.directions)
            return
        if isinstance(update, MarkerUpdate):
            refused = self.obstacles.apply(update.operations)
            if refused:
                self.get_logger().warning(
                    f"~/obstacles: refused {refused} marker(s): the model keeps at most {self.obstacles.max_primitives} "
                    "(parameter obstacles.max_markers)", throttle_duration_sec=WARNING_PERIOD_S)
            return
        points = update.points if update.points.shape[0] else None
        merged = self.obstacles.points_with(update.sensor, points)
        if update.field is not None and self._field_device is not None:
            self._remember_field(update.field)
        self.obstacles.set_cloud(update.sensor, points)
        # Stamped as the cloud that changed it: a subscriber sees how old the model's view is.
        header = Header(frame_id=self.base_frame, stamp=update.stamp)
        self._publish(self.obstacle_points_publisher, conversions.xyz_to_pointcloud2(
            np.zeros((0, 3)) if merged is None else merged, header))
        self._prepare_ik_engine()  # now rather than at the next model timer: requests may come before it
        self.get_logger().debug(
            f"~/obstacle_cloud from '{update.sensor}': {0 if points is None else points.shape[0]} points applied "
            f"{(time.monotonic_ns() - update.received_ns) * 1e-9:.3f} s after it arrived")

    def _remember_field(self, arrays: dict[str, Any]) -> None:
        """Caches the distance field the intake process built for the model's next cloud, so that requests
        find it ready (PointDistanceField.cached) instead of building it within their deadline. It is keyed
        by the points the intake built it from: should those differ from the model's (a restarted intake
        that has not yet seen every sensor), requests never take it for the model's cloud."""
        import torch

        from mace_ros.core.collision import PointDistanceField

        field = PointDistanceField(
            origin=torch.as_tensor(arrays["origin"], device=self._field_device), resolution_m=arrays["resolution_m"],
            values=torch.as_tensor(arrays["values"], device=self._field_device), truncation_m=arrays["truncation_m"])
        field.remember(arrays["digest"], *arrays["built_for"])

    def _tip_link_parameter_error(self, parameters: list[Parameter]) -> str | None:
        """What is wrong with an ik.tip_link among `parameters` ('' = <robot_prefix>hand is fine), or None."""
        for parameter in parameters:
            if parameter.name == "ik.tip_link" and parameter.value:
                return unknown_tip_link(parameter.value, self.names)
        return None

    def _send_cloud_settings(self, parameters: list[Parameter]) -> None:
        """Run-time changes of obstacle_cloud.* reach the intake process."""
        if any(parameter.name.startswith("obstacle_cloud.") for parameter in parameters):
            self.intake.send(CloudSettings(
                self.get_parameter("obstacle_cloud.voxel_size_m").value,
                self.get_parameter("obstacle_cloud.self_filter_padding_m").value,
                self.get_parameter("obstacle_cloud.point_subsample").value))

    def _add_contacts(self, contacts: np.ndarray, directions: np.ndarray) -> None:
        """A ~/contacts message's contacts (base frame), added to those of earlier messages (several grasps)
        until an empty one clears them."""
        limit = int(self.get_parameter("shape.max_contacts").value)
        with self._contacts_lock:
            if contacts.shape[0] == 0:
                self._latest_contacts = self._latest_directions = None
                return
            if self._latest_contacts is not None:
                contacts = np.concatenate([self._latest_contacts, contacts])
                directions = np.concatenate([self._latest_directions, directions])
            if contacts.shape[0] > limit:
                self.get_logger().warning(
                    f"~/contacts: {contacts.shape[0]} accumulated, keeping the latest {limit} (shape.max_contacts); "
                    "publish an empty PoseArray to clear them", throttle_duration_sec=WARNING_PERIOD_S)
                # Copies: views would keep the whole concatenation (a message's worth) alive.
                contacts, directions = contacts[-limit:].copy(), directions[-limit:].copy()
            self._latest_contacts, self._latest_directions = contacts, directions

    def publish_scene(self) -> None:
        try:
            scene = self.obstacles.snapshot()
        except ImportError as error:
            self.get_logger().warning(f"cannot publish ~/scene: {error}", throttle_duration_sec=WARNING_PERIOD_S)
            return
        self._publish(self.scene_publisher, markers.scene_markers(scene, self._base_header()))

    # --- Services -------------------------------------------------------------------------------

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Counts a request from its callback's start to its answer (see wait_for_requests)."""
        with self._requests_done:
            self._requests_in_flight += 1
        try:
            yield
        finally:
            with self._requests_done:
                self._requests_in_flight -= 1
                self._requests_done.notify_all()

    def destroy_node(self) -> None:
        """Also the action server: rclpy's destroy_node leaves waitables, and a node with entities left
        keeps its DDS participant (and its shared-memory files) alive.

        Once only: rclpy's context destroys the nodes it tracks if it is still up when `rclpy.init`'s
        context manager exits (a SIGINT seen as KeyboardInterrupt before rclpy's handler shut it down), and
        main then destroys the node again; the action server's second destroy raised, and the node exited
        with status 1 (seen once in a CI run of test_node_sim_time)."""
        if self._destroyed:
            return
        self._destroyed = True
        shape_action = getattr(self, "shape_action", None)  # absent when a bad parameter stopped __init__
        if shape_action is not None:
            shape_action.server.destroy()
        super().destroy_node()

    def wait_for_requests(self, timeout_s: float) -> bool:
        """True once no request is being served or waiting, False if some still are after timeout_s."""
        with self._requests_done:
            return self._requests_done.wait_for(lambda: self._requests_in_flight == 0, timeout_s)

    def on_get_ik(self, request: GetIK.Request, response: GetIK.Response) -> GetIK.Response:
        # timeout_s counts from here: rclpy hands callbacks no arrival time, and with the reentrant
        # group a request reaches its callback as soon as an executor thread is free.
        started = time.monotonic()
        with self._in_flight():
            return self._serve_get_ik(request, response, started)

    @staticmethod
    def _validated(slot: EngineSlot, started: float, requested_timeout_s: float, default_timeout_s: float,
                   validate: Callable[[], Any], checkpoint: Callable[[], None] | None = None) -> Any:
        """validate(), which reads what the topics deliver (/joint_states for robot frames, ~/contacts); refused
        while the engine loads (which ends once the intake applies messages), it is tried again once loaded:
        a request sent as soon as the services appear was refused for want of joint states or contacts that
        were on their way. The first refusal stands if loading ends too late (an invalid timeout waits the
        default one). The obstacles are read when the engine takes the request."""
        try:
            return validate()
        except RequestRefused as refusal:
            if slot.has_loaded():
                raise
            timeout_s = requested_timeout_s if 0.0 < requested_timeout_s <= MAX_TIMEOUT_S else default_timeout_s
            try:
                slot.loaded_by(started + timeout_s, checkpoint)
            except RequestRefused:
                raise refusal from None
            return validate()

    def _ik_defaults(self) -> RequestDefaults:
        return RequestDefaults(
            num_samples=self.get_parameter("ik.num_samples").value,
            tuning_iterations=self.get_parameter("ik.tuning_iterations").value,
            timeout_s=self.get_parameter("ik.timeout_s").value,
            random_seed=self.get_parameter("random_seed").value,
            num_solutions=self.get_parameter("ik.num_solutions").value,
            tip_link=self.get_parameter("ik.tip_link").value or self.names.to_ros("panda_hand"),
        )

    def _serve_get_ik(self, request: GetIK.Request, response: GetIK.Response, started: float) -> GetIK.Response:
        try:
            defaults = self._ik_defaults()
            arguments = self._validated(self.ik_engine, started, request.timeout_s, defaults.timeout_s,
                                        lambda: ik_request_arguments(request, defaults, self.frames, self.names))
            from mace_ros.core.ik_engine import IKRequest

            # The model as it is when the engine takes the request (a cloud still being processed, its distance
            # field built, is not in it yet).
            result = self.ik_engine.run(
                started + arguments["timeout_s"],
                lambda engine, remaining_s: engine.solve(
                    IKRequest(**{**arguments, "timeout_s": remaining_s}), self.obstacles.snapshot()),
                self._in_flight)
            self._fill_ik_response(response, result, arguments)
        except RequestRefused as error:
            return self._failed("GetIK", response, str(error), error.code, started)
        except Exception as error:  # an engine bug must cost one request, not the node
            self.get_logger().error(f"GetIK: engine error\n{traceback.format_exc()}")
            return self._failed("GetIK", response, f"IK engine error: {type(error).__name__}: {error}", "FAILURE", started)
        response.elapsed_s = time.monotonic() - started
        self._log_after_answer("debug" if response.success else "info",
            f"GetIK: {'success' if response.success else 'failure'}, {len(response.solutions)} solution(s) "
            f"in {response.elapsed_s:.3f} s: {response.message}")
        return response

    def _fill_ik_response(self, response: GetIK.Response, result: Any, arguments: dict[str, Any]) -> None:
        header = self._base_header()
        solutions = np.asarray(result.solutions, dtype=np.float64).reshape(-1, 7)
        response.success = bool(result.success)
        code = "SUCCESS" if result.success else IK_FAILURE_CODES.get(getattr(result, "failure_kind", ""), "FAILURE")
        response.error_code = getattr(GetIK.Response, code)
        response.message = self.names.in_text(result.message)
        response.solutions = [conversions.joint_state_from_positions(q, header, self.names) for q in solutions]
        response.scores = [float(v) for v in result.scores]
        response.position_errors_m = [float(v) for v in result.position_errors_m]
        response.orientation_errors_rad = [float(v) for v in result.orientation_errors_rad]
        response.collision_free_rate = float(result.collision_free_rate)
        response.tuning_iterations_done = int(result.tuning_iterations_done)
        response.tuning_time_s = float(result.tuning_time_s)
        # Drawn after the answer is sent (2 ms of the round trip otherwise), and only for a subscriber.
        self._after_answer(lambda: self.ik_solutions_topic.publish(lambda: markers.ik_solution_markers(
            solutions, header, arguments["goal_position"], arguments["tip_link"])))

    def on_get_ik_batch(self, request: GetIKBatch.Request, response: GetIKBatch.Response) -> GetIKBatch.Response:
        started = time.monotonic()  # as on_get_ik
        with self._in_flight():
            return self._serve_get_ik_batch(request, response, started)

    def _serve_get_ik_batch(
        self, request: GetIKBatch.Request, response: GetIKBatch.Response, started: float,
    ) -> GetIKBatch.Response:
        try:
            defaults = self._ik_defaults()
            arguments = self._validated(self.ik_engine, started, request.timeout_s, defaults.timeout_s,
                                        lambda: ik_batch_arguments(request, defaults, self.frames, self.names))
            # What the goals cost outside the engine is kept from its time (see BATCH_TRANSPORT_PER_GOAL_S).
            engine_deadline = started + arguments["timeout_s"] - len(request.goals) * BATCH_TRANSPORT_PER_GOAL_S
            if engine_deadline <= time.monotonic():
                raise RequestRefused(
                    f"timed out: {len(request.goals)} goals take ~{len(request.goals) * BATCH_TRANSPORT_PER_GOAL_S:.2f} s "
                    f"to receive and answer, more than timeout_s {arguments['timeout_s']} s allows", "TIMED_OUT")
            result = self.ik_engine.run(
                engine_deadline,
                lambda engine, remaining_s: engine.solve_batch(
                    **{**arguments, "timeout_s": remaining_s}, scene=self.obstacles.snapshot()),
                self._in_flight)
        except RequestRefused as error:
            return self._failed("GetIKBatch", response, str(error), error.code, started)
        except Exception as error:  # an engine bug must cost one request, not the node
            self.get_logger().error(f"GetIKBatch: engine error\n{traceback.format_exc()}")
            return self._failed("GetIKBatch", response, f"IK engine error: {type(error).__name__}: {error}", "FAILURE", started)
        header, joint_names = self._base_header(), self.names.joint_names
        solved = np.asarray(result.success, dtype=bool)
        response.solved = solved.tolist()
        response.solutions = [  # built here rather than per goal by conversions: 10k goals, ~0.1 s less
            JointState(header=header, name=joint_names, position=q) if ok else JointState(header=header)
            for q, ok in zip(np.asarray(result.solutions, dtype=np.float64).tolist(), solved.tolist())]
        response.position_errors_m = [float(v) for v in result.position_errors_m]
        response.orientation_errors_rad = [float(v) for v in result.orientation_errors_rad]
        response.solved_count = int(solved.sum())
        response.success = bool(solved.all())
        response.error_code = GetIKBatch.Response.SUCCESS if response.success else GetIKBatch.Response.NO_IK_SOLUTION
        out_of_reach = int(np.count_nonzero(result.out_of_reach))
        unsolved_in_reach = solved.size - response.solved_count - out_of_reach
        response.message = f"{response.solved_count} of {solved.size} goals solved" + (
            f"; {out_of_reach} out of reach (no configuration reaches them, even ignoring obstacles and joint limits)"
            if out_of_reach else "") + (
            f"; {unsolved_in_reach} without a collision-free solution found by the deadline" if unsolved_in_reach else "")
        response.elapsed_s = time.monotonic() - started
        self._log_after_answer("debug" if response.success else "info", f"GetIKBatch: {response.message} in {response.elapsed_s:.3f} s")
        return response

    def on_infer_shape(self, request: InferShape.Request, response: InferShape.Response) -> InferShape.Response:
        started = time.monotonic()  # timeout_s counts from here, as in on_get_ik
        with self._in_flight():
            return self._serve_infer_shape(request, response, started)

    def _serve_infer_shape(
        self, request: InferShape.Request, response: InferShape.Response, started: float,
        on_iteration: Callable[[int, Any], None] | None = None,  # the action's feedback and cancel (shape_action.py)
        checkpoint: Callable[[], None] | None = None,  # the action's cancel, in every other stage and while waiting
    ) -> InferShape.Response:
        defaults = RequestDefaults(
            num_samples=self.get_parameter("shape.num_samples").value,
            tuning_iterations=self.get_parameter("shape.tuning_iterations").value,
            timeout_s=self.get_parameter("shape.timeout_s").value,
            random_seed=self.get_parameter("random_seed").value,
        )

        def validate() -> tuple[dict[str, Any], RigidTransform, int | None]:
            with self._contacts_lock:
                latest_contacts, latest_directions = self._latest_contacts, self._latest_directions
            arguments, to_base = shape_request_arguments(request, defaults, self.frames, latest_contacts, latest_directions)
            return arguments, to_base, self.frames.robot_state_stamp_ns(request.header.frame_id)

        try:
            arguments, to_base, state_stamp_ns = self._validated(
                self.shape_engine, started, request.timeout_s, defaults.timeout_s, validate, checkpoint)
            from mace_ros.core.shape_engine import ShapeRequest

            try:  # what needs the engine's configuration (its finger set), checked before waiting for its turn
                self.shape_engine.loaded_by(started + arguments["timeout_s"], checkpoint).validate(ShapeRequest(**arguments))
            except ValueError as error:
                from_topic = len(request.contacts) == 0 and arguments["contacts"] is not None and "contact" in str(error)
                raise InvalidRequest(str(error) + (
                    " [these contacts came from ~/contacts, where each pose's +z axis is its finger's travel direction; "
                    "an identity orientation gives none]" if from_topic else "")) from None
            def infer(engine: Any, remaining_s: float) -> Any:
                # Time kept for the response (samples to PointCloud2s, publishing, sending); the engine's
                # timeout stays > 0, which it would read as "the default".
                per_sample_s = RESPONSE_CONVERT_PER_SAMPLE_S + response_transport_s_per_sample(RESPONSE_CONVERT_PER_SAMPLE_S)
                reserve_s = min(RESPONSE_MAX_SHARE * remaining_s, RESPONSE_BASE_S + per_sample_s * arguments["num_samples"])
                return engine.infer(
                    ShapeRequest(**{**arguments, "timeout_s": max(remaining_s - reserve_s, 1e-6)}), on_iteration, checkpoint)

            result = self.shape_engine.run(started + arguments["timeout_s"], infer, self._in_flight, checkpoint)
            self._fill_shape_response(
                response, result, request.header.frame_id, to_base.inverse(), started + arguments["timeout_s"], state_stamp_ns)
        except RequestRefused as error:
            return self._failed("InferShape", response, str(error), error.code, started)
        except Exception as error:  # an engine bug must cost one request, not the node
            self.get_logger().error(f"InferShape: engine error\n{traceback.format_exc()}")
            return self._failed(
                "InferShape", response, f"shape engine error: {type(error).__name__}: {error}", "FAILURE", started)
        response.elapsed_s = time.monotonic() - started
        self._log_after_answer("debug" if response.success else "info",
            f"InferShape: {'success' if response.success else 'failure'}, {len(response.samples)} sample(s) "
            f"in {response.elapsed_s:.3f} s: {response.message}")
        return response

    def _fill_shape_response(
        self, response: InferShape.Response, result: Any, frame_id: str, to_request: RigidTransform, deadline: float,
        state_stamp_ns: int | None = None,
    ) -> None:
        """Samples go back in the request's frame, stamped with the joint state that placed it when it is on
        the robot (a hand that moved meanwhile must not move them: they were 39 cm off stamped with the
        answer's time), else with the answer's time; ~/shape_samples shows them in the base frame.

        The best samples first, as many as can still reach the client by `deadline` (time.monotonic()),
        the first one always; the message says when some were left out, and the aggregates (mean_score,
        diversity) are those of the samples returned."""
        samples = np.asarray(result.samples, dtype=np.float64)
        samples = samples.reshape(samples.shape[0], -1, 3) if samples.size else np.zeros((0, 0, 3))
        stamp = self.get_clock().now() if state_stamp_ns is None else Time(nanoseconds=state_stamp_ns)
        request_header = Header(stamp=stamp.to_msg(), frame_id=frame_id or self.base_frame)
        clouds = []
        if samples.shape[0]:
            in_request_frame = to_request.apply(samples.reshape(-1, 3)).reshape(samples.shape)
            first_converted_at = 0.0  # the clock once the first sample is converted (the generator's set-up is not per sample)
            for cloud in conversions.xyz_clouds_to_pointcloud2s(in_request_frame, request_header):
                if not clouds:
                    first_converted_at = time.monotonic()
                elif len(clouds) % RESPONSE_CHUNK == 0:
                    now = time.monotonic()
                    transport_s = response_transport_s_per_sample((now - first_converted_at) / len(clouds))
                    if now + RESPONSE_BASE_S + transport_s * (len(clouds) + RESPONSE_CHUNK) > deadline:
                        break
                clouds.append(cloud)
            result = result.first(len(clouds))  # the aggregates and message of what is returned
        response.success = bool(result.success)
        timed_out = getattr(result, "failure_kind", "") == "timeout"
        response.error_code = getattr(
            InferShape.Response, "SUCCESS" if result.success else "TIMED_OUT" if timed_out else "NO_SOLUTION")
        response.message = result.message
        samples = samples[:len(clouds)]
        response.samples = clouds
        response.scores = [float(v) for v in result.scores]
        response.mean_score = float(result.mean_score)
        response.diversity = float(result.diversity)
        response.tuning_iterations_done = int(result.tuning_iterations_done)
        response.tuning_time_s = float(result.tuning_time_s)
        if samples.shape[0]:
            header = self._base_header()
            self._after_answer(lambda: self.shape_samples_topic.publish(lambda: markers.shape_samples_cloud(samples, header)))

    def _failed(self, service: str, response: Any, message: str, code: ErrorCode, started: float) -> Any:
        response = type(response)()  # drop anything a failing step had filled in
        response.success = False
        response.error_code = getattr(type(response), code)
        response.message = message
        response.elapsed_s = time.monotonic() - started
        self._log_after_answer("warning", f"{service} refused: {message}")
        return response

    def _after_answer(self, work: Callable[[], Any]) -> None:
        """work() in the after-answer thread, handed over once this request's response is sent."""
        def logged_work() -> None:
            try:
                work()
            except Exception as error:  # in a pool's future it would vanish unseen
                self.get_logger().error(f"after an answer: {type(error).__name__}: {error}")

        after_callback(lambda: self._after_answer_pool.submit(logged_work))

    def _log_after_answer(self, level: str, message: str) -> None:
        self._after_answer(lambda: log_at(self.get_logger(), level, message))

    def _publish(self, publisher: Publisher, message: Any) -> None:
        # On Ctrl-C the context shuts down while a request may still be finishing its work.
        if self.context.ok():
            publisher.publish(message)

    def _base_header(self) -> Header:
        return Header(stamp=self.get_clock().now().to_msg(), frame_id=self.base_frame)
