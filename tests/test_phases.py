"""A recipe in phases under one budget: each phase's sigma is the smallest (within 0.2%) that keeps the
composition so far within its share, and the composed event's certified epsilon is the total."""

import pytest

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.phases import Phase, calibrate_phases, composed

PROBE = Phase("probe", 0.02, 300, budget_share=0.5)
TUNE = Phase("tune", 0.01, 200)


def test_phases_meet_their_shares_and_compose_to_the_total():
    probe, tune = calibrate_phases(8.0, 1e-5, [PROBE, TUNE])
    assert probe.epsilon_certified_so_far <= 4.0 and tune.epsilon_certified_so_far <= 8.0
    total = certified_epsilon(compose(probe.event, tune.event), 1e-5)
    assert total == pytest.approx(tune.epsilon_certified_so_far, rel=1e-12)
    assert certified_epsilon(composed([probe, tune]), 1e-5) == total
    # smallest: 0.3% less noise breaks the share (the tolerance is 0.2%)
    assert certified_epsilon(PoissonGaussianEvent(0.02, probe.event.noise_multiplier * 0.997, 300), 1e-5) > 4.0
    thinner = PoissonGaussianEvent(0.01, tune.event.noise_multiplier * 0.997, 200)
    assert certified_epsilon(compose(probe.event, thinner), 1e-5) > 8.0


def test_the_composition_is_far_below_the_sum_of_separate_epsilons():
    probe, tune = calibrate_phases(8.0, 1e-5, [PROBE, TUNE])
    alone = certified_epsilon(tune.event, 1e-5)
    assert probe.epsilon_certified_so_far + alone > tune.epsilon_certified_so_far + 0.5


def test_a_single_phase_takes_the_whole_budget():
    (only,) = calibrate_phases(1.0, 1e-5, [Phase("probe", 0.05, 100)])
    assert 0.99 <= only.epsilon_certified_so_far <= 1.0


@pytest.mark.parametrize("shares", [[None], [1.0], [0.7, 0.4]])
def test_bad_shares_are_refused(shares):
    phases = [Phase(f"p{i}", 0.01, 10, s) for i, s in enumerate(shares)] + [TUNE]
    with pytest.raises(InvalidInputError, match="budget share"):
        calibrate_phases(8.0, 1e-5, phases)
