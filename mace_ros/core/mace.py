"""MACE: Model Adaptation with the Cross-Entropy method (arXiv 2310.12862, Algorithm 1).

One generic loop serves every domain through two small protocols:
- a `TunablePrior`: `sample(n, generator)`, `tuning_log_likelihood(x)` (exact log p(x; θ), or an ELBO
  surrogate for VAEs) and `tunable_parameters()` (θ);
- a `Domain`: `score(x) -> [n]` in [0, 1] (simulate the observation and compare it with the observed one).

The importance-sampling baseline (paper Eq. 2) lives here too, for the benchmarks.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch


class TunablePrior(Protocol):
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def tuning_log_likelihood(self, samples: torch.Tensor) -> torch.Tensor: ...

    def tunable_parameters(self) -> Iterable[torch.nn.Parameter]: ...


class Domain(Protocol):
    def score(self, samples: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MacePreset:
    """Hyperparameters of Algorithm 1: N samples, M gradient steps, quantile q, Adam lr, T iterations."""

    num_samples: int
    grad_steps_per_iteration: int
    elite_quantile: float
    learning_rate: float
    iterations: int

    @property
    def num_elites(self) -> int:
        return max(1, math.floor(self.elite_quantile * self.num_samples))


# The paper's settings (Section 4 and Appendix), kept under their names.
PAPER_PRESETS: dict[str, MacePreset] = {
    "ik_wall_pybullet": MacePreset(64, 4, 1 / 16, 2e-5, 1500),
    "ik_box_isaacgym": MacePreset(4096, 4, 1 / 128, 1e-4, 500),
    "grasp_shape_vae": MacePreset(256, 32, 1 / 16, 2e-4, 2500),
    "partial_cloud_vae": MacePreset(256, 128, 1 / 32, 1e-3, 4000),
}


@dataclass
class TuneResult:
    """Outcome of a tuning run. `best_samples`/`best_scores` are the highest-scoring samples seen."""

    best_samples: torch.Tensor
    best_scores: torch.Tensor
    iterations_done: int
    elapsed_s: float
    mean_score_history: list[float] = field(default_factory=list)
    stopped_by_deadline: bool = False


@dataclass(frozen=True)
class StopRule:
    """Stop tuning early once `count` samples scoring at least `min_score` have been seen."""

    min_score: float
    count: int

    def satisfied(self, best_scores: torch.Tensor) -> bool:
        return int((best_scores >= self.min_score).sum()) >= self.count


class _BestKeeper:
    """Keeps the top-k samples seen over all iterations (the deadline may stop tuning at any time)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.samples: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def update(self, samples: torch.Tensor, scores: torch.Tensor) -> None:
        if self.samples is None:
            all_samples, all_scores = samples, scores
        else:
            all_samples = torch.cat([self.samples, samples])
            all_scores = torch.cat([self.scores, scores])
        order = torch.argsort(all_scores, descending=True)[: self.capacity]
        self.samples, self.scores = all_samples[order], all_scores[order]


def elite_threshold(scores: torch.Tensor, num_elites: int) -> torch.Tensor:
    """δ: the score of the ⌊qN⌋-th best sample."""
    return torch.topk(scores, num_elites).values[-1]


def sample_and_score(
    prior: TunablePrior,
    domain: Domain,
    num_samples: int,
    generator: torch.Generator | None,
    chunk_size: int | None = None,
    deadline_at: float | None = None,
    enough: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Draw and score `num_samples` in chunks of at most `chunk_size`, checking the clock between chunks.

    A huge N must not overrun a deadline (100000 samples take seconds on a CPU); the first chunk is
    always drawn so that there is an answer. Drawing also stops once `enough(scores so far)` holds.
    Returns samples, scores and whether all N were drawn.
    """
    chunk = num_samples if chunk_size is None else max(1, chunk_size)
    samples, scores = [], []
    drawn = 0
    while drawn < num_samples and (drawn == 0 or deadline_at is None or time.monotonic() < deadline_at):
        count = min(chunk, num_samples - drawn)
        with torch.no_grad():
            batch = prior.sample(count, generator)
            samples.append(batch)
            scores.append(domain.score(batch))
        drawn += count
        if enough is not None and drawn < num_samples and enough(torch.cat(scores)):
            break
    return torch.cat(samples), torch.cat(scores), drawn == num_samples


def _tuning_loop(
    prior: TunablePrior,
    domain: Domain,
    preset: MacePreset,
    update: Callable[[torch.Tensor, torch.Tensor, float | None], None],
    deadline_s: float | None,
    generator: torch.Generator | None,
    keep_best: int,
    on_iteration: Callable[[int, torch.Tensor], None] | None = None,
    stop_rule: StopRule | None = None,
    chunk_size: int | None = None,
) -> TuneResult:
    """Sample, score, remember the best, update θ; stop after T iterations, at the deadline or by the stop rule."""
    start = time.monotonic()
    deadline_at = None if deadline_s is None else start + deadline_s
    best = _BestKeeper(keep_best)
    history: list[torch.Tensor] = []  # each iteration's mean score, read back once at the end (no host sync per iteration)
    iterations_done = 0
    stopped_by_deadline = False
    for iteration in range(preset.iterations):
        if deadline_at is not None and time.monotonic() >= deadline_at:
            stopped_by_deadline = True
            break
        # The stop rule may end a batch early: its samples are all that is asked for then.
        enough = None if stop_rule is None else (
            lambda partial: stop_rule.satisfied(partial if best.scores is None else torch.cat([best.scores, partial])))
        samples, scores, complete = sample_and_score(prior, domain, preset.num_samples, generator, chunk_size, deadline_at, enough)
        best.update(samples, scores)
        if stop_rule is not None and stop_rule.satisfied(best.scores):
            break
        if not complete:
            # The deadline came mid-batch: keep what was scored, but a partial batch moves no elite threshold.
            stopped_by_deadline = True
            break
        history.append(scores.mean())
        if on_iteration is not None:
            on_iteration(iteration, scores)
        update(samples, scores, deadline_at)
        iterations_done += 1
    if best.samples is None:
        # No time even for one iteration: still answer with straight prior samples (one chunk at most).
        samples, scores, _ = sample_and_score(prior, domain, preset.num_samples, generator, chunk_size, deadline_at)
        best.update(samples, scores)
    mean_scores = torch.stack(history).tolist() if history else []
    return TuneResult(best.samples, best.scores, iterations_done, time.monotonic() - start, mean_scores, stopped_by_deadline)


def tuning_optimizer(prior: TunablePrior, preset: MacePreset) -> torch.optim.Optimizer:
    """Adam over θ (MACE and the IS baseline); pass the same one to successive `mace_tune` calls to continue one tuning run in blocks."""
    return torch.optim.Adam(list(prior.tunable_parameters()), lr=preset.learning_rate, foreach=True)


def mace_tune(
    prior: TunablePrior,
    domain: Domain,
    preset: MacePreset,
    deadline_s: float | None = None,
    generator: torch.Generator | None = None,
    keep_best: int = 64,
    on_iteration: Callable[[int, torch.Tensor], None] | None = None,
    stop_rule: StopRule | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    chunk_size: int | None = None,
    after_step: Callable[[], None] | None = None,
) -> TuneResult:
    """Algorithm 1. Fine-tunes `prior` in place; stops after `preset.iterations` or at the deadline.

    The loss averages the elites' log-likelihood (the authors' code kept only the first elite's,
    `get_prob(x)[0]`, which we treat as a bug). `optimizer` (from `tuning_optimizer`) continues an
    earlier run warm. `chunk_size` bounds the samples handled at once, so the clock is checked
    between chunks and between gradient steps; more elites than that are subsampled per gradient step
    (an unbiased estimate of the same mean). `after_step` runs after every optimizer step (e.g. a
    projection of θ onto its allowed set, such as a lower bound on σ).
    """
    optimizer = optimizer or tuning_optimizer(prior, preset)

    def update(samples: torch.Tensor, scores: torch.Tensor, deadline_at: float | None) -> None:
        delta = elite_threshold(scores, preset.num_elites)
        # Ties at δ are all elites, as in 1[S >= δ]; samples scoring 0 never are.
        elites = samples[(scores >= delta) & (scores > 0)]
        if elites.shape[0] == 0:
            return
        for _ in range(preset.grad_steps_per_iteration):
            if deadline_at is not None and time.monotonic() >= deadline_at:
                return
            batch = elites
            if chunk_size is not None and elites.shape[0] > chunk_size:
                batch = elites[torch.randperm(elites.shape[0], generator=generator, device=elites.device)[:chunk_size]]
            optimizer.zero_grad(set_to_none=True)
            loss = -prior.tuning_log_likelihood(batch).mean()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()

    return _tuning_loop(prior, domain, preset, update, deadline_s, generator, keep_best, on_iteration, stop_rule, chunk_size)


def importance_sampling_tune(
    prior: TunablePrior,
    domain: Domain,
    preset: MacePreset,
    deadline_s: float | None = None,
    generator: torch.Generator | None = None,
    keep_best: int = 64,
    stop_rule: StopRule | None = None,
) -> TuneResult:
    """Paper Eq. 2 baseline: maximize Σ w_i log p(x_i; θ) with w_i = p(x_i; θ_0)/p(x_i; θ_{t-1}) · S(o_i, o).

    θ_0 is a frozen copy of the prior before tuning; there is no quantile. Weights are
    self-normalized over the batch (a constant factor that only rescales the learning rate).
    """
    reference = copy.deepcopy(prior)
    optimizer = tuning_optimizer(prior, preset)

    def update(samples: torch.Tensor, scores: torch.Tensor, deadline_at: float | None) -> None:
        if float(scores.max()) <= 0:
            return
        with torch.no_grad():
            log_ratio = reference.tuning_log_likelihood(samples) - prior.tuning_log_likelihood(samples)
            weights = torch.softmax(log_ratio, 0) * scores
            weights = weights / weights.sum().clamp_min(1e-30)
        for _ in range(preset.grad_steps_per_iteration):
            optimizer.zero_grad(set_to_none=True)
            loss = -(weights * prior.tuning_log_likelihood(samples)).sum()
            loss.backward()
            optimizer.step()

    return _tuning_loop(prior, domain, preset, update, deadline_s, generator, keep_best, stop_rule=stop_rule)
