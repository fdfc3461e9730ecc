"""GetIK without ROS: prior samples -> MACE tuning against the scene -> LM polish -> ranked solutions."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mace_ros.core.collision import TensorScene, TorchCollisionChecker
from mace_ros.core.ik_domain import IKDomain, IKGoal
from mace_ros.core.ik_prior import DEFAULT_WEIGHTS, PRIOR_TIP_LINK, AutoregressiveIKPrior, GoalConditionedPrior, goal_features
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, LINK_INDEX, PandaKinematics
from mace_ros.core.mace import MacePreset, StopRule, TuneResult, mace_tune
from mace_ros.core.resources import default_parameters
from mace_ros.core.refinement import RefineResult, refine_candidates
from mace_ros.core.scene import Scene
from mace_ros.core.weights import load_weights


@dataclass(frozen=True)
class IKRequest:
    goal_position: np.ndarray  # [3], base frame
    goal_quaternion_wxyz: np.ndarray | None  # [4]; None = position only
    tip_link: str
    num_solutions: int
    num_samples: int
    tuning_iterations: int  # 0 = straight prior samples
    timeout_s: float
    seed_state: np.ndarray | None = None  # [7]
    random_seed: int = 0


@dataclass
class IKResult:
    success: bool
    message: str
    solutions: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    position_errors_m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    orientation_errors_rad: np.ndarray = field(default_factory=lambda: np.zeros(0))
    collision_free_rate: float = 0.0
    tuning_iterations_done: int = 0
    tuning_time_s: float = 0.0
    elapsed_s: float = 0.0


class IKEngine:
    """Holds the trained prior, kinematics and collision checker; `solve` serves one request."""

    def __init__(self, config: dict[str, Any] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        # Defaults come from config/mace.yaml (documented in mace_ros/ros/parameters.py).
        self.config = {**default_parameters("ik"), **(config or {})}
        self.device = torch.device(device)
        self.dtype = dtype
        self.kinematics = PandaKinematics(self.device, dtype)
        self.checker = TorchCollisionChecker(device=self.device, dtype=dtype, collision_margin_m=self.config["collision_margin_m"])
        self.prior = AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER)
        weights_path = Path(self.config["weights_path"] or DEFAULT_WEIGHTS)
        self.weights_metadata = load_weights(self.prior, weights_path, self.device, dtype)
        self.prior.eval()
        # Fixed transform from the prior's tip (panda_hand) to every link after it, for goal conversion.
        zero_frames = self.kinematics.link_transforms(torch.zeros(1, 7, device=self.device, dtype=dtype))[0]
        self._hand_frame_at_zero = zero_frames[LINK_INDEX[PRIOR_TIP_LINK]]
        self._frames_at_zero = zero_frames
        self._prepared_scene: tuple[Scene, TensorScene] | None = None
        self._warm_up()

    def _tensor_scene(self, scene: Scene) -> TensorScene:
        """The scene as tensors, rebuilt only for a new Scene object (a cloud's distance field is costly)."""
        cached = self._prepared_scene
        if cached is not None and cached[0] is scene:
            return cached[1]
        prepared = self.checker.prepare(scene)
        self._prepared_scene = (scene, prepared)
        return prepared

    def _warm_up(self) -> None:
        """One small solve, so that torch's one-time allocations don't land on the first request."""
        request = IKRequest(np.array([0.5, 0.0, 0.4]), None, PRIOR_TIP_LINK, 1, 64, 1, 1.0)
        self.solve(request, Scene())

    def prior_goal_features(self, goal: IKGoal) -> torch.Tensor:
        """Goal features for the prior, which was trained on panda_hand poses.

        A pose goal for a link rigidly attached to the hand is converted exactly; otherwise the tip's
        position stands in for the hand's (tuning and refinement correct the difference).
        """
        position, rotation = goal.position[None], None if goal.rotation is None else goal.rotation[None]
        tip_index = LINK_INDEX[goal.tip_link]
        if goal.rotation is not None and tip_index >= LINK_INDEX[PRIOR_TIP_LINK]:
            hand_to_tip = torch.linalg.inv(self._hand_frame_at_zero) @ self._frames_at_zero[tip_index]
            rotation = rotation @ hand_to_tip[:3, :3].T
            position = position - (rotation @ hand_to_tip[:3, 3:]).squeeze(-1)
        return goal_features(position, rotation)

    def solve(self, request: IKRequest, scene: Scene) -> IKResult:
        started = time.monotonic()
        config = self.config
        generator = torch.Generator(device=self.device).manual_seed(int(request.random_seed))
        position = torch.as_tensor(request.goal_position, dtype=self.dtype, device=self.device)
        quaternion = None
        if request.goal_quaternion_wxyz is not None:
            quaternion = torch.as_tensor(request.goal_quaternion_wxyz, dtype=self.dtype, device=self.device)
        goal = IKGoal.from_quaternion(position, quaternion, request.tip_link)
        tensor_scene = self._tensor_scene(scene)
        domain = IKDomain(
            self.kinematics, self.checker, tensor_scene, goal,
            config["position_length_scale_m"], config["orientation_length_scale_rad"],
        )
        # Tune a per-request copy: the shared prior must stay the trained one.
        prior = GoalConditionedPrior(copy.deepcopy(self.prior), self.prior_goal_features(goal))
        preset = MacePreset(
            num_samples=request.num_samples,
            grad_steps_per_iteration=config["grad_steps_per_iteration"],
            elite_quantile=config["elite_quantile"],
            learning_rate=config["learning_rate"],
            iterations=max(request.tuning_iterations, 1),
        )
        orientation_slack = 0.0 if goal.rotation is None else config["early_stop_orientation_rad"]
        stop_rule = StopRule(
            min_score=float(domain.score_from_errors(torch.tensor(config["early_stop_position_m"]), torch.tensor(orientation_slack))),
            # Enough near-goal candidates for the requested solutions; refinement does the rest.
            count=min(config["refine_candidates"], 2 * request.num_solutions),
        )
        tuning_deadline = request.timeout_s * (1.0 - config["refine_time_fraction"])
        if request.tuning_iterations > 0:
            tuned = mace_tune(prior, domain, preset, tuning_deadline, generator, config["refine_candidates"], stop_rule=stop_rule)
        else:
            # No tuning: one batch straight from the prior (the trained model is untouched).
            with torch.no_grad():
                samples = prior.sample(request.num_samples, generator)
                scores = domain.score(samples)
            order = torch.argsort(scores, descending=True)[: config["refine_candidates"]]
            tuned = TuneResult(samples[order], scores[order], 0, time.monotonic() - started)
        tuning_time_s = time.monotonic() - started

        candidates = tuned.best_samples[tuned.best_scores > 0]
        if request.seed_state is not None:
            seed = torch.as_tensor(request.seed_state, dtype=self.dtype, device=self.device)[None]
            candidates = torch.cat([candidates, self.kinematics.clamp_to_limits(seed)])
        if candidates.shape[0] == 0:
            return IKResult(
                False,
                f"no collision-free configuration near the goal among {request.num_samples} samples per iteration "
                f"after {tuned.iterations_done} tuning iterations (collision-free rate {domain.last_collision_free_rate:.3f})",
                collision_free_rate=domain.last_collision_free_rate,
                tuning_iterations_done=tuned.iterations_done,
                tuning_time_s=tuning_time_s,
                elapsed_s=time.monotonic() - started,
            )
        refined = refine_candidates(
            candidates, goal, self.checker, tensor_scene,
            max_iterations=config["refine_max_iterations"],
            position_tolerance_m=config["position_tolerance_m"],
            orientation_tolerance_rad=config["orientation_tolerance_rad"],
            enough_solved=request.num_solutions,
        )
        return self._ranked_result(request, refined, domain, tuned.iterations_done, tuning_time_s, started)

    def _ranked_result(self, request: IKRequest, refined: RefineResult, domain: IKDomain, iterations_done: int, tuning_time_s: float, started: float) -> IKResult:
        q = refined.q
        scores = domain.score_from_errors(refined.position_error_m, refined.orientation_error_rad) * refined.collision_free
        # Rank: solved first, then higher score, then (with a seed) closer to the seed.
        seed_distance = torch.zeros_like(scores)
        if request.seed_state is not None:
            seed = torch.as_tensor(request.seed_state, dtype=q.dtype, device=q.device)
            seed_distance = (q - seed).norm(dim=-1)
        # When some candidates are solved, only solved ones are returned; otherwise the best efforts.
        any_solved = bool(refined.converged.any())
        order = sorted(
            (i for i in range(q.shape[0]) if bool(refined.converged[i]) or not any_solved),
            key=lambda i: (not bool(refined.converged[i]), -round(float(scores[i]), 9), float(seed_distance[i])),
        )
        kept: list[int] = []
        for index in order:
            if all(float((q[index] - q[other]).abs().max()) > self.config["duplicate_tolerance_rad"] for other in kept):
                kept.append(index)
            if len(kept) == request.num_solutions:
                break
        kept_tensor = torch.tensor(kept, device=q.device)
        solved = int(refined.converged[kept_tensor].sum())
        success = solved > 0
        best_position_error = float(refined.position_error_m[kept_tensor].min())
        message = (
            f"{solved} collision-free solution(s) within tolerance"
            if success
            else f"no collision-free solution within tolerance; best position error {best_position_error:.4g} m"
        )
        return IKResult(
            success=success,
            message=message,
            solutions=q[kept_tensor].cpu().numpy(),
            scores=scores[kept_tensor].cpu().numpy(),
            position_errors_m=refined.position_error_m[kept_tensor].cpu().numpy(),
            orientation_errors_rad=refined.orientation_error_rad[kept_tensor].cpu().numpy(),
            collision_free_rate=domain.last_collision_free_rate,
            tuning_iterations_done=iterations_done,
            tuning_time_s=tuning_time_s,
            elapsed_s=time.monotonic() - started,
        )
