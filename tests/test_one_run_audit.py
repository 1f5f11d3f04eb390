"""The one-run audit's statistics (ewtune/accountant/one_run_audit.py) and the canary scores (ewtune/accountant/canary_scores.py)."""

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from ewtune.accountant.canary_scores import likelihood_ratio_scores
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.one_run_audit import check_audit_layout, epsilon_lower_bound, guess_grid, one_run_bound, p_value

ALPHA = 0.05 / 8


def test_all_guesses_right_without_delta_reaches_the_closed_form_ceiling():
    for guesses in (10, 100, 1000):
        target = alpha_root = ALPHA ** (1.0 / guesses)
        assert epsilon_lower_bound(guesses, guesses, 1000, 0.0, ALPHA) == pytest.approx(math.log(target / (1 - alpha_root)), abs=1e-6)


def test_chance_level_guessing_bounds_nothing_and_the_bound_grows_with_correct_guesses():
    assert epsilon_lower_bound(200, 100, 1000, 1e-5, ALPHA) == 0.0
    bounds = [epsilon_lower_bound(200, v, 1000, 1e-5, ALPHA) for v in range(100, 201, 10)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:])) and bounds[-1] > 2.5


def test_delta_only_raises_the_p_value_and_lowers_the_bound():
    for epsilon in (0.0, 0.5, 1.0, 2.0):
        assert p_value(epsilon, 300, 220, 1000, 1e-5) >= p_value(epsilon, 300, 220, 1000, 0.0)
    assert epsilon_lower_bound(300, 280, 1000, 1e-3, ALPHA) < epsilon_lower_bound(300, 280, 1000, 0.0, ALPHA)


def test_p_value_without_delta_is_the_binomial_tail():
    p = 1 / (1 + math.exp(-0.7))
    assert p_value(0.7, 50, 35, 1000, 0.0) == pytest.approx(binom.sf(34, 50, p), rel=1e-12)


def test_grid_at_1000_canaries_and_its_ceiling_of_5_19():
    assert guess_grid(1000) == ((25, 25), (50, 50), (100, 100), (200, 200), (350, 350), (500, 500), (100, 0), (300, 0))
    assert all(k_plus + k_minus <= 100 for k_plus, k_minus in guess_grid(100))
    included = np.arange(1000) % 2 == 0
    perfect = one_run_bound(included.astype(float), included, 1e-5, np.zeros(1000))
    assert perfect.ceiling == pytest.approx(5.19, abs=0.01)  # the ceiling for m = 1000, 95%, 8 guess counts
    assert perfect.epsilon == pytest.approx(perfect.ceiling, abs=1e-6)


def test_the_bound_holds_on_an_exactly_epsilon_dp_mechanism():
    """Randomised response on each canary's bit is exactly 1-DP (delta 0): the bound must stay below 1 at 95%
    confidence (here with a margin, as it does for a correct engine) and must not be trivially 0."""
    rng = np.random.default_rng(7)
    epsilon, bounds = 1.0, []
    for _ in range(40):
        included = rng.random(1000) < 0.5
        truthful = rng.random(1000) < 1 / (1 + math.exp(-epsilon))
        released = np.where(truthful, included, ~included).astype(float)
        bounds.append(one_run_bound(released, included, 0.0, rng.random(1000), grid=[(500, 500)]).epsilon)
    assert sum(bound > epsilon for bound in bounds) <= 2  # at most 5% of the trials
    assert np.mean(bounds) > 0.6


def test_tie_breaking_decides_between_equal_scores():
    included = np.array([True, False, True, False])
    scores = np.zeros(4)
    ordered_well = one_run_bound(scores, included, 0.0, np.array([3.0, 0.0, 2.0, 1.0]), grid=[(2, 2)])
    assert ordered_well.counts[0].correct == 4
    ordered_badly = one_run_bound(scores, included, 0.0, np.array([0.0, 3.0, 1.0, 2.0]), grid=[(2, 2)])
    assert ordered_badly.counts[0].correct == 0


def test_bad_input_is_refused():
    with pytest.raises(InvalidInputError):
        one_run_bound([1.0, math.nan], [True, False], 1e-5, [0.0, 1.0])
    with pytest.raises(InvalidInputError):
        one_run_bound([1.0, 0.0], [True, False], 1e-5, [0.0, 1.0], grid=[(2, 1)])
    with pytest.raises(InvalidInputError):
        epsilon_lower_bound(10, 11, 100, 0.0, ALPHA)


def test_scores_are_the_exact_log_likelihood_ratio_of_a_round():
    """log sum_k Binom(k; L, q) N(y; k, L s^2) / N(y; 0, L s^2), computed from densities directly."""
    q, sigma, steps = 0.1, 2.0, 5
    y = np.array([[-3.0, 0.0, 1.0, 4.0]])
    expected = np.log(sum(
        binom.pmf(k, steps, q) * norm.pdf(y, k, sigma * math.sqrt(steps)) / norm.pdf(y, 0, sigma * math.sqrt(steps))
        for k in range(steps + 1)
    ))[0]
    assert likelihood_ratio_scores(y, q, sigma, steps) == pytest.approx(expected, rel=1e-10)
    one_step = likelihood_ratio_scores(y, q, sigma, 1)
    assert one_step == pytest.approx(np.log(1 - q + q * np.exp((y[0] - 0.5) / sigma**2)), rel=1e-12)
    assert likelihood_ratio_scores(np.vstack([y, y]), q, sigma, 1) == pytest.approx(2 * one_step)


def test_an_audit_layout_needs_whole_counts_two_canaries_per_holder_and_whole_releases():
    from types import SimpleNamespace

    good = SimpleNamespace(canaries=6, holders=3, steps=20, local_steps=10)
    check_audit_layout(good, ("canaries", "holders", "steps", "local_steps"))
    for changes, message in [
        ({"canaries": 0}, "canaries must be an integer >= 1"),
        ({"local_steps": True}, "local steps must be an integer >= 1"),
        ({"canaries": 5}, "at least 2 canaries per holder"),
        ({"steps": 25}, "multiple of local steps"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            check_audit_layout(SimpleNamespace(**{**vars(good), **changes}), ("canaries", "holders", "steps", "local_steps"))
