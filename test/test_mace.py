"""MACE on a 2-D toy problem whose posterior is known (by rejection sampling of the prior)."""
import math
import time

import pytest
import torch

from mace_ros.core.mace import MacePreset, StopRule, importance_sampling_tune, mace_tune, sample_and_score, sample_best_of

TARGET = torch.tensor([1.5, -1.0])
RADIUS = 0.4


class GaussianPrior:
    """N(μ, diag σ²) with θ = (μ, log σ): a prior with an exact log-likelihood."""

    def __init__(self) -> None:
        self.mean = torch.zeros(2, requires_grad=True)
        self.log_std = torch.zeros(2, requires_grad=True)

    def sample(self, num_samples, generator=None):
        noise = torch.randn(num_samples, 2, generator=generator)
        return self.mean + self.log_std.exp() * noise

    def tuning_log_likelihood(self, samples):
        z = (samples - self.mean) / self.log_std.exp()
        return (-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def tunable_parameters(self):
        return [self.mean, self.log_std]


class DiskDomain:
    """Observation: "the sample lies in a disk". Score 1 inside, else decays with distance."""

    def score(self, samples):
        distance = (samples - TARGET).norm(dim=-1)
        return torch.where(distance <= RADIUS, torch.ones_like(distance), torch.exp(-4 * (distance - RADIUS)))


def inside_rate(samples):
    return float(((samples - TARGET).norm(dim=-1) <= RADIUS).float().mean())


def posterior_mean() -> torch.Tensor:
    """Mean of N(0, I) restricted to the disk, by rejection sampling."""
    samples = torch.randn(2_000_000, 2, generator=torch.Generator().manual_seed(1))
    return samples[(samples - TARGET).norm(dim=-1) <= RADIUS].mean(0)


def test_mace_concentrates_on_the_posterior_support():
    prior = GaussianPrior()
    generator = torch.Generator().manual_seed(0)
    before = inside_rate(prior.sample(4000, generator))
    preset = MacePreset(num_samples=256, grad_steps_per_iteration=4, elite_quantile=1 / 8, learning_rate=0.05, iterations=150)
    result = mace_tune(prior, DiskDomain(), preset, generator=generator)
    with torch.no_grad():
        after_samples = prior.sample(4000, generator)
    assert before < 0.05
    assert inside_rate(after_samples) > 0.9
    # The tuned model sits on the posterior (the disk, pulled toward the prior's mode).
    assert float((after_samples.mean(0) - posterior_mean()).norm()) < 0.25
    assert result.iterations_done == 150
    assert result.mean_score_history[-1] > result.mean_score_history[0]


def test_importance_sampling_improves_less_than_mace():
    generator = torch.Generator().manual_seed(0)
    preset = MacePreset(num_samples=256, grad_steps_per_iteration=4, elite_quantile=1 / 8, learning_rate=0.05, iterations=60)
    mace_prior, is_prior = GaussianPrior(), GaussianPrior()
    mace_tune(mace_prior, DiskDomain(), preset, generator=generator)
    importance_sampling_tune(is_prior, DiskDomain(), preset, generator=generator)
    with torch.no_grad():
        mace_rate = inside_rate(mace_prior.sample(4000, generator))
        is_rate = inside_rate(is_prior.sample(4000, generator))
    assert is_rate > 0.0
    assert mace_rate > is_rate


def test_deadline_and_stop_rule():
    preset = MacePreset(num_samples=64, grad_steps_per_iteration=1, elite_quantile=1 / 8, learning_rate=0.05, iterations=10_000)
    result = mace_tune(GaussianPrior(), DiskDomain(), preset, deadline_s=0.2)
    assert result.stopped_by_deadline
    assert 0 < result.iterations_done < 10_000
    assert result.best_samples.shape[0] > 0
    stopped = mace_tune(GaussianPrior(), DiskDomain(), preset, stop_rule=StopRule(min_score=1.0, count=5))
    assert int((stopped.best_scores >= 1.0).sum()) >= 5
    assert stopped.iterations_done < 10_000


@pytest.mark.parametrize("deadline", [0.0])
def test_expired_deadline_still_answers(deadline):
    preset = MacePreset(num_samples=32, grad_steps_per_iteration=1, elite_quantile=1 / 8, learning_rate=0.05, iterations=5)
    result = mace_tune(GaussianPrior(), DiskDomain(), preset, deadline_s=deadline)
    assert result.iterations_done == 0
    assert result.best_samples.shape == (32, 2)


def test_sample_best_of_keeps_the_best_scoring_draws():
    prior, domain = GaussianPrior(), DiskDomain()
    draws, draw_scores, _ = sample_and_score(prior, domain, 64, torch.Generator().manual_seed(5), chunk_size=10)
    best, scores, complete, count = sample_best_of(prior, domain, 16, 4, torch.Generator().manual_seed(5), chunk_size=10)
    assert complete and best.shape == (16, 2) and count == 64
    torch.testing.assert_close(scores, draw_scores.sort(descending=True).values[:16])
    torch.testing.assert_close(domain.score(best), scores)
    assert float(scores.mean()) > float(draw_scores.mean())
    plain, plain_scores, _, _ = sample_best_of(prior, domain, 64, 1, torch.Generator().manual_seed(5), chunk_size=10)
    torch.testing.assert_close(plain_scores, draw_scores.sort(descending=True).values)  # the same draws, ranked
    # A deadline that has passed still answers with the first chunk, and says it is short.
    short, _, complete, count = sample_best_of(prior, domain, 16, 4, torch.Generator().manual_seed(5), chunk_size=8, deadline_at=0.0)
    assert short.shape[0] == 8 and not complete and count == 8
    # Draws made already count among the draws: the same generator continues where they stopped.
    generator = torch.Generator().manual_seed(5)
    first = sample_and_score(prior, domain, 10, generator)[:2]
    continued, continued_scores, _, _ = sample_best_of(prior, domain, 16, 4, generator, chunk_size=10, drawn=first)
    torch.testing.assert_close(continued_scores, scores)
    # ... and past the deadline they are all there is.
    late, late_scores, complete, count = sample_best_of(prior, domain, 4, 4, None, deadline_at=0.0, drawn=first)
    assert complete and late.shape[0] == 4 and count == 10
    torch.testing.assert_close(late_scores, first[1].sort(descending=True).values[:4])


class SlowDiskDomain(DiskDomain):
    """A domain whose every score call takes `seconds` (a chunk's cost on a loaded CPU)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def score(self, samples):
        time.sleep(self.seconds)
        return super().score(samples)


def test_drawing_starts_no_chunk_that_would_end_past_the_deadline():
    """Chunks of 0.05 s, a deadline 0.12 s away: two chunks end by 0.10 s; a third, begun before the
    deadline, would end at 0.15 s. It is not started (a late chunk was what overran a loaded CPU's deadlines)."""
    started = time.monotonic()
    samples, _, complete = sample_and_score(GaussianPrior(), SlowDiskDomain(0.05), 10, torch.Generator().manual_seed(1),
                                            chunk_size=1, deadline_at=started + 0.12)
    assert time.monotonic() <= started + 0.12 and not complete and 1 <= samples.shape[0] <= 2
