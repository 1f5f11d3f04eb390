"""Poisson sampling is what the accountant assumes: batch sizes ~ Binomial(N, q), independent inclusion,
empty batches allowed, exactly the requested number of steps, reproducible from a seed (insecure mode), the
rate executed known exactly and never below the rate requested."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom, SecureRandom
from ewtune.agent.sampler import PoissonSampler


def _batch_sizes(num_examples, rate, steps, seed=0):
    sampler = PoissonSampler(num_examples, rate, steps, InsecureSeededRandom(seed))
    return np.array([len(indices) for indices in sampler])


def test_batch_sizes_follow_the_binomial_distribution():
    n, q, steps = 1000, 0.03, 4000
    sizes = _batch_sizes(n, q, steps)
    assert len(sizes) == steps
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.1)
    # Chi-square goodness of fit over the bins with expected counts >= 5 (tails pooled into the end bins).
    low, high = int(stats.binom.ppf(0.002, n, q)), int(stats.binom.ppf(0.998, n, q))
    edges = np.arange(low, high + 1)
    observed = np.array([(sizes <= low).sum()] + [(sizes == k).sum() for k in edges[1:-1]] + [(sizes >= high).sum()])
    expected = np.array(
        [stats.binom.cdf(low, n, q)] + [stats.binom.pmf(k, n, q) for k in edges[1:-1]] + [stats.binom.sf(high - 1, n, q)]
    ) * steps
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_every_example_joins_independently_with_probability_q():
    n, q, steps = 50, 0.2, 3000
    sampler = PoissonSampler(n, q, steps, InsecureSeededRandom(1))
    joins = np.zeros((steps, n), dtype=bool)
    for step, indices in enumerate(sampler):
        joins[step, indices.numpy()] = True
    counts = joins.sum(axis=0)  # each ~ Binomial(steps, q)
    assert stats.chisquare(counts, np.full(n, counts.mean())).pvalue > 1e-3
    assert abs(counts.mean() - steps * q) < 4 * math.sqrt(steps * q * (1 - q) / n)
    # Independence of two examples: P(both join) = q^2.
    both = (joins[:, 0] & joins[:, 1]).mean()
    assert abs(both - q * q) < 4 * math.sqrt(q * q * (1 - q * q) / steps)


def test_empty_batches_occur_at_the_rate_of_the_binomial():
    n, q, steps = 20, 0.02, 3000
    sizes = _batch_sizes(n, q, steps, seed=2)
    p_empty = (1 - q) ** n
    assert abs((sizes == 0).mean() - p_empty) < 4 * math.sqrt(p_empty * (1 - p_empty) / steps)


def test_batches_are_sorted_unique_in_range_and_reproducible():
    first = list(PoissonSampler(100, 0.1, 50, InsecureSeededRandom(7)))
    second = list(PoissonSampler(100, 0.1, 50, InsecureSeededRandom(7)))
    other = list(PoissonSampler(100, 0.1, 50, InsecureSeededRandom(8)))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    for indices in first:
        assert indices.dtype == torch.int64
        assert torch.equal(indices, torch.unique(indices))
        assert indices.numel() == 0 or (indices.min() >= 0 and indices.max() < 100)


def test_steps_executed_equal_steps_requested():
    sampler = PoissonSampler(10, 0.5, 17)
    assert len(sampler) == 17
    assert sum(1 for _ in sampler) == 17
    assert sum(1 for _ in PoissonSampler(10, 0.5, 0)) == 0


@pytest.mark.parametrize("args", [(0, 0.1, 1), (10, 0.0, 1), (10, 1.5, 1), (10, 0.1, -1), (10, 0.1, 1.5), (10, float("nan"), 1)])
def test_invalid_parameters_are_refused(args):
    with pytest.raises(InvalidInputError):
        PoissonSampler(*args)


class _Feed:
    """A source that hands out chosen 53-bit draws, to pin the inclusion rule down exactly."""

    name, secure = "feed", False

    def __init__(self, draws):
        self.draws = torch.tensor(draws, dtype=torch.int64)

    def uniform_bits(self, count):
        assert count == len(self.draws)
        return self.draws


def test_an_example_joins_exactly_when_its_draw_is_below_the_threshold():
    q = 1e-12
    sampler = PoissonSampler(5, q, 1, _Feed([0, 9007, 9008, 2**53 - 1, 9006]))
    threshold = math.ceil(q * 2**53)
    assert threshold == 9008 and sampler.threshold == threshold
    (indices,) = list(sampler)
    assert indices.tolist() == [0, 1, 4]
    # The rate executed is threshold / 2^53 exactly, and that is what must be accounted.
    assert sampler.executed_rate == threshold / 2**53 == executable_sampling_rate(q)
    assert q <= sampler.executed_rate < q * (1 + 1e-3)


def test_a_tiny_requested_rate_is_not_silently_raised_to_a_coarse_grid():
    """The attack: torch.rand's 24-bit grid ran q = 1e-12 at 2^-24 (about 6e-8) while q was accounted. The
    rate executed now stays within one part in 10^3 of the request, and is the one reported."""
    q = 1e-12
    assert executable_sampling_rate(q) < 2.0**-24 / 1000
    old_grid_rate = math.ceil(q * 2**24) / 2**24
    assert old_grid_rate > 5e4 * q  # what the old sampler really ran


@pytest.mark.parametrize("q", [0.5, 0.25, 2.0**-40, 1.0])
def test_rates_on_the_grid_are_executed_as_requested(q):
    assert executable_sampling_rate(q) == q


def test_rates_off_the_grid_are_rounded_up_never_down():
    for q in (64 / 11477, 1 / 3, 0.1, 1e-7, 3e-300):
        executed = executable_sampling_rate(q)
        assert executed >= q and executed - q <= 2.0**-53


def test_secure_sampling_has_the_requested_rate():
    n, q, steps = 2000, 0.05, 400
    sizes = np.array([len(indices) for indices in PoissonSampler(n, q, steps, SecureRandom())])
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    first, second = list(PoissonSampler(n, q, 2, SecureRandom())), list(PoissonSampler(n, q, 2, SecureRandom()))
    assert not torch.equal(first[0], second[0])  # nothing replays across samplers
