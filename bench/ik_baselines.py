"""Collision-free IK baselines for the box benchmark (paper Table 2's "MoveIt" column and friends).

Every baseline answers one goal for `panda_hand` through the same call,

    solve(goal_position [3], goal_rotation [3, 3] | None, scene, timeout_s, rng) -> (q [7] | None, attempts, elapsed_s)

and accepts a configuration only if it is within Franka's published joint limits, reaches the goal to
`POSITION_TOLERANCE_M` / `ORIENTATION_TOLERANCE_RAD` by our forward kinematics, and PyBullet's exact
meshes say it is collision-free (the ground truth the benchmark scores against). `attempts` counts
seeds (a), retries (b) or sampled redundancy parameters (c) tried before the answer or the timeout.

(a) `RandomRestartIK`: what MoveIt's KDL plugin does: uniform random seeds, Newton/Levenberg–Marquardt
    to convergence, exact-mesh validity check, restart until the timeout.
(b) `PytorchKinematicsIK`: pytorch_kinematics' batched `PseudoInverseIK`, many retries per call.
(c) `FrankIKAnalytical`: frankik's closed-form Panda IK over sampled q7 (and sampled hand
    orientations for position-only goals).

Baseline extras: `pip install -r bench/requirements.txt`.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import frankik
import numpy as np
import pybullet_data
import pytorch_kinematics as pk
import torch
from scipy.spatial.transform import Rotation

from mace_ros.core.ik_domain import IKGoal, goal_errors
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, LINK_INDEX, PandaKinematics
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.refinement import refine_candidates
from mace_ros.core.scene import Scene

TIP_LINK = "panda_hand"
# The engine's polishing tolerances (config/mace.yaml `ik`), so every method aims at the same target.
POSITION_TOLERANCE_M = 1e-6
ORIENTATION_TOLERANCE_RAD = 1e-4

SolveOutcome = tuple[np.ndarray | None, int, float]


class IKBaseline(Protocol):
    name: str

    def solve(self, goal_position: np.ndarray, goal_rotation: np.ndarray | None, scene: Scene, timeout_s: float,
              rng: np.random.Generator) -> SolveOutcome: ...


class _ExactAcceptance:
    """The acceptance test all baselines share: joint limits, goal tolerance, then exact-mesh collision."""

    def __init__(self, exact_checker: PyBulletCollisionChecker):
        self.exact_checker = exact_checker
        self.kinematics = PandaKinematics("cpu", torch.float64)

    def first_valid(self, candidates: torch.Tensor, goal: IKGoal, scene: Scene) -> np.ndarray | None:
        """The first of candidates [K, 7] (float64) that passes, or None."""
        if candidates.shape[0] == 0:
            return None
        position_error, orientation_error = goal_errors(self.kinematics, candidates, goal)
        reaches = (position_error <= POSITION_TOLERANCE_M) & (orientation_error <= ORIENTATION_TOLERANCE_RAD)
        valid = candidates[reaches & self.kinematics.within_limits(candidates)]
        if valid.shape[0] == 0:
            return None
        # One batched exact check is cheaper than stopping at the first free one (PyBullet's per-call cost).
        free = ~self.exact_checker.check(valid, scene).in_collision
        indices = torch.nonzero(free).flatten()
        return valid[int(indices[0])].numpy() if indices.numel() else None


def _goal(goal_position: np.ndarray, goal_rotation: np.ndarray | None) -> IKGoal:
    rotation = None if goal_rotation is None else torch.as_tensor(goal_rotation, dtype=torch.float64)
    return IKGoal(torch.as_tensor(goal_position, dtype=torch.float64), rotation, TIP_LINK)


def _uniform_in_limits(rng: np.random.Generator, count: int) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(JOINT_LOWER, JOINT_UPPER, size=(count, 7)))


@dataclass(frozen=True)
class _NoObstacleCheck:
    """Stands in for the torch collision checker inside `refine_candidates`: KDL solves without obstacles
    and validates afterwards, so the Newton iterations themselves must ignore collisions."""

    dtype: torch.dtype = torch.float64

    @dataclass(frozen=True)
    class _Report:
        in_collision: torch.Tensor

    def check(self, q: torch.Tensor, scene: Scene) -> "_NoObstacleCheck._Report":
        return self._Report(torch.zeros(q.shape[0], dtype=torch.bool))


class RandomRestartIK:
    """(a) Random-restart Levenberg–Marquardt IK with an exact-mesh validity check (MoveIt + KDL style).

    KDL restarts one seed at a time; here `seeds_per_round` seeds share one batched LM run, because in
    Python the per-iteration overhead, not the arithmetic, dominates. Solutions are accepted in seed order.
    `max_iterations` plays the part of KDL's per-attempt cap: measured on random Panda goals, 54% of
    uniform seeds converge to 1e-6 m within 30 iterations and only 61% within 100, so 30 maximizes the
    converged seeds per second (93/s vs 27/s on this 2-core CPU).
    """

    name = "random_restart_lm"

    def __init__(self, exact_checker: PyBulletCollisionChecker, seeds_per_round: int = 32, max_iterations: int = 30):
        self.acceptance = _ExactAcceptance(exact_checker)
        self.seeds_per_round = seeds_per_round
        self.max_iterations = max_iterations

    def solve(self, goal_position: np.ndarray, goal_rotation: np.ndarray | None, scene: Scene, timeout_s: float,
              rng: np.random.Generator, first_seeds: np.ndarray | None = None) -> SolveOutcome:
        """`first_seeds` [S, 7], when given, are tried before any random seed (MoveIt's IK seed state; the
        paper's "MACE + MoveIt" seeds it with MACE's samples)."""
        started = time.monotonic()
        goal = _goal(goal_position, goal_rotation)
        attempts = 0
        while time.monotonic() - started < timeout_s:
            if attempts == 0 and first_seeds is not None and len(first_seeds):
                seeds = torch.as_tensor(first_seeds, dtype=torch.float64)
            else:
                seeds = _uniform_in_limits(rng, self.seeds_per_round)
            attempts += seeds.shape[0]
            refined = refine_candidates(
                seeds, goal, _NoObstacleCheck(), scene, max_iterations=self.max_iterations,
                position_tolerance_m=POSITION_TOLERANCE_M, orientation_tolerance_rad=ORIENTATION_TOLERANCE_RAD,
            )
            q = self.acceptance.first_valid(refined.q[refined.converged], goal, scene)
            if q is not None:
                return q, attempts, time.monotonic() - started
        return None, attempts, time.monotonic() - started


def pybullet_panda_urdf() -> Path:
    return Path(pybullet_data.getDataPath()) / "franka_panda" / "panda.urdf"


class PytorchKinematicsIK:
    """(b) pytorch_kinematics' batched damped-least-squares IK from `retries_per_call` uniform seeds per call.

    The chain comes from pybullet_data's panda.urdf (the URDF our kinematics and PyBullet use), with its
    joint limits replaced by Franka's published ones so that pk's limit enforcement clamps to those.
    Position-only goals zero the orientation rows (`orientation_weight=0`) and ignore its tolerance.
    """

    name = "pytorch_kinematics"

    def __init__(self, exact_checker: PyBulletCollisionChecker, retries_per_call: int = 64, max_iterations: int = 50):
        self.acceptance = _ExactAcceptance(exact_checker)
        self.retries_per_call = retries_per_call
        self.max_iterations = max_iterations
        # urdf_parser_py prints a warning per unknown tag (<material> in <collision>): not ours to fix.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            chain = pk.build_serial_chain_from_urdf(pybullet_panda_urdf().read_text(), TIP_LINK)
        # float64: float32 cannot resolve the 1e-6 m tolerance on a 1 m arm.
        self.chain = chain.to(dtype=torch.float64)
        self.chain.low = torch.tensor(JOINT_LOWER, dtype=torch.float64)
        self.chain.high = torch.tensor(JOINT_UPPER, dtype=torch.float64)
        self.joint_limits = torch.stack([self.chain.low, self.chain.high], -1)

    def solve(self, goal_position: np.ndarray, goal_rotation: np.ndarray | None, scene: Scene, timeout_s: float,
              rng: np.random.Generator) -> SolveOutcome:
        started = time.monotonic()
        goal = _goal(goal_position, goal_rotation)
        target = torch.eye(4, dtype=torch.float64)
        target[:3, 3] = goal.position
        if goal.rotation is not None:
            target[:3, :3] = goal.rotation
        target_pose = pk.Transform3d(matrix=target[None], dtype=torch.float64)
        attempts = 0
        while time.monotonic() - started < timeout_s:
            solver = pk.PseudoInverseIK(
                self.chain,
                retry_configs=_uniform_in_limits(rng, self.retries_per_call),
                joint_limits=self.joint_limits,
                max_iterations=self.max_iterations,
                pos_tolerance=POSITION_TOLERANCE_M,
                rot_tolerance=ORIENTATION_TOLERANCE_RAD if goal.rotation is not None else float("inf"),
                orientation_weight=1.0 if goal.rotation is not None else 0.0,
            )
            solution = solver.solve(target_pose)
            attempts += self.retries_per_call
            q = self.acceptance.first_valid(solution.solutions[0][solution.converged[0]], goal, scene)
            if q is not None:
                return q, attempts, time.monotonic() - started
        return None, attempts, time.monotonic() - started


class FrankIKAnalytical:
    """(c) frankik's analytical IK (up to 4 branches per q7) over q7 drawn uniformly in its limits.

    Conventions, measured: `frankik.fk` returns panda_hand translated 0.1034 m along the hand's z
    (Franka's TCP), but `frankik.ik_full` takes the flange pose (panda_link8, the hand rotated +pi/4
    about z), so fk(ik(T)) != T. We hand it the flange pose from our FK and check the round trip at
    start-up. Its closed form misses configurations with a nearly straight elbow (q4 > ~ -0.46 rad;
    ~15% of uniform random configurations): a coverage limit of the method, not of this wrapper.
    A position-only goal has no orientation to give a closed-form solver, so each attempt also draws
    a uniformly random hand orientation.
    """

    name = "frankik_analytical"

    def __init__(self, exact_checker: PyBulletCollisionChecker, q7_per_round: int = 32):
        self.acceptance = _ExactAcceptance(exact_checker)
        self.q7_per_round = q7_per_round
        self.hand_to_flange = self._verified_hand_to_flange()

    def _verified_hand_to_flange(self) -> np.ndarray:
        q_ready = np.asarray(frankik.kQDefault, dtype=np.float64)
        frames = self.acceptance.kinematics.link_transforms(torch.from_numpy(q_ready)[None])[0].numpy()
        hand, flange = frames[LINK_INDEX[TIP_LINK]], frames[LINK_INDEX["panda_link8"]]
        branches = frankik.ik_full(flange, q7=float(q_ready[6]), is_fr3=False)
        if not np.nanmin(np.abs(branches - q_ready).max(-1)) < 1e-9:
            raise RuntimeError("frankik.ik_full does not recover the ready pose from its flange pose: conventions changed")
        return np.linalg.inv(hand) @ flange

    def solve(self, goal_position: np.ndarray, goal_rotation: np.ndarray | None, scene: Scene, timeout_s: float,
              rng: np.random.Generator) -> SolveOutcome:
        started = time.monotonic()
        goal = _goal(goal_position, goal_rotation)
        hand_goal = np.eye(4)
        hand_goal[:3, 3] = goal_position
        attempts = 0
        while time.monotonic() - started < timeout_s:
            branches = []
            for q7 in rng.uniform(JOINT_LOWER[6], JOINT_UPPER[6], size=self.q7_per_round):
                hand_goal[:3, :3] = goal_rotation if goal_rotation is not None else Rotation.random(rng=rng).as_matrix()
                branches.append(frankik.ik_full(hand_goal @ self.hand_to_flange, q7=float(q7), is_fr3=False))
            attempts += self.q7_per_round
            solutions = torch.from_numpy(np.concatenate(branches))
            solutions = solutions[~solutions.isnan().any(-1)]
            q = self.acceptance.first_valid(solutions, goal, scene)
            if q is not None:
                return q, attempts, time.monotonic() - started
        return None, attempts, time.monotonic() - started
