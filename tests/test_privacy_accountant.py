"""The accountant interface (ewtune.accountant.privacy_accountant): every accountant composes events and answers
epsilon(delta) and delta(epsilon) consistently with its own functions; bad delta and epsilon are refused
the same way everywhere."""

import math

import pytest

from ewtune.accountant.accountants import standard_accountants
from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent, compose
from ewtune.accountant.privacy_accountant import Kind

EVENT = PoissonGaussianEvent(0.01, 1.0, 500)


def test_the_accountants_are_listed_once_each_with_the_guarantee_first():
    accountants = standard_accountants()
    assert [a.name for a in accountants] == [
        "certified", "edgeworth", "edgeworth_order2", "edgeworth_order3", "edgeworth_bound", "rdp",
    ]
    assert accountants[0].kind is Kind.BOUND
    assert [a.name for a in accountants if a.kind is Kind.ESTIMATE] == ["edgeworth", "edgeworth_order2", "edgeworth_order3"]
    assert [a.name for a in standard_accountants(rdp=False)] == [a.name for a in accountants[:-1]]


@pytest.mark.parametrize("accountant", standard_accountants(), ids=lambda a: a.name)
def test_delta_at_the_reported_epsilon_is_about_delta(accountant):
    delta = 1e-3
    accountant.compose(EVENT, count=2)
    epsilon = accountant.get_epsilon(delta)
    if epsilon is None:  # the Edgeworth bound is vacuous at this delta
        assert accountant.name == "edgeworth_bound"
        return
    assert math.isfinite(epsilon) and epsilon > 0
    back = accountant.get_delta(epsilon)
    if accountant.kind is Kind.BOUND:
        assert back <= delta * (1 + 1e-6), accountant.name
    assert back == pytest.approx(delta, rel=0.05), accountant.name


def test_the_certified_accountant_answers_what_certified_epsilon_does():
    accountant = standard_accountants()[0].compose(EVENT).compose(PoissonGaussianEvent(0.02, 1.5, 300))
    assert accountant.get_epsilon(1e-5) == certified_epsilon(compose(EVENT, PoissonGaussianEvent(0.02, 1.5, 300)), 1e-5)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, float("nan"), True, "1e-5"])
def test_every_accountant_refuses_a_bad_delta_in_one_line(delta):
    for accountant in standard_accountants():
        with pytest.raises(InvalidInputError, match=r"^delta must be in \(0, 1\)"):
            accountant.compose(EVENT).get_epsilon(delta)


@pytest.mark.parametrize("epsilon", [-1.0, float("inf"), float("nan"), None])
def test_every_accountant_refuses_a_bad_epsilon_in_one_line(epsilon):
    for accountant in standard_accountants():
        with pytest.raises(InvalidInputError, match=r"^epsilon must be a finite number >= 0"):
            accountant.compose(EVENT).get_delta(epsilon)


def test_rdp_does_not_support_replace_one_and_says_why():
    rdp = standard_accountants()[-1]
    replace = PoissonGaussianEvent(0.01, 1.0, 10, Neighbouring.REPLACE_ONE)
    assert rdp.supports(EVENT) and not rdp.supports(replace)
    with pytest.raises(InvalidInputError, match="replace-one"):
        rdp.compose(replace)


def test_nothing_composed_is_an_error():
    with pytest.raises(InvalidInputError, match="nothing has been composed"):
        standard_accountants()[0].get_epsilon(1e-5)
