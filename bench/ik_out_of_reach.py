"""Goals out of reach: how long GetIK's engine takes to say so, and a batch holding some (in-process, one torch thread).

12 goals 0.9-1.15 m from the shoulder (beyond the hand's 0.858 m; half position-only, half pointing down),
each with a 2 s timeout; then GetIKBatch's engine on 64 hand poses of random self-collision-free
configurations plus 4 goals 0.9-1.1 m out, with a 10 s timeout.

    PYTHONPATH=. .venv/bin/python bench/ik_out_of_reach.py
"""
from __future__ import annotations

import numpy as np
import torch

from mace_ros.core.ik_engine import IKEngine, IKRequest
from mace_ros.core.kinematics import PandaKinematics, matrix_to_quaternion
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.scene import Scene

SHOULDER_M = np.array([0.0, 0.0, 0.333])
DOWN = np.array([0.0, 1.0, 0.0, 0.0])


def main() -> None:
    torch.set_num_threads(1)
    engine = IKEngine()
    rng = np.random.default_rng(0)
    times, kinds = [], set()
    for index in range(12):
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2]) * 0.3
        position = SHOULDER_M + rng.uniform(0.9, 1.15) * direction / np.linalg.norm(direction)
        result = engine.solve(IKRequest(position, None if index % 2 == 0 else DOWN, "panda_hand", 4, 1024, -1, 2.0, random_seed=index), Scene())
        assert not result.success, result.message
        times.append(result.elapsed_s)
        kinds.add(result.failure_kind)
    print(f"GetIK, 12 goals 0.9-1.15 m from the shoulder (half position-only, half pointing down), timeout 2 s: "
          f"elapsed p50 {np.median(times):.3f} s, max {max(times):.3f} s, failure kinds {sorted(kinds)}")
    kinematics = PandaKinematics(dtype=torch.float64)
    q = kinematics.random_configurations(256, torch.Generator().manual_seed(3))
    with PyBulletCollisionChecker() as exact:
        q = q[~exact.check(q, Scene()).in_collision][:64]
    position, rotation = kinematics.forward(q)
    out_of_reach = SHOULDER_M + np.linspace(0.9, 1.1, 4)[:, None] * np.array([[1.0, 0.0, 0.0]])
    positions = np.concatenate([position.numpy(), out_of_reach])
    quaternions = np.concatenate([matrix_to_quaternion(rotation).numpy(), np.tile([[1.0, 0.0, 0.0, 0.0]], (4, 1))])
    result = engine.solve_batch(positions, quaternions, Scene(), timeout_s=10.0)
    print(f"GetIKBatch, 64 hand poses of random self-collision-free configurations + 4 out of reach, timeout 10 s: "
          f"{int(result.success.sum())} solved in {result.elapsed_s:.2f} s")


if __name__ == "__main__":
    main()
