"""The LM polish's early stop (mace_ros/core/refinement.py), without ROS."""
from __future__ import annotations

import contextlib

import pytest
import torch

from mace_ros.core import refinement
from mace_ros.core.collision import TorchCollisionChecker
from mace_ros.core.ik_domain import IKGoal
from mace_ros.core.scene import Scene


@pytest.mark.parametrize("path", ["compacted", "masked"])
def test_the_early_stop_counts_only_rows_that_pass_the_acceptance(monkeypatch, path):
    """An obstacle-ignoring LM stops once `enough_solved` rows converged and, with `accept`, `min_accepted`
    of them pass it. Starts next to a solution that `accept` refuses converge first: stopping on them
    (as without `accept`) leaves fewer than asked accepted; with it the LM goes on to accepted ones, checks
    each converged row once, and reports what it checked."""
    if path == "masked":
        monkeypatch.setattr(refinement, "LM_GRAPH_DEVICE_TYPES", ("cpu", "cuda"))
    kinematics = refinement.float64_kinematics(torch.device("cpu"))
    generator = torch.Generator().manual_seed(5)
    refused = torch.tensor([[0.6, 0.3, 0.0, -1.8, 0.0, 2.0, 0.8]], dtype=torch.float64)  # q1 > 0: refused
    goal = IKGoal(kinematics.forward(refused, "panda_hand")[0][0], None, "panda_hand")  # position only
    near = refused + 0.01 * torch.randn(8, 7, generator=generator, dtype=torch.float64)
    starts = torch.cat([near, kinematics.random_configurations(56, generator)])
    asked: list[int] = []

    def accept(q: torch.Tensor) -> torch.Tensor:
        asked.append(q.shape[0])
        return q[:, 0] < 0.0

    lock = refinement._LM_GRAPHS_LOCK if path == "compacted" else contextlib.nullcontext()
    with lock:  # held: this call takes the compacted path
        plain = refinement.refine_candidates(starts, goal, None, None, max_iterations=30, enough_solved=4)
        accepted = refinement.refine_candidates(starts, goal, None, None, max_iterations=30, enough_solved=4,
                                                accept=accept, min_accepted=6)
    assert int((plain.converged & (plain.q[:, 0] < 0.0)).sum()) < 6 and plain.accept_checked is None
    passing = accepted.converged & (accepted.q[:, 0] < 0.0)
    assert int(passing.sum()) >= 6
    assert torch.equal(accepted.accept_checked & ~accepted.converged, torch.zeros_like(accepted.converged))
    assert torch.equal(accepted.accept_passed, accepted.accept_checked & (accepted.q[:, 0] < 0.0))
    assert sum(asked) == int(accepted.accept_checked.sum())  # each converged row asked about once


@pytest.mark.parametrize("path", ["compacted", "masked"])
def test_an_acceptance_that_keeps_refusing_lets_the_lm_run_on(monkeypatch, path):
    """Once `accept` has refused its checks' rows, the count no longer stops the LM: it runs to its cap, as
    without an early stop. Where free solutions are a sliver (inside a lidded box, under a board) the starts
    that reach them converge late, at the joint limits, and stopping a few iterations after the first
    (colliding) ones had converged left those goals unsolved (bench/ik_hard_goals.py)."""
    if path == "masked":
        monkeypatch.setattr(refinement, "LM_GRAPH_DEVICE_TYPES", ("cpu", "cuda"))
    kinematics = refinement.float64_kinematics(torch.device("cpu"))
    generator = torch.Generator().manual_seed(7)
    target = torch.tensor([[0.6, 0.3, 0.0, -1.8, 0.0, 2.0, 0.8]], dtype=torch.float64)
    position, rotation = kinematics.forward(target, "panda_hand")
    goal = IKGoal(position[0], rotation[0], "panda_hand")
    near = target + 0.01 * torch.randn(8, 7, generator=generator, dtype=torch.float64)
    starts = torch.cat([near, kinematics.random_configurations(120, generator)])
    asked: list[int] = []

    def refuse_all(q: torch.Tensor) -> torch.Tensor:
        asked.append(q.shape[0])
        return torch.zeros(q.shape[0], dtype=torch.bool)

    lock = refinement._LM_GRAPHS_LOCK if path == "compacted" else contextlib.nullcontext()
    with lock:
        uncapped = refinement.refine_candidates(starts, goal, None, None, max_iterations=40)
        refused = refinement.refine_candidates(starts, goal, None, None, max_iterations=40, enough_solved=4,
                                               accept=refuse_all, min_accepted=1)
    assert int(uncapped.converged.sum()) > int(uncapped.converged[:8].sum())  # some random starts converge late
    assert torch.equal(refused.converged, uncapped.converged)
    assert len(asked) == refinement._SolvedCount.MAX_CHECKS  # the checks stay bounded


def test_slide_clear_keeps_only_what_the_given_check_passes():
    """`free` decides which slid configurations count (the engine passes a check that leaves rows unchecked,
    False, at the deadline): refusing every row keeps none, though the sliding reached the goal."""
    kinematics = refinement.float64_kinematics(torch.device("cpu"))
    q = torch.tensor([[0.0, 0.3, 0.0, -1.8, 0.0, 2.1, 0.8]], dtype=torch.float64)
    position, rotation = kinematics.forward(q, "panda_hand")
    goal = IKGoal(position[0], rotation[0], "panda_hand")
    checker = TorchCollisionChecker(dtype=torch.float64)
    asked: list[int] = []

    def refuse_all(rows: torch.Tensor) -> torch.Tensor:
        asked.append(rows.shape[0])
        return torch.zeros(rows.shape[0], dtype=torch.bool)

    starts = q.repeat(4, 1)
    kept = refinement.slide_clear(starts, goal, checker, Scene(), iterations=5)[0]
    refused = refinement.slide_clear(starts, goal, checker, Scene(), iterations=5, free=refuse_all)[0]
    assert kept.shape[0] == 4  # nothing to slide away from: all count as the checker calls them free
    assert refused.shape[0] == 0 and sum(asked) == 4
