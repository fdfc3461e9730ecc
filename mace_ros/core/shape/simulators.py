"""Shape-inference simulators and scores (paper Appendix A), batched over a leading dimension.

Clouds are [B, N, 3] in metres; device and dtype follow the clouds. Two observation types:

Grasp. k fingers each move in a straight line toward the object origin, from outside. Finger j
travels along `directions[j]` (pointing from its start toward the origin) on the line through the
origin, or, when the finger's line is given by an anchor point (`anchors[j]`, e.g. the contact a
gripper reported with its own travel direction), on the line through that point; it stops at the first cloud point within `finger_radius_m` of that line, i.e. the point
furthest back along the line (smallest projection on the travel direction). The contact reported
is where the finger stops: that point projected onto the finger's line (the fingertip centre).
The paper's Appendix A names the cloud point itself; its public code scores only the distance each
finger travelled, which the projection keeps. Reporting the raw point would score the lateral
scatter of up to a finger radius between equally good samples (which point of a sparse cloud
happens to fall inside the finger's disc) as shape error. The observation is the k contacts
[k, 3]. A finger that meets no point passed the object: it is marked invalid (NaN contact, `valid`
False). Score: max(1 − mean_j e_j / s, 0) with e_j = ‖p'_j − p_j‖ when both the sample's and the
observed finger touched, 0 when both missed (they agree), and s (the largest error that still
scores) when exactly one missed.

Partial cloud. A random hyperplane through (near) the object centre cuts a cloud; the observation
is the points on one side. Score: exp(−τ · CD_k(observed, sample)) with the one-sided k-nearest
Chamfer distance of `chamfer.knn_chamfer` (which does not penalize the unobserved side). τ is in
1/m² because CD_k is a mean squared distance in m².
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mace_ros.core.shape.chamfer import knn_chamfer

# A fingertip pad ~2 cm wide. The radius also sets how sparse a cloud the fingers can touch: on a
# 25 cm box sampled with 2048 points, a 1 cm finger covers ~1.7 points on average (5 mm: 0.4, so
# most fingers would slip through the gaps between points).
DEFAULT_FINGER_RADIUS_M = 0.01
# Errors of a few centimetres on 2-25 cm objects should still be told apart from misses.
DEFAULT_LENGTH_SCALE_M = 0.05
# Measured on half of a 10 x 8 x 6 cm box (2048 points) against whole boxes: the same box resampled,
# CD_k 1.7e-5 m² (score 0.92); faces 5 mm further out, 4.8e-5 (0.79); 15 mm out, 1.5e-4 (0.46); a
# 5 cm cube, 3.6e-4 (0.16).
DEFAULT_PARTIAL_TEMPERATURE_PER_M2 = 5000.0


def finger_directions(
    k: int = 5,
    from_above: bool = False,
    elevation_rad: float = 0.0,
    azimuth_offset_rad: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit travel directions [k, 3] of k fingers closing on the origin.

    The horizontal fingers start at azimuths azimuth_offset + 2πj/k' around the object (k' of them)
    and, when `elevation_rad` > 0, that far above the horizontal plane, moving down and inward.
    With `from_above`, the last finger comes straight down (travel direction −z) and k' = k − 1.
    k = 4, offset 0 gives fingers starting at +x, +y, −x, −y (travel −x, −y, +x, +y).
    The paper used 5 horizontal fingers.
    """
    num_horizontal = k - 1 if from_above else k
    if num_horizontal < 1:
        raise ValueError(f"need at least one horizontal finger, got k={k}, from_above={from_above}")
    azimuths = azimuth_offset_rad + 2 * math.pi * torch.arange(num_horizontal, dtype=torch.float64) / num_horizontal
    start_directions = torch.stack(
        [
            azimuths.cos() * math.cos(elevation_rad),
            azimuths.sin() * math.cos(elevation_rad),
            torch.full_like(azimuths, math.sin(elevation_rad)),
        ],
        dim=1,
    )
    directions = -start_directions
    if from_above:
        directions = torch.cat([directions, torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)])
    return directions.to(dtype=dtype, device=device)


def grasp_contacts(
    clouds: torch.Tensor,
    directions: torch.Tensor,
    origin: torch.Tensor | None = None,
    finger_radius_m: float = DEFAULT_FINGER_RADIUS_M,
    anchors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each finger first touches each cloud.

    clouds [B, N, 3]; directions [k, 3] travel directions; origin [3] or [B, 3] (default: the frame
    origin, where `datasets` centres objects). Finger j moves on the line through the origin or, with
    `anchors` [k, 3], through anchors[j]. Returns contacts [B, k, 3] on the fingers' lines (NaN for a
    finger that touched nothing) and valid [B, k] bool.
    """
    if clouds.dim() != 3 or clouds.shape[2] != 3:
        raise ValueError(f"expected clouds [B, N, 3], got {tuple(clouds.shape)}")
    directions = directions.to(clouds)
    directions = directions / directions.norm(dim=1, keepdim=True)
    origin = (clouds.new_zeros(3) if origin is None else origin.to(clouds)).reshape(-1, 1, 3)
    relative = clouds - origin  # [B, N, 3]
    along = relative @ directions.T  # [B, N, k]: position along each finger's travel
    distance_squared = relative.square().sum(-1, keepdim=True)  # [B, N, 1]: from the line's point
    if anchors is not None:
        # Lines through the anchors (taken relative to the origin, so that float32 keeps its precision
        # on clouds far from the frame's origin): |p - a|² = |p|² - 2 p·a + |a|², along -= a·d.
        if anchors.shape != directions.shape:
            raise ValueError(f"expected anchors like directions [k, 3], got {tuple(anchors.shape)} and {tuple(directions.shape)}")
        anchor_offsets = anchors.to(clouds).unsqueeze(0) - origin  # [B or 1, k, 3]
        along = along - (anchor_offsets * directions).sum(-1).unsqueeze(1)
        distance_squared = (distance_squared - 2 * relative @ anchor_offsets.transpose(1, 2)
                            + anchor_offsets.square().sum(-1).unsqueeze(1))
        origin = origin + anchor_offsets  # [B or 1, k, 3]: each finger's line point
    off_line_squared = distance_squared - along.square()
    touchable = off_line_squared < finger_radius_m**2
    # The first point met is the one furthest back along the travel direction.
    first_along = torch.where(touchable, along, torch.full_like(along, math.inf))
    stop_along = first_along.amin(dim=1)  # [B, k]
    valid = touchable.any(dim=1)
    contacts = origin + stop_along.unsqueeze(-1) * directions
    return torch.where(valid.unsqueeze(-1), contacts, torch.full_like(contacts, math.nan)), valid


def grasp_score(
    contacts: torch.Tensor,
    valid: torch.Tensor,
    observed: torch.Tensor,
    length_scale_m: float = DEFAULT_LENGTH_SCALE_M,
) -> torch.Tensor:
    """max(1 − mean_j e_j / s, 0) -> [B] in [0, 1] (e_j as in the module docstring).

    contacts [B, k, 3], valid [B, k]; observed [k, 3] (or [B, k, 3]) with NaN rows for fingers that
    touched nothing.
    """
    observed = observed.to(contacts)
    observed_valid = observed.isfinite().all(dim=-1)
    errors = (contacts - observed).norm(dim=-1)
    errors = torch.where(valid & observed_valid, errors, torch.zeros_like(errors))
    errors = torch.where(valid != observed_valid, torch.full_like(errors, length_scale_m), errors)
    return (1 - errors.mean(dim=-1) / length_scale_m).clamp_min(0)


@dataclass(frozen=True)
class HyperplaneCut:
    """Partial clouds as masks over full clouds: point i of cloud b is kept iff kept[b, i].

    Kept points satisfy (p − centre_b) · normals_b ≥ offsets_m_b. A fixed-size mask (rather than
    ragged point lists) keeps the batch a tensor; `partial(b)` gives one cloud's kept points.
    """

    clouds: torch.Tensor  # [B, N, 3]
    kept: torch.Tensor  # [B, N] bool
    normals: torch.Tensor  # [B, 3] unit
    offsets_m: torch.Tensor  # [B]

    def partial(self, index: int) -> torch.Tensor:
        return self.clouds[index][self.kept[index]]


def random_hyperplane_cut(
    clouds: torch.Tensor,
    generator: torch.Generator | None = None,
    max_offset_fraction: float = 0.2,
) -> HyperplaneCut:
    """Cut each cloud [B, N, 3] by a random plane near its centre and keep one side.

    Normal uniform on the sphere; the plane passes through the cloud's bounding-box centre shifted
    along the normal by up to `max_offset_fraction` of the cloud's half-extent along the normal, so
    the kept part ranges from a bit less to a bit more than half the object.
    """
    batch_size = clouds.shape[0]
    normals = torch.randn(batch_size, 3, generator=generator, dtype=clouds.dtype, device=clouds.device)
    normals = normals / normals.norm(dim=1, keepdim=True)
    centres = (clouds.amin(dim=1) + clouds.amax(dim=1)) / 2
    heights = ((clouds - centres.unsqueeze(1)) * normals.unsqueeze(1)).sum(-1)  # [B, N]
    half_extents = (heights.amax(dim=1) - heights.amin(dim=1)) / 2
    fractions = 2 * torch.rand(batch_size, generator=generator, dtype=clouds.dtype, device=clouds.device) - 1
    offsets_m = fractions * max_offset_fraction * half_extents
    return HyperplaneCut(clouds, heights >= offsets_m.unsqueeze(1), normals, offsets_m)


# A mean CD_k this close to the cap: every observed point's term is capped (the tolerance is for float
# rounding of their mean; one observed point of the at most 1,024 scored that lies on a sample lowers it by 1e-3).
CAPPED_SHARE = 1.0 - 1e-5


def partial_cloud_score(
    observed_partial: torch.Tensor,
    samples: torch.Tensor,
    temperature: float = DEFAULT_PARTIAL_TEMPERATURE_PER_M2,
    k: int = 5,
    max_distance_m: float | None = None,
) -> torch.Tensor:
    """exp(−τ · CD_k(observed_partial [M, 3], samples [B, N, 3])) -> [B] in [0, 1]; τ in 1/m²; each observed
    point's term capped at max_distance_m² when given (see knn_chamfer), and then 0 for a sample that no
    observed point comes within max_distance_m of: it explains none of the observation, as a grasp that
    misses (the capped terms alone leave exp(−τ · max²) > 0, and "nothing fits" could never be said)."""
    distances = knn_chamfer(observed_partial, samples, k, max_distance_m=max_distance_m)
    scores = torch.exp(-temperature * distances)
    if max_distance_m is None:
        return scores
    return torch.where(distances < CAPPED_SHARE * max_distance_m ** 2, scores, torch.zeros_like(scores))


class GraspDomain:
    """Scores shape samples [B, N, 3] against observed grasp contacts (the `Domain` protocol of `mace.py`).

    observed_contacts [k, 3] in the samples' frame, NaN rows for fingers that touched nothing;
    directions [k, 3] the fingers' travel directions; origin [3] the point the fingers close on;
    anchors [k, 3] (optional) a point of each finger's line instead of the origin (see `grasp_contacts`).
    """

    def __init__(
        self,
        observed_contacts: torch.Tensor,
        directions: torch.Tensor,
        origin: torch.Tensor | None = None,
        finger_radius_m: float = DEFAULT_FINGER_RADIUS_M,
        length_scale_m: float = DEFAULT_LENGTH_SCALE_M,
        anchors: torch.Tensor | None = None,
    ):
        if observed_contacts.shape != directions.shape or directions.dim() != 2 or directions.shape[1] != 3:
            raise ValueError(
                f"expected observed contacts and directions [k, 3], got {tuple(observed_contacts.shape)} and {tuple(directions.shape)}"
            )
        self.observed_contacts = observed_contacts
        self.directions = directions
        self.origin = origin
        self.finger_radius_m = finger_radius_m
        self.length_scale_m = length_scale_m
        self.anchors = anchors

    @staticmethod
    def from_ground_truth(
        cloud: torch.Tensor,
        directions: torch.Tensor,
        origin: torch.Tensor | None = None,
        finger_radius_m: float = DEFAULT_FINGER_RADIUS_M,
        length_scale_m: float = DEFAULT_LENGTH_SCALE_M,
    ) -> "GraspDomain":
        """The domain whose observation is the grasp of a known object cloud [N, 3] (tests, benchmarks)."""
        contacts, _ = grasp_contacts(cloud.unsqueeze(0), directions, origin, finger_radius_m)
        return GraspDomain(contacts[0], directions, origin, finger_radius_m, length_scale_m)

    def simulate(self, clouds: torch.Tensor) -> torch.Tensor:
        """Contacts [B, k, 3] of the fingers on each sample, NaN where a finger touched nothing."""
        contacts, _ = grasp_contacts(clouds, self.directions, self.origin, self.finger_radius_m, self.anchors)
        return contacts

    def score(self, clouds: torch.Tensor) -> torch.Tensor:
        contacts, valid = grasp_contacts(clouds, self.directions, self.origin, self.finger_radius_m, self.anchors)
        return grasp_score(contacts, valid, self.observed_contacts, self.length_scale_m)


class PartialCloudDomain:
    """Scores shape samples [B, N, 3] against an observed partial cloud [M, 3] (the `Domain` protocol)."""

    def __init__(
        self,
        observed_partial: torch.Tensor,
        temperature: float = DEFAULT_PARTIAL_TEMPERATURE_PER_M2,
        k: int = 5,
        max_distance_m: float | None = None,
    ):
        if observed_partial.dim() != 2 or observed_partial.shape[1] != 3 or observed_partial.shape[0] == 0:
            raise ValueError(f"expected a non-empty observed partial cloud [M, 3], got {tuple(observed_partial.shape)}")
        self.observed_partial = observed_partial
        self.temperature = temperature
        self.k = k
        self.max_distance_m = max_distance_m

    def score(self, clouds: torch.Tensor) -> torch.Tensor:
        return partial_cloud_score(self.observed_partial, clouds, self.temperature, self.k, self.max_distance_m)
