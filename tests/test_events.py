import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ewtune.accountant.errors import InvalidInputError, UnknownEventKindError
from ewtune.accountant.events import (
    ComposedEvent,
    Neighbouring,
    PoissonGaussianEvent,
    compose,
    event_from_json,
    event_to_json,
    mechanisms,
    neighbouring_of,
    to_dp_accounting,
    total_steps,
)

rates = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, exclude_min=False)
sigmas = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
steps = st.integers(min_value=1, max_value=10**7)
gaussian_events = st.builds(
    PoissonGaussianEvent, rates, sigmas, steps, st.sampled_from(list(Neighbouring))
)
events = st.recursive(gaussian_events, lambda inner: st.lists(inner, max_size=4).map(lambda xs: ComposedEvent(tuple(xs))), max_leaves=8)


@given(events)
def test_json_round_trip_is_exact(event):
    text = json.dumps(event_to_json(event))
    assert event_from_json(json.loads(text)) == event


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampling_rate=0.0, noise_multiplier=1.0, steps=1), "sampling rate"),
        (dict(sampling_rate=1.5, noise_multiplier=1.0, steps=1), "sampling rate"),
        (dict(sampling_rate=0.1, noise_multiplier=0.0, steps=1), "noise multiplier"),
        (dict(sampling_rate=0.1, noise_multiplier=float("inf"), steps=1), "noise multiplier"),
        (dict(sampling_rate=0.1, noise_multiplier=1.0, steps=0), "steps"),
        (dict(sampling_rate=0.1, noise_multiplier=1.0, steps=2.5), "steps"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        PoissonGaussianEvent(**kwargs)


def test_unknown_kind_and_schema_are_refused_not_guessed():
    with pytest.raises(UnknownEventKindError, match="laplace"):
        event_from_json({"schema": 1, "event": {"kind": "laplace", "scale": 1.0}})
    with pytest.raises(UnknownEventKindError, match="schema"):
        event_from_json({"schema": 2, "event": PoissonGaussianEvent(0.1, 1.0, 3).to_json()})


def test_mechanisms_merge_steps_of_identical_mechanisms():
    a = PoissonGaussianEvent(0.01, 1.0, 100)
    b = PoissonGaussianEvent(0.02, 1.2, 50)
    event = compose(a, compose(b, a))
    assert mechanisms(event) == {
        (0.01, 1.0, Neighbouring.ADD_REMOVE): 200,
        (0.02, 1.2, Neighbouring.ADD_REMOVE): 50,
    }
    assert total_steps(event) == 250


def test_mixed_neighbouring_relations_are_refused():
    event = compose(
        PoissonGaussianEvent(0.01, 1.0, 10),
        PoissonGaussianEvent(0.01, 1.0, 10, Neighbouring.REPLACE_ONE),
    )
    with pytest.raises(InvalidInputError, match="mixes"):
        neighbouring_of(event)


def test_conversion_to_dp_accounting_preserves_parameters():
    import dp_accounting

    converted, relation = to_dp_accounting(compose(PoissonGaussianEvent(0.01, 1.5, 7)))
    assert relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    assert isinstance(converted, dp_accounting.ComposedDpEvent)
    (inner,) = converted.events
    assert inner.count == 7
    assert inner.event.sampling_probability == 0.01
    assert inner.event.event.noise_multiplier == 1.5


def test_dp_accounting_conversion_carries_the_replace_one_relation():
    """Replace-one, q 0.01, sigma 1, 1000 steps, delta 1e-5: dp_accounting's PLD gives 1.83 when the relation
    is dropped (its default is add/remove-one) and 2.84 with it, the value of our certified accountant."""
    from dp_accounting.pld import pld_privacy_accountant

    from ewtune.accountant.certified import certified_epsilon

    event = PoissonGaussianEvent(0.01, 1.0, 1000, Neighbouring.REPLACE_ONE)
    converted, relation = to_dp_accounting(event)
    carried = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=1e-4)
    carried.compose(converted)
    dropped = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    dropped.compose(converted)
    assert dropped.get_epsilon(1e-5) == pytest.approx(1.83, abs=0.01)
    assert carried.get_epsilon(1e-5) == pytest.approx(2.84, abs=0.01)
    assert carried.get_epsilon(1e-5) == pytest.approx(certified_epsilon(event, 1e-5), rel=2e-3)


def test_dp_accounting_conversion_refuses_mixed_relations():
    event = compose(PoissonGaussianEvent(0.01, 1.0, 10), PoissonGaussianEvent(0.01, 1.0, 10, Neighbouring.REPLACE_ONE))
    with pytest.raises(InvalidInputError, match="mixes"):
        to_dp_accounting(event)
