"""Batched Levenberg–Marquardt (damped least squares) polishing of IK candidates to machine precision.

Every candidate keeps its own damping: a step is accepted only if it lowers the goal error, stays
within the joint limits and stays collision-free, so candidates that start collision-free end so.
Runs in float64: float32 cannot resolve 1e-6 m on a 1 m arm reliably. Without a checker (and
optionally without joint limits) the same solver diagnoses what blocks a goal.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mace_ros.core.collision import TensorScene, TorchCollisionChecker
from mace_ros.core.cuda_graph import GraphedCall, padded_size, write_padded
from mace_ros.core.ik_domain import IKGoal
from mace_ros.core.kinematics import PandaKinematics, matrix_to_rotation_vector
from mace_ros.core.scene import Scene


# On a GPU the obstacle-ignoring LM is a few hundred small kernels per iteration, and their launches, not
# the arithmetic, take the time (a 2,000-goal batch: the GPU busy a quarter of the time). There it runs as
# CUDA graphs of LM_GRAPH_BLOCK iterations over every row (converged rows masked, not dropped, so that shapes
# stay fixed), rows padded to a power of two, the host reading the convergence between blocks.
LM_GRAPH_BLOCK = 5  # the shipped iteration limits (25, 60; diagnosis 20) are multiples of it: no eager remainder
LM_GRAPH_MIN_ROWS = 64
LM_GRAPH_MAX_ROWS = 1 << 16
LM_GRAPH_DEVICE_TYPES = ("cuda",)  # tests add "cpu", where each "graph" runs eagerly, to test the masked blocks


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
    # With `accept`: the converged rows it was asked about ([K] bool), and those it passed.
    accept_checked: torch.Tensor | None = None
    accept_passed: torch.Tensor | None = None


def _goal_residual(kinematics: PandaKinematics, q: torch.Tensor, goal: IKGoal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual [K, 3 or 6] (goal minus achieved; rotation as a world-frame rotation vector) and Jacobian rows."""
    jacobian, position, rotation = kinematics.jacobian(q, goal.tip_link)
    position_residual = goal.position.to(position) - position
    if goal.rotation is None:
        return position_residual, jacobian[:, :3], rotation
    goal_rotation = goal.rotation.to(rotation)
    rotation_residual = matrix_to_rotation_vector(goal_rotation @ rotation.transpose(1, 2))
    return torch.cat([position_residual, rotation_residual], -1), jacobian, rotation


def _goal_state(
    kinematics: PandaKinematics, q: torch.Tensor, goal: IKGoal,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual and Jacobian rows at q [K, 7] (see _goal_residual) and the goal errors [K] from the
    same forward kinematics: the position residual's length, and the rotation residual's, which is the
    angle of the relative rotation that goal_errors measures (from the other side; 0 without a rotation)."""
    residual, jacobian, _ = _goal_residual(kinematics, q, goal)
    position_error = residual[:, :3].norm(dim=-1)
    orientation_error = residual[:, 3:].norm(dim=-1) if goal.rotation is not None else torch.zeros_like(position_error)
    return residual, jacobian, position_error, orientation_error


def _lm_step(
    kinematics: PandaKinematics, q: torch.Tensor, residual: torch.Tensor, jacobian: torch.Tensor, damping: torch.Tensor,
    respect_limits: bool,
) -> torch.Tensor:
    """One damped least-squares step from q [K, 7], given its residual and Jacobian rows, with per-row damping [K].

    With the limits respected, a joint at a limit that the step would push beyond it is held there and the
    step solved again with the other joints (an active set): clamped after the fact, the step lost that
    joint's share of the motion, and the LM crept along the limit (a seed at joint 7's limit took 60
    iterations to a solution 0.13 rad away instead of a few)."""
    identity = torch.eye(residual.shape[1], dtype=q.dtype, device=q.device)

    def step(jacobian_used: torch.Tensor) -> torch.Tensor:
        jjt = jacobian_used @ jacobian_used.transpose(1, 2)
        # solve_ex without its error check: the check reads the result on the host (a sync per step, and no
        # CUDA graph), and a singular system only gives a non-finite step, which never improves and is refused.
        solution, _ = torch.linalg.solve_ex(jjt + damping[:, None, None] * identity, residual[..., None], check_errors=False)
        return (jacobian_used.transpose(1, 2) @ solution).squeeze(-1)

    delta = step(jacobian)
    if not respect_limits:
        return q + delta
    lower, upper = kinematics.joint_lower.to(q), kinematics.joint_upper.to(q)
    held = ((q <= lower) & (delta < 0)) | ((q >= upper) & (delta > 0))
    # On a CPU the second solve is skipped when no joint is held (most steps); a GPU solves it always, with no
    # host read, so that the step stays capturable in a CUDA graph.
    if q.device.type != "cpu" or bool(held.any()):
        delta = torch.where(held.any(-1, keepdim=True), step(jacobian * (~held).to(q.dtype)[:, None, :]), delta)
    return kinematics.clamp_to_limits(q + delta)


def _next_damping(damping: torch.Tensor, improves: torch.Tensor) -> torch.Tensor:
    return torch.where(improves, (damping * 0.3).clamp_min(1e-12), (damping * 10.0).clamp_max(1e6))


class _SolvedCount:
    """Whether enough rows converged: `enough_solved` of them, and with `accept` (q [N, 7] -> [N] bool, e.g.
    the fast collision check when the LM itself ignores obstacles) also `min_accepted` that pass it. In
    clutter the first starts to converge (prior samples near the goal) may all collide, and stopping on
    them left every round of a solvable goal without a free solution (random scenes,
    bench/ik_random_scenes.py). Each converged row is checked once, and only when the count would stop the
    LM, so that where enough pass at once this costs nothing (the caller reuses the answers). After a check
    that found too few, one more comes RECHECK_CALLS calls later, of CHECK_ROWS_PER_ACCEPTED rows per row
    still needed at most: a check of 50-60 configurations took 0.2-0.3 s among a 15k-point cloud on a CPU.
    After MAX_CHECKS the count no longer stops the LM, which runs to its cap or deadline (the caller checks
    what converged): where the free solutions are a sliver, the starts reaching them converge late, at the
    joint limits, and stopping then left such goals unsolved (bench/ik_hard_goals.py).
    """

    CHECK_ROWS_PER_ACCEPTED = 8
    RECHECK_CALLS = 5
    MAX_CHECKS = 2

    def __init__(self, enough_solved: int | None, accept: Callable[[torch.Tensor], torch.Tensor] | None, min_accepted: int,
                 rows: int, device: torch.device):
        self.enough_solved, self.accept, self.min_accepted = enough_solved, accept, min_accepted
        if accept is not None:
            self.checked = torch.zeros(rows, dtype=torch.bool, device=device)
            self.passed = torch.zeros(rows, dtype=torch.bool, device=device)
            self.passed_count = 0
            self.calls_to_recheck = 0
            self.checks = 0

    def enough(self, converged: torch.Tensor, q: torch.Tensor, count: int | None = None) -> bool:
        """`count`: converged.sum() where the caller read it already."""
        if self.enough_solved is None:
            return False
        count = int(converged.sum()) if count is None else count  # one host read per call until it is enough
        if count < self.enough_solved or self.accept is None:
            return count >= self.enough_solved
        if self.checks >= self.MAX_CHECKS:
            return False
        self.calls_to_recheck -= 1
        if self.calls_to_recheck > 0:
            return False
        pending = converged & ~self.checked
        if self.passed_count + int(pending.sum()) >= self.min_accepted:  # else checking cannot stop the LM yet
            rows = torch.nonzero(pending).squeeze(-1)
            if self.checks:  # a recheck: what the caller would check anyway is not asked about twice
                rows = rows[: self.CHECK_ROWS_PER_ACCEPTED * max(self.min_accepted - self.passed_count, 1)]
            self.passed[rows] = self.accept(q[rows])
            self.checked[rows] = True
            self.passed_count = int(self.passed.sum())
            self.calls_to_recheck, self.checks = self.RECHECK_CALLS, self.checks + 1
        return self.passed_count >= self.min_accepted

    def accepted(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rows `accept` was asked about and those it passed (None, None without `accept`)."""
        return (self.checked, self.passed) if self.accept is not None else (None, None)


@dataclass
class _LMState:
    """The fixed buffers a captured LM block reads and updates in place (rows padded to `size`)."""

    q: torch.Tensor
    residual: torch.Tensor  # at q, with the Jacobian rows (see _goal_state)
    jacobian: torch.Tensor
    position_error: torch.Tensor
    orientation_error: torch.Tensor
    damping: torch.Tensor
    goal: IKGoal
    block: GraphedCall | None = None


_LM_GRAPHS: dict[tuple, _LMState] = {}
_LM_GRAPHS_LOCK = threading.Lock()


def _masked_lm_iterations(
    kinematics: PandaKinematics, state: _LMState, count: int, position_tolerance_m: float, orientation_tolerance_rad: float,
    respect_limits: bool,
) -> None:
    """`count` LM iterations over every row of `state`, in place: rows within tolerance stay as they are."""
    for _ in range(count):
        converged = (state.position_error <= position_tolerance_m) & (state.orientation_error <= orientation_tolerance_rad)
        q_trial = _lm_step(kinematics, state.q, state.residual, state.jacobian, state.damping, respect_limits)
        trial_residual, trial_jacobian, trial_position_error, trial_orientation_error = _goal_state(kinematics, q_trial, state.goal)
        improves = goal_cost(trial_position_error, trial_orientation_error) < goal_cost(state.position_error, state.orientation_error)
        update = improves & ~converged
        state.q.copy_(torch.where(update[:, None], q_trial, state.q))
        state.residual.copy_(torch.where(update[:, None], trial_residual, state.residual))
        state.jacobian.copy_(torch.where(update[:, None, None], trial_jacobian, state.jacobian))
        state.position_error.copy_(torch.where(update, trial_position_error, state.position_error))
        state.orientation_error.copy_(torch.where(update, trial_orientation_error, state.orientation_error))
        state.damping.copy_(torch.where(converged, state.damping, _next_damping(state.damping, improves)))


def _graphed_unobstructed_lm(
    kinematics: PandaKinematics, q: torch.Tensor, residual: torch.Tensor, jacobian: torch.Tensor, position_error: torch.Tensor,
    orientation_error: torch.Tensor, damping: torch.Tensor, goal: IKGoal, max_iterations: int, position_tolerance_m: float,
    orientation_tolerance_rad: float, solved_count: _SolvedCount, deadline_at: float | None, respect_limits: bool,
) -> int:
    """The obstacle-ignoring LM of `refine_candidates` as CUDA graph blocks (see LM_GRAPH_BLOCK); updates
    q and the errors in place and returns the iterations run. The caller holds _LM_GRAPHS_LOCK."""
    count = q.shape[0]
    size = padded_size(count, LM_GRAPH_MIN_ROWS)
    per_row = goal.position.dim() == 2
    key = (q.device, size, per_row, goal.rotation is not None, goal.tip_link, respect_limits, position_tolerance_m, orientation_tolerance_rad)
    state = _LM_GRAPHS.get(key)
    if state is None:
        def padded(values: torch.Tensor) -> torch.Tensor:
            return values[:1].expand(size, *values.shape[1:]).clone()

        state = _LMState(padded(q), padded(residual), padded(jacobian), padded(position_error), padded(orientation_error), padded(damping), IKGoal(
            padded(goal.position) if per_row else goal.position.clone(),
            None if goal.rotation is None else (padded(goal.rotation) if per_row else goal.rotation.clone()), goal.tip_link))
        state.block = GraphedCall(lambda: _masked_lm_iterations(
            kinematics, state, LM_GRAPH_BLOCK, position_tolerance_m, orientation_tolerance_rad, respect_limits), q.device)
        _LM_GRAPHS[key] = state
    goal_buffers = [(state.goal.position, goal.position)] + ([] if goal.rotation is None else [(state.goal.rotation, goal.rotation)])
    for buffer, values in ((state.q, q), (state.residual, residual), (state.jacobian, jacobian), (state.position_error, position_error),
                           (state.orientation_error, orientation_error), (state.damping, damping), *(goal_buffers if per_row else [])):
        write_padded(buffer, values)
    for buffer, values in [] if per_row else goal_buffers:
        buffer.copy_(values)
    iterations = 0
    while iterations < max_iterations:
        converged = ((state.position_error[:count] <= position_tolerance_m) & (state.orientation_error[:count] <= orientation_tolerance_rad))
        solved = int(converged.sum())
        if solved == count or solved_count.enough(converged, state.q[:count], solved):
            break
        if deadline_at is not None and time.monotonic() >= deadline_at:
            break
        if max_iterations - iterations >= LM_GRAPH_BLOCK:
            state.block()
            iterations += LM_GRAPH_BLOCK
        else:  # the last few, eagerly on the same buffers
            _masked_lm_iterations(kinematics, state, max_iterations - iterations, position_tolerance_m, orientation_tolerance_rad, respect_limits)
            iterations = max_iterations
    q.copy_(state.q[:count])
    position_error.copy_(state.position_error[:count])
    orientation_error.copy_(state.orientation_error[:count])
    return iterations


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
    accept: Callable[[torch.Tensor], torch.Tensor] | None = None,
    min_accepted: int = 1,
) -> RefineResult:
    """Polish candidates q_initial [K, 7] toward `goal` (one goal, or a batch of K: one per candidate),
    keeping joint limits and collision freedom.

    Stops early once `enough_solved` candidates are within tolerance and collision-free (and, with
    `accept`, `min_accepted` of them pass it: see _SolvedCount), or when time.monotonic() reaches
    `deadline_at`. `checker` None ignores collisions; `respect_limits` False ignores the joint limits
    (both only to diagnose unsolvable goals).
    """
    kinematics = float64_kinematics(q_initial.device)

    def limited(q_new: torch.Tensor) -> torch.Tensor:
        return kinematics.clamp_to_limits(q_new) if respect_limits else q_new

    def free_of_collision(q_new: torch.Tensor) -> torch.Tensor:
        if checker is None:
            return torch.ones(q_new.shape[0], dtype=torch.bool, device=q_new.device)
        return ~checker.check(q_new.to(checker.dtype), scene).in_collision

    q = limited(q_initial.to(torch.float64)).clone()
    checked_at = time.monotonic()
    collision_free = free_of_collision(q)
    # An iteration is started only if one as long as the last (at first, the initial check) ends by the deadline:
    # among a dense cloud one collision-aware iteration took 85 ms on a CPU, and a late one made the answer late.
    iteration_s = time.monotonic() - checked_at if checker is not None else 0.0
    damping = torch.full((q.shape[0],), initial_damping, dtype=torch.float64, device=q.device)
    solved_count = _SolvedCount(enough_solved, accept, min_accepted, q.shape[0], q.device)
    # Each row's residual and Jacobian are kept from the forward kinematics that measured its errors: an
    # accepted trial's are the next step's, so each iteration runs the kinematics once, not twice.
    residual, jacobian, position_error, orientation_error = _goal_state(kinematics, q, goal)
    if checker is None and q.device.type in LM_GRAPH_DEVICE_TYPES and 0 < q.shape[0] <= LM_GRAPH_MAX_ROWS and _LM_GRAPHS_LOCK.acquire(blocking=False):
        # (Another thread on the graphs: this call runs eagerly rather than wait.)
        try:
            iterations = _graphed_unobstructed_lm(kinematics, q, residual, jacobian, position_error, orientation_error, damping, goal,
                                                  max_iterations, position_tolerance_m, orientation_tolerance_rad, solved_count,
                                                  deadline_at, respect_limits)
        finally:
            _LM_GRAPHS_LOCK.release()
        converged = (position_error <= position_tolerance_m) & (orientation_error <= orientation_tolerance_rad)
        return RefineResult(q, position_error, orientation_error, converged, collision_free, iterations, *solved_count.accepted())
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        converged = (position_error <= position_tolerance_m) & (orientation_error <= orientation_tolerance_rad)
        if solved_count.enough(converged & collision_free, q):
            break
        iteration_started = time.monotonic()
        if deadline_at is not None and iteration_started + iteration_s >= deadline_at:
            break
        active = torch.nonzero(collision_free & ~converged).squeeze(-1)
        if active.numel() == 0:
            break
        # Work on the active rows only: most candidates converge within a few iterations.
        q_active, active_damping = q[active], damping[active]
        goal_active = goal.rows(active)
        q_trial = _lm_step(kinematics, q_active, residual[active], jacobian[active], active_damping, respect_limits)
        trial_residual, trial_jacobian, trial_position_error, trial_orientation_error = _goal_state(kinematics, q_trial, goal_active)
        improves = goal_cost(trial_position_error, trial_orientation_error) < goal_cost(position_error[active], orientation_error[active])
        if bool(improves.any()):
            trial_free = torch.ones_like(improves)
            trial_free[improves] = free_of_collision(q_trial[improves])
            improves &= trial_free
        accepted = active[improves]
        q[accepted] = q_trial[improves]
        position_error[accepted] = trial_position_error[improves]
        orientation_error[accepted] = trial_orientation_error[improves]
        residual[accepted] = trial_residual[improves]
        jacobian[accepted] = trial_jacobian[improves]
        damping[active] = _next_damping(active_damping, improves)
        iteration_s = time.monotonic() - iteration_started
    converged = (position_error <= position_tolerance_m) & (orientation_error <= orientation_tolerance_rad)
    return RefineResult(q, position_error, orientation_error, converged & collision_free, collision_free, iterations, *solved_count.accepted())


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
    free: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solved, collision-free configurations [S, 7] and their position and orientation errors [S], found by sliding q_initial [K, 7] (on or near the goal,
    but in collision) along the goal's self-motion manifold, away from obstacles.

    Each iteration takes a damped least-squares step toward the goal plus, in the null space of the
    goal's Jacobian, a step of at most step_rad down the gradient of the sphere model's penetration
    (`TorchCollisionChecker.penetration`), which moves the links out of obstacles without leaving the
    goal. Every `check_every` iterations the configurations are polished by the obstacle-ignoring LM
    and those the full checker calls free are kept (`free(q)` [N] bool decides instead when given: e.g. a
    check that leaves rows unchecked, False, at the deadline). Where random restarts rarely land in the few
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
        candidates = polished.q[done]
        done[done.clone()] = ~checker.check(candidates.to(checker.dtype), scene).in_collision if free is None else free(candidates)
        found.append((polished.q[done], polished.position_error_m[done], polished.orientation_error_rad[done]))
        q = q[~done]
    return tuple(torch.cat(part) for part in zip(*found))
