"""GetIK latency by stage on the shipped scenes, beside random-restart IK on the same goals (issue 8).

For every goal of every shipped scene (`config/scenes/*.yaml`, their pose or position goals for
panda_hand), `--repeats` requests with different random seeds to `IKEngine.solve` (default config,
`--timeout` s), recording success (exact-mesh collision-free, error <= 1e-4 m / 1e-3 rad), latency and
`IKResult.stage_times_s` (setup, tuning, polish, diagnosis, answer). The KDL-like random-restart LM with
an exact-mesh validity check (`bench/ik_baselines.py`) answers the same goals in the same run. With
`--node`, the same requests also go through the installed node over ROS 2 (`install/setup.bash`
sourced): the ROS overhead is the client's round trip minus the engine time the response reports.

    .venv/bin/python bench/ik_latency.py                                    # engine + baseline
    set +u; source install/setup.bash; set -u; .venv/bin/python bench/ik_latency.py --node
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The repository last on the path: `bench` comes from it, `mace_ros` from an install when one is on the
# path (only the installed package has the generated service types that --node needs).
sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.ik_baselines import RandomRestartIK  # noqa: E402
from mace_ros.core.ik_domain import IKGoal, goal_errors  # noqa: E402
from mace_ros.core.ik_engine import IKEngine, IKRequest  # noqa: E402
from mace_ros.core.kinematics import PandaKinematics, quaternion_to_matrix  # noqa: E402
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker  # noqa: E402
from mace_ros.core.scene import Scene, load_goals  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENES = ("wall", "window", "box", "shelf", "table")
TIP_LINK = "panda_hand"
POSITION_TOLERANCE_M, ORIENTATION_TOLERANCE_RAD = 1e-4, 1e-3
STAGES = ("setup", "tuning", "polish", "diagnosis", "answer")


def solved(q: np.ndarray | None, goal: IKGoal, scene: Scene, exact: PyBulletCollisionChecker, kinematics: PandaKinematics) -> bool:
    if q is None:
        return False
    q_tensor = torch.as_tensor(q, dtype=torch.float64)[None]
    position_error, orientation_error = goal_errors(kinematics, q_tensor, goal)
    close = float(position_error[0]) <= POSITION_TOLERANCE_M and float(orientation_error[0]) <= ORIENTATION_TOLERANCE_RAD
    return close and not bool(exact.check(q_tensor, scene).in_collision[0])


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


def node_round_trips(goals: list[tuple[str, Any]], timeout_s: float, repeats: int) -> dict[str, list[float]]:
    """Round trip and reported engine time of each request through the installed node, per scene."""
    from geometry_msgs.msg import Point, Quaternion

    from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
    from mace_ros.srv import GetIK

    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
    os.environ.update(isolation)
    overhead: dict[str, list[float]] = {}
    for scene_name in SCENES:
        node = NodeProcess(installed_executable(), ["-p", f"scene:={scene_name}"], env=isolation)
        client = MaceClient("ik_latency_bench")
        try:
            client.wait_for_services(120.0, alive=node)
            warmed_up = False
            for name, goal in goals:
                if name != scene_name:
                    continue
                for repeat in range(-1 if not warmed_up else 0, repeats):
                    request = GetIK.Request(timeout_s=timeout_s, random_seed=max(repeat, 0) + 1, tip_link=TIP_LINK)
                    request.goal.header.frame_id = "panda_link0"
                    request.goal.pose.position = Point(x=float(goal.position[0]), y=float(goal.position[1]), z=float(goal.position[2]))
                    if goal.quaternion_wxyz is None:
                        request.position_only = True
                        request.goal.pose.orientation = Quaternion(w=1.0)
                    else:
                        w, x, y, z = (float(v) for v in goal.quaternion_wxyz)
                        request.goal.pose.orientation = Quaternion(w=w, x=x, y=y, z=z)
                    started = time.monotonic()
                    response = MaceClient.when_loaded(client.get_ik, request)
                    if repeat < 0:
                        warmed_up = True  # untimed: it waits for the engines to load
                        continue
                    overhead.setdefault(scene_name, []).append(time.monotonic() - started - response.elapsed_s)
        finally:
            client.close()
            node.stop()
    return overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="requests per goal (random seeds 1..repeats)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of the engine (the baseline runs on the CPU)")
    parser.add_argument("--node", action="store_true", help="also measure the ROS overhead through the installed node")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = IKEngine(device=args.device)
    exact = PyBulletCollisionChecker()
    baseline = RandomRestartIK(exact)
    kinematics = PandaKinematics(dtype=torch.float64)
    goals = [(name, goal) for name in SCENES for goal in load_goals(ROOT / "config/scenes" / f"{name}.yaml")]
    rows: list[dict[str, Any]] = []
    for name, goal in goals:
        scene = Scene.load_yaml(ROOT / "config/scenes" / f"{name}.yaml")
        rotation = None if goal.quaternion_wxyz is None else quaternion_to_matrix(torch.as_tensor(goal.quaternion_wxyz, dtype=torch.float64))
        ik_goal = IKGoal(torch.as_tensor(goal.position, dtype=torch.float64), rotation, TIP_LINK)
        for repeat in range(args.repeats):
            request = IKRequest(np.asarray(goal.position), None if goal.quaternion_wxyz is None else np.asarray(goal.quaternion_wxyz),
                                TIP_LINK, engine.config["num_solutions"], engine.config["num_samples"], engine.config["tuning_iterations"],
                                args.timeout, random_seed=repeat + 1)
            result = engine.solve(request, scene)
            first = result.solutions[0] if len(result.solutions) else None
            rng = np.random.default_rng(repeat + 1)
            q, _, baseline_s = baseline.solve(np.asarray(goal.position), None if rotation is None else rotation.numpy(), scene, args.timeout, rng)
            rows.append({
                "scene": name, "kind": "position" if rotation is None else "pose", "repeat": repeat,
                "getik": {"success": result.success and solved(first, ik_goal, scene, exact, kinematics), "elapsed_s": result.elapsed_s,
                          "rounds": result.rounds, "stage_times_s": result.stage_times_s},
                "random_restart_lm": {"success": solved(q, ik_goal, scene, exact, kinematics), "elapsed_s": baseline_s},
            })
        print(f"{name} goal done", flush=True)

    summary: dict[str, Any] = {}
    for name in (*SCENES, "all"):
        mine = [row for row in rows if name in ("all", row["scene"])]
        summary[name] = {
            "requests": len(mine),
            "getik_success": statistics.fmean(row["getik"]["success"] for row in mine),
            "getik_latency_s": percentiles([row["getik"]["elapsed_s"] for row in mine]),
            "getik_stage_p50_s": {stage: float(np.percentile([row["getik"]["stage_times_s"].get(stage, 0.0) for row in mine], 50)) for stage in STAGES},
            "random_restart_success": statistics.fmean(row["random_restart_lm"]["success"] for row in mine),
            "random_restart_latency_s": percentiles([row["random_restart_lm"]["elapsed_s"] for row in mine]),
        }
    if args.node:
        overhead = node_round_trips(goals, args.timeout, args.repeats)
        for name, values in overhead.items():
            summary[name]["ros_overhead_s"] = percentiles(values)
        summary["all"]["ros_overhead_s"] = percentiles([v for values in overhead.values() for v in values])

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": ".venv/bin/python bench/ik_latency.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "device": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "torch_threads": args.threads, "load_average_at_end": os.getloadavg(), "engine_device": args.device,
                   "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
