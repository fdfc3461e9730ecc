"""GetIK's engine against tiny timeouts among hundreds of markers (issue 7 item 5, issue 6's solve-to-deadline).

The box scene plus Scene.with_clutter (256 small boxes, 64 spheres, 64 cylinders: a marker flood),
in-process, one torch thread. Random goals in front of the robot with timeouts of 0.05, 0.1 or 0.3 s;
reports how far each answer came before (negative) or after (positive) its timeout.

    PYTHONPATH=. .venv/bin/python bench/ik_clutter_deadlines.py    # -> bench/results/ik_clutter_deadlines.json

`--region behind-low` draws the goals behind the robot and near the floor instead, where the arm folds onto
itself and the self-collision narrow phase does most of the checking; `--timeouts` sets the timeouts drawn.
`--cloud SPACING_M` gives the engine the scene's surfaces as a point cloud of that spacing instead of its
primitives (bench/ik_random_scenes.py's surface_cloud; needs trimesh), where each exact check costs more.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from mace_ros.core.ik_engine import IKEngine, IKRequest
from mace_ros.core.resources import scene_path
from mace_ros.core.scene import Scene

ROOT = Path(__file__).resolve().parents[1]
# Goal positions (m, base frame), uniform between these corners.
GOAL_REGIONS = {"front": ([0.2, -0.5, 0.05], [0.7, 0.5, 0.8]), "behind-low": ([-0.35, -0.3, 0.02], [0.05, 0.3, 0.2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--clutter", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--region", choices=sorted(GOAL_REGIONS), default="front", help="where goals are drawn")
    parser.add_argument("--timeouts", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--cloud", type=float, default=None, metavar="SPACING_M", help="the scene as a surface cloud")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_clutter_deadlines.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    scene = Scene.load_yaml(scene_path("box")).with_clutter(args.clutter, seed=args.seed)
    if args.cloud is not None:
        from bench.ik_random_scenes import surface_cloud  # trimesh, only for this
        scene = Scene(points=surface_cloud(scene, args.cloud, rng))
    engine = IKEngine()
    engine.solve(IKRequest(np.array([0.5, 0.0, 0.4]), np.array([0.0, 1.0, 0.0, 0.0]), "panda_hand", 1, 256, engine.config["tuning_iterations"], 2.0), scene)  # warm
    rows = []
    for index in range(args.requests):
        timeout_s = float(rng.choice(args.timeouts))
        quaternion = rng.normal(size=4)
        request = IKRequest(rng.uniform(*GOAL_REGIONS[args.region]), quaternion / np.linalg.norm(quaternion), "panda_hand",
                            int(rng.choice([1, 4, 8])), 256, engine.config["tuning_iterations"], timeout_s, random_seed=index)
        started = time.monotonic()
        result = engine.solve(request, scene)
        rows.append({"timeout_s": timeout_s, "elapsed_s": time.monotonic() - started, "success": bool(result.success),
                     "rounds": result.rounds})
    over = np.array([row["elapsed_s"] - row["timeout_s"] for row in rows])
    summary = {"requests": len(rows), "max_over_timeout_s": float(over.max()), "p95_over_timeout_s": float(np.percentile(over, 95)),
               "late": int((over > 0).sum()), "success": sum(row["success"] for row in rows)}
    result = {
        "command": "PYTHONPATH=. python bench/ik_clutter_deadlines.py " + " ".join(
            f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}"
            for key, value in vars(args).items() if key != "out" and value is not None),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "points": 0 if scene.points is None else len(scene.points), "summary": summary, "requests": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
