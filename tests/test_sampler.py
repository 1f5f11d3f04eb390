"""Poisson sampling is what the accountant assumes: batch sizes ~ Binomial(N, q), independent inclusion,
empty batches allowed, exactly the requested number of steps, reproducible from a seed."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from accountant.errors import InvalidInputError
from agent.sampler import PoissonSampler


def _batch_sizes(num_examples, rate, steps, seed=0):
    sampler = PoissonSampler(num_examples, rate, steps, torch.Generator().manual_seed(seed))
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
    sampler = PoissonSampler(n, q, steps, torch.Generator().manual_seed(1))
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
    first = list(PoissonSampler(100, 0.1, 50, torch.Generator().manual_seed(7)))
    second = list(PoissonSampler(100, 0.1, 50, torch.Generator().manual_seed(7)))
    other = list(PoissonSampler(100, 0.1, 50, torch.Generator().manual_seed(8)))
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


@pytest.mark.parametrize("args", [(0, 0.1, 1), (10, 0.0, 1), (10, 1.5, 1), (10, 0.1, -1), (10, 0.1, 1.5)])
def test_invalid_parameters_are_refused(args):
    with pytest.raises(InvalidInputError):
        PoissonSampler(*args)
