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

import numpy as np
import torch

from mace_ros.core.cuda_graph import GraphedCall

# A CUDA graph's capture is not worth it for a handful of iterations.
GRAPH_MIN_ITERATIONS = 8


class TunablePrior(Protocol):
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def tuning_log_likelihood(self, samples: torch.Tensor) -> torch.Tensor: ...

    def tunable_parameters(self) -> Iterable[torch.nn.Parameter]: ...


class ClosedFormElitePrior(TunablePrior, Protocol):
    """A prior whose elite loss, −mean log p(x; θ) over (weighted) elites, has a closed-form gradient in θ
    given a few statistics of the elites (MaceVAEPrior: its surrogate is a Gaussian KL). θ is the
    tunable parameters flattened in order; it is small, so MACE's M Adam steps run on the host over a
    copy of it (`_HostAdam`): no autograd, and one read from θ's device per iteration instead of
    M × dozens of tiny kernels and their launches."""

    def elite_statistics(self, elites: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Flat statistics (θ's device) of elites [k, ...] weighted by weights [k] (0 or 1, not all 0)."""
        ...

    def elite_loss_gradient(self, theta: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """d(−mean log-likelihood of the elites)/dθ at θ (float64, flat), from `elite_statistics`."""
        ...

    def project_host(self, theta: np.ndarray) -> np.ndarray:
        """θ onto its allowed set (e.g. a lower bound on σ), as `after_step` does on the device; may write θ in place."""
        ...


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
    cuda_graph_replays: int = 0  # iterations whose device work was one CUDA graph replay
    cuda_graph_failure: str | None = None  # why the capture failed (the iterations then ran eagerly)


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
    checkpoint: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Draw and score `num_samples` in chunks of at most `chunk_size`, checking the clock between chunks.

    A huge N must not overrun a deadline (100000 samples take seconds on a CPU); the first chunk is
    always drawn so that there is an answer, and no later one that would end past the deadline. Drawing also stops once `enough(scores so far)` holds.
    `checkpoint()` runs before every chunk; an exception it raises (e.g. a cancel) propagates.
    Returns samples, scores and whether all N were drawn.
    """
    chunk = num_samples if chunk_size is None else max(1, chunk_size)
    samples, scores = [], []
    drawn = 0
    # A chunk that would end past the deadline, at the last one's pace, is not started: on a loaded CPU
    # a chunk takes several times its idle cost, and one begun just before the deadline overran it by that.
    chunk_s = 0.0
    while drawn < num_samples and (drawn == 0 or deadline_at is None or time.monotonic() + chunk_s < deadline_at):
        if checkpoint is not None:
            checkpoint()
        chunk_started = time.monotonic()
        count = min(chunk, num_samples - drawn)
        with torch.no_grad():
            batch = prior.sample(count, generator)
            samples.append(batch)
            scores.append(domain.score(batch))
        drawn += count
        chunk_s = (time.monotonic() - chunk_started) * chunk / count
        if enough is not None and drawn < num_samples and enough(torch.cat(scores)):
            break
    return torch.cat(samples), torch.cat(scores), drawn == num_samples


def sample_best_of(
    prior: TunablePrior,
    domain: Domain,
    num_samples: int,
    oversampling: int,
    generator: torch.Generator | None,
    chunk_size: int | None = None,
    deadline_at: float | None = None,
    select: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
    checkpoint: Callable[[], None] | None = None,
    drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """The `num_samples` best-scoring of `oversampling` x num_samples draws of `prior`, best first (fewer
    when the deadline stops the drawing), their scores, whether num_samples were drawn, and how many were
    (the deadline may stop the drawing before oversampling x num_samples: an answer says of how many it is the best).

    Like the elite set of one more MACE iteration: the samples least consistent with the observation are
    left out, which raises the answer's score at some cost in diversity (oversampling 1: plain draws).
    `select(samples, scores, count)`, when given, picks the indices of the kept ones instead (e.g. by
    score and diversity); they are returned best first all the same. `deadline_at` stops the drawing
    (`select` keeps its own time); `checkpoint` as in `sample_and_score`. `drawn` = (samples, scores) of
    draws of this prior made already: they count among the draws (and stand for the first chunk).
    """
    total = num_samples * max(1, oversampling)
    parts = [] if drawn is None else [drawn]
    have = 0 if drawn is None else drawn[0].shape[0]
    if have < total and (have == 0 or deadline_at is None or time.monotonic() < deadline_at):
        more, more_scores, _ = sample_and_score(
            prior, domain, total - have, generator, chunk_size, deadline_at, checkpoint=checkpoint)
        parts.append((more, more_scores))
    samples, scores = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    kept = torch.argsort(scores, descending=True)[:num_samples] if select is None else select(samples, scores, num_samples)
    order = kept[torch.argsort(scores[kept], descending=True)]
    return samples[order], scores[order], samples.shape[0] >= num_samples, samples.shape[0]


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
    draw: Callable[[float | None, Callable[[torch.Tensor], bool] | None], tuple[torch.Tensor, torch.Tensor, bool]] | None = None,
) -> TuneResult:
    """Sample, score, remember the best, update θ; stop after T iterations, at the deadline or by the stop rule.

    `draw(deadline_at, enough)` replaces `sample_and_score` for the iterations' batches."""
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
        if draw is None:
            samples, scores, complete = sample_and_score(prior, domain, preset.num_samples, generator, chunk_size, deadline_at, enough)
        else:
            samples, scores, complete = draw(deadline_at, enough)
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
    closed_form: bool = True,
    cuda_graph: bool = True,
) -> TuneResult:
    """Algorithm 1. Fine-tunes `prior` in place; stops after `preset.iterations` or at the deadline.

    The loss averages the elites' log-likelihood (the authors' code kept only the first elite's,
    `get_prob(x)[0]`, which we treat as a bug). `optimizer` (from `tuning_optimizer`) continues an
    earlier run warm. `chunk_size` bounds the samples handled at once, so the clock is checked
    between chunks and between gradient steps; more elites than that are subsampled per gradient step
    (an unbiased estimate of the same mean). `after_step` runs after every optimizer step (e.g. a
    projection of θ onto its allowed set, such as a lower bound on σ).

    A `ClosedFormElitePrior` (unless `closed_form` is False) takes `_closed_form_mace_tune`: the same
    iterations and Adam steps, with its exact gradient instead of autograd's, its iterations captured as a
    CUDA graph on a GPU unless `cuda_graph` is False.
    """
    optimizer = optimizer or tuning_optimizer(prior, preset)
    if closed_form and all(hasattr(prior, name) for name in ("elite_statistics", "elite_loss_gradient", "project_host")):
        return _closed_form_mace_tune(prior, domain, preset, deadline_s, generator, keep_best, on_iteration, stop_rule, optimizer,
                                      chunk_size, after_step, cuda_graph)

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


class _HostAdam:
    """torch.optim.Adam's update (the single-tensor and foreach rule, without weight decay or AMSGrad)
    on a float64 host copy of θ and of the optimizer's moments: read once, θ written back to its device
    after every iteration, the moments and step count at the end (`write_back`), so the optimizer can
    continue as if it had taken the steps itself."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]):
        group = optimizer.param_groups[0]
        if not isinstance(optimizer, torch.optim.Adam) or group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            raise ValueError("the closed-form tuning path takes plain Adam (no weight decay, AMSGrad or maximize)")
        self.optimizer, self.parameters = optimizer, parameters
        self.learning_rate, (self.beta1, self.beta2), self.eps = float(group["lr"]), group["betas"], float(group["eps"])
        self.sizes = [parameter.numel() for parameter in parameters]
        states = [optimizer.state.get(parameter, {}) for parameter in parameters]

        def flat(tensors: list[torch.Tensor | None]) -> np.ndarray:
            return np.concatenate([np.zeros(size) if t is None else t.detach().double().cpu().numpy().ravel()
                                   for t, size in zip(tensors, self.sizes)])

        self.theta = flat(list(parameters))
        self.exp_avg = flat([state.get("exp_avg") for state in states])
        self.exp_avg_sq = flat([state.get("exp_avg_sq") for state in states])
        self.step_count = int(float(states[0]["step"])) if "step" in states[0] else 0

    def steps(self, gradient: Callable[[np.ndarray], np.ndarray], count: int, project: Callable[[np.ndarray], np.ndarray]) -> None:
        # In place into one scratch array: these run M times per iteration on a few hundred numbers, where
        # numpy's per-call cost and allocations, not arithmetic, take the time.
        scratch = np.empty_like(self.theta)
        for _ in range(count):
            grad = gradient(self.theta)
            self.step_count += 1
            np.subtract(grad, self.exp_avg, out=scratch)
            scratch *= 1.0 - self.beta1
            self.exp_avg += scratch
            np.multiply(grad, grad, out=scratch)
            scratch *= 1.0 - self.beta2
            self.exp_avg_sq *= self.beta2
            self.exp_avg_sq += scratch
            step_size = self.learning_rate / (1.0 - self.beta1**self.step_count)
            np.sqrt(self.exp_avg_sq, out=scratch)
            scratch *= 1.0 / math.sqrt(1.0 - self.beta2**self.step_count)
            scratch += self.eps
            np.divide(self.exp_avg, scratch, out=scratch)
            scratch *= step_size
            self.theta -= scratch
            self.theta = project(self.theta)

    def _pieces(self, values: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(piece).to(device=p.device, dtype=p.dtype).reshape(p.shape)
                for piece, p in zip(np.split(values, np.cumsum(self.sizes)[:-1]), self.parameters)]

    def write_theta(self) -> None:
        with torch.no_grad():
            for parameter, value in zip(self.parameters, self._pieces(self.theta)):
                parameter.copy_(value)

    def write_back(self) -> None:
        self.write_theta()
        if self.step_count == 0:
            return
        for parameter, exp_avg, exp_avg_sq in zip(self.parameters, self._pieces(self.exp_avg), self._pieces(self.exp_avg_sq)):
            state = self.optimizer.state[parameter]
            state["step"] = torch.tensor(float(self.step_count), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq


def _closed_form_mace_tune(
    prior: ClosedFormElitePrior,
    domain: Domain,
    preset: MacePreset,
    deadline_s: float | None,
    generator: torch.Generator | None,
    keep_best: int,
    on_iteration: Callable[[int, torch.Tensor], None] | None,
    stop_rule: StopRule | None,
    optimizer: torch.optim.Optimizer,
    chunk_size: int | None,
    after_step: Callable[[], None] | None,
    cuda_graph: bool,
) -> TuneResult:
    """`mace_tune` for a ClosedFormElitePrior. The elites are the top ⌊qN⌋ samples by score, those
    scoring 0 weighted 0 (a fixed shape: no data-dependent indexing; it differs from 1[S ≥ δ] only when
    several samples tie exactly at δ). Their statistics are read to the host once per iteration, the M
    Adam steps run there on θ's exact gradient (the full elite mean: no per-step subsampling), and θ is
    written back. The prior's `project_host` bounds θ after every step; `after_step` then runs once on
    the device θ. Same deadline rule as the autograd path: no step starts past the deadline.

    When a batch is one chunk and no stop rule reads partial batches, an iteration's device work
    (draw, score, elite statistics) is one function of θ, captured on a GPU as a CUDA graph
    (`GraphedCall`) once T is worth it: θ is written in place, so every replay reads the current θ."""
    parameters = list(prior.tunable_parameters())
    host = _HostAdam(optimizer, parameters)

    def statistics_of(samples: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = torch.topk(scores, min(preset.num_elites, scores.shape[0]))
        weights = (top.values > 0).to(scores.dtype)
        with torch.no_grad():
            return torch.cat([weights.sum().reshape(1).to(scores.dtype), prior.elite_statistics(samples[top.indices], weights).to(scores.dtype)])

    draw, graphed = None, None
    drawn: dict[str, torch.Tensor] = {}  # the last fused draw's samples and their statistics
    if (chunk_size is None or chunk_size >= preset.num_samples) and stop_rule is None:
        def iteration() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                samples = prior.sample(preset.num_samples, generator)
                scores = domain.score(samples)
                return samples, scores, statistics_of(samples, scores)

        graphed = GraphedCall(iteration, parameters[0].device, generator, capture=cuda_graph and preset.iterations >= GRAPH_MIN_ITERATIONS)

        def draw(deadline_at: float | None, enough: Callable[[torch.Tensor], bool] | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
            samples, scores, statistics = graphed()
            # Copies: a replay overwrites the graph's buffers, and the loop keeps the best samples.
            drawn["samples"], drawn["statistics"] = samples.clone(), statistics
            return drawn["samples"], scores.clone(), True

    def update(samples: torch.Tensor, scores: torch.Tensor, deadline_at: float | None) -> None:
        statistics = drawn["statistics"] if drawn.get("samples") is samples else statistics_of(samples, scores)
        statistics_host = statistics.double().cpu().numpy()
        if statistics_host[0] == 0 or (deadline_at is not None and time.monotonic() >= deadline_at):
            return
        host.steps(lambda theta: prior.elite_loss_gradient(theta, statistics_host[1:]), preset.grad_steps_per_iteration, prior.project_host)
        host.write_theta()
        if after_step is not None:
            after_step()

    try:
        result = _tuning_loop(prior, domain, preset, update, deadline_s, generator, keep_best, on_iteration, stop_rule, chunk_size, draw)
    finally:
        host.write_back()
    if graphed is not None:
        result.cuda_graph_replays, result.cuda_graph_failure = graphed.replays, graphed.failure
    return result


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
