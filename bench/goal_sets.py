"""The IK goal sets the latency benchmarks share, importable without PyBullet or ROS (the GPU machine has neither)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mace_ros.core.ik_domain import IKGoal
from mace_ros.core.kinematics import quaternion_to_matrix
from mace_ros.core.scene import Scene, SceneGoal, load_goals

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("wall", "window", "box", "shelf", "table")
SCENES = ("open", *SHIPPED)
TIP_LINK = "panda_hand"


def scene_and_goals(name: str) -> tuple[Scene, list[SceneGoal]]:
    """`open`: all shipped goals without obstacles; otherwise the scene file and its goals."""
    if name == "open":
        return Scene(), [goal for shipped in SHIPPED for goal in load_goals(ROOT / "config/scenes" / f"{shipped}.yaml")]
    path = ROOT / "config/scenes" / f"{name}.yaml"
    return Scene.load_yaml(path), load_goals(path)


def ik_goal(goal: SceneGoal) -> IKGoal:
    rotation = None if goal.quaternion_wxyz is None else quaternion_to_matrix(torch.as_tensor(goal.quaternion_wxyz, dtype=torch.float64))
    return IKGoal(torch.as_tensor(goal.position, dtype=torch.float64), rotation, TIP_LINK)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}
