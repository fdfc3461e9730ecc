"""Joint states at a controller's rate, and request bursts (mace_ros/ros/executors.py).

Three parts, each on localhost DDS with a random ROS_DOMAIN_ID:
- `executors`: a subscriber process per way of taking messages (rclpy's MultiThreadedExecutor,
  rclpy's SingleThreadedExecutor, mace_ros's MultiThreadedExecutor, mace_ros's PolledSubscription
  every 10 ms) takes sensor_msgs/JointState from a publisher process at each --rates Hz, with an
  empty callback: its CPU (cores) and messages received per second.
- `node`: the installed node with a /joint_states publisher process at each rate (0 = none): the CPU of
  the serving process and of its intake, idle and with GetIK called back to back, and GetIK's
  round trips and deadline violations (answered later than timeout_s + 0.1 s).
- `burst`: --burst GetIK requests sent at once from one client, --bursts times: how many are answered
  (solved or TIMED_OUT) and how long the last took.

    set +u; source install/setup.bash; set -u
    .venv/bin/python bench/joint_states.py                  # -> bench/results/joint_states.json
    .venv/bin/python bench/joint_states.py --parts node --rates 0,100 --seconds 5 --out out/joint_states_small.json
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
from pathlib import Path

import numpy as np
import torch
from sensor_msgs.msg import JointState

from cloud_stream import GOALS, HOME, call_ik_until, ik_request, publish_paced, summarize_requests
from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
from mace_ros.ros.executors import SERVICE_QOS
from mace_ros.srv import GetIK
from reliability import ARM_JOINTS, repository_path

ROOT = Path(__file__).resolve().parents[1]
JOINT_NAMES = [*ARM_JOINTS, "panda_finger_joint1", "panda_finger_joint2"]
SETTLE_S = 4.0  # after the publisher starts (its process takes ~1 s to import rclpy), before measuring
EXECUTORS = ("rclpy_multi_threaded", "rclpy_single_threaded", "mace_multi_threaded", "mace_polled")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publish_joint_states(rate_hz: float, seconds: float) -> int:
    """--publish mode: a moving arm's /joint_states (9 joints, stamped) at `rate_hz` for `seconds`."""
    import rclpy

    rclpy.init()
    node = rclpy.create_node("joint_state_publisher_bench")
    publisher = node.create_publisher(JointState, "/joint_states", 10)

    def state_at(_: int, elapsed_s: float) -> JointState:
        positions = [value + 0.05 * np.sin(2 * np.pi * 0.2 * elapsed_s) for value in HOME] + [0.04, 0.04]
        return JointState(name=JOINT_NAMES, position=positions, velocity=[0.0] * 9, effort=[0.0] * 9)

    return publish_paced(node, publisher, state_at, rate_hz, seconds)


def start_publisher(rate_hz: float, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--publish", str(rate_hz), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def subscribe(kind: str, seconds: float) -> int:
    """--subscribe mode: takes /joint_states the `kind` way for SETTLE_S + `seconds`; prints the CPU and
    the rate of the last `seconds`."""
    import rclpy
    import rclpy.executors
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup

    from mace_ros.ros.executors import MultiThreadedExecutor, PolledSubscription

    rclpy.init()
    node = rclpy.create_node("joint_state_subscriber_bench", start_parameter_services=False)
    received = [0]

    def count(messages: list) -> None:
        received[0] += len(messages)

    if kind == "mace_polled":
        PolledSubscription(node, JointState, "/joint_states", 100, 0.01, count, "polled")
    else:
        node.create_subscription(JointState, "/joint_states", lambda message: count([message]), 50,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        executor = {"rclpy_multi_threaded": lambda: rclpy.executors.MultiThreadedExecutor(num_threads=3),
                    "rclpy_single_threaded": rclpy.executors.SingleThreadedExecutor,
                    "mace_multi_threaded": lambda: MultiThreadedExecutor(num_threads=3)}[kind]()
        executor.add_node(node)
        threading.Thread(target=executor.spin, daemon=True).start()
    time.sleep(SETTLE_S)
    cpu_before, received_before, started = process_cpu_s(os.getpid()), received[0], time.monotonic()
    time.sleep(seconds)
    elapsed_s = time.monotonic() - started
    print(json.dumps({"cpu_cores": (process_cpu_s(os.getpid()) - cpu_before) / elapsed_s,
                      "received_per_s": (received[0] - received_before) / elapsed_s}), flush=True)
    os._exit(0)  # executor threads may be busy: nothing to join


def executors_part(args: argparse.Namespace) -> list[dict]:
    results = []
    for rate in args.rates:
        if rate <= 0:
            continue
        for kind in EXECUTORS:
            publisher = start_publisher(rate, SETTLE_S + args.seconds + 2.0)
            subscriber = subprocess.run([sys.executable, __file__, "--subscribe", kind, "--seconds", str(args.seconds)],
                                        capture_output=True, text=True, timeout=SETTLE_S + args.seconds + 60)
            publisher.communicate(timeout=60)
            results.append({"executor": kind, "rate_hz": rate, **json.loads(subscriber.stdout.strip().splitlines()[-1])})
            print(json.dumps(results[-1]), flush=True)
    return results


def node_part(args: argparse.Namespace, client: MaceClient, node: NodeProcess, intake_pid: int) -> list[dict]:
    results = []
    for rate in args.rates:
        for get_ik in (False, True):
            publisher = start_publisher(rate, SETTLE_S + args.seconds + 1.0) if rate > 0 else None
            if publisher:
                time.sleep(SETTLE_S)
            cpu_before = (process_cpu_s(node.process.pid), process_cpu_s(intake_pid))
            started, records, stop = time.monotonic(), [], threading.Event()
            if get_ik:
                caller = threading.Thread(target=call_ik_until, args=(client, stop, args.timeout, records))
                caller.start()
                time.sleep(args.seconds)
                stop.set()
                caller.join()
            else:
                time.sleep(args.seconds)
            elapsed_s = time.monotonic() - started
            node_cpu, intake_cpu = ((process_cpu_s(pid) - before) / elapsed_s
                                    for pid, before in zip((node.process.pid, intake_pid), cpu_before))
            published = json.loads(publisher.communicate(timeout=60)[0])["published"] if publisher else 0
            results.append({"rate_hz": rate, "get_ik_back_to_back": get_ik, "serving_process_cpu_cores": node_cpu,
                            "intake_cpu_cores": intake_cpu, "published": published,
                            "get_ik": summarize_requests(records) if get_ik else None})
            print(json.dumps(results[-1]), flush=True)
    return results


def burst_part(args: argparse.Namespace, client: MaceClient) -> list[dict]:
    results = []
    for _ in range(args.bursts):
        started = time.monotonic()
        calls = [client.get_ik_client.call_async(ik_request(GOALS[index % len(GOALS)], args.timeout))
                 for index in range(args.burst)]
        answered_after: dict[int, float] = {}
        while len(answered_after) < len(calls) and time.monotonic() - started < args.timeout * args.burst + 30.0:
            client.executor.spin_once(timeout_sec=0.01)
            for index, call in enumerate(calls):
                if index not in answered_after and call.done():
                    answered_after[index] = time.monotonic() - started
        responses = [calls[index].result() for index in answered_after]
        results.append({"sent": len(calls), "answered": len(responses),
                        "solved": sum(response.success for response in responses),
                        "timed_out": sum(response.error_code == GetIK.Response.TIMED_OUT for response in responses),
                        "last_answer_s": max(answered_after.values(), default=None)})
        print(json.dumps(results[-1]), flush=True)
    return results


def intake_pid_of(node_pid: int) -> int:
    children = subprocess.run(["pgrep", "-P", str(node_pid)], capture_output=True, text=True).stdout.split()
    return next(int(pid) for pid in children if "mace_ros.ros.intake" in Path(f"/proc/{pid}/cmdline").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="executors,node,burst", help="comma-separated: executors, node, burst")
    parser.add_argument("--rates", default="0,100,1000", help="/joint_states rates (Hz), comma-separated; 0 = none")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per rate")
    parser.add_argument("--timeout", type=float, default=1.0, help="GetIK timeout_s")
    parser.add_argument("--burst", type=int, default=24, help="GetIK requests sent at once")
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "joint_states.json")
    parser.add_argument("--node-log", type=Path, default=ROOT / "out" / "joint_states_node.log")
    parser.add_argument("--publish", type=float, help=argparse.SUPPRESS)  # internal: the publisher process
    parser.add_argument("--subscribe", choices=EXECUTORS, help=argparse.SUPPRESS)  # internal: a subscriber process
    args = parser.parse_args()
    if args.publish:
        return publish_joint_states(args.publish, args.seconds)
    if args.subscribe:
        return subscribe(args.subscribe, args.seconds)
    args.rates = [float(rate) for rate in args.rates.split(",")]
    parts = args.parts.split(",")

    torch.set_num_threads(1)
    os.environ.update({"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))})
    report: dict = {"command": "bench/joint_states.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k not in ("out", "node_log", "publish", "subscribe"))}
    if "executors" in parts:
        report["executors"] = executors_part(args)
    if "node" in parts or "burst" in parts:
        args.node_log.parent.mkdir(parents=True, exist_ok=True)
        with args.node_log.open("w") as log:
            node = NodeProcess(installed_executable(), [], env=dict(os.environ), log=log)
            client = MaceClient("mace_joint_states_bench")
            try:
                client.wait_for_services(300.0, alive=node)
                MaceClient.when_loaded(lambda r: client.get_ik(r, timeout_s=60.0), ik_request(GOALS[0], 2.0), 300.0)
                if "node" in parts:
                    report["node"] = node_part(args, client, node, intake_pid_of(node.process.pid))
                if "burst" in parts:
                    report["burst"] = burst_part(args, client)
            finally:
                client.close()
                node.stop()
        report["node_log"] = repository_path(args.node_log)
    report.update({"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip(),
                   "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "service_queue_depth": SERVICE_QOS.depth})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {repository_path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
