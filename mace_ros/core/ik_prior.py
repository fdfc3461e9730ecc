"""Autoregressive Gaussian-mixture IK prior: p(q | goal) = Π_j p(q_j | q_<j, goal).

Architecture from the paper (arXiv 2310.12862, §4.2) and the authors' `models/ik_ar.py`: one MLP
per joint (5 hidden layers of 200, LeakyReLU) that maps the goal and the previous joints to a
mixture of 2 Gaussians; component means are squashed into the joint range with tanh, standard
deviations are floored at 0.0025 rad. The log-likelihood is exact.

Goal conditioning covers both request kinds with one network: the goal is the tip position and
the first two columns of its rotation matrix (the continuous 6-D rotation representation), plus a
flag; position-only goals zero the rotation features and the flag. Training masks orientation at
random so both kinds are learned.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from mace_ros.core.weights import DATA_DIR

DEFAULT_WEIGHTS = DATA_DIR / "ik_prior.safetensors"
PRIOR_TIP_LINK = "panda_hand"  # the prior is trained on this link's poses
MIN_STD_RAD = 0.0025
GOAL_FEATURES = 3 + 6 + 1  # position, rotation columns, orientation flag


def goal_features(position: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Goal conditioning vector [B, 10] from positions [B, 3] and rotations [B, 3, 3] (None = position only)."""
    batch = position.shape[0]
    if rotation is None:
        rotation_part = position.new_zeros(batch, 6)
        flag = position.new_zeros(batch, 1)
    else:
        rotation_part = rotation[:, :, :2].transpose(1, 2).reshape(batch, 6)
        flag = position.new_ones(batch, 1)
    return torch.cat([position, rotation_part, flag], -1)


def _mlp(in_features: int, out_features: int, hidden: int, layers: int) -> nn.Sequential:
    modules: list[nn.Module] = []
    width = in_features
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.LeakyReLU()]
        width = hidden
    modules.append(nn.Linear(width, out_features))
    return nn.Sequential(*modules)


class AutoregressiveIKPrior(nn.Module):
    """p(q | goal) over 7 joints, each factor a Gaussian mixture conditioned on the goal and q_<j."""

    def __init__(
        self,
        joint_lower: Iterable[float],
        joint_upper: Iterable[float],
        num_components: int = 2,
        hidden_width: int = 200,
        hidden_layers: int = 5,
    ):
        super().__init__()
        self.register_buffer("joint_lower", torch.tensor(list(joint_lower), dtype=torch.float32))
        self.register_buffer("joint_upper", torch.tensor(list(joint_upper), dtype=torch.float32))
        self.num_joints = int(self.joint_lower.numel())
        self.num_components = num_components
        self.factors = nn.ModuleList(
            _mlp(GOAL_FEATURES + j, 3 * num_components, hidden_width, hidden_layers) for j in range(self.num_joints)
        )

    def _mixture(self, joint: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture log-weights, means and stds of factor `joint`, each [B, K]."""
        raw = self.factors[joint](inputs)
        logits, raw_mean, raw_std = raw.split(self.num_components, -1)
        lower, upper = self.joint_lower[joint], self.joint_upper[joint]
        mean = lower + (upper - lower) * 0.5 * (torch.tanh(raw_mean) + 1.0)
        std = nn.functional.softplus(raw_std) + MIN_STD_RAD
        return torch.log_softmax(logits, -1), mean, std

    def log_prob(self, q: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Exact log p(q | goal): q [B, 7], goal features [B, 10] -> [B]."""
        total = q.new_zeros(q.shape[0])
        for joint in range(self.num_joints):
            inputs = torch.cat([goal, q[:, :joint]], -1)
            log_weight, mean, std = self._mixture(joint, inputs)
            value = q[:, joint : joint + 1]
            component_log_prob = (
                -0.5 * ((value - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
            )
            total = total + torch.logsumexp(log_weight + component_log_prob, -1)
        return total

    def sample(self, goal: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One configuration per goal row: goal [B, 10] -> q [B, 7], clamped to the joint limits."""
        batch = goal.shape[0]
        q = goal.new_zeros(batch, 0)
        for joint in range(self.num_joints):
            log_weight, mean, std = self._mixture(joint, torch.cat([goal, q], -1))
            component = torch.multinomial(log_weight.exp(), 1, generator=generator)
            noise = torch.randn(batch, 1, generator=generator, device=goal.device, dtype=goal.dtype)
            value = mean.gather(1, component) + std.gather(1, component) * noise
            value = value.clamp(self.joint_lower[joint], self.joint_upper[joint])
            q = torch.cat([q, value], -1)
        return q


class GoalConditionedPrior:
    """The IK prior bound to one goal: the `TunablePrior` protocol of `mace.py`.

    All network weights are θ, as in the paper (the whole prior is fine-tuned per scene).
    """

    def __init__(self, model: AutoregressiveIKPrior, goal: torch.Tensor):
        self.model = model
        self.goal = goal.reshape(1, -1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.model.sample(self.goal.expand(num_samples, -1), generator)

    def tuning_log_likelihood(self, samples: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(samples, self.goal.expand(samples.shape[0], -1))

    def tunable_parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()
