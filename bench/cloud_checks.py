"""How long a collision check takes among a dense obstacle cloud, fast checker and exact check (issues 7 and 8).

The box scene plus `--clutter` small primitives, seen as a surface cloud of `--spacing` m (a depth sensor that
saw every surface; bench/ik_random_scenes.py's surface_cloud), on one torch thread. Configurations are uniform
in the joint limits among those the sphere model calls colliding: the rows whose verdict the narrow phase
decides, as the LM's converged results among obstacles are. Each batch size is timed `--repeats` times (the
median is reported), by the fast checker (TorchCollisionChecker.check) and by the exact check
(PyBulletCollisionChecker.check: Bullet for primitives, the links' hulls against the cloud's points).

    PYTHONPATH=. .venv/bin/python bench/cloud_checks.py    # -> bench/results/cloud_checks.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from bench.ik_random_scenes import surface_cloud
from mace_ros.core.collision import TorchCollisionChecker
from mace_ros.core.kinematics import PandaKinematics
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.resources import scene_path
from mace_ros.core.scene import Scene

ROOT = Path(__file__).resolve().parents[1]


def median_ms(check, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        check()
        times.append(1000.0 * (time.monotonic() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=0.01, help="cloud point spacing (m)")
    parser.add_argument("--clutter", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/cloud_checks.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    scene = Scene(points=surface_cloud(Scene.load_yaml(scene_path("box")).with_clutter(args.clutter, seed=args.seed), args.spacing, rng))
    fast = TorchCollisionChecker()
    tensor_scene = fast.prepare(scene)
    configurations = PandaKinematics("cpu", torch.float32).random_configurations(8192, torch.Generator().manual_seed(args.seed))
    decided_by_narrow_phase = configurations[fast.check(configurations, tensor_scene, narrow_phase=False).in_collision]
    rows = []
    with PyBulletCollisionChecker() as exact:
        exact.check(decided_by_narrow_phase[:1], scene)  # the cloud's cells, once per cloud
        for batch in args.batches:
            q = decided_by_narrow_phase[:batch]
            rows.append({
                "configurations": batch,
                "fast_ms": median_ms(lambda: fast.check(q, tensor_scene), args.repeats),
                "exact_ms": median_ms(lambda: exact.check(q, scene), args.repeats),
                "fast_colliding": int(fast.check(q, tensor_scene).in_collision.sum()),
                "exact_colliding": int(exact.check(q, scene).in_collision.sum()),
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "PYTHONPATH=. python bench/cloud_checks.py " + " ".join(
            f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}" for key, value in vars(args).items() if key != "out"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "points": len(scene.points), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
