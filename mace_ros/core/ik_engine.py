"""GetIK without ROS: a fast stage, then rounds of MACE tuning -> LM polish -> exact mesh check, until
solved or the deadline.

The fast stage is random-restart IK before any tuning: the obstacle-ignoring LM from a few plain prior
samples and uniform starts (and the seed), the fast checker, then the exact check. It answers when it
has num_solutions distinct solutions, or some and too little of the bounded wait for more is left for
a round (as after any round). Otherwise each round tunes the goal-conditioned prior for a short block
of iterations (warm: the same model and optimizer carry over), refines the best new samples plus a few
fresh ones with the collision-aware LM, exact-checks what converged and keeps the distinct solutions.
The search ends once enough distinct solutions are solved, or at the deadline (timeout_s from the
call: the node passes what is left of the request's); only then does a request fail, saying what
blocked it.
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mace_ros.core.collision import CollisionBackend, TensorScene, TorchCollisionChecker
from mace_ros.core.ik_domain import IKDomain, IKGoal
from mace_ros.core.ik_prior import DEFAULT_WEIGHTS, PRIOR_TIP_LINK, AutoregressiveIKPrior, GoalConditionedPrior, goal_features
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, LINK_INDEX, PandaKinematics, reach_bound
from mace_ros.core.mace import MacePreset, StopRule, mace_tune, sample_and_score, tuning_optimizer
from mace_ros.core.resources import default_parameters
from mace_ros.core.refinement import RefineResult, goal_cost, refine_candidates, slide_clear
from mace_ros.core.scene import Scene
from mace_ros.core.scene_warm_start import SceneWarmStart
from mace_ros.core.weights import empty_model, load_weights

# IKResult.failure_kind values: what kept a request from being solved ("" = solved).
FAILURE_KINDS = ("", "collision", "unreachable", "joint_limits", "timeout")
# Diagnosis of a failing goal: an obstacle-free LM from a few goal-conditioned prior samples, for a
# few iterations (unobstructed, it converges in about five), so that even an unreachable goal costs
# at most DIAGNOSIS_RESERVE_S on a CPU; rounds leave that much (at most a fifth of the timeout) for it.
# Solved configurations go to the exact check in blocks of this many, until a round has enough. A block
# is cut to what the exact check's measured rate in the scene fits before the deadline (one row before a
# rate is known): among a 200k-point cloud one configuration takes ~30 ms, and blocks of 4 started just
# before the deadline answered 0.1 s late.
EXACT_CHECK_BLOCK = 4
# Goal-reaching configurations of the obstacle-ignoring LM are collision-checked in blocks with the clock
# read between blocks: the narrow phase takes up to ~2 ms each deep in primitives on a CPU, ~4 ms among a
# 15k-point cloud. The first block has NARROW_CHECK_FIRST_BLOCK rows; each next one what the rate measured
# so far fits in the time left, between NARROW_CHECK_MIN_BLOCK and NARROW_CHECK_MAX_BLOCK. A GPU checks
# 4,096 in 4-13 ms (H200, BENCHMARKS.md), about what 64 cost on the CPU.
NARROW_CHECK_FIRST_BLOCK = {"cpu": 16, "cuda": 4096}
NARROW_CHECK_MIN_BLOCK = {"cpu": 4, "cuda": 1024}
NARROW_CHECK_MAX_BLOCK = {"cpu": 256, "cuda": 65536}
# Goal-reaching configurations that the fast checker rejected but the exact check gets to decide on, per failing round.
NEAR_CONTACT_EXACT_CHECKS = 4
# The fast stage's LM stops once this many times the solutions asked for reached the goal: some of
# them collide, and distinct ones are wanted.
FAST_STAGE_SURPLUS = 2
# solve_batch's goals per pass on a CPU (see solve_batch), and in its first pass, which measures the rate
# that sizes the others to the time left.
BATCH_GOALS_PER_PASS_CPU = 64
BATCH_FIRST_PASS_GOALS_CPU = 16
# A pass starts only if the rate measured so far says it ends within this share of the time left.
BATCH_PASS_TIME_SHARE = 0.8
# Candidates of one exact-check round of solve_batch checked between reads of the clock (0.2-1.5 ms each).
BATCH_EXACT_CHECK_BLOCK = 16
DIAGNOSIS_STARTS = 8
DIAGNOSIS_ITERATIONS = 20
DIAGNOSIS_RESERVE_S = 0.2
_FAILURE_CAUSES = {
    "collision": "collisions near the goal block it (a collision-ignoring solver reaches it within the joint limits)",
    "joint_limits": "the goal is reachable only beyond the joint limits",
    "unreachable": "the goal is out of reach (no configuration reaches it, even ignoring obstacles and joint limits)",
    "timeout": "the deadline came before the cause could be diagnosed",
}


@dataclass(frozen=True)
class IKRequest:
    goal_position: np.ndarray  # [3], base frame
    goal_quaternion_wxyz: np.ndarray | None  # [4]; None = position only
    tip_link: str
    num_solutions: int
    num_samples: int
    tuning_iterations: int  # 0 = straight prior samples, -1 = the config's tuning_iterations (as GetIK's -1)
    timeout_s: float
    seed_state: np.ndarray | None = None  # [7]
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.tuning_iterations < -1:
            raise ValueError(f"tuning_iterations must be -1 (the configured count), 0 (no tuning) or positive, got {self.tuning_iterations}")


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
    failure_kind: str = ""  # one of FAILURE_KINDS; "" when solved
    rounds: int = 0  # tuning + refinement rounds done
    # Seconds per stage: setup (scene), fast (the fast stage), tuning (MACE and prior sampling),
    # polish (the LM passes and their exact check), diagnosis, answer (ranking, exact check of best efforts).
    stage_times_s: dict[str, float] = field(default_factory=dict)
    # Background iterations of the scene's tuned prior that the request started from (0 = the trained prior).
    warm_start_iterations: int = 0


@dataclass
class BatchIKResult:
    """One solution per goal of a batch: rows of unsolved goals are NaN, their errors inf."""

    success: np.ndarray  # [G] bool
    solutions: np.ndarray  # [G, 7]
    position_errors_m: np.ndarray  # [G]
    orientation_errors_rad: np.ndarray  # [G]
    elapsed_s: float
    attempts: int  # rounds of starts drawn for the goals still unsolved
    out_of_reach: np.ndarray  # [G] bool: beyond the tip's reach (no configuration reaches it), given no attempt


@contextmanager
def _timed(stage_times_s: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the time spent in the block to stage_times_s[stage]."""
    started = time.monotonic()
    try:
        yield
    finally:
        stage_times_s[stage] = stage_times_s.get(stage, 0.0) + time.monotonic() - started


@dataclass
class _Solutions:
    """Configurations [S, 7] (float64) with their goal errors, kept across rounds."""

    q: torch.Tensor
    position_error_m: torch.Tensor
    orientation_error_rad: torch.Tensor

    @staticmethod
    def empty(device: torch.device) -> "_Solutions":
        zeros = torch.zeros(0, dtype=torch.float64, device=device)
        return _Solutions(torch.zeros(0, 7, dtype=torch.float64, device=device), zeros, zeros.clone())

    def __len__(self) -> int:
        return self.q.shape[0]

    def subset(self, index: torch.Tensor) -> "_Solutions":
        return _Solutions(self.q[index], self.position_error_m[index], self.orientation_error_rad[index])

    def cat(self, other: "_Solutions") -> "_Solutions":
        return _Solutions(
            torch.cat([self.q, other.q]),
            torch.cat([self.position_error_m, other.position_error_m]),
            torch.cat([self.orientation_error_rad, other.orientation_error_rad]),
        )

    def cost(self) -> torch.Tensor:
        return goal_cost(self.position_error_m, self.orientation_error_rad)


def farthest_point_selection(q: torch.Tensor, selected: list[int], pool: list[int], min_separation: float, count: int) -> list[int]:
    """Greedy farthest-point selection: add from `pool` the configuration farthest (Euclidean joint
    distance) from all of `selected`, while it is at least `min_separation` away and fewer than
    `count` are selected. Distinct solution modes (elbow, wrist flips) lie far apart, near-copies close.
    Works on a host copy of q in numpy: each step reads a value (on a GPU a synchronisation), and for
    these few dozen rows torch's per-operation cost was most of the time (~1.5 ms of a 21 ms request)."""
    q = q.detach().to("cpu", torch.float64).numpy()
    selected = list(selected)
    remaining = [i for i in pool if i not in selected]
    if not remaining or len(selected) >= count:
        return selected
    if not selected:
        selected.append(remaining.pop(0))
    candidates = q[remaining]
    # Distance of every remaining configuration to its nearest selected one, updated as they are added.
    nearest = np.sqrt(((candidates[:, None, :] - q[selected][None]) ** 2).sum(-1)).min(1)
    while len(selected) < count:
        best = int(nearest.argmax())
        if nearest[best] < min_separation or nearest[best] < 0:
            break
        selected.append(remaining[best])
        np.minimum(nearest, np.sqrt(((candidates - candidates[best]) ** 2).sum(-1)), out=nearest)
        nearest[best] = -1.0  # taken
    return selected


class IKEngine:
    """Holds the trained prior, kinematics and collision checkers; `solve` serves one request."""

    def __init__(self, config: dict[str, Any] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        # Defaults come from config/mace.yaml (documented in mace_ros/ros/parameters.py).
        self.config = {**default_parameters("ik"), **(config or {})}
        self.device = torch.device(device)
        self.dtype = dtype
        self.kinematics = PandaKinematics(self.device, dtype)
        self.checker = TorchCollisionChecker(device=self.device, dtype=dtype, collision_margin_m=self.config["collision_margin_m"],
                                             cloud_point_radius_m=self.config["cloud_point_radius_m"])
        self.exact_checker = self._make_exact_checker()
        # One Bullet client per engine: concurrent requests take turns (it also caches the scene body).
        self._exact_lock = threading.Lock()
        self.prior = empty_model(lambda: AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER))
        weights_path = Path(self.config["weights_path"] or DEFAULT_WEIGHTS)
        self.weights_metadata = load_weights(self.prior, weights_path, self.device, dtype)
        self.prior.eval()
        # Fixed transform from the prior's tip (panda_hand) to every link after it, for goal conversion.
        zero_frames = self.kinematics.link_transforms(torch.zeros(1, 7, device=self.device, dtype=dtype))[0]
        self._hand_frame_at_zero = zero_frames[LINK_INDEX[PRIOR_TIP_LINK]]
        self._frames_at_zero = zero_frames
        self._prepared_scene: tuple[Scene, TensorScene] | None = None
        # The fast check's latest measured cost per configuration (s), which sizes the first block of the next
        # (see _free_in_time); None until one has run.
        self._seconds_per_checked_row: float | None = None
        # The exact check's latest measured cost per configuration (s) and the scene it was measured in.
        self._exact_rate: tuple[Scene, float] | None = None
        # The model a request tunes, allocated once (a deep copy per request cost ~7-14 ms).
        self._tuning_model_copy = copy.deepcopy(self.prior)
        self._tuning_model_turn = threading.Lock()
        self.warm_start = SceneWarmStart(
            self.prior, self._scene_score,
            MacePreset(self.config["scene_warm_start_samples"], self.config["grad_steps_per_iteration"], self.config["elite_quantile"],
                       self.config["learning_rate"], self.config["scene_warm_start_iterations"]),
            self.config["scene_warm_start_iterations"], self.config["scene_warm_start_goals"])
        self._warm_up()
        self.warm_start.forget()  # the warm-up's scene is no user's

    def _make_exact_checker(self) -> CollisionBackend | None:
        """The final authority on collisions: exact meshes (pybullet imported here, so that mace_ros.core
        stays importable where pybullet is not installed and exact_check is "none")."""
        kind = self.config["exact_check"]
        if kind == "none":
            return None
        if kind == "pybullet":
            try:
                from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
            except ImportError as error:
                raise ImportError(f"ik.exact_check 'pybullet' needs pybullet ({error}); install it or set ik.exact_check to 'none'") from error
            return PyBulletCollisionChecker(self.config["collision_margin_m"], self.config["cloud_point_radius_m"])
        raise ValueError(f"ik.exact_check must be 'pybullet' or 'none', got {kind!r}")

    def _exactly_free(self, q: torch.Tensor, scene: Scene) -> torch.Tensor:
        """[B] bool: collision-free for the exact check (all True without one)."""
        if self.exact_checker is None or q.shape[0] == 0:
            return torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        with self._exact_lock:
            started = time.monotonic()
            free = ~self.exact_checker.check(q, scene).in_collision.to(q.device)
            self._exact_rate = (scene, (time.monotonic() - started) / q.shape[0])
            return free

    def _exact_blocks(self, order: torch.Tensor, scene: Scene, block_size: int, deadline_at: float) -> Iterator[torch.Tensor]:
        """Consecutive blocks of `order` for the exact check, of at most `block_size`, each cut to what the
        check's rate measured in `scene` fits before `deadline_at` (one row before a rate is known there);
        ends where not even one row fits: a check started anyway would only make the answer late."""
        position = 0
        while position < order.numel():
            size = min(block_size, order.numel() - position)
            if self.exact_checker is not None:
                time_left, measured = deadline_at - time.monotonic(), self._exact_rate
                if time_left <= 0.0:
                    return
                size = min(size, 1 if measured is None or measured[0] is not scene else int(time_left / max(measured[1], 1e-9)))
                if size == 0:
                    return
            yield order[position:position + size]
            position += size

    def _tensor_scene(self, scene: Scene) -> TensorScene:
        """The scene as tensors, rebuilt only for a new Scene object (a cloud's distance field is costly)."""
        cached = self._prepared_scene
        if cached is not None and cached[0] is scene:
            return cached[1]
        prepared = self.checker.prepare(scene)
        self._prepared_scene = (scene, prepared)
        return prepared

    def prepare_scene(self, scene: Scene) -> None:
        """Builds what requests in `scene` reuse: its tensors (the cloud's distance field looked up), the cloud's
        cells, the exact checker's bodies and cells. The node calls it while the engine is idle after each change
        of its obstacle model, so that the next request does not (a camera cloud of 17k points: ~6 ms of it)."""
        tensor_scene = self._tensor_scene(scene)
        if tensor_scene.points.shape[0]:
            tensor_scene.point_grid  # noqa: B018 - a cached property: built now, kept with the scene
        if self.exact_checker is not None:
            with self._exact_lock:
                self.exact_checker.check(np.zeros((0, 7)), scene)  # builds and keeps the scene's bodies (and cells); checks nothing

    def _domain(self, goal: IKGoal, tensor_scene: TensorScene) -> IKDomain:
        config = self.config
        return IKDomain(
            self.kinematics, self.checker, tensor_scene, goal,
            config["position_length_scale_m"], config["orientation_length_scale_rad"], config["tuning_narrow_phase_fraction"],
        )

    def _scene_score(self, goal: IKGoal, tensor_scene: TensorScene, q: torch.Tensor) -> torch.Tensor:
        """MACE's score of q [B, 7] for `goal` in the scene (the warm start's background tuning)."""
        return self._domain(goal, tensor_scene).score(q)

    def forget_scenes(self) -> None:
        """Drops the scene warm start's tuned prior: the next request starts from the trained one."""
        self.warm_start.forget()

    def _warm_up(self) -> None:
        """One small solve and one tuning iteration, so that torch's one-time allocations and imports don't
        land on the first request (the first Adam imports torch._dynamo: 1.5 s on a CPU)."""
        position = np.array([0.5, 0.0, 0.4])
        self.solve(IKRequest(position, None, PRIOR_TIP_LINK, 1, 64, 1, 5.0), Scene())
        goal = IKGoal(torch.as_tensor(position, dtype=self.dtype, device=self.device), None, PRIOR_TIP_LINK)
        prior = self._tunable(self._tuning_model_copy, self.prior, self.prior_goal_features(goal))
        preset = MacePreset(num_samples=64, grad_steps_per_iteration=1, elite_quantile=0.25, learning_rate=0.0, iterations=1)
        mace_tune(prior, self._domain(goal, self._tensor_scene(Scene())), preset, optimizer=tuning_optimizer(prior, preset))

    def prior_goal_features(self, goal: IKGoal) -> torch.Tensor:
        """Goal features for the prior, which was trained on panda_hand poses.

        A pose goal for a link rigidly attached to the hand is converted exactly; otherwise the tip's
        position stands in for the hand's (tuning and refinement correct the difference). One row per
        goal of a batch.
        """
        position = goal.position.reshape(-1, 3).to(self.dtype)
        rotation = None if goal.rotation is None else goal.rotation.reshape(-1, 3, 3).to(self.dtype)
        tip_index = LINK_INDEX[goal.tip_link]
        if goal.rotation is not None and tip_index >= LINK_INDEX[PRIOR_TIP_LINK]:
            hand_to_tip = torch.linalg.inv(self._hand_frame_at_zero) @ self._frames_at_zero[tip_index]
            rotation = rotation @ hand_to_tip[:3, :3].T
            position = position - (rotation @ hand_to_tip[:3, 3:]).squeeze(-1)
        return goal_features(position, rotation)

    @contextmanager
    def _tuning_model(self) -> Iterator[AutoregressiveIKPrior | None]:
        """The preallocated model a request tunes (its weights overwritten by the request), or None while
        another request holds it (that one then deep-copies the prior)."""
        if not self._tuning_model_turn.acquire(blocking=False):
            yield None
            return
        try:
            yield self._tuning_model_copy
        finally:
            self._tuning_model_turn.release()

    @staticmethod
    def _tunable(model: AutoregressiveIKPrior | None, source: AutoregressiveIKPrior, features: torch.Tensor) -> GoalConditionedPrior:
        """A tunable copy of `source` in `model` (None: a new copy) bound to the goal: the shared priors must stay as they are."""
        if model is None:
            return GoalConditionedPrior(copy.deepcopy(source), features)
        with torch.no_grad():
            torch._foreach_copy_(list(model.parameters()), list(source.parameters()))
        return GoalConditionedPrior(model, features)

    def solve(self, request: IKRequest, scene: Scene) -> IKResult:
        """Serves one request; its goal joins the scene warm start's (tuned in the background once no request runs)."""
        with self._tuning_model() as model, self.warm_start.request():
            return self._solve(request, scene, model)

    def _solve(self, request: IKRequest, scene: Scene, tuning_model: AutoregressiveIKPrior | None) -> IKResult:
        started = time.monotonic()  # the caller passes what is left of the request's timeout
        config = self.config
        # Work stops a little before the deadline: the final exact check of best efforts and the ranking follow.
        answer_deadline = started + request.timeout_s
        work_deadline = answer_deadline - min(config["deadline_reserve_s"], 0.5 * request.timeout_s)
        generator = torch.Generator(device=self.device).manual_seed(int(request.random_seed))
        # -1 is the configured count, as in GetIK and InferShape (it had silently meant no tuning here).
        tuning_iterations = config["tuning_iterations"] if request.tuning_iterations == -1 else request.tuning_iterations
        # The goal in float64: in float32 it moves by up to ~5e-8 m, and answers must be within 1e-6 m of the requested one.
        position = torch.as_tensor(request.goal_position, dtype=torch.float64, device=self.device)
        quaternion = None
        if request.goal_quaternion_wxyz is not None:
            quaternion = torch.as_tensor(request.goal_quaternion_wxyz, dtype=torch.float64, device=self.device)
        goal = IKGoal.from_quaternion(position, quaternion, request.tip_link)
        stage_times_s: dict[str, float] = {}
        tensor_scene = self._tensor_scene(scene)
        domain = self._domain(goal, tensor_scene)
        # The scene's prior tuned in the background, when there is one; else the trained prior.
        source = self.warm_start.model(scene) or self.prior
        warm_start_iterations = self.warm_start.iterations_done(scene) if source is not self.prior else 0
        features = self.prior_goal_features(goal)
        refining = config["refine_max_iterations"] > 0
        preset = MacePreset(
            num_samples=request.num_samples,
            grad_steps_per_iteration=config["grad_steps_per_iteration"],
            elite_quantile=config["elite_quantile"],
            learning_rate=config["learning_rate"],
            # Without refinement (the paper's MACE alone, for benchmarks) one round tunes the whole budget.
            iterations=config["tuning_block_iterations"] if refining else tuning_iterations,
        )
        orientation_slack = 0.0 if goal.rotation is None else config["early_stop_orientation_rad"]
        stop_rule = StopRule(
            min_score=float(domain.score_from_errors(torch.tensor(config["early_stop_position_m"]), torch.tensor(orientation_slack))),
            # Enough near-goal candidates for the requested solutions; refinement does the rest.
            count=min(config["refine_candidates"], 2 * request.num_solutions),
        )
        seed = None
        if request.seed_state is not None:
            seed = self.kinematics.clamp_to_limits(torch.as_tensor(request.seed_state, dtype=self.dtype, device=self.device)[None])
        solved = _Solutions.empty(self.device)
        best_efforts = _Solutions.empty(self.device)
        tuning_left, iterations_done, tuning_time_s, rounds, exact_rejections = tuning_iterations, 0, 0.0, 0, 0
        failure_kind = "timeout"  # until a failed round is diagnosed
        diagnosed = False
        first_solved_s: float | None = None
        fast_free_rate = float("nan")  # the fast stage's, reported when no tuning round samples
        diagnosis_reserve_s = min(DIAGNOSIS_RESERVE_S, 0.2 * request.timeout_s)
        stage_times_s["setup"] = time.monotonic() - started
        # No configuration reaches a goal beyond the tip's reach: it gets best efforts and its answer at once.
        beyond_reach_m = float(self._beyond_reach_m(goal))
        if beyond_reach_m > 0.0:
            failure_kind = "unreachable"
            with _timed(stage_times_s, "polish"):
                best_efforts = self._efforts_toward(GoalConditionedPrior(source, features), goal, tensor_scene, generator, seed, work_deadline)
        if refining and config["fast_stage_starts"] > 0 and beyond_reach_m <= 0.0:
            # Random-restart IK from a few plain prior samples (and the seed) first: most goals need no tuning.
            with _timed(stage_times_s, "fast"):
                with torch.no_grad():
                    starts = self._unobstructed_starts(GoalConditionedPrior(source, features), generator, config["fast_stage_starts"])
                if seed is not None:
                    starts = torch.cat([seed, starts])
                fast_solved, exact_rejections, fast_free_rate = self._fast_stage(
                    starts, goal, scene, tensor_scene, request.num_solutions, work_deadline, answer_deadline, seeded=seed is not None)
                solved = self._merged(solved, fast_solved)
            if len(solved) == 0 and config["unobstructed_starts"] > 0 and work_deadline - time.monotonic() > config["min_round_s"]:
                # A wider random restart before any tuning, within at most a minimum round: where the free
                # configurations are a sliver (e.g. at the joint limits inside a lidded box) a few dozen starts
                # miss it, and a tuning round's first batch of samples costs 0.2-0.4 s among obstacles here,
                # while the same restarts solve such goals in tens of ms.
                with _timed(stage_times_s, "fast"):
                    with torch.no_grad():
                        starts = self._unobstructed_starts(GoalConditionedPrior(source, features), generator, config["unobstructed_starts"])
                    wide_deadline = min(work_deadline, time.monotonic() + config["min_round_s"])
                    wide_solved, wide_rejections, _ = self._fast_stage(
                        starts, goal, scene, tensor_scene, request.num_solutions, wide_deadline, answer_deadline)
                    solved, exact_rejections = self._merged(solved, wide_solved), exact_rejections + wide_rejections
            if len(solved):
                first_solved_s = time.monotonic() - started
                work_deadline = min(work_deadline, started + first_solved_s * (1.0 + config["more_solutions_time_factor"]))
        # Rounds of tuning and refinement, unless the fast stage answered: as after any solving round, more
        # distinct solutions get a round only when the bounded wait for them leaves half a minimum round.
        # A first round needs half a minimum round or half the request's timeout: its first chunk of samples is
        # drawn whatever the time left, so with a tiny timeout that the fast stage has used up it would only
        # overrun the deadline, while a short one (0.1 s) still gets its round.
        time_left = work_deadline - time.monotonic()
        finished = beyond_reach_m > 0.0 or len(solved) >= request.num_solutions or (
            len(solved) > 0 and time_left < 0.5 * config["min_round_s"]) or time_left < min(0.5 * config["min_round_s"], 0.5 * request.timeout_s)
        prior = None if finished else self._tunable(tuning_model, source, features)
        optimizer = None if prior is None else tuning_optimizer(prior, preset)
        while not finished:
            rounds += 1
            block_started = time.monotonic()
            # Until something is solved or the goal diagnosed, a round leaves time for the diagnosis.
            time_left = work_deadline - (0.0 if diagnosed or len(solved) else diagnosis_reserve_s) - block_started
            # A round takes round_time_fraction of the time left (all of it once that is short), so that a
            # refinement stuck against obstacles cannot eat the budget of the rounds after it.
            fraction = 1.0 if time_left < 2 * config["min_round_s"] else config["round_time_fraction"]
            round_deadline = block_started + max(time_left * fraction, min(config["min_round_s"], time_left))
            # Sampling and tuning leave refine_time_fraction of the round to its refinement.
            sampling_deadline = block_started + (round_deadline - block_started) * (1.0 - config["refine_time_fraction"])
            with _timed(stage_times_s, "tuning"):
                if tuning_left > 0:
                    # Only the first round may cut its block short: once a refinement has failed, tuning goes on.
                    tuned = mace_tune(
                        prior, domain, replace(preset, iterations=min(preset.iterations, tuning_left)),
                        sampling_deadline - block_started, generator, config["refine_candidates"],
                        stop_rule=stop_rule if rounds == 1 else None, optimizer=optimizer, chunk_size=config["sample_chunk_size"],
                    )
                    tuning_left -= tuned.iterations_done
                    iterations_done += tuned.iterations_done
                    tuning_time_s += time.monotonic() - block_started
                    best_q, best_scores = tuned.best_samples, tuned.best_scores
                else:
                    # No tuning (left): a fresh batch straight from the prior tuned so far.
                    samples, scores, _ = sample_and_score(
                        prior, domain, request.num_samples, generator, config["sample_chunk_size"], sampling_deadline)
                    order = torch.argsort(scores, descending=True)[: config["refine_candidates"]]
                    best_q, best_scores = samples[order], scores[order]
                candidates = [best_q[best_scores > 0], self._fresh_collision_free(prior, domain, generator)]
                if seed is not None and rounds == 1:
                    candidates.insert(0, seed)  # as MoveIt answers from its seed, a refinement from it is always tried
                free_starts = self._unobstructed_starts(prior, generator, config["unobstructed_starts"])
            # Twice the request converged gives the ranking a choice of modes; stuck candidates need not finish.
            with _timed(stage_times_s, "polish"):
                new_solved, new_efforts, rejected = self._polished_candidates(
                    torch.cat(candidates), free_starts, goal, scene, tensor_scene,
                    config["refine_max_iterations"], round_deadline, answer_deadline, enough_solved=2 * request.num_solutions)
            exact_rejections += rejected
            solved = self._merged(solved, new_solved)
            best_efforts = self._merged(best_efforts, new_efforts)
            best_efforts = best_efforts.subset(torch.argsort(best_efforts.cost())[: 4 * request.num_solutions])
            # Enough distinct solutions: answer now (the ranking picks distinct modes among them).
            # Without refinement (the paper's MACE alone, for benchmarks) one round is all there is.
            if len(solved) >= request.num_solutions or not refining:
                break
            if len(solved) and first_solved_s is None:
                first_solved_s = time.monotonic() - started
                # More modes are worth a bounded wait, not the whole budget: a planner wants its answer.
                work_deadline = min(work_deadline, started + first_solved_s * (1.0 + config["more_solutions_time_factor"]))
            if len(solved) == 0 and not diagnosed:
                with _timed(stage_times_s, "diagnosis"):
                    failure_kind, diagnosed = self._diagnose(prior, goal, generator, work_deadline, seed), True
            # A round always draws its first chunk of samples: one that cannot get half a minimum round
            # would only overrun the deadline.
            if work_deadline - time.monotonic() < 0.5 * config["min_round_s"]:
                break
        with _timed(stage_times_s, "answer"):
            result = self._result(
                request, scene, domain, solved, best_efforts, seed, failure_kind, exact_rejections,
                iterations_done, tuning_time_s, rounds, started, fast_free_rate, beyond_reach_m,
            )
        result.stage_times_s = stage_times_s
        result.warm_start_iterations = warm_start_iterations
        if beyond_reach_m <= 0.0:  # the scene's warm start tunes for goals that can be reached
            self.warm_start.record(scene, tensor_scene, goal, features)
        return result

    def _beyond_reach_m(self, goals: IKGoal) -> torch.Tensor:
        """[B] (a single goal: [1]) how far (m) each goal lies beyond where any configuration puts the tip within
        tolerance, even ignoring joint limits and obstacles: > 0 only where no configuration reaches it."""
        position = goals.position.reshape(-1, 3)
        rotation = None if goals.rotation is None else goals.rotation.reshape(-1, 3, 3)
        excess = reach_bound(goals.tip_link).excess_m(position, rotation, self.config["orientation_tolerance_rad"])
        return excess - self.config["position_tolerance_m"]

    def _efforts_toward(self, prior: GoalConditionedPrior, goal: IKGoal, tensor_scene: TensorScene, generator: torch.Generator,
                        seed: torch.Tensor | None, deadline_at: float) -> _Solutions:
        """Best efforts for a goal nothing reaches: a minimum round of the collision-aware LM from the fast
        stage's count of collision-free prior samples (and the seed) toward it, as near as obstacles allow."""
        with torch.no_grad():
            starts = prior.sample(self.config["fast_stage_starts"], generator)
        if seed is not None:
            starts = torch.cat([seed, starts])
        starts = starts[self._fast_free(tensor_scene, deadline_at)(starts)]
        refined = refine_candidates(
            starts, goal, self.checker, tensor_scene, max_iterations=self.config["refine_max_iterations"],
            deadline_at=min(deadline_at, time.monotonic() + self.config["min_round_s"]),
            position_tolerance_m=self.config["position_tolerance_m"], orientation_tolerance_rad=self.config["orientation_tolerance_rad"])
        return _Solutions(refined.q, refined.position_error_m, refined.orientation_error_rad).subset(
            torch.nonzero(refined.collision_free).squeeze(-1))

    def _fresh_collision_free(self, prior: GoalConditionedPrior, domain: IKDomain, generator: torch.Generator) -> torch.Tensor:
        """A few plain samples of the prior tuned so far, collision-free ones only: starts for the LM that
        the score ranking would not pick, so that other solution modes get a chance."""
        count = max(1, round(self.config["refine_candidates"] * self.config["refine_fresh_fraction"]))
        with torch.no_grad():
            samples = prior.sample(count, generator)
            return samples[domain.score(samples) > 0]

    def _unobstructed_starts(self, prior: GoalConditionedPrior, generator: torch.Generator, count: int) -> torch.Tensor:
        """`count` starts for the obstacle-ignoring LM, wherever they lie: half plain samples of the prior
        (near the goal), half uniform in the joint limits (modes the prior misses)."""
        with torch.no_grad():
            return torch.cat([prior.sample(count - count // 2, generator), self.kinematics.random_configurations(count // 2, generator)])

    def _polished_candidates(
        self, candidates: torch.Tensor, free_starts: torch.Tensor, goal: IKGoal, scene: Scene, tensor_scene: TensorScene,
        max_iterations: int, deadline_at: float, exact_deadline_at: float, enough_solved: int | None = None,
    ) -> tuple[_Solutions, _Solutions, int]:
        """LM-refine two ways; returns the solved configurations that pass the exact check, the unsolved
        but collision-free ones (best efforts), and how many solved ones the exact check rejected.

        First as random-restart IK does (MoveIt's KDL with a validity check): an LM that ignores
        obstacles, from the candidates and `free_starts`, whose converged results count if they are
        collision-free. It needs no collision check inside its loop, and it crosses thin obstacles the
        collision-aware LM stops at. Then the collision-aware LM from the collision-free candidates the
        first way did not solve (until `enough_solved` converge): it stays clear of obstacles as it goes.
        """
        config = self.config
        tolerances = {"position_tolerance_m": config["position_tolerance_m"], "orientation_tolerance_rad": config["orientation_tolerance_rad"]}
        starts = torch.cat([candidates, free_starts])
        if starts.shape[0] == 0:
            return _Solutions.empty(self.device), _Solutions.empty(self.device), 0
        # Half the time left at most, so that checking its results (and the other ways) fits.
        unobstructed_deadline = time.monotonic() + 0.5 * (deadline_at - time.monotonic())
        # Four times what the round needs is plenty to pick collision-free ones from: stop there, once half of
        # what the round needs are free (the first to converge may all collide).
        unobstructed = refine_candidates(
            starts, goal, None, None, max_iterations=min(max_iterations, config["unobstructed_max_iterations"]),
            enough_solved=None if enough_solved is None else 4 * enough_solved, deadline_at=unobstructed_deadline,
            accept=self._fast_free(tensor_scene, deadline_at), min_accepted=max(1, (enough_solved or 0) // 2), **tolerances)
        reached = self._reached_free(unobstructed, tensor_scene, deadline_at)
        solved = _Solutions(unobstructed.q, unobstructed.position_error_m, unobstructed.orientation_error_rad).subset(reached)
        # The starts that reached the goal but collide are the raw material of slide_clear.
        colliding = unobstructed.converged.clone()
        colliding[reached] = False
        colliding = torch.nonzero(colliding).squeeze(-1)[: config["slide_starts"]]
        if colliding.numel() and len(solved) < (enough_solved or 1):
            solved = solved.cat(_Solutions(*slide_clear(
                unobstructed.q[colliding], goal, self.checker, tensor_scene, iterations=config["slide_iterations"],
                step_rad=config["slide_step_rad"], deadline_at=deadline_at, free=self._fast_free(tensor_scene, deadline_at), **tolerances)))
        efforts = _Solutions.empty(self.device)
        unsolved = torch.ones(candidates.shape[0], dtype=torch.bool, device=candidates.device)
        unsolved[reached[reached < candidates.shape[0]]] = False
        still_needed = None if enough_solved is None else enough_solved - len(solved)
        if bool(unsolved.any()) and (still_needed is None or still_needed > 0) and time.monotonic() < deadline_at:
            refined: RefineResult = refine_candidates(
                candidates[unsolved], goal, self.checker, tensor_scene, max_iterations=max_iterations,
                enough_solved=still_needed, deadline_at=deadline_at, **tolerances,
            )
            everything = _Solutions(refined.q, refined.position_error_m, refined.orientation_error_rad)
            solved = solved.cat(everything.subset(torch.nonzero(refined.converged).squeeze(-1)))
            efforts = everything.subset(torch.nonzero(refined.collision_free & ~refined.converged).squeeze(-1))
        accepted, rejected = self._exactly_accepted(
            solved, scene, len(solved) if enough_solved is None else enough_solved, exact_deadline_at)
        if len(accepted) == 0:
            accepted = self._near_contact_accepted(unobstructed, colliding, scene, tensor_scene, exact_deadline_at)
        return accepted, efforts, rejected

    def _near_contact_accepted(self, unobstructed: RefineResult, rejected: torch.Tensor, scene: Scene, tensor_scene: TensorScene,
                               deadline_at: float) -> _Solutions:
        """Of the goal-reaching configurations the fast checker rejected (indices `rejected` into
        `unobstructed`), the few least penetrating that the exact check passes. The fast checker pads
        contact by ~1 mm, so a goal whose free solutions all lie that close (a link grazing another near a
        joint limit, say) would never be solved: the exact check decides. Called when nothing else passed,
        so rarely paid."""
        if self.exact_checker is None or rejected.numel() == 0:
            return _Solutions.empty(self.device)
        near = rejected[self._least_penetrating_first(unobstructed.q[rejected], tensor_scene)[:NEAR_CONTACT_EXACT_CHECKS]]
        solutions = _Solutions(unobstructed.q, unobstructed.position_error_m, unobstructed.orientation_error_rad).subset(near)
        return self._exactly_accepted(solutions, scene, len(near), deadline_at)[0]

    def _least_penetrating_first(self, q: torch.Tensor, tensor_scene: TensorScene) -> torch.Tensor:
        """Order of q [N, 7] by the sphere model's penetration cost, smallest first."""
        with torch.no_grad():
            return torch.argsort(self.checker.penetration(q.to(self.dtype), tensor_scene))

    def _fast_free(self, tensor_scene: TensorScene, deadline_at: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """q [N, 7] -> [N] bool: the fast checker calls q free (what the obstacle-ignoring LM's early stop counts),
        False for rows left unchecked at `deadline_at`."""
        return lambda q: self._free_in_time(q, tensor_scene, deadline_at)

    def _free_in_time(self, q: torch.Tensor, tensor_scene: TensorScene, deadline_at: float) -> torch.Tensor:
        """[N] bool: the fast checker calls q [N, 7] free, checking in blocks while time is left (see
        NARROW_CHECK_FIRST_BLOCK); rows not checked by `deadline_at` are False. The first block is also sized
        by the previous call's rate: among a camera cloud's points 16 rows took 60 ms, overrunning a deadline
        that a call made just before it."""
        free = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        kind = "cpu" if self.device.type == "cpu" else "cuda"
        start, started = 0, time.monotonic()
        block, seconds_per_row = NARROW_CHECK_FIRST_BLOCK[kind], self._seconds_per_checked_row
        while start < q.shape[0] and time.monotonic() < deadline_at:
            if seconds_per_row is not None:  # what fits the time left, at most the first or the largest block
                largest = NARROW_CHECK_FIRST_BLOCK[kind] if start == 0 else NARROW_CHECK_MAX_BLOCK[kind]
                fits = (deadline_at - time.monotonic()) / seconds_per_row
                if fits < 1.0:
                    break  # not even one row: a block started anyway would only make the answer late
                block = int(min(max(fits, NARROW_CHECK_MIN_BLOCK[kind]), largest))
            free[start:start + block] = ~self.checker.check(q[start:start + block].to(self.dtype), tensor_scene).in_collision
            start += block
            seconds_per_row = max(time.monotonic() - started, 1e-6) / start
        if start:
            self._seconds_per_checked_row = seconds_per_row
        return free

    def _reached_free(self, unobstructed: RefineResult, tensor_scene: TensorScene, deadline_at: float) -> torch.Tensor:
        """Indices of the obstacle-ignoring LM's converged results that the fast checker calls free, of those
        checked while time is left: thousands of converged starts take a while."""
        unchecked = unobstructed.converged
        reached_free = []
        if unobstructed.accept_checked is not None:  # the LM's early stop checked these already
            reached_free.append(torch.nonzero(unobstructed.converged & unobstructed.accept_passed).squeeze(-1))
            unchecked = unchecked & ~unobstructed.accept_checked
        rows = torch.nonzero(unchecked).squeeze(-1)
        reached_free.append(rows[self._free_in_time(unobstructed.q[rows], tensor_scene, deadline_at)])
        return torch.cat(reached_free).sort().values  # in start order (seed first), as checked block by block before

    def _exactly_accepted(self, solved: _Solutions, scene: Scene, needed: int, deadline_at: float) -> tuple[_Solutions, int]:
        """The solutions that pass the exact check, and how many it rejected. It (~0.2-1.5 ms a
        configuration on a CPU, several ms among thousands of markers) stops once `needed` passed, or
        at `deadline_at` (the request's end: what is unchecked then cannot be returned), taking the
        solutions farthest apart first, so that what it passes covers distinct modes."""
        accepted, rejected = [], 0
        spread = torch.tensor(farthest_point_selection(solved.q, [], list(range(len(solved))), 0.0, len(solved)), dtype=torch.long)
        for block in self._exact_blocks(spread, scene, EXACT_CHECK_BLOCK, deadline_at):  # host indices: one read of the verdicts per block
            if len(accepted) >= needed:
                break
            exactly_free = self._exactly_free(solved.q[block.to(self.device)], scene).cpu()
            accepted += block[exactly_free].tolist()
            rejected += int((~exactly_free).sum())
        return solved.subset(torch.tensor(accepted, dtype=torch.long, device=self.device)), rejected

    def solve_batch(
        self, positions: np.ndarray, quaternions_wxyz: np.ndarray | None, scene: Scene, tip_link: str = PRIOR_TIP_LINK,
        timeout_s: float = 10.0, random_seed: int = 0, starts_per_goal: int = 16, goals_per_pass: int | None = None,
    ) -> BatchIKResult:
        """One exactly collision-free solution for each of many goals (positions [G, 3], quaternions [G, 4]
        or None for position-only goals), solved together: each attempt draws `starts_per_goal` starts per
        unsolved goal (half plain prior samples for that goal, half uniform), runs one batched
        obstacle-ignoring LM over all of them, the fast checker over the converged ones, and the exact
        check of at most one candidate per goal at a time, until every goal is solved or `timeout_s`. Goals go
        in passes of `goals_per_pass` (default: 64 on a CPU, all at once on a GPU) with the clock read between."""
        started = time.monotonic()
        deadline = started + timeout_s
        generator = torch.Generator(device=self.device).manual_seed(int(random_seed))
        position = torch.as_tensor(positions, dtype=torch.float64, device=self.device).reshape(-1, 3)
        quaternion = None if quaternions_wxyz is None else torch.as_tensor(quaternions_wxyz, dtype=torch.float64, device=self.device).reshape(-1, 4)
        goals = IKGoal.from_quaternion(position, quaternion, tip_link)
        features = self.prior_goal_features(goals)
        count = position.shape[0]
        solutions = _Solutions(
            torch.full((count, 7), float("nan"), dtype=torch.float64, device=self.device),
            torch.full((count,), float("inf"), dtype=torch.float64, device=self.device),
            torch.full((count,), float("inf"), dtype=torch.float64, device=self.device))
        solved = torch.zeros(count, dtype=torch.bool, device=self.device)
        # Goals beyond the tip's reach get no attempts: the batch's others need not share its time with them.
        settled = self._beyond_reach_m(goals) > 0.0
        tensor_scene = self._tensor_scene(scene)
        # Work stops a little before the deadline, as in solve: the answer must be back by it, and partial results
        # count only if it is. Goals go in passes with the clock read between them, each pass sized by the rate
        # measured so far (on a CPU 64 goals x 16 starts take ~0.1-0.3 s) to end within the time left.
        work_deadline = deadline - min(self.config["deadline_reserve_s"], 0.5 * timeout_s)
        per_pass = goals_per_pass or (BATCH_GOALS_PER_PASS_CPU if self.device.type == "cpu" else count)
        first_pass = min(per_pass, BATCH_FIRST_PASS_GOALS_CPU) if self.device.type == "cpu" else per_pass
        seconds_per_goal: float | None = None
        attempts, out_of_time = 0, False
        while not out_of_time and not bool((solved | settled).all()) and time.monotonic() < work_deadline:
            attempts += 1
            queue = torch.nonzero(~(solved | settled)).squeeze(-1)
            while queue.numel():
                if seconds_per_goal is None:
                    size = first_pass
                else:
                    size = min(per_pass, int(BATCH_PASS_TIME_SHARE * (work_deadline - time.monotonic()) / seconds_per_goal))
                if size < 1:
                    out_of_time = True  # not even one goal's pass fits the time left
                    break
                batch, queue = queue[:size], queue[size:]
                pass_started = time.monotonic()
                self._batch_pass(batch, goals, features, scene, tensor_scene, generator, starts_per_goal, work_deadline,
                                 solutions, solved)
                seconds_per_goal = (time.monotonic() - pass_started) / batch.numel()
        return BatchIKResult(
            solved.cpu().numpy(), solutions.q.cpu().numpy(), solutions.position_error_m.cpu().numpy(),
            solutions.orientation_error_rad.cpu().numpy(), time.monotonic() - started, attempts, settled.cpu().numpy())

    def _batch_pass(
        self, unsolved: torch.Tensor, goals: IKGoal, features: torch.Tensor, scene: Scene, tensor_scene: TensorScene,
        generator: torch.Generator, starts_per_goal: int, deadline: float, solutions: _Solutions, solved: torch.Tensor,
    ) -> None:
        """One pass of solve_batch over the goals `unsolved`: fills `solutions` and `solved` where it succeeds."""
        config = self.config
        from_prior = starts_per_goal - starts_per_goal // 2
        with torch.no_grad():
            prior_starts = self.prior.sample(features[unsolved].repeat_interleave(from_prior, 0), generator)
        uniform_starts = self.kinematics.random_configurations(unsolved.numel() * (starts_per_goal // 2), generator)
        starts = torch.cat([prior_starts, uniform_starts])
        owner = torch.cat([unsolved.repeat_interleave(from_prior), unsolved.repeat_interleave(starts_per_goal // 2)])
        refined = refine_candidates(
            starts, goals.rows(owner), None, None, max_iterations=config["unobstructed_max_iterations"], deadline_at=deadline,
            position_tolerance_m=config["position_tolerance_m"], orientation_tolerance_rad=config["orientation_tolerance_rad"])
        candidates = self._reached_free(refined, tensor_scene, deadline)
        if self.exact_checker is not None:
            # The fast checker pads contact by ~1 mm: a goal whose free solutions all lie that close would never
            # be solved. For each goal it found no free configuration for, the least penetrating converged one
            # it rejected goes to the exact check, which decides.
            rejected = torch.nonzero(refined.converged).squeeze(-1)
            rejected = rejected[~torch.isin(owner[rejected], owner[candidates])]
            rejected = rejected[self._least_penetrating_first(refined.q[rejected], tensor_scene)]
            rejected = rejected[torch.argsort(owner[rejected], stable=True)]  # by goal, each goal's least penetrating first
            goal_of = owner[rejected]
            first = torch.ones_like(goal_of, dtype=torch.bool)
            first[1:] = goal_of[1:] != goal_of[:-1]
            candidates = torch.cat([candidates, rejected[first]])
        # The exact check, one candidate per goal at a time, until each goal has one that passes.
        while candidates.numel() and time.monotonic() < deadline:
            goal_of = owner[candidates]
            order = torch.argsort(goal_of, stable=True)  # grouped by goal: the first of each group is tried
            candidates, goal_of = candidates[order], goal_of[order]
            first = torch.ones_like(goal_of, dtype=torch.bool)
            first[1:] = goal_of[1:] != goal_of[:-1]
            trial, trial_goals = candidates[first], goal_of[first]
            passed = torch.zeros_like(trial, dtype=torch.bool)
            checked = 0
            for block in self._exact_blocks(torch.arange(trial.numel(), device=trial.device), scene, BATCH_EXACT_CHECK_BLOCK, deadline):
                passed[block] = self._exactly_free(refined.q[trial[block]], scene)  # what the deadline leaves unchecked fails
                checked += block.numel()
            accepted, accepted_goals = trial[passed], trial_goals[passed]
            solutions.q[accepted_goals] = refined.q[accepted]
            solutions.position_error_m[accepted_goals] = refined.position_error_m[accepted]
            solutions.orientation_error_rad[accepted_goals] = refined.orientation_error_rad[accepted]
            solved[accepted_goals] = True
            if checked < trial.numel():
                return  # out of time
            remaining = ~first & ~solved[goal_of]
            candidates = candidates[remaining]

    def _fast_stage(
        self, starts: torch.Tensor, goal: IKGoal, scene: Scene, tensor_scene: TensorScene, needed: int, deadline_at: float,
        exact_deadline_at: float, seeded: bool = False,
    ) -> tuple[_Solutions, int, float]:
        """Random-restart IK before any tuning: the obstacle-ignoring LM from `starts`, stopping once
        FAST_STAGE_SURPLUS times `needed` converged and the fast checker calls `needed` of them free; then
        the exact check of the free ones until `needed` pass. `seeded`: starts[0] is the request's seed, whose
        refinement goes on alone if the early stop came first. Returns the accepted solutions, how many the
        exact check rejected, and the fraction of the converged configurations that the fast checker
        called free (NaN when none converged)."""
        config = self.config
        tolerances = {"position_tolerance_m": config["position_tolerance_m"], "orientation_tolerance_rad": config["orientation_tolerance_rad"]}
        unobstructed = refine_candidates(
            starts, goal, None, None, max_iterations=config["unobstructed_max_iterations"], enough_solved=FAST_STAGE_SURPLUS * needed,
            deadline_at=deadline_at, accept=self._fast_free(tensor_scene, deadline_at), min_accepted=needed, **tolerances)
        solved = _Solutions(unobstructed.q, unobstructed.position_error_m, unobstructed.orientation_error_rad)
        reached_free = self._reached_free(unobstructed, tensor_scene, deadline_at)
        converged = int(unobstructed.converged.sum())
        candidates = solved.subset(reached_free)  # in start order: the seed's first when it is free
        if seeded and not bool(unobstructed.converged[0]) and time.monotonic() < deadline_at:
            # The early stop came before the seed's row converged (other starts converged first): a planner
            # following a path wants that branch most, and got another 1.5-2 rad away. Its refinement goes on
            # alone (a few ms), and what it reaches free is exactly checked first.
            alone = refine_candidates(unobstructed.q[:1], goal, None, None, max_iterations=config["refine_max_iterations"],
                                      deadline_at=deadline_at, **tolerances)
            if bool(alone.converged[0]) and bool(self._free_in_time(alone.q, tensor_scene, deadline_at)[0]):
                candidates = _Solutions(alone.q, alone.position_error_m, alone.orientation_error_rad).cat(candidates)
        free_rate = len(reached_free) / converged if converged else float("nan")
        accepted, rejected = self._exactly_accepted(candidates, scene, needed, exact_deadline_at)
        if len(accepted) == 0:
            fast_rejected = torch.nonzero(unobstructed.converged).squeeze(-1)
            accepted = self._near_contact_accepted(
                unobstructed, fast_rejected[~torch.isin(fast_rejected, reached_free)], scene, tensor_scene, exact_deadline_at)
        return accepted, rejected, free_rate

    def _merged(self, kept: _Solutions, new: _Solutions) -> _Solutions:
        """`kept` plus the configurations of `new` that are no near-copy (every joint within
        duplicate_tolerance_rad) of one already kept or of an earlier one of `new`."""
        if len(new) == 0:
            return kept
        # Compared on host copies (one read, not one per configuration on a GPU).
        taken = np.empty((len(kept) + len(new), kept.q.shape[-1]))
        taken[:len(kept)] = kept.q.detach().cpu().numpy()
        count, fresh = len(kept), []
        for index, q in enumerate(new.q.detach().cpu().numpy()):
            if count == 0 or float(np.abs(taken[:count] - q).max(-1).min()) > self.config["duplicate_tolerance_rad"]:
                taken[count] = q
                count += 1
                fresh.append(index)
        return kept.cat(new.subset(torch.tensor(fresh, dtype=torch.long, device=new.q.device)))

    def _diagnose(self, prior: GoalConditionedPrior, goal: IKGoal, generator: torch.Generator, deadline_at: float,
                  seed: torch.Tensor | None = None) -> str:
        """What blocks the goal: an LM from plain prior samples (and the seed, when the caller gave one)
        ignoring collisions, then also ignoring the joint limits. Each stops at its first success, so a
        reachable goal costs a few iterations. Without the seed, a goal reachable only with a joint at its
        limit read as beyond the limits even when the seed reached it there."""
        with torch.no_grad():
            starts = prior.sample(DIAGNOSIS_STARTS, generator)
        if seed is not None:
            starts = torch.cat([seed.to(starts), starts])
        for kind, respect_limits in (("collision", True), ("joint_limits", False)):
            refined = refine_candidates(
                starts, goal, None, None,
                max_iterations=DIAGNOSIS_ITERATIONS,
                position_tolerance_m=self.config["position_tolerance_m"],
                orientation_tolerance_rad=self.config["orientation_tolerance_rad"],
                enough_solved=1, deadline_at=deadline_at, respect_limits=respect_limits,
            )
            if bool(refined.converged.any()):
                return kind
            if time.monotonic() >= deadline_at:
                return "timeout"
        return "unreachable"

    def _ranking(self, q: torch.Tensor, seed: torch.Tensor | None) -> tuple[list[int], list[int]]:
        """Indices of q [S, 7] best first, and those that are preferred. With a seed: by Euclidean joint
        distance to it (all preferred). Without: those at least joint_limit_margin_rad inside every
        limit first (preferred), each group by its smallest distance to a limit, largest first. (On host
        copies: the sort reads every value.)"""
        q = q.detach().cpu()
        if seed is not None:
            distance = (q - seed.to(q)).norm(dim=-1)
            order = torch.argsort(distance).tolist()
            return order, order
        lower, upper = self.kinematics.joint_lower.to(q), self.kinematics.joint_upper.to(q)
        clearance = torch.minimum(q - lower, upper - q).amin(dim=-1)
        inside = clearance >= self.config["joint_limit_margin_rad"]
        order = sorted(range(q.shape[0]), key=lambda i: (not bool(inside[i]), -float(clearance[i])))
        return order, [i for i in order if bool(inside[i])]

    def _result(
        self, request: IKRequest, scene: Scene, domain: IKDomain, solved: _Solutions, best_efforts: _Solutions,
        seed: torch.Tensor | None, failure_kind: str, exact_rejections: int, iterations_done: int, tuning_time_s: float,
        rounds: int, started: float, fast_free_rate: float, beyond_reach_m: float = 0.0,
    ) -> IKResult:
        count = request.num_solutions
        success = len(solved) > 0
        if success:
            # The best (seed-nearest) first, then distinct modes (farthest points) among the preferred,
            # then among the rest, finally ordered by the ranking. Near-copies are left out, even if
            # fewer than num_solutions remain: they would offer a planner nothing new.
            host_q = solved.q.detach().to("cpu", torch.float64)  # one read for the ranking and both selections
            order, preferred = self._ranking(host_q, seed)
            separation = self.config["min_separation_rad"]
            kept = farthest_point_selection(host_q, order[:1], preferred, separation, count)
            kept = farthest_point_selection(host_q, kept, order, separation, count)
            rank = {index: position for position, index in enumerate(order)}
            answer = solved.subset(torch.tensor(sorted(kept, key=rank.__getitem__), device=solved.q.device))
            message = f"{len(answer)} collision-free solution(s) within tolerance"
            failure_kind = ""
        else:
            # Best efforts must pass the exact check too: no returned configuration may collide. Nearest the
            # goal first, in blocks until `count` pass or the request's end; as solutions, at least
            # min_separation_rad apart (near-copies of the nearest would tell a planner nothing more).
            free: list[int] = []
            separation = self.config["min_separation_rad"]
            for block in self._exact_blocks(torch.argsort(best_efforts.cost()), scene, EXACT_CHECK_BLOCK, started + request.timeout_s):
                if len(free) >= count:
                    break
                for index in block[self._exactly_free(best_efforts.q[block], scene)].tolist():
                    if len(free) < count and (not free or float(
                            torch.linalg.vector_norm(best_efforts.q[free] - best_efforts.q[index], dim=-1).min()) >= separation):
                        free.append(index)
            answer = best_efforts.subset(torch.tensor(free, dtype=torch.long, device=self.device))
            best = f"best position error {float(answer.position_error_m.min()):.4g} m" if len(answer) else "no collision-free configuration near the goal"
            rejected = f"; {exact_rejections} solution(s) rejected by the exact mesh check" if exact_rejections else ""
            cause = _FAILURE_CAUSES[failure_kind]
            if beyond_reach_m > 0.0:
                cause = f"the goal is out of reach ({beyond_reach_m:.3g} m beyond where {request.tip_link} can be, even ignoring obstacles and joint limits)"
            message = (
                f"no collision-free solution within tolerance after {rounds} round(s), {iterations_done} tuning iterations "
                f"and {time.monotonic() - started:.3g} s: {cause}; {best}{rejected}"
            )
        scores = domain.score_from_errors(answer.position_error_m, answer.orientation_error_rad)
        return IKResult(
            success=success,
            message=message,
            solutions=answer.q.cpu().numpy(),
            scores=scores.cpu().numpy(),
            position_errors_m=answer.position_error_m.cpu().numpy(),
            orientation_errors_rad=answer.orientation_error_rad.cpu().numpy(),
            # The last sampled batch's; the fast stage's converged configurations' when no round sampled.
            collision_free_rate=fast_free_rate if domain.last_collision_free_rate is None else float(domain.last_collision_free_rate),
            tuning_iterations_done=iterations_done,
            tuning_time_s=tuning_time_s,
            elapsed_s=time.monotonic() - started,
            failure_kind=failure_kind,
            rounds=rounds,
        )
