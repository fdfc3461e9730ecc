"""Accuracy and speed of the torch collision checker against PyBullet's exact meshes.

The checker as GetIK's refinement uses it (sphere broad phase + polytope narrow phase) and its
sphere model alone (`narrow_phase=False`, what MACE's tuning scores with) are both measured.

For every shipped scene: uniformly random configurations within the joint limits (the IK prior's
support) and configurations scattered around the scene goals' solutions (joint noise 0.15 rad, where
obstacles are near), each checked by both backends. Reports false "free" (torch free, meshes in
collision: the rate DESIGN.md §6 bounds at 0.5%) and false "collision" (torch conservative), and
the wall-clock time of one batched torch check of 4096 configurations (float32; min and median of 10,
with 1 intra-op thread and with torch's default).

    PYTHONPATH=. python bench/collision_accuracy.py                      # 10,000 configurations per scene
    PYTHONPATH=. python bench/collision_accuracy.py --num-configs 2000   # quicker

With `--clutter N`, every scene also holds N small boxes and N/4 spheres and cylinders scattered around
the arm (Scene.with_clutter), as a marker flood brings them; `--dense-broad-phase` turns the broad
phase's link-level prefilter off, for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from mace_ros.core import collision
from mace_ros.core.collision import TorchCollisionChecker
from mace_ros.core.kinematics import PandaKinematics
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Scene

ROOT = Path(__file__).resolve().parents[1]
SCENES = ("wall", "window", "box", "shelf", "table")


def rates(torch_flags: torch.Tensor, exact_flags: torch.Tensor) -> dict[str, float]:
    return {
        "false_free_pct": 100 * float((~torch_flags & exact_flags).float().mean()),
        "false_collision_pct": 100 * float((torch_flags & ~exact_flags).float().mean()),
        "exact_collision_pct": 100 * float(exact_flags.float().mean()),
        "torch_collision_pct": 100 * float(torch_flags.float().mean()),
    }


def near_goal_configurations(scene_file: Path, count: int, generator: torch.Generator, kinematics: PandaKinematics) -> torch.Tensor:
    goals = yaml.safe_load(scene_file.read_text())["goals"]
    solutions = torch.tensor([goal["example_q"] for goal in goals], dtype=torch.float32)
    picks = torch.randint(len(goals), (count,), generator=generator)
    return kinematics.clamp_to_limits(solutions[picks] + 0.15 * torch.randn(count, 7, generator=generator))


def time_check(checker: TorchCollisionChecker, scene: Scene, q: torch.Tensor, narrow_phase: bool, repeats: int = 10) -> dict[str, float]:
    """Milliseconds of one batched check (scene prepared once, as in tuning): min and median of `repeats`.

    The minimum is the least disturbed by other processes on a shared machine; the median shows the disturbance.
    """
    prepared = checker.prepare(scene)
    checker.check(q, prepared, narrow_phase)
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        checker.check(q, prepared, narrow_phase)
        durations.append(time.perf_counter() - started)
    return {"min": 1000 * min(durations), "median": 1000 * statistics.median(durations)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-configs", type=int, default=10000, help="uniform random configurations per scene")
    parser.add_argument("--num-near", type=int, default=2500, help="configurations near the goals' solutions per scene")
    parser.add_argument("--timing-batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--clutter", type=int, default=0, help="small primitives added to every scene (Scene.with_clutter)")
    parser.add_argument("--dense-broad-phase", action="store_true", help="no link-level prefilter in the broad phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/collision_accuracy.json")
    args = parser.parse_args()
    if args.dense_broad_phase:
        collision.SPARSE_BROAD_PHASE_MIN_PRIMITIVES = 1 << 62

    kinematics = PandaKinematics()
    checker = TorchCollisionChecker(dtype=torch.float32)
    exact = PyBulletCollisionChecker()
    generator = torch.Generator().manual_seed(args.seed)
    default_threads = torch.get_num_threads()
    rows = []
    for name in args.scenes:
        scene_file = ROOT / "config/scenes" / f"{name}.yaml"
        scene = Scene.load_yaml(scene_file)
        if args.clutter:
            scene = scene.with_clutter(args.clutter, seed=args.seed)
        row: dict = {"scene": name}
        for kind, q in (
            ("uniform", kinematics.random_configurations(args.num_configs, generator)),
            ("near_goals", near_goal_configurations(scene_file, args.num_near, generator, kinematics)),
        ):
            mine = checker.check(q, scene)
            spheres_only = checker.check(q, scene, narrow_phase=False)
            started = time.perf_counter()
            truth = exact.check(q, scene)
            exact_seconds = time.perf_counter() - started
            row[kind] = {
                "num_configs": int(q.shape[0]),
                **rates(mine.in_collision, truth.in_collision),
                "self_false_free_pct": rates(mine.self_collision, truth.self_collision)["false_free_pct"],
                "self_false_collision_pct": rates(mine.self_collision, truth.self_collision)["false_collision_pct"],
                "spheres_only": rates(spheres_only.in_collision, truth.in_collision),
                "pybullet_ms_per_config": 1000 * exact_seconds / q.shape[0],
            }
        timing_q = kinematics.random_configurations(args.timing_batch, generator)
        row["torch_check_ms"], row["spheres_only_check_ms"] = {}, {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            row["torch_check_ms"][str(threads)] = time_check(checker, scene, timing_q, narrow_phase=True)
            row["spheres_only_check_ms"][str(threads)] = time_check(checker, scene, timing_q, narrow_phase=False)
        torch.set_num_threads(default_threads)
        rows.append(row)
        print(f"{name}: done", flush=True)
    exact.close()

    device = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "default_threads": default_threads,
        "load_average_at_end": os.getloadavg(),
        "dtype": "float32",
        "max_batch": checker.max_batch,
    }
    result = {
        "command": "PYTHONPATH=. python bench/collision_accuracy.py " + " ".join(
            f"--{key.replace('_', '-')}" + ("" if value is True else f" {' '.join(value) if isinstance(value, list) else value}")
            for key, value in vars(args).items() if key != "out" and value is not False
        ),
        "device": device,
        "num_robot_spheres": int(checker.spheres.radii.shape[0]),
        "scenes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    thread_keys = sorted(rows[0]["torch_check_ms"], key=int)
    print(f"\nDevice: {device['cpu']}, {device['cpu_count']} cores, torch {device['torch']}, load average {device['load_average_at_end'][0]:.1f} "
          f"(other processes share the cores), torch check passes of {checker.max_batch} configurations")
    print(f"Command: {result['command']}\n")
    header = ["scene", "configs", "exact coll. %", "torch coll. %", "false free %", "false coll. %",
              "near-goal false free %", "near-goal false coll. %", "spheres only: near-goal false free % / false coll. %"] + [
                  f"{args.timing_batch} configs ms, {k} thr., narrow / spheres only (median)" for k in thread_keys]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        uniform, near = row["uniform"], row["near_goals"]
        cells = [row["scene"], str(uniform["num_configs"]), f"{uniform['exact_collision_pct']:.1f}", f"{uniform['torch_collision_pct']:.1f}",
                 f"{uniform['false_free_pct']:.2f}", f"{uniform['false_collision_pct']:.2f}",
                 f"{near['false_free_pct']:.2f}", f"{near['false_collision_pct']:.2f}",
                 f"{near['spheres_only']['false_free_pct']:.2f} / {near['spheres_only']['false_collision_pct']:.2f}"] + [
                     f"{row['torch_check_ms'][k]['min']:.0f} ({row['torch_check_ms'][k]['median']:.0f}) / "
                     f"{row['spheres_only_check_ms'][k]['min']:.0f} ({row['spheres_only_check_ms'][k]['median']:.0f})" for k in thread_keys]
        print("| " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
