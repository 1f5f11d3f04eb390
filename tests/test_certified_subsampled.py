"""The certified bound for q < 1 against dp_accounting's brackets, recomputed now: its optimistic PLD (privacy
buckets, pessimistic_estimate=False) is below the true epsilon, so the certified bound must not be below it;
its connect-the-dots pessimistic PLD at interval 1e-4 is above the truth and within a small discretisation
error of it, so the certified bound must be within 0.5% of it. Small deltas and q near 1 put the decisive
cells where FFT round-off used to matter (issue 20); the big random sweep is ewtune/bench/certified_sweep.py."""

from __future__ import annotations

import pytest

from ewtune.accountant.certified import certified_delta, certified_epsilon
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent
from ewtune.bench.certified_sweep import dp_accounting_epsilon

TIGHTNESS = 0.005

CASES = [
    (0.999, 20.0, 100, Neighbouring.REPLACE_ONE, 1e-11),
    (0.9, 5.0, 50, Neighbouring.ADD_REMOVE, 1e-12),
    (0.99, 3.0, 20, Neighbouring.REPLACE_ONE, 3e-12),
    (0.01, 1.0, 300, Neighbouring.ADD_REMOVE, 1e-10),
    # From the sweep: a heavy tilted tail; a tilted circle capped at twice the untilted window left 22.6% here.
    (0.003199162943916615, 1.2215964252109088, 4, Neighbouring.ADD_REMOVE, 1.0073204149625878e-12),
]


@pytest.mark.parametrize("q, sigma, steps, relation, delta", CASES)
def test_between_dp_accountings_brackets(q, sigma, steps, relation, delta):
    bound = certified_epsilon(PoissonGaussianEvent(q, sigma, steps, relation), delta)
    optimistic = dp_accounting_epsilon(q, sigma, steps, relation, delta, 2e-4, pessimistic=False)
    pessimistic = dp_accounting_epsilon(q, sigma, steps, relation, delta, 1e-4, pessimistic=True)
    assert optimistic <= bound <= pessimistic * (1 + TIGHTNESS), (optimistic, bound, pessimistic)


def test_delta_near_full_batch_is_not_below_the_pessimistic_bracket_minus_its_error():
    """delta(eps) at q = 0.999 far in the tail: at least dp_accounting's optimistic delta."""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution

    event = PoissonGaussianEvent(0.999, 10.0, 30, Neighbouring.ADD_REMOVE)
    epsilon = 3.0
    optimistic = privacy_loss_distribution.from_gaussian_mechanism(
        10.0, pessimistic_estimate=False, use_connect_dots=False, value_discretization_interval=2e-4,
        sampling_prob=0.999, neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    ).self_compose(30).get_delta_for_epsilon(epsilon)
    bound = certified_delta(event, epsilon)
    assert optimistic <= bound <= optimistic * 1.05


def test_fft_round_off_bound_holds_against_exact_rational_arithmetic():
    """The per-cell bound of the FFT composition (pld_fft, step 5) against the same circular convolution
    done in exact rational arithmetic: every computed cell is within the bound of the exact one, including
    cells 1e-15 below the peak where FFT round-off dominates."""
    from fractions import Fraction

    import numpy as np

    from ewtune.accountant.pld_fft import circular_power

    size, steps = 64, 12
    probs = np.array([0.5, 0.3, 0.15, 0.04, 0.009, 0.001])
    probs = probs / probs.sum()
    circle, bound = circular_power([(probs, steps)], size)
    step = [Fraction(float(p)) for p in np.pad(probs, (0, size - probs.size))]
    exact = [Fraction(1)] + [Fraction(0)] * (size - 1)
    for _ in range(steps):
        exact = [sum(exact[(k - j) % size] * step[j] for j in range(probs.size)) for k in range(size)]
    errors = [abs(Fraction(float(value)) - truth) for value, truth in zip(circle, exact)]
    assert max(errors) <= bound
    assert bound < 1e-12  # and it is a usable bound, not a vacuous one
    assert min(exact) < 1e-15 * max(exact)  # the tail cells are there


def test_tilted_window_near_its_centre_bounds_the_exact_composition_above_its_start():
    """The tilted composition whose circle starts a few standard deviations below the tilted centre (pld_engine,
    step 4) against the same discrete PMF composed exactly by direct convolution: its delta is never below the
    exact one above its start, within 1e-6 of it, on a circle no larger than the full window's."""
    import math

    import numpy as np

    from ewtune.accountant.pld_engine import compose
    from ewtune.accountant.pld_grid import Direction, step_pmf

    h, steps, tilt = 2.0**-7, 30, 2.0
    pmf = step_pmf(Direction.REMOVE, 0.2, 1.0, h, 1e-20)
    exact = np.array([1.0])
    for _ in range(steps):
        exact = np.convolve(exact, pmf.probs)  # non-negative terms only: relative rounding below 1e-12
    losses = (steps * pmf.offset + np.arange(exact.size)) * h
    infinite = -math.expm1(steps * math.log1p(-pmf.infinite))
    near = compose(((pmf, steps),), h, 2.5e-13, tilt)
    full = compose(((pmf, steps),), h, 2.5e-13, tilt, near_centre=False)
    assert near.start > full.start + 1.0 and near.probs.size <= full.probs.size
    for epsilon in np.linspace(near.start + h, near.start + 3.0, 7):
        above = losses > epsilon
        truth = infinite + float(np.sum(-np.expm1(epsilon - losses[above]) * exact[above]))
        assert truth * (1 - 1e-12) <= near.delta(epsilon) <= truth * (1 + 1e-6), (epsilon, near.delta(epsilon), truth)


def test_issue_20_tail_case_near_full_batch_is_above_the_optimistic_bracket():
    """q = 0.999 (still the FFT), replace-one, delta near 1e-11, many steps: the regime where round-off made
    the bound fall below the truth."""
    bound = certified_epsilon(PoissonGaussianEvent(0.999, 161.3155692, 3000, Neighbouring.REPLACE_ONE), 3.3656e-11)
    optimistic = dp_accounting_epsilon(0.999, 161.3155692, 3000, Neighbouring.REPLACE_ONE, 3.3656e-11, 2e-4, False)
    pessimistic = dp_accounting_epsilon(0.999, 161.3155692, 3000, Neighbouring.REPLACE_ONE, 3.3656e-11, 1e-4, True)
    assert optimistic <= bound <= pessimistic * (1 + TIGHTNESS)
