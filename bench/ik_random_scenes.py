"""GetIK on procedurally generated scenes no setting was tuned on, beside random-restart IK (held-out scenes).

Each scene draws, with its own seed: a table top under the workspace (sometimes), a shelf of 2-4 boards
with side walls at a random distance and yaw (sometimes), a wall panel (sometimes), and 2 to `--objects`
loose boxes, spheres and cylinders of 2-20 cm in front of the robot. Goals are the panda_hand poses of
uniformly random configurations that PyBullet's exact meshes call free in that scene (so every goal is
feasible), drawn among the obstacles: some part of the arm within `--near` m of one by the sphere model
(whose spheres cover the meshes; a negative value: the spheres overlap it). A third are asked as
position-only goals. Every goal goes to `IKEngine.solve` (default config, `--num-solutions`, `--timeout`
s) and to the KDL-like random-restart LM with an exact-mesh check (`bench/ik_baselines.py`) with the
same timeout. Success: within 1e-4 m / 1e-3 rad by our FK and free under the exact meshes.

    PYTHONPATH=. .venv/bin/python bench/ik_random_scenes.py      # -> bench/results/ik_random_scenes.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.engine_settings import engine_settings  # noqa: E402
from bench.ik_baselines import RandomRestartIK  # noqa: E402
from bench.ik_latency import all_solved, solved  # noqa: E402
from mace_ros.core.collision import TorchCollisionChecker  # noqa: E402
from mace_ros.core.ik_domain import IKGoal  # noqa: E402
from mace_ros.core.ik_engine import IKEngine, IKRequest  # noqa: E402
from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion, quaternion_to_matrix  # noqa: E402
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker  # noqa: E402
from mace_ros.core.scene import Box, Cylinder, Scene, Sphere  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIP_LINK = "panda_hand"


def yaw_quaternion(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def random_scene(rng: np.random.Generator, max_objects: int = 12) -> Scene:
    """Furniture and loose objects in front of the robot, in the base frame (z up, x forward)."""
    boxes: list[Box] = []
    spheres: list[Sphere] = []
    cylinders: list[Cylinder] = []
    if rng.random() < 0.6:  # a table top, clear of the robot's base
        top = rng.uniform(-0.05, 0.25)
        near = rng.uniform(0.25, 0.4)
        depth, width, thickness = rng.uniform(0.4, 0.8), rng.uniform(0.6, 1.4), rng.uniform(0.02, 0.05)
        boxes.append(Box("table", np.array([near + depth / 2, rng.uniform(-0.2, 0.2), top - thickness / 2]),
                         np.array([1.0, 0, 0, 0]), np.array([depth / 2, width / 2, thickness / 2])))
    if rng.random() < 0.5:  # a shelf: boards and side walls, opening towards the robot
        yaw = rng.uniform(-np.pi / 3, np.pi / 3)
        distance, width, depth = rng.uniform(0.55, 0.8), rng.uniform(0.4, 0.9), rng.uniform(0.25, 0.4)
        bottom, height = rng.uniform(0.0, 0.3), rng.uniform(0.4, 0.8)
        rotation = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        centre = rotation @ np.array([distance + depth / 2, 0.0, 0.0])
        quaternion = yaw_quaternion(yaw)
        boards = int(rng.integers(2, 5))
        for index, z in enumerate(np.linspace(bottom, bottom + height, boards)):
            boxes.append(Box(f"shelf_board_{index}", centre + np.array([0, 0, z]), quaternion, np.array([depth / 2, width / 2, 0.01])))
        for side in (-1, 1):
            offset = rotation @ np.array([0.0, side * width / 2, 0.0])
            boxes.append(Box(f"shelf_side_{side}", centre + offset + np.array([0, 0, bottom + height / 2]), quaternion,
                             np.array([depth / 2, 0.01, height / 2])))
        back = rotation @ np.array([depth / 2, 0.0, 0.0])
        boxes.append(Box("shelf_back", centre + back + np.array([0, 0, bottom + height / 2]), quaternion,
                         np.array([0.01, width / 2, height / 2])))
    if rng.random() < 0.3:  # a wall panel beside or in front of the robot
        yaw = rng.uniform(-np.pi, np.pi)
        direction = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        boxes.append(Box("wall", direction * rng.uniform(0.45, 0.8) + np.array([0, 0, rng.uniform(0.2, 0.6)]),
                         yaw_quaternion(yaw), np.array([0.01, rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.4)])))
    for index in range(int(rng.integers(2, max_objects + 1))):  # loose objects
        centre = np.array([rng.uniform(0.2, 0.85), rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.9)])
        quaternion = rng.normal(size=4)
        quaternion /= np.linalg.norm(quaternion)
        kind = rng.integers(3)
        if kind == 0:
            boxes.append(Box(f"object_box_{index}", centre, quaternion, rng.uniform(0.01, 0.1, 3)))
        elif kind == 1:
            spheres.append(Sphere(f"object_sphere_{index}", centre, float(rng.uniform(0.01, 0.1))))
        else:
            cylinders.append(Cylinder(f"object_cylinder_{index}", centre, quaternion, float(rng.uniform(0.01, 0.06)), float(rng.uniform(0.02, 0.12))))
    return Scene(boxes=boxes, spheres=spheres, cylinders=cylinders)


def surface_cloud(scene: Scene, spacing_m: float, rng: np.random.Generator) -> np.ndarray:
    """Points on every primitive's surface, about `spacing_m` apart, as a depth sensor that saw all of them
    would give (N, 3)."""
    meshes = []
    for box in scene.boxes:
        meshes.append(trimesh.creation.box(extents=2 * box.half_extents, transform=pose_matrix(box.center, box.rotation)))
    for sphere in scene.spheres:
        meshes.append(trimesh.creation.icosphere(subdivisions=3, radius=sphere.radius).apply_translation(sphere.center))
    for cylinder in scene.cylinders:
        meshes.append(trimesh.creation.cylinder(radius=cylinder.radius, height=2 * cylinder.half_height, sections=32,
                                                transform=pose_matrix(cylinder.center, cylinder.rotation)))
    points = [trimesh.sample.sample_surface_even(mesh, max(8, int(mesh.area / spacing_m**2)), seed=int(rng.integers(2**31)))[0]
              for mesh in meshes]
    return np.concatenate(points) if points else np.zeros((0, 3))


def pose_matrix(center: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, center
    return matrix


def feasible_goals(scene: Scene, count: int, near_m: float, rng: np.random.Generator, exact: PyBulletCollisionChecker,
                   spheres: TorchCollisionChecker, kinematics: PandaKinematics) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Hand poses of uniformly random configurations that the exact meshes call free (a third position-only),
    with the hand in front of the robot and the arm within `near_m` of an obstacle (by the sphere model's
    scene clearance, whose spheres cover the meshes): feasible by construction, and among the obstacles."""
    goals: list[tuple[np.ndarray, np.ndarray | None]] = []
    for _ in range(400):
        q = kinematics.random_configurations(512, torch.Generator().manual_seed(int(rng.integers(2**31))))
        position, rotation = kinematics.forward(q, TIP_LINK)
        near = spheres.clearances(q, scene)[0].double() < near_m
        candidates = (position[:, 0] > 0.2) & (position[:, 2] > 0.0) & near
        if not candidates.any():
            continue
        index = torch.nonzero(candidates).squeeze(-1)
        free = index[~exact.check(q[index], scene).in_collision]
        for index in free.tolist():
            quaternion = None if len(goals) % 3 == 2 else matrix_to_quaternion(rotation[index]).numpy()
            goals.append((position[index].numpy(), quaternion))
            if len(goals) == count:
                return goals
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--goals", type=int, default=6, help="goals per scene")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--near", type=float, default=0.03, help="goals' arms within this many metres of an obstacle (sphere model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=int, default=12, help="at most this many loose objects per scene")
    parser.add_argument("--num-solutions", type=int, default=1, help="solutions asked (1 as MoveIt asks; the node's default is 8)")
    parser.add_argument("--cloud", type=float, default=None, metavar="SPACING_M",
                        help="GetIK sees the obstacles only as points on their surfaces this far apart (a depth sensor's view); "
                             "the baseline and the judge keep the primitives")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an IKEngine setting instead of its default (repeatable), e.g. cloud_point_radius_m=0.005")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_random_scenes.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    exact = PyBulletCollisionChecker()
    kinematics = PandaKinematics(dtype=torch.float64)
    spheres = TorchCollisionChecker(dtype=torch.float64)
    engine = IKEngine(engine_settings(args.engine), device=args.device)
    baseline = RandomRestartIK(exact)
    rows: list[dict[str, Any]] = []
    for scene_index in range(args.scenes):
        rng = np.random.default_rng([args.seed, scene_index])
        scene = random_scene(rng, args.objects)
        goals = feasible_goals(scene, args.goals, args.near, rng, exact, spheres, kinematics)
        seen = scene if args.cloud is None else Scene(points=surface_cloud(scene, args.cloud, rng))
        for goal_index, (position, quaternion) in enumerate(goals):
            request = IKRequest(position, quaternion, TIP_LINK, args.num_solutions, engine.config["num_samples"], engine.config["tuning_iterations"],
                                args.timeout, random_seed=goal_index + 1)
            result = engine.solve(request, seen)
            target_rotation = None if quaternion is None else quaternion_to_matrix(torch.as_tensor(quaternion, dtype=torch.float64))
            target = IKGoal(torch.as_tensor(position, dtype=torch.float64), target_rotation, TIP_LINK)
            q, _, baseline_s = baseline.solve(position, None if target_rotation is None else target_rotation.numpy(), scene,
                                              args.timeout, np.random.default_rng(goal_index + 1))
            rows.append({
                "scene": scene_index, "goal": goal_index, "kind": "position" if quaternion is None else "pose",
                "primitives": len(scene.boxes) + len(scene.spheres) + len(scene.cylinders),
                "getik": {"success": bool(result.success and all_solved(result.solutions, target, scene, exact, kinematics)),
                          "elapsed_s": result.elapsed_s, "rounds": result.rounds, "message": result.message},
                "random_restart_lm": {"success": solved(q, target, scene, exact, kinematics), "elapsed_s": baseline_s},
            })
        print(f"scene {scene_index}: {len(goals)} goals", flush=True)

    def summary(method: str) -> dict[str, Any]:
        times = [row[method]["elapsed_s"] for row in rows]
        return {"success": sum(row[method]["success"] for row in rows) / len(rows),
                "p50_s": statistics.median(times), "p95_s": float(np.percentile(times, 95))}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {args.device}, torch threads 1",
        "goals": len(rows), "getik": summary("getik"), "random_restart_lm": summary("random_restart_lm"),
        "getik_failures": [row for row in rows if not row["getik"]["success"]], "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({key: report[key] for key in ("goals", "getik", "random_restart_lm")}, indent=1))


if __name__ == "__main__":
    main()
