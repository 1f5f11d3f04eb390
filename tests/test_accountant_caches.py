"""Caches belong to the accountant objects: a new object starts cold, objects never share what they
computed, a ledger state's accountants live as long as that state, and answering about an event without
composing it refuses what composing refuses."""

from __future__ import annotations

import pytest

from ewtune.accountant.certified import CertifiedAccountant, certified_epsilon
from ewtune.accountant.edgeworth import EdgeworthAccountant
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent, compose
from ewtune.accountant.memo import Memo
from ewtune.accountant.rdp import RdpAccountant
from ewtune.accountant.spend import LedgerState

EVENT = compose(PoissonGaussianEvent(0.01, 1.0, 200), PoissonGaussianEvent(0.02, 1.2, 100))


def test_an_accountant_keeps_what_it_computed_and_a_new_one_starts_cold():
    warm, cold = CertifiedAccountant(), CertifiedAccountant()
    epsilon = warm.epsilon_of(EVENT, 1e-5)
    filled = (len(warm._step_pmfs), len(warm._composed_pmfs), len(warm._moments), len(warm._answers))
    assert all(size > 0 for size in filled)
    assert (len(cold._step_pmfs), len(cold._composed_pmfs), len(cold._moments), len(cold._answers)) == (0, 0, 0, 0)
    assert warm.epsilon_of(EVENT, 1e-5) == epsilon == cold.epsilon_of(EVENT, 1e-5) == certified_epsilon(EVENT, 1e-5)
    # The second question was answered from the memo: nothing new was built.
    assert (len(warm._step_pmfs), len(warm._composed_pmfs), len(warm._moments), len(warm._answers)) == filled


def test_the_edgeworth_cumulants_are_cached_per_object_and_shared_by_both_directions():
    accountant = EdgeworthAccountant(order=1)
    accountant.epsilon_of(EVENT, 1e-5)
    # add/remove: the add pair is the reversed remove pair, so one integral per (q, sigma).
    assert sorted(accountant._pairs._values) == [(0.01, 1.0, "remove"), (0.02, 1.2, "remove")]
    assert len(EdgeworthAccountant(order=1)._pairs) == 0


def test_answering_about_an_event_refuses_what_composing_it_refuses():
    replace = PoissonGaussianEvent(0.01, 1.0, 10, Neighbouring.REPLACE_ONE)
    with pytest.raises(InvalidInputError, match="RDP"):
        RdpAccountant().epsilon_of(replace, 1e-5)
    with pytest.raises(InvalidInputError, match="delta must be in"):
        CertifiedAccountant().epsilon_of(EVENT, 0.0)


def test_a_ledger_state_owns_its_accountants():
    first, second = LedgerState(), LedgerState()
    assert first.accountants is not second.accountants
    key = tuple(sorted({(0.01, 1.0, Neighbouring.ADD_REMOVE): 50}.items()))
    certified, estimate = first.accountants.epsilons(key, 1e-5)
    assert certified == certified_epsilon(PoissonGaussianEvent(0.01, 1.0, 50), 1e-5) and estimate > 0
    assert second.accountants._certified is None  # nothing computed, nothing loaded
    assert first.accountants.epsilons((), 1e-5) == (0.0, 0.0)


def test_the_memo_forgets_the_least_recently_used_value_beyond_its_size():
    memo, calls = Memo(maxsize=2), []

    def value(key):
        return memo.get(key, lambda: calls.append(key) or key.upper())

    assert [value("a"), value("b"), value("a"), value("c")] == ["A", "B", "A", "C"]  # "b" is now the oldest
    assert value("a") == "A" and value("b") == "B"
    assert calls == ["a", "b", "c", "b"]
    with pytest.raises(ZeroDivisionError):
        memo.get("d", lambda: 1 / 0)
    assert "d" not in memo._values
