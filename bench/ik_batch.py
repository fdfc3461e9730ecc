"""Many goals per request (issue 8): throughput of `IKEngine.solve_batch` on this machine.

Goals as cuRobo's batch IK benchmark makes them: the hand poses of random configurations within the
joint limits that the exact meshes call collision-free in the scene (so every goal is solvable). One
`solve_batch` call per batch size and scene (`--timeout` s), one exactly collision-free solution per
goal; success = within 1e-6 m / 1e-4 rad (the engine's tolerances) and collision-free by the exact
meshes, checked again here. Throughput = goals / the call's wall time.

    .venv/bin/python bench/ik_batch.py --batch 100 1000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from mace_ros.core.ik_engine import IKEngine  # noqa: E402
from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion, rotation_angle_between  # noqa: E402
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker  # noqa: E402
from mace_ros.core.resources import scene_path  # noqa: E402
from mace_ros.core.scene import Scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POSITION_TOLERANCE_M, ORIENTATION_TOLERANCE_RAD = 1e-6, 1e-4


def solvable_goals(scene: Scene, count: int, exact: PyBulletCollisionChecker, kinematics: PandaKinematics,
                   generator: torch.Generator) -> torch.Tensor:
    """`count` configurations uniform in the joint limits that the exact meshes call collision-free in `scene`."""
    kept = []
    while sum(part.shape[0] for part in kept) < count:
        q = kinematics.random_configurations(4 * count, generator)
        kept.append(q[~exact.check(q, scene).in_collision])
    return torch.cat(kept)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--scenes", nargs="+", default=["open", "box"], help="open = no obstacles, else a shipped scene")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_batch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = IKEngine(device=args.device)
    exact = PyBulletCollisionChecker()
    kinematics = PandaKinematics(dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    runs: list[dict[str, Any]] = []
    for name in args.scenes:
        scene = Scene() if name == "open" else Scene.load_yaml(scene_path(name))
        for size in args.batch:
            q = solvable_goals(scene, size, exact, kinematics, generator)
            position, rotation = kinematics.forward(q)
            result = engine.solve_batch(position.numpy(), matrix_to_quaternion(rotation).numpy(), scene, timeout_s=args.timeout, random_seed=1)
            solved = torch.as_tensor(result.success)
            answer = torch.as_tensor(result.solutions)[solved]
            reached, reached_rotation = kinematics.forward(answer)
            close = ((reached - position[solved]).norm(dim=-1) <= POSITION_TOLERANCE_M) & (
                rotation_angle_between(reached_rotation, rotation[solved]) <= ORIENTATION_TOLERANCE_RAD)
            valid = close & ~exact.check(answer, scene).in_collision
            runs.append({"scene": name, "goals": size, "success": float(valid.sum()) / size, "elapsed_s": result.elapsed_s,
                         "goals_per_s": size / result.elapsed_s, "attempts": result.attempts,
                         "answered_but_invalid": int((~valid).sum())})
            print(json.dumps(runs[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": ".venv/bin/python bench/ik_batch.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "device": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "torch_threads": args.threads, "load_average_at_end": os.getloadavg(), "engine_device": args.device},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
