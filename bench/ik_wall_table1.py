"""Paper Table 1 on this implementation: IK behind a wall, 10 goals, 1000 samples per model.

For each goal: the prior, the prior tuned by MACE and the prior tuned by importance sampling (Eq. 2)
each draw 1000 configurations; we report the mean paper score (0 in collision, else exp(−‖Δp‖)) and
the collision-free rate, the latter both by the torch sphere model and by PyBullet's exact meshes.

    python bench/ik_wall_table1.py --preset ik_wall_pybullet        # the paper's N, M, q, lr, steps
    python bench/ik_wall_table1.py --preset fast --iterations 100    # this project's defaults
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mace_ros.core.ik_domain import IKDomain, IKGoal
from mace_ros.core.ik_engine import IKEngine
from mace_ros.core.ik_prior import GoalConditionedPrior
from mace_ros.core.mace import PAPER_PRESETS, MacePreset, importance_sampling_tune, mace_tune
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Scene

ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLE1 = {"prior": (0.129, 0.132), "mace": (0.937, 0.941), "is": (0.317, 0.339)}


def evaluate(prior: GoalConditionedPrior, domain: IKDomain, exact: PyBulletCollisionChecker, scene: Scene, generator: torch.Generator, num_samples: int) -> dict[str, float]:
    with torch.no_grad():
        q = prior.sample(num_samples, generator)
        scores = domain.score(q)
    exact_free = ~exact.check(q, scene).in_collision
    return {
        "score": float(scores.mean()),
        "collision_free_rate_torch": float(domain.last_collision_free_rate),
        "collision_free_rate_exact": float(exact_free.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ik_wall_pybullet", help="a key of PAPER_PRESETS, or 'fast'")
    parser.add_argument("--iterations", type=int, default=None, help="override the preset's T")
    parser.add_argument("--num-goals", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_wall_table1.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    engine = IKEngine()
    scene_file = ROOT / "config/scenes/wall.yaml"
    scene = Scene.load_yaml(scene_file)
    goals = yaml.safe_load(scene_file.read_text())["goals"][: args.num_goals]
    exact = PyBulletCollisionChecker()
    if args.preset == "fast":
        config = engine.config
        preset = MacePreset(1024, config["grad_steps_per_iteration"], config["elite_quantile"], config["learning_rate"], 50)
    else:
        preset = PAPER_PRESETS[args.preset]
    if args.iterations is not None:
        preset = MacePreset(preset.num_samples, preset.grad_steps_per_iteration, preset.elite_quantile, preset.learning_rate, args.iterations)

    rows = []
    for goal_index, goal_spec in enumerate(goals):
        position = torch.as_tensor(goal_spec["position"], dtype=torch.float32)
        goal = IKGoal(position, None)
        domain = IKDomain(engine.kinematics, engine.checker, scene, goal)
        row = {"goal": goal_spec["position"]}
        for method in ("prior", "mace", "is"):
            generator = torch.Generator().manual_seed(args.seed + goal_index)
            prior = GoalConditionedPrior(copy.deepcopy(engine.prior), engine.prior_goal_features(goal))
            started = time.monotonic()
            if method == "mace":
                mace_tune(prior, domain, preset, generator=generator)
            elif method == "is":
                importance_sampling_tune(prior, domain, preset, generator=generator)
            tuning_s = time.monotonic() - started
            row[method] = {**evaluate(prior, domain, exact, scene, generator, args.num_samples), "tuning_s": tuning_s}
        rows.append(row)
        print(json.dumps({"goal": goal_index, **{m: row[m] for m in ("prior", "mace", "is")}}), flush=True)

    summary = {
        method: {
            key: float(np.mean([row[method][key] for row in rows]))
            for key in ("score", "collision_free_rate_torch", "collision_free_rate_exact", "tuning_s")
        }
        for method in ("prior", "mace", "is")
    }
    report = {
        "command": "python bench/ik_wall_table1.py --preset " + args.preset + (f" --iterations {args.iterations}" if args.iterations else "") + f" --threads {args.threads}",
        "device": f"CPU {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "preset": preset.__dict__,
        "summary": summary,
        "paper_table1_score_free": PAPER_TABLE1,
        "per_goal": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| method | score | collision-free (torch) | collision-free (exact mesh) | tuning s/goal | paper score / free |")
    print("|---|---|---|---|---|---|")
    for method in ("prior", "mace", "is"):
        values = summary[method]
        paper = PAPER_TABLE1[method]
        print(
            f"| {method} | {values['score']:.3f} | {values['collision_free_rate_torch']:.3f} | "
            f"{values['collision_free_rate_exact']:.3f} | {values['tuning_s']:.2f} | {paper[0]} / {paper[1]} |"
        )


if __name__ == "__main__":
    main()
