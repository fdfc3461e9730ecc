"""Point-cloud VAE prior over object shapes and its MACE-tunable latent prior (MACE-VAE).

Architecture (DESIGN §5; Soft-IntroVAE's 3-D model, which the paper builds on):
- encoder: PointNet, 1×1 convolutions 3→64→128→256→256→512 (BatchNorm + ReLU), max-pool over
  points, linear 512→256 (ReLU), heads 256→latent for μ and log-variance;
- decoder: fully connected latent→64→128→512→1024→num_points·3 with ReLU between.

Latent prior. p(z; θ) = N(μ_z, diag σ_z²) with θ = {`prior_mean`, `prior_log_std`}. The VAE is trained
against the fixed prior N(0, σ_z² I) with the paper's σ_z = 0.2 (the authors' config, `prior_std: 0.2`):
the KL term of training and the distribution sampled at inference are then the same, so the trained
prior is exactly what `MaceVAEPrior.reset()` returns to. The prior is not learned during training.

Units. The network works in roughly unit coordinates: clouds in metres, relative to the object origin,
divided by a fixed `scale_m` (a buffer saved with the weights). `MaceVAEPrior` converts back to metres
in the caller's frame, so domains and the engine only ever see metric clouds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from mace_ros.core.weights import DATA_DIR, WeightsError, load_weights, metadata_path

PAPER_PRIOR_STD = 0.2
DEFAULT_LATENT_DIM = 128
DEFAULT_SCALE_M = 0.1  # 2-25 cm objects span ~0.2-2.5 network units
DEFAULT_VAE_WEIGHTS = DATA_DIR / "shape_vae.safetensors"
ENCODER_CHANNELS = (3, 64, 128, 256, 256, 512)
DECODER_WIDTHS = (64, 128, 512, 1024)


class PointNetEncoder(nn.Module):
    """Clouds [B, P, 3] (+ optional condition [B, C]) -> Gaussian posterior (μ, log-variance), each [B, latent]."""

    def __init__(self, latent_dim: int, condition_features: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        for in_channels, out_channels in zip(ENCODER_CHANNELS[:-1], ENCODER_CHANNELS[1:]):
            layers += [nn.Conv1d(in_channels, out_channels, 1), nn.BatchNorm1d(out_channels), nn.ReLU()]
        self.point_features = nn.Sequential(*layers)
        # A condition (the CVAE's contacts) joins the global feature after pooling.
        self.global_features = nn.Sequential(nn.Linear(ENCODER_CHANNELS[-1] + condition_features, 256), nn.ReLU())
        self.mean_head = nn.Linear(256, latent_dim)
        self.log_variance_head = nn.Linear(256, latent_dim)

    def forward(self, clouds: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.point_features(clouds.transpose(1, 2)).amax(dim=2)
        if condition is not None:
            pooled = torch.cat([pooled, condition], dim=1)
        hidden = self.global_features(pooled)
        return self.mean_head(hidden), self.log_variance_head(hidden)


class FullyConnectedDecoder(nn.Module):
    """Latent codes [B, in_features] -> clouds [B, num_points, 3]."""

    def __init__(self, in_features: int, num_points: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in DECODER_WIDTHS:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_points * 3))
        self.layers = nn.Sequential(*layers)
        self.num_points = num_points

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.layers(codes).view(codes.shape[0], self.num_points, 3)


def encoder_subset(clouds: torch.Tensor, encoder_points: int) -> torch.Tensor:
    """Evenly strided `encoder_points` of each cloud [B, P, 3] (all of them when P is not larger).

    A model trained with the encoder seeing random subsets of a cloud (the reduced CPU preset) is
    fed subsets of the same size at inference, so max-pooled features keep their training statistics.
    """
    if clouds.shape[1] <= encoder_points:
        return clouds
    index = torch.linspace(0, clouds.shape[1] - 1, encoder_points, device=clouds.device).long()
    return clouds[:, index]


def gaussian_kl(
    mean_q: torch.Tensor, log_variance_q: torch.Tensor, mean_p: torch.Tensor, log_std_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(μ_q, σ_q²) || N(μ_p, σ_p²)) for diagonal Gaussians, summed over the last dimension -> [B]."""
    variance_ratio = torch.exp(log_variance_q - 2.0 * log_std_p)
    mean_term = (mean_q - mean_p).pow(2) * torch.exp(-2.0 * log_std_p)
    return 0.5 * (variance_ratio + mean_term - 1.0 - log_variance_q + 2.0 * log_std_p).sum(-1)


class PointCloudVAE(nn.Module):
    """VAE over clouds of `num_points` points, in network units (metres / `scale_m`)."""

    def __init__(
        self,
        num_points: int,
        latent_dim: int = DEFAULT_LATENT_DIM,
        prior_std: float = PAPER_PRIOR_STD,
        scale_m: float = DEFAULT_SCALE_M,
        encoder_points: int | None = None,
    ):
        super().__init__()
        self.num_points = num_points
        self.latent_dim = latent_dim
        self.encoder_points = encoder_points or num_points
        self.encoder = PointNetEncoder(latent_dim)
        self.decoder = FullyConnectedDecoder(latent_dim, num_points)
        # The trained prior p(z; θ_0). Parameters (not buffers) because θ is what MACE tunes; they stay
        # frozen while the VAE trains and `MaceVAEPrior` tunes its own copy.
        self.prior_mean = nn.Parameter(torch.zeros(latent_dim), requires_grad=False)
        self.prior_log_std = nn.Parameter(torch.full((latent_dim,), math.log(prior_std)), requires_grad=False)
        self.register_buffer("scale_m", torch.tensor(float(scale_m)))

    def encode(self, clouds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (μ, log-variance) [B, latent] of clouds [B, P, 3] in network units."""
        return self.encoder(encoder_subset(clouds, self.encoder_points))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def kl_to_prior(self, mean_q: torch.Tensor, log_variance_q: torch.Tensor) -> torch.Tensor:
        return gaussian_kl(mean_q, log_variance_q, self.prior_mean, self.prior_log_std)

    def forward(self, clouds: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions [B, P, 3] (one reparameterized draw) and KL(q(z|x) || p(z)) [B]."""
        mean, log_variance = self.encode(clouds)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = mean + noise * torch.exp(0.5 * log_variance)
        return self.decode(latents), self.kl_to_prior(mean, log_variance)

    def reconstruct(self, clouds: torch.Tensor) -> torch.Tensor:
        """Decoded posterior means [B, num_points, 3] (the reconstruction metric of training)."""
        return self.decode(self.encode(clouds)[0])


def load_shape_vae(
    path: str | Path = DEFAULT_VAE_WEIGHTS, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PointCloudVAE:
    """The shipped VAE in eval mode, sized from its metadata; WeightsError if missing or mismatched."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file() or not meta_file.is_file():
        raise WeightsError(
            f"shape VAE weights or metadata not found: {path}, {meta_file} "
            "(regenerate them with `python -m mace_ros.core.shape.training --model vae`)"
        )
    metadata = json.loads(meta_file.read_text())
    try:
        vae = PointCloudVAE(
            num_points=int(metadata["num_points"]),
            latent_dim=int(metadata["latent_dim"]),
            prior_std=float(metadata["prior_std"]),
            scale_m=float(metadata["scale_m"]),
            encoder_points=int(metadata["encoder_points"]),
        )
    except KeyError as error:
        raise WeightsError(f"metadata {meta_file} lacks {error}") from error
    load_weights(vae, path, device, dtype)
    return vae.eval()


class MaceVAEPrior:
    """The TunablePrior of MACE-VAE: θ = {μ_z, σ_z}; encoder and decoder frozen (eval mode, shared).

    Samples are clouds in metres placed around `origin` (the caller's frame). The tuning objective is
    −KL(q(z|x) || p(z; θ)) in closed form (the paper's MACE-VAE surrogate for log p(x; θ)).
    Cheap to create per request: only θ is copied, the network is shared and never modified.
    """

    def __init__(self, vae: PointCloudVAE, origin: torch.Tensor | None = None):
        self.vae = vae.eval()
        for parameter in vae.parameters():
            parameter.requires_grad_(False)
        device, dtype = vae.prior_mean.device, vae.prior_mean.dtype
        self.origin = torch.zeros(3, device=device, dtype=dtype) if origin is None else origin.to(device, dtype)
        self.mean = nn.Parameter(vae.prior_mean.detach().clone())
        self.log_std = nn.Parameter(vae.prior_log_std.detach().clone())
        # mace_tune scores the same elite tensor M times per iteration; the frozen encoder's posterior
        # does not depend on θ, so it is computed once per tensor.
        self._cached_input: torch.Tensor | None = None
        self._cached_posterior: tuple[torch.Tensor, torch.Tensor] | None = None

    def __deepcopy__(self, memo: dict) -> "MaceVAEPrior":
        # The importance-sampling baseline deep-copies the prior as θ_0: share the frozen network.
        twin = MaceVAEPrior(self.vae, self.origin)
        with torch.no_grad():
            twin.mean.copy_(self.mean)
            twin.log_std.copy_(self.log_std)
        return twin

    def reset(self) -> None:
        """Back to the trained prior N(0, σ_z² I)."""
        with torch.no_grad():
            self.mean.copy_(self.vae.prior_mean)
            self.log_std.copy_(self.vae.prior_log_std)

    def tunable_parameters(self) -> Iterable[nn.Parameter]:
        return [self.mean, self.log_std]

    def to_network_units(self, clouds_m: torch.Tensor) -> torch.Tensor:
        return (clouds_m - self.origin) / self.vae.scale_m

    def to_metres(self, clouds: torch.Tensor) -> torch.Tensor:
        return clouds * self.vae.scale_m + self.origin

    def sample_latents(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            num_samples, self.vae.latent_dim, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + noise * torch.exp(self.log_std)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clouds [n, P, 3] in metres around `origin`."""
        with torch.no_grad():
            return self.to_metres(self.vae.decode(self.sample_latents(num_samples, generator)))

    def posterior(self, clouds_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if clouds_m is not self._cached_input:
            with torch.no_grad():
                self._cached_posterior = self.vae.encode(self.to_network_units(clouds_m))
            self._cached_input = clouds_m
        return self._cached_posterior

    def tuning_log_likelihood(self, clouds_m: torch.Tensor) -> torch.Tensor:
        """−KL(q(z|x) || p(z; θ)) [n]; differentiable in θ only."""
        mean_q, log_variance_q = self.posterior(clouds_m)
        return -gaussian_kl(mean_q, log_variance_q, self.mean, self.log_std)
