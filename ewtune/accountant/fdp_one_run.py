"""The f-DP one-run test of the DP-SGD hypothesis (Mahloujifar, Melis, Chaudhuri 2025, "Auditing
f-Differential Privacy in One Run", ICML 2025, Algorithm 3), from the same canaries, scores and guess grid as
Steinke et al.'s bound (:mod:`ewtune.accountant.one_run_audit`). No torch.

**What it is, and what it is not.** The null hypotheses are DP-SGD mechanisms themselves: "with respect to each
canary, the run is at least as private as DP-SGD(q, T, sigma')", for sigma' on a grid fixed in advance
(:data:`SIGMA_GRID`). Refuting one says that the run is not (at least as private as) that DP-SGD mechanism. The
figure reported is the epsilon at delta of the least private DP-SGD curve refuted: a statement about DP-SGD
curves, **not a lower bound on the epsilon of an arbitrary mechanism**. A mechanism whose trade-off curve has a
different shape from DP-SGD's can refute DP-SGD curves whose epsilon exceeds its own: randomized response at
epsilon 2 (pure epsilon-DP, a straight-line trade-off curve) refutes DP-SGD curves of epsilon about 2.3 to 3 at
1000 canaries (``tests/test_fdp_one_run.py``). Its alarm is sound for what the engine claims: the engine claims to
*be* DP-SGD(q, T, sigma), and when it is, the claimed curve is refuted with probability at most alpha. The
epsilon lower bound of the audit is Steinke et al.'s, which holds for every mechanism.

The test: a mechanism that is (epsilon, delta(epsilon))-DP for every epsilon >= 0 lets an attacker with
false-positive rate x reach a true-positive rate of at most

    fbar(x) = min(1, min over epsilon in E of e^epsilon x + delta(epsilon)),

E a grid of epsilons >= 0 (:data:`EPSILON_GRID`) and delta the certified accountant's upper bound: both can only
make fbar larger, so the test is conservative. For one guess count, c correct of k guesses over m canaries,
Algorithm 3 runs, from r = alpha c / m and h = alpha (k - c) / m, for i = c - 1 down to 0:

    h' = max(h, fbar^-1(r)),  r = min(1, r + i / (k - i) (h' - h)),  h = h',

and rejects the claim at level alpha when r + h > k / m. Each guess count of the grid is tested at
alpha / |grid| (Bonferroni). The curves are ordered in sigma' (a larger sigma' is a stronger claim), so on a
run whose true mechanism is DP-SGD(q, T, sigma) a claim with sigma' <= sigma is rejected with probability at
most alpha. The figure is the certified epsilon at delta of the smallest sigma' rejected ("the run is less
private than DP-SGD(q, T, sigma')"), 0 when none is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ewtune.accountant.certified import CertifiedAccountant, certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.one_run_audit import DEFAULT_CONFIDENCE, count_correct, guess_grid

SIGMA_GRID = tuple(float(s) for s in np.geomspace(0.25, 16.0, 25))  # ratio 2^(1/4)
EPSILON_GRID = tuple(float(e) for e in np.concatenate([np.arange(0.0, 2.0, 0.1), np.arange(2.0, 8.0, 0.25), np.arange(8.0, 30.0, 1.0)]))


@dataclass(frozen=True)
class DpsgdCurveTest:
    """``epsilon``: the certified epsilon at ``delta`` of DP-SGD(q, T, ``noise_multiplier``), the least private
    DP-SGD curve of the grid that the canaries refute (0 and None when none is). Not a lower bound on the
    run's epsilon unless the run is a DP-SGD mechanism (module docstring)."""

    epsilon: float
    noise_multiplier: float | None
    confidence: float
    canaries: int
    ceiling: float  # the figure when every guess of the grid is right

    def to_json(self) -> dict[str, Any]:
        return {
            "epsilon_of_refuted_dpsgd_curve": self.epsilon,
            "refuted_noise_multiplier": self.noise_multiplier,
            "lower_bound_on_epsilon": False,
            "confidence": self.confidence,
            "canaries": self.canaries,
            "ceiling": self.ceiling,
            "method": "Mahloujifar-Melis-Chaudhuri 2025 f-DP one-run test of the DP-SGD hypothesis: the least "
                      "private DP-SGD(q, T, sigma') curve refuted, Bonferroni over the same guess grid; a lower "
                      "bound on epsilon only if the run is a DP-SGD mechanism",
        }


@functools.lru_cache(maxsize=64)
def _tpr_lines(sampling_rate: float, steps: int, noise_multiplier: float) -> tuple[np.ndarray, np.ndarray]:
    """(slopes e^epsilon, intercepts delta(epsilon)) of the lines whose minimum is fbar for DP-SGD(q, T, sigma')."""
    accountant = CertifiedAccountant()
    event = PoissonGaussianEvent(sampling_rate, noise_multiplier, steps)
    epsilons = np.asarray(EPSILON_GRID)
    return np.exp(epsilons), np.array([min(1.0, accountant.delta_of(event, float(e))) for e in epsilons])


def _fbar_inverse(lines: tuple[np.ndarray, np.ndarray], r: float) -> float:
    """The smallest false-positive rate x in [0, 1] with fbar(x) >= r (fbar is a minimum of increasing lines)."""
    slopes, intercepts = lines
    return float(min(1.0, max(0.0, np.max((r - intercepts) / slopes))))


def rejects(lines: tuple[np.ndarray, np.ndarray], canaries: int, guesses: int, correct: int, alpha: float) -> bool:
    """Algorithm 3: whether ``correct`` of ``guesses`` right refutes the curve of ``lines`` at level ``alpha``."""
    if correct == 0:
        return False
    r, h = alpha * correct / canaries, alpha * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        h_new = max(h, _fbar_inverse(lines, r))
        if h_new == h:
            break
        r, h = min(1.0, r + i / (guesses - i) * (h_new - h)), h_new
    return r + h > guesses / canaries


def dpsgd_curve_test(scores: Sequence[float], included: Sequence[bool], tie_break: Sequence[float], sampling_rate: float,
                     steps: int, delta: float, confidence: float = DEFAULT_CONFIDENCE) -> DpsgdCurveTest:
    """The f-DP test of the DP-SGD hypothesis (module docstring) for canaries with one score each, against
    DP-SGD curves of ``steps`` steps at rate q."""
    if not 0.0 < delta < 1.0:
        raise InvalidInputError("delta must be in (0, 1)")
    canaries, alpha, counts = _guess_counts(scores, included, tie_break, confidence)
    figure = _smallest_refuted(counts, canaries, alpha, sampling_rate, steps)
    ceiling = _smallest_refuted([(k, k) for k, _ in counts], canaries, alpha, sampling_rate, steps)
    return DpsgdCurveTest(_epsilon(figure, sampling_rate, steps, delta), figure, confidence, canaries,
                          _epsilon(ceiling, sampling_rate, steps, delta))


def claimed_curve_refuted(scores: Sequence[float], included: Sequence[bool], tie_break: Sequence[float],
                          sampling_rate: float, steps: int, noise_multiplier: float,
                          confidence: float = DEFAULT_CONFIDENCE) -> bool:
    """Whether the canaries refute the claim itself, "the run is at least as private as DP-SGD(q, T, sigma)"
    with the claimed sigma, at level 1 - ``confidence`` (Algorithm 3 on every guess count of the grid, each at
    alpha / |grid|). When the engine is the claimed DP-SGD this happens with probability at most alpha; when
    its noise is smaller than claimed (halved, or sigma where sigma C is due at C = 2), the refutation is the
    alarm. One curve, so it costs a fraction of :func:`dpsgd_curve_test`."""
    canaries, alpha, counts = _guess_counts(scores, included, tie_break, confidence)
    lines = _tpr_lines(sampling_rate, steps, float(noise_multiplier))
    return any(rejects(lines, canaries, guesses, correct, alpha) for guesses, correct in counts)


def _guess_counts(scores, included, tie_break, confidence: float) -> tuple[int, float, list[tuple[int, int]]]:
    """(canaries, alpha per guess count, [(guesses, correct)] over the guess grid), the inputs checked."""
    scores, included, tie_break = np.asarray(scores, float), np.asarray(included, bool), np.asarray(tie_break, float)
    if scores.shape != included.shape or scores.shape != tie_break.shape or scores.ndim != 1:
        raise InvalidInputError("scores, inclusion bits and tie-breakers must be vectors of one length")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError("confidence must be in (0, 1)")
    grid = guess_grid(len(scores))
    counts = [(k_plus + k_minus, count_correct(scores, included, k_plus, k_minus, tie_break)) for k_plus, k_minus in grid]
    return len(scores), (1.0 - confidence) / len(grid), counts


def _smallest_refuted(counts, canaries: int, alpha: float, sampling_rate: float, steps: int) -> float | None:
    """The smallest sigma' of the grid that some (guesses, correct) refutes; the scan stops at the first claim
    not refuted, going down from the strongest (the curves are ordered)."""
    refuted = None
    for sigma in reversed(SIGMA_GRID):
        lines = _tpr_lines(sampling_rate, steps, sigma)
        if not any(rejects(lines, canaries, guesses, correct, alpha) for guesses, correct in counts):
            break
        refuted = sigma
    return refuted


def _epsilon(sigma: float | None, sampling_rate: float, steps: int, delta: float) -> float:
    if sigma is None:
        return 0.0
    return float(certified_epsilon(PoissonGaussianEvent(sampling_rate, sigma, steps), delta))
