"""The autoregressive Gaussian-mixture IK prior: exact log-likelihood, sampling, shipped weights."""
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal

from mace_ros.core.ik_prior import DEFAULT_WEIGHTS, AutoregressiveIKPrior, GoalConditionedPrior, goal_features
from mace_ros.core.kinematics import JOINT_LOWER, JOINT_UPPER, PandaKinematics
from mace_ros.core.weights import empty_model, load_weights


def small_prior() -> AutoregressiveIKPrior:
    torch.manual_seed(0)
    return AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER, hidden_width=16, hidden_layers=2)


def test_log_prob_equals_a_reference_mixture_chain():
    prior = small_prior()
    kinematics = PandaKinematics()
    q = kinematics.random_configurations(64, torch.Generator().manual_seed(1))
    position, rotation = kinematics.forward(q)
    goal = goal_features(position, rotation)
    reference = torch.zeros(64)
    for joint in range(7):
        log_weight, mean, std = prior._mixture(joint, torch.cat([goal, q[:, :joint]], -1))
        mixture = MixtureSameFamily(Categorical(logits=log_weight), Normal(mean, std))
        reference += mixture.log_prob(q[:, joint])
    assert torch.allclose(prior.log_prob(q, goal), reference, atol=1e-4)


def test_samples_respect_limits_and_follow_the_first_factor():
    prior = small_prior()
    goal = goal_features(torch.tensor([[0.4, 0.1, 0.5]]), None).expand(20000, -1)
    with torch.no_grad():
        q = prior.sample(goal, torch.Generator().manual_seed(2))
        log_weight, mean, std = prior._mixture(0, goal[:1])
    lower, upper = torch.tensor(JOINT_LOWER), torch.tensor(JOINT_UPPER)
    assert bool(((q >= lower) & (q <= upper)).all())
    expected_mean = float((log_weight.exp() * mean).sum())
    assert abs(float(q[:, 0].mean()) - expected_mean) < 0.05


def test_position_only_goal_features_ignore_orientation():
    position = torch.tensor([[0.3, 0.0, 0.4]])
    assert torch.equal(goal_features(position, None)[:, 3:], torch.zeros(1, 7))
    with_rotation = goal_features(position, torch.eye(3)[None])
    assert float(with_rotation[0, -1]) == 1.0


def test_shipped_prior_puts_the_hand_near_the_goal():
    """The trained weights are real: samples for a goal land near it far more often than uniform ones."""
    prior = AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER)
    metadata = load_weights(prior, DEFAULT_WEIGHTS, "cpu", torch.float32)
    assert metadata["num_training_configurations"] >= 1_000_000
    kinematics = PandaKinematics()
    goal_position = torch.tensor([0.5, 0.2, 0.4])
    conditioned = GoalConditionedPrior(prior, goal_features(goal_position[None], None))
    with torch.no_grad():
        q = conditioned.sample(2000, torch.Generator().manual_seed(3))
        uniform = kinematics.random_configurations(2000, torch.Generator().manual_seed(3))
    prior_error = (kinematics.forward(q)[0] - goal_position).norm(dim=-1)
    uniform_error = (kinematics.forward(uniform)[0] - goal_position).norm(dim=-1)
    assert float(prior_error.median()) < 0.15  # 3 CPU epochs; the position-only factorization is broad
    assert float(prior_error.median()) < 0.3 * float(uniform_error.median())
    # Exact likelihood: samples of the prior are more likely under it than uniform configurations.
    assert float(conditioned.tuning_log_likelihood(q).mean()) > float(conditioned.tuning_log_likelihood(uniform).mean())


def test_a_prior_built_on_the_meta_device_loads_as_one_built_normally():
    """empty_model skips the random initialisation; the loaded prior is the same, on the device asked for."""
    built = AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER)
    load_weights(built, DEFAULT_WEIGHTS, "cpu", torch.float64)
    empty = empty_model(lambda: AutoregressiveIKPrior(JOINT_LOWER, JOINT_UPPER))
    assert all(tensor.is_meta for tensor in empty.state_dict().values())
    load_weights(empty, DEFAULT_WEIGHTS, "cpu", torch.float64)
    state, reference = empty.state_dict(), built.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float64 and torch.equal(tensor, reference[name]), name
    assert all(parameter.requires_grad for parameter in empty.parameters())  # tuning still trains them
