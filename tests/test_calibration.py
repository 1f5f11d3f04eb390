"""Noise calibration: certified sigma within 0.2% of the smallest, and EW-Tune's grid reproduced."""

from __future__ import annotations

import pytest

from ewtune.accountant.calibration import SIGMA_TOLERANCE, Calibration, calibrate_noise_multiplier, plan_event
from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import ComposedEvent, Neighbouring, PoissonGaussianEvent

SST2_Q, SST2_STEPS = 0.029696060817532555, 660


def assert_tight_and_certified(calibration: Calibration, epsilon, delta, phases, neighbouring=Neighbouring.ADD_REMOVE):
    sigma = calibration.noise_multiplier
    assert certified_epsilon(plan_event(phases, sigma, neighbouring), delta) <= epsilon
    assert calibration.epsilon_certified <= epsilon
    assert certified_epsilon(plan_event(phases, sigma / (1 + SIGMA_TOLERANCE), neighbouring), delta) > epsilon


@pytest.mark.parametrize(
    "epsilon, delta, phases",
    [
        (8.0, 1e-5, [(SST2_Q, SST2_STEPS)]),
        (1.0, 1e-5, [(1e-3, 100000)]),
        (0.5, 1e-8, [(0.1, 100)]),
        (50.0, 1e-5, [(0.5, 10)]),
    ],
)
def test_certified_sigma_meets_the_target_and_is_tight(epsilon, delta, phases):
    calibration = calibrate_noise_multiplier(epsilon, delta, phases)
    assert calibration.policy == "certified"
    assert_tight_and_certified(calibration, epsilon, delta, phases)
    assert calibration.certified_evaluations <= 10


def test_heterogeneous_plan():
    phases = [(0.01, 500), (0.02, 300), (0.005, 1000)]
    calibration = calibrate_noise_multiplier(3.0, 1e-6, phases)
    assert_tight_and_certified(calibration, 3.0, 1e-6, phases)
    assert isinstance(plan_event(phases, calibration.noise_multiplier), ComposedEvent)


def test_replace_one_needs_more_noise():
    phases = [(0.01, 1000)]
    add_remove = calibrate_noise_multiplier(2.0, 1e-5, phases)
    replace_one = calibrate_noise_multiplier(2.0, 1e-5, phases, neighbouring=Neighbouring.REPLACE_ONE)
    assert_tight_and_certified(replace_one, 2.0, 1e-5, phases, Neighbouring.REPLACE_ONE)
    assert replace_one.noise_multiplier > add_remove.noise_multiplier


def test_ewtune_reproduction_and_what_it_really_buys():
    """EW-Tune's SST-2 run: its grid on the order-1 Edgeworth estimate picks sigma = 0.7865 (ε-estimate
    7.9929, logged as 7.99290), whose certified epsilon is about 8.29, not 8."""
    calibration = calibrate_noise_multiplier(8.0, 1e-5, [(SST2_Q, SST2_STEPS)], policy="edgeworth")
    assert calibration.noise_multiplier == 0.7865
    assert calibration.epsilon_edgeworth == pytest.approx(7.9929, abs=5e-5)
    assert 8.289 <= calibration.epsilon_certified <= 8.30
    honest = calibrate_noise_multiplier(8.0, 1e-5, [(SST2_Q, SST2_STEPS)])
    assert 0.797 < honest.noise_multiplier < 0.800  # notes: PLD needs 0.7982 for epsilon 8


def test_plan_event_single_and_composed():
    assert plan_event([(0.01, 10)], 1.5) == PoissonGaussianEvent(0.01, 1.5, 10)
    composed = plan_event([(0.01, 10), (0.02, 5)], 1.5, Neighbouring.REPLACE_ONE)
    assert [e.sampling_rate for e in composed.events] == [0.01, 0.02]
    assert all(e.neighbouring is Neighbouring.REPLACE_ONE for e in composed.events)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(phases=[]), "phase"),
        (dict(phases=[(0.01,)]), "phase"),
        (dict(phases=[(1.5, 10)]), "sampling rate"),
        (dict(phases=[(0.01, 0)]), "steps"),
        (dict(policy="rdp"), "policy"),
        (dict(epsilon=1e-4, phases=[(0.5, 100000)]), "unreachable"),
    ],
)
def test_invalid_targets_are_refused_with_one_line(kwargs, message):
    arguments = dict(epsilon=1.0, delta=1e-5, phases=[(0.01, 100)]) | kwargs
    with pytest.raises(InvalidInputError, match=message) as raised:
        calibrate_noise_multiplier(**arguments)
    assert "\n" not in str(raised.value)
