"""The f-DP one-run test (accountant.fdp_one_run; Mahloujifar, Melis, Chaudhuri 2025, Algorithm 3) on its own:
what it refutes for given guess counts, that its claims are ordered, and its edge cases."""

import numpy as np
import pytest

from accountant.errors import InvalidInputError
from accountant.fdp_one_run import SIGMA_GRID, _tpr_lines, fdp_bound, rejects

ALPHA = 0.05 / 8


def test_every_guess_right_refutes_a_strong_claim_and_chance_refutes_none():
    strong, weak = _tpr_lines(0.1, 50, SIGMA_GRID[-1]), _tpr_lines(0.1, 50, SIGMA_GRID[0])
    assert rejects(strong, 1000, 200, 200, ALPHA)
    assert not rejects(weak, 1000, 200, 200, ALPHA)  # sigma' 0.25 at q 0.1 x 50 steps: epsilon ~ 40, too weak to refute
    assert not any(rejects(_tpr_lines(0.1, 50, sigma), 1000, 200, 100, ALPHA) for sigma in SIGMA_GRID)  # half right
    assert not rejects(strong, 1000, 200, 0, ALPHA)


@pytest.mark.parametrize("correct", [120, 150, 180])
def test_claims_are_ordered_once_refuted_every_stronger_one_is(correct):
    refuted = [rejects(_tpr_lines(0.1, 50, sigma), 1000, 200, correct, ALPHA) for sigma in SIGMA_GRID]
    first = refuted.index(True) if True in refuted else len(refuted)
    assert refuted == [False] * first + [True] * (len(refuted) - first)


def test_perfect_scores_reach_the_ceiling_and_no_signal_gives_zero():
    included = np.arange(1000) % 2 == 0
    perfect = fdp_bound(included.astype(float), included, np.zeros(1000), 0.1, 50, 1e-5)
    assert perfect.epsilon == pytest.approx(perfect.ceiling) and perfect.epsilon > 5.19  # Steinke's ceiling at 1000
    flat = fdp_bound(np.zeros(1000), included, np.random.default_rng(0).random(1000), 0.1, 50, 1e-5)
    assert flat.epsilon == 0.0 and flat.noise_multiplier is None


def test_bad_inputs_are_refused():
    with pytest.raises(InvalidInputError):
        fdp_bound([0.0, 1.0], [True], [0.0, 0.0], 0.1, 50, 1e-5)
    with pytest.raises(InvalidInputError):
        fdp_bound([0.0, 1.0], [True, False], [0.0, 0.0], 0.1, 50, 1.0)
