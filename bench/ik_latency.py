"""GetIK latency by stage, beside random-restart IK on the same goals, and through the node (issue 8).

Scenes: `open` (every goal of the shipped scenes, with no obstacles) and each shipped scene
(`config/scenes/*.yaml`, its pose or position goals for panda_hand). For every goal, `--repeats`
requests with different random seeds to `IKEngine.solve` (default config, `--timeout` s,
`--num-solutions` asked: 1 as a MoveIt IK plugin asks, or the node's default), recording success
(exact-mesh collision-free, error <= 1e-4 m / 1e-3 rad), latency and `IKResult.stage_times_s`
(setup, fast, tuning, polish, diagnosis, answer). The KDL-like random-restart LM with an exact-mesh
validity check (`bench/ik_baselines.py`) answers the same goals in the same run.

Scene warm start: `--passes 2` sends the same goal set of a scene twice in a row to the same engine
(pass 2 right after pass 1: requests never wait for the scene's background tuning), and reports each
pass's p50. The background tunes only while no request runs: here in the `--gap` s after each request
(a client planning or moving between IK queries); the baseline's requests pause it too. With `--node`, the same requests also go through the installed node over
ROS 2 (`install/setup.bash` sourced), one node per scene: the round trip's p50 per pass, and the ROS
overhead (round trip minus the engine time the response reports).

    .venv/bin/python bench/ik_latency.py                                    # engine + baseline
    set +u; source install/setup.bash; set -u; .venv/bin/python bench/ik_latency.py --node --passes 2
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
from bench.goal_sets import SCENES, TIP_LINK, ik_goal, percentiles, scene_and_goals  # noqa: E402
from bench.ik_baselines import RandomRestartIK  # noqa: E402
from mace_ros.core.ik_domain import IKGoal, goal_errors  # noqa: E402
from mace_ros.core.ik_engine import IKEngine, IKRequest  # noqa: E402
from mace_ros.core.kinematics import PandaKinematics  # noqa: E402
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker  # noqa: E402
from mace_ros.core.scene import Scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POSITION_TOLERANCE_M, ORIENTATION_TOLERANCE_RAD = 1e-4, 1e-3
STAGES = ("setup", "fast", "tuning", "polish", "diagnosis", "answer")


def solved(q: np.ndarray | None, goal: IKGoal, scene: Scene, exact: PyBulletCollisionChecker, kinematics: PandaKinematics) -> bool:
    if q is None:
        return False
    q_tensor = torch.as_tensor(q, dtype=torch.float64)[None]
    position_error, orientation_error = goal_errors(kinematics, q_tensor, goal)
    close = float(position_error[0]) <= POSITION_TOLERANCE_M and float(orientation_error[0]) <= ORIENTATION_TOLERANCE_RAD
    return close and not bool(exact.check(q_tensor, scene).in_collision[0])


def all_solved(solutions: np.ndarray, goal: IKGoal, scene: Scene, exact: PyBulletCollisionChecker, kinematics: PandaKinematics) -> bool:
    """Every returned configuration within tolerance and exactly collision-free (at least one returned)."""
    return len(solutions) > 0 and all(solved(q, goal, scene, exact, kinematics) for q in solutions)


def engine_rows(args: argparse.Namespace, engine: IKEngine, baseline: RandomRestartIK, exact: PyBulletCollisionChecker) -> list[dict[str, Any]]:
    """Each scene's goal set `--passes` times in a row to one engine (a fresh engine per scene, so that
    pass 1 starts cold), the baseline beside every request."""
    kinematics = PandaKinematics(dtype=torch.float64)
    rows: list[dict[str, Any]] = []
    for name in args.scenes:
        scene, goals = scene_and_goals(name)
        engine.forget_scenes()
        for pass_index in range(1, args.passes + 1):
            for goal_index, goal in enumerate(goals):
                target = ik_goal(goal)
                for repeat in range(args.repeats):
                    request = IKRequest(np.asarray(goal.position), None if goal.quaternion_wxyz is None else np.asarray(goal.quaternion_wxyz),
                                        TIP_LINK, args.num_solutions or engine.config["num_solutions"], engine.config["num_samples"],
                                        engine.config["tuning_iterations"], args.timeout, random_seed=repeat + 1)
                    result = engine.solve(request, scene)
                    rng = np.random.default_rng(repeat + 1)
                    rotation = None if target.rotation is None else target.rotation.numpy()
                    with engine.warm_start.request():  # the background pauses for the baseline as for a request
                        q, _, baseline_s = baseline.solve(np.asarray(goal.position), rotation, scene, args.timeout, rng)
                    time.sleep(args.gap)
                    rows.append({
                        "scene": name, "goal": goal_index, "kind": "position" if rotation is None else "pose", "repeat": repeat, "pass": pass_index,
                        "getik": {"success": result.success and all_solved(result.solutions, target, scene, exact, kinematics),
                                  "solutions": len(result.solutions), "elapsed_s": result.elapsed_s, "rounds": result.rounds,
                                  "stage_times_s": result.stage_times_s},
                        "random_restart_lm": {"success": solved(q, target, scene, exact, kinematics), "elapsed_s": baseline_s},
                    })
            print(f"{name} pass {pass_index} done", flush=True)
    return rows


def node_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Round trip, success and reported engine time of each request through the installed node, one
    node per scene (static scene = the scene file; `open` = none), the passes in a row."""
    from geometry_msgs.msg import Point, Quaternion

    from mace_ros.ros.client import MaceClient, NodeProcess, installed_executable
    from mace_ros.srv import GetIK

    isolation = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(random.randint(1, 101))}
    os.environ.update(isolation)
    rows: list[dict[str, Any]] = []
    for scene_name in args.scenes:
        _, goals = scene_and_goals(scene_name)
        parameters = [] if scene_name == "open" else ["-p", f"scene:={scene_name}"]
        if args.warm_start_iterations is not None:
            parameters += ["-p", f"ik.scene_warm_start_iterations:={args.warm_start_iterations}"]
        node = NodeProcess(installed_executable(), parameters, env=isolation)
        client = MaceClient("ik_latency_bench")
        try:
            client.wait_for_services(120.0, alive=node)
            warm_up = True  # one untimed request first: it waits for the engines to load
            for pass_index in range(1, args.passes + 1):
                for goal_index, goal in enumerate(goals):
                    for repeat in range(-1 if warm_up else 0, args.repeats):
                        request = GetIK.Request(timeout_s=args.timeout, random_seed=max(repeat, 0) + 1, tip_link=TIP_LINK,
                                                num_solutions=args.num_solutions)
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
                        round_trip_s = time.monotonic() - started
                        if repeat < 0:
                            warm_up = False
                            continue
                        rows.append({"scene": scene_name, "goal": goal_index, "repeat": repeat, "pass": pass_index, "success": bool(response.success),
                                     "round_trip_s": round_trip_s, "overhead_s": round_trip_s - response.elapsed_s})
                        time.sleep(args.gap)
                print(f"node {scene_name} pass {pass_index} done", flush=True)
        finally:
            client.close()
            node.stop()
    return rows


def summary_of(rows: list[dict[str, Any]], node: list[dict[str, Any]], scenes: tuple[str, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in scenes:
        mine = [row for row in rows if row["scene"] == name]
        through_node = [row for row in node if row["scene"] == name]
        first = [row for row in mine if row["pass"] == 1]
        entry: dict[str, Any] = {"passes": {}}
        if first:
            entry.update({
                "requests_per_pass": len(first),
                "getik_stage_p50_s": {stage: float(np.percentile([row["getik"]["stage_times_s"].get(stage, 0.0) for row in first], 50))
                                      for stage in STAGES},
                "getik_solutions_p50": float(np.percentile([row["getik"]["solutions"] for row in first], 50)),
                "random_restart_success": statistics.fmean(row["random_restart_lm"]["success"] for row in first),
            })
        for pass_index in sorted({row["pass"] for row in mine + through_node}):
            this = [row for row in mine if row["pass"] == pass_index]
            this_node = [row for row in through_node if row["pass"] == pass_index]
            results: dict[str, Any] = {}
            if this:
                results.update({
                    "getik_success": statistics.fmean(row["getik"]["success"] for row in this),
                    "getik_latency_s": percentiles([row["getik"]["elapsed_s"] for row in this]),
                    "random_restart_latency_s": percentiles([row["random_restart_lm"]["elapsed_s"] for row in this]),
                })
            if this_node:
                results.update({
                    "node_success": statistics.fmean(row["success"] for row in this_node),
                    "node_round_trip_s": percentiles([row["round_trip_s"] for row in this_node]),
                    "ros_overhead_s": percentiles([row["overhead_s"] for row in this_node]),
                })
            entry["passes"][pass_index] = results
        summary[name] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="requests per goal (random seeds 1..repeats)")
    parser.add_argument("--passes", type=int, default=1, help="times each scene's goal set is sent in a row (2: scene warm start)")
    parser.add_argument("--gap", type=float, default=0.05, help="idle seconds after each request (the scene warm start tunes only then)")
    parser.add_argument("--num-solutions", type=int, default=0, help="solutions asked per request (0 = the node's default, ik.num_solutions)")
    parser.add_argument("--scenes", nargs="+", choices=SCENES, default=list(SCENES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of the engine (the baseline runs on the CPU)")
    parser.add_argument("--node", action="store_true", help="also send the requests through the installed node")
    parser.add_argument("--warm-start-iterations", type=int, help="ik.scene_warm_start_iterations of engine and node (default: the config's)")
    parser.add_argument("--no-engine", action="store_true", help="only the node's requests (with --node)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_latency.json")
    args = parser.parse_args()
    args.scenes = tuple(args.scenes)
    torch.set_num_threads(args.threads)

    exact = PyBulletCollisionChecker()
    config = {} if args.warm_start_iterations is None else {"scene_warm_start_iterations": args.warm_start_iterations}
    engine = IKEngine(config, device=args.device)
    rows = [] if args.no_engine else engine_rows(args, engine, RandomRestartIK(exact), exact)
    node = node_rows(args) if args.node else []
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    summary = summary_of(rows, node, args.scenes)
    result = {
        "command": ".venv/bin/python bench/ik_latency.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "working_tree_modified": dirty,
        "engine_config": engine.config,
        "device": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "torch_threads": args.threads, "load_average_at_end": os.getloadavg(), "engine_device": args.device,
                   "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "summary": summary,
        "rows": rows,
        "node_rows": node,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
