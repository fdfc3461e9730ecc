"""Point-cloud VAE prior over object shapes and its MACE-tunable latent prior (MACE-VAE).

Architecture (DESIGN §5; Soft-IntroVAE's 3-D model, which the paper builds on):
- encoder: PointNet, 1×1 convolutions 3→64→128→256→256→512 (BatchNorm + ReLU), max-pool over
  points, linear 512→256 (ReLU), heads 256→latent for μ and log-variance;
- decoder: fully connected latent→64→128→512→1024→num_points·3 with ReLU between.

Latent prior. The networks train against the fixed N(0, σ_z² I) with the paper's σ_z = 0.2 (the
authors' config, `prior_std: 0.2`). The prior MACE tunes is p(u; θ) = N(μ_z, diag σ_z²) with
θ = {`prior_mean`, `prior_log_std`}, θ_0 = N(0, σ_z² I), over a whitened latent u = B⁻¹(z − m) fitted
to the aggregate posterior after training (`LatentPriorFit`: with a short CPU training, samples of
the training prior itself are all the same average shape). `MaceVAEPrior.reset()` returns to θ_0.

Units. The network works in roughly unit coordinates: clouds in metres, relative to the object origin,
divided by a fixed `scale_m` (a buffer saved with the weights). `MaceVAEPrior` converts back to metres
in the caller's frame, so domains and the engine only ever see metric clouds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from mace_ros.core.weights import DATA_DIR, load_sized_model

PAPER_PRIOR_STD = 0.2
DEFAULT_LATENT_DIM = 128
DEFAULT_SCALE_M = 0.1  # 2-25 cm objects span ~0.2-2.5 network units
DEFAULT_VAE_WEIGHTS = DATA_DIR / "shape_vae.safetensors"  # the reduced CPU model (512 points)
FULL_VAE_WEIGHTS = DATA_DIR / "shape_vae_2048.safetensors"  # the paper's size, trained on the lent GPU
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
        if self.training:
            pooled = self.point_features(clouds.transpose(1, 2)).amax(dim=2)
        else:
            pooled = self._folded_point_features(clouds).amax(dim=1)
        if condition is not None:
            pooled = torch.cat([pooled, condition], dim=1)
        hidden = self.global_features(pooled)
        return self.mean_head(hidden), self.log_variance_head(hidden)

    def _folded_point_features(self, clouds: torch.Tensor) -> torch.Tensor:
        """`point_features` in eval mode as one matrix product per layer over the points [B, P, C], each
        BatchNorm folded into its 1x1 convolution (its running statistics are constants there): a MACE
        iteration, most of which is encoding its elites, took 18 % less time on one CPU thread (BENCHMARKS.md)."""
        features = clouds
        modules = list(self.point_features)
        for convolution, norm in zip(modules[0::3], modules[1::3]):
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            weight = (convolution.weight[:, :, 0] * scale[:, None]).t()
            bias = (convolution.bias - norm.running_mean) * scale + norm.bias
            flat = torch.addmm(bias, features.reshape(-1, features.shape[-1]), weight)
            features = torch.relu(flat).reshape(*features.shape[:-1], -1)
        return features


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


class LatentPriorFit(nn.Module):
    """The shipped latent prior: z = offset + basis · u with u ~ p(u; θ) = N(μ_z, diag σ_z²).

    Why. The VAE trains against the fixed N(0, σ_z² I) over its native latent z. After the few
    epochs a CPU allows (the authors trained 2000), the aggregate posterior q(z) = E_x q(z|x) is
    still far from that prior and strongly correlated (principal standard deviations up to ~2 vs
    σ_z = 0.2), so samples of N(0, σ_z² I) decode to near-identical average shapes. We ship the
    ex-post Gaussian fit of the aggregate posterior (as in Ghosh et al. 2020, "From Variational to
    Deterministic Autoencoders"), written as a whitening of the latent space: `fit` chooses offset
    and basis so that u is ~N(0, σ_z² I) over the training set. θ_0 stays the paper's N(0, σ_z² I),
    only in the whitened coordinates u, and MACE still tunes a diagonal {μ_z, σ_z}. With the
    identity basis (an untouched model) u = z.

    MACE's objective in u: q(u|x) = N(B⁻¹(μ_q − offset), B⁻¹ Σ_q B⁻ᵀ) is no longer diagonal, but
    KL(q(u|x) || p(u; θ)) for a diagonal p depends on θ only through q's mean and the diagonal of
    its covariance; `posterior` returns those (the dropped log-determinant is constant in θ).
    """

    def __init__(self, latent_dim: int, prior_std: float):
        super().__init__()
        self.prior_std = prior_std
        self.register_buffer("offset", torch.zeros(latent_dim))
        self.register_buffer("basis", torch.eye(latent_dim))

    def to_native(self, whitened: torch.Tensor) -> torch.Tensor:
        return self.offset + whitened @ self.basis.T

    def basis_inverse(self) -> torch.Tensor:
        """basis⁻¹, computed once per basis (a GPU inverse costs a solver launch and a host sync): the
        cache follows the buffer's storage and version, so `fit`, `load_state_dict` and `.to` renew it."""
        key = (self.basis.data_ptr(), self.basis._version, self.basis.device, self.basis.dtype)
        if getattr(self, "_inverse_key", None) != key:
            self._inverse, self._inverse_key = torch.linalg.inv(self.basis), key
        return self._inverse

    def posterior(self, mean_native: torch.Tensor, log_variance_native: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(u|x): mean and log of the covariance's diagonal, from the native diagonal posterior."""
        basis_inverse = self.basis_inverse()
        mean = (mean_native - self.offset) @ basis_inverse.T
        variance = log_variance_native.exp() @ basis_inverse.square().T
        return mean, variance.log()

    @torch.no_grad()
    def fit(self, means: torch.Tensor, log_variances: torch.Tensor) -> None:
        """Fit to the posteriors (μ_q, log σ_q²) [N, latent] of training objects.

        Covariance of the aggregate posterior (law of total variance): Cov[μ_q] + E[diag σ_q²].
        Basis: its principal directions scaled so that u has standard deviation σ_z along each.
        """
        means64 = means.double()
        covariance = torch.cov(means64.T) + torch.diag(log_variances.double().exp().mean(0))
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        basis = eigenvectors * (eigenvalues.clamp_min(1e-12).sqrt() / self.prior_std)
        self.offset.copy_(means64.mean(0).to(self.offset))
        self.basis.copy_(basis.to(self.basis))


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
        self.prior_std = prior_std
        self.encoder_points = encoder_points or num_points
        self.encoder = PointNetEncoder(latent_dim)
        self.decoder = FullyConnectedDecoder(latent_dim, num_points)
        self.latent_prior_fit = LatentPriorFit(latent_dim, prior_std)
        # θ_0 = {μ_z, σ_z} of p(u; θ) (whitened latent, see LatentPriorFit). Parameters, not buffers,
        # because θ is what MACE tunes; they stay frozen here and `MaceVAEPrior` tunes its own copy.
        self.prior_mean = nn.Parameter(torch.zeros(latent_dim), requires_grad=False)
        self.prior_log_std = nn.Parameter(torch.full((latent_dim,), math.log(prior_std)), requires_grad=False)
        self.register_buffer("scale_m", torch.tensor(float(scale_m)))

    def encode(self, clouds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Native posterior (μ, log-variance) [B, latent] of clouds [B, P, 3] in network units."""
        return self.encoder(encoder_subset(clouds, self.encoder_points))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clouds [B, P, 3] in network units from native latents z [B, latent]."""
        return self.decoder(latents)

    def forward(self, clouds: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions [B, P, 3] (one reparameterized draw) and KL(q(z|x) || N(0, σ_z² I)) [B]."""
        mean, log_variance = self.encode(clouds)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = mean + noise * torch.exp(0.5 * log_variance)
        return self.decode(latents), training_kl(mean, log_variance, self.prior_std)

    def reconstruct(self, clouds: torch.Tensor) -> torch.Tensor:
        """Decoded posterior means [B, num_points, 3] (the reconstruction metric of training)."""
        return self.decode(self.encode(clouds)[0])


def training_kl(mean_q: torch.Tensor, log_variance_q: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(q || N(0, prior_std² I)) [B]: the prior the networks train against."""
    return gaussian_kl(mean_q, log_variance_q, torch.zeros_like(mean_q[0]), torch.full_like(mean_q[0], math.log(prior_std)))


def default_vae_weights(device: torch.device | str) -> Path:
    """The paper-size VAE on a GPU; on a CPU the reduced one (decoding, scoring and encoding 2048 points
    per sample cost several times as much there)."""
    return FULL_VAE_WEIGHTS if torch.device(device).type == "cuda" else DEFAULT_VAE_WEIGHTS


def load_shape_vae(
    path: str | Path = DEFAULT_VAE_WEIGHTS, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PointCloudVAE:
    """The shipped VAE in eval mode, sized from its metadata; WeightsError if missing or mismatched."""
    return load_sized_model(
        path,
        lambda metadata: PointCloudVAE(
            num_points=int(metadata["num_points"]),
            latent_dim=int(metadata["latent_dim"]),
            prior_std=float(metadata["prior_std"]),
            scale_m=float(metadata["scale_m"]),
            encoder_points=int(metadata["encoder_points"]),
        ),
        "shape VAE",
        "python -m mace_ros.core.shape.training --model vae",
        device,
        dtype,
    )


class PosteriorCache:
    """The last encoded tensor and its posterior.

    MACE scores the same elite tensor M times per iteration (and IS evaluates θ and θ_0 on the same
    samples); the frozen encoder's posterior does not depend on θ, so each tensor is encoded once.
    Keyed by identity: the loops index their batch once and pass that same tensor every time.
    """

    def __init__(self) -> None:
        self._input: torch.Tensor | None = None
        self._posterior: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, clouds: torch.Tensor, encode: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if clouds is not self._input:
            with torch.no_grad():
                self._posterior = encode()
            self._input = clouds
        return self._posterior


class MaceVAEPrior:
    """The TunablePrior of MACE-VAE: θ = {μ_z, σ_z}; encoder and decoder frozen (eval mode, shared).

    Samples are clouds in metres placed around `origin` (the caller's frame). The tuning objective is
    −KL(q(u|x) || p(u; θ)) in closed form (the paper's MACE-VAE surrogate for log p(x; θ)), in the
    whitened latent u of `LatentPriorFit` (up to a constant in θ, see there).
    Cheap to create per request: only θ is copied, the network is shared and never modified.
    """

    def __init__(self, vae: PointCloudVAE, origin: torch.Tensor | None = None, posterior_cache: PosteriorCache | None = None):
        self.vae = vae.eval()
        for parameter in vae.parameters():
            parameter.requires_grad_(False)
        device, dtype = vae.prior_mean.device, vae.prior_mean.dtype
        self.origin = torch.zeros(3, device=device, dtype=dtype) if origin is None else origin.to(device, dtype)
        self.mean = nn.Parameter(vae.prior_mean.detach().clone())
        self.log_std = nn.Parameter(vae.prior_log_std.detach().clone())
        self.posterior_cache = posterior_cache or PosteriorCache()
        # Lower bound on log σ_z (None = unbounded), enforced by `project` after each tuning step.
        self.min_log_std: torch.Tensor | None = None
        self._min_log_std_host: np.ndarray | None = None  # the same on the host (project_host runs M times per iteration)
        self.anchor_weight = 0.0  # λ of the loss's λ · KL(p(u; θ) || p(u; θ_0)), see `anchor_to_prior`
        self._anchor_host: tuple[np.ndarray, np.ndarray] | None = None

    def __deepcopy__(self, memo: dict) -> "MaceVAEPrior":
        # The importance-sampling baseline deep-copies the prior as θ_0: share the frozen network and
        # its posterior cache (q(z|x) does not depend on θ), copy θ.
        twin = MaceVAEPrior(self.vae, self.origin, self.posterior_cache)
        twin.min_log_std, twin._min_log_std_host = self.min_log_std, self._min_log_std_host
        twin.anchor_weight, twin._anchor_host = self.anchor_weight, self._anchor_host
        with torch.no_grad():
            twin.mean.copy_(self.mean)
            twin.log_std.copy_(self.log_std)
        return twin

    def reset(self) -> None:
        """Back to the shipped prior θ_0 (N(0, σ_z² I) over the whitened latent)."""
        with torch.no_grad():
            self.mean.copy_(self.vae.prior_mean)
            self.log_std.copy_(self.vae.prior_log_std)

    def tunable_parameters(self) -> Iterable[nn.Parameter]:
        return [self.mean, self.log_std]

    def bound_std(self, min_std_ratio: float) -> None:
        """Keep σ_z >= min_std_ratio · the shipped prior's σ_z while tuning (0 = no bound): the elites'
        posteriors are narrow, and an unbounded σ_z shrinks until every sample is the same shape."""
        self.min_log_std = None if min_std_ratio <= 0 else self.vae.prior_log_std.detach() + math.log(min_std_ratio)
        self._min_log_std_host = None if self.min_log_std is None else self.min_log_std.double().cpu().numpy()
        self.project()

    def anchor_to_prior(self, weight: float) -> None:
        """Add weight · KL(p(u; θ) || p(u; θ_0)) to the tuning loss (0 = none): the elites pull μ_z as far as
        they keep pulling, against weight prior pseudo-observations per iteration, and no further. Without
        it μ_z drifts wherever the score is flat (what the observation does not constrain, e.g. the height
        of an object grasped from its sides) by the elites' small biases, and with σ_z kept at the prior's
        the samples leave the prior's typical set: a 12 cm cylinder grasped from two sides came back as
        shapes 30-50 cm tall, far beyond the training set's 25 cm."""
        self.anchor_weight = float(weight)
        # θ_0's μ_z and 1 / σ_z² on the host, for elite_loss_gradient (M times per iteration).
        self._anchor_host = (self.vae.prior_mean.detach().double().cpu().numpy(),
                             np.exp(-2.0 * self.vae.prior_log_std.detach().double().cpu().numpy()))

    def project_host(self, theta: np.ndarray) -> np.ndarray:
        """`project` on a flat host θ = (μ_z, log σ_z) (mace.ClosedFormElitePrior)."""
        if self._min_log_std_host is None:
            return theta
        log_std = theta[self.vae.latent_dim:]
        np.maximum(log_std, self._min_log_std_host, out=log_std)  # in place: it runs M times per iteration
        return theta

    def elite_statistics(self, elites: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[3 × latent]: the weighted means of q(u|x)'s means, their spread about it and q's variances
        (mace.ClosedFormElitePrior; weights 0 or 1, not all 0). The spread is centred here, on the
        device, so that a collapsing posterior keeps its precision."""
        mean_q, log_variance_q = self.posterior(elites)
        share = (weights / weights.sum().clamp_min(1.0)).unsqueeze(-1)
        centre = (share * mean_q).sum(0)
        spread = (share * (mean_q - centre).pow(2)).sum(0)
        return torch.cat([centre, spread, (share * log_variance_q.exp()).sum(0)])

    def elite_loss_gradient(self, theta: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """Gradient of the elites' mean KL(q(u|x) || N(μ_z, σ_z²)) (−`tuning_log_likelihood`) in (μ_z, log σ_z):
        per latent, (μ − m̄)/σ² and 1 − (v̄ + spread + (m̄ − μ)²)/σ²."""
        latent = self.vae.latent_dim
        mean, log_std = theta[:latent], theta[latent:]
        centre, spread, variance = statistics[:latent], statistics[latent:2 * latent], statistics[2 * latent:]
        inverse_variance = np.exp(-2.0 * log_std)
        gradient = np.empty_like(theta)
        offset = np.subtract(mean, centre, out=gradient[:latent])
        log_std_part = gradient[latent:]
        np.multiply(offset, offset, out=log_std_part)
        log_std_part += variance
        log_std_part += spread
        log_std_part *= inverse_variance
        np.subtract(1.0, log_std_part, out=log_std_part)
        offset *= inverse_variance
        if self.anchor_weight > 0.0:  # + λ ∇ KL(N(μ, σ²) || N(μ_0, σ_0²)): λ (μ − μ_0) / σ_0², λ (σ² / σ_0² − 1)
            prior_mean, prior_inverse_variance = self._anchor_host
            gradient[:latent] += self.anchor_weight * (mean - prior_mean) * prior_inverse_variance
            gradient[latent:] += self.anchor_weight * (np.exp(2.0 * log_std) * prior_inverse_variance - 1.0)
        return gradient

    def project(self) -> None:
        """Clamp θ onto its allowed set (pass as mace_tune's `after_step`)."""
        if self.min_log_std is not None:
            with torch.no_grad():
                self.log_std.copy_(torch.maximum(self.log_std, self.min_log_std))

    def to_network_units(self, clouds_m: torch.Tensor) -> torch.Tensor:
        return (clouds_m - self.origin) / self.vae.scale_m

    def to_metres(self, clouds: torch.Tensor) -> torch.Tensor:
        return clouds * self.vae.scale_m + self.origin

    def sample_latents(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """u ~ p(u; θ) [n, latent] (whitened latent space, see LatentPriorFit)."""
        noise = torch.randn(
            num_samples, self.vae.latent_dim, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + noise * torch.exp(self.log_std)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clouds [n, P, 3] in metres around `origin`."""
        with torch.no_grad():
            native = self.vae.latent_prior_fit.to_native(self.sample_latents(num_samples, generator))
            return self.to_metres(self.vae.decode(native))

    def posterior(self, clouds_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(u|x) (μ, log of the covariance's diagonal) of clouds in metres, from the frozen encoder."""

        def encode() -> tuple[torch.Tensor, torch.Tensor]:
            return self.vae.latent_prior_fit.posterior(*self.vae.encode(self.to_network_units(clouds_m)))

        return self.posterior_cache.get(clouds_m, encode)

    def tuning_log_likelihood(self, clouds_m: torch.Tensor) -> torch.Tensor:
        """−KL(q(z|x) || p(z; θ)) [n], less `anchor_weight` · KL(p(z; θ) || p(z; θ_0)); differentiable in θ only."""
        mean_q, log_variance_q = self.posterior(clouds_m)
        log_likelihood = -gaussian_kl(mean_q, log_variance_q, self.mean, self.log_std)
        if self.anchor_weight > 0.0:
            log_likelihood = log_likelihood - self.anchor_weight * gaussian_kl(
                self.mean, 2.0 * self.log_std, self.vae.prior_mean, self.vae.prior_log_std)
        return log_likelihood
