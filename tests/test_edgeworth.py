"""The Edgeworth accountant: PLLR cumulants, the expansion, EW-Tune's published run, composition."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from ewtune.accountant.cumulants import directions, step_cumulants
from ewtune.accountant.edgeworth import composed_cumulants, edgeworth_bound_epsilon, edgeworth_delta, edgeworth_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent, compose

# EW-Tune SST-2 (arXiv 2210.15042; star-ailab/LLM_Tune logs): q = B/N = 2000/67349, 20 epochs.
SST2 = PoissonGaussianEvent(0.029696060817532555, 0.7865, 660)


def _quad_cumulants(q, sigma, side, pair="remove"):
    """Reference: central moments by QUADPACK on the real line (as the Edgeworth paper's code does)."""
    mu = 1.0 / sigma

    def gauss(z, centre):
        return math.exp(-((z - centre) ** 2) / 2) / math.sqrt(2 * math.pi)

    def mixture(z, centre):
        return (1 - q) * gauss(z, 0.0) + q * gauss(z, centre)

    null_density = (lambda z: gauss(z, 0.0)) if pair == "remove" else (lambda z: mixture(z, -mu))

    def log_mixture_over_gauss(z, centre):  # log(mixture(z, centre) / gauss(z, 0)), stably
        return math.log1p(q * math.expm1(centre * z - mu * mu / 2))

    def pllr(z):
        if pair == "remove":
            return log_mixture_over_gauss(z, mu)
        return log_mixture_over_gauss(z, mu) - log_mixture_over_gauss(z, -mu)

    density = null_density if side == "null" else (lambda z: mixture(z, mu))

    def expect(h):
        # split at the centres of the components so QUADPACK sees every bump
        points = [-mu - 30.0, -mu, 0.0, mu, mu + 30.0]
        return sum(
            integrate.quad(lambda z: h(z) * density(z), a, b, epsabs=0, epsrel=1e-12, limit=400)[0]
            for a, b in zip(points[:-1], points[1:])
        )

    mean = expect(pllr)
    m = [expect(lambda z, k=k: (pllr(z) - mean) ** k) for k in (2, 3, 4, 5)]
    return (mean, m[0], m[1], m[2] - 3 * m[0] ** 2, m[3] - 10 * m[1] * m[0])


@pytest.mark.parametrize("q, sigma", [(0.029696060817532555, 0.7865), (0.01, 2.0), (1e-4, 0.5), (0.3, 10.0)])
@pytest.mark.parametrize("side", ["null", "alternative"])
@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
def test_trapezoid_cumulants_match_quadpack(q, sigma, side):
    ours = getattr(step_cumulants(q, sigma, "remove"), side).kappa
    reference = _quad_cumulants(q, sigma, side)
    for j, (a, b) in enumerate(zip(ours, reference), start=1):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-14 * abs(reference[1])), f"kappa_{j}"


def test_first_cumulants_are_the_kl_divergences():
    # E_Q[l] = -KL(Q||P) <= 0 and E_P[l] = KL(P||Q) >= 0; for q = 1 the pair is N(mu,1) vs N(0,1):
    # l = mu z - mu^2/2 is Gaussian with mean -/+ mu^2/2, variance mu^2 and no higher cumulants.
    pair = step_cumulants(1.0, 2.0, "remove")
    mu = 0.5
    assert pair.null.kappa[:2] == pytest.approx((-mu * mu / 2, mu * mu))
    assert pair.alternative.kappa[:2] == pytest.approx((mu * mu / 2, mu * mu))
    assert np.allclose(pair.null.kappa[2:], 0.0, atol=1e-12)


def test_add_direction_is_the_reversed_pair():
    remove, add = step_cumulants(0.05, 1.0, "remove"), step_cumulants(0.05, 1.0, "add")
    assert add.null.kappa == pytest.approx([(-1) ** j * k for j, k in enumerate(remove.alternative.kappa, 1)])
    assert add.alternative.kappa == pytest.approx([(-1) ** j * k for j, k in enumerate(remove.null.kappa, 1)])


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("side", ["null", "alternative"])
def test_replace_one_cumulants_match_quadpack(side):
    ours = getattr(step_cumulants(0.05, 0.8, "replace"), side).kappa
    reference = _quad_cumulants(0.05, 0.8, side, pair="replace")
    for j, (a, b) in enumerate(zip(ours, reference), start=1):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-14 * abs(reference[1])), f"kappa_{j}"


def test_replace_one_pair_is_symmetric():
    pair = step_cumulants(0.05, 1.0, "replace")
    assert pair.null.kappa == pytest.approx([(-1) ** j * k for j, k in enumerate(pair.alternative.kappa, 1)])
    assert directions(Neighbouring.REPLACE_ONE) == ("replace",)


def test_reproduces_ew_tune_sst2():
    # EW-Tune logged 7.99290 for this run (order 1, remove direction, which dominates here).
    assert abs(edgeworth_epsilon(SST2, 1e-5, order=1) - 7.9929) < 5e-4


def test_ew_tune_estimate_is_below_the_true_epsilon():
    # Tight PLD gives about 8.289 here (the certified accountant): the order-1 estimate is on the unsafe side.
    assert edgeworth_epsilon(SST2, 1e-5, order=1) < 8.2


def test_higher_orders_approach_the_true_epsilon_in_a_good_regime():
    # sigma >= 1, T >= 1000: each added order brings the estimate closer to the tight value
    # (dp_accounting PLD, max of add and remove); order 3 is within 1% here.
    event = PoissonGaussianEvent(0.1, 2.0, 1000)
    reference = _dp_accounting_pld_epsilon(event, 1e-5, 1e-4)
    errors = [abs(edgeworth_epsilon(event, 1e-5, order) / reference - 1) for order in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def _dp_accounting_pld_epsilon(event, delta, interval):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    from ewtune.accountant.events import to_dp_accounting

    dp_event, relation = to_dp_accounting(event)
    accountant = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=interval)
    accountant.compose(dp_event)
    assert isinstance(accountant, dp_accounting.PrivacyAccountant)
    return accountant.get_epsilon(delta)


def test_delta_and_epsilon_are_inverse():
    for order in (1, 2, 3):
        eps = edgeworth_epsilon(SST2, 1e-5, order)
        assert edgeworth_delta(SST2, eps, order) == pytest.approx(1e-5, rel=1e-6)


def test_delta_decreases_in_epsilon():
    deltas = [edgeworth_delta(SST2, eps) for eps in (0.5, 2.0, 4.0, 6.0, 8.0)]
    assert all(a > b for a, b in zip(deltas, deltas[1:]))


def test_tiny_delta_gives_zero_epsilon_only_when_delta_covers_everything():
    event = PoissonGaussianEvent(0.01, 5.0, 10)
    assert edgeworth_epsilon(event, 0.9) == 0.0
    assert edgeworth_epsilon(event, 1e-8) > 0.0


def test_heterogeneous_composition_is_the_sum_of_cumulants():
    phases = [(0.01, 1.0, 500), (0.02, 1.2, 300), (0.005, 0.8, 1000)]
    event = compose(*(PoissonGaussianEvent(q, s, n) for q, s, n in phases))
    for direction in ("remove", "add"):
        total = composed_cumulants(event, direction)
        for side in ("null", "alternative"):
            expected = [
                sum(n * getattr(step_cumulants(q, s, direction), side).kappa[j] for q, s, n in phases)
                for j in range(5)
            ]
            assert getattr(total, side).kappa == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "first, second",
    [
        (PoissonGaussianEvent(0.01, 1.0, 500), PoissonGaussianEvent(0.05, 2.0, 200)),
        (PoissonGaussianEvent(0.002, 0.8, 3000), PoissonGaussianEvent(0.1, 3.0, 50)),
        (PoissonGaussianEvent(0.05, 1.0, 1000), PoissonGaussianEvent(0.02, 0.8, 2000)),
    ],
)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_heterogeneous_composition_is_estimated_near_its_certified_epsilon(first, second, order):
    """The estimate of two different mechanisms composed (the cumulants of both, summed) stays within 6% of
    the certified epsilon of the same composition (measured: 1.8% to 4.4% above it); leaving out or
    double-counting either mechanism moves it far outside."""
    from ewtune.accountant.certified import certified_epsilon

    estimate = edgeworth_epsilon(compose(first, second), 1e-5, order)
    assert estimate == pytest.approx(certified_epsilon(compose(first, second), 1e-5), rel=0.06)
    assert estimate == edgeworth_epsilon(compose(second, first), 1e-5, order)


@settings(max_examples=15, deadline=None)
@given(
    q=st.floats(1e-3, 0.2),
    sigma=st.floats(1.0, 4.0),
    steps=st.integers(1000, 20000),
    ratio=st.floats(1.05, 1.5),
    order=st.sampled_from([1, 2, 3]),
)
def test_epsilon_decreases_in_sigma(q, sigma, steps, ratio, order):
    # The well-behaved regime: sigma >= 1 and T >= 1000.
    low = edgeworth_epsilon(PoissonGaussianEvent(q, sigma, steps), 1e-5, order)
    high = edgeworth_epsilon(PoissonGaussianEvent(q, sigma * ratio, steps), 1e-5, order)
    assert high <= low


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan")])
def test_bad_delta_is_refused(delta):
    with pytest.raises(InvalidInputError):
        edgeworth_epsilon(SST2, delta)


def test_bad_order_is_refused():
    with pytest.raises(InvalidInputError):
        edgeworth_epsilon(SST2, 1e-5, order=4)


def test_bound_is_vacuous_at_practical_delta():
    # The uniform error alone is ~0.1-2 here, far above delta = 1e-5.
    assert edgeworth_bound_epsilon(SST2, 1e-5) is None


def test_bound_certifies_at_large_delta_and_many_steps():
    event = PoissonGaussianEvent(0.01, 2.0, 20000)
    bound = edgeworth_bound_epsilon(event, 0.1)
    assert bound is not None and math.isfinite(bound)
    assert bound >= _dp_accounting_pld_epsilon(event, 0.1, 1e-4)
    assert bound >= edgeworth_epsilon(event, 0.1)


@pytest.mark.slow
def test_bound_on_the_edgeworth_papers_fixed_delta_example():
    # arXiv 2206.04236's fixed-delta experiment: delta = 0.1, sigma = 0.8, q = 0.08 sqrt(log n / n), n = 1e6.
    n = 10**6
    event = PoissonGaussianEvent(0.08 * math.sqrt(math.log(n) / n), 0.8, n)
    bound = edgeworth_bound_epsilon(event, 0.1)
    assert bound is not None
    assert bound >= _dp_accounting_pld_epsilon(event, 0.1, 1e-4)


def test_uniform_error_is_at_least_its_leading_term_and_shrinks_with_n():
    from ewtune.accountant.edgeworth_error import uniform_error

    k3, k3_tilde, k4, lam3 = 2.0, 3.0, 9.0, 1.0
    errors = [uniform_error(n, k3, k3_tilde, k4, lam3) for n in (10**3, 10**4, 10**5)]
    for n, error in zip((10**3, 10**4, 10**5), errors):
        assert error >= 0.1995 * k3_tilde / math.sqrt(n)
    assert errors[0] > errors[1] > errors[2]
    assert uniform_error(10, k3, k3_tilde, 100.0, lam3) == math.inf  # Delta <= 0: theorem not applicable


def test_a_negative_delta_hat_at_zero_does_not_hide_a_later_crossing():
    # Very skewed PLLR (q = 1e-4, sigma = 0.5): the truncated series gives delta_hat(0) < 0, yet it rises
    # above delta further out; epsilon is the last crossing, not 0. (It is still far below the true
    # epsilon ~3.58: a regime where the estimate is unusable.)
    event = PoissonGaussianEvent(1e-4, 0.5, 10000)
    for order in (1, 2, 3):
        eps = edgeworth_epsilon(event, 1e-8, order)
        assert eps > 0
        assert edgeworth_delta(event, 0.9 * eps, order) > 1e-8


def test_full_batch_is_exactly_gaussian_dp():
    """q = 1: the PLLR is exactly Gaussian, every Edgeworth correction vanishes, and the estimate must equal
    the analytic Gaussian mechanism's epsilon (Balle & Wang 2018, Thm 8) with mu = sqrt(T) / sigma."""
    from scipy import optimize, stats

    steps, sigma, delta = 10, 2.0, 1e-5
    mu = math.sqrt(steps) / sigma

    def gaussian_delta(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    exact = optimize.brentq(lambda e: gaussian_delta(e) - delta, 0.0, 100.0, xtol=1e-12)
    estimate = edgeworth_epsilon(PoissonGaussianEvent(1.0, sigma, steps), delta, order=1)
    assert estimate == pytest.approx(exact, rel=1e-6)


def test_tiny_noise_gives_a_finite_number_not_an_overflow():
    estimate = edgeworth_epsilon(PoissonGaussianEvent(0.5, 0.05, 100_000), 1e-5)
    assert math.isfinite(estimate) and estimate > 1e5
