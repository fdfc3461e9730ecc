"""InferShape without ROS: full-shape hypotheses from grasp contacts and/or a partial cloud, by MACE-VAE.

One request: build the observation's domain (contacts -> `GraspDomain`, partial cloud ->
`PartialCloudDomain`, both -> the product of their scores), copy the trained latent prior θ = {μ_z, σ_z},
tune the copy with MACE until the iteration budget or the timeout, then return ranked shape samples
in metres around the request's object origin. The shared VAE is never modified.

Frames and conventions (the request's frame is the robot base frame, z up):
- shapes are generated the way the training objects were made: the object's bounding-box centre at
  `object_origin`, resting direction +z, any yaw;
- the fingers close toward `object_origin` along the configured travel directions
  (`finger_directions`, default: `simulators.finger_directions(num_fingers, ...)` with the Panda
  hand's 2 fingers closing toward each other along the base y axis, its closing axis when it points
  down at the package's default orientation, quaternion (x, y, z, w) = (1, 0, 0, 0); the paper's 5
  horizontal fingers are num_fingers 5, finger_azimuth_offset_rad 0);
- a contact that comes with its finger's travel direction (`ShapeRequest.contact_directions`, a
  gripper's own report: any number of fingers and grasps) is simulated by a finger moving along that
  direction on the line through the contact itself; it needs no finger set and no angle to the
  origin (an off-centre or side grasp is fine). `object_origin` is then the estimated bounding-box
  centre of the object (e.g. the middle of a grasp's fingertips); the samples are placed there;
- contacts without a direction are matched to fingers (`finger_matching`), then simulated like those
  with one: the matched finger moves along its configured direction on the line through the contact
  (for contacts made by such a finger closing toward `object_origin` that is the same line; for a
  grasp above or beside the origin, the line its finger really took):
  "direction" (default): each contact belongs to the finger that starts on its side of the object,
  i.e. the finger whose start direction (−travel) is closest in angle to (contact − origin), both taken
  in the directions the finger set spans (for the Panda hand's 2 fingers, only the offset along y: a
  top-down grasp's fingertips may be at any height and off the origin along x; and fingers on one line
  take their contacts' middle for the origin: each tip lies on its side of the other); contacts are assigned
  one-to-one (Hungarian assignment), so the request may list them in any order; a contact with no
  offset in those directions, or more than `max_contact_angle_deg` away from its finger, is refused.
  Fingers with no contact in the request are left out of the score (an unreported finger may simply
  not have been sensed; it is not taken as having passed the object).
  "ordered": contact i belongs to finger i (the request may give fewer contacts than fingers).

Config keys (all optional; `DEFAULT_SHAPE_CONFIG` has the defaults):
  weights_path            safetensors file of the VAE ("" = the shipped one for the engine's device: the
                          2048-point shape_vae_2048.safetensors on a GPU, the 512-point shape_vae.safetensors
                          on a CPU)
  num_samples             samples returned when a request says 0
  tuning_iterations       MACE iterations when a request says -1 (0 = no tuning)
  timeout_s               wall-clock budget when a request says 0
  grasp_preset            mace.PAPER_PRESETS name for contacts alone (paper: grasp_shape_vae)
  partial_cloud_preset    preset for observations with a partial cloud, alone or with contacts (paper:
                          partial_cloud_vae; the dense cloud says most, see partial_cloud_diversity_weight)
  tuning_learning_rate, tuning_samples_per_iteration, tuning_grad_steps, tuning_elite_quantile
                          override the preset's Adam lr, N, M and q (0 = the preset's value); the
                          default lr is CPU_BUDGET_LEARNING_RATE, for budgets of tens of iterations
  result_samples          "posterior": fresh samples of the tuned prior, ranked (diverse; the paper's
                          posterior) or "best": the highest-scoring samples seen while tuning
  result_oversampling     "posterior" returns the best num_samples of this many times num_samples
                          draws of the tuned prior (mace.sample_best_of; 1 = plain draws)
  result_diversity_weight with oversampling, the kept draws are chosen by score plus this weight times
                          their Chamfer distance to those already kept (chamfer.diverse_selection;
                          0 = by score alone), for contacts alone
  partial_cloud_diversity_weight
                          the same for observations with a partial cloud, alone or with contacts: a dense
                          partial cloud leaves little shape to choose, and spreading the answer only moves it
                          away from the hidden shape (BENCHMARKS.md), so by default 0 (with contacts too:
                          the combined score is small, and the contacts' weight widened the answer past the
                          prior's own spread)
  num_fingers, finger_elevation_rad, finger_azimuth_offset_rad, finger_from_above
                          the default finger set (simulators.finger_directions)
  finger_directions       explicit travel directions [[x, y, z], ...] or flat [x1, y1, z1, x2, ...]
                          (overrides the four keys above; empty = use them)
  finger_matching         "direction" or "ordered" (see above)
  max_contact_angle_deg   largest angle between a contact and its finger's side
  max_contacts            most contacts a request may carry (with or without directions)
  min_std_ratio           tuning keeps σ_z >= this times the prior's σ_z (0 = unbounded)
  max_shape_extent_m      a shape whose extent along x, y or z exceeds this scores 0 (0 = no limit): the prior
                          knows nothing larger than its training objects (`datasets.MAX_SIZE_M`)
  prior_anchor_weight     λ of λ · KL(p(u; θ) || p(u; θ_0)) in the tuning loss (0 = none; see
                          `MaceVAEPrior.anchor_to_prior`)
  finger_radius_m         finger pad radius; 0 = matched to the model's point density (see
                          `density_matched_finger_radius`)
  length_scale_m          grasp score length scale s: max(1 − mean error / s, 0)
  temperature_per_m2      partial-cloud score temperature τ: exp(−τ CD_k)
  knn_k                   k of the k-nearest Chamfer distance
  partial_outlier_distance_m
                          each observed point's term of that distance counts at most this far (m): a
                          depth camera's stray points must not pull the shapes toward them
  max_scored_partial_points
                          a partial cloud is scored on at most this many of its points (a fixed random
                          subset): a dense cloud's cost would otherwise leave no time for tuning
  min_partial_points      fewest points a partial cloud may have at least 1 mm apart
  max_num_samples         largest num_samples a request may ask for
  diversity_max_samples   the diversity is measured over the first (best) this many samples (its
                          cost grows with the square of the count; the paper's Fig. 1 uses 49)
  tuning_time_fraction    share of the time left after the final sampling's estimated cost that is
                          given to tuning (the final sampling's cost is measured on a first chunk)

Never worse than the prior: every MACE iteration's N samples score its θ (the first, θ_0 = the
prior); the final samples come from the best-scoring θ seen, and if they still score below the same
seed's prior samples on the request's observation (sampling noise), those prior samples are returned.

Deadline: every stage (tuning, final sampling and scoring, diverse selection, diversity) counts against
timeout_s and stops at the deadline in chunks (SAMPLE_CHUNK samples, DIVERSITY_PAIR_CHUNK Chamfer pairs;
the diverse selection also at SELECTION_TIME_SHARE of the timeout, the rest of its choice then by score); a
request that runs out of time returns the best answer so far: fewer samples than asked (the first
chunk always), the diversity over fewer of the best samples, and says so in its message.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mace_ros.core.mace import PAPER_PRESETS, MacePreset, TuneResult, mace_tune, sample_and_score, sample_best_of
from mace_ros.core.shape.chamfer import chamfer_distance, diverse_selection
from mace_ros.core.shape.simulators import (
    DEFAULT_FINGER_RADIUS_M,
    DEFAULT_LENGTH_SCALE_M,
    DEFAULT_PARTIAL_TEMPERATURE_PER_M2,
    GraspDomain,
    PartialCloudDomain,
    finger_directions,
)
from mace_ros.core.shape.vae import MaceVAEPrior, default_vae_weights, load_shape_vae

# The simulator's finger radius was chosen for 2048-point clouds (simulators.DEFAULT_FINGER_RADIUS_M).
REFERENCE_POINTS_FOR_FINGER_RADIUS = 2048
# The paper's grasp preset tunes with lr 2e-4 for 2500 iterations (~25 s on a GPU). A request budget
# of ~10 s buys ~50 iterations on a 2-core CPU; measured on the shipped VAE (4 objects, 50 iterations):
# lr 2e-4 raises the mean score from ~0.45 to ~0.71, 1e-3 to ~0.88, 3e-3 to ~0.85 but unstably.
CPU_BUDGET_LEARNING_RATE = 1e-3
# Every stage works in chunks and checks the clock between them, so that no request size overruns
# its deadline by more than about one chunk (~10-30 ms on one CPU thread). A chunk of samples holds
# at most SAMPLE_CHUNK samples and, as a sample's score against a partial cloud costs in proportion
# to its points (~13 ms for 4096 points, ~0.1 ms for a grasp), at most CHUNK_PARTIAL_POINTS partial-cloud
# points times samples. Chunks depend on the request and the device only, so that a seed gives the same
# samples whatever the machine's speed. On a GPU a chunk costs mostly kernel launches, whatever its size:
# its chunks are GPU_CHUNK_FACTOR times larger (the paper's N = 256 in one chunk). The diversity's
# Chamfer pairs go at most DIVERSITY_PAIR_CHUNK at a time (~0.8 ms each at 512 points).
SAMPLE_CHUNK = 128
CHUNK_PARTIAL_POINTS = 1 << 13
GPU_CHUNK_FACTOR = 8
DIVERSITY_PAIR_CHUNK = 64
# The final sampling is planned from the measured cost of a first chunk times this safety factor;
# the diversity (secondary: it only describes the answer) gets at most this share of the timeout.
FINAL_SAMPLING_SAFETY = 1.5
DIVERSITY_TIME_SHARE = 0.1
# The greedy diverse selection costs num_samples passes over oversampling x num_samples draws (1000
# samples: ~16,000 x 1000 distances, minutes on a CPU): it gets at most this share of the timeout and
# leaves the rest of the answer in score order, so that a large num_samples is answered early and whole.
SELECTION_TIME_SHARE = 0.1
# A partial cloud needs min_partial_points points at least this far apart: one point repeated was accepted,
# and fit by more shapes than a real view, it scored higher.
SEPARATED_POINT_SPACING_M = 0.001
# Prior draws whose farthest point measures the prior's reach (`ShapeEngine.prior_reach_m`; ~16 ms at start-up).
PRIOR_REACH_SAMPLES = 256

# The default finger set, for contacts without a direction: the Panda hand pointing down, its two
# fingers starting at +y and -y and closing toward each other.
PANDA_HAND_NUM_FINGERS = 2
PANDA_HAND_AZIMUTH_OFFSET_RAD = math.pi / 2

DEFAULT_SHAPE_CONFIG: dict[str, Any] = {
    "weights_path": "",
    "num_samples": 16,
    "tuning_iterations": 100,
    "timeout_s": 10.0,
    "grasp_preset": "grasp_shape_vae",
    "partial_cloud_preset": "partial_cloud_vae",
    "tuning_learning_rate": CPU_BUDGET_LEARNING_RATE,
    "tuning_samples_per_iteration": 0,
    "tuning_grad_steps": 0,
    "tuning_elite_quantile": 0.0,
    "result_samples": "posterior",
    # The best of 16 x num_samples draws by score and diversity (contacts) or by score (a partial cloud
    # alone): consistent with the observation like the CVAE's samples and several times as diverse
    # (BENCHMARKS.md, issue 9 item 2); with min_std_ratio 1 tuning never narrows the prior's spread.
    "result_oversampling": 16,
    "result_diversity_weight": 0.2,
    "partial_cloud_diversity_weight": 0.0,
    "num_fingers": PANDA_HAND_NUM_FINGERS,
    "finger_elevation_rad": 0.0,
    "finger_azimuth_offset_rad": PANDA_HAND_AZIMUTH_OFFSET_RAD,
    "finger_from_above": False,
    "finger_directions": [],
    "finger_matching": "direction",
    "max_contact_angle_deg": 45.0,
    "max_contacts": 64,
    "min_std_ratio": 1.0,
    # The elites pull μ_z against 0.2 prior pseudo-observations: without it μ_z drifted where the score is
    # flat, to shapes beyond the training set (BENCHMARKS.md, "Tuning anchored to the prior").
    "prior_anchor_weight": 0.2,
    # 1.1 x the training objects' largest extent (datasets.MAX_SIZE_M, 0.25 m): 0.6 % of the reduced model's
    # plain prior draws exceed it, 0.2 % of the full one's (the decoder's spread); tuning drew 30-39 cm shapes
    # for a 4 cm cube grasped from its sides.
    "max_shape_extent_m": 0.275,
    "finger_radius_m": 0.0,
    "length_scale_m": DEFAULT_LENGTH_SCALE_M,
    "temperature_per_m2": DEFAULT_PARTIAL_TEMPERATURE_PER_M2,
    "knn_k": 5,
    "partial_outlier_distance_m": 0.05,
    "max_scored_partial_points": 1024,
    "min_partial_points": 10,
    "max_num_samples": 1000,
    "diversity_max_samples": 49,
    "tuning_time_fraction": 0.9,
}


def density_matched_finger_radius(num_points: int) -> float:
    """A finger radius that covers as many cloud points as the simulator's default does at 2048 points.

    Clouds with fewer points have wider gaps; with the 2048-point radius, fingers would slip through
    a sparse sample's gaps and score a right shape as a miss. Radius ∝ 1/√(point density).
    """
    return DEFAULT_FINGER_RADIUS_M * math.sqrt(REFERENCE_POINTS_FOR_FINGER_RADIUS / num_points)


@dataclass(frozen=True)
class ShapeRequest:
    contacts: np.ndarray | None  # [k, 3] metres, request (base) frame; None = not used
    partial_cloud: np.ndarray | None  # [P, 3] metres; None = not used
    object_origin: np.ndarray  # [3] where the fingers close; shapes are returned around it
    num_samples: int = 0  # 0 = configured default
    tuning_iterations: int = -1  # 0 = no tuning (prior samples), -1 = configured default
    timeout_s: float = 0.0  # 0 = configured default
    random_seed: int = 0
    # [k, 3] each contact's finger travel direction (toward the object), parallel to `contacts`; a zero
    # row (or None for all) = no direction: that contact is matched to the configured finger set.
    contact_directions: np.ndarray | None = None


@dataclass
class ShapeResult:
    success: bool
    message: str
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), dtype=np.float32))  # [n, P, 3] metres, ranked
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [n], descending
    mean_score: float = 0.0
    diversity: float = 0.0  # mean pairwise Chamfer distance of the (first diversity_max_samples) samples, m²
    tuning_iterations_done: int = 0
    tuning_time_s: float = 0.0
    elapsed_s: float = 0.0
    # [k]: the diversity of the best 1, 2, ..., k samples (k: those it was measured over), for `first`.
    diversity_by_count: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def first(self, count: int) -> ShapeResult:
        """This result cut to its best `count` samples (at least one), its aggregates (mean score,
        diversity, success) describing those, the message saying so (e.g. what a reply could carry)."""
        count = max(1, count)
        if count >= self.scores.shape[0]:
            return self
        scores = self.scores[:count]
        measured = min(count, self.diversity_by_count.shape[0])
        return dataclasses.replace(
            self, samples=self.samples[:count], scores=scores, mean_score=float(scores.mean()), success=bool(scores.max() > 0),
            diversity=float(self.diversity_by_count[measured - 1]) if measured else 0.0,
            message=f"{self.message}; {count} of {self.scores.shape[0]} samples returned (timeout), "
                    f"mean score {float(scores.mean()):.3f} and diversity over those")


@dataclass(frozen=True)
class Observation:
    """A validated request's observation (float64 arrays, request frame)."""

    contacts: np.ndarray | None  # [k, 3]
    fingers: np.ndarray | None  # [k] index of each contact's finger in the configured set, -1 = its own direction
    partial_cloud: np.ndarray | None  # [P, 3]
    origin: np.ndarray  # [3]
    directions: np.ndarray | None = None  # [k, 3] unit travel direction of each contact's finger (its line passes through it)


class ProductDomain:
    """Score = product of the scores of several observations of the same object."""

    def __init__(self, domains: Sequence[Any]):
        self.domains = list(domains)

    def score(self, samples: torch.Tensor) -> torch.Tensor:
        scores = self.domains[0].score(samples)
        for domain in self.domains[1:]:
            scores = scores * domain.score(samples)
        return scores


def separated_point_count(points: np.ndarray, spacing_m: float, enough: int) -> int:
    """How many of points [P, 3] are at least `spacing_m` apart from one another, counted greedily (each next
    point kept is the first of those that far from every one kept) until `enough`: at most `enough` passes over
    the cloud, whatever its place (cells of a grid counted a point's noise differently half a cell away)."""
    kept, candidates = 0, points
    while kept < enough and candidates.shape[0]:
        kept += 1
        candidates = candidates[np.linalg.norm(candidates - candidates[0], axis=1) >= spacing_m]
    return kept


class WithinExtent:
    """A domain's score, 0 for shapes whose extent along x, y or z exceeds `limit_m`: where an observation
    leaves a size open (the height of an object grasped from its sides), tuning drifted to shapes larger than
    any the prior was trained on, which the score alone cannot rule out."""

    def __init__(self, domain: Any, limit_m: float):
        self.domain = domain
        self.limit_m = limit_m

    def score(self, samples: torch.Tensor) -> torch.Tensor:
        extents = samples.amax(dim=1) - samples.amin(dim=1)  # [B, 3]
        return self.domain.score(samples) * (extents.amax(dim=-1) <= self.limit_m).to(samples.dtype)


def finger_span(travel_directions: np.ndarray) -> np.ndarray:
    """An orthonormal basis [r, 3] of the directions the fingers [F, 3] travel in (r = 1 for two opposed
    fingers, 2 for fingers in a plane, 3 otherwise)."""
    _, singular_values, right = np.linalg.svd(travel_directions, full_matrices=False)
    return right[: int(np.count_nonzero(singular_values > 1e-9 * singular_values[0]))]


def match_contacts_to_fingers(
    contacts: np.ndarray, origin: np.ndarray, travel_directions: np.ndarray, max_angle_deg: float
) -> np.ndarray:
    """Finger index [k] of each contact [k, 3]: one-to-one, by the angle between (contact − origin)
    and each finger's start direction (−travel), in the directions the fingers span: a finger's contact
    may lie anywhere along the directions it does not move in (two opposed fingers' tips at any height).
    Fingers that close toward each other on one line (a parallel-jaw gripper) have their contacts' middle,
    not the origin, as reference: each fingertip lies on its side of the other, while the part of an
    object the grasp met may lie off its centre (an L-shaped part's arm).
    ValueError if a contact has no offset from the reference in those directions, or is further than
    `max_angle_deg` from its finger; for a parallel-jaw pair, if the line between its contacts is further
    than that from the closing axis."""
    span = finger_span(travel_directions)
    along = travel_directions @ span[0]
    opposed = span.shape[0] == 1 and along.min() < 0.0 < along.max()  # fingers closing toward each other on one line
    reference = contacts.mean(axis=0) if opposed and contacts.shape[0] > 1 else origin
    offsets = (contacts - reference) @ span.T @ span
    distances = np.linalg.norm(offsets, axis=1)
    if np.any(distances < 1e-6):
        worst = int(np.argmin(distances))
        raise ValueError(
            f"contact {worst} lies level with the object origin (or, for opposed fingers, with the other contacts) in every "
            "direction the configured fingers travel, so its finger cannot be told from its side (give its direction in "
            "contact_directions)")
    if opposed and contacts.shape[0] == 2:
        # The fingertips of a parallel-jaw grasp face each other along its closing axis: a pair far apart across
        # it is a grasp along another axis (or another hand), which matched by side alone read as a narrow one.
        separation = contacts[0] - contacts[1]
        angle_deg = float(np.degrees(np.arccos(min(abs(float(separation @ span[0])) / float(np.linalg.norm(separation)), 1.0))))
        if angle_deg > max_angle_deg:
            raise ValueError(
                f"contacts 0 and 1 are {np.linalg.norm(separation) * 100:.1f} cm apart at {angle_deg:.0f}° to the configured "
                f"fingers' closing axis (at most {max_angle_deg:.0f}°): a parallel-jaw grasp's fingertips face each other "
                "along it (for a grasp along another axis, give contact_directions)")
    start_directions = -travel_directions / np.linalg.norm(travel_directions, axis=1, keepdims=True)
    cosines = (offsets / distances[:, None]) @ start_directions.T  # [k, fingers]
    contact_index, finger_index = linear_sum_assignment(-cosines)
    fingers = np.empty(contacts.shape[0], dtype=np.int64)
    fingers[contact_index] = finger_index
    angles_deg = np.degrees(np.arccos(np.clip(cosines[np.arange(contacts.shape[0]), fingers], -1.0, 1.0)))
    worst = int(np.argmax(angles_deg))
    if angles_deg[worst] > max_angle_deg:
        raise ValueError(
            f"contact {worst} is {angles_deg[worst]:.0f}° away from the side of its best-matching finger "
            f"{fingers[worst]} (at most {max_angle_deg:.0f}°): it does not fit the configured finger directions"
        )
    return fingers


class BestTheta:
    """The best-scoring θ seen while tuning, by its iteration's mean score (θ_0, the prior, by the first).

    Kept on θ's device: `update` compares and selects there, without reading anything back to the
    host, so a GPU's tuning loop is not synchronised by it. `iteration` and `mean` are 0-d tensors.
    """

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.parameters = list(parameters)
        self.values = [parameter.detach().clone() for parameter in self.parameters]
        reference = self.parameters[0]
        self.mean = torch.full((), -math.inf, dtype=reference.dtype, device=reference.device)
        self.iteration = torch.zeros((), dtype=torch.long, device=reference.device)

    def update(self, iteration: int, scores: torch.Tensor) -> None:
        """Keep the current θ if its iteration's scores have a higher mean than the best so far."""
        mean = scores.mean().to(self.mean.dtype)
        better = mean > self.mean
        self.mean = torch.where(better, mean, self.mean)
        self.iteration.masked_fill_(better, iteration)
        with torch.no_grad():
            for value, parameter in zip(self.values, self.parameters):
                value.copy_(torch.where(better, parameter, value))

    def restore(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Set θ, or `parameters` (a copy's θ), to the best kept (θ as it was at construction if no update came)."""
        with torch.no_grad():
            for parameter, value in zip(self.parameters if parameters is None else parameters, self.values):
                parameter.copy_(value)


class ShapeEngine:
    """Holds the trained VAE (frozen, shared); `infer` serves one request with its own tuned copy of θ."""

    def __init__(self, config: dict[str, Any] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        unknown = set(config or {}) - set(DEFAULT_SHAPE_CONFIG)
        if unknown:
            raise ValueError(f"unknown shape engine config keys {sorted(unknown)}; known: {sorted(DEFAULT_SHAPE_CONFIG)}")
        self.config = {**DEFAULT_SHAPE_CONFIG, **(config or {})}
        for key in ("grasp_preset", "partial_cloud_preset"):
            if self.config[key] not in PAPER_PRESETS:
                raise ValueError(f"{key} {self.config[key]!r} is not one of {sorted(PAPER_PRESETS)}")
        if int(self.config["result_oversampling"]) < 1:
            raise ValueError(f"result_oversampling must be at least 1, got {self.config['result_oversampling']}")
        for key in ("result_diversity_weight", "partial_cloud_diversity_weight"):
            if not 0.0 <= float(self.config[key]) < math.inf:
                raise ValueError(f"{key} must be finite and >= 0, got {self.config[key]}")
        if self.config["result_samples"] not in ("posterior", "best"):
            raise ValueError(f"result_samples must be 'posterior' or 'best', got {self.config['result_samples']!r}")
        if self.config["finger_matching"] not in ("direction", "ordered"):
            raise ValueError(f"finger_matching must be 'direction' or 'ordered', got {self.config['finger_matching']!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = load_shape_vae(Path(self.config["weights_path"] or default_vae_weights(self.device)), self.device, dtype)
        if len(self.config["finger_directions"]):
            # Rows [[x, y, z], ...] or, as a ROS double-array parameter holds them, flat [x1, y1, z1, x2, ...].
            directions = torch.as_tensor(self.config["finger_directions"], dtype=torch.float64).reshape(-1)
            if directions.numel() % 3 or not torch.all(directions.reshape(-1, 3).norm(dim=1) > 0):
                raise ValueError(f"finger_directions must be non-zero [x, y, z] triples, got {self.config['finger_directions']}")
            directions = directions.reshape(-1, 3)
        else:
            directions = finger_directions(
                int(self.config["num_fingers"]),
                from_above=bool(self.config["finger_from_above"]),
                elevation_rad=float(self.config["finger_elevation_rad"]),
                azimuth_offset_rad=float(self.config["finger_azimuth_offset_rad"]),
                dtype=torch.float64,
            )
        self.finger_directions = (directions / directions.norm(dim=1, keepdim=True)).numpy()
        self.finger_radius_m = float(self.config["finger_radius_m"]) or density_matched_finger_radius(self.vae.num_points)
        # How far the prior's shapes reach from their centre (the farthest point of PRIOR_REACH_SAMPLES draws), to
        # tell a request whose contacts no shape placed at object_origin can touch why nothing fits.
        with torch.no_grad():
            draws = MaceVAEPrior(self.vae).sample(PRIOR_REACH_SAMPLES, torch.Generator(device=self.device).manual_seed(0))
        self.prior_reach_m = float(draws.norm(dim=-1).max())
        # The first torch.optim.Adam of a process imports torch._dynamo (seconds on a small CPU): pay it
        # here rather than inside the first request's timeout.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        # The cost of one diversity pair, to plan the time a request keeps for its diversity.
        clouds = torch.rand(2, DIVERSITY_PAIR_CHUNK, self.vae.num_points, 3, device=self.device, dtype=dtype)
        with torch.no_grad():
            chamfer_distance(clouds[0], clouds[1])  # warm-up
            measured = time.monotonic()
            chamfer_distance(clouds[0], clouds[1])
        self._seconds_per_pair = (time.monotonic() - measured) / DIVERSITY_PAIR_CHUNK
        # The cost of one candidate in a pass of the diverse selection (2 of them: one pass), to plan its time.
        candidates = clouds.reshape(-1, self.vae.num_points, 3)
        measured = time.monotonic()
        diverse_selection(candidates, torch.rand(candidates.shape[0], device=self.device, dtype=dtype), 2, 1.0)
        self._seconds_per_selection_candidate = (time.monotonic() - measured) / candidates.shape[0]

    @property
    def num_points(self) -> int:
        return self.vae.num_points

    def validate(self, request: ShapeRequest) -> Observation:
        """The request's checked observation; ValueError with the reason otherwise."""
        origin = np.asarray(request.object_origin, dtype=np.float64)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise ValueError(f"object_origin must be 3 finite numbers, got {request.object_origin!r}")
        contacts = None
        if request.contacts is not None:
            contacts = np.asarray(request.contacts, dtype=np.float64)
            if contacts.ndim != 2 or contacts.shape[1] != 3:
                raise ValueError(f"contacts must be [k, 3], got shape {contacts.shape}")
            if contacts.shape[0] == 0:
                contacts = None
            elif not np.all(np.isfinite(contacts)):
                raise ValueError("contacts contain NaN or infinite coordinates")
            elif contacts.shape[0] > int(self.config["max_contacts"]):
                raise ValueError(f"{contacts.shape[0]} contacts, more than {self.config['max_contacts']}")
        given = np.zeros(0 if contacts is None else contacts.shape[0], dtype=bool)
        travel = None
        if request.contact_directions is not None and len(request.contact_directions):
            travel = np.asarray(request.contact_directions, dtype=np.float64)
            if contacts is None:
                raise ValueError("contact_directions without contacts")
            if travel.shape != contacts.shape:
                raise ValueError(
                    f"contact_directions must be one [x, y, z] per contact ({contacts.shape[0]}) or empty, got shape {travel.shape}")
            if not np.all(np.isfinite(travel)):
                raise ValueError("contact_directions contain NaN or infinite values")
            # Any nonzero length is a direction (zero rows mark direction-less contacts); each row is scaled to
            # its largest component before it is normalized, so that neither huge nor tiny lengths over- or underflow.
            largest = np.abs(travel).max(axis=1, keepdims=True)
            given = largest[:, 0] > 0
            travel = np.divide(travel, largest, out=np.zeros_like(travel), where=largest > 0)
            travel = np.divide(travel, np.linalg.norm(travel, axis=1, keepdims=True), out=travel, where=given[:, None])
        if contacts is not None and int((~given).sum()) > self.finger_directions.shape[0]:
            raise ValueError(
                f"{int((~given).sum())} contacts without a direction but only {self.finger_directions.shape[0]} fingers are "
                "configured (give each contact its finger's travel direction in contact_directions)")
        partial = None
        if request.partial_cloud is not None:
            partial = np.asarray(request.partial_cloud, dtype=np.float64)
            if partial.ndim != 2 or partial.shape[1] != 3:
                raise ValueError(f"partial_cloud must be [P, 3], got shape {partial.shape}")
            if not np.all(np.isfinite(partial)):
                raise ValueError("partial_cloud contains NaN or infinite coordinates")
            fewest = int(self.config["min_partial_points"])
            if partial.shape[0] < fewest:
                raise ValueError(f"partial_cloud has {partial.shape[0]} points, fewer than {fewest}")
            separated = separated_point_count(partial, SEPARATED_POINT_SPACING_M, fewest)
            if separated < fewest:
                raise ValueError(
                    f"partial_cloud has {partial.shape[0]} points but only {separated} at least {SEPARATED_POINT_SPACING_M * 1000:g} mm "
                    f"apart, fewer than {fewest}: repeated points observe nothing more")
        if contacts is None and partial is None:
            raise ValueError("no observation: give contacts and/or a partial cloud")
        if not (request.timeout_s >= 0 and math.isfinite(request.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number >= 0 (0 = default), got {request.timeout_s}")
        if request.tuning_iterations < -1:
            raise ValueError(f"tuning_iterations must be -1 (default), 0 (no tuning) or positive, got {request.tuning_iterations}")
        if not 0 <= request.num_samples <= int(self.config["max_num_samples"]):
            raise ValueError(f"num_samples must be in [0, {self.config['max_num_samples']}] (0 = default), got {request.num_samples}")
        fingers = directions = None
        if contacts is not None:
            # Contacts with their own direction need no finger set; the others are matched to it.
            fingers = np.full(contacts.shape[0], -1, dtype=np.int64)
            free = np.flatnonzero(~given)
            if free.size and self.config["finger_matching"] == "direction":
                fingers[free] = match_contacts_to_fingers(
                    contacts[free], origin, self.finger_directions, float(self.config["max_contact_angle_deg"]))
            elif free.size:
                fingers[free] = np.arange(free.size)
            directions = np.where(given[:, None], np.zeros_like(contacts) if travel is None else travel,
                                  self.finger_directions[np.maximum(fingers, 0)])
        return Observation(contacts, fingers, partial, origin, directions)

    def build_domain(self, observation: Observation) -> Any:
        as_tensor = lambda array: torch.as_tensor(array, dtype=self.dtype, device=self.device)  # noqa: E731
        domains: list[Any] = []
        if observation.contacts is not None:
            contacts = as_tensor(observation.contacts)  # each finger's line passes through its contact
            domains.append(
                GraspDomain(
                    contacts, as_tensor(observation.directions),
                    as_tensor(observation.origin), self.finger_radius_m, float(self.config["length_scale_m"]), contacts,
                )
            )
        if observation.partial_cloud is not None:
            partial = observation.partial_cloud
            most = int(self.config["max_scored_partial_points"])
            if partial.shape[0] > most:  # the same subset for the same cloud, whatever the request's seed
                partial = partial[np.sort(np.random.default_rng(0).choice(partial.shape[0], most, replace=False))]
            domains.append(PartialCloudDomain(
                as_tensor(partial), float(self.config["temperature_per_m2"]), int(self.config["knn_k"]),
                float(self.config["partial_outlier_distance_m"]) or None))
        domain = domains[0] if len(domains) == 1 else ProductDomain(domains)
        limit_m = float(self.config["max_shape_extent_m"])
        return WithinExtent(domain, limit_m) if limit_m > 0.0 else domain

    def tuning_preset(self, name: str, iterations: int) -> MacePreset:
        """The named paper preset with the configured overrides and the request's iteration count."""
        preset = PAPER_PRESETS[name]
        config = self.config
        return MacePreset(
            num_samples=int(config["tuning_samples_per_iteration"]) or preset.num_samples,
            grad_steps_per_iteration=int(config["tuning_grad_steps"]) or preset.grad_steps_per_iteration,
            elite_quantile=float(config["tuning_elite_quantile"]) or preset.elite_quantile,
            learning_rate=float(config["tuning_learning_rate"]) or preset.learning_rate,
            iterations=iterations,
        )

    def infer(self, request: ShapeRequest, on_iteration: Callable[[int, torch.Tensor], None] | None = None,
              checkpoint: Callable[[], None] | None = None) -> ShapeResult:
        """`on_iteration(iteration, batch scores)` after each MACE iteration (mace_tune's), `checkpoint()`
        between the chunks of every other stage (drawing, selection, diversity): an exception either
        raises (e.g. to cancel) ends the inference and propagates."""
        started = time.monotonic()
        try:
            observation = self.validate(request)
            domain = self.build_domain(observation)
        except ValueError as error:
            return ShapeResult(False, f"invalid request: {error}", elapsed_s=time.monotonic() - started)
        config = self.config
        num_samples = request.num_samples or int(config["num_samples"])
        iterations = int(config["tuning_iterations"]) if request.tuning_iterations == -1 else request.tuning_iterations
        timeout_s = request.timeout_s or float(config["timeout_s"])
        deadline_at = started + timeout_s
        generator = torch.Generator(device=self.device).manual_seed(int(request.random_seed))
        # A fresh θ per request over the shared frozen network: requests never see each other's tuning.
        prior = MaceVAEPrior(self.vae, torch.as_tensor(observation.origin, dtype=self.dtype, device=self.device))
        # A partial cloud, with contacts or not, is what says most about the shape (see the config keys).
        with_cloud = observation.partial_cloud is not None
        preset_name = config["partial_cloud_preset"] if with_cloud else config["grasp_preset"]
        posterior = iterations <= 0 or config["result_samples"] == "posterior"
        # The final sampling's cost (decoding + scoring grows with num_samples and the partial cloud's
        # size) is measured on a first chunk of prior samples; they are the answer when nothing else fits.
        # (Scored points: a denser cloud is scored on a subset of max_scored_partial_points.)
        partial_points = 0 if observation.partial_cloud is None else min(
            observation.partial_cloud.shape[0], int(config["max_scored_partial_points"]))
        scale = GPU_CHUNK_FACTOR if self.device.type == "cuda" else 1
        chunk = max(1, min(scale * SAMPLE_CHUNK, scale * CHUNK_PARTIAL_POINTS // max(partial_points, 1)))
        probe_started = time.monotonic()
        first_samples, first_scores, _ = sample_and_score(prior, domain, min(num_samples, chunk), generator)
        seconds_per_sample = (time.monotonic() - probe_started) / first_samples.shape[0]
        diversity_count = min(num_samples, int(config["diversity_max_samples"]))
        diversity_reserve_s = min(DIVERSITY_TIME_SHARE * timeout_s, self._seconds_per_pair * diversity_count * (diversity_count - 1) / 2)
        oversampling = int(config["result_oversampling"]) if iterations > 0 else 1
        diversity_weight = float(config["partial_cloud_diversity_weight" if with_cloud else "result_diversity_weight"])
        final_reserve_s = FINAL_SAMPLING_SAFETY * seconds_per_sample * num_samples * oversampling if posterior else 0.0
        selection_reserve_s = 0.0
        if posterior and oversampling > 1 and diversity_weight > 0.0:  # a full selection's passes, or its share
            selection_reserve_s = min(SELECTION_TIME_SHARE * timeout_s, FINAL_SAMPLING_SAFETY * self._seconds_per_selection_candidate
                                      * (num_samples - 1) * num_samples * oversampling)
        tuning: TuneResult | None = None
        tuning_s = float(config["tuning_time_fraction"]) * (
            deadline_at - time.monotonic() - final_reserve_s - selection_reserve_s - diversity_reserve_s)
        # Never worse than the prior: θ_t is scored by its iteration's N samples (θ_0 = the prior by the
        # first), and the final samples come from the best-scoring θ seen, not from the last one.
        best_theta = BestTheta(prior.tunable_parameters())

        def remember_best_theta(iteration: int, scores: torch.Tensor) -> None:
            best_theta.update(iteration, scores)
            if on_iteration is not None:
                on_iteration(iteration, scores)

        if iterations > 0 and tuning_s > 0.0:
            preset = self.tuning_preset(preset_name, iterations)
            prior.bound_std(float(config["min_std_ratio"]))
            prior.anchor_to_prior(float(config["prior_anchor_weight"]))
            tuning = mace_tune(prior, domain, preset, deadline_s=tuning_s, generator=generator, keep_best=num_samples,
                               chunk_size=chunk, on_iteration=remember_best_theta, after_step=prior.project)
            best_theta.restore()
        sampling_deadline_at = deadline_at - min(diversity_reserve_s, max(0.0, deadline_at - time.monotonic()) / 2)
        # The kept samples' selection: by score and diversity, in its share of the timeout (then by score).
        select = None if diversity_weight == 0.0 else lambda drawn, drawn_scores, count: diverse_selection(
            drawn, drawn_scores, count, diversity_weight,
            min(sampling_deadline_at, time.monotonic() + SELECTION_TIME_SHARE * timeout_s), checkpoint)
        # No time to tune (a short timeout, a costly partial cloud): the best of as many prior draws as the
        # time left allows, as after tuning, rather than plain draws (those are asked by tuning_iterations 0).
        best_of_prior = tuning is None and iterations > 0 and posterior and oversampling > 1
        draws = 0  # of the oversampled drawing, when there is one
        if tuning is not None and config["result_samples"] == "best":
            samples, scores, complete = tuning.best_samples, tuning.best_scores, True
        elif tuning is None and not best_of_prior:  # plain prior samples: the first chunk is drawn already
            samples, scores, complete = first_samples, first_scores, first_samples.shape[0] == num_samples
            if not complete and time.monotonic() < sampling_deadline_at:
                rest, rest_scores, complete = sample_and_score(
                    prior, domain, num_samples - first_samples.shape[0], generator, chunk, sampling_deadline_at,
                    checkpoint=checkpoint)
                samples, scores = torch.cat([samples, rest]), torch.cat([scores, rest_scores])
        else:
            # The drawing leaves the selection its time; the selection stops at its share and fills the rest by score.
            samples, scores, complete, draws = sample_best_of(
                prior, domain, num_samples, oversampling, generator, chunk, sampling_deadline_at - selection_reserve_s,
                select=select, checkpoint=checkpoint, drawn=(first_samples, first_scores) if best_of_prior else None)
        # The same seed's prior answer is the first chunk: a posterior that scores below it on this
        # observation (sampling noise, or a best θ that was θ_0) gives way to it.
        fell_back_to_prior = (tuning is not None and first_samples.shape[0] == num_samples
                              and float(scores.mean()) < float(first_scores.mean()))
        if fell_back_to_prior:
            samples, scores, complete = first_samples, first_scores, True
        order = torch.argsort(scores, descending=True)
        samples, scores = samples[order], scores[order]
        diversity_by_count = self.diversity_by_count(samples[:diversity_count], deadline_at, checkpoint)
        diversity_used = max(1, diversity_by_count.shape[0])
        mean_score = float(scores.mean())
        success = bool(scores.max() > 0)
        # Of how many draws the answer is the best: the timeout may stop the drawing short of oversampling x.
        if draws >= num_samples * oversampling:
            best_of = f"the best of {oversampling} x as many draws"
        elif draws > num_samples:
            best_of = f"the best of {draws} draws (the timeout came before {oversampling} x as many)"
        else:
            best_of = "plain draws (the timeout came before more)"
        by_diversity = f", by score and diversity (weight {diversity_weight:g})" if diversity_weight > 0 and draws > num_samples else ""
        if best_of_prior:
            what = f"prior samples (no tuning): {best_of}{by_diversity}"
        elif tuning is None:
            what = "prior samples (no tuning)"
        else:
            what = (
                f"{config['result_samples']} samples"
                + (f" ({best_of}{by_diversity})" if config["result_samples"] == "posterior" and oversampling > 1 else "")
                + f" after {tuning.iterations_done} MACE iteration(s) of {preset_name}"
                + (" (stopped at the timeout)" if tuning.stopped_by_deadline else "")
            )
        if iterations > 0 and tuning is None:
            what += ": no time left for tuning within the timeout"
        elif tuning is not None and config["result_samples"] == "posterior" and tuning.iterations_done == 0:
            what += ", θ of the prior (no iteration ended before the timeout)"
        elif tuning is not None and config["result_samples"] == "posterior":
            best_iteration = int(best_theta.iteration)
            what += (f", θ of iteration {best_iteration} (the best mean score seen while tuning, "
                     f"{float(best_theta.mean):.3f}{'; 0 = the prior' if best_iteration == 0 else ''})")
        if fell_back_to_prior:
            what += "; the tuned samples scored below the prior's, so the prior's samples are returned"
        message = f"{what}: mean score {mean_score:.3f}, best {float(scores.max()):.3f}"
        if not complete:
            message += f"; {samples.shape[0]} of {num_samples} samples drawn before the timeout"
        if diversity_used < min(diversity_count, samples.shape[0]):
            message += f"; diversity over the best {diversity_used} samples (timeout)"
        if not success:
            message += "; no sample is consistent with the observation" + self._unreachable_observation_hint(observation)
        return ShapeResult(
            success=success,
            message=message,
            samples=samples.detach().cpu().numpy().astype(np.float32),
            scores=scores.detach().cpu().double().numpy(),
            mean_score=mean_score,
            diversity=float(diversity_by_count[-1]) if diversity_by_count.size else 0.0,
            tuning_iterations_done=0 if tuning is None else tuning.iterations_done,
            tuning_time_s=0.0 if tuning is None else tuning.elapsed_s,
            elapsed_s=time.monotonic() - started,
            diversity_by_count=diversity_by_count,
        )

    def _unreachable_observation_hint(self, observation: Observation) -> str:
        """Why nothing fit, when it is the placement: a contact, or a partial cloud's every point, farther from
        object_origin than the prior's shapes reach (e.g. object_origin left at the frame's origin)."""
        reach_m = self.prior_reach_m
        if observation.contacts is not None:
            distances_m = np.linalg.norm(observation.contacts - observation.origin, axis=1)
            farthest = int(np.argmax(distances_m))
            if distances_m[farthest] > reach_m:
                return (f" (contact {farthest} is {distances_m[farthest]:.2f} m from object_origin, farther than the prior's "
                        f"shapes reach from their centre, {reach_m:.2f} m: is object_origin the object's centre?)")
        if observation.partial_cloud is not None:
            nearest_m = float(np.linalg.norm(observation.partial_cloud - observation.origin, axis=1).min())
            reach_m += float(self.config["partial_outlier_distance_m"])  # a point counts up to this far from a shape
            if nearest_m > reach_m:
                return (f" (the partial cloud's nearest point is {nearest_m:.2f} m from object_origin, farther than the "
                        f"prior's shapes reach from their centre plus partial_outlier_distance_m, {reach_m:.2f} m: is "
                        f"object_origin the object's centre?)")
        return ""

    def diversity_by_count(self, samples: torch.Tensor, deadline_at: float | None = None,
                           checkpoint: Callable[[], None] | None = None) -> np.ndarray:
        """[k]: the mean pairwise Chamfer distance of the first 1, 2, ..., k of `samples` [n, P, 3] (0 for one).

        Pairs are added sample by sample (all of sample j's pairs with the samples before it), the
        clock checked between chunks of pairs: at the deadline k is the number of first (best) samples
        done, k >= 2 whenever n >= 2 (the first pair is always measured); k = n otherwise.
        """
        count = samples.shape[0]
        if count < 2:
            return np.zeros(count)
        row_sums = np.zeros(count)  # row j: the distances of sample j to the samples before it
        pairs, done = 0, 1
        # The pace of pairs: this call's own once measured (a loaded CPU is several times slower than
        # the start-up measurement), never faster than that.
        measuring_since = time.monotonic()
        with torch.no_grad():
            while done < count:
                budget = DIVERSITY_PAIR_CHUNK if pairs else 1
                if pairs and deadline_at is not None:
                    seconds_per_pair = max(self._seconds_per_pair, (time.monotonic() - measuring_since) / pairs)
                    budget = min(budget, int((deadline_at - time.monotonic()) / seconds_per_pair))
                    if budget < done:  # not even the next sample's pairs fit
                        break
                if checkpoint is not None:
                    checkpoint()
                # Whole rows j (pairs (i, j), i < j): as many as fit the pair budget, at least one.
                rows = [done]
                while rows[-1] + 1 < count and sum(rows) + rows[-1] + 1 <= budget:
                    rows.append(rows[-1] + 1)
                first = torch.cat([torch.arange(j, device=samples.device) for j in rows])
                second = torch.cat([torch.full((j,), j, device=samples.device) for j in rows])
                distances = chamfer_distance(samples[first], samples[second]).double().cpu()
                row_sums += np.bincount(second.cpu().numpy(), weights=distances.numpy(), minlength=count)
                pairs += first.numel()
                done = rows[-1] + 1
        sizes = np.arange(1, done + 1)
        return np.cumsum(row_sums[:done]) / np.maximum(sizes * (sizes - 1) / 2, 1)
