"""The certified accountant: sound (never below the truth) and tight (within 0.5% of it).

Truth is known exactly in two places: one step (closed-form hockey-stick divergence of the subsampled
Gaussian pair) and q = 1 (the composition of T Gaussian mechanisms is mu-GDP with mu = sqrt(T)/sigma, or
2 sqrt(T)/sigma for replace-one; Dong, Roth, Su 2022, Cor. 2.13). Elsewhere it is bracketed by dp_accounting
at two fine intervals, precomputed in tests/data/pld_reference.json by tests/data/make_pld_reference.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special

from ewtune.accountant.certified import CERTIFIED_ACCOUNTANT, certified_delta, certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent, compose

REFERENCE = json.loads((Path(__file__).parent / "data" / "pld_reference.json").read_text())
TIGHTNESS = 0.005  # the promise: within 0.5% of the exact epsilon


def _event(relation: str, phases) -> PoissonGaussianEvent:
    neighbouring = Neighbouring(relation)
    events = [PoissonGaussianEvent(q, sigma, int(steps), neighbouring) for q, sigma, steps in phases]
    return events[0] if len(events) == 1 else compose(*events)


# --- exact truths ----------------------------------------------------------------------------------


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), in log space."""
    first = special.log_ndtr(-epsilon / mu + mu / 2)
    second = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return math.exp(first) * -math.expm1(second - first)


def gdp_epsilon(delta: float, mu: float) -> float:
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    return optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, 1e5, xtol=1e-14, rtol=1e-14)


def one_step_remove_delta(q: float, sigma: float, epsilon: float) -> float:
    """Exact delta(eps) of one step, remove pair (1-q)N(0,1) + qN(mu,1) against N(0,1) (Koskela et al.
    2020, Sec. 6): the loss exceeds eps beyond z = (log((e^eps - 1 + q)/q) + mu^2/2) / mu."""
    mu = 1.0 / sigma
    z = (math.log((math.expm1(epsilon) + q) / q) + mu * mu / 2) / mu
    return (1 - q) * special.ndtr(-z) + q * special.ndtr(mu - z) - math.exp(epsilon) * special.ndtr(-z)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 5.0])
@pytest.mark.parametrize("steps", [1, 10, 1000])
@pytest.mark.parametrize("delta", [1e-8, 1e-5])
def test_full_batch_gaussian_matches_exact_gdp(sigma, steps, delta):
    exact = gdp_epsilon(delta, math.sqrt(steps) / sigma)
    bound = certified_epsilon(PoissonGaussianEvent(1.0, sigma, steps), delta)
    assert exact <= bound <= exact * (1 + TIGHTNESS)


@pytest.mark.parametrize("sigma, steps", [(1.0, 10), (3.0, 100)])
def test_replace_one_full_batch_is_gdp_with_twice_the_sensitivity(sigma, steps):
    exact = gdp_epsilon(1e-6, 2 * math.sqrt(steps) / sigma)
    bound = certified_epsilon(PoissonGaussianEvent(1.0, sigma, steps, Neighbouring.REPLACE_ONE), 1e-6)
    assert exact <= bound <= exact * (1 + TIGHTNESS)


@pytest.mark.parametrize("q, sigma", [(1e-3, 0.6), (0.02, 1.0), (0.3, 2.0), (0.5, 0.5)])
@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.5, 2.0, 6.0])
def test_one_step_delta_is_never_below_the_exact_value(q, sigma, epsilon):
    exact = one_step_remove_delta(q, sigma, epsilon)
    bound = certified_delta(PoissonGaussianEvent(q, sigma, 1), epsilon)
    assert bound >= exact  # add/remove is the max over both pairs, so it bounds the remove pair too
    if exact > 1e-9:
        assert bound <= exact * 1.05


# --- the dp_accounting reference grid ------------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["name"])
def test_within_the_dp_accounting_bracket(case):
    """lower = 2 e(h) - e(2h) <= truth <= e(h) (make_pld_reference.py explains the bracket). The bound
    must not fall below the lower bracket, and must be within 0.5% of it, hence of the truth."""
    event = _event(case["relation"], case["phases"])
    for delta_key, fine in case["epsilon_fine"].items():
        lower = 2 * fine - case["epsilon_coarse"][delta_key]
        bound = certified_epsilon(event, float(delta_key))
        assert lower <= bound <= lower * (1 + TIGHTNESS), (delta_key, lower, fine, bound)


def test_reference_covers_the_required_grid():
    phases = [phase for case in REFERENCE["cases"] for phase in case["phases"]]
    assert min(q for q, _, _ in phases) <= 1e-4 and max(q for q, _, _ in phases) >= 0.5
    assert min(s for _, s, _ in phases) <= 0.5 and max(s for _, s, _ in phases) >= 10
    assert min(t for _, _, t in phases) <= 10 and max(t for _, _, t in phases) >= 1e5
    assert min(REFERENCE["deltas"]) <= 1e-8 and max(REFERENCE["deltas"]) >= 1e-5
    assert any(len(case["phases"]) > 1 for case in REFERENCE["cases"])
    assert any(case["relation"] == "replace_one" for case in REFERENCE["cases"])


def test_live_against_dp_accounting():
    """One cheap case recomputed now, not from the file: dp_accounting at 1e-4 is itself an upper bound
    and 2 e(1e-4) - e(2e-4) a lower one."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    def reference(interval):
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(2.0)), 200)
        return accountant.get_epsilon(1e-6)

    fine, coarse = reference(1e-4), reference(2e-4)
    lower = 2 * fine - coarse
    bound = certified_epsilon(PoissonGaussianEvent(0.05, 2.0, 200), 1e-6)
    assert lower <= bound <= lower * (1 + TIGHTNESS)


# --- properties ------------------------------------------------------------------------------------------

_q = st.sampled_from([1e-4, 1e-3, 0.01, 0.05, 0.2])
_sigma = st.sampled_from([0.6, 0.9, 1.3, 2.5, 6.0])
_steps = st.sampled_from([10, 100, 1000, 10000])


@settings(max_examples=8, deadline=None)
@given(_q, _sigma, _steps)
def test_monotone_in_sigma_steps_and_q(q, sigma, steps):
    base = certified_epsilon(PoissonGaussianEvent(q, sigma, steps), 1e-6)
    assert certified_epsilon(PoissonGaussianEvent(q, sigma * 1.25, steps), 1e-6) <= base
    assert certified_epsilon(PoissonGaussianEvent(q, sigma, steps * 2), 1e-6) >= base
    assert certified_epsilon(PoissonGaussianEvent(min(1.0, q * 1.5), sigma, steps), 1e-6) >= base


@pytest.mark.parametrize(
    "first, second",
    [
        (PoissonGaussianEvent(0.01, 1.0, 500), PoissonGaussianEvent(0.05, 2.0, 200)),
        (PoissonGaussianEvent(0.002, 0.8, 3000), PoissonGaussianEvent(0.1, 3.0, 50)),
    ],
)
def test_a_heterogeneous_composition_matches_an_independent_pld_accountant(first, second):
    """Two different mechanisms, composed (as LP-FT's phases are): our certified epsilon against
    dp_accounting's pessimistic PLD at 1e-4 composing the same two events independently (measured: within
    0.01%), and above either mechanism alone."""
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    from ewtune.accountant.events import to_dp_accounting

    ours = certified_epsilon(compose(first, second), 1e-5)
    reference = PLDAccountant(value_discretization_interval=1e-4)
    for event in (first, second):
        reference.compose(to_dp_accounting(event)[0])
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-3)
    assert ours > max(certified_epsilon(first, 1e-5), certified_epsilon(second, 1e-5))


@settings(max_examples=6, deadline=None)
@given(_q, _sigma, _steps, st.sampled_from([1e-8, 1e-6, 1e-5]))
def test_delta_of_epsilon_of_delta_is_at_most_delta(q, sigma, steps, delta):
    event = PoissonGaussianEvent(q, sigma, steps)
    assert certified_delta(event, certified_epsilon(event, delta)) <= delta


def test_heterogeneous_composition_lies_between_its_parts():
    first, second = PoissonGaussianEvent(0.01, 1.0, 500), PoissonGaussianEvent(0.02, 1.2, 300)
    both = certified_epsilon(compose(first, second), 1e-5)
    assert max(certified_epsilon(first, 1e-5), certified_epsilon(second, 1e-5)) < both
    assert both < certified_epsilon(first, 5e-6) + certified_epsilon(second, 5e-6)  # basic composition
    assert certified_epsilon(compose(second, first), 1e-5) == both


def test_replace_one_exceeds_add_remove():
    add_remove = certified_epsilon(PoissonGaussianEvent(0.01, 1.0, 1000), 1e-5)
    replace_one = certified_epsilon(PoissonGaussianEvent(0.01, 1.0, 1000, Neighbouring.REPLACE_ONE), 1e-5)
    assert replace_one > add_remove


def test_ewtune_sst2_is_about_8_29_not_8():
    bound = certified_epsilon(PoissonGaussianEvent(0.029696060817532555, 0.7865, 660), 1e-5)
    assert 8.289 <= bound <= 8.289 * (1 + TIGHTNESS)


def test_delta_at_extreme_epsilons():
    event = PoissonGaussianEvent(0.5, 0.5, 10)
    assert certified_delta(event, 1000.0) < 1e-12
    assert certified_delta(event, 0.0) > 0.5


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan"), "1e-5", True])
def test_bad_delta_is_refused(delta):
    with pytest.raises(InvalidInputError, match="delta"):
        certified_epsilon(PoissonGaussianEvent(0.01, 1.0, 10), delta)


@pytest.mark.parametrize("epsilon", [-0.1, float("inf"), float("nan"), None])
def test_bad_epsilon_is_refused(epsilon):
    with pytest.raises(InvalidInputError, match="epsilon"):
        certified_delta(PoissonGaussianEvent(0.01, 1.0, 10), epsilon)


def test_mixed_relations_are_refused():
    mixed = compose(PoissonGaussianEvent(0.01, 1.0, 10), PoissonGaussianEvent(0.01, 1.0, 10, Neighbouring.REPLACE_ONE))
    with pytest.raises(InvalidInputError):
        certified_epsilon(mixed, 1e-5)


def test_a_ledger_pins_the_accountant_and_another_version_does_not_claim_to_check_it(tmp_path, monkeypatch):
    """The pinned description ties a ledger's stated epsilons to the engine that computed them. The bug this
    catches: a verifier that ignores the pin and reports an old ledger's figures as recomputed by a newer
    engine (whose numbers may differ)."""
    import ewtune.accountant.certified as certified
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.signing import SigningKey
    from ewtune.accountant.verify import verify_ledger

    path, event = tmp_path / "ledger.jsonl", PoissonGaussianEvent(0.01, 1.0, 50)
    with Ledger.create(path, SigningKey.generate(), "h", {"budget_epsilon": 8.0, "budget_delta": 1e-5}) as ledger:
        ledger.commit(ledger.reserve("h", "run", 0, event), event)
    assert verify_ledger(path).ok  # written and checked by the same engine
    for field in ("name", "version", "discretisation"):
        monkeypatch.setattr(certified, "CERTIFIED_ACCOUNTANT", {**CERTIFIED_ACCOUNTANT, field: "another"})
        report = verify_ledger(path)
        assert not report.ok and "stated epsilons were not checked" in report.accountant_mismatch, field


def test_tiny_delta_still_gets_a_finite_sound_bound():
    """Far below the FFT's round-off, the tilted composition (and, where even that yields nothing finite, the
    q = 1 closed form) still gives a finite bound, larger than at any practical delta."""
    event = PoissonGaussianEvent(0.01, 1.0, 1000)
    tiny = certified_epsilon(event, 1e-100)
    assert math.isfinite(tiny) and tiny > certified_epsilon(event, 1e-8)
