"""The f-DP one-run test of the DP-SGD hypothesis (ewtune.accountant.fdp_one_run; Mahloujifar, Melis, Chaudhuri 2025,
Algorithm 3) on its own: what it refutes for given guess counts, that its claims are ordered, its edge cases, and
that it is not a lower bound on epsilon for a mechanism that is not DP-SGD (randomized response)."""

import numpy as np
import pytest

from ewtune.accountant.errors import InvalidInputError
import ewtune.accountant.fdp_one_run as fdp_module
from ewtune.accountant.fdp_one_run import SIGMA_GRID, _tpr_lines, claimed_curve_refuted, dpsgd_curve_test, rejects
from ewtune.accountant.one_run_audit import one_run_bound
from ewtune.bench.audit import randomized_response

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
    perfect = dpsgd_curve_test(included.astype(float), included, np.zeros(1000), 0.1, 50, 1e-5)
    assert perfect.epsilon == pytest.approx(perfect.ceiling) and perfect.epsilon > 5.19  # Steinke's ceiling at 1000
    flat = dpsgd_curve_test(np.zeros(1000), included, np.random.default_rng(0).random(1000), 0.1, 50, 1e-5)
    assert flat.epsilon == 0.0 and flat.noise_multiplier is None


def test_bad_inputs_are_refused():
    with pytest.raises(InvalidInputError):
        dpsgd_curve_test([0.0, 1.0], [True], [0.0, 0.0], 0.1, 50, 1e-5)
    with pytest.raises(InvalidInputError):
        dpsgd_curve_test([0.0, 1.0], [True, False], [0.0, 0.0], 0.1, 50, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_response_at_epsilon_2_refutes_dpsgd_curves_above_its_true_epsilon(seed):
    """The f-DP figure is the epsilon of a refuted DP-SGD curve, not a lower bound on a mechanism's epsilon:
    on randomized response at true epsilon 2 it exceeds 2, while Steinke et al.'s bound (valid for every
    mechanism) stays below. Curves of one Gaussian step (q = 1, T = 1) keep the test quick."""
    scores, included, tie_break = randomized_response(2.0, 1000, seed)
    figure = dpsgd_curve_test(scores, included, tie_break, 1.0, 1, 1e-5)
    assert figure.epsilon > 2.0
    assert figure.to_json()["lower_bound_on_epsilon"] is False
    assert "epsilon_lower_bound" not in figure.to_json()
    assert one_run_bound(scores, included, 1e-5, tie_break).epsilon <= 2.0


def test_the_figure_is_nowhere_called_a_lower_bound_on_epsilon():
    import ewtune.agent.audit_cli as cli
    from pathlib import Path

    def words(text: str) -> str:
        return " ".join(text.replace("**", "").replace('"', "").split())

    for text in (Path(cli.__file__).read_text(), Path(__file__).resolve().parents[1].joinpath("RELIABILITY.md").read_text()):
        assert "f-DP lower bound" not in words(text) and "not a lower bound on epsilon" in words(text)
    assert "not a lower bound on the epsilon of an arbitrary mechanism" in words(fdp_module.__doc__)


def test_the_claimed_curve_is_refuted_by_perfect_guesses_and_not_by_chance():
    included = np.arange(1000) % 2 == 0
    assert claimed_curve_refuted(included.astype(float), included, np.zeros(1000), 0.1, 50, 2.0)
    chance = np.random.default_rng(1)
    assert not claimed_curve_refuted(chance.random(1000), included, chance.random(1000), 0.1, 50, 2.0)
