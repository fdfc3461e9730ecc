"""GraphedCall and MACE's captured iterations. The capture itself needs a GPU: those tests run on the
lent device (`bench/device_run.sh` runs this file there) and are skipped elsewhere."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mace_ros.core.collision import TorchCollisionChecker
from mace_ros.core.cuda_graph import GraphedCall
from mace_ros.core.ik_domain import IKGoal
from mace_ros.core.kinematics import PandaKinematics
from mace_ros.core import refinement
from mace_ros.core.mace import PAPER_PRESETS, mace_tune
from mace_ros.core.resources import scene_path
from mace_ros.core.scene import Scene
from mace_ros.core.shape.simulators import GraspDomain, PartialCloudDomain, finger_directions
from mace_ros.core.shape.vae import FULL_VAE_WEIGHTS, MaceVAEPrior, load_shape_vae
from mace_ros.core.shape_engine import density_matched_finger_radius

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def full_vae():
    return load_shape_vae(FULL_VAE_WEIGHTS, "cuda")


def test_graphed_call_is_eager_off_cuda():
    """On the CPU every call runs the function: fresh outputs that follow its inputs, no capture attempted."""
    theta = torch.zeros(3)
    graphed = GraphedCall(lambda: theta * 2 + 1, torch.device("cpu"))
    first = graphed()
    theta.add_(1.0)
    second = graphed()
    assert torch.equal(first, torch.ones(3)) and torch.equal(second, torch.full((3,), 3.0))
    assert graphed.graph is None and graphed.replays == 0 and graphed.failure is None


@needs_cuda
def test_replays_follow_in_place_inputs_and_draw_fresh_numbers():
    """A replay reads θ where it is written in place, and each replay draws new numbers from the
    registered generator, the same sequence for the same seed."""
    device = torch.device("cuda")

    def run(seed: int) -> list[torch.Tensor]:
        theta = torch.zeros(4, device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        graphed = GraphedCall(lambda: theta + torch.randn(4, generator=generator, device=device), device, generator)
        outputs = []
        for step in range(4):
            theta.fill_(10.0 * step)
            outputs.append(graphed().clone())
        assert graphed.failure is None and graphed.replays == 3
        return outputs

    first, again = run(7), run(7)
    for step, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b)
        assert (a - 10.0 * step).abs().max() < 6  # θ as written before this call, plus unit noise
    noise = [a - 10.0 * step for step, a in enumerate(first)]
    assert all(not torch.equal(noise[i], noise[j]) for i in range(4) for j in range(i))


@needs_cuda
def test_captured_mace_iterations_tune_like_eager_ones(full_vae):
    """The paper's grasp preset on the 2048-point VAE: with the iterations captured, tuning replays the
    graph and raises the batch mean score as far as the eager loop does."""
    device, vae = torch.device("cuda"), full_vae
    truth = MaceVAEPrior(vae).sample(1, torch.Generator(device=device).manual_seed(0))[0]
    domain = GraspDomain.from_ground_truth(truth, finger_directions(5, device=device), None, density_matched_finger_radius(vae.num_points))
    preset = dataclasses.replace(PAPER_PRESETS["grasp_shape_vae"], iterations=60)
    eager, graphed = (mace_tune(MaceVAEPrior(vae), domain, preset, generator=torch.Generator(device=device).manual_seed(1), cuda_graph=captured)
                      for captured in (False, True))
    assert eager.cuda_graph_replays == 0
    assert graphed.cuda_graph_failure is None and graphed.cuda_graph_replays == preset.iterations - 1
    for result in (eager, graphed):
        history = result.mean_score_history
        assert len(history) == preset.iterations and sum(history[-10:]) > sum(history[:10])
    assert sum(graphed.mean_score_history[-10:]) / 10 > sum(eager.mean_score_history[-10:]) / 10 - 0.1


@needs_cuda
def test_partial_cloud_iterations_are_captured(full_vae):
    """The partial-cloud preset's iterations (k-nearest-neighbour score) capture too."""
    device = torch.device("cuda")
    truth = MaceVAEPrior(full_vae).sample(1, torch.Generator(device=device).manual_seed(2))[0]
    domain = PartialCloudDomain(truth[truth[:, 0] > truth[:, 0].median()])
    preset = dataclasses.replace(PAPER_PRESETS["partial_cloud_vae"], iterations=10)
    result = mace_tune(MaceVAEPrior(full_vae), domain, preset, generator=torch.Generator(device=device).manual_seed(3))
    assert result.cuda_graph_failure is None and result.cuda_graph_replays == preset.iterations - 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("name", ["shelf", "cloud"])
def test_graphed_broad_phase_checks_like_the_plain_one(device, name):
    """The checker's graphed broad phase pads batches to a power of two and hands back the rows asked
    for: every flag and clearance is the plain checker's, for batch sizes on and off the padding sizes,
    twice per size (warm-up, then the replay), across a scene change. On the CPU the "graphs" are eager
    calls (forced on: the padding is what is tested); on a GPU they are captured and replayed."""
    checker = TorchCollisionChecker(device, max_batch=1024)  # one pass per call, on a CPU too
    checker.cuda_graphs = False
    scene = Scene.load_yaml(scene_path("shelf"))
    if name == "cloud":
        points = np.random.default_rng(0).uniform((0.3, -0.3, 0.2), (0.6, 0.3, 0.6), (500, 3))
        scene = Scene(boxes=scene.boxes[:2]).with_points(points)
    prepared = checker.prepare(scene)
    q = PandaKinematics(device).random_configurations(700, torch.Generator(device).manual_seed(1))
    graphed = TorchCollisionChecker(device, max_batch=1024)
    graphed.cuda_graphs = True
    replays = 0
    for count in (1, 128, 129, 700, 129):
        for _ in range(2):
            expected, got = checker.check(q[:count], prepared), graphed.check(q[:count], graphed.prepare(scene) if count == 1 else prepared)
            assert torch.equal(expected.in_collision, got.in_collision) and torch.equal(expected.self_collision, got.self_collision)
            assert torch.allclose(expected.signed_distance, got.signed_distance, atol=1e-6)
        replays += sum(call.replays for _, call in graphed._graphs.values())
    assert sorted(graphed._graphs) == [128, 256, 1024]
    if device == "cuda":
        assert all(call.failure is None for _, call in graphed._graphs.values()) and replays >= 4
    # Another scene after graphs were captured: new graphs, captured as well.
    other = Scene(boxes=scene.boxes[:1])
    for _ in range(2):
        expected, got = checker.check(q, checker.prepare(other)), graphed.check(q, graphed.prepare(other) if _ == 0 else graphed._graphs_scene)
        assert torch.equal(expected.in_collision, got.in_collision)
    assert all(call.failure is None for _, call in graphed._graphs.values()) and list(graphed._graphs) == [1024]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("goal_kind", ["pose", "position", "per_row"])
def test_graphed_lm_polishes_like_the_compacted_one(monkeypatch, device, goal_kind):
    """The obstacle-ignoring LM in masked blocks over padded rows (CUDA graphs on a GPU; forced on, eager,
    on the CPU) gives every row what the compacted LM gives it: the same converged rows and configurations,
    on the first call and on the replays after it."""
    monkeypatch.setattr(refinement, "LM_GRAPH_DEVICE_TYPES", ("cpu", "cuda"))
    kinematics = refinement.float64_kinematics(torch.device(device))
    generator = torch.Generator(device).manual_seed(3)
    starts = kinematics.random_configurations(100, generator)  # padded to 128 rows
    targets = kinematics.random_configurations(100 if goal_kind == "per_row" else 1, generator)
    position, rotation = kinematics.forward(targets, "panda_hand")
    goal = IKGoal(position if goal_kind == "per_row" else position[0], None if goal_kind == "position" else (
        rotation if goal_kind == "per_row" else rotation[0]), "panda_hand")
    with refinement._LM_GRAPHS_LOCK:  # held: this call takes the compacted path
        plain = refinement.refine_candidates(starts, goal, None, None, max_iterations=30)
    assert 0 < int(plain.converged.sum()) < 100 or goal_kind == "position"
    for _ in range(3):
        graphed = refinement.refine_candidates(starts, goal, None, None, max_iterations=30)
        assert torch.equal(graphed.converged, plain.converged)
        assert torch.allclose(graphed.q, plain.q, atol=1e-9) and torch.allclose(graphed.position_error_m, plain.position_error_m, atol=1e-9)
    states = [state for key, state in refinement._LM_GRAPHS.items() if key[0].type == device]
    if device == "cuda":
        assert states and all(state.block.failure is None and state.block.replays > 0 for state in states)
