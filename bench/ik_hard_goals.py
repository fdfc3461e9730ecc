"""GetIK's engine on goals whose collision-free solutions are a sliver, against random-restart LM (issue 8).

Two scenes that an exploratory held-out-scene run found (thirteenth session): a 30 cm box with a lid and a
16 cm hole in it, the hand pointing down inside (its free solutions lie at the limits of joints 5 and 6), and a
shelf board 30 cm above a table, the hand reaching under it (joint 2 near its limit). Each goal is solved with
`--seeds` random seeds, by the engine (default config, one solution) and by bench/ik_baselines.py's
random-restart LM with exact-mesh checks, with the same timeout; the engine's answers are checked again
against the exact meshes.

    PYTHONPATH=. .venv/bin/python bench/ik_hard_goals.py    # -> bench/results/ik_hard_goals.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parent))
from ik_baselines import RandomRestartIK  # noqa: E402
from mace_ros.core.ik_engine import IKEngine, IKRequest  # noqa: E402
from mace_ros.core.kinematics import quaternion_to_matrix  # noqa: E402
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker  # noqa: E402
from mace_ros.core.scene import Box, Scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def box(name: str, low: list[float], high: list[float]) -> Box:
    low_corner, high_corner = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    return Box(name, (low_corner + high_corner) / 2, (1.0, 0.0, 0.0, 0.0), (high_corner - low_corner) / 2)


def lidded_box(center_x: float = 0.55, inner_m: float = 0.30, height_m: float = 0.25, hole_m: float = 0.16,
               wall_m: float = 0.01) -> Scene:
    """An open-topped box on the floor whose lid leaves a square hole in its middle."""
    half, hole, top = inner_m / 2, hole_m / 2, height_m
    x0, x1, y0, y1 = center_x - half, center_x + half, -half, half
    return Scene(boxes=[
        box("floor", [x0 - wall_m, y0 - wall_m, -wall_m], [x1 + wall_m, y1 + wall_m, 0.0]),
        box("wall_x0", [x0 - wall_m, y0 - wall_m, 0.0], [x0, y1 + wall_m, top]),
        box("wall_x1", [x1, y0 - wall_m, 0.0], [x1 + wall_m, y1 + wall_m, top]),
        box("wall_y0", [x0, y0 - wall_m, 0.0], [x1, y0, top]),
        box("wall_y1", [x0, y1, 0.0], [x1, y1 + wall_m, top]),
        box("lid_x0", [x0, y0, top - wall_m], [center_x - hole, y1, top]),
        box("lid_x1", [center_x + hole, y0, top - wall_m], [x1, y1, top]),
        box("lid_y0", [center_x - hole, y0, top - wall_m], [center_x + hole, -hole, top]),
        box("lid_y1", [center_x - hole, hole, top - wall_m], [center_x + hole, y1, top]),
    ])


def under_board(board_z_m: float = 0.30) -> Scene:
    return Scene(boxes=[box("table", [0.3, -0.5, -0.03], [0.9, 0.5, 0.0]),
                        box("board", [0.35, -0.4, board_z_m - 0.01], [0.8, 0.4, board_z_m + 0.01])])


# (name, scene, hand position, hand quaternion wxyz): poses of configurations the exact meshes call free.
GOALS = [
    ("lidded_box", lidded_box(), (0.5417, -0.0395, 0.1817), (0.06833, -0.31804, 0.93883, -0.113)),
    ("under_board", under_board(), (0.74837, -0.05189, 0.10649), (0.47210, -0.28734, 0.67639, -0.48688)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ik_hard_goals.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = IKEngine()
    exact = PyBulletCollisionChecker()
    baseline = RandomRestartIK(exact)
    summary = {}
    for name, scene, position, quaternion in GOALS:
        position, quaternion = np.array(position), np.array(quaternion) / np.linalg.norm(quaternion)
        rotation = quaternion_to_matrix(torch.as_tensor(quaternion, dtype=torch.float64)).numpy()
        rows = {"engine": [], "random_restart_lm": []}
        for seed in range(1, args.seeds + 1):
            started = time.monotonic()
            result = engine.solve(IKRequest(position, quaternion, "panda_hand", 1, engine.config["num_samples"], engine.config["tuning_iterations"],
                                             args.timeout, random_seed=seed), scene)
            elapsed = time.monotonic() - started
            valid = bool(result.success) and not bool(exact.check(torch.as_tensor(result.solutions), scene).in_collision.any())
            rows["engine"].append({"seed": seed, "solved": valid, "elapsed_s": elapsed})
            q, _, elapsed = baseline.solve(position, rotation, scene, args.timeout, np.random.default_rng(seed))
            rows["random_restart_lm"].append({"seed": seed, "solved": q is not None, "elapsed_s": elapsed})
        summary[name] = {method: {"solved": sum(row["solved"] for row in runs), "of": len(runs),
                                  "solved_p50_s": float(np.median([row["elapsed_s"] for row in runs if row["solved"]] or [np.nan]))}
                         for method, runs in rows.items()}
        summary[name]["runs"] = rows
        print(name, json.dumps({method: {k: v for k, v in stats.items()} for method, stats in summary[name].items() if method != "runs"}),
              flush=True)
    result = {
        "command": "PYTHONPATH=. python bench/ik_hard_goals.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "timeout_s": args.timeout, "goals": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
