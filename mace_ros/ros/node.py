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

import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from mace_ros.ros import conversions, markers
from mace_ros.core.kinematics import LINK_NAMES
from mace_ros.ros.frames import AttachedFrame, FrameTable, RigidTransform, RobotFrames, Tf2Frames
from mace_ros.ros.obstacles import ObstacleModel, SelfFilter, Workspace, voxel_downsample
from mace_ros.ros.conversions import RobotNames
from mace_ros.ros.parameters import NODE_NAME, declare_parameters, default_parameters_file, section
from mace_ros.ros.shape_action import ShapeActionServer
from mace_ros.ros.requests import (
    ErrorCode, InvalidRequest, RequestDefaults, RequestRefused, ik_request_arguments, shape_request_arguments)
from mace_ros.srv import GetIK, InferShape

# Latched: rviz (or a test) that subscribes after a result still receives it.
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
WARNING_PERIOD_S = 5.0
# ~/scene is republished at most this often, when the primitives changed: a 5000-marker flood costs
# ~0.3 s of Python to turn into markers, which must not follow each message.
SCENE_PUBLISH_PERIOD_S = 0.2
# An engine that overruns a request's deadline by this much (one chunk of its work taking longer than
# planned, e.g. on a CPU shared with topic processing) is not waited for: the request is answered
# TIMED_OUT, and the engine finishes in its thread before serving the next request.
ENGINE_OVERRUN_GRACE_S = 0.07
# InferShape keeps part of its timeout for its response: converting each 512-point sample to a
# PointCloud2 (70-200 us on this busy 2-core CPU) and carrying it to the client (serialization,
# transport, the client's deserialization: ~120 us, plus ~10 ms per response), at most
# RESPONSE_MAX_SHARE of the timeout. Samples that would not reach the client by the deadline are
# left out of the response.
RESPONSE_BASE_S = 0.01
RESPONSE_CONVERT_PER_SAMPLE_S = 2e-4
RESPONSE_TRANSPORT_PER_SAMPLE_S = 1.5e-4
RESPONSE_MAX_SHARE = 0.5
RESPONSE_CHUNK = 16  # samples converted between two looks at the clock
# How often the obstacle cloud subscription re-matches its publishers' reliability (see _match_cloud_publishers).
CLOUD_QOS_CHECK_PERIOD_S = 1.0
# GetIK error code of an unsolved IKResult by its failure_kind (mace_ros.core.ik_engine.FAILURE_KINDS).
IK_FAILURE_CODES: dict[str, ErrorCode] = {
    "": "NO_IK_SOLUTION", "collision": "GOAL_IN_COLLISION", "unreachable": "NO_IK_SOLUTION",
    "joint_limits": "NO_IK_SOLUTION", "timeout": "TIMED_OUT",
}


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
        threading.Thread(target=self._build, args=(build,), name=f"{name}-engine-loader", daemon=True).start()

    def _build(self, build: Callable[[], Any]) -> None:
        try:
            engine = build()
        except Exception as error:  # any failure must surface as a clear answer, not a dead thread
            self._error = f"{type(error).__name__}: {error}"
            self._logger.error(f"{self.name} engine failed to load: {self._error}")
            return
        self._engine = engine
        self._logger.info(f"{self.name} engine ready after {time.monotonic() - self._started:.1f} s")

    def get(self) -> Any:
        if self._engine is not None:
            return self._engine
        if self._error is not None:
            raise EngineUnavailable(f"{self.name} engine unavailable: {self._error}", "ENGINE_UNAVAILABLE")
        raise EngineUnavailable(
            f"{self.name} engine still loading ({time.monotonic() - self._started:.0f} s since start)", "ENGINE_LOADING")

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
            track: Callable[[], AbstractContextManager] = nullcontext) -> Any:
        """work(engine, seconds left before `deadline` (time.monotonic())) for one request, answered by
        deadline + ENGINE_OVERRUN_GRACE_S whatever the engine does.

        Requests take turns; one whose deadline passes while it waits raises TIMED_OUT instead. The
        work runs in a thread of its own (inside `track`), which holds the turn until it ends: if it
        overruns the deadline, the request is answered TIMED_OUT at once and its result is dropped.
        """
        engine = self.get()
        waiting_since = time.monotonic()
        if not self._turn.acquire(timeout=max(0.0, deadline - waiting_since)):
            raise RequestRefused(
                f"timed out after waiting {time.monotonic() - waiting_since:.3f} s for the {self.name} engine, "
                f"busy with other requests", "TIMED_OUT")
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0.0:
            self._turn.release()
            raise RequestRefused(f"timed out before the {self.name} engine could start", "TIMED_OUT")
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def serve() -> None:
            try:
                with track():
                    outcome["result"] = work(engine, remaining_s)
            except BaseException as error:  # handed to the waiting callback
                outcome["error"] = error
            finally:
                self._turn.release()
                done.set()

        threading.Thread(target=serve, name=f"{self.name}-request", daemon=True).start()
        if not done.wait(max(0.0, deadline + ENGINE_OVERRUN_GRACE_S - time.monotonic())):
            self._logger.warning(
                f"{self.name} engine overran a request's deadline by more than {ENGINE_OVERRUN_GRACE_S} s; "
                f"answered TIMED_OUT, the engine's result will be dropped", throttle_duration_sec=WARNING_PERIOD_S)
            raise RequestRefused(
                f"timed out: the {self.name} engine did not finish within the timeout (its result is dropped)", "TIMED_OUT")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


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


def resolve_dtype(name: str):
    import torch

    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got '{name}'")
    return dtypes[name]


class MaceNode(Node):
    def __init__(self, defaults_file: Path | None = None) -> None:
        super().__init__(NODE_NAME)
        for name in declare_parameters(self, defaults_file or default_parameters_file()):
            self.get_logger().warning(f"parameter '{name}' has no description in mace_ros/ros/parameters.py")
        self.names = RobotNames(self.get_parameter("robot_prefix").value)
        self.base_frame: str = self.get_parameter("base_frame").value or self.names.to_ros("panda_link0")
        # Robot links are frames too (a goal in panda_hand_tcp), placed like attached frames.
        self.robot = RobotFrames()
        attached = {self.names.to_ros(link): AttachedFrame(link, RigidTransform.identity()) for link in LINK_NAMES}
        attached.update(FrameTable.parse_attached_frames(self.get_parameter("attached_frames").value, self.names.to_core))
        self.frames = FrameTable(
            self.base_frame, FrameTable.parse_static_transforms(self.get_parameter("static_transforms").value),
            attached, self.robot, Tf2Frames.create(self, self.base_frame))
        self.workspace = Workspace.from_bounds(
            self.get_parameter("workspace.min_m").value, self.get_parameter("workspace.max_m").value)
        self.self_filter = SelfFilter()
        self.obstacles = ObstacleModel(self.get_parameter("obstacles.max_markers").value)
        self._published_primitives = -1  # ObstacleModel.primitives_version last shown on ~/scene
        self._warmed_scene: Any = None  # the last snapshot the IK engine was prepared for (see _prepare_ik_engine)
        self._contacts_lock = threading.Lock()
        self._latest_contacts: np.ndarray | None = None  # accumulated over ~/contacts messages until cleared
        self._latest_directions: np.ndarray | None = None  # their travel directions, zero rows = none
        self._requests_done = threading.Condition()
        self._requests_in_flight = 0

        topics_group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(MarkerArray, "~/obstacles", self.on_obstacles, 10, callback_group=topics_group)
        self.create_subscription(PoseArray, "~/contacts", self.on_contacts, 10, callback_group=topics_group)
        # Joint states in a group of their own: a cloud being processed must not hold them back.
        self.create_subscription(
            JointState, "/joint_states", self.on_joint_states, 50, callback_group=MutuallyExclusiveCallbackGroup())
        # Clouds (seconds of work each at most) in their own group, with the QoS re-matching timer that
        # replaces their subscription: the two never run at once.
        self._cloud_group = MutuallyExclusiveCallbackGroup()
        self._cloud_reliable = False
        self._cloud_subscription = self._subscribe_cloud(self._cloud_reliable)
        self.create_timer(CLOUD_QOS_CHECK_PERIOD_S, self._match_cloud_publishers, callback_group=self._cloud_group)
        self.obstacle_points_publisher = self.create_publisher(PointCloud2, "~/obstacle_points", LATCHED)
        self.ik_solutions_publisher = self.create_publisher(MarkerArray, "~/ik_solutions", LATCHED)
        self.shape_samples_publisher = self.create_publisher(PointCloud2, "~/shape_samples", LATCHED)
        self.scene_publisher = self.create_publisher(MarkerArray, "~/scene", LATCHED)
        self.create_timer(SCENE_PUBLISH_PERIOD_S, self._on_model_timer, callback_group=topics_group)
        # Reentrant: every request is taken (and its deadline starts) at once, then waits for its engine's turn.
        services_group = ReentrantCallbackGroup()
        self.create_service(GetIK, "~/get_ik", self.on_get_ik, callback_group=services_group)
        self.create_service(InferShape, "~/infer_shape", self.on_infer_shape, callback_group=services_group)
        self.shape_action = ShapeActionServer(self, services_group)  # ~/infer_shape as an action, with feedback and cancel

        device = self.get_parameter("device").value
        dtype = self.get_parameter("dtype").value
        set_torch_threads(self.get_parameter("torch_threads").value)
        ik_config, shape_config = section(self, "ik"), section(self, "shape")
        scene_name: str = self.get_parameter("scene").value
        self.ik_engine = EngineSlot(
            "IK", lambda: self._build_ik_engine(ik_config, scene_name, device, dtype), self.get_logger())
        self.shape_engine = EngineSlot(
            "shape", lambda: self._build_shape_engine(shape_config, device, dtype), self.get_logger())
        self.get_logger().info(f"serving {self.get_fully_qualified_name()}/get_ik and /infer_shape; engines loading")

    # --- Engines --------------------------------------------------------------------------------

    def _build_ik_engine(self, config: dict[str, Any], scene_name: str, device: str, dtype: str):
        # The static scene is loaded with the engine: without its obstacles, answers would be unsafe.
        from mace_ros.core.ik_engine import IKEngine
        from mace_ros.core.resources import scene_path
        from mace_ros.core.scene import Scene

        if scene_name:
            self.obstacles.set_static_scene(Scene.load_yaml(scene_path(scene_name)))
            self.publish_scene()
        return IKEngine(config, resolve_device(device), resolve_dtype(dtype))

    @staticmethod
    def _build_shape_engine(config: dict[str, Any], device: str, dtype: str):
        from mace_ros.core.shape_engine import ShapeEngine

        return ShapeEngine(config, resolve_device(device), resolve_dtype(dtype))

    # --- Topics ---------------------------------------------------------------------------------

    def on_obstacles(self, message: MarkerArray) -> None:
        """Markers become the model's primitives; what is ignored is logged once per message, throttled."""
        operations: list = []
        outside, invalid, first_error = 0, 0, ""
        transforms: dict[tuple[str, int], Any] = {}  # per (frame_id, stamp): a message's markers share a few
        for marker in message.markers:
            try:
                if marker.action == Marker.DELETEALL:
                    operations.append(("clear", marker.ns, None))
                elif marker.action == Marker.DELETE:
                    operations.append(("remove", conversions.marker_key(marker), None))
                elif marker.action == Marker.ADD:
                    frame = (marker.header.frame_id, conversions.stamp_to_ns(marker.header.stamp))
                    if frame not in transforms:
                        transforms[frame] = self.frames.to_base(*frame)
                    primitive = conversions.marker_to_primitive(marker, transforms[frame])
                    if self.workspace.meets(primitive):
                        operations.append(("put", conversions.marker_key(marker), primitive))
                    else:  # beyond the robot's reach; one that moved out is removed
                        operations.append(("remove", conversions.marker_key(marker), None))
                        outside += 1
                else:
                    raise ValueError(f"marker action {marker.action} is not ADD, DELETE or DELETEALL")
            except (ValueError, ImportError) as error:
                invalid += 1
                first_error = first_error or f"{conversions.marker_key(marker)}: {error}"
        refused = self.obstacles.apply(operations)
        count = len(message.markers)
        if invalid:
            self.get_logger().warning(
                f"~/obstacles: ignored {invalid} of {count} marker(s) as invalid, e.g. {first_error}",
                throttle_duration_sec=WARNING_PERIOD_S)
        if refused:
            self.get_logger().warning(
                f"~/obstacles: refused {refused} of {count} marker(s): the model keeps at most "
                f"{self.obstacles.max_primitives} (parameter obstacles.max_markers)", throttle_duration_sec=WARNING_PERIOD_S)
        if outside:
            self.get_logger().info(
                f"~/obstacles: ignored {outside} of {count} marker(s) entirely outside the workspace "
                f"{self.workspace.low.tolist()} .. {self.workspace.high.tolist()} m", throttle_duration_sec=WARNING_PERIOD_S)

    def _on_model_timer(self) -> None:
        """Publishes ~/scene when the primitives changed, and prepares the IK engine for a changed model."""
        version = self.obstacles.primitives_version
        if version != self._published_primitives:
            self._published_primitives = version
            self.publish_scene()
        self._prepare_ik_engine()

    def _prepare_ik_engine(self) -> None:
        """While the IK engine is idle, builds the exact checker's body of the current model, so that the
        next request finds it ready: pybullet builds it holding the GIL (~0.1-0.2 s for a 12k-point
        cloud, one sphere per point), which inside a request delays even its timed-out answer."""
        scene = self.obstacles.snapshot()
        if scene is self._warmed_scene:
            return

        def prepare(engine: Any) -> None:
            exact = getattr(engine, "exact_checker", None)
            if exact is not None:
                exact.check(np.zeros((0, 7)), scene)  # builds and keeps the scene's body; checks nothing

        try:
            if self.ik_engine.run_if_idle(prepare):
                self._warmed_scene = scene
        except Exception as error:  # a failure here only costs the next request the build
            self._warmed_scene = scene
            self.get_logger().warning(f"could not prepare the IK engine's scene: {error}", throttle_duration_sec=WARNING_PERIOD_S)

    def _subscribe_cloud(self, reliable: bool):
        """Keep-last-1 (only the latest cloud matters), reliable or best effort."""
        reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        return self.create_subscription(
            PointCloud2, "~/obstacle_cloud", self.on_obstacle_cloud, QoSProfile(depth=1, reliability=reliability),
            callback_group=self._cloud_group)

    def _match_cloud_publishers(self) -> None:
        """Subscribe reliably when every cloud publisher is reliable, best effort otherwise.

        A camera cloud (~10 MB at 640 x 480) crosses Fast DDS's shared memory in many fragments; over
        best effort one lost fragment loses the cloud, and in a busy process nearly all are lost
        (measured: 0-4 of 20 arrive), while a reliable reader resends them (20 of 20). But a reliable
        reader never matches a best-effort writer, so the reliability follows the publishers (as
        `ros2 bag record` adapts its QoS).
        """
        publishers = self.get_publishers_info_by_topic(self._cloud_subscription.topic_name)
        reliable = bool(publishers) and all(
            publisher.qos_profile.reliability == ReliabilityPolicy.RELIABLE for publisher in publishers)
        if reliable != self._cloud_reliable:
            self.destroy_subscription(self._cloud_subscription)
            self._cloud_reliable = reliable
            self._cloud_subscription = self._subscribe_cloud(reliable)
            self.get_logger().info(f"~/obstacle_cloud: subscribed {'reliable' if reliable else 'best effort'} to match its publishers")

    def on_joint_states(self, message: JointState) -> None:
        try:
            positions = conversions.joint_state_to_positions(message, self.names)
        except ValueError as error:
            if message.name and not set(message.name) & set(self.names.joint_names):
                return  # another joint group's state (e.g. the gripper's)
            self.get_logger().warning(f"/joint_states ignored: {error}", throttle_duration_sec=WARNING_PERIOD_S)
            return
        if positions is not None:
            self.robot.joint_states.add(
                conversions.stamp_to_ns(message.header.stamp) or self.get_clock().now().nanoseconds, positions)

    def on_obstacle_cloud(self, cloud: PointCloud2) -> None:
        """The cloud in the base frame (at its stamp), cropped to the workspace, thinned, without the robot's
        points, becomes its sensor's (frame_id's) contribution to the obstacle model."""
        started = time.monotonic()
        sensor, stamp_ns = cloud.header.frame_id, conversions.stamp_to_ns(cloud.header.stamp)
        try:
            to_base = self.frames.to_base(sensor, stamp_ns)
            points = to_base.apply(conversions.pointcloud2_to_xyz(cloud))
        except ValueError as error:  # UnknownFrameError included
            self.get_logger().warning(f"~/obstacle_cloud rejected: {error}", throttle_duration_sec=WARNING_PERIOD_S)
            return
        inside = self.workspace.contains(points)
        if not inside.all():
            self.get_logger().info(
                f"~/obstacle_cloud from '{sensor}': dropped {int((~inside).sum())} of {points.shape[0]} points outside "
                f"the workspace {self.workspace.low.tolist()} .. {self.workspace.high.tolist()} m",
                throttle_duration_sec=WARNING_PERIOD_S)
            points = points[inside]
        points = voxel_downsample(points, self.get_parameter("obstacle_cloud.voxel_size_m").value)
        positions = self.robot.joint_states.at(stamp_ns)
        if positions is None:
            self.get_logger().warning(
                "~/obstacle_cloud: no /joint_states yet, so the robot's own points are not filtered out",
                throttle_duration_sec=WARNING_PERIOD_S)
        elif points.shape[0]:
            padding_m = self.get_parameter("obstacle_cloud.self_filter_padding_m").value
            points = points[self.self_filter.keep(points, self.robot.link_transforms(positions), padding_m)]
        merged = self.obstacles.points_with(sensor, points)
        self._prepare_cloud(merged)
        self.obstacles.set_cloud(sensor, points)
        self._publish(self.obstacle_points_publisher, conversions.xyz_to_pointcloud2(
            np.zeros((0, 3)) if merged is None else merged, self._base_header()))
        self.get_logger().debug(
            f"~/obstacle_cloud from '{sensor}': {points.shape[0]} points applied in {time.monotonic() - started:.3f} s")

    def _prepare_cloud(self, points: np.ndarray | None) -> None:
        """Builds the distance field of the model's next cloud before the model takes it, so that requests
        find it ready (fields are cached by content) instead of building it within their deadline."""
        try:
            engine = self.ik_engine.get()
        except EngineUnavailable:
            return  # the first request builds it
        if points is not None:
            from mace_ros.core.scene import Scene

            engine.checker.prepare(Scene(points=points))

    def on_contacts(self, message: PoseArray) -> None:
        """Fingertip contacts as a PoseArray, added to those of earlier messages (several grasps) until an
        empty PoseArray clears them: positions are the contacts, each pose's +z axis its finger's travel
        direction (identity orientation = no direction; conversions.contact_travel_directions)."""
        try:
            to_base = self.frames.to_base(message.header.frame_id)
            contacts = to_base.apply(conversions.points_to_array([pose.position for pose in message.poses], "contacts"))
            directions = conversions.contact_travel_directions(message.poses) @ to_base.rotation.T
        except ValueError as error:
            self.get_logger().warning(f"~/contacts rejected: {error}", throttle_duration_sec=WARNING_PERIOD_S)
            return
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
                contacts, directions = contacts[-limit:], directions[-limit:]
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

    def _serve_get_ik(self, request: GetIK.Request, response: GetIK.Response, started: float) -> GetIK.Response:
        defaults = RequestDefaults(
            num_samples=self.get_parameter("ik.num_samples").value,
            tuning_iterations=self.get_parameter("ik.tuning_iterations").value,
            timeout_s=self.get_parameter("ik.timeout_s").value,
            random_seed=self.get_parameter("random_seed").value,
            num_solutions=self.get_parameter("ik.num_solutions").value,
            tip_link=self.get_parameter("ik.tip_link").value or self.names.to_ros("panda_hand"),
        )
        try:
            arguments = ik_request_arguments(request, defaults, self.frames, self.names)
            from mace_ros.core.ik_engine import IKRequest

            # The model as it is now: a cloud still being processed (its distance field built) is not in it yet.
            scene = self.obstacles.snapshot()
            result = self.ik_engine.run(
                started + arguments["timeout_s"],
                lambda engine, remaining_s: engine.solve(IKRequest(**{**arguments, "timeout_s": remaining_s}), scene),
                self._in_flight)
            self._fill_ik_response(response, result, arguments)
        except RequestRefused as error:
            return self._failed("GetIK", response, str(error), error.code, started)
        except Exception as error:  # an engine bug must cost one request, not the node
            self.get_logger().error(f"GetIK: engine error\n{traceback.format_exc()}")
            return self._failed("GetIK", response, f"IK engine error: {type(error).__name__}: {error}", "FAILURE", started)
        response.elapsed_s = time.monotonic() - started
        self.get_logger().info(
            f"GetIK: {'success' if response.success else 'failure'}, {len(response.solutions)} solution(s) "
            f"in {response.elapsed_s:.3f} s: {response.message}")
        return response

    def _fill_ik_response(self, response: GetIK.Response, result: Any, arguments: dict[str, Any]) -> None:
        header = self._base_header()
        solutions = np.asarray(result.solutions, dtype=np.float64).reshape(-1, 7)
        response.success = bool(result.success)
        code = "SUCCESS" if result.success else IK_FAILURE_CODES.get(getattr(result, "failure_kind", ""), "FAILURE")
        response.error_code = getattr(GetIK.Response, code)
        response.message = result.message
        response.solutions = [conversions.joint_state_from_positions(q, header, self.names) for q in solutions]
        response.scores = [float(v) for v in result.scores]
        response.position_errors_m = [float(v) for v in result.position_errors_m]
        response.orientation_errors_rad = [float(v) for v in result.orientation_errors_rad]
        response.collision_free_rate = float(result.collision_free_rate)
        response.tuning_iterations_done = int(result.tuning_iterations_done)
        response.tuning_time_s = float(result.tuning_time_s)
        self._publish(self.ik_solutions_publisher,
                      markers.ik_solution_markers(solutions, header, arguments["goal_position"], arguments["tip_link"]))

    def on_infer_shape(self, request: InferShape.Request, response: InferShape.Response) -> InferShape.Response:
        started = time.monotonic()  # timeout_s counts from here, as in on_get_ik
        with self._in_flight():
            return self._serve_infer_shape(request, response, started)

    def _serve_infer_shape(
        self, request: InferShape.Request, response: InferShape.Response, started: float,
        on_iteration: Callable[[int, Any], None] | None = None,  # the action's feedback and cancel (shape_action.py)
    ) -> InferShape.Response:
        defaults = RequestDefaults(
            num_samples=self.get_parameter("shape.num_samples").value,
            tuning_iterations=self.get_parameter("shape.tuning_iterations").value,
            timeout_s=self.get_parameter("shape.timeout_s").value,
            random_seed=self.get_parameter("random_seed").value,
        )
        with self._contacts_lock:
            latest_contacts, latest_directions = self._latest_contacts, self._latest_directions
        try:
            arguments, to_base = shape_request_arguments(request, defaults, self.frames, latest_contacts, latest_directions)
            from mace_ros.core.shape_engine import ShapeRequest

            try:  # what needs the engine's configuration (its finger set), checked before waiting for it
                self.shape_engine.get().validate(ShapeRequest(**arguments))
            except ValueError as error:
                raise InvalidRequest(str(error)) from None
            def infer(engine: Any, remaining_s: float) -> Any:
                # Time kept for the response (samples to PointCloud2s, publishing, sending); the engine's
                # timeout stays > 0, which it would read as "the default".
                per_sample_s = RESPONSE_CONVERT_PER_SAMPLE_S + RESPONSE_TRANSPORT_PER_SAMPLE_S
                reserve_s = min(RESPONSE_MAX_SHARE * remaining_s, RESPONSE_BASE_S + per_sample_s * arguments["num_samples"])
                return engine.infer(ShapeRequest(**{**arguments, "timeout_s": max(remaining_s - reserve_s, 1e-6)}), on_iteration)

            result = self.shape_engine.run(started + arguments["timeout_s"], infer, self._in_flight)
            self._fill_shape_response(
                response, result, request.header.frame_id, to_base.inverse(), started + arguments["timeout_s"])
        except RequestRefused as error:
            return self._failed("InferShape", response, str(error), error.code, started)
        except Exception as error:  # an engine bug must cost one request, not the node
            self.get_logger().error(f"InferShape: engine error\n{traceback.format_exc()}")
            return self._failed(
                "InferShape", response, f"shape engine error: {type(error).__name__}: {error}", "FAILURE", started)
        response.elapsed_s = time.monotonic() - started
        self.get_logger().info(
            f"InferShape: {'success' if response.success else 'failure'}, {len(response.samples)} sample(s) "
            f"in {response.elapsed_s:.3f} s: {response.message}")
        return response

    def _fill_shape_response(
        self, response: InferShape.Response, result: Any, frame_id: str, to_request: RigidTransform, deadline: float,
    ) -> None:
        """Samples go back in the request's frame; ~/shape_samples shows them in the base frame.

        The best samples first, as many as can still reach the client by `deadline` (time.monotonic()),
        the first one always; the message says when some were left out."""
        samples = np.asarray(result.samples, dtype=np.float64)
        samples = samples.reshape(samples.shape[0], -1, 3) if samples.size else np.zeros((0, 0, 3))
        request_header = Header(stamp=self.get_clock().now().to_msg(), frame_id=frame_id or self.base_frame)
        response.success = bool(result.success)
        timed_out = getattr(result, "failure_kind", "") == "timeout"
        response.error_code = getattr(
            InferShape.Response, "SUCCESS" if result.success else "TIMED_OUT" if timed_out else "FAILURE")
        response.message = result.message
        clouds = []
        if samples.shape[0]:
            in_request_frame = to_request.apply(samples.reshape(-1, 3)).reshape(samples.shape)
            for cloud in conversions.xyz_clouds_to_pointcloud2s(in_request_frame, request_header):
                if len(clouds) % RESPONSE_CHUNK == 0 and clouds and time.monotonic() + RESPONSE_BASE_S \
                        + RESPONSE_TRANSPORT_PER_SAMPLE_S * (len(clouds) + RESPONSE_CHUNK) > deadline:
                    response.message += f"; {len(clouds)} of {samples.shape[0]} samples returned (timeout)"
                    break
                clouds.append(cloud)
        samples = samples[:len(clouds)]
        response.samples = clouds
        response.scores = [float(v) for v in result.scores[:len(clouds)]]
        response.mean_score = float(result.mean_score)
        response.diversity = float(result.diversity)
        response.tuning_iterations_done = int(result.tuning_iterations_done)
        response.tuning_time_s = float(result.tuning_time_s)
        if samples.shape[0]:
            self._publish(self.shape_samples_publisher, markers.shape_samples_cloud(samples, self._base_header()))

    def _failed(self, service: str, response: Any, message: str, code: ErrorCode, started: float) -> Any:
        response = type(response)()  # drop anything a failing step had filled in
        response.success = False
        response.error_code = getattr(type(response), code)
        response.message = message
        response.elapsed_s = time.monotonic() - started
        self.get_logger().warning(f"{service} refused: {message}")
        return response

    def _publish(self, publisher: Publisher, message: Any) -> None:
        # On Ctrl-C the context shuts down while a request may still be finishing its work.
        if self.context.ok():
            publisher.publish(message)

    def _base_header(self) -> Header:
        return Header(stamp=self.get_clock().now().to_msg(), frame_id=self.base_frame)
