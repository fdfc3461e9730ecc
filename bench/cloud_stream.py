"""Depth-camera clouds streamed at a camera's rate while GetIK is called (issue 7, items 1 and 5).

Starts the installed node (localhost-only DDS, a random ROS_DOMAIN_ID) and, for each cloud size,
first calls GetIK without any cloud (the baseline), then, from a camera process of its own, publishes
organized camera clouds (x, y, z, rgb float32 in 32-byte points: bench/reliability.py's `camera_cloud`,
each stamped when sent) at --rate Hz for --seconds while calling GetIK one request at a time. Measures:
- how often the node applies a cloud and how old the applied cloud is: ~/obstacle_points repeats
  the stamp of the cloud it was built from, so its age on arrival is publish -> decoded, cropped,
  thinned, self-filtered, distance field built, in the model -> echoed;
- GetIK round trips and deadline violations (answered later than timeout_s + 0.1 s) with and without
  the stream;
- the node's RSS (the node and its intake process).
`--delivery-only` measures what DDS alone delivers instead, with no node: the same camera process and a
plain subscription with the intake's QoS (reliable, depth 4) in this otherwise idle process.

    set +u; source install/setup.bash; set -u
    .venv/bin/python bench/cloud_stream.py                 # -> bench/results/cloud_stream.json
    .venv/bin/python bench/cloud_stream.py --seconds 5 --sizes 640x480 --out out/cloud_stream_small.json
    .venv/bin/python bench/cloud_stream.py --delivery-only --seconds 10 --out bench/results/cloud_delivery.json
    .venv/bin/python bench/cloud_stream.py --sizes 1280x720 --gap 60 --point-subsample 2 --out out/cloud_1280_subsample2.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from geometry_msgs.msg import Point, Quaternion
from rclpy.qos import QoSProfile
from sensor_msgs.msg import JointState, PointCloud2

from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
from mace_ros.srv import GetIK
from reliability import ARM_JOINTS, DEADLINE_SLACK_S, camera_cloud, node_rss_mb, percentile, repository_path

ROOT = Path(__file__).resolve().parents[1]
# Goals above the streamed table top (z 0): the hand pointing down, 0.3-0.5 m up.
GOALS = [(0.5, 0.0, 0.3), (0.4, 0.2, 0.4), (0.6, -0.2, 0.35), (0.45, -0.1, 0.5)]
HOME = [0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785]


def ik_request(goal: tuple[float, float, float], timeout_s: float) -> GetIK.Request:
    request = GetIK.Request()
    request.goal.header.frame_id = "panda_link0"
    request.goal.pose.position = Point(x=goal[0], y=goal[1], z=goal[2])
    request.goal.pose.orientation = Quaternion(x=1.0, y=0.0, z=0.0, w=0.0)
    request.timeout_s = timeout_s
    return request


def call_ik_until(client: MaceClient, stop: threading.Event, timeout_s: float, records: list[dict], gap_s: float = 0.0) -> None:
    """GetIK one request at a time, `gap_s` idle after each, until `stop`."""
    index = 0
    while not stop.is_set():
        started = time.monotonic()
        response = client.get_ik(ik_request(GOALS[index % len(GOALS)], timeout_s), timeout_s=timeout_s + 30.0)
        latency_s = time.monotonic() - started
        records.append({"latency_s": latency_s, "node_elapsed_s": float(response.elapsed_s), "success": bool(response.success),
                        "code": int(response.error_code), "late": latency_s > timeout_s + DEADLINE_SLACK_S})
        index += 1
        # Idle, but still taking ~/obstacle_points as they come (the client's executor spins only here and in calls).
        idle_until = time.monotonic() + gap_s
        while not stop.is_set() and (remaining_s := idle_until - time.monotonic()) > 0:
            client.executor.spin_once(timeout_sec=min(remaining_s, 0.05))


def summarize_requests(records: list[dict]) -> dict:
    latencies = [record["latency_s"] for record in records]
    return {"requests": len(records), "success": sum(record["success"] for record in records),
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "max_s": max(latencies, default=None), "deadline_violations": sum(record["late"] for record in records),
            "late": [record for record in records if record["late"]][:10]}


def run_size(client: MaceClient, width: int, height: int, args: argparse.Namespace, rng: np.random.Generator,
             node_pid: int) -> dict:
    applied: list[tuple[int, float]] = []  # (stamp of the applied cloud ns, its age on arrival s)

    def on_points(message: PointCloud2) -> None:
        stamp_ns = message.header.stamp.sec * 10**9 + message.header.stamp.nanosec
        if stamp_ns and message.width:
            applied.append((stamp_ns, (client.node.get_clock().now().nanoseconds - stamp_ns) * 1e-9))

    subscription = client.node.create_subscription(
        PointCloud2, client.topic("obstacle_points"), on_points, QoSProfile(depth=10))
    baseline: list[dict] = []
    stop = threading.Event()
    timer = threading.Timer(args.seconds / 2, stop.set)
    timer.start()
    call_ik_until(client, stop, args.timeout, baseline, args.gap)

    # The camera is a process of its own, as a driver is: publishing 10-30 MB clouds at 30 Hz from this
    # process would hold its interpreter and delay the client's own GetIK calls.
    streamed: list[dict] = []
    stop = threading.Event()
    caller = threading.Thread(target=call_ik_until, args=(client, stop, args.timeout, streamed, args.gap))
    rss = [node_rss_mb(node_pid)]
    camera = start_camera(width, height, args, rng, client.topic("obstacle_cloud"))
    caller.start()
    while camera.poll() is None:
        time.sleep(1.0)
        rss.append(node_rss_mb(node_pid))
    time.sleep(0.5)  # the last clouds in flight
    stop.set()
    caller.join()
    sent = json.loads(camera.stdout.read())
    # Rates over the camera's publishing span (not its process's start-up): the clouds stamped within it
    # that the node applied, each counted once.
    span_s = (sent["last_stamp_ns"] - sent["first_stamp_ns"]) * 1e-9
    in_window = list({stamp: age for stamp, age in applied if sent["first_stamp_ns"] <= stamp <= sent["last_stamp_ns"]}.values())
    client.node.destroy_subscription(subscription)
    return {
        "cloud": f"{width}x{height}", "cloud_bytes": 32 * width * height, "rate_hz_asked": args.rate,
        "published": sent["published"], "publish_rate_hz": (sent["published"] - 1) / span_s,
        "applied": len(in_window), "applied_rate_hz": len(in_window) / span_s,
        "applied_age_p50_s": percentile(in_window, 50), "applied_age_p95_s": percentile(in_window, 95),
        "get_ik_without_stream": summarize_requests(baseline), "get_ik_while_streaming": summarize_requests(streamed),
        "node_rss_mb": {"start": rss[0], "max": max(value for value in rss if value is not None), "end": rss[-1]},
    }


def camera(size: str, rate: float, seconds: float, seed: int, topic: str) -> int:
    """--camera mode: publish camera clouds on `topic` at `rate` Hz for `seconds` (a driver's default,
    reliable QoS), each stamped when sent; prints what publish_paced sends."""
    import rclpy

    width, height = (int(v) for v in size.lower().split("x"))
    rclpy.init()
    node = rclpy.create_node("camera_stream")
    publisher = node.create_publisher(PointCloud2, topic, QoSProfile(depth=1))
    deadline = time.monotonic() + 10.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    rng = np.random.default_rng(seed)
    clouds = [camera_cloud(rng, width, height) for _ in range(3)]
    return publish_paced(node, publisher, lambda index, _: clouds[index % len(clouds)], rate, seconds)


def publish_paced(node: Any, publisher: Any, message_at: Callable[[int, float], Any], rate_hz: float, seconds: float) -> int:
    """Publishes message_at(index, elapsed_s), stamped when sent, at `rate_hz` for `seconds`; prints
    {"published": count, "first_stamp_ns": ..., "last_stamp_ns": ...}, then destroys `node` and shuts
    rclpy down (a publisher process's end)."""
    import rclpy

    published, started, first_stamp_ns, last_stamp_ns = 0, time.monotonic(), None, None
    while (elapsed_s := time.monotonic() - started) < seconds:
        message = message_at(published, elapsed_s)
        now = node.get_clock().now()
        message.header.stamp = now.to_msg()
        publisher.publish(message)
        first_stamp_ns, last_stamp_ns = first_stamp_ns or now.nanoseconds, now.nanoseconds
        published += 1
        time.sleep(max(0.0, started + published / rate_hz - time.monotonic()))
    print(json.dumps({"published": published, "first_stamp_ns": first_stamp_ns, "last_stamp_ns": last_stamp_ns}))
    node.destroy_node()
    rclpy.shutdown()
    return 0


def start_camera(width: int, height: int, args: argparse.Namespace, rng: np.random.Generator, topic: str) -> subprocess.Popen:
    """The camera process (see camera()); its stdout gives publish_paced's counts when it ends."""
    return subprocess.Popen(
        [sys.executable, __file__, "--camera", f"{width}x{height}", "--rate", str(args.rate), "--seconds", str(args.seconds),
         "--seed", str(int(rng.integers(1 << 30))), "--topic", topic],
        stdout=subprocess.PIPE, text=True)


def delivery(args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """--delivery-only: for each size, the clouds DDS delivers to an idle subscriber with the intake's QoS."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import ReliabilityPolicy

    from mace_ros.ros.intake import CLOUD_HISTORY_DEPTH

    rclpy.init()
    node = rclpy.create_node("cloud_delivery_probe")
    arrivals: list[float] = []
    node.create_subscription(PointCloud2, "/cloud_delivery_probe", lambda message: arrivals.append(time.monotonic()),
                             QoSProfile(depth=CLOUD_HISTORY_DEPTH, reliability=ReliabilityPolicy.RELIABLE))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    results = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        arrivals.clear()
        camera = start_camera(width, height, args, rng, "/cloud_delivery_probe")
        output, _ = camera.communicate()
        time.sleep(0.5)  # the last clouds in flight
        published = json.loads(output)["published"]
        delivered = len(arrivals)
        span_s = (arrivals[-1] - arrivals[0]) if delivered > 1 else None
        results.append({"cloud": size, "cloud_bytes": 32 * width * height, "rate_hz_asked": args.rate, "published": published,
                        "delivered": delivered, "delivered_share": delivered / max(published, 1),
                        "delivered_rate_hz": (delivered - 1) / span_s if span_s else None})
        print(json.dumps(results[-1]), flush=True)
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="640x480,1280x720", help="cloud sizes, WIDTHxHEIGHT, comma-separated")
    parser.add_argument("--rate", type=float, default=30.0, help="clouds per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per size")
    parser.add_argument("--timeout", type=float, default=0.5, help="GetIK timeout_s")
    parser.add_argument("--gap", type=float, default=0.0, help="idle seconds after each GetIK (0: back to back)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cloud_stream.json")
    parser.add_argument("--node-log", type=Path, default=ROOT / "out" / "cloud_stream_node.log")
    parser.add_argument("--delivery-only", action="store_true", help="no node: what DDS delivers to an idle subscriber")
    parser.add_argument("--point-subsample", type=int, default=1, help="the node's obstacle_cloud.point_subsample")
    parser.add_argument("--camera", help=argparse.SUPPRESS)  # internal: the camera process (see camera())
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.camera:
        return camera(args.camera, args.rate, args.seconds, args.seed, args.topic)

    torch.set_num_threads(1)
    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
    os.environ.update(isolation)
    args.node_log.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    if args.delivery_only:
        results = delivery(args, rng)
    else:
        results = with_node(args, rng, isolation)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"command": "bench/cloud_stream.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                             if k not in ("out", "node_log", "camera", "topic")),
              "commit": commit, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "node_log": None if args.delivery_only else repository_path(args.node_log), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {repository_path(args.out)}")
    return 0


def with_node(args: argparse.Namespace, rng: np.random.Generator, isolation: dict[str, str]) -> list[dict]:
    """The node under the stream, size by size (see run_size)."""
    with args.node_log.open("w") as log:
        node = NodeProcess(installed_executable(), ["-p", f"obstacle_cloud.point_subsample:={args.point_subsample}"],
                           env=isolation, log=log)
        client = MaceClient("mace_cloud_stream")
        try:
            client.wait_for_services(300.0, alive=node)
            MaceClient.when_loaded(lambda r: client.get_ik(r, timeout_s=60.0), ik_request(GOALS[0], 2.0), 300.0)
            joints = client.node.create_publisher(JointState, "/joint_states", 10)
            joints.publish(JointState(name=ARM_JOINTS, position=HOME))  # the self-filter's robot state
            results = []
            for size in args.sizes.split(","):
                width, height = (int(v) for v in size.lower().split("x"))
                joints.publish(JointState(name=ARM_JOINTS, position=HOME))
                results.append(run_size(client, width, height, args, rng, node.process.pid))
                print(json.dumps(results[-1], indent=1), flush=True)
        finally:
            client.close()
            node.stop()
    return results


if __name__ == "__main__":
    raise SystemExit(main())
