"""The node's input topics, received and processed in a process of their own.

Camera clouds (10-30 MB each, up to 30 Hz) and marker floods cost Python time, and in the process
that serves GetIK and InferShape that time is taken from requests: rclpy builds a 5000-marker
MarkerArray's Python objects in 0.26 s with the GIL held, and a 640 x 480 cloud takes ~0.2 s to crop,
thin, self-filter and turn into a distance field. bench/reliability.py measured 3 % of requests
answered up to 1.5 s late while such messages were handled beside them. So the `mace` node starts
this intake process (`ObstacleIntake`), which subscribes to ~/obstacle_cloud, ~/obstacles,
~/contacts and /joint_states and sends the node small results: each sensor's cropped, thinned,
self-filtered cloud with the merged cloud's distance field, each marker message as operations on the
obstacle model, contacts in the base frame, and the arm's joint positions. The node only swaps them
in; it subscribes to nothing itself (a fuzzed 10000-pose PoseArray or 100000-name JointState also
took the serving process's interpreter for 0.1-0.3 s).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from geometry_msgs.msg import PoseArray
from sensor_msgs.msg import JointState, PointCloud2
from visualization_msgs.msg import Marker, MarkerArray

from mace_ros.core.resources import config_dir
from mace_ros.ros.executors import MultiThreadedExecutor, PolledSubscription
from mace_ros.ros.memory import (
    INTAKE_GC_THRESHOLDS, INTAKE_MMAP_THRESHOLD_BYTES, bound_malloc, freeze_loaded_objects, with_huge_page_malloc,
    without_reply_buffer_settings)

# Deliberately no other mace_ros imports here: the others bring torch (2.5 s to import on a busy 2-core CPU),
# and the intake process subscribes before it imports them (IntakeNode), so that no early cloud is missed.

WARNING_PERIOD_S = 5.0
# How often the cloud subscription re-matches its publishers' reliability (see _match_cloud_publishers).
CLOUD_QOS_CHECK_PERIOD_S = 1.0
# Once the node is gone, the intake's executors get this long to stop (and its joint-state thread half of it).
EXIT_GRACE_S = 1.0
# ... and the process ends this long after it began leaving, whatever rclpy does: longer than those bounded
# waits, so that it normally deletes its DDS participant first (a timer of EXIT_GRACE_S could end it during
# them, leaving its ~1 MB of /dev/shm behind).
EXIT_DEADLINE_S = 3.0
# A dead intake process (killed, out of memory) is started again after this long.
RESTART_DELAY_S = 1.0
PARENT_CHECK_PERIOD_S = 0.5
# Marker operations per MarkerUpdate (see _send_markers).
MARKER_OPERATIONS_PER_UPDATE = 128
# The intake's scheduling priority below the node's (see run_intake).
INTAKE_NICENESS = 10
INTAKE_EXECUTOR_THREADS = 2  # markers and contacts, each in its own callback group (clouds, joint states: see IntakeNode)
# /joint_states are taken in batches this often (PolledSubscription), up to this many at a time: a 1 kHz
# controller's for 0.1 s, should the intake be busy.
JOINT_STATES_PERIOD_S = 0.01
JOINT_STATES_DEPTH = 100
# Best effort, as sensor data is subscribed: it matches reliable publishers (robot_state_publisher's, a
# controller's) and best-effort ones (SensorDataQoS drivers and simulators), which a reliable subscription
# never heard, silently; only the latest states matter.
JOINT_STATES_QOS = QoSProfile(depth=JOINT_STATES_DEPTH, reliability=ReliabilityPolicy.BEST_EFFORT)
# /joint_states kept while the intake is still setting up (replayed into its history once it is ready).
EARLY_JOINT_STATES = 100
# The set-up's announcement waits at most this long for marker and contacts callbacks held during it.
EARLY_CALLBACKS_WAIT_S = 2.0
# Clouds the subscription holds before the intake takes them (each taken at once, see on_obstacle_cloud).
CLOUD_HISTORY_DEPTH = 4
# Threads that build a cloud's distance field where it takes scipy's feature transform (truncations of
# more than 32 voxels; a camera cloud's 13 take windowed minima in one thread, see PointDistanceField.build):
# a 640 x 480 table cloud's transform took 13 ms instead of 22 with two (the 2-core development CPU).
FIELD_BUILD_THREADS = min(4, os.cpu_count() or 1)
# numpy's OpenBLAS runs a large matrix product (the voxelizer's, once per cloud) in a thread per core and
# leaves those threads spinning between calls: one took 90 % of a core beside a 640 x 480 stream, for a
# 1 ms product. The intake works in one thread by design, so its BLAS does too (unless the user sets it).
INTAKE_BLAS_THREADS = "1"
# A cloud stamped farther than this from every kept joint state is self-filtered (and placed, for a robot-
# attached camera) at a state of another moment: a warning says so (a camera's clock out of step with the
# robot's left the arm's points in the model, silently).
JOINT_STATE_GAP_WARNING_S = 0.1


class KeyedThrottle:
    """Whether a message of a kind (e.g. one sensor's kind of rejection) is due: once per `period_s` per key.
    rclpy throttles per call site, where one malformed stream would hide every other sensor's warnings. The
    keys kept are bounded (the least recently logged go first), as topics may carry any frame_id."""

    def __init__(self, period_s: float, max_keys: int = 64) -> None:
        self._period_s = period_s
        self._max_keys = max_keys
        self._last: dict[Any, float] = {}
        self._lock = threading.Lock()

    def due(self, key: Any) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._period_s:
                return False
            self._last.pop(key, None)
            self._last[key] = now
            while len(self._last) > self._max_keys:
                self._last.pop(next(iter(self._last)))
            return True


@dataclass(frozen=True)
class IntakeSettings:
    """What the intake process needs of the node's configuration (topic names as the node resolved
    them, remappings included)."""

    node_name: str
    namespace: str
    cloud_topic: str
    markers_topic: str
    contacts_topic: str
    joint_states_topic: str
    robot_prefix: str
    base_frame: str
    static_transforms: str
    attached_frames: str
    workspace_min_m: tuple[float, float, float]
    workspace_max_m: tuple[float, float, float]
    voxel_size_m: float
    self_filter_padding_m: float
    point_subsample: int
    use_sim_time: bool


# --- Messages between the node and its intake process (pickled through a pipe) ----------------------

@dataclass(frozen=True)
class FieldSettings:
    """Node -> intake, once the IK engine is loaded: how its collision checker builds a cloud's
    distance field, and the static scene's points that come first in the model's cloud."""

    static_points: np.ndarray | None
    resolution_m: float
    truncation_m: float
    dtype: str  # "float32" or "float64"


@dataclass(frozen=True)
class CloudSettings:
    """Node -> intake: the run-time parameters of cloud processing."""

    voxel_size_m: float
    self_filter_padding_m: float
    point_subsample: int


@dataclass(frozen=True)
class SensorClouds:
    """Node -> intake, at each (re)start: every sensor's latest cloud as the node holds it (base frame), so that
    a restarted intake's fields cover the sensors that have not sent since (a camera that sent once)."""

    clouds: dict[str, np.ndarray]


@dataclass(frozen=True)
class CloudUpdate:
    """Intake -> node: `sensor`'s (frame_id's) latest cloud in the base frame (empty: cleared), and the
    distance field of the model's cloud once it holds it (None before FieldSettings arrive)."""

    sensor: str
    points: np.ndarray  # [N, 3] float64
    field: dict[str, Any] | None  # PointDistanceField's arrays (see _merged_field)
    stamp: Any  # the cloud's header stamp (builtin_interfaces/Time), which ~/obstacle_points repeats
    received_ns: int  # time.monotonic_ns() when the message arrived, to measure the intake's latency


@dataclass(frozen=True)
class IntakeReady:
    """Intake -> node: its subscriptions exist (the node creates its services only then, so that a client
    that finds the services finds the topics' subscriber too)."""


@dataclass(frozen=True)
class IntakeSetUp:
    """Intake -> node: frames, workspace and self-filter are set up (torch imported), so messages are applied
    as they come from now on (the node's engines report ready only then; see MaceNode._wait_for_intake)."""


@dataclass(frozen=True)
class JointStateUpdate:
    """Intake -> node: the arm's positions of a batch of /joint_states messages, oldest first."""

    stamps_ns: np.ndarray  # [n] int64
    positions: np.ndarray  # [n, 7]


@dataclass(frozen=True)
class ContactsUpdate:
    """Intake -> node: one ~/contacts message in the base frame (no rows: clear the contacts)."""

    contacts: np.ndarray  # [k, 3]
    directions: np.ndarray  # [k, 3] finger travel directions, zero rows = none


@dataclass(frozen=True)
class MarkerUpdate:
    """Intake -> node: one ~/obstacles message as ObstacleModel operations."""

    operations: list


class IntakeNode(Node):
    """The intake process's node (named <node>_intake beside the `mace` node).

    Its clouds are taken by a node of their own, `cloud_node` (<node>_intake_clouds), spun by one thread
    (run_intake): a 640 x 480 stream applied 12.6 clouds/s instead of 7.6 (bench/cloud_stream.py, idle).
    Taken by the multi-threaded executor, each 10 MB cloud was copied in whichever of its threads was free,
    from whichever malloc arena that thread had, and the pages of one arena's freed copies were returned to
    the system and faulted in again in another's (a fifth of the intake's CPU time in the kernel); and its
    Python wait loop, woken by every cloud and every finished callback, took another fifth of a core.
    Joint states come at a controller's rate (up to 1 kHz): a third node, `joint_node` (<node>_intake_joints),
    which no executor spins, and PolledSubscription's thread take them in batches.
    """

    def __init__(self, settings: IntakeSettings, send: Callable[[Any], None]) -> None:
        super().__init__(settings.node_name, namespace=settings.namespace,
                         parameter_overrides=[Parameter("use_sim_time", value=settings.use_sim_time)])
        self._settings = settings
        self._send = send
        self.cloud_settings = CloudSettings(settings.voxel_size_m, settings.self_filter_padding_m, settings.point_subsample)
        self.field_settings: FieldSettings | None = None
        self._clouds: dict[str, np.ndarray] = {}  # the latest cloud of each sensor, as sent to the node
        # Subscribed at once; what arrives before _set_up has run waits for it (see the callbacks).
        self._ready = threading.Event()
        self._early_joint_states: deque[JointState] = deque(maxlen=EARLY_JOINT_STATES)
        self._early_lock = threading.Lock()
        # Marker and contacts callbacks that waited for the set-up; it is announced once they have sent their results.
        self._early_callbacks = 0
        self._early_callbacks_done = threading.Condition()
        self._pending: dict[str, tuple[PointCloud2, int]] = {}  # each sensor's latest unprocessed cloud
        self._restored: dict[str, np.ndarray] = {}  # the node's clouds (SensorClouds), for the processing thread
        self._rejections = KeyedThrottle(WARNING_PERIOD_S)  # warnings of rejected clouds and contacts
        self._pending_changed = threading.Condition()
        self.create_subscription(
            MarkerArray, settings.markers_topic, self.on_obstacles, 10, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_subscription(
            PoseArray, settings.contacts_topic, self.on_contacts, 10, callback_group=MutuallyExclusiveCallbackGroup())
        # Clouds on their own node, with the QoS re-matching timer that replaces their subscription. It reads no
        # clock (clouds carry their stamps), so it keeps the wall clock: with use_sim_time it would take every
        # /clock message (1 kHz from a simulator) in the cloud thread too.
        self.cloud_node = Node(f"{settings.node_name}_clouds", namespace=settings.namespace, start_parameter_services=False)
        self._cloud_topic = settings.cloud_topic
        self._cloud_reliable = False
        self._cloud_subscription = self._subscribe_cloud(self._cloud_reliable)
        # On the steady clock, as the node's own timer (with use_sim_time, no /clock: a ROS-time timer never fires).
        self.cloud_node.create_timer(CLOUD_QOS_CHECK_PERIOD_S, self._match_cloud_publishers, clock=Clock(clock_type=ClockType.STEADY_TIME))
        threading.Thread(target=self._process_clouds, name="intake-clouds", daemon=True).start()
        # Joint states in batches, by a thread of their own, on a node no executor spins (see PolledSubscription).
        self.joint_node = Node(f"{settings.node_name}_joints", namespace=settings.namespace, start_parameter_services=False)
        self.joint_state_polling = PolledSubscription(
            self.joint_node, JointState, settings.joint_states_topic, JOINT_STATES_QOS, JOINT_STATES_PERIOD_S,
            self.on_joint_states, "intake-joint-states")

    def _set_up(self) -> None:
        """The frames, workspace and self-filter (imports torch), then the joint states that came meanwhile."""
        from mace_ros.ros import conversions
        from mace_ros.ros.frames import FrameTable, RobotFrames, Tf2Frames
        from mace_ros.ros.obstacles import SelfFilter, Workspace

        settings = self._settings
        self.names = conversions.RobotNames(settings.robot_prefix)
        self.robot = RobotFrames()
        self.frames = FrameTable.for_robot(
            settings.base_frame, settings.static_transforms, settings.attached_frames, self.names.to_ros,
            self.names.to_core, self.robot, Tf2Frames.create(self, settings.base_frame))
        self.workspace = Workspace.from_bounds(list(settings.workspace_min_m), list(settings.workspace_max_m))
        self.self_filter = SelfFilter()
        self._voxelizer = None  # CloudVoxelizer for the current voxel size, used by the processing thread only
        with self._early_callbacks_done:
            with self._early_lock:  # in order: a state older than the history's latest would reset it
                self._record_joint_states(list(self._early_joint_states))
                self._early_joint_states.clear()
                self._ready.set()
            # The node's engines report ready on IntakeSetUp: markers and contacts published before it must be in
            # the node's model first (a GetIK at start-up was solved through a cube published at start-up).
            self._early_callbacks_done.wait_for(lambda: self._early_callbacks == 0, EARLY_CALLBACKS_WAIT_S)
        self._send(IntakeSetUp())

    @contextmanager
    def _after_set_up(self) -> Iterator[None]:
        """Holds a marker or contacts callback until the intake has set up, and the set-up's announcement until
        such a held callback has sent its result."""
        with self._early_callbacks_done:
            early = not self._ready.is_set()
            self._early_callbacks += early
        self._ready.wait()  # holds only this callback's group while the intake sets up
        try:
            yield
        finally:
            if early:
                with self._early_callbacks_done:
                    self._early_callbacks -= 1
                    self._early_callbacks_done.notify_all()

    def on_joint_states(self, messages: list[JointState]) -> None:
        if not self._ready.is_set():
            with self._early_lock:
                if not self._ready.is_set():
                    self._early_joint_states.extend(messages)
                    return
        self._record_joint_states(messages)

    def _record_joint_states(self, messages: list[JointState]) -> None:
        """Into this process's history (self-filter, cloud frames), and to the node (request frames) in one update."""
        from mace_ros.ros import conversions

        warning, stamps_ns, positions = "", [], []
        now_ns = self.get_clock().now().nanoseconds
        for message in messages:
            try:
                entry = conversions.joint_state_entry(message, self.names, now_ns)
            except ValueError as error:
                warning = str(error)
                continue
            if entry is not None:
                self.robot.joint_states.add(*entry)
                stamps_ns.append(entry[0])
                positions.append(entry[1])
        if stamps_ns:
            self._send(JointStateUpdate(np.array(stamps_ns, dtype=np.int64), np.stack(positions)))
        if warning:
            self.get_logger().warning(warning, throttle_duration_sec=WARNING_PERIOD_S)

    def _subscribe_cloud(self, reliable: bool):
        """Reliable or best effort, keeping a few clouds: one topic's history is shared by all its
        publishers, and with keep-last-1 one camera's clouds could displace another's every time."""
        reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        return self.cloud_node.create_subscription(
            PointCloud2, self._cloud_topic, self.on_obstacle_cloud, QoSProfile(depth=CLOUD_HISTORY_DEPTH, reliability=reliability))

    def _warn_rejected(self, source: str, error: Exception) -> None:
        """A warning for a rejected message, throttled per source and kind of problem (its text without numbers)."""
        if self._rejections.due((source, re.sub(r"\d+", "#", str(error)))):
            self.get_logger().warning(f"{source} rejected: {error}")

    def on_obstacle_cloud(self, cloud: PointCloud2) -> None:
        """Keeps the cloud as its sensor's (frame_id's) latest, replacing one still waiting, for the
        processing thread: the queue never holds stale clouds, and every sensor gets its turn."""
        with self._pending_changed:
            self._pending.pop(cloud.header.frame_id, None)  # re-inserted last: sensors are served in arrival order
            self._pending[cloud.header.frame_id] = (cloud, time.monotonic_ns())
            self._pending_changed.notify()

    def restore_clouds(self, clouds: dict[str, np.ndarray]) -> None:
        """The node's clouds (SensorClouds), taken in by the processing thread before its next cloud."""
        with self._pending_changed:
            self._restored = clouds

    def _process_clouds(self) -> None:
        """The processing thread: sets the intake up, then the longest-waiting sensor's latest cloud, one at a time."""
        os.nice(INTAKE_NICENESS)  # this thread only (see run_intake)
        self._set_up()
        while True:
            with self._pending_changed:
                self._pending_changed.wait_for(lambda: bool(self._pending))
                sensor = next(iter(self._pending))
                cloud, received_ns = self._pending.pop(sensor)
                restored, self._restored = self._restored, {}
            for name, points in restored.items():
                self._clouds.setdefault(name, points)  # a cloud this process has processed since is newer
            try:
                self.process_cloud(cloud, received_ns)
            except Exception as error:  # a bad cloud must not end the thread
                self.get_logger().error(f"{self._cloud_topic} from '{sensor}' not processed: {type(error).__name__}: {error}")

    def _match_cloud_publishers(self) -> None:
        """Subscribe reliably when every cloud publisher is reliable, best effort otherwise.

        A camera cloud (~10 MB at 640 x 480) crosses Fast DDS's shared memory in many fragments; over
        best effort one lost fragment loses the cloud, and in a busy process nearly all are lost
        (measured: 0-4 of 20 arrive), while a reliable reader resends them (20 of 20). But a reliable
        reader never matches a best-effort writer, so the reliability follows the publishers (as
        `ros2 bag record` adapts its QoS).
        """
        publishers = self.cloud_node.get_publishers_info_by_topic(self._cloud_subscription.topic_name)
        reliable = bool(publishers) and all(
            publisher.qos_profile.reliability == ReliabilityPolicy.RELIABLE for publisher in publishers)
        if reliable != self._cloud_reliable:
            self.cloud_node.destroy_subscription(self._cloud_subscription)
            self._cloud_reliable = reliable
            self._cloud_subscription = self._subscribe_cloud(reliable)
            self.get_logger().info(f"{self._cloud_topic}: subscribed {'reliable' if reliable else 'best effort'} to match its publishers")

    def process_cloud(self, cloud: PointCloud2, received_ns: int) -> None:
        """The cloud in the base frame (at its stamp), cropped to the workspace, thinned, without the robot's
        points, becomes its sensor's (frame_id's) contribution to the obstacle model."""
        from mace_ros.ros import conversions
        from mace_ros.ros.frames import JOINT_STATE_HISTORY_S
        from mace_ros.ros.obstacles import CloudVoxelizer

        sensor, stamp_ns = cloud.header.frame_id, conversions.stamp_to_ns(cloud.header.stamp)
        settings = self.cloud_settings
        if self._voxelizer is None or self._voxelizer.voxel_size_m != settings.voxel_size_m:
            self._voxelizer = CloudVoxelizer(self.workspace, settings.voxel_size_m)
        try:
            cropped = self._voxelizer.voxelize(conversions.pointcloud2_xyz(cloud, settings.point_subsample),
                                               self.frames.to_base(sensor, stamp_ns))
        except ValueError as error:  # UnknownFrameError included
            self._warn_rejected(f"{self._cloud_topic} from '{sensor}'", error)
            return
        if cropped.outside:
            self.get_logger().info(
                f"{self._cloud_topic} from '{sensor}': dropped {cropped.outside} of {cropped.outside + cropped.inside} points "
                f"outside the workspace {self.workspace.low.tolist()} .. {self.workspace.high.tolist()} m",
                throttle_duration_sec=WARNING_PERIOD_S)
        points = cropped.points
        closest = self.robot.joint_states.closest(stamp_ns)
        if closest is None:
            self.get_logger().warning(
                f"{self._cloud_topic}: no {self._settings.joint_states_topic} yet, so the robot's own points are not filtered out",
                throttle_duration_sec=WARNING_PERIOD_S)
        else:
            state_stamp_ns, positions = closest
            gap_s = (stamp_ns - state_stamp_ns) * 1e-9  # an unstamped cloud (0) takes the latest state by design
            if stamp_ns and abs(gap_s) > JOINT_STATE_GAP_WARNING_S and self._rejections.due((sensor, "joint state gap")):
                self.get_logger().warning(
                    f"{self._cloud_topic} from '{sensor}' is stamped {gap_s:+.3f} s from the nearest "
                    f"{self._settings.joint_states_topic} kept (the last {JOINT_STATE_HISTORY_S:g} s): the robot's points "
                    f"are filtered out, and robot-attached frames placed, at that state; if the arm moved meanwhile, check "
                    f"that the camera's and the robot's clocks agree")
            if points.shape[0]:
                points = points[self.self_filter.keep(points, self.robot.link_transforms(positions), settings.self_filter_padding_m)]
        if points.shape[0]:
            self._clouds[sensor] = points
        else:
            self._clouds.pop(sensor, None)
        self._send(CloudUpdate(sensor, points, self._merged_field(), cloud.header.stamp, received_ns))

    def _merged_field(self) -> dict[str, Any] | None:
        """The distance field of the model's cloud as the node will hold it: the static scene's points,
        then each sensor's by name (ObstacleModel.snapshot's order), built as the IK engine would."""
        import torch

        from mace_ros.core.collision import PointDistanceField

        settings = self.field_settings
        if settings is None:
            return None  # the engine is not loaded yet: its first request builds the field
        parts = [settings.static_points] if settings.static_points is not None else []
        parts += [self._clouds[name] for name in sorted(self._clouds)]
        if not parts:
            return None
        points = np.concatenate(parts)
        field = PointDistanceField.build(points, settings.resolution_m, settings.truncation_m, torch.device("cpu"),
                                         getattr(torch, settings.dtype), threads=FIELD_BUILD_THREADS)
        return {"origin": field.origin.numpy(), "resolution_m": field.resolution_m, "values": field.values.numpy(),
                "truncation_m": field.truncation_m, "built_for": (settings.resolution_m, settings.truncation_m),
                "digest": PointDistanceField.points_digest(points)}

    def on_contacts(self, message: PoseArray) -> None:
        with self._after_set_up():
            self._send_contacts(message)

    def _send_contacts(self, message: PoseArray) -> None:
        """Fingertip contacts in the base frame, with their fingers' travel directions, for the node:
        positions are the contacts, each pose's +z axis its finger's travel direction (identity
        orientation = no direction; conversions.contact_travel_directions)."""
        from mace_ros.ros import conversions

        try:
            # at its stamp: a grasp reported in the hand's frame is placed where the hand was then
            to_base = self.frames.to_base(message.header.frame_id, conversions.stamp_to_ns(message.header.stamp))
            contacts = to_base.apply(conversions.points_to_array([pose.position for pose in message.poses], "contacts"))
            directions = conversions.contact_travel_directions(message.poses) @ to_base.rotation.T
        except ValueError as error:
            self._warn_rejected(self._settings.contacts_topic, error)
            return
        self._send(ContactsUpdate(contacts, directions))

    def on_obstacles(self, message: MarkerArray) -> None:
        with self._after_set_up():
            self._send_markers(message)

    def _send_markers(self, message: MarkerArray) -> None:
        """Markers become the model's primitives; what is ignored is logged once per message, throttled."""
        from mace_ros.ros import conversions

        operations: list = []
        outside, invalid, first_error = 0, 0, ""
        transforms: dict[tuple[str, int], Any] = {}  # per (frame_id, stamp): a message's markers share a few
        for marker in message.markers:
            try:
                if marker.action == Marker.DELETEALL:
                    operations.append(("clear", marker.ns, None, 0))
                elif marker.action == Marker.DELETE:
                    operations.append(("remove", conversions.marker_key(marker), None, 0))
                elif marker.action == Marker.ADD:
                    frame = (marker.header.frame_id, conversions.stamp_to_ns(marker.header.stamp))
                    if frame not in transforms:
                        transforms[frame] = self.frames.to_base(*frame)
                    primitive = conversions.marker_to_primitive(marker, transforms[frame])
                    if self.workspace.meets(primitive):
                        operations.append(("put", conversions.marker_key(marker), primitive, conversions.marker_lifetime_ns(marker)))
                    else:  # beyond the robot's reach; one that moved out is removed
                        operations.append(("remove", conversions.marker_key(marker), None, 0))
                        outside += 1
                else:
                    raise ValueError(f"marker action {marker.action} is not ADD, DELETE or DELETEALL")
            except (ValueError, ImportError) as error:
                invalid += 1
                first_error = first_error or f"{conversions.marker_key(marker)}: {error}"
                if marker.action == Marker.ADD:  # as rviz replaces a key's marker: its old obstacle is not meant any more
                    operations.append(("remove", conversions.marker_key(marker), None, 0))
        # In pieces: unpickling one message holds the node's GIL, and 5000 primitives took ~0.1-0.2 s.
        for start in range(0, len(operations), MARKER_OPERATIONS_PER_UPDATE):
            self._send(MarkerUpdate(operations[start:start + MARKER_OPERATIONS_PER_UPDATE]))
        count = len(message.markers)
        if invalid:
            self.get_logger().warning(
                f"{self._settings.markers_topic}: ignored {invalid} of {count} marker(s) as invalid, e.g. {first_error}",
                throttle_duration_sec=WARNING_PERIOD_S)
        if outside:
            self.get_logger().info(
                f"{self._settings.markers_topic}: ignored {outside} of {count} marker(s) entirely outside the workspace "
                f"{self.workspace.low.tolist()} .. {self.workspace.high.tolist()} m", throttle_duration_sec=WARNING_PERIOD_S)


def run_intake(connection: Connection, node_pid: int) -> None:
    """The intake process: receives its IntakeSettings, then its node spins until the node's end of
    `connection` closes (the node exited) or the node (process `node_pid`, which started this one) is gone."""
    import rclpy
    from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor

    # Ctrl-C reaches the whole process group: the node decides when this process ends, so a SIGINT
    # here must not print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def leave() -> None:
        """Stops the executor: its thread then deletes the node and ends the process (below), or a timer
        does after EXIT_DEADLINE_S, whatever rclpy does meanwhile."""
        exit_timer = threading.Timer(EXIT_DEADLINE_S, os._exit, args=(0,))
        exit_timer.daemon = True
        exit_timer.start()
        rclpy.try_shutdown()

    def watch_node() -> None:
        # The node's pid comes from the node: an intake whose node died before this line (a node stopped as
        # it restarted its intake) read its parent as init's, and outlived it taking a core (seen once).
        while os.getppid() == node_pid:  # re-parented: the node died without closing its end
            time.sleep(PARENT_CHECK_PERIOD_S)
        leave()

    threading.Thread(target=watch_node, name="intake-watch", daemon=True).start()
    bound_malloc(INTAKE_MMAP_THRESHOLD_BYTES)  # this process handles the camera clouds (see mace_ros/ros/memory.py)
    settings: IntakeSettings = connection.recv()
    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            connection.send(message)

    # Fast DDS's transports stay what the user's environment says. Forcing LARGE_DATA here (it once took more
    # camera clouds) left this process unable to discover participants on the default transports under
    # ROS_LOCALHOST_ONLY=1 or the default discovery range: every input topic went silently dead.
    rclpy.init(args=[], signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    node = IntakeNode(settings, send)
    send(IntakeReady())
    # Requests before obstacles: where cores are short, the intake's work (a 200k-point cloud's field
    # takes a core for a second) must not delay the serving process (3-4 s late answers without this).
    # Linux priorities are per thread: the DDS threads, created with the node above, keep the normal
    # one, so that a camera cloud's fragments are taken as they come.
    os.nice(INTAKE_NICENESS)  # this thread, and the executors' threads it starts below

    def receive() -> None:
        try:
            while True:
                message = connection.recv()
                if isinstance(message, FieldSettings):
                    node.field_settings = message
                elif isinstance(message, CloudSettings):
                    node.cloud_settings = message
                elif isinstance(message, SensorClouds):
                    node.restore_clouds(message.clouds)
        except (EOFError, OSError):
            pass
        leave()  # the node is gone: nothing left to serve

    def spin(executor: Executor) -> None:
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass

    threading.Thread(target=receive, name="intake-receive", daemon=True).start()
    executor = MultiThreadedExecutor(num_threads=INTAKE_EXECUTOR_THREADS)
    executor.add_node(node)
    cloud_executor = SingleThreadedExecutor()  # every cloud taken by one thread (see IntakeNode)
    cloud_executor.add_node(node.cloud_node)
    freeze_loaded_objects(INTAKE_GC_THRESHOLDS)  # rclpy, torch and the node, before the first message
    cloud_thread = threading.Thread(target=spin, args=(cloud_executor,), name="intake-cloud-take", daemon=True)
    cloud_thread.start()
    spin(executor)
    cloud_thread.join(EXIT_GRACE_S)  # both executors stop with the context
    # Fast DDS removes the participant's shared-memory files (/dev/shm/fastdds_*) only once the nodes'
    # entities are gone, which they cannot be while an executor waits on them: each run left ~1 MB there.
    node.joint_state_polling.destroy(EXIT_GRACE_S / 2)
    node.joint_node.destroy_node()
    node.cloud_node.destroy_node()
    node.destroy_node()
    rclpy.try_shutdown()
    os._exit(0)  # no executor thread to join


class ObstacleIntake:
    """The node's side of its intake process: starts it (again, should it die), keeps it informed of
    settings, and hands every update it sends to `on_update`, in a thread of its own.

    The process is `python -m mace_ros.ros.intake <fd> <node pid>` with one end of a socket pair: it imports only
    what it needs (multiprocessing's spawn would first re-import the node's own script).
    """

    def __init__(self, settings: IntakeSettings, on_update: Callable[[Any], None], sensor_clouds: Callable[[], SensorClouds],
                 logger) -> None:
        self._settings = settings
        self._on_update = on_update
        self._sensor_clouds = sensor_clouds
        self._logger = logger
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._latest: dict[type, Any] = {}  # the latest message of each kind, sent again to a restarted process
        self.subscribed = threading.Event()  # set once the (first) intake process has subscribed
        self.set_up = threading.Event()  # set once it has also set up (IntakeSetUp)
        threading.Thread(target=self._serve, name="obstacle-intake", daemon=True).start()

    def send(self, message: FieldSettings | CloudSettings) -> None:
        with self._lock:
            self._latest[type(message)] = message
            if self._connection is not None:
                try:
                    self._connection.send(message)
                except OSError:
                    pass  # the process died; _serve restarts it with the latest settings

    def _start(self) -> tuple[subprocess.Popen, Connection]:
        node_end, intake_end = socket.socketpair()
        # The intake imports mace_ros as this process does, wherever that came from; -P keeps `-m` from
        # putting the working directory first (launched from a source checkout, that checkout's mace_ros
        # ran instead of the installed one).
        environment = {**with_huge_page_malloc(without_reply_buffer_settings(dict(os.environ), config_dir())),
                       "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        environment.setdefault("OPENBLAS_NUM_THREADS", INTAKE_BLAS_THREADS)
        process = subprocess.Popen([sys.executable, "-P", "-m", __name__, str(intake_end.fileno()), str(os.getpid())],
                                   pass_fds=[intake_end.fileno()], env=environment)
        intake_end.close()
        connection = Connection(node_end.detach())
        connection.send(self._settings)
        return process, connection

    def _serve(self) -> None:
        while True:
            process, connection = self._start()
            with self._lock:
                self._connection = connection
                for message in self._latest.values():
                    connection.send(message)
                connection.send(self._sensor_clouds())
            try:
                while True:
                    update = connection.recv()
                    if isinstance(update, IntakeReady):
                        self.subscribed.set()
                        continue
                    if isinstance(update, IntakeSetUp):
                        self.set_up.set()
                        continue
                    try:
                        self._on_update(update)
                    except Exception as error:  # one bad update must not stop the intake
                        self._logger.error(f"obstacle update not applied: {type(error).__name__}: {error}")
            except (EOFError, OSError):
                pass
            with self._lock:
                self._connection = None
            connection.close()
            try:
                code = process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            self._logger.error(f"the obstacle intake process exited (code {code}); starting it again in {RESTART_DELAY_S} s")
            time.sleep(RESTART_DELAY_S)


if __name__ == "__main__":
    # Through the importable module, not this __main__ copy: messages pickle by their classes' module.
    from mace_ros.ros import intake

    intake.run_intake(Connection(int(sys.argv[1])), int(sys.argv[2]))
