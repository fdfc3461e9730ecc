"""Reliability of the installed node under fuzzed requests and topic abuse (issue 7, item 9).

Starts install/mace_ros/lib/mace_ros/mace_node (localhost-only DDS, a random ROS_DOMAIN_ID) and sends
it, one at a time, fuzzed GetIK and InferShape requests: NaN/inf, huge and tiny values, bad frames
and tip links, absurd counts and timeouts, malformed seeds and partial clouds, and random valid ones
with short timeouts. Between requests, spread evenly, a process of its own publishes topic abuse:
malformed, far, huge (200k points) and camera-sized (640 x 480, 32-byte points) obstacle clouds,
marker floods (5000) and garbage markers, garbage and valid /joint_states, garbage contacts. Before
the measured run, a warm-up sends the largest answers and messages a few times (see warm_up).

Reports answers by error code (per service and per category), crashes (the node process died; it is
restarted, up to --max-restarts), requests left unanswered, "engine error" messages (an input that
reached an engine and broke it), p50/p95 latency (client round trip), deadline violations (an answer
later than its timeout_s + 0.1 s; timeout_s 0 or invalid means the configured default), the node's
RSS over time (VmRSS of the node and its child processes, the obstacle intake included, and their
RssAnon: growth there is the heap's, not libraries' pages first touched late) and how long
it took to exit on SIGINT. A probe process that only sleeps records when the machine itself stalled
(and /proc/stat the hypervisor's steal time), so that each late answer shows whether it overlapped one.

    set +u; source install/setup.bash; set -u
    .venv/bin/python bench/reliability.py --requests 10000      # -> bench/results/reliability.json
    .venv/bin/python bench/reliability.py --requests 300 --out out/reliability_small.json   # a quick check

Every loop is bounded by a count and by --seconds. Run it with install/setup.bash sourced and without
PYTHONPATH=. (only the installed mace_ros holds the generated service types).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from geometry_msgs.msg import Point, Pose, PoseArray, Quaternion, Vector3
from rclpy.qos import QoSProfile
from sensor_msgs.msg import JointState, PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, PandaKinematics, matrix_to_quaternion
from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
from mace_ros.ros.parameters import default_parameters_file, load_defaults
from mace_ros.ros.requests import MAX_NUM_SOLUTIONS, MAX_SHAPE_SAMPLES
from mace_ros.srv import GetIK, InferShape

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_SLACK_S = 0.1
CLIENT_GRACE_S = 30.0  # beyond its deadline, a request counts as unanswered
WARMUP_ROUNDS = 12  # above the depth of the topics' histories the largest messages pass through (10; the services' free each sample)
BASE = "panda_link0"
ARM_JOINTS = [f"panda_joint{i}" for i in range(1, 8)]
ABSURD = [1e300, -1e308, 1e-300, 5e-324, 1e10, -1e6, 1e4, 3.4e38]
NONFINITE = [math.nan, math.inf, -math.inf]
BAD_FRAMES = ["world", "camera_color_optical_frame", "/panda_link0/", "panda_link0 ", "fr3_link0", "ñ/…/∞",
              "x" * 10000, "panda_link0\x00"]
UINT32_MAX, INT32_MIN, INT32_MAX = 2**32 - 1, -2**31, 2**31 - 1


def error_names(response_type: type) -> dict[int, str]:
    return {getattr(response_type, name): name for name in dir(response_type)
            if name.isupper() and isinstance(getattr(response_type, name), int)}


def sizes(request: GetIK.Request | InferShape.Request) -> dict[str, int]:
    """The request's size fields, to tell which sizes miss their deadline."""
    fields = {name: getattr(request, name) for name in ("num_solutions", "num_samples", "tuning_iterations")
              if hasattr(request, name)}
    if isinstance(request, InferShape.Request):
        fields |= {"contacts": len(request.contacts), "partial_cloud_points": request.partial_cloud.width}
    return fields


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A memory figure of /proc/PID/status, MB: VmRSS, or RssAnon (the heap and other private memory,
    without the file-backed pages of libraries, which grow as new code paths are first run)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:  # the process exited
        return None
    return None


def node_rss_mb(pid: int, field: str = "VmRSS") -> tuple[float, float] | None:
    """VmRSS (or another rss_mb field) of the node and of its child processes (its obstacle intake), MB."""
    own = rss_mb(pid, field)
    if own is None:
        return None
    pids = []
    try:  # children are listed per thread: the intake is started by one of the node's threads
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += (task / "children").read_text().split()
    except OSError:  # the process or a thread exited meanwhile
        pass
    return own, sum(rss_mb(int(child), field) or 0.0 for child in pids)


class RssSampler(threading.Thread):
    """VmRSS of the current node process and its children every `interval_s`, as (seconds since start,
    total MB, node MB, children MB, node RssAnon MB, children RssAnon MB)."""

    def __init__(self, pid: Callable[[], int], interval_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, ...]] = []
        self.stopped = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            value, anonymous = node_rss_mb(self.pid()), node_rss_mb(self.pid(), "RssAnon")
            if value is not None and anonymous is not None:
                own, children = value
                self.samples.append((round(time.monotonic() - self.start_time, 1), round(own + children, 1), round(own, 1),
                                     round(children, 1), round(anonymous[0], 1), round(anonymous[1], 1)))


# A process of its own that only sleeps PROBE_PERIOD_S at a time, at the node's priority: when it wakes
# much later than asked, the whole machine (2 vCPUs: the node, its intake, this client and the traffic
# process, or the hypervisor) stalled, whatever the node did. Times are CLOCK_MONOTONIC, system-wide.
PROBE_PERIOD_S = 0.005
PROBE_REPORT_S = 0.03
STALL_PROBE = f"""
import sys, time
while True:
    before = time.monotonic()
    time.sleep({PROBE_PERIOD_S})
    late = time.monotonic() - before - {PROBE_PERIOD_S}
    if late > {PROBE_REPORT_S}:
        print(f"{{before + {PROBE_PERIOD_S}:.4f}} {{late:.4f}}", flush=True)
"""


class StallProbe:
    """Wake-up delays of an otherwise idle process, as (due, late) in time.monotonic() seconds."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []
        self.process = subprocess.Popen([sys.executable, "-c", STALL_PROBE], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            due, late = map(float, line.split())
            self.stalls.append((due, late))

    def overlapping(self, begin: float, end: float) -> float:
        """The longest stall that overlapped [begin, end]."""
        return max((late for due, late in self.stalls if due < end and due + late > begin), default=0.0)

    def close(self) -> dict[str, Any]:
        self.process.terminate()
        self.process.wait(10.0)
        lates = [late for _, late in self.stalls]
        return {"period_s": PROBE_PERIOD_S, "over_0.05_s": sum(late > 0.05 for late in lates),
                "over_0.1_s": sum(late > 0.1 for late in lates), "longest_s": round(max(lates, default=0.0), 3)}


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to others while this VM wanted it (/proc/stat's steal column)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---- clouds -------------------------------------------------------------------------------------

def xyz_cloud(points: np.ndarray, frame: str = BASE, dtype: type = np.float32) -> PointCloud2:
    """An unorganized cloud of x, y, z fields of `dtype` (float32 or float64)."""
    with np.errstate(over="ignore"):  # absurd values become inf in float32, as a sensor driver's would
        points = np.ascontiguousarray(points, dtype=dtype)
    size = np.dtype(dtype).itemsize
    datatype = PointField.FLOAT32 if size == 4 else PointField.FLOAT64
    cloud = PointCloud2(header=Header(frame_id=frame), height=1, width=len(points), point_step=3 * size,
                        is_dense=False)
    cloud.row_step = cloud.point_step * cloud.width
    cloud.fields = [PointField(name=n, offset=i * size, datatype=datatype, count=1) for i, n in enumerate("xyz")]
    cloud.data = points.tobytes()
    return cloud


def camera_cloud(rng: np.random.Generator, width: int = 640, height: int = 480) -> PointCloud2:
    """An organized depth-camera cloud as drivers send it: x, y, z, rgb float32 in 32-byte points (padding),
    a table top 0.2-1.2 m ahead with 5 % invalid (NaN) pixels and 1 % far background (up to 10 m)."""
    dtype = np.dtype({"names": ["x", "y", "z", "rgb"], "formats": ["<f4"] * 4, "offsets": [0, 4, 8, 16], "itemsize": 32})
    points = np.zeros(height * width, dtype)
    points["x"] = rng.uniform(0.2, 1.2, points.size)
    points["y"] = rng.uniform(-0.6, 0.6, points.size)
    points["z"] = rng.normal(0.0, 0.002, points.size)
    far = rng.random(points.size) < 0.01
    points["x"][far] = rng.uniform(2.0, 10.0, far.sum())
    invalid = rng.random(points.size) < 0.05
    for name in "xyz":
        points[name][invalid] = np.nan
    cloud = PointCloud2(header=Header(frame_id=BASE), height=height, width=width, point_step=32,
                        row_step=32 * width, is_dense=False)
    cloud.fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
                    for n, o in (("x", 0), ("y", 4), ("z", 8), ("rgb", 16))]
    cloud.data = points.tobytes()
    return cloud


def malformed_cloud(rng: random.Random, frame: str = BASE) -> PointCloud2:
    """A PointCloud2 that breaks one rule of the format, or carries garbage values."""
    good = xyz_cloud(np.full((20, 3), [0.5, 0.0, 0.1]), frame)
    kind = rng.randrange(11)
    if kind == 0:  # no z field
        good.fields = good.fields[:2]
    elif kind == 1:  # data shorter than width * point_step
        good.data = bytes(good.data)[:17]
    elif kind == 2:  # a field beyond the point
        good.fields[2].offset = 40
    elif kind == 3:  # absurd dimensions over tiny data
        good.width, good.height = UINT32_MAX, UINT32_MAX
    elif kind == 4:  # row_step disagreeing with width
        good.row_step = 7
    elif kind == 5:  # unknown datatype
        good.fields[0].datatype = rng.choice([0, 9, 255])
    elif kind == 6:  # field counts of 0 or several
        good.fields[0].count = rng.choice([0, 5, UINT32_MAX])
    elif kind == 7:  # the same field twice
        good.fields = [good.fields[0], good.fields[0], good.fields[1], good.fields[2]]
    elif kind == 8:  # point_step 0
        good.point_step = 0
    elif kind == 9:  # random bytes: NaN, inf, huge and denormal values
        good.data = rng.randbytes(len(good.data))
    else:  # integer fields
        for field in good.fields:
            field.datatype = PointField.INT8
    return good


# ---- requests -----------------------------------------------------------------------------------

class Fuzzer:
    """Requests and topic messages drawn from a seeded generator; each labelled with its category."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        # Reachable goals: hand poses of random configurations (whether collision-free or not).
        kinematics = PandaKinematics(dtype=torch.float64)
        q = kinematics.random_configurations(512, torch.Generator().manual_seed(seed))
        positions, rotations = kinematics.forward(q)
        self.goals = [(p.tolist(), matrix_to_quaternion(r).tolist()) for p, r in zip(positions, rotations)]
        self.camera = camera_cloud(self.np_rng)
        self.flood = self.marker_flood()

    def uniform(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def configuration(self) -> list[float]:
        return [self.uniform(lo, hi) for lo, hi in zip(JOINT_LOWER, JOINT_UPPER)]

    def valid_ik(self) -> GetIK.Request:
        position, (w, x, y, z) = self.rng.choice(self.goals)
        request = GetIK.Request()
        request.goal.header.frame_id = self.rng.choice([BASE, ""])
        request.goal.pose.position = Point(x=position[0], y=position[1], z=position[2])
        request.goal.pose.orientation = Quaternion(x=x, y=y, z=z, w=w)
        request.position_only = self.rng.random() < 0.2
        request.tip_link = self.rng.choice(["", "panda_hand", "panda_hand_tcp", "panda_link8"])
        request.num_solutions = self.rng.choice([0, 1, 4, 8])
        request.num_samples = self.rng.choice([0, 64, 256, 1024, 4096])
        request.tuning_iterations = self.rng.choice([-1, 0, 5, 30])
        request.timeout_s = self.rng.choice([0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
        if self.rng.random() < 0.3:
            request.seed_state = JointState(name=ARM_JOINTS, position=self.configuration())
        request.random_seed = self.rng.randrange(UINT32_MAX)
        return request

    def get_ik(self) -> tuple[str, GetIK.Request]:
        request = self.valid_ik()
        category = self.rng.choice(["valid", "valid", "nonfinite", "huge_tiny", "bad_frame", "absurd_counts",
                                    "bad_tip_link", "bad_seed"])
        pose = request.goal.pose
        if category == "nonfinite":
            target = self.rng.choice([pose.position, pose.orientation, request])
            attribute = {Point: "xyz", Quaternion: "xyzw"}.get(type(target), None)
            setattr(target, self.rng.choice(attribute) if attribute else "timeout_s", self.rng.choice(NONFINITE))
        elif category == "huge_tiny":
            choice = self.rng.randrange(4)
            if choice == 0:
                setattr(pose.position, self.rng.choice("xyz"), self.rng.choice(ABSURD + [5.0, -11.0]))
            elif choice == 1:
                pose.orientation = Quaternion(x=self.rng.choice(ABSURD), y=0.0, z=0.0, w=0.0)
            elif choice == 2:  # a quaternion with every component tiny, or zero
                tiny = self.rng.choice([0.0, 1e-300, 1e-20])
                pose.orientation = Quaternion(x=tiny, y=tiny, z=tiny, w=tiny)
            else:
                request.timeout_s = self.rng.choice([1e-300, 5e-324, 1e-9])
        elif category == "bad_frame":
            request.goal.header.frame_id = self.rng.choice(BAD_FRAMES)
        elif category == "absurd_counts":
            field, value = self.rng.choice([
                ("num_solutions", 1001), ("num_solutions", UINT32_MAX), ("num_samples", 100001),
                ("num_samples", UINT32_MAX), ("num_samples", 100000), ("tuning_iterations", -2),
                ("tuning_iterations", INT32_MIN), ("tuning_iterations", INT32_MAX), ("timeout_s", -1.0),
                ("timeout_s", 601.0), ("timeout_s", 1e9), ("random_seed", UINT32_MAX)])
            setattr(request, field, value)
        elif category == "bad_tip_link":
            request.tip_link = self.rng.choice(["nope", "panda_joint1", "fr3_hand", " panda_hand", "x" * 10000, "\x00"])
        elif category == "bad_seed":
            seed = self.configuration()
            request.seed_state = self.rng.choice([
                JointState(name=ARM_JOINTS, position=seed[:5]),
                JointState(name=ARM_JOINTS, position=[*seed[:6], self.rng.choice(NONFINITE + ABSURD)]),
                JointState(name=[f"j{i}" for i in range(7)], position=seed),
                JointState(name=[ARM_JOINTS[0]] * 7, position=seed),
                JointState(name=ARM_JOINTS, position=[value + 1.0 for value in seed]),
                JointState(position=[0.1] * 10000),
                JointState(name=ARM_JOINTS[:3], position=seed),
            ])
        return category, request

    def valid_shape(self) -> InferShape.Request:
        origin = np.array([self.uniform(0.4, 0.6), self.uniform(-0.2, 0.2), self.uniform(0.05, 0.3)])
        request = InferShape.Request()
        request.header.frame_id = self.rng.choice([BASE, ""])
        request.object_origin = Point(x=origin[0], y=origin[1], z=origin[2])
        # Grasps the default gripper (the Panda hand pointing down) makes: top-down with fingertips at +-y
        # (no directions needed), along x with each finger's travel direction, or both.
        top_down = [((0.0, 0.04), Vector3(y=-1.0)), ((0.0, -0.04), Vector3(y=1.0))]
        along_x = [((0.04, 0.0), Vector3(x=-1.0)), ((-0.04, 0.0), Vector3(x=1.0))]
        kind = self.rng.randrange(3)
        grasp = top_down if kind == 0 else along_x if kind == 1 else top_down + along_x
        request.contacts = [Point(x=origin[0] + dx, y=origin[1] + dy, z=origin[2]) for (dx, dy), _ in grasp]
        request.contact_directions = [] if kind == 0 else [direction for _, direction in grasp]
        if self.rng.random() < 0.3:
            points = origin + self.np_rng.normal(0.0, 0.03, (self.rng.choice([50, 500, 5000]), 3))
            request.partial_cloud = xyz_cloud(points, request.header.frame_id, self.rng.choice([np.float32, np.float64]))
        request.num_samples = self.rng.choice([0, 1, 4, 16, 64])
        request.tuning_iterations = self.rng.choice([-1, 0, 10, 100])
        request.timeout_s = self.rng.choice([0.1, 0.2, 0.3, 0.5, 1.0])
        request.random_seed = self.rng.randrange(UINT32_MAX)
        return request

    def infer_shape(self) -> tuple[str, InferShape.Request]:
        request = self.valid_shape()
        category = self.rng.choice(["valid", "valid", "nonfinite", "huge_tiny", "bad_frame", "absurd_counts",
                                    "bad_cloud", "no_observation"])
        if category == "nonfinite":
            choice = self.rng.randrange(3)
            if choice == 0:
                setattr(self.rng.choice(request.contacts), self.rng.choice("xyz"), self.rng.choice(NONFINITE))
            elif choice == 1:
                setattr(request.object_origin, self.rng.choice("xyz"), self.rng.choice(NONFINITE))
            else:
                points = np.full((20, 3), [0.5, 0.0, 0.1])
                points[self.rng.randrange(20), self.rng.randrange(3)] = self.rng.choice(NONFINITE)
                request.partial_cloud = xyz_cloud(points, request.header.frame_id, np.float64)
        elif category == "huge_tiny":
            choice = self.rng.randrange(3)
            if choice == 0:
                setattr(request.object_origin, self.rng.choice("xyz"), self.rng.choice(ABSURD + [11.0]))
            elif choice == 1:
                setattr(self.rng.choice(request.contacts), self.rng.choice("xyz"), self.rng.choice(ABSURD + [2.0]))
            else:
                request.timeout_s = self.rng.choice([1e-300, 5e-324, 1e-9])
        elif category == "bad_frame":
            if self.rng.random() < 0.5 or not request.partial_cloud.width:
                request.header.frame_id = self.rng.choice(BAD_FRAMES)
            else:
                request.partial_cloud.header.frame_id = self.rng.choice(BAD_FRAMES)
        elif category == "absurd_counts":
            field, value = self.rng.choice([
                ("num_samples", 1001), ("num_samples", UINT32_MAX), ("num_samples", 1000),
                ("tuning_iterations", -2), ("tuning_iterations", INT32_MIN), ("tuning_iterations", INT32_MAX),
                ("timeout_s", -1.0), ("timeout_s", 601.0), ("timeout_s", 1e9),
                ("contacts", [request.contacts[0]] * self.rng.choice([6, 1000]))])
            setattr(request, field, value)
        elif category == "bad_cloud":
            request.partial_cloud = malformed_cloud(self.rng, request.header.frame_id)
        elif category == "no_observation":
            request.contacts = []
        return category, request

    # ---- topics ---------------------------------------------------------------------------------

    def marker_flood(self, count: int = 5000) -> MarkerArray:
        """`count` small markers of every supported type, a third of them beyond the workspace."""
        markers = []
        for index in range(count):
            far = index % 3 == 0
            position = Point(x=self.uniform(2.0, 1e6) if far else self.uniform(-1.0, 1.0),
                             y=self.uniform(-1.0, 1.0), z=self.uniform(0.0, 1.0))
            markers.append(Marker(header=Header(frame_id=BASE), ns="flood", id=index, action=Marker.ADD,
                                  type=self.rng.choice([Marker.CUBE, Marker.SPHERE, Marker.CYLINDER]),
                                  pose=Pose(position=position, orientation=Quaternion(w=1.0))))
            markers[-1].scale.x = markers[-1].scale.y = markers[-1].scale.z = 0.02
        return MarkerArray(markers=markers)

    def garbage_marker(self) -> Marker:
        marker = Marker(header=Header(frame_id=self.rng.choice([BASE, BASE, *BAD_FRAMES])), ns=self.rng.choice(["g", ""]),
                        id=self.rng.randrange(INT32_MIN, INT32_MAX), type=self.rng.choice([0, 1, 2, 3, 4, 9, 11, 99]),
                        action=self.rng.choice([Marker.ADD, Marker.DELETE, Marker.DELETEALL, 7]),
                        pose=Pose(position=Point(x=0.5, z=0.2), orientation=Quaternion(w=1.0)))
        marker.scale.x = marker.scale.y = marker.scale.z = 0.1
        value = self.rng.choice(NONFINITE + ABSURD + [0.0, -1.0])
        target = self.rng.choice(["position", "orientation", "scale"])
        if target == "position":
            setattr(marker.pose.position, self.rng.choice("xyz"), value)
        elif target == "orientation":
            marker.pose.orientation = Quaternion(x=value, y=0.0, z=0.0, w=self.rng.choice([0.0, 1.0]))
        else:
            setattr(marker.scale, self.rng.choice("xyz"), value)
        return marker

    def joint_state(self, valid: bool) -> JointState:
        names = [*ARM_JOINTS, "panda_finger_joint1", "panda_finger_joint2"]
        if valid:
            return JointState(name=names, position=[*self.configuration(), 0.04, 0.04])
        return self.rng.choice([
            JointState(name=names, position=[self.rng.choice(NONFINITE + ABSURD)] * 9),
            JointState(name=names, position=[0.1] * 3),
            JointState(name=["foo", "bar"], position=[0.0, 1.0]),
            JointState(name=[f"joint{i}" for i in range(100000)], position=[0.0] * 100000),
            JointState(),
            JointState(name=names, position=self.configuration() + [0.0, 0.0], velocity=[math.nan] * 9, effort=[1e300] * 2),
            JointState(name=[ARM_JOINTS[0]] * 9, position=[0.0] * 9),
        ])

    def contacts(self) -> PoseArray:
        value = self.rng.choice(NONFINITE + ABSURD)
        return self.rng.choice([
            PoseArray(header=Header(frame_id=BASE), poses=[Pose(position=Point(x=value))]),
            PoseArray(header=Header(frame_id=BASE), poses=[Pose(position=Point(x=0.5))] * 10000),
            PoseArray(header=Header(frame_id=self.rng.choice(BAD_FRAMES)), poses=[Pose(position=Point(x=0.5))]),
            PoseArray(header=Header(frame_id=BASE)),
        ])

    def topic_message(self) -> tuple[str, str, Any]:
        """(kind, topic key, message): keys are 'cloud', 'markers', 'joint_states', 'contacts'."""
        kind = self.rng.choices(
            ["cloud_malformed", "cloud_far", "cloud_huge", "cloud_camera", "cloud_empty", "markers_flood",
             "markers_garbage", "joint_states_garbage", "joint_states_valid", "contacts_garbage"],
            weights=[3, 2, 1, 1, 1, 1, 3, 3, 3, 2])[0]
        if kind == "cloud_malformed":
            return kind, "cloud", malformed_cloud(self.rng, self.rng.choice([BASE, "camera_link"]))
        if kind == "cloud_far":
            table = np.column_stack([self.np_rng.uniform(0.3, 0.7, 200), self.np_rng.uniform(-0.2, 0.2, 200), np.zeros(200)])
            far = np.array([[self.rng.choice([8.0, 1e6, 1e30, 3e38, -1e300]), 0.0, 0.1]])
            return kind, "cloud", xyz_cloud(np.vstack([table, far]), dtype=self.rng.choice([np.float32, np.float64]))
        if kind == "cloud_huge":
            return kind, "cloud", xyz_cloud(self.np_rng.uniform(-3.0, 3.0, (200000, 3)))
        if kind == "cloud_camera":
            return kind, "cloud", self.camera
        if kind == "cloud_empty":
            return kind, "cloud", xyz_cloud(np.zeros((0, 3)))
        if kind == "markers_flood":
            return kind, "markers", self.flood
        if kind == "markers_garbage":
            return kind, "markers", MarkerArray(markers=[self.garbage_marker() for _ in range(self.rng.randint(1, 20))])
        if kind.startswith("joint_states"):
            return kind, "joint_states", self.joint_state(kind == "joint_states_valid")
        return kind, "contacts", self.contacts()


# ---- the run ------------------------------------------------------------------------------------

class NodeUnderTest:
    """The node under test and its client, restartable after a crash."""

    def __init__(self, arguments: list[str], isolation: dict[str, str], log_path: Path) -> None:
        self.arguments, self.isolation = arguments, isolation
        self.start(log_path)

    def start(self, log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("w")
        self.process = NodeProcess(installed_executable(), self.arguments, env=self.isolation, log=self.log)
        self.client = MaceClient("mace_reliability")

    def topics(self) -> dict[str, str]:
        """The abused topics by key, as the node resolves them."""
        return {"cloud": self.client.topic("obstacle_cloud"), "markers": self.client.topic("obstacles"),
                "joint_states": "/joint_states", "contacts": self.client.topic("contacts")}

    def ready(self, fuzzer: Fuzzer, wait_s: float = 300.0) -> None:
        """Services up, both engines loaded."""
        self.client.wait_for_services(wait_s, alive=self.process)
        for call, request in ((self.client.get_ik, fuzzer.valid_ik()), (self.client.infer_shape, fuzzer.valid_shape())):
            request.timeout_s = 2.0
            MaceClient.when_loaded(lambda r, call=call: call(r, timeout_s=60.0), request, wait_s)

    def restart(self) -> None:
        """A fresh node after a crash, logging to a new file (the crashed one's log is kept)."""
        self.client.close()
        self.process.stop(5.0)
        self.log.close()
        self.start(self.log_path.with_suffix(f".{int(time.time())}.log"))

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Traffic:
    """The topic abuse, published by a process of its own (as cameras and other nodes are): 10 MB clouds
    published from this process would hold its interpreter and delay the client's own answers.

    `send(count)` asks for `count` more messages (the process publishes them at once, without blocking
    this one); each published message's kind comes back on the process's stdout (`kinds`, `recent`).
    """

    WARMUP = "warmup"

    def __init__(self, seed: int, topics: dict[str, str], environment: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--traffic", json.dumps({"seed": seed, "topics": topics})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **environment})
        self.kinds: Counter = Counter()
        self.recent: deque[str] = deque(maxlen=5)  # what the node was last sent, when a deadline is missed
        self.ready = threading.Event()
        self.done = threading.Event()
        self.index = 0  # the request index the latest messages were asked for at
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if line == "ready":
                self.ready.set()
            elif line == "done":
                self.done.set()
            elif line:
                self.kinds[line] += 1
                self.recent.append(f"{self.index}:{line}")

    def send(self, count: int | str, index: int = 0) -> None:
        self.index = index
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60.0)


def traffic(options: str) -> int:
    """--traffic mode: publishes fuzzed topic messages as the main process asks (see Traffic)."""
    import rclpy

    settings = json.loads(options)
    fuzzer = Fuzzer(settings["seed"])
    rclpy.init()
    node = rclpy.create_node("mace_reliability_traffic")
    types = {"cloud": PointCloud2, "markers": MarkerArray, "joint_states": JointState, "contacts": PoseArray}
    publishers = {key: node.create_publisher(types[key], topic, QoSProfile(depth=1) if key == "cloud" else 10)
                  for key, topic in settings["topics"].items()}
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and any(p.get_subscription_count() == 0 for p in publishers.values()):
        time.sleep(0.05)
    print("ready", flush=True)

    def publish(kind: str, key: str, message: Any) -> None:
        if hasattr(message, "header"):
            message.header.stamp = node.get_clock().now().to_msg()
        publishers[key].publish(message)
        print(kind, flush=True)

    for line in sys.stdin:
        if line.strip() == Traffic.WARMUP:
            # Each kind of large message, a few times over: the DDS histories that keep a buffer per slot,
            # grown to the largest sample seen, reach their size here (see "warm-up" in main()).
            for _ in range(WARMUP_ROUNDS):
                publish("cloud_camera", "cloud", fuzzer.camera)
                publish("cloud_huge", "cloud", xyz_cloud(fuzzer.np_rng.uniform(-3.0, 3.0, (200000, 3))))
                publish("markers_flood", "markers", fuzzer.flood)
                time.sleep(0.5)
            print("done", flush=True)
            continue
        for _ in range(int(line)):
            publish(*fuzzer.topic_message())
    node.destroy_node()
    rclpy.shutdown()
    return 0


def warm_up(node: NodeUnderTest, fuzzer: Fuzzer, traffic_process: Traffic) -> None:
    """The largest answers and messages, each a few times, before the measured run: rmw_fastrtps keeps a
    buffer per history slot, grown to the largest sample seen and then kept (its default
    PREALLOCATED_WITH_REALLOC memory policy), so RSS rises until every slot has held a largest
    sample; growth after the warm-up is not this. InferShape answers are the largest service responses."""
    traffic_process.send(Traffic.WARMUP)
    for _ in range(WARMUP_ROUNDS):
        request = fuzzer.valid_shape()
        request.num_samples, request.tuning_iterations, request.timeout_s = MAX_SHAPE_SAMPLES, 0, 10.0
        node.client.infer_shape(request, timeout_s=60.0)
        request = fuzzer.valid_ik()
        request.num_solutions, request.timeout_s = MAX_NUM_SOLUTIONS, 2.0
        node.client.get_ik(request, timeout_s=60.0)
    traffic_process.done.wait(120.0)


def repository_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it: results name no machine's absolute paths."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="fuzzed requests in all (GetIK and InferShape)")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop sending after this long")
    parser.add_argument("--topic-messages", type=int, default=None, help="topic messages in all (default requests / 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene", default="box", help="the node's static scene")
    parser.add_argument("--rss-interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--max-restarts", type=int, default=3, help="stop after this many crashes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.json")
    parser.add_argument("--node-log", type=Path, default=ROOT / "out" / "reliability_node.log")
    parser.add_argument("--no-warmup", action="store_true", help="measure RSS from the start (see warm_up)")
    parser.add_argument("--traffic", help=argparse.SUPPRESS)  # internal: the topic-abuse process (see Traffic)
    args = parser.parse_args()
    if args.traffic:
        return traffic(args.traffic)
    topic_total = args.requests // 4 if args.topic_messages is None else args.topic_messages

    torch.set_num_threads(1)  # the bench shares the CPU with the node
    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
    os.environ.update(isolation)
    defaults = load_defaults(default_parameters_file())
    default_timeout = {"get_ik": float(defaults["ik.timeout_s"]), "infer_shape": float(defaults["shape.timeout_s"])}
    names = {"get_ik": error_names(GetIK.Response), "infer_shape": error_names(InferShape.Response)}

    fuzzer = Fuzzer(args.seed)
    args.node_log.parent.mkdir(parents=True, exist_ok=True)
    node = NodeUnderTest(["-p", f"scene:={args.scene}"], isolation, args.node_log)
    node.ready(fuzzer)
    # Topic messages from their own fuzzer: the requests' sequence stays the same for any --topic-messages.
    traffic_process = Traffic(args.seed + 1, node.topics(), isolation)
    traffic_process.ready.wait(120.0)
    warmup_started = time.monotonic()
    warmup_rss = node_rss_mb(node.process.process.pid)
    if not args.no_warmup:
        warm_up(node, fuzzer, traffic_process)
    warmup = {"skipped": args.no_warmup, "seconds": round(time.monotonic() - warmup_started, 1),
              "rss_mb_before": warmup_rss, "rss_mb_after": node_rss_mb(node.process.process.pid)}
    sampler = RssSampler(lambda: node.process.process.pid, args.rss_interval)
    sampler.start()
    probe = StallProbe()
    steal_before = steal_seconds()

    codes: dict[str, Counter] = {"get_ik": Counter(), "infer_shape": Counter()}
    by_category: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    warmup_kinds = Counter(traffic_process.kinds)
    examples: dict[str, list[str]] = defaultdict(list)
    engine_errors: list[dict] = []
    violations: list[dict] = []
    unanswered: list[dict] = []
    crashes: list[dict] = []
    inconsistent = 0
    started = time.monotonic()
    stopped_by = "requests"
    sent = 0
    for index in range(args.requests):
        if time.monotonic() - started > args.seconds:
            stopped_by = "seconds"
            break
        count = (index + 1) * topic_total // args.requests - index * topic_total // args.requests
        if count:
            traffic_process.send(count, index)

        service = "get_ik" if fuzzer.rng.random() < 0.55 else "infer_shape"
        category, request = fuzzer.get_ik() if service == "get_ik" else fuzzer.infer_shape()
        timeout = request.timeout_s
        budget = timeout if 0.0 < timeout <= 600.0 else default_timeout[service]
        call = node.client.get_ik if service == "get_ik" else node.client.infer_shape
        sent += 1
        begin = time.monotonic()
        try:
            response = call(request, timeout_s=budget + CLIENT_GRACE_S)
        except TimeoutError:
            response = None
        latency = time.monotonic() - begin
        if response is None or not node.process.running():
            if node.process.running():
                unanswered.append({"index": index, "service": service, "category": category, "timeout_s": timeout})
                continue
            crashes.append({"index": index, "service": service, "category": category,
                            "return_code": node.process.process.returncode, "log_tail": node.log_tail()})
            if len(crashes) > args.max_restarts:
                stopped_by = "crashes"
                break
            node.restart()
            node.ready(fuzzer)
            continue

        code = names[service].get(response.error_code, f"unknown {response.error_code}")
        codes[service][code] += 1
        by_category[f"{service}/{category}"][code] += 1
        inconsistent += response.success != (response.error_code == type(response).SUCCESS)
        if len(examples[f"{service}/{code}"]) < 3 and response.message[:200] not in examples[f"{service}/{code}"]:
            examples[f"{service}/{code}"].append(response.message[:200])
        valid_answer = "valid" if category == "valid" else "fuzzed"
        latencies[f"{service}/{valid_answer}"].append(latency)
        if "engine error" in response.message.lower():
            engine_errors.append({"index": index, "service": service, "category": category, "code": code,
                                  "message": response.message[:300]})
        if latency > budget + DEADLINE_SLACK_S:
            violations.append({"index": index, "service": service, "category": category, "timeout_s": timeout,
                               "budget_s": budget, "latency_s": round(latency, 3), "node_elapsed_s": response.elapsed_s,
                               "code": code, "request": sizes(request), "recent_topic_messages": list(traffic_process.recent),
                               "begin_end_monotonic": [round(begin, 4), round(begin + latency, 4)]})
        if sent % 500 == 0:
            print(f"{sent} requests, {time.monotonic() - started:.0f} s: crashes {len(crashes)}, engine errors "
                  f"{len(engine_errors)}, deadline violations {len(violations)}, unanswered {len(unanswered)}, "
                  f"RSS {sampler.samples[-1][1:] if sampler.samples else '?'} MB "
                  "(total, node, intake, node anonymous, intake anonymous)", file=sys.stderr, flush=True)
    duration = time.monotonic() - started

    sampler.stopped.set()
    sampler.join()
    steal_after = steal_seconds()
    time.sleep(2 * PROBE_REPORT_S)  # the last stall's line
    for violation in violations:
        violation["longest_machine_stall_s"] = round(probe.overlapping(*violation["begin_end_monotonic"]), 3)
    stalls = probe.close()
    traffic_process.close()
    topics = traffic_process.kinds - warmup_kinds
    node.client.close()
    sigint_start = time.monotonic()
    return_code = node.process.stop(30.0)
    sigint_exit_s = time.monotonic() - sigint_start
    node.log.close()

    rss = [sample[1] for sample in sampler.samples]
    tenth = max(1, len(rss) // 10)

    def tenths(column: int) -> list[float | None]:
        """The median of each tenth of the run: growth that levels off (allocator warm-up) and a leak differ here."""
        values = [sample[column] for sample in sampler.samples]
        return [percentile(values[part * len(values) // 10:(part + 1) * len(values) // 10], 50) for part in range(10)]

    all_latencies = [value for values in latencies.values() for value in values]
    log_text = node.log_path.read_text(errors="replace")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "steal_s_during_run": None if steal_before is None or steal_after is None
                    else round(steal_after - steal_before, 1),
                    "stall_probe": stalls},
        "node_arguments": node.arguments,
        "requests_sent": sent,
        "requests_answered": sum(sum(counter.values()) for counter in codes.values()),
        "topic_messages": dict(topics),
        "warmup": warmup | {"topic_messages": dict(warmup_kinds)},
        "duration_s": round(duration, 1),
        "stopped_by": stopped_by,
        "codes": {service: dict(counter) for service, counter in codes.items()},
        "codes_by_category": {key: dict(counter) for key, counter in sorted(by_category.items())},
        "message_examples": dict(sorted(examples.items())),
        "success_flag_inconsistent": inconsistent,
        "crashes": crashes,
        "unanswered": unanswered,
        "engine_errors": {"count": len(engine_errors), "examples": engine_errors[:20]},
        "latency_s": {key: {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
                            "max": max(values)} for key, values in sorted(latencies.items())}
        | {"all": {"count": len(all_latencies), "p50": percentile(all_latencies, 50),
                   "p95": percentile(all_latencies, 95), "max": max(all_latencies, default=None)}},
        "deadline": {"rule": f"answered later than timeout_s + {DEADLINE_SLACK_S} s (0 or invalid: the default "
                             f"{default_timeout})", "checked": len(all_latencies), "violations": len(violations),
                     # Answered by the node in time (its elapsed_s within timeout_s + the slack), late at the client:
                     # the transport, on a CPU shared with the traffic process's camera clouds and marker floods.
                     "late_in_transport": sum(v["node_elapsed_s"] <= v["budget_s"] + DEADLINE_SLACK_S for v in violations),
                     # A violation during which an idle probe process itself woke at least this late.
                     "during_machine_stall_over_0.05_s": sum(v["longest_machine_stall_s"] > 0.05 for v in violations),
                     "worst": sorted(violations, key=lambda v: v["latency_s"] - v["budget_s"])[-20:]},
        "rss_mb": {"first": rss[0] if rss else None, "median_first_tenth": percentile(rss[:tenth], 50),
                   "median_last_tenth": percentile(rss[-tenth:], 50), "max": max(rss, default=None),
                   "last": rss[-1] if rss else None, "interval_s": args.rss_interval,
                   "median_per_tenth": {"total": tenths(1), "node": tenths(2), "intake": tenths(3),
                                        "node_anonymous": tenths(4), "intake_anonymous": tenths(5)},
                   "samples_columns": ["s", "total", "node", "intake", "node_anonymous", "intake_anonymous"],
                   "samples": sampler.samples[::max(1, len(sampler.samples) // 500)]},
        "sigint": {"exit_s": round(sigint_exit_s, 2), "return_code": return_code},
        "node_log": {"path": repository_path(node.log_path), "tracebacks": log_text.count("Traceback"),
                     "error_lines": sum("[ERROR]" in line for line in log_text.splitlines())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {key: result[key] for key in ("requests_sent", "requests_answered", "duration_s", "stopped_by", "codes")}
    print(json.dumps(summary | {"crashes": len(crashes), "unanswered": len(unanswered),
                                "engine_errors": len(engine_errors), "deadline_violations": len(violations),
                                "latency_all": result["latency_s"]["all"], "rss_mb": {k: v for k, v in result["rss_mb"].items()
                                                                                     if k not in ("samples", "samples_columns")},
                                "sigint": result["sigint"]}, indent=1))
    print(f"wrote {args.out}")
    return 0 if not crashes and not engine_errors and not violations and not unanswered else 1


if __name__ == "__main__":
    sys.exit(main())
