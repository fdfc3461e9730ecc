"""Shape priors and the shape engine: shipped VAE/CVAE weights, the MACE-VAE objective, ShapeEngine."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import time

import numpy as np
import pytest
import torch

pytest.importorskip("trimesh")

from mace_ros.core.mace import PAPER_PRESETS, importance_sampling_tune, mace_tune, tuning_optimizer  # noqa: E402
from mace_ros.core.resources import default_parameters  # noqa: E402
from mace_ros.core.shape.cvae import DEFAULT_CVAE_WEIGHTS, FULL_CVAE_WEIGHTS, load_shape_cvae  # noqa: E402
from mace_ros.core.shape.chamfer import chamfer_distance, pairwise_chamfer_diversity  # noqa: E402
from mace_ros.core.shape.datasets import HELD_OUT_FAMILY, sample_object  # noqa: E402
from mace_ros.core.shape.simulators import GraspDomain, finger_directions, grasp_contacts  # noqa: E402
from mace_ros.core.shape.vae import (  # noqa: E402
    DEFAULT_VAE_WEIGHTS,
    FULL_VAE_WEIGHTS,
    LatentPriorFit,
    MaceVAEPrior,
    default_vae_weights,
    gaussian_kl,
    load_shape_vae,
)
from mace_ros.core.shape_engine import (  # noqa: E402
    CPU_BUDGET_LEARNING_RATE,
    DEFAULT_SHAPE_CONFIG,
    BestTheta,
    ShapeEngine,
    ShapeRequest,
    density_matched_finger_radius,
)
from mace_ros.core.weights import WeightsError, metadata_path  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    return load_shape_vae(DEFAULT_VAE_WEIGHTS)


@pytest.fixture(scope="module")
def engine():
    return ShapeEngine({"num_samples": 8, "timeout_s": 20.0})


def object_cloud(family: str, seed: int, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    return sample_object(family, np.random.default_rng(seed), 2048) + np.asarray(origin, dtype=np.float32)


def test_shipped_vae_matches_its_metadata(vae):
    metadata = json.loads(metadata_path(DEFAULT_VAE_WEIGHTS).read_text())
    assert vae.num_points == metadata["num_points"]
    assert vae.latent_dim == metadata["latent_dim"] == 128
    assert DEFAULT_VAE_WEIGHTS.stat().st_size < 25 * 2**20
    # The trained prior is N(0, σ_z² I) with the paper's σ_z.
    assert torch.allclose(vae.prior_log_std.exp(), torch.full((128,), metadata["prior_std"]), rtol=1e-3)  # fp16 storage


def test_encoder_in_eval_mode_folds_its_batch_norms_without_changing_the_posterior(vae):
    """Serving encodes with each BatchNorm folded into its convolution: the same posterior as the layers
    themselves give (training keeps the layers, whose statistics it updates)."""
    clouds = torch.from_numpy(np.stack([object_cloud(family, 3)[:vae.num_points] for family in ("box", "mug", "torus")])) / vae.scale_m
    encoder = vae.encoder.eval()
    with torch.no_grad():
        mean, log_variance = encoder(clouds)
        pooled = encoder.point_features(clouds.transpose(1, 2)).amax(dim=2)
        hidden = encoder.global_features(pooled)
        assert torch.allclose(mean, encoder.mean_head(hidden), atol=1e-4)
        assert torch.allclose(log_variance, encoder.log_variance_head(hidden), atol=1e-4)


def test_vae_samples_are_object_sized_clouds(vae):
    prior = MaceVAEPrior(vae, torch.tensor([0.4, -0.1, 0.3]))
    samples = prior.sample(16, torch.Generator().manual_seed(0))
    assert samples.shape == (16, vae.num_points, 3)
    assert torch.isfinite(samples).all()
    centres = (samples.amin(1) + samples.amax(1)) / 2
    assert torch.allclose(centres, torch.tensor([0.4, -0.1, 0.3]).expand(16, 3), atol=0.03)
    extents = samples.amax(1) - samples.amin(1)
    assert (extents < 0.35).all() and (extents.amax(1) > 0.015).all()


def test_encoder_log_variance_is_finite_on_real_objects(vae):
    clouds = torch.from_numpy(np.stack([object_cloud(family, 3) for family in ("box", "bottle", HELD_OUT_FAMILY)]))
    prior = MaceVAEPrior(vae)
    mean, log_variance = prior.posterior(clouds)
    assert torch.isfinite(mean).all() and torch.isfinite(log_variance).all()


def test_kl_objective_has_gradients_only_for_the_latent_prior(vae):
    prior = MaceVAEPrior(vae)
    clouds = prior.sample(4, torch.Generator().manual_seed(1))
    prior.tuning_log_likelihood(clouds).sum().backward()
    assert prior.mean.grad is not None and prior.mean.grad.abs().sum() > 0
    assert prior.log_std.grad is not None and prior.log_std.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in vae.parameters())
    assert {id(p) for p in prior.tunable_parameters()} == {id(prior.mean), id(prior.log_std)}


def test_gaussian_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(2)
    mean_q, log_variance_q = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    mean_p, log_std_p = torch.randn(7, generator=generator), torch.randn(7, generator=generator)
    q = torch.distributions.Normal(mean_q, (0.5 * log_variance_q).exp())
    p = torch.distributions.Normal(mean_p, log_std_p.exp())
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl(mean_q, log_variance_q, mean_p, log_std_p), expected, atol=1e-5)


def test_latent_prior_fit_whitens_and_keeps_the_kl_gradient():
    generator = torch.Generator().manual_seed(3)
    fit = LatentPriorFit(4, prior_std=0.2)
    mixing = torch.randn(4, 4, generator=generator)
    means = torch.randn(5000, 4, generator=generator) @ mixing.T + torch.tensor([1.0, -2.0, 0.5, 0.0])
    log_variances = torch.full((5000, 4), -4.0)
    fit.fit(means, log_variances)
    whitened_mean, _ = fit.posterior(means, log_variances)
    aggregate = torch.cov(whitened_mean.T) + torch.diag(fit.posterior(means, log_variances)[1].exp().mean(0))
    assert torch.allclose(aggregate, 0.04 * torch.eye(4), atol=2e-3)
    assert torch.allclose(fit.to_native(whitened_mean), means, atol=1e-4)
    # θ-gradient of the diagonal surrogate == that of the exact KL of the full-covariance q(u|x).
    mean_q, log_variance_q = means[:3], torch.randn(3, 4, generator=generator) - 3
    theta_mean = torch.randn(4, generator=generator, requires_grad=True)
    theta_log_std = torch.randn(4, generator=generator, requires_grad=True)
    surrogate = gaussian_kl(*fit.posterior(mean_q, log_variance_q), theta_mean, theta_log_std).sum()
    basis_inverse = torch.linalg.inv(fit.basis)
    exact_q = torch.distributions.MultivariateNormal(
        (mean_q - fit.offset) @ basis_inverse.T, basis_inverse @ torch.diag_embed(log_variance_q.exp()) @ basis_inverse.T
    )
    exact_p = torch.distributions.MultivariateNormal(theta_mean, torch.diag(torch.exp(2 * theta_log_std)))
    exact = torch.distributions.kl_divergence(exact_q, exact_p).sum()
    surrogate_grads = torch.autograd.grad(surrogate, [theta_mean, theta_log_std])
    exact_grads = torch.autograd.grad(exact, [theta_mean, theta_log_std])
    for mine, reference in zip(surrogate_grads, exact_grads):
        assert torch.allclose(mine, reference, rtol=1e-3, atol=1e-3)


def test_latent_prior_fit_inverse_follows_its_basis():
    fit = LatentPriorFit(4, 0.2)
    means, log_variances = torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(64, 4)
    first = fit.basis_inverse()
    assert fit.basis_inverse() is first  # cached
    fit.fit(means, log_variances)  # a new basis: a new inverse
    torch.testing.assert_close(fit.basis_inverse() @ fit.basis, torch.eye(4), atol=1e-5, rtol=0)
    fit.to(torch.float64)
    assert fit.basis_inverse().dtype == torch.float64


def test_prior_copies_share_the_network_and_reset(vae):
    prior = MaceVAEPrior(vae)
    with torch.no_grad():
        prior.mean.add_(1.0)
    twin = copy.deepcopy(prior)  # what the IS baseline does for θ_0
    assert twin.vae is vae and torch.equal(twin.mean, prior.mean) and twin.mean is not prior.mean
    prior.reset()
    assert torch.equal(prior.mean, vae.prior_mean) and not torch.equal(twin.mean, vae.prior_mean)


def test_mace_raises_the_grasp_score_on_a_held_out_object(vae):
    ground_truth = torch.from_numpy(object_cloud(HELD_OUT_FAMILY, 7))
    domain = GraspDomain.from_ground_truth(ground_truth, finger_directions(5), None, density_matched_finger_radius(vae.num_points))
    prior = MaceVAEPrior(vae)
    generator = torch.Generator().manual_seed(0)
    prior_score = float(domain.score(prior.sample(128, generator)).mean())
    preset = dataclasses.replace(PAPER_PRESETS["grasp_shape_vae"], iterations=15, learning_rate=CPU_BUDGET_LEARNING_RATE)
    mace_tune(prior, domain, preset, generator=generator)
    tuned_score = float(domain.score(prior.sample(128, generator)).mean())
    assert tuned_score > prior_score + 0.1, (prior_score, tuned_score)


@pytest.mark.parametrize("anchor_weight", [0.0, 0.5])
def test_closed_form_elite_gradient_is_autograds(vae, anchor_weight):
    """MaceVAEPrior's exact gradient of the elites' mean KL, from their statistics, is autograd's (any θ),
    with the prior anchor's term too."""
    prior = MaceVAEPrior(vae)
    prior.anchor_to_prior(anchor_weight)
    generator = torch.Generator().manual_seed(4)
    elites = prior.sample(12, generator)
    with torch.no_grad():
        prior.mean.add_(0.3 * torch.randn(vae.latent_dim, generator=generator))
        prior.log_std.add_(0.3 * torch.randn(vae.latent_dim, generator=generator))
    (-prior.tuning_log_likelihood(elites[:9]).mean()).backward()
    expected = torch.cat([prior.mean.grad, prior.log_std.grad]).double().numpy()
    weights = torch.tensor([1.0] * 9 + [0.0] * 3)  # zero-weight elites (scored 0) do not count
    theta = torch.cat([prior.mean, prior.log_std]).detach().double().numpy()
    closed = prior.elite_loss_gradient(theta, prior.elite_statistics(elites, weights).double().numpy())
    assert np.allclose(closed, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("min_std_ratio, anchor_weight", [(0.0, 0.0), (0.8, 0.0), (1.0, 0.5)])
def test_closed_form_tuning_takes_autograds_steps(vae, min_std_ratio, anchor_weight):
    """Same observation, prior, seed and preset: the closed-form path's θ, Adam moments and score history
    are the autograd path's (up to float32 vs float64 rounding), σ bound and prior anchor included."""
    domain = GraspDomain.from_ground_truth(torch.from_numpy(object_cloud("bottle", 3)), finger_directions(5), None,
                                           density_matched_finger_radius(vae.num_points))
    preset = dataclasses.replace(PAPER_PRESETS["grasp_shape_vae"], num_samples=64, iterations=6, learning_rate=1e-2)
    runs = []
    for closed_form in (False, True):
        prior = MaceVAEPrior(vae)
        prior.bound_std(min_std_ratio)
        prior.anchor_to_prior(anchor_weight)
        optimizer = tuning_optimizer(prior, preset)
        result = mace_tune(prior, domain, preset, generator=torch.Generator().manual_seed(5), optimizer=optimizer,
                           after_step=prior.project, closed_form=closed_form)
        state = [optimizer.state[p] for p in prior.tunable_parameters()]
        runs.append((torch.cat([prior.mean, prior.log_std]).detach(), result, state))
    (theta_a, result_a, state_a), (theta_b, result_b, state_b) = runs
    assert result_a.iterations_done == result_b.iterations_done == 6
    assert np.allclose(result_a.mean_score_history, result_b.mean_score_history, atol=1e-5)
    assert (theta_a - torch.cat([vae.prior_mean, vae.prior_log_std])).abs().max() > 0.05  # it did move
    assert torch.allclose(theta_a, theta_b, atol=2e-5)
    for a, b in zip(state_a, state_b):
        assert float(a["step"]) == float(b["step"]) == 6 * preset.grad_steps_per_iteration
        assert torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-4) and torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-3, atol=1e-6)
    if min_std_ratio:
        assert float(torch.exp(theta_b[vae.latent_dim:] - vae.prior_log_std).min()) >= min_std_ratio - 1e-6


def test_importance_sampling_runs_on_the_vae_prior(vae):
    ground_truth = torch.from_numpy(object_cloud("box", 4))
    domain = GraspDomain.from_ground_truth(ground_truth, finger_directions(5), None, density_matched_finger_radius(vae.num_points))
    prior = MaceVAEPrior(vae)
    preset = dataclasses.replace(PAPER_PRESETS["grasp_shape_vae"], iterations=2)
    result = importance_sampling_tune(prior, domain, preset, generator=torch.Generator().manual_seed(0))
    assert result.iterations_done == 2 and torch.isfinite(prior.mean).all()


def test_cvae_samples_given_contacts():
    cvae = load_shape_cvae(DEFAULT_CVAE_WEIGHTS)
    cloud = torch.from_numpy(object_cloud("cylinder", 5, origin=(0.3, 0.0, 0.1)))
    origin = torch.tensor([0.3, 0.0, 0.1])
    contacts, _ = grasp_contacts(cloud[None], finger_directions(cvae.num_contacts), origin, density_matched_finger_radius(cvae.num_points))
    samples = cvae.sample(contacts[0], 6, origin, torch.Generator().manual_seed(0))
    assert samples.shape == (6, cvae.num_points, 3) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="contacts"):
        cvae.sample(contacts[0, :3], 6, origin)


@pytest.mark.parametrize("path", [FULL_VAE_WEIGHTS, FULL_CVAE_WEIGHTS], ids=["vae", "cvae"])
def test_full_size_models_are_the_papers_size_and_regenerable(path):
    metadata = json.loads(metadata_path(path).read_text())
    assert metadata["num_points"] == metadata["encoder_points"] == 2048 and metadata["preset"] == "paper"
    assert path.stat().st_size < 25 * 2**20
    # Reproducible from the repository: the command names relative paths only.
    assert metadata["regenerate_command"].startswith("python -m mace_ros.core.shape.training") and "/work" not in json.dumps(metadata)
    # A trained model: it reconstructs unseen objects of its families better than the untrained scale
    # (objects span 2-25 cm: a Chamfer of 1e-3 m² would be ~3 cm off everywhere).
    assert metadata["final_validation_chamfer_m2"] < 1e-4


def test_the_engine_picks_the_full_model_on_a_gpu_and_the_reduced_one_on_a_cpu():
    assert default_vae_weights("cuda") == default_vae_weights("cuda:1") == FULL_VAE_WEIGHTS
    assert default_vae_weights("cpu") == DEFAULT_VAE_WEIGHTS
    assert ShapeEngine().num_points == load_shape_vae(DEFAULT_VAE_WEIGHTS).num_points


def test_full_size_models_infer_shapes_from_a_grasp():
    """The 2048-point VAE serves a request (a user may pick it on a CPU too) and the 2048-point CVAE samples."""
    engine = ShapeEngine({"weights_path": str(FULL_VAE_WEIGHTS), "timeout_s": 60.0})
    assert engine.num_points == 2048
    request = grasp_request(engine, "bottle", 21, (0.4, 0.0, 0.1), tuning_iterations=3, num_samples=4)
    result = engine.infer(request)
    prior = engine.infer(dataclasses.replace(request, tuning_iterations=0))
    assert result.success, result.message
    assert result.samples.shape == (4, 2048, 3) and np.isfinite(result.samples).all()
    assert np.allclose(result.samples.mean(axis=(0, 1)), (0.4, 0.0, 0.1), atol=0.05)
    assert result.mean_score >= prior.mean_score > 0
    cvae = load_shape_cvae(FULL_CVAE_WEIGHTS)
    cloud = torch.from_numpy(object_cloud("bottle", 21))
    contacts, _ = grasp_contacts(cloud[None], finger_directions(cvae.num_contacts), None, density_matched_finger_radius(cvae.num_points))
    samples = cvae.sample(contacts[0], 3, torch.zeros(3), torch.Generator().manual_seed(0))
    assert samples.shape == (3, 2048, 3) and torch.isfinite(samples).all()


def test_missing_or_mismatched_weights_fail_clearly(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_shape_vae(tmp_path / "absent.safetensors")
    copied = tmp_path / "shape_vae.safetensors"
    shutil.copy(DEFAULT_VAE_WEIGHTS, copied)
    metadata = json.loads(metadata_path(DEFAULT_VAE_WEIGHTS).read_text())
    metadata_path(copied).write_text(json.dumps({**metadata, "num_points": metadata["num_points"] * 2}))
    with pytest.raises(WeightsError, match="do not match"):
        load_shape_vae(copied)


def grasp_request(engine: ShapeEngine, family: str, seed: int, origin, **overrides) -> ShapeRequest:
    cloud = torch.from_numpy(object_cloud(family, seed, origin))
    directions = torch.from_numpy(engine.finger_directions).float()
    contacts, valid = grasp_contacts(cloud[None], directions, torch.tensor(origin, dtype=torch.float32), engine.finger_radius_m)
    touched = contacts[0][valid[0]].numpy()
    fields = {"contacts": touched, "partial_cloud": None, "object_origin": np.asarray(origin), "num_samples": 8,
              "tuning_iterations": 3, "timeout_s": 20.0, "random_seed": 3}
    return ShapeRequest(**{**fields, **overrides})


def test_engine_returns_ranked_samples_around_the_origin(engine):
    origin = (0.5, 0.1, 0.2)
    result = engine.infer(grasp_request(engine, "box", 11, origin))
    assert result.success, result.message
    assert result.samples.shape == (8, engine.num_points, 3) and result.scores.shape == (8,)
    assert np.all(np.diff(result.scores) <= 0) and np.isclose(result.mean_score, result.scores.mean())
    assert np.allclose(result.samples.mean(axis=(0, 1)), origin, atol=0.05)
    assert result.tuning_iterations_done == 3 and result.diversity > 0 and result.elapsed_s >= result.tuning_time_s


def test_a_result_cut_to_its_best_samples_describes_those(engine):
    """What a reply that runs out of time returns (the node's `first`): the mean score and diversity of the
    samples kept, not of all the engine drew."""
    result = engine.infer(grasp_request(engine, "box", 11, (0.5, 0.1, 0.2)))
    assert np.isclose(result.diversity, pairwise_chamfer_diversity(torch.as_tensor(result.samples)), rtol=1e-4)
    kept = result.first(3)
    assert kept.samples.shape[0] == kept.scores.shape[0] == 3 and np.array_equal(kept.scores, result.scores[:3])
    assert np.isclose(kept.mean_score, result.scores[:3].mean())
    assert np.isclose(kept.diversity, pairwise_chamfer_diversity(torch.as_tensor(result.samples[:3])), rtol=1e-4)
    assert "3 of 8 samples returned (timeout)" in kept.message
    assert result.first(8) is result


def test_engine_is_deterministic_per_seed_and_never_tunes_the_shared_prior(engine):
    before = engine.vae.prior_mean.clone()
    request = grasp_request(engine, "cylinder", 12, (0.0, 0.0, 0.0))
    first, second = engine.infer(request), engine.infer(request)
    assert np.array_equal(first.samples, second.samples)
    assert torch.equal(engine.vae.prior_mean, before)
    # Contacts are matched to fingers by direction, so their order in the request does not matter.
    shuffled = dataclasses.replace(request, contacts=request.contacts[::-1].copy())
    assert np.array_equal(engine.infer(shuffled).samples, first.samples)


def test_engine_without_tuning_returns_prior_samples(engine):
    result = engine.infer(grasp_request(engine, "box", 13, (0.0, 0.0, 0.0), tuning_iterations=0, num_samples=5))
    assert result.tuning_iterations_done == 0 and result.samples.shape[0] == 5


def test_engine_combines_contacts_and_a_partial_cloud(engine):
    request = grasp_request(engine, "box", 14, (0.0, 0.0, 0.0), tuning_iterations=1)
    cloud = object_cloud("box", 14)
    result = engine.infer(dataclasses.replace(request, partial_cloud=cloud[cloud[:, 0] > 0]))
    assert result.samples.shape[0] == 8 and np.all((result.scores >= 0) & (result.scores <= 1))


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"contacts": np.array([[0.1, np.nan, 0.0]])}, "NaN"),
        ({"contacts": np.zeros((0, 3))}, "no observation"),
        ({"contacts": None}, "no observation"),
        ({"contacts": np.zeros((4, 2))}, r"\[k, 3\]"),
        ({"contacts": np.ones((3, 3))}, "only 2 fingers"),
        ({"contacts": np.zeros((1, 3))}, "level with the object origin"),
        ({"contacts": np.array([[0.0, 0.0, 0.1]])}, "level with the object origin"),  # above it: on neither finger's side
        # Two fingertips of a parallel-jaw grasp level with each other along its closing axis.
        ({"contacts": np.array([[0.0, 0.05, 0.0], [0.01, 0.05, 0.02]])}, "level with the object origin"),
        # 8 cm apart along x, 1 mm along the closing axis y: a grasp along x, taken before for a 1 mm wide one.
        ({"contacts": np.array([[0.04, 0.0005, 0.0], [-0.04, -0.0005, 0.0]])}, "at 89° to the configured fingers' closing axis"),
        ({"contacts": None, "partial_cloud": np.zeros((3, 3))}, "fewer than"),
        ({"contacts": None, "partial_cloud": np.full((50, 3), np.inf)}, "NaN or infinite"),
        ({"object_origin": np.array([0.0, np.nan, 0.0])}, "object_origin"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"tuning_iterations": -2}, "tuning_iterations"),
        ({"num_samples": 5000}, "num_samples"),
        ({"contact_directions": np.zeros((2, 3))}, "one \\[x, y, z\\] per contact"),
        ({"contact_directions": np.array([[np.nan, 0.0, 0.0]])}, "contact_directions contain NaN"),
        ({"contacts": None, "contact_directions": np.array([[1.0, 0.0, 0.0]]), "partial_cloud": np.zeros((20, 3))},
         "contact_directions without contacts"),
        ({"contacts": np.ones((65, 3)), "contact_directions": np.ones((65, 3))}, "more than 64"),
    ],
)
def test_engine_refuses_invalid_requests(engine, change, reason):
    fields = {"contacts": np.array([[0.0, 0.05, 0.0]]), "partial_cloud": None, "object_origin": np.zeros(3)}
    result = engine.infer(ShapeRequest(**{**fields, **change}))
    assert not result.success
    assert result.message.startswith("invalid request") and re.search(reason, result.message), result.message
    with pytest.raises(ValueError, match=reason):
        engine.validate(ShapeRequest(**{**fields, **change}))


def test_a_partial_cloud_needs_points_apart_wherever_it_lies():
    """Ten points within ~1 mm of each other, one point's sensor noise: refused at any offset (counted in 1 mm
    grid cells, the same cloud passed or not as it moved by half a millimetre)."""
    engine = ShapeEngine()
    noisy = np.array([0.5, 0.0, 0.1]) + np.random.default_rng(0).normal(0.0, 0.0003, size=(200, 3))
    for shift_m in (0.0, 0.0005, 0.00025):
        with pytest.raises(ValueError, match="at least 1 mm apart, fewer than 10"):
            engine.validate(ShapeRequest(None, noisy + shift_m, np.array([0.5, 0.0, 0.1])))


def test_engine_config_checks_keys_and_takes_explicit_fingers():
    with pytest.raises(ValueError, match="unknown shape engine config"):
        ShapeEngine({"finger_radius": 0.01})
    with pytest.raises(ValueError, match="finger_directions"):
        ShapeEngine({"finger_directions": [1.0, 0.0]})
    three_fingers = ShapeEngine({"finger_directions": [-2.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, -1.0, 0.0]})
    assert three_fingers.finger_directions.shape == (3, 3)
    assert np.allclose(np.linalg.norm(three_fingers.finger_directions, axis=1), 1.0)


def test_default_fingers_are_the_panda_hand_and_other_hands_are_configurable(engine):
    """Contacts without a direction are matched to a Panda hand pointing down: 2 fingers closing toward
    each other along y. The engine's defaults are config/mace.yaml's, and the paper's 5 fingers are a
    parameter away."""
    assert default_parameters("shape") == {key: value for key, value in DEFAULT_SHAPE_CONFIG.items()
                                           if key in default_parameters("shape")}
    assert np.allclose(engine.finger_directions, [[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]], atol=1e-12)
    centre = np.array([0.5, 0.0, 0.1])
    grasp = ShapeRequest(centre + [[0.0, -0.03, 0.0], [0.0, 0.03, 0.0]], None, centre)
    assert engine.validate(grasp).fingers.tolist() == [1, 0]
    # The fingers travel along y only: their tips may be at any height and off the origin along x.
    above = engine.validate(dataclasses.replace(grasp, contacts=centre + [[0.02, 0.03, 0.06], [0.02, -0.03, 0.06]]))
    assert above.fingers.tolist() == [0, 1]
    # ... and each tip is on its side of the other, even where both lie on one side of the origin (the arm of an L).
    aside = engine.validate(dataclasses.replace(grasp, contacts=centre + [[0.0, 0.07, 0.02], [0.0, 0.01, 0.02]]))
    assert aside.fingers.tolist() == [0, 1]
    with pytest.raises(ValueError, match="level with the object origin"):
        engine.validate(dataclasses.replace(grasp, contacts=centre + [[0.03, 0.0, 0.0], [-0.03, 0.0, 0.0]]))
    paper_hand = ShapeEngine({"num_fingers": 5, "finger_azimuth_offset_rad": 0.0})
    assert np.allclose(paper_hand.finger_directions, finger_directions(5, dtype=torch.float64).numpy())
    # Its fingers start 72° apart around the origin: two contacts 10° apart cannot both fit one.
    beside = centre + 0.04 * np.array([[1.0, 0.0, 0.5], [np.cos(0.17), np.sin(0.17), -0.5]])
    with pytest.raises(ValueError, match="away from the side"):
        paper_hand.validate(dataclasses.replace(grasp, contacts=beside))


def test_finger_lines_through_their_contacts():
    """With anchors, finger j moves along directions[j] on the line through anchors[j]."""
    cloud = torch.from_numpy(object_cloud("box", 21, (0.5, 0.0, 0.1)))
    origin = torch.tensor([0.5, 0.0, 0.1])
    directions = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    anchors = torch.tensor([[0.52, 0.0, 0.11], [0.5, 0.01, 0.08]])
    contacts, valid = grasp_contacts(cloud[None], directions, origin, 0.01, anchors)
    assert valid.all()
    for j in range(2):  # brute force: the point furthest back along the line, within the radius
        relative = cloud - anchors[j]
        along = relative @ directions[j]
        near = (relative.square().sum(-1) - along.square()) < 0.01**2
        assert torch.allclose(contacts[0, j], anchors[j] + along[near].min() * directions[j], atol=1e-5)
    same, _ = grasp_contacts(cloud[None], directions, origin, 0.01, origin.expand(2, 3))
    assert torch.allclose(same, grasp_contacts(cloud[None], directions, origin, 0.01)[0], atol=1e-6)


def gripper_grasps(family: str, seed: int, centre, grasps) -> tuple[np.ndarray, np.ndarray]:
    """Contacts [k, 3] and travel directions [k, 3] of parallel-jaw grasps (grasp point, closing axis)
    of a ground-truth object centred at `centre`, as a gripper reports them."""
    cloud = torch.from_numpy(object_cloud(family, seed, centre))
    contacts, directions = [], []
    for point, axis in grasps:
        axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
        fingers = torch.tensor(np.stack([-axis, axis]), dtype=torch.float32)  # closing toward each other
        touched, valid = grasp_contacts(cloud[None], fingers, None, 0.01, torch.tensor(np.stack([point, point]), dtype=torch.float32))
        assert valid.all()
        contacts.append(touched[0].numpy())
        directions.append(fingers.numpy())
    return np.concatenate(contacts).astype(np.float64), np.concatenate(directions).astype(np.float64)


def test_engine_takes_side_and_combined_grasps_with_their_own_directions(engine):
    """A 2-finger grasp from the side, off the object's centre line, and two grasps together: no finger
    set to match, so neither is refused; the grasped object's shape scores."""
    centre = np.array([0.5, 0.0, 0.1])
    side = (centre + [0.0, 0.0, 0.02], [0.0, 1.0, 0.0])  # 2 cm above the centre, closing along y
    front = (centre + [0.0, 0.01, -0.01], [1.0, 0.0, 0.0])
    contacts, directions = gripper_grasps("box", 22, centre, [side])
    request = ShapeRequest(contacts, None, centre, num_samples=8, tuning_iterations=5, random_seed=4, contact_directions=directions)
    prior = engine.infer(dataclasses.replace(request, tuning_iterations=0))
    tuned = engine.infer(request)
    assert prior.success and tuned.success, (prior.message, tuned.message)
    assert tuned.mean_score >= prior.mean_score
    contacts, directions = gripper_grasps("box", 22, centre, [side, front])
    combined = engine.infer(dataclasses.replace(request, contacts=contacts, contact_directions=directions))
    assert combined.success, combined.message
    # A zero direction marks a contact without one: matched to the configured fingers like before.
    mixed = np.vstack([directions[:2], np.zeros((1, 3))])
    observation = engine.validate(ShapeRequest(np.vstack([contacts[:2], centre + [0.0, 0.04, 0.0]]), None, centre, contact_directions=mixed))
    assert observation.fingers.tolist() == [-1, -1, 0]


def test_contacts_without_directions_above_the_origin_are_scored_on_their_own_finger_lines(engine):
    """A top-down Panda grasp of a tall object, its fingertips well above the object's centre and off it
    along x, reported without directions: matched to the 2 fingers by side (refused before, 50°+ from
    the fingers' level), and each finger moves on the line through its contact, so the grasped object
    itself explains its contacts (on lines through object_origin it could not: they miss the contacts)."""
    centre = np.array([0.5, 0.0, 0.1])
    cloud = torch.from_numpy(object_cloud("cylinder", 3, centre))
    height = float(cloud[:, 2].max() - cloud[:, 2].min())
    grasp_point = centre + [0.005, 0.0, 0.3 * height]
    fingers = torch.from_numpy(engine.finger_directions).float()
    contacts, valid = grasp_contacts(cloud[None], fingers, None, engine.finger_radius_m,
                                     torch.tensor(np.stack([grasp_point, grasp_point]), dtype=torch.float32))
    assert valid.all()
    request = ShapeRequest(contacts[0].double().numpy(), None, centre, num_samples=8, tuning_iterations=5, random_seed=2)
    observation = engine.validate(request)
    assert observation.fingers.tolist() == [0, 1]
    assert float(engine.build_domain(observation).score(cloud[None].float())[0]) > 0.9
    result = engine.infer(request)
    assert result.success, result.message


def test_contacts_out_of_every_shapes_reach_say_so(engine):
    """object_origin left at the frame's origin, half a metre from a grasp: nothing fits, and the message says
    that no shape placed there reaches the contacts (a grasp the shapes reach gets no such hint)."""
    grasp = np.array([[0.5, 0.04, 0.1], [0.5, -0.04, 0.1]])
    travel = np.array([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]])
    assert 0.05 < engine.prior_reach_m < 0.5
    misplaced = engine.infer(ShapeRequest(grasp, None, np.zeros(3), num_samples=2, tuning_iterations=0, contact_directions=travel))
    assert not misplaced.success and "contact 0 is 0.51 m from object_origin" in misplaced.message, misplaced.message
    too_wide = engine.infer(ShapeRequest(grasp * [1.0, 2.0, 1.0], None, np.array([0.5, 0.0, 0.1]), num_samples=2, tuning_iterations=0,
                                         contact_directions=travel))
    assert too_wide.success or "object_origin" not in too_wide.message, too_wide.message


def test_a_partial_cloud_out_of_every_shapes_reach_fits_nothing(engine):
    """A partial cloud half a metre from object_origin: every sample scored exp(-τ cap²) > 0, so the answer
    was a success that fit nothing; now nothing fits, and the message says where the cloud lies. The same
    cloud around its object_origin fits."""
    generator = np.random.default_rng(3)
    side = np.column_stack([np.full(200, -0.03), generator.uniform(-0.03, 0.03, (200, 2))])  # a box's face
    centre = np.array([0.5, 0.0, 0.1])
    misplaced = engine.infer(ShapeRequest(None, side + centre + [0.5, 0.0, 0.0], centre, num_samples=4, tuning_iterations=3))
    assert not misplaced.success and float(misplaced.scores.max()) == 0.0, misplaced.message
    assert "the partial cloud's nearest point is 0.47 m from object_origin" in misplaced.message, misplaced.message
    placed = engine.infer(ShapeRequest(None, side + centre, centre, num_samples=4, tuning_iterations=3))
    assert placed.success and "object_origin" not in placed.message, placed.message


def test_tuning_stays_among_the_priors_shapes_where_the_contacts_leave_them_open():
    """A 7 x 12 cm cylinder grasped from two sides 2 cm above and below its centre: the contacts do not say
    how tall it is. Without the prior anchor tuning drifted there to shapes 30-50 cm tall, beyond the
    training set's 25 cm (mean Chamfer to the cylinder 42 cm² against the prior's 10); with it the answer
    scores as well and stays about as near the cylinder as the prior's samples."""
    import trimesh

    engine = ShapeEngine({"num_samples": 16, "timeout_s": 60.0})
    centre = np.array([0.45, -0.1, 0.06])
    surface, _ = trimesh.sample.sample_surface(trimesh.creation.cylinder(radius=0.035, height=0.12), 2048, seed=0)
    truth = torch.as_tensor(surface + centre, dtype=torch.float32)
    contacts = centre + np.array([[0.0, 0.035, 0.02], [0.0, -0.035, 0.02], [0.035, 0.0, -0.02], [-0.035, 0.0, -0.02]])
    travel = np.array([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    request = ShapeRequest(contacts, None, centre, num_samples=16, tuning_iterations=100, random_seed=1, contact_directions=travel)

    def to_truth(result) -> float:
        samples = torch.as_tensor(result.samples)
        return float(chamfer_distance(samples, truth.expand(samples.shape[0], -1, -1)).mean())

    prior = engine.infer(dataclasses.replace(request, tuning_iterations=0))
    tuned = engine.infer(request)
    assert tuned.success and tuned.tuning_iterations_done == 100, tuned.message
    assert tuned.mean_score > prior.mean_score + 0.2
    heights = tuned.samples[:, :, 2].max(axis=1) - tuned.samples[:, :, 2].min(axis=1)
    assert float(heights.mean()) < 0.25, heights
    assert to_truth(tuned) < 1.5 * to_truth(prior), (to_truth(tuned), to_truth(prior))


def test_no_answer_is_larger_than_the_training_objects_allow():
    """A 4 cm cube grasped from its sides: its contacts leave two extents open, and even with the prior anchor
    tuning returned shapes up to 34 cm across (the training objects span at most 25 cm); with max_shape_extent_m
    0 it still does."""
    origin = np.array([0.5, 0.2, 0.02])
    request = ShapeRequest(origin + np.array([[0.0, 0.02, 0.0], [0.0, -0.02, 0.0]]), None, origin, num_samples=16,
                           tuning_iterations=100, timeout_s=60.0, random_seed=13,
                           contact_directions=np.array([[0.0, -1.0, 0.0], [0.0, 1.0, 0.0]]))

    def largest_extents(result) -> np.ndarray:
        assert result.success and result.tuning_iterations_done == 100, result.message
        return (result.samples.max(axis=1) - result.samples.min(axis=1)).max(axis=1)

    assert largest_extents(ShapeEngine().infer(request)).max() <= 0.275
    assert largest_extents(ShapeEngine({"max_shape_extent_m": 0.0}).infer(request)).max() > 0.275


def test_tuning_never_returns_worse_than_the_prior():
    """A learning rate that makes σ_z collapse within a few iterations: the samples still score at
    least as well as the same seed's prior samples (the best θ seen, θ_0 included, or the prior's)."""
    engine = ShapeEngine({"num_samples": 8, "timeout_s": 20.0, "tuning_learning_rate": 0.3, "tuning_samples_per_iteration": 64,
                          "tuning_grad_steps": 8})
    for seed in (1, 2):
        request = grasp_request(engine, HELD_OUT_FAMILY, 30 + seed, (0.0, 0.0, 0.0), tuning_iterations=6, random_seed=seed)
        prior = engine.infer(dataclasses.replace(request, tuning_iterations=0))
        tuned = engine.infer(request)
        assert tuned.tuning_iterations_done == 6
        assert tuned.mean_score >= prior.mean_score, (prior.message, tuned.message)


def test_a_tuned_answer_is_the_best_of_its_oversampled_draws():
    """result_oversampling k: the best num_samples of k x num_samples draws of the tuned prior. The
    plain answer's draws are the first of the oversampled ones (same seed), so rank by rank the
    oversampled answer scores at least as well."""
    plain = ShapeEngine({"num_samples": 8, "timeout_s": 20.0, "result_oversampling": 1})
    oversampled = ShapeEngine({"num_samples": 8, "timeout_s": 20.0, "result_oversampling": 4, "result_diversity_weight": 0.0})
    request = grasp_request(plain, "box", 14, (0.0, 0.0, 0.0))
    first, best = plain.infer(request), oversampled.infer(request)
    assert best.samples.shape == first.samples.shape and "best of 4 x as many draws" in best.message
    assert np.all(best.scores >= first.scores - 1e-5) and best.mean_score > first.mean_score
    with pytest.raises(ValueError, match="result_oversampling"):
        ShapeEngine({"result_oversampling": 0})


def test_an_oversampled_answer_kept_by_score_and_diversity_is_more_diverse():
    """result_diversity_weight: of the same oversampled draws (same seed), those kept by score and diversity
    spread wider than the best-scoring ones and still score at least as well as the prior's."""
    config = {"num_samples": 8, "timeout_s": 20.0, "result_oversampling": 4, "tuning_iterations": 5}
    by_score = ShapeEngine(config | {"result_diversity_weight": 0.0})
    spread = ShapeEngine(config | {"result_diversity_weight": 0.5})
    request = grasp_request(by_score, "box", 14, (0.0, 0.0, 0.0))
    prior = by_score.infer(dataclasses.replace(request, tuning_iterations=0))
    best, diverse = by_score.infer(request), spread.infer(request)
    assert "by score and diversity (weight 0.5)" in diverse.message and diverse.samples.shape == best.samples.shape
    assert diverse.diversity > best.diversity
    assert diverse.mean_score >= prior.mean_score and np.all(np.diff(diverse.scores) <= 0)
    with pytest.raises(ValueError, match="result_diversity_weight"):
        ShapeEngine({"result_diversity_weight": -1.0})


def test_partial_cloud_only_answers_use_their_own_diversity_weight():
    """A partial cloud alone is answered with partial_cloud_diversity_weight (default 0: by score, the
    draws nearest the hidden shape), contacts with result_diversity_weight."""
    config = {"num_samples": 4, "timeout_s": 20.0, "result_oversampling": 2, "tuning_iterations": 2}
    cloud = object_cloud("box", 15)
    request = ShapeRequest(contacts=None, partial_cloud=cloud[cloud[:, 0] > 0], object_origin=np.zeros(3), num_samples=4,
                           tuning_iterations=2, timeout_s=20.0, random_seed=3)
    by_default = ShapeEngine(config).infer(request)
    assert by_default.success and "best of 2 x as many draws" in by_default.message
    assert "by score and diversity" not in by_default.message
    spread = ShapeEngine(config | {"partial_cloud_diversity_weight": 0.5}).infer(request)
    assert "by score and diversity (weight 0.5)" in spread.message
    contacts_engine = ShapeEngine(config | {"result_diversity_weight": 0.3})
    contacts = contacts_engine.infer(grasp_request(contacts_engine, "box", 14, (0.0, 0.0, 0.0)))
    assert "by score and diversity (weight 0.3)" in contacts.message
    with pytest.raises(ValueError, match="partial_cloud_diversity_weight"):
        ShapeEngine({"partial_cloud_diversity_weight": float("nan")})


def test_a_timeout_too_short_to_tune_returns_the_best_of_oversampled_prior_draws():
    """A partial cloud costs milliseconds a sample on a CPU: a 1-s timeout leaves no time to tune besides
    64 x oversampling's final draws. The answer is then the best of as many prior draws as the time allows
    (the same seed's plain draws among them), not plain draws, and still within the timeout."""
    engine = ShapeEngine({"num_samples": 8, "result_oversampling": 64})
    cloud = object_cloud("box", 15)
    request = ShapeRequest(contacts=None, partial_cloud=cloud[cloud[:, 0] > 0], object_origin=np.zeros(3), num_samples=8,
                           tuning_iterations=100, timeout_s=1.0, random_seed=3)
    plain = engine.infer(dataclasses.replace(request, tuning_iterations=0))
    quick = engine.infer(request)
    assert quick.elapsed_s <= request.timeout_s + 0.1, quick.message
    # It says of how many draws it is the best (1 s draws fewer than 64 x 8 on the development CPU).
    draws = re.search(r"the best of (\d+) draws \(the timeout came before 64 x as many\)", quick.message)
    assert (draws and int(draws[1]) > 8) or "the best of 64 x as many draws" in quick.message, quick.message
    assert quick.samples.shape == plain.samples.shape
    assert quick.mean_score > plain.mean_score, (plain.message, quick.message)
    if quick.tuning_iterations_done == 0:
        assert np.all(quick.scores >= plain.scores - 1e-6)


def test_the_diversity_keeps_its_deadline_at_its_own_pace(engine, monkeypatch):
    """The diversity's Chamfer pairs paced from the start-up measurement overran the deadline on a loaded
    CPU (pairs several times slower; the node then dropped the answer): it goes at the pace it measures."""
    import mace_ros.core.shape_engine as shape_engine_module

    def slow_chamfer(a, b):
        time.sleep(0.002 * a.shape[0])  # 2 ms a pair, ~20 times the start-up pace here
        return chamfer_distance(a, b)

    monkeypatch.setattr(shape_engine_module, "chamfer_distance", slow_chamfer)
    samples = torch.as_tensor(engine.infer(grasp_request(engine, "box", 11, (0.0, 0.0, 0.0), tuning_iterations=0,
                                                         num_samples=12)).samples)
    deadline_at = time.monotonic() + 0.06
    by_count = engine.diversity_by_count(samples, deadline_at)
    assert time.monotonic() <= deadline_at + 0.01 and 2 <= by_count.shape[0] < samples.shape[0]


def test_best_theta_keeps_the_best_scoring_iterations_theta_without_reading_back():
    theta = torch.zeros(3)
    best = BestTheta([theta])
    for iteration, (value, mean_score) in enumerate([(1.0, 0.2), (2.0, 0.5), (3.0, 0.3), (4.0, 0.5)]):
        theta.fill_(value)
        best.update(iteration, torch.tensor([mean_score - 0.1, mean_score + 0.1]))
    theta.fill_(5.0)
    best.restore()
    assert torch.equal(theta, torch.full((3,), 2.0))  # the first of two equal means
    assert int(best.iteration) == 1 and float(best.mean) == pytest.approx(0.5)
    # On the meta device any read-back (float(), .item(), a tensor in an `if`) raises: an update has none,
    # so on a GPU it does not synchronise the tuning loop with the host.
    meta = BestTheta([torch.zeros(128, device="meta"), torch.zeros(128, device="meta")])
    meta.update(0, torch.empty(256, device="meta"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(meta.mean)


def test_min_std_ratio_bounds_sigma_while_tuning(vae):
    prior = MaceVAEPrior(vae)
    prior.bound_std(0.5)
    domain = GraspDomain.from_ground_truth(torch.from_numpy(object_cloud("box", 23)), finger_directions(5), None,
                                           density_matched_finger_radius(vae.num_points))
    preset = dataclasses.replace(PAPER_PRESETS["grasp_shape_vae"], num_samples=64, grad_steps_per_iteration=8,
                                 learning_rate=0.1, iterations=4)
    mace_tune(prior, domain, preset, generator=torch.Generator().manual_seed(0), after_step=prior.project)
    ratio = torch.exp(prior.log_std.detach() - vae.prior_log_std)
    assert float(ratio.min()) >= 0.5 - 1e-6 and float(ratio.min()) < 0.51  # it did push against the bound


def test_a_partial_clouds_stray_points_reward_no_shape_stretched_toward_them(engine):
    """A depth camera's few stray points (here 2 % at 0.6 m): with each observed point's term capped
    (partial_outlier_distance_m), the true shape outscores one stretched toward them; uncapped it did not."""
    from mace_ros.core.shape.simulators import partial_cloud_score

    rng = np.random.default_rng(0)
    true_shape = object_cloud("box", 1)[:512]
    seen = true_shape[true_shape[:, 0] > 0.0]  # one side, as a camera sees it
    stray = rng.normal(size=(max(2, len(seen) // 50), 3))
    observed = np.concatenate([seen, 0.6 * stray / np.linalg.norm(stray, axis=1, keepdims=True)])
    stretched = true_shape.copy()
    stretched[-len(stray):] = observed[-len(stray):]  # a few sample points reach the stray ones
    clouds = torch.as_tensor(np.stack([true_shape, stretched]), dtype=torch.float64)
    observed = torch.as_tensor(observed, dtype=torch.float64)
    uncapped = partial_cloud_score(observed, clouds, 5000.0, 5)
    capped = partial_cloud_score(observed, clouds, 5000.0, 5, max_distance_m=0.05)
    assert uncapped[1] > uncapped[0]
    assert capped[0] > capped[1]


def test_a_dense_partial_cloud_is_scored_on_a_fixed_subset(engine):
    """A dense cloud (4096 points here) costs its score in proportion: scored on max_scored_partial_points of
    them, always the same ones, it leaves time for tuning."""
    cloud = object_cloud("box", 2)
    dense = np.concatenate([cloud, cloud + 1e-3])
    observation = engine.validate(ShapeRequest(None, dense, np.zeros(3)))
    first, second = engine.build_domain(observation).domain, engine.build_domain(observation).domain  # within the size limit
    most = engine.config["max_scored_partial_points"]
    assert first.observed_partial.shape[0] == most < len(dense)
    assert torch.equal(first.observed_partial, second.observed_partial)
