"""The paper's CVAE baseline (§4.1): shapes conditioned on grasp contacts.

Same encoder and decoder as the VAE prior (`vae.py`); the condition is the k observed contacts of
the paper's finger set (`simulators.finger_directions(PAPER_NUM_FINGERS)`: 5 horizontal fingers, not
the node's default Panda hand), relative to the object origin in network units, flattened (k·3),
plus a per-finger validity flag (a finger that touched nothing has a NaN contact, fed as zeros with
flag 0). The encoder sees (cloud, condition): the condition joins the pooled PointNet feature. The
decoder sees (z, embedded condition). The latent prior is the standard CVAE's fixed N(0, σ_z² I),
for training and sampling. (The VAE's ex-post fit of the aggregate posterior, `vae.LatentPriorFit`,
does not suit a conditional model: after a short training its z still carries what c says, so z
drawn from the aggregate contradicts the contacts; measured on 12 objects: mean score 0.62 with the
fit, 0.68 without, diversity 12.7 vs 1.2 cm².)

Trained on (object, simulated contacts) pairs (`training.py --model cvae`). It only understands the
finger set it was trained with: that is the baseline's weakness the paper's Fig. 1 shows out of
distribution.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mace_ros.core.shape.vae import (
    DEFAULT_LATENT_DIM,
    DEFAULT_SCALE_M,
    PAPER_PRIOR_STD,
    FullyConnectedDecoder,
    PointNetEncoder,
    encoder_subset,
    training_kl,
)
from mace_ros.core.weights import DATA_DIR, load_sized_model

DEFAULT_CVAE_WEIGHTS = DATA_DIR / "shape_cvae.safetensors"  # the reduced CPU model (512 points)
FULL_CVAE_WEIGHTS = DATA_DIR / "shape_cvae_2048.safetensors"  # the paper's size, trained on the lent GPU
PAPER_NUM_FINGERS = 5  # the paper's hand, which the CVAE is trained on: 5 horizontal fingers
CONDITION_EMBEDDING_WIDTH = 128  # the authors' conditional model's `cond_size`


def contact_features(contacts: torch.Tensor, origin: torch.Tensor | None, scale_m: float) -> torch.Tensor:
    """Contacts [B, k, 3] in metres (NaN rows = no touch) -> condition [B, 4k]: positions relative to
    `origin` in network units (zeros where missing), then validity flags."""
    valid = contacts.isfinite().all(dim=-1)
    relative = contacts if origin is None else contacts - origin.to(contacts).reshape(-1, 1, 3)
    positions = torch.where(valid.unsqueeze(-1), relative / scale_m, torch.zeros_like(relative))
    return torch.cat([positions.flatten(1), valid.to(contacts.dtype)], dim=1)


class ContactCVAE(nn.Module):
    """CVAE over clouds [B, num_points, 3] (network units) given the contacts of `num_contacts` fingers."""

    def __init__(
        self,
        num_points: int,
        num_contacts: int = PAPER_NUM_FINGERS,
        latent_dim: int = DEFAULT_LATENT_DIM,
        prior_std: float = PAPER_PRIOR_STD,
        scale_m: float = DEFAULT_SCALE_M,
        encoder_points: int | None = None,
    ):
        super().__init__()
        self.num_points = num_points
        self.num_contacts = num_contacts
        self.latent_dim = latent_dim
        self.prior_std = prior_std
        self.encoder_points = encoder_points or num_points
        condition_features = 4 * num_contacts
        self.encoder = PointNetEncoder(latent_dim, condition_features)
        self.condition_embedding = nn.Sequential(
            nn.Linear(condition_features, CONDITION_EMBEDDING_WIDTH),
            nn.ReLU(),
            nn.Linear(CONDITION_EMBEDDING_WIDTH, CONDITION_EMBEDDING_WIDTH),
            nn.ReLU(),
        )
        self.decoder = FullyConnectedDecoder(latent_dim + CONDITION_EMBEDDING_WIDTH, num_points)
        self.register_buffer("scale_m", torch.tensor(float(scale_m)))

    def encode(self, clouds: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(encoder_subset(clouds, self.encoder_points), condition)

    def decode(self, latents: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([latents, self.condition_embedding(condition)], dim=1))

    def forward(
        self, clouds: torch.Tensor, condition: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions [B, P, 3] and KL(q(z|x, c) || p(z)) [B]; condition from `contact_features`."""
        mean, log_variance = self.encode(clouds, condition)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = mean + noise * torch.exp(0.5 * log_variance)
        return self.decode(latents, condition), training_kl(mean, log_variance, self.prior_std)

    def reconstruct(self, clouds: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(clouds, condition)[0], condition)

    def sample(
        self,
        contacts_m: torch.Tensor,
        num_samples: int,
        origin: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Clouds [n, P, 3] in metres around `origin`, given contacts [k, 3] in metres ordered like the
        paper's finger set (NaN rows for fingers that touched nothing)."""
        if contacts_m.shape != (self.num_contacts, 3):
            raise ValueError(f"the CVAE takes the contacts of its {self.num_contacts} fingers [k, 3], got {tuple(contacts_m.shape)}")
        scale_m = float(self.scale_m)
        condition = contact_features(contacts_m.unsqueeze(0).to(self.scale_m), origin, scale_m).expand(num_samples, -1)
        noise = torch.randn(num_samples, self.latent_dim, generator=generator, device=self.scale_m.device, dtype=self.scale_m.dtype)
        with torch.no_grad():
            clouds = self.decode(noise * self.prior_std, condition) * scale_m
        return clouds if origin is None else clouds + origin.to(clouds)


def load_shape_cvae(
    path: str | Path = DEFAULT_CVAE_WEIGHTS, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ContactCVAE:
    """The shipped CVAE in eval mode, sized from its metadata; WeightsError if missing or mismatched."""
    return load_sized_model(
        path,
        lambda metadata: ContactCVAE(
            num_points=int(metadata["num_points"]),
            num_contacts=int(metadata["num_contacts"]),
            latent_dim=int(metadata["latent_dim"]),
            prior_std=float(metadata["prior_std"]),
            scale_m=float(metadata["scale_m"]),
            encoder_points=int(metadata["encoder_points"]),
        ),
        "shape CVAE",
        "python -m mace_ros.core.shape.training --model cvae",
        device,
        dtype,
    )
