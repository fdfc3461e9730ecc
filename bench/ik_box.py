"""Paper Table 2 on this implementation: collision-free IK for goals inside an open box (`box` scene).

Goals: hand (panda_hand) positions drawn uniformly, with a fixed seed, in the free interior of the box,
each posed twice: with a top-down-ish hand orientation (hand z within `--max-tilt-deg` of straight down,
any yaw) and position-only. A goal counts only if some method, or a long search by the two complete
baselines, finds an exact-mesh collision-free solution; the others are dropped and counted.

Methods, each with the same per-goal timeout:
- `mace`: IKEngine, default config, its LM polish switched off (refine_max_iterations 0): tuned samples.
- `mace_lm`: IKEngine, default config: what GetIK returns (MACE + batched LM, collision-aware).
- `mace_seeded_lm`: `mace`'s samples seed `random_restart_lm`, which then restarts randomly for the rest of
  the timeout (the paper's "MACE + MoveIt").
- `random_restart_lm`, `pytorch_kinematics`, `frankik_analytical`: bench/ik_baselines.py.

Success: the method's first answer is within Franka's joint limits, within the success tolerances below
of the goal, and collision-free under PyBullet's exact meshes. Every solution MACE returns (all ranks) is
also checked against the exact meshes.

    PYTHONPATH=. .venv/bin/python bench/ik_box.py                       # 60 positions x {pose, position}
    PYTHONPATH=. .venv/bin/python bench/ik_box.py --num-positions 5 --methods random_restart_lm frankik_analytical
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib
import numpy as np
import torch
from scipy.spatial.transform import Rotation

from bench.ik_baselines import TIP_LINK, FrankIKAnalytical, IKBaseline, PytorchKinematicsIK, RandomRestartIK
from mace_ros.core.ik_domain import IKGoal, goal_errors
from mace_ros.core.ik_engine import IKEngine, IKRequest
from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.resources import default_parameters
from mace_ros.core.scene import Box, Scene, load_goals

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

ROOT = Path(__file__).resolve().parents[1]
SUCCESS_POSITION_TOLERANCE_M = 1e-4
SUCCESS_ORIENTATION_TOLERANCE_RAD = 1e-3
METHODS = ("mace", "mace_lm", "mace_seeded_lm", "random_restart_lm", "pytorch_kinematics", "frankik_analytical")
MACE_ENGINE_METHODS = ("mace", "mace_lm")  # answered by IKEngine itself: all its ranked solutions are checked
# Paper Table 2 (GTX 1080 Ti, IsaacGym): mean time and position error.
PAPER_TABLE2 = {
    "mace": {"time_s": 0.106, "position_error_cm": "1.92 ± 3.01"},
    "moveit": {"time_s": 1.553, "position_error_cm": "< 1e-5"},
    "mace_moveit": {"time_s": 0.641},
}


@dataclass(frozen=True)
class BoxGoal:
    index: int
    position: np.ndarray  # [3]
    rotation: np.ndarray | None  # [3, 3]; None = position only

    @property
    def kind(self) -> str:
        return "position" if self.rotation is None else "pose"

    def ik_goal(self) -> IKGoal:
        rotation = None if self.rotation is None else torch.as_tensor(self.rotation, dtype=torch.float64)
        return IKGoal(torch.as_tensor(self.position, dtype=torch.float64), rotation, TIP_LINK)


@dataclass
class Answer:
    """One method's answer to one goal: its first solution (if any), every solution it returned, timing."""

    q: np.ndarray | None
    all_solutions: np.ndarray  # [K, 7]
    elapsed_s: float
    attempts: int = 0
    tuning_time_s: float | None = None


def ray_hit(origin: np.ndarray, direction: np.ndarray, scene: Scene) -> tuple[float, Box | None]:
    """Distance along a unit ray to the first obstacle box it enters, and that box (slab test)."""
    nearest, hit = np.inf, None
    for box in scene.boxes:
        local_origin = (origin - box.center) @ box.rotation
        local_direction = direction @ box.rotation
        with np.errstate(divide="ignore", invalid="ignore"):
            t_low = (-box.half_extents - local_origin) / local_direction
            t_high = (box.half_extents - local_origin) / local_direction
        parallel = np.abs(local_direction) < 1e-12
        inside_slab = np.abs(local_origin) <= box.half_extents
        t_enter = np.where(parallel, np.where(inside_slab, -np.inf, np.inf), np.minimum(t_low, t_high)).max()
        t_exit = np.where(parallel, np.where(inside_slab, np.inf, -np.inf), np.maximum(t_low, t_high)).min()
        if t_enter <= t_exit and 0.0 <= t_enter < nearest:
            nearest, hit = float(t_enter), box
    return nearest, hit


def top_z(box: Box) -> float:
    return float(box.center[2] + np.abs(box.rotation[2]) @ box.half_extents)


def box_interior(scene: Scene, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned cavity around a point `inside` an open box: walls in ±x and ±y and the floor found by
    ray casts from it, capped at the lowest of the four walls' rims. Fails if the point is not enclosed."""
    lower, upper = inside.copy(), inside.copy()
    rims = []
    for axis, sign in ((0, -1), (0, 1), (1, -1), (1, 1), (2, -1)):
        direction = np.zeros(3)
        direction[axis] = sign
        distance, wall = ray_hit(inside, direction, scene)
        if wall is None:
            raise ValueError(f"{inside.tolist()} is not enclosed by the scene along axis {'xyz'[axis]}{'+-'[sign < 0]}")
        (lower if sign < 0 else upper)[axis] = inside[axis] + sign * distance
        if axis < 2:
            rims.append(top_z(wall))
    upper[2] = min(rims)
    return lower, upper


def point_box_distance(points: np.ndarray, box: Box) -> np.ndarray:
    """Euclidean distance [P] from points [P, 3] to an oriented box (0 inside)."""
    local = (points - box.center) @ box.rotation
    outside = np.maximum(np.abs(local) - box.half_extents, 0.0)
    return np.linalg.norm(outside, axis=-1)


def top_down_rotation(rng: np.random.Generator, max_tilt_rad: float) -> np.ndarray:
    """Hand frame with its z axis (the approach direction) within max_tilt of straight down, any yaw."""
    yaw = Rotation.from_euler("z", rng.uniform(-np.pi, np.pi))
    tilt_axis = np.array([*rng.normal(size=2), 0.0])
    tilt = Rotation.from_rotvec(tilt_axis / np.linalg.norm(tilt_axis) * max_tilt_rad * np.sqrt(rng.uniform()))
    pointing_down = Rotation.from_euler("x", np.pi)
    return (tilt * pointing_down * yaw).as_matrix()


def sample_goals(scene: Scene, inside: np.ndarray, num_positions: int, clearance_m: float, min_height_m: float,
                 max_tilt_rad: float, rng: np.random.Generator) -> list[BoxGoal]:
    """num_positions positions uniform in the cavity around `inside`, at least min_height above its floor and
    clearance from every obstacle, each as a pose goal and as a position goal."""
    lower, upper = box_interior(scene, inside)
    lower[2] += min_height_m
    if lower[2] >= upper[2]:
        raise ValueError(f"the cavity is {upper[2] - lower[2] + min_height_m:.3f} m deep, less than min_height {min_height_m} m")
    positions: list[np.ndarray] = []
    while len(positions) < num_positions:
        candidate = rng.uniform(lower, upper)
        if min(point_box_distance(candidate[None], box)[0] for box in scene.boxes) >= clearance_m:
            positions.append(candidate)
    goals = [BoxGoal(2 * i, position, top_down_rotation(rng, max_tilt_rad)) for i, position in enumerate(positions)]
    goals += [BoxGoal(2 * i + 1, position, None) for i, position in enumerate(positions)]
    return sorted(goals, key=lambda goal: goal.index)


class Judge:
    """Scores a configuration against a goal: errors by our FK, limits, exact-mesh collision."""

    def __init__(self, exact_checker: PyBulletCollisionChecker, scene: Scene):
        self.exact_checker = exact_checker
        self.scene = scene
        self.kinematics = PandaKinematics("cpu", torch.float64)

    def judge(self, q: np.ndarray, goal: BoxGoal) -> dict[str, Any]:
        q_tensor = torch.as_tensor(q, dtype=torch.float64)[None]
        position_error, orientation_error = goal_errors(self.kinematics, q_tensor, goal.ik_goal())
        collision_free = not bool(self.exact_checker.check(q_tensor, self.scene).in_collision[0])
        within_limits = bool(self.kinematics.within_limits(q_tensor)[0])
        reaches = float(position_error) <= SUCCESS_POSITION_TOLERANCE_M and float(orientation_error) <= SUCCESS_ORIENTATION_TOLERANCE_RAD
        return {
            "position_error_m": float(position_error),
            "orientation_error_rad": float(orientation_error) if goal.rotation is not None else None,
            "collision_free_exact": collision_free,
            "within_limits": within_limits,
            "success": reaches and collision_free and within_limits,
        }

    def collision_count(self, solutions: np.ndarray) -> int:
        if solutions.shape[0] == 0:
            return 0
        return int(self.exact_checker.check(torch.as_tensor(solutions, dtype=torch.float64), self.scene).in_collision.sum())


def mace_solver(engine: IKEngine, scene: Scene, timeout_s: float) -> Callable[[BoxGoal], Answer]:
    def solve(goal: BoxGoal) -> Answer:
        quaternion = None
        if goal.rotation is not None:
            quaternion = matrix_to_quaternion(torch.as_tensor(goal.rotation, dtype=torch.float64)).numpy()
        request = IKRequest(
            goal.position, quaternion, TIP_LINK,
            num_solutions=engine.config["num_solutions"],
            num_samples=engine.config["num_samples"],
            tuning_iterations=engine.config["tuning_iterations"],
            timeout_s=timeout_s,
            random_seed=goal.index,
        )
        started = time.monotonic()
        result = engine.solve(request, scene)
        elapsed = time.monotonic() - started
        first = result.solutions[0] if len(result.solutions) else None
        return Answer(first, result.solutions, elapsed, result.tuning_iterations_done, result.tuning_time_s)

    return solve


def mace_seeded_solver(mace_solve: Callable[[BoxGoal], Answer], random_restart: RandomRestartIK, scene: Scene, timeout_s: float,
                       seed: int) -> Callable[[BoxGoal], Answer]:
    """The paper's "MACE + MoveIt": MACE's samples seed the KDL-like solver, which then restarts randomly
    for what is left of the timeout."""
    def solve(goal: BoxGoal) -> Answer:
        mace_answer = mace_solve(goal)
        rng = np.random.default_rng([seed, goal.index])
        q, attempts, elapsed = random_restart.solve(goal.position, goal.rotation, scene, max(timeout_s - mace_answer.elapsed_s, 0.0), rng,
                                                    first_seeds=mace_answer.all_solutions)
        return Answer(q, np.zeros((0, 7)) if q is None else q[None], mace_answer.elapsed_s + elapsed, attempts, mace_answer.tuning_time_s)

    return solve


def baseline_solver(baseline: IKBaseline, scene: Scene, timeout_s: float, seed: int) -> Callable[[BoxGoal], Answer]:
    def solve(goal: BoxGoal) -> Answer:
        rng = np.random.default_rng([seed, goal.index])
        q, attempts, elapsed = baseline.solve(goal.position, goal.rotation, scene, timeout_s, rng)
        return Answer(q, np.zeros((0, 7)) if q is None else q[None], elapsed, attempts)

    return solve


def build_solvers(methods: list[str], exact: PyBulletCollisionChecker, scene: Scene, timeout_s: float, seed: int,
                  device: str = "cpu") -> dict[str, Callable[[BoxGoal], Answer]]:
    solvers: dict[str, Callable[[BoxGoal], Answer]] = {}
    for method in methods:
        if method == "mace":
            solvers[method] = mace_solver(IKEngine({"refine_max_iterations": 0}, device=device), scene, timeout_s)
        elif method == "mace_lm":
            solvers[method] = mace_solver(IKEngine(device=device), scene, timeout_s)
        elif method == "mace_seeded_lm":
            mace_solve = mace_solver(IKEngine({"refine_max_iterations": 0}, device=device), scene, timeout_s)
            solvers[method] = mace_seeded_solver(mace_solve, RandomRestartIK(exact), scene, timeout_s, seed)
        else:
            baseline_class = {cls.name: cls for cls in (RandomRestartIK, PytorchKinematicsIK, FrankIKAnalytical)}[method]
            solvers[method] = baseline_solver(baseline_class(exact), scene, timeout_s, seed)
    return solvers


def has_solution_by_long_search(goal: BoxGoal, exact: PyBulletCollisionChecker, scene: Scene, seconds: float, seed: int) -> bool:
    for baseline in (FrankIKAnalytical(exact), RandomRestartIK(exact)):
        rng = np.random.default_rng([seed, goal.index, 1])
        if baseline.solve(goal.position, goal.rotation, scene, seconds / 2, rng)[0] is not None:
            return True
    return False


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[dict[str, Any]], method: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    rows = [r[method] for r in records if r["counted"] and r["kind"] in kinds]
    answered = [row for row in rows if row["answered"]]
    latencies = [row["elapsed_s"] for row in rows]
    solved_latencies = [row["elapsed_s"] for row in rows if row["success"]]
    position_errors = np.array([row["position_error_m"] for row in answered])
    summary: dict[str, Any] = {
        "goals": len(rows),
        "success_rate": float(np.mean([row["success"] for row in rows])) if rows else None,
        "answered_rate": len(answered) / len(rows) if rows else None,
        "position_error_m_mean": float(position_errors.mean()) if answered else None,
        "position_error_m_std": float(position_errors.std()) if answered else None,
        "latency_s_p50": percentile(latencies, 50),
        "latency_s_p95": percentile(latencies, 95),
        "latency_s_mean": float(np.mean(latencies)) if latencies else None,
        "solved_latency_s_p50": percentile(solved_latencies, 50),
        "solved_latency_s_p95": percentile(solved_latencies, 95),
        "first_answer_exact_collision_rate": float(np.mean([not row["collision_free_exact"] for row in answered])) if answered else None,
    }
    if method in MACE_ENGINE_METHODS:
        returned = sum(row["returned_solutions"] for row in rows)
        summary["returned_solutions"] = returned
        summary["returned_solutions_exact_collision_rate"] = sum(row["returned_in_collision"] for row in rows) / returned if returned else None
        summary["tuning_time_s_mean"] = float(np.mean([row["tuning_time_s"] for row in rows])) if rows else None
        summary["tuning_time_s_p50"] = percentile([row["tuning_time_s"] for row in rows], 50)
        summary["tuning_iterations_mean"] = float(np.mean([row["attempts"] for row in rows])) if rows else None
    else:
        summary["attempts_mean"] = float(np.mean([row["attempts"] for row in rows])) if rows else None
    return summary


def plot_latency_cdf(records: list[dict[str, Any]], methods: list[str], device: str, command: str, timeout_s: float, path: Path) -> None:
    """Fraction of counted goals solved (success criterion) within t, per method: plateaus at the success rate."""
    counted = [r for r in records if r["counted"]]
    right_end = 1.5 * max([timeout_s] + [r[method]["elapsed_s"] for r in counted for method in methods])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        solved = np.sort([r[method]["elapsed_s"] for r in counted if r[method]["success"]])
        fraction = np.arange(1, len(solved) + 1) / max(len(counted), 1)
        times = np.concatenate([[1e-3], solved, [right_end]])
        label = f"{method} ({len(solved) / max(len(counted), 1):.0%})"
        axis.step(times, np.concatenate([[0.0], fraction, fraction[-1:] if len(solved) else [0.0]]), where="post", label=label)
    axis.axvline(timeout_s, color="grey", linestyle=":", label="timeout")
    axis.set_xscale("log")
    axis.set_xlabel("time per goal (s)")
    axis.set_ylabel("fraction of goals solved")
    axis.set_ylim(0, 1.02)
    axis.set_title(f"IK inside the box: {len(counted)} goals\n{device}", fontsize=9)
    axis.legend(fontsize=8, loc="upper left")
    figure.text(0.01, 0.01, command, fontsize=6, color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=130)
    plt.close(figure)


def code_version() -> dict[str, Any]:
    """The commit benchmarked and whether the engine's or the benchmark's files differ from it."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "modified_files": git("status", "--porcelain", "--", "mace_ros/core", "bench/ik_box.py", "bench/ik_baselines.py").splitlines()}


def device_description() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    return {
        "platform_processor": platform.processor(),
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=ROOT / "config/scenes/box.yaml", help="an open-box scene whose first example goal is inside the box")
    parser.add_argument("--num-positions", type=int, default=60, help="interior positions; each is a pose and a position goal")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-goal timeout of every method (s)")
    parser.add_argument("--long-search", type=float, default=20.0, help="seconds of baseline search deciding that an unsolved goal is infeasible")
    parser.add_argument("--clearance", type=float, default=0.03, help="goal distance to every obstacle (m)")
    parser.add_argument("--min-height", type=float, default=0.12,
                        help="goal height above the box floor (m): a top-down hand's fingertips reach 0.11 m below its origin")
    parser.add_argument("--max-tilt-deg", type=float, default=30.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--device", default="cpu", help="torch device of the MACE methods (the baselines run on the CPU)")
    parser.add_argument("--feasible-goals-from", type=Path, default=None,
                        help="reuse the goals an earlier run's results JSON counted as feasible (skips sampling and the long searches)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_box.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "PYTHONPATH=. .venv/bin/python bench/ik_box.py " + " ".join(sys.argv[1:])

    scene_file = args.scene
    scene = Scene.load_yaml(scene_file)
    exact = PyBulletCollisionChecker()
    judge = Judge(exact, scene)
    # The scene's first example goal is inside the box: the cavity is found around it.
    if args.feasible_goals_from is None:
        goals = sample_goals(scene, load_goals(scene_file)[0].position, args.num_positions, args.clearance, args.min_height,
                             np.deg2rad(args.max_tilt_deg), np.random.default_rng(args.seed))
    else:
        goals = [
            BoxGoal(record["goal_index"], np.asarray(record["position"]), None if record["rotation"] is None else np.asarray(record["rotation"]))
            for record in json.loads(args.feasible_goals_from.read_text())["records"] if record["counted"]
        ]
    solvers = build_solvers(args.methods, exact, scene, args.timeout, args.seed, args.device)
    device, code = device_description(), code_version()  # at the start: others may edit files meanwhile
    print(json.dumps({**device, **code}))

    # One untimed call each: first-call costs (allocations, PyBullet scene upload) are not per-goal latency.
    for solve in solvers.values():
        solve(goals[0])

    records: list[dict[str, Any]] = []
    for goal in goals:
        record: dict[str, Any] = {"goal_index": goal.index, "kind": goal.kind, "position": goal.position.tolist(),
                                  "rotation": None if goal.rotation is None else goal.rotation.tolist()}
        for method, solve in solvers.items():
            answer = solve(goal)
            row: dict[str, Any] = {"answered": answer.q is not None, "elapsed_s": answer.elapsed_s, "attempts": answer.attempts,
                                   "success": False, "collision_free_exact": None, "position_error_m": None}
            if answer.q is not None:
                row.update(judge.judge(answer.q, goal))
                row["q"] = answer.q.tolist()
            if method in MACE_ENGINE_METHODS:
                row["tuning_time_s"] = answer.tuning_time_s
                row["returned_solutions"] = int(answer.all_solutions.shape[0])
                row["returned_in_collision"] = judge.collision_count(answer.all_solutions)
            record[method] = row
        solved_by = [method for method in solvers if record[method]["success"]]
        record["counted"] = bool(solved_by) or args.feasible_goals_from is not None or has_solution_by_long_search(
            goal, exact, scene, args.long_search, args.seed)
        records.append(record)
        print(f"goal {goal.index:3d} {goal.kind:8s} counted={record['counted']!s:5s} " + "  ".join(
            f"{method}={'ok' if record[method]['success'] else '--'} {record[method]['elapsed_s']:.3f}s" for method in solvers), flush=True)

    summary = {
        kinds_name: {method: summarize(records, method, kinds) for method in solvers}
        for kinds_name, kinds in (("all", ("pose", "position")), ("pose", ("pose",)), ("position", ("position",)))
    }
    result = {
        "command": command,
        "code": code,
        "device": device,
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "scene", "feasible_goals_from")}, "scene": str(args.scene.resolve().relative_to(ROOT)) if args.scene.resolve().is_relative_to(ROOT) else str(args.scene),
                     "feasible_goals_from": None if args.feasible_goals_from is None else str(args.feasible_goals_from),
                     "success_position_tolerance_m": SUCCESS_POSITION_TOLERANCE_M,
                     "success_orientation_tolerance_rad": SUCCESS_ORIENTATION_TOLERANCE_RAD,
                     "mace_config": default_parameters("ik")},
        "goals_sampled": len(goals),
        "goals_counted": sum(r["counted"] for r in records),
        "goals_dropped_infeasible": sum(not r["counted"] for r in records),
        "paper_table2": PAPER_TABLE2,
        "summary": summary,
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot_latency_cdf(records, list(solvers), f"{device['cpu_model']}, {device['nproc']} cores, torch threads {device['torch_threads']}",
                     command, args.timeout, args.out.with_name(args.out.stem + "_latency.png"))
    print(json.dumps({"goals_counted": result["goals_counted"], "goals_dropped": result["goals_dropped_infeasible"], "summary": summary["all"]}, indent=1))


if __name__ == "__main__":
    main()
