"""The IK domain of MACE: simulate = forward kinematics + collision check; score = goal proximity.

Paper score: S = 0 in collision (self or scene), else exp(−‖p_goal − p_ee‖). Beyond the paper:
full pose goals add the orientation error, each error divided by a length scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mace_ros.core.collision import TensorScene, TorchCollisionChecker
from mace_ros.core.kinematics import PandaKinematics, quaternion_to_matrix, rotation_angle_between
from mace_ros.core.scene import Scene


@dataclass(frozen=True)
class IKGoal:
    """A goal for `tip_link` in the base frame; rotation None means position only. A batch of goals,
    one per configuration scored or refined, has position [B, 3] and rotation [B, 3, 3]."""

    position: torch.Tensor  # [3] or [B, 3]
    rotation: torch.Tensor | None  # [3, 3] or [B, 3, 3]
    tip_link: str = "panda_hand"

    def rows(self, index: torch.Tensor) -> "IKGoal":
        """The goals of the configurations `index` of a batch; a single goal is every configuration's."""
        if self.position.dim() == 1:
            return self
        return IKGoal(self.position[index], None if self.rotation is None else self.rotation[index], self.tip_link)

    @staticmethod
    def from_quaternion(position: torch.Tensor, quaternion_wxyz: torch.Tensor | None, tip_link: str) -> "IKGoal":
        rotation = None if quaternion_wxyz is None else quaternion_to_matrix(quaternion_wxyz)
        return IKGoal(position, rotation, tip_link)


def goal_errors(kinematics: PandaKinematics, q: torch.Tensor, goal: IKGoal) -> tuple[torch.Tensor, torch.Tensor]:
    """Position error (m) and orientation error (rad, 0 for position-only goals), each [B]."""
    position, rotation = kinematics.forward(q, goal.tip_link)
    position_error = (position - goal.position.to(position)).norm(dim=-1)
    if goal.rotation is None:
        return position_error, torch.zeros_like(position_error)
    goal_rotation = goal.rotation.to(rotation).expand_as(rotation)
    return position_error, rotation_angle_between(rotation, goal_rotation)


class IKDomain:
    """Scores configurations q [B, 7] against a goal in a scene (the `Domain` protocol of `mace.py`).

    Collisions are decided where it pays: the checker's sphere model for the whole batch (fast,
    conservative), and its exact narrow phase for the samples nearest the goal that the spheres
    reject (`narrow_phase_fraction` of the batch), i.e. where MACE's elites come from. Near
    obstacles the spheres alone would score valid elites 0.
    """

    def __init__(
        self,
        kinematics: PandaKinematics,
        checker: TorchCollisionChecker,
        scene: Scene | TensorScene,
        goal: IKGoal,
        position_length_scale_m: float = 1.0,
        orientation_length_scale_rad: float = 1.0,
        narrow_phase_fraction: float = 1.0,
    ):
        if not 0.0 <= narrow_phase_fraction <= 1.0:
            raise ValueError(f"narrow_phase_fraction must be in [0, 1], got {narrow_phase_fraction}")
        self.kinematics = kinematics
        self.checker = checker
        self.scene = scene
        self.goal = goal
        self.position_length_scale_m = position_length_scale_m
        self.orientation_length_scale_rad = orientation_length_scale_rad
        self.narrow_phase_fraction = narrow_phase_fraction
        # The collision-free fraction of the last scored batch, a 0-d tensor (no host sync per batch); None before one.
        self.last_collision_free_rate: torch.Tensor | None = None

    def score(self, q: torch.Tensor) -> torch.Tensor:
        proximity = self.score_from_errors(*goal_errors(self.kinematics, q, self.goal))
        free = ~self.checker.check(q, self.scene, narrow_phase=False).in_collision
        count = math.ceil(self.narrow_phase_fraction * q.shape[0])
        if count:
            nearest = torch.topk(proximity, count).indices
            rejected = nearest[~free[nearest]]
            if rejected.numel():
                free[rejected] = ~self.checker.check(q[rejected], self.scene).in_collision
        self.last_collision_free_rate = free.float().mean()
        return proximity * free

    def score_from_errors(self, position_error: torch.Tensor, orientation_error: torch.Tensor) -> torch.Tensor:
        return torch.exp(
            -position_error / self.position_length_scale_m - orientation_error / self.orientation_length_scale_rad
        )
