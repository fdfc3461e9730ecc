"""IKEngine without ROS: it solves until solved or the deadline, says what blocked a failure, and
answers with distinct solution modes that the exact meshes accept."""
from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from mace_ros.core.ik_engine import IKEngine, IKRequest, farthest_point_selection
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, PandaKinematics, matrix_to_quaternion
from mace_ros.core.pybullet_backend import PyBulletCollisionChecker
from mace_ros.core.resources import scene_path
from mace_ros.core.scene import Scene

BOX_SCENE = Scene.load_yaml(scene_path("box"))
DOWN = np.array([0.0, 1.0, 0.0, 0.0])  # hand z axis pointing down (w, x, y, z)
# The engine answers within timeout_s + this on a CPU (the first chunk, one LM iteration, the ranking).
LATENESS_S = 0.1


@pytest.fixture(scope="module")
def engine() -> IKEngine:
    return IKEngine()


def request(position, quaternion=None, *, timeout_s: float, num_solutions: int = 4, num_samples: int = 1024,
            seed_state: np.ndarray | None = None) -> IKRequest:
    return IKRequest(np.asarray(position, dtype=float), quaternion, "panda_hand", num_solutions, num_samples, 30, timeout_s,
                     seed_state=seed_state, random_seed=1)


@pytest.mark.parametrize("position, quaternion, scene, kind, cause", [
    # The hand pointing down 3 cm above the box's floor: its fingers would go through the floor.
    ((0.5, 0.0, 0.03), DOWN, BOX_SCENE, "collision", "collisions near the goal"),
])
def test_an_unsolvable_goal_fails_only_at_the_deadline_saying_what_blocked_it(engine, position, quaternion, scene, kind, cause):
    timeout_s = 1.0
    result = engine.solve(request(position, quaternion, timeout_s=timeout_s), scene)
    assert not result.success
    assert result.failure_kind == kind, result.message
    assert cause in result.message
    assert timeout_s - 0.1 <= result.elapsed_s <= timeout_s + LATENESS_S, result.elapsed_s
    assert result.rounds >= 2  # refining once is not the end
    if len(result.solutions):  # best efforts pass the exact check too, and are distinct as solutions are
        with PyBulletCollisionChecker() as exact:
            assert not exact.check(torch.as_tensor(result.solutions), scene).in_collision.any()
        distances = torch.cdist(torch.as_tensor(result.solutions), torch.as_tensor(result.solutions))
        assert (distances + torch.eye(len(result.solutions)) * 1e9).min() >= engine.config["min_separation_rad"]


@pytest.mark.parametrize("position, quaternion", [
    ((0.95, 0.0, 0.4), None),  # 0.096 m beyond the hand's reach
    ((0.8, 0.0, 0.333), np.array([0.7071068, 0.0, -0.7071068, 0.0])),  # within it, but pointing back at the shoulder
])
def test_a_goal_beyond_the_tips_reach_fails_at_once_with_best_efforts(engine, position, quaternion):
    """No configuration reaches it, so waiting for the deadline would tell nothing more (it did): the
    answer comes after a minimum round's best efforts, which pass the exact check."""
    timeout_s = 5.0
    result = engine.solve(request(position, quaternion, timeout_s=timeout_s), BOX_SCENE)
    assert not result.success and result.failure_kind == "unreachable", result.message
    assert "out of reach" in result.message and "beyond where panda_hand can be" in result.message
    assert result.elapsed_s < 0.5 * timeout_s, result.elapsed_s
    assert len(result.solutions) > 0
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(torch.as_tensor(result.solutions), BOX_SCENE).in_collision.any()


def test_a_seed_at_a_joint_limit_that_reaches_the_goal_makes_it_a_collision(engine):
    """A hand pose below the box's floor reached with joint 2 exactly at its upper limit: the diagnosis's LM
    from prior samples does not reach it within the limits, so it read as "beyond the joint limits" even
    with that configuration as the seed; the seed joins the diagnosis's starts."""
    q = torch.tensor([[0.0, JOINT_UPPER[1], 0.0, -1.0, 0.0, 2.5, 0.785]], dtype=torch.float64)
    position, rotation = PandaKinematics(dtype=torch.float64).forward(q, "panda_hand")
    quaternion = matrix_to_quaternion(rotation)[0].numpy()
    result = engine.solve(request(position[0].numpy(), quaternion, timeout_s=1.0, num_solutions=1, seed_state=q[0].numpy()), BOX_SCENE)
    assert not result.success and result.failure_kind == "collision", result.message


def test_a_tuning_count_below_minus_one_is_refused():
    with pytest.raises(ValueError, match="tuning_iterations"):
        IKRequest(np.zeros(3), None, "panda_hand", 1, 1024, -2, 1.0)


def test_a_solvable_goal_returns_early_with_exact_collision_free_solutions(engine):
    timeout_s = 5.0
    result = engine.solve(request((0.5, 0.0, 0.25), DOWN, timeout_s=timeout_s), BOX_SCENE)
    assert result.success, result.message
    assert result.failure_kind == ""
    assert len(result.solutions) == 4
    assert result.elapsed_s < timeout_s / 2
    assert result.position_errors_m.max() <= 1e-6
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(torch.as_tensor(result.solutions), BOX_SCENE).in_collision.any()


def test_oversized_sample_counts_are_chunked_within_the_timeout(engine):
    timeout_s = 0.3
    result = engine.solve(request((0.5, 0.0, 0.4), timeout_s=timeout_s, num_samples=100_000), Scene())
    assert result.elapsed_s <= timeout_s + LATENESS_S
    assert result.success, result.message


def test_tiny_timeouts_hold_among_hundreds_of_markers(engine):
    """384 small primitives scattered around the arm (a marker flood): every stage, the exact checks included,
    stays within the timeout instead of finishing a chunk of work it started too late."""
    rng = np.random.default_rng(3)
    scene = BOX_SCENE.with_clutter(256, seed=3)
    engine.solve(request((0.5, 0.0, 0.4), DOWN, timeout_s=0.3), scene)  # the scene's tensors and exact body, once
    for index in range(12):
        goal = rng.uniform([0.2, -0.5, 0.05], [0.7, 0.5, 0.8])
        timeout_s = (0.05, 0.1, 0.3)[index % 3]
        result = engine.solve(request(goal, DOWN, timeout_s=timeout_s, num_samples=256), scene)
        assert result.elapsed_s <= timeout_s + LATENESS_S, (timeout_s, result.elapsed_s, result.stage_times_s)


def test_timeouts_hold_where_each_exact_check_is_slow(engine):
    """A floor seen as a 1 cm cloud 4.4 m across (190k points), where each check costs more: failing requests
    check their best efforts last, and exact checks in blocks of 4 (then ~30 ms a configuration on a CPU)
    started just before the deadline answered 0.1 s late. A block now holds what the measured rate fits."""
    side = np.arange(-2.2, 2.2, 0.01)
    x, y = np.meshgrid(side, side)
    scene = Scene(points=np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], axis=1))
    engine.solve(request((0.5, 0.0, 0.4), DOWN, timeout_s=0.3), scene)  # the scene's field and exact body, once
    for index in range(8):
        timeout_s = (0.3, 0.5)[index % 2]
        # The hand pointing down 3 cm above the floor: the fingers would go through it.
        result = engine.solve(request((0.4 + 0.03 * index, 0.0, 0.03), DOWN, timeout_s=timeout_s), scene)
        assert not result.success
        assert result.elapsed_s <= timeout_s + LATENESS_S, (timeout_s, result.elapsed_s, result.stage_times_s)


def test_exact_check_blocks_hold_what_the_measured_rate_fits(engine):
    """Each block of the exact check is cut to what its rate measured in this scene fits before the
    deadline: one row where no rate was measured in the scene, none once not even one row fits."""
    scene, other = Scene(), Scene()
    order = torch.arange(10)
    engine._exact_rate = (scene, 0.04)
    sizes = [block.numel() for block in engine._exact_blocks(order, scene, 4, time.monotonic() + 0.11)]
    assert sizes == [2, 2, 2, 2, 2]
    assert [block.numel() for block in engine._exact_blocks(order, scene, 4, time.monotonic() + 1.0)] == [4, 4, 2]
    assert [block.numel() for block in engine._exact_blocks(order, scene, 4, time.monotonic() + 0.03)] == []
    assert next(iter(engine._exact_blocks(order, other, 4, time.monotonic() + 1.0))).numel() == 1
    engine._exactly_free(torch.zeros(3, 7), other)  # measures the rate in `other`
    assert engine._exact_rate[0] is other and engine._exact_rate[1] > 0.0


def test_the_answer_covers_distinct_solution_modes(engine):
    """A spherical shoulder has two modes for every hand pose: (q1, q2, q3) and (q1 - pi, -q2, q3 - pi)."""
    kinematics = PandaKinematics("cpu", torch.float64)
    q = torch.tensor([[0.4, 0.5, 0.6, -1.9, 0.3, 1.9, 0.7]], dtype=torch.float64)
    flipped = q.clone()
    flipped[0, :3] = torch.tensor([0.4 - math.pi, -0.5, 0.6 - math.pi])
    position, rotation = kinematics.forward(q)
    assert torch.allclose(kinematics.forward(flipped)[0], position, atol=1e-9) and bool(kinematics.within_limits(flipped))
    result = engine.solve(request(position[0].numpy(), matrix_to_quaternion(rotation[0]).numpy(), timeout_s=5.0), Scene())
    assert result.success, result.message
    solutions = torch.as_tensor(result.solutions)
    assert (solutions[:, 1] > 0.1).any() and (solutions[:, 1] < -0.1).any(), solutions  # both shoulder modes
    distances = torch.cdist(solutions, solutions) + 1e9 * torch.eye(len(solutions), dtype=solutions.dtype)
    assert float(distances.min()) >= engine.config["min_separation_rad"]  # no near-copies


def test_farthest_point_selection_adds_the_farthest_until_too_close_or_enough():
    rng = np.random.default_rng(5)
    q = torch.as_tensor(rng.uniform(-1.0, 1.0, (30, 7)))
    for selected, pool, separation, count in (([], list(range(30)), 0.0, 30), ([3], list(range(10, 30)), 1.8, 20), ([0, 1], [1, 2], 0.0, 5)):
        chosen = farthest_point_selection(q, selected, pool, separation, count)
        assert chosen[:max(len(selected), 1)] == (selected or pool[:1]) and len(set(chosen)) == len(chosen) <= count
        assert set(chosen) <= set(selected) | set(pool)
        for step in range(max(len(selected), 1), len(chosen)):  # each addition: the farthest from those before
            gaps = {i: float(torch.cdist(q[[i]], q[chosen[:step]]).min()) for i in pool if i not in chosen[:step]}
            assert gaps[chosen[step]] == pytest.approx(max(gaps.values())) and gaps[chosen[step]] >= separation
        left = [i for i in pool if i not in chosen]
        if len(chosen) < count and left:  # stopped early: everything left is too close
            assert max(float(torch.cdist(q[[i]], q[chosen]).min()) for i in left) < separation


def test_merging_solutions_leaves_out_near_copies_of_kept_and_of_earlier_new_ones(engine):
    from mace_ros.core.ik_engine import _Solutions

    def solutions(rows: list[list[float]]) -> _Solutions:
        q = torch.tensor(rows, dtype=torch.float64).reshape(-1, 7)
        return _Solutions(q, torch.arange(len(q), dtype=torch.float64), torch.zeros(len(q), dtype=torch.float64))

    tolerance = engine.config["duplicate_tolerance_rad"]
    kept = solutions([[0.0] * 7])
    new = solutions([[0.5 * tolerance] * 7, [1.0] * 7, [1.0 + 0.5 * tolerance] + [1.0] * 6, [2.0] * 7])
    merged = engine._merged(kept, new)
    assert merged.q[:, 0].tolist() == [0.0, 1.0, 2.0] and merged.position_error_m.tolist() == [0.0, 1.0, 3.0]
    assert len(engine._merged(solutions([]), new)) == 3 and engine._merged(kept, solutions([])) is kept


def test_without_a_seed_solutions_keep_a_margin_from_the_joint_limits(engine):
    result = engine.solve(request((0.5, 0.0, 0.25), DOWN, timeout_s=5.0), BOX_SCENE)
    assert result.success, result.message
    clearance = np.minimum(result.solutions - np.array(JOINT_LOWER), np.array(JOINT_UPPER) - result.solutions).min(axis=1)
    assert clearance[0] >= engine.config["joint_limit_margin_rad"], clearance


def test_with_a_seed_the_nearest_solution_comes_first(engine):
    kinematics = PandaKinematics("cpu", torch.float64)
    seed = np.array([0.1, -0.3, 0.1, -2.2, 0.1, 2.0, 0.8])
    position, rotation = kinematics.forward(torch.as_tensor(seed)[None])
    goal = position[0].numpy() + np.array([0.03, 0.02, -0.03])
    result = engine.solve(request(goal, matrix_to_quaternion(rotation[0]).numpy(), timeout_s=5.0, seed_state=seed), Scene())
    assert result.success, result.message
    distances = np.linalg.norm(result.solutions - seed, axis=1)
    assert list(distances) == sorted(distances)
    assert distances[0] < 0.3, distances


def test_a_seed_whose_nearest_solution_lies_at_a_joint_limit_is_followed(engine):
    """A Cartesian path seeded with its previous answer reached joint 7's limit: the LM from the seed,
    pushing joint 7 beyond it, crept along the limit and converged too late, and the answer jumped to
    another branch (2.5-3.4 rad away) although a solution 0.12 rad from the seed lies at the limit."""
    kinematics = PandaKinematics("cpu", torch.float64)
    at_limit = np.array([0.9441, -0.1277, -0.2921, -2.5547, -0.1811, 3.0591, JOINT_LOWER[6]])
    seed = np.array([0.8529, -0.1262, -0.2319, -2.5559, -0.1434, 3.0604, -2.8894])
    position, rotation = kinematics.forward(torch.as_tensor(at_limit)[None])
    result = engine.solve(request(position[0].numpy(), matrix_to_quaternion(rotation[0]).numpy(), timeout_s=5.0,
                                  seed_state=seed), Scene())
    assert result.success, result.message
    assert np.linalg.norm(result.solutions[0] - seed) < 0.2, result.solutions[0]


@pytest.mark.parametrize("random_seed", [1, 2, 3])
def test_the_seeds_own_refinement_is_a_candidate_even_when_other_starts_converge_first(engine, random_seed):
    """A path's next pose, 0.077 rad from the previous answer (a held-out planner's arc about the base): the fast
    stage's LM stopped once enough other starts had converged, one iteration before the seed's row did, and the
    answer came from another branch 0.5-1.9 rad away for most random seeds."""
    seed = np.array([1.16725, -0.07614, 1.07269, -2.33698, 0.08961, 2.29855, 0.71959])
    rotation = np.array([[-0.70393871, 0.71026072, 0.0], [0.71026072, 0.70393871, 0.0], [0.0, 0.0, -1.0]])
    quaternion = matrix_to_quaternion(torch.as_tensor(rotation)[None])[0].numpy()
    result = engine.solve(replace(request((-0.351969, 0.35513, 0.35), quaternion, timeout_s=5.0, seed_state=seed),
                                              random_seed=random_seed), Scene())
    assert result.success, result.message
    assert np.linalg.norm(result.solutions[0] - seed) < 0.1, np.linalg.norm(result.solutions - seed, axis=1)


def test_an_open_goal_is_answered_by_the_fast_stage_before_any_tuning(engine):
    result = engine.solve(request((0.5, 0.2, 0.4), DOWN, timeout_s=5.0), Scene())
    assert result.success, result.message
    assert result.rounds == 0 and result.tuning_iterations_done == 0, result.stage_times_s
    assert 0.0 < result.collision_free_rate <= 1.0  # the fast stage's own rate, not "no batch sampled" (NaN)
    assert result.position_errors_m.max() <= 1e-6
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(torch.as_tensor(result.solutions), Scene()).in_collision.any()


def test_the_fast_stage_off_still_solves_by_tuning_rounds():
    engine = IKEngine({"fast_stage_starts": 0, "scene_warm_start_iterations": 0})
    result = engine.solve(request((0.5, 0.0, 0.25), DOWN, timeout_s=5.0), BOX_SCENE)
    assert result.success, result.message
    assert result.rounds >= 1 and "fast" not in result.stage_times_s
    assert 0.0 <= result.collision_free_rate <= 1.0
    # -1 is the configured count, as GetIK's: its rounds tune, as none do with 0 (-1 had silently meant 0 here).
    configured, untuned = (engine.solve(replace(request((0.5, 0.0, 0.25), DOWN, timeout_s=5.0), tuning_iterations=count), BOX_SCENE)
                           for count in (-1, 0))
    assert configured.tuning_time_s > 0.0 and untuned.tuning_time_s == 0.0


def test_the_scene_warm_start_tunes_a_copy_per_scene_in_the_background():
    engine = IKEngine({"scene_warm_start_iterations": 2, "scene_warm_start_samples": 16})
    trained = [p.detach().clone() for p in engine.prior.parameters()]
    scene = Scene.load_yaml(scene_path("box"))
    goal = request((0.5, 0.0, 0.25), DOWN, timeout_s=5.0)
    assert engine.solve(goal, scene).warm_start_iterations == 0  # nothing tuned for this scene yet
    assert engine.warm_start.settle(60.0)
    tuned = engine.warm_start.model(scene)
    assert tuned is not None and engine.warm_start.iterations_done(scene) == 2
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), trained))
    assert all(torch.equal(p, q) for p, q in zip(engine.prior.parameters(), trained))  # the trained prior stays
    again = engine.solve(goal, scene)
    assert again.success and again.warm_start_iterations == 2, again.message
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(torch.as_tensor(again.solutions), scene).in_collision.any()
    # Changed obstacles are a new snapshot: the tuned prior of the old one is not used for it.
    changed = Scene.load_yaml(scene_path("box"))
    assert engine.warm_start.model(changed) is None
    assert engine.solve(goal, changed).warm_start_iterations == 0
    engine.warm_start.close()


def test_a_batch_of_goals_gets_one_exact_solution_each_and_unreachable_ones_none(engine):
    kinematics = PandaKinematics("cpu", torch.float64)
    q = torch.tensor([[0.4, 0.5, 0.6, -1.9, 0.3, 1.9, 0.7], [-0.5, 0.2, 0.0, -2.2, 0.0, 2.4, 0.8],
                      [0.0, -0.3, 0.0, -2.4, 0.0, 2.1, 0.8]], dtype=torch.float64)
    position, rotation = kinematics.forward(q)
    positions = torch.cat([position, torch.tensor([[1.5, 0.0, 0.4]], dtype=torch.float64)])  # the last is out of reach
    quaternions = torch.cat([matrix_to_quaternion(rotation), torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)])
    result = engine.solve_batch(positions.numpy(), quaternions.numpy(), Scene(), timeout_s=5.0)
    assert result.success.tolist() == [True, True, True, False]
    assert result.out_of_reach.tolist() == [False, False, False, True]
    assert result.elapsed_s < 2.5  # the goal out of reach does not hold the batch to its deadline
    assert np.isnan(result.solutions[3]).all()
    solved = torch.as_tensor(result.solutions[:3])
    reached, reached_rotation = kinematics.forward(solved)
    assert float((reached - position).norm(dim=-1).max()) <= 1e-6
    assert result.orientation_errors_rad[:3].max() <= engine.config["orientation_tolerance_rad"]
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(solved, Scene()).in_collision.any()


# A configuration the exact meshes call free and the fast checker (1.2 mm padding) calls colliding: the hand
# pose of goal 9888 of the 10,000-goal GPU batch run (q4 near its lower limit, links within ~1 mm).
GRAZING_Q = torch.tensor([[-0.6251617866717956, 1.412917070789066, -2.8520874592728176, -3.052978665366165,
                           -0.30253549053548, 1.4362911880869815, 2.8942053066835967]], dtype=torch.float64)


def grazing_goal() -> tuple[torch.Tensor, torch.Tensor]:
    position, rotation = PandaKinematics("cpu", torch.float64).forward(GRAZING_Q)
    return position, matrix_to_quaternion(rotation)


def test_the_exact_check_decides_where_the_fast_checker_pads_contact(engine):
    """Where the fast model and the exact check disagree, the exact check wins: a goal whose free solutions
    lie within the fast checker's padding is solved by GetIK and by the batch, exactly collision-free."""
    with PyBulletCollisionChecker() as exact:
        assert not exact.check(GRAZING_Q, Scene()).in_collision.any()
        assert engine.checker.check(GRAZING_Q.float(), Scene()).in_collision.all()  # the premise
        position, quaternion = grazing_goal()
        result = engine.solve(request(position[0].numpy(), quaternion[0].numpy(), timeout_s=4.0, num_solutions=1), Scene())
        assert result.success, result.message
        assert result.position_errors_m.max() <= 1e-6
        assert not exact.check(torch.as_tensor(result.solutions), Scene()).in_collision.any()
        batch = engine.solve_batch(position.numpy(), quaternion.numpy(), Scene(), timeout_s=4.0, random_seed=1)
        assert batch.success.all()
        assert not exact.check(torch.as_tensor(batch.solutions), Scene()).in_collision.any()


def test_a_prepared_scene_leaves_its_requests_no_cloud_cells_to_build(engine, monkeypatch):
    """The node prepares each new obstacle model while the engine is idle (prepare_scene): a request in it then
    builds none of the cloud's cells (the fast checker's nor the exact checker's), which a request in an
    unprepared one does."""
    from mace_ros.core.collision import PointGrid

    side = np.arange(-0.3, 1.0, 0.01)
    x, y = np.meshgrid(side, side)
    table = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], axis=1)
    built: list[int] = []
    original = PointGrid.__init__

    def counted(self, *args, **kwargs) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PointGrid, "__init__", counted)
    # The hand pointing down 5 cm above the table: the fingers near it, so checks read the cells.
    goal = request((0.5, 0.0, 0.15), DOWN, timeout_s=2.0)
    prepared = Scene(points=table)
    engine.prepare_scene(prepared)
    assert built, "prepare_scene built no cells"
    built.clear()
    assert engine.solve(goal, prepared).success
    assert not built, f"{len(built)} cell structure(s) built by a request in a prepared scene"
    assert engine.solve(goal, Scene(points=table + 1e-3)).success
    assert built  # without preparation the request builds them
