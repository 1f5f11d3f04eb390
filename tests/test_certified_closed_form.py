"""The certified bound at q = 1 against the Gaussian closed form computed independently in 45-digit arithmetic
(Balle & Wang 2018, Thm. 8; mu = s sqrt(T) / sigma, s = 1 add/remove-one, 2 replace-one), over random T, sigma,
delta and both relations, the cases of issue 20 included (certified values that were below the truth, 23.6%
loose, or an exception); and every sigma > 0 gives a finite number or a one-line error, through the CLI too."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import mpmath
import pytest

from ewtune.accountant.certified import certified_delta, certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent, compose

REPLACE, ADD_REMOVE = Neighbouring.REPLACE_ONE, Neighbouring.ADD_REMOVE


def exact_epsilon(mu: mpmath.mpf, delta: float) -> mpmath.mpf:
    """Bisection in 45 digits on delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    with mpmath.workdps(45):
        curve = lambda e: mpmath.ncdf(-e / mu + mu / 2) - mpmath.exp(e) * mpmath.ncdf(-e / mu - mu / 2)  # noqa: E731
        if curve(mpmath.mpf(0)) <= delta:
            return mpmath.mpf(0)
        low, high = mpmath.mpf(0), mpmath.mpf(1)
        while curve(high) > delta:
            high *= 2
        for _ in range(160):
            middle = (low + high) / 2
            low, high = (middle, high) if curve(middle) > delta else (low, middle)
        return high


def mu_of(steps: int, sigma: float, relation: Neighbouring) -> mpmath.mpf:
    with mpmath.workdps(45):
        return (2 if relation is REPLACE else 1) * mpmath.sqrt(mpmath.mpf(steps)) / mpmath.mpf(sigma)


def check(steps: int, sigma: float, delta: float, relation: Neighbouring) -> None:
    exact = exact_epsilon(mu_of(steps, sigma, relation), delta)
    bound = certified_epsilon(PoissonGaussianEvent(1.0, sigma, steps, relation), delta)
    assert exact <= bound <= exact * (1 + 1e-9) + 1e-12, (steps, sigma, delta, relation, bound, exact)


@pytest.mark.parametrize(
    "steps, sigma, delta, relation",
    [
        (34549, 161.3155692, 3.3656e-11, REPLACE),  # were below the exact value
        (3918069, 2092.49, 4.14e-10, REPLACE),
        (10**6, 100.0, 1e-10, REPLACE),
        (10**6, 1000.0, 1e-12, ADD_REMOVE),  # was 23.6% above it
        (1, 0.05, 1e-5, REPLACE),  # was inf
        (10, 0.01, 1e-7, ADD_REMOVE),  # raised ZeroDivisionError
        (10**7, 0.5, 1e-12, REPLACE),
    ],
)
def test_issue_20_cases(steps, sigma, delta, relation):
    check(steps, sigma, delta, relation)


def test_random_configurations_never_below_the_closed_form():
    rng = random.Random(20)
    for _ in range(40):
        steps = int(10 ** rng.uniform(0, 7))
        sigma = 10 ** rng.uniform(-1.5, 3.5)
        delta = 10 ** rng.uniform(-12, -5)
        check(steps, sigma, delta, rng.choice([REPLACE, ADD_REMOVE]))


def test_heterogeneous_full_batch_phases_compose_to_one_gaussian():
    first, second = PoissonGaussianEvent(1.0, 3.0, 200, REPLACE), PoissonGaussianEvent(1.0, 7.0, 5000, REPLACE)
    with mpmath.workdps(45):
        mu = 2 * mpmath.sqrt(mpmath.mpf(200) / mpmath.mpf(3.0) ** 2 + mpmath.mpf(5000) / mpmath.mpf(7.0) ** 2)
    exact = exact_epsilon(mu, 1e-9)
    assert exact <= certified_epsilon(compose(first, second), 1e-9) <= exact * (1 + 1e-9)


def test_delta_of_the_closed_form_is_rounded_up():
    event = PoissonGaussianEvent(1.0, 20.0, 10**5, REPLACE)
    epsilon = certified_epsilon(event, 1e-10)
    assert certified_delta(event, epsilon) <= 1e-10
    with mpmath.workdps(45):
        mu = mu_of(10**5, 20.0, REPLACE)
        exact = mpmath.ncdf(-5 / mu + mu / 2) - mpmath.exp(5) * mpmath.ncdf(-5 / mu - mu / 2)
        assert certified_delta(event, 5.0) >= exact


@pytest.mark.parametrize("sampling_rate", [1.0, 0.999, 0.3, 1e-3])
@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.19])
@pytest.mark.parametrize("relation", [REPLACE, ADD_REMOVE])
def test_small_noise_gives_a_finite_sound_number(sampling_rate, sigma, relation):
    """Below 0.2 the q = 1 closed form answers for every q (sampling only helps): finite, and at q = 1 exact."""
    bound = certified_epsilon(PoissonGaussianEvent(sampling_rate, sigma, 50, relation), 1e-9)
    exact_full_batch = exact_epsilon(mu_of(50, sigma, relation), 1e-9)
    assert math.isfinite(bound) and bound <= exact_full_batch * (1 + 1e-9)


def test_absurdly_small_noise_is_a_one_line_error():
    with pytest.raises(InvalidInputError, match="too small to account"):
        certified_epsilon(PoissonGaussianEvent(1.0, 1e-200, 10), 1e-5)


@pytest.mark.parametrize("sigma, relation", [("0.01", "add_remove"), ("0.05", "replace_one"), ("1e-200", "add_remove")])
def test_cli_on_small_noise(sigma, relation):
    result = subprocess.run(
        [sys.executable, "-m", "ewtune", "accountant", "epsilon", "--sampling-rate", "0.5", "--steps", "10",
         "--noise-multiplier", sigma, "--delta", "1e-6", "--neighbouring", relation],
        capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if sigma == "1e-200":
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "too small" in result.stderr
    else:
        assert result.returncode == 0 and "inf" not in result.stdout.split("certified")[1].split("\n")[0]
