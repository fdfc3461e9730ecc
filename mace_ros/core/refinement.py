"""Batched Levenberg–Marquardt (damped least squares) polishing of IK candidates to machine precision.

Every candidate keeps its own damping: a step is accepted only if it lowers the goal error, stays
within the joint limits and stays collision-free, so candidates that start collision-free end so.
Runs in float64: float32 cannot resolve 1e-6 m on a 1 m arm reliably. Without a checker (and
optionally without joint limits) the same solver diagnoses what blocks a goal.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from mace_ros.core.collision import TensorScene, TorchCollisionChecker
from mace_ros.core.ik_domain import IKGoal, goal_errors
from mace_ros.core.kinematics import PandaKinematics, matrix_to_rotation_vector
from mace_ros.core.scene import Scene


@functools.lru_cache(maxsize=None)
def float64_kinematics(device: torch.device) -> PandaKinematics:
    """The float64 kinematics of a device, built once: building it (~10 ms on a CPU) cost every LM call that much."""
    return PandaKinematics(device, torch.float64)


def goal_cost(position_error_m: torch.Tensor, orientation_error_rad: torch.Tensor) -> torch.Tensor:
    """Goal errors in one unit: 1 rad of orientation error weighs like 0.1 m of position error."""
    return position_error_m + 0.1 * orientation_error_rad


@dataclass
class RefineResult:
    q: torch.Tensor  # [K, 7] float64
    position_error_m: torch.Tensor  # [K]
    orientation_error_rad: torch.Tensor  # [K]
    converged: torch.Tensor  # [K] bool: within both tolerances and collision-free
    collision_free: torch.Tensor  # [K] bool
    iterations: int


def _goal_residual(kinematics: PandaKinematics, q: torch.Tensor, goal: IKGoal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual [K, 3 or 6] (goal minus achieved; rotation as a world-frame rotation vector) and Jacobian rows."""
    jacobian, position, rotation = kinematics.jacobian(q, goal.tip_link)
    position_residual = goal.position.to(position) - position
    if goal.rotation is None:
        return position_residual, jacobian[:, :3], rotation
    goal_rotation = goal.rotation.to(rotation)
    rotation_residual = matrix_to_rotation_vector(goal_rotation @ rotation.transpose(1, 2))
    return torch.cat([position_residual, rotation_residual], -1), jacobian, rotation


def refine_candidates(
    q_initial: torch.Tensor,
    goal: IKGoal,
    checker: TorchCollisionChecker | None,
    scene: Scene | TensorScene,
    max_iterations: int = 60,
    position_tolerance_m: float = 1e-6,
    orientation_tolerance_rad: float = 1e-4,
    initial_damping: float = 1e-3,
    enough_solved: int | None = None,
    deadline_at: float | None = None,
    respect_limits: bool = True,
) -> RefineResult:
    """Polish candidates q_initial [K, 7] toward `goal` (one goal, or a batch of K: one per candidate),
    keeping joint limits and collision freedom.

    Stops early once `enough_solved` candidates are within tolerance and collision-free, or when
    time.monotonic() reaches `deadline_at`. `checker` None ignores collisions; `respect_limits` False
    ignores the joint limits (both only to diagnose unsolvable goals).
    """
    kinematics = float64_kinematics(q_initial.device)

    def limited(q_new: torch.Tensor) -> torch.Tensor:
        return kinematics.clamp_to_limits(q_new) if respect_limits else q_new

    def free_of_collision(q_new: torch.Tensor) -> torch.Tensor:
        if checker is None:
            return torch.ones(q_new.shape[0], dtype=torch.bool, device=q_new.device)
        return ~checker.check(q_new.to(checker.dtype), scene).in_collision

    q = limited(q_initial.to(torch.float64)).clone()
    collision_free = free_of_collision(q)
    damping = torch.full((q.shape[0],), initial_damping, dtype=torch.float64, device=q.device)
    position_error, orientation_error = goal_errors(kinematics, q, goal)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        converged = (position_error <= position_tolerance_m) & (orientation_error <= orientation_tolerance_rad)
        if enough_solved is not None and int((converged & collision_free).sum()) >= enough_solved:
            break
        if deadline_at is not None and time.monotonic() >= deadline_at:
            break
        active = torch.nonzero(collision_free & ~converged).squeeze(-1)
        if active.numel() == 0:
            break
        # Work on the active rows only: most candidates converge within a few iterations.
        q_active, active_damping = q[active], damping[active]
        goal_active = goal.rows(active)
        residual, jacobian, _ = _goal_residual(kinematics, q_active, goal_active)
        rows = residual.shape[1]
        jjt = jacobian @ jacobian.transpose(1, 2)
        identity = torch.eye(rows, dtype=q.dtype, device=q.device)
        step = jacobian.transpose(1, 2) @ torch.linalg.solve(jjt + active_damping[:, None, None] * identity, residual[..., None])
        q_trial = limited(q_active + step.squeeze(-1))
        trial_position_error, trial_orientation_error = goal_errors(kinematics, q_trial, goal_active)
        improves = goal_cost(trial_position_error, trial_orientation_error) < goal_cost(position_error[active], orientation_error[active])
        if bool(improves.any()):
            trial_free = torch.ones_like(improves)
            trial_free[improves] = free_of_collision(q_trial[improves])
            improves &= trial_free
        accepted = active[improves]
        q[accepted] = q_trial[improves]
        position_error[accepted] = trial_position_error[improves]
        orientation_error[accepted] = trial_orientation_error[improves]
        damping[active] = torch.where(improves, (active_damping * 0.3).clamp_min(1e-12), (active_damping * 10.0).clamp_max(1e6))
    converged = (position_error <= position_tolerance_m) & (orientation_error <= orientation_tolerance_rad)
    return RefineResult(q, position_error, orientation_error, converged & collision_free, collision_free, iterations)


def slide_clear(
    q_initial: torch.Tensor,
    goal: IKGoal,
    checker: TorchCollisionChecker,
    scene: Scene | TensorScene,
    iterations: int = 30,
    step_rad: float = 0.05,
    check_every: int = 5,
    position_tolerance_m: float = 1e-6,
    orientation_tolerance_rad: float = 1e-4,
    deadline_at: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solved, collision-free configurations [S, 7] and their position and orientation errors [S], found by sliding q_initial [K, 7] (on or near the goal,
    but in collision) along the goal's self-motion manifold, away from obstacles.

    Each iteration takes a damped least-squares step toward the goal plus, in the null space of the
    goal's Jacobian, a step of at most step_rad down the gradient of the sphere model's penetration
    (`TorchCollisionChecker.penetration`), which moves the links out of obstacles without leaving the
    goal. Every `check_every` iterations the configurations are polished by the obstacle-ignoring LM
    and those the full checker calls free are kept. Where random restarts rarely land in the few
    valid configurations (a hand deep in a cavity), this walks there from the many invalid ones.
    """
    kinematics = float64_kinematics(q_initial.device)
    q = kinematics.clamp_to_limits(q_initial.to(torch.float64)).clone()
    found = [(q.new_zeros(0, 7), q.new_zeros(0), q.new_zeros(0))]
    for iteration in range(1, iterations + 1):
        if q.shape[0] == 0 or (deadline_at is not None and time.monotonic() >= deadline_at):
            break
        residual, jacobian, _ = _goal_residual(kinematics, q, goal)
        rows = residual.shape[1]
        identity = torch.eye(rows, dtype=q.dtype, device=q.device)
        inverse = jacobian.transpose(1, 2) @ torch.linalg.inv(jacobian @ jacobian.transpose(1, 2) + 1e-6 * identity)  # [K, 7, rows]
        task_step = (inverse @ residual[..., None])[..., 0]
        q_grad = q.detach().to(checker.dtype).requires_grad_(True)
        (gradient,) = torch.autograd.grad(checker.penetration(q_grad, scene).sum(), q_grad)
        gradient = gradient.to(q.dtype)
        null_step = -(gradient - (inverse @ (jacobian @ gradient[..., None]))[..., 0])
        null_step = null_step * (step_rad / null_step.abs().amax(-1, keepdim=True).clamp_min(1e-12))
        q = kinematics.clamp_to_limits(q + task_step + null_step)
        if iteration % check_every and iteration != iterations:
            continue
        polished = refine_candidates(q, goal, None, None, max_iterations=10, position_tolerance_m=position_tolerance_m,
                                     orientation_tolerance_rad=orientation_tolerance_rad, deadline_at=deadline_at)
        done = polished.converged.clone()
        done[done.clone()] = ~checker.check(polished.q[done].to(checker.dtype), scene).in_collision
        found.append((polished.q[done], polished.position_error_m[done], polished.orientation_error_rad[done]))
        q = q[~done]
    return tuple(torch.cat(part) for part in zip(*found))
