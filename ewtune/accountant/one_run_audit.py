"""The statistics of the one-run privacy audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023): from canary scores and the canaries' secret inclusion bits, a lower bound on
epsilon that holds with confidence 1 - alpha. No torch: the coordinator can score what it receives.

The game: each of m canaries is included independently with probability 1/2; a score computed without looking
at the inclusion bits ranks them; the auditor guesses "in" for the k+ highest, "out" for the k- lowest and
abstains on the rest, r = k+ + k- guesses, v of them correct. If the mechanism is (epsilon, delta)-DP with
respect to each canary (Steinke et al., Theorem 5.2, with p = e^eps / (1 + e^eps) and
F(j) = P[Binomial(r, p) >= j]):

    P[v correct or more] <= F(v) + 2 m delta * max_{1 <= i <= v} (F(v - i) - F(v)) / i,

with no independence assumption between canaries. The bound is the largest epsilon this p-value rejects at
level alpha. Choosing (k+, k-) after seeing the scores would void the confidence, so the guess counts form a
grid fixed in advance (:func:`guess_grid`) and each is tested at alpha / |grid| (Bonferroni).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ewtune.accountant.errors import InvalidInputError

DEFAULT_CONFIDENCE = 0.95
# The grid for 1000 canaries (balanced and in-only guesses, from a few to all); scaled with m.
_GRID_AT_1000 = ((25, 25), (50, 50), (100, 100), (200, 200), (350, 350), (500, 500), (100, 0), (300, 0))
_BISECTIONS = 40  # of the interval [0, at most ~10]: far below any figure shown


@dataclass(frozen=True)
class GuessCount:
    """One (k+, k-) of the grid: ``correct`` of its ``positives + negatives`` guesses were right, and the
    epsilon it alone rejects at the Bonferroni level."""

    positives: int
    negatives: int
    correct: int
    epsilon: float

    @property
    def guesses(self) -> int:
        return self.positives + self.negatives


@dataclass(frozen=True)
class OneRunBound:
    """The audit's result: ``epsilon`` is a lower bound on the true epsilon at ``delta`` with probability at
    least ``confidence``; ``ceiling`` is the largest value this design can show (every guess right)."""

    epsilon: float
    confidence: float
    delta: float
    canaries: int
    included: int
    ceiling: float
    counts: tuple[GuessCount, ...]

    def to_json(self) -> dict[str, Any]:
        best = max(self.counts, key=lambda count: count.epsilon)
        return {
            "epsilon_lower_bound": self.epsilon,
            "confidence": self.confidence,
            "delta": self.delta,
            "canaries": self.canaries,
            "included": self.included,
            "ceiling": self.ceiling,
            "best_guesses": {"positives": best.positives, "negatives": best.negatives, "correct": best.correct},
            "method": "Steinke-Nasr-Jagielski 2023 one-run audit, Bonferroni over a fixed guess grid",
        }


def guess_grid(canaries: int) -> tuple[tuple[int, int], ...]:
    """The (k+, k-) pairs tested for ``canaries`` canaries: the grid for 1000 scaled in proportion, each count
    at least 1 where it is not 0 and at most half the canaries, duplicates removed."""
    _check_count("canaries", canaries, minimum=2)
    half = canaries // 2
    grid = []
    for positives, negatives in _GRID_AT_1000:
        pair = tuple(0 if k == 0 else min(half, max(1, round(k * canaries / 1000))) for k in (positives, negatives))
        if pair not in grid:
            grid.append(pair)
    return tuple(grid)


def binomial_tails(guesses: int, success: float) -> np.ndarray:
    """F(j) = P[Binomial(guesses, success) >= j] for j = 0..guesses (F(0) = 1)."""
    # scipy.stats: +0.65 s on the ServerApp's start (server_app imports canary_audit -> this module)
    from scipy.stats import binom

    return binom.sf(np.arange(guesses + 1) - 1, guesses, success)


def p_value(epsilon: float, guesses: int, correct: int, canaries: int, delta: float) -> float:
    """Steinke et al.'s bound on P[at least ``correct`` right out of ``guesses``] under (epsilon, delta)-DP
    with respect to each of ``canaries`` canaries (module docstring)."""
    tails = binomial_tails(guesses, 1.0 / (1.0 + math.exp(-epsilon)))
    value = tails[correct]
    if delta > 0 and correct > 0:
        shifts = np.arange(1, correct + 1)
        value += 2.0 * canaries * delta * float(np.max((tails[correct - shifts] - tails[correct]) / shifts))
    return min(1.0, float(value))


def epsilon_lower_bound(guesses: int, correct: int, canaries: int, delta: float, alpha: float) -> float:
    """The largest epsilon whose p-value is at most ``alpha``, found by bisection on [0, logit(alpha^(1/r))]
    (beyond that even r right guesses of r are not rejected); 0 if epsilon = 0 is not rejected. The answer is
    always an epsilon the test rejects, and rejecting epsilon rejects every smaller one (epsilon-DP implies
    epsilon'-DP for epsilon' >= epsilon), so it is a valid bound even where the p-value is not monotone."""
    _check_count("guesses", guesses, minimum=0)
    if not 0 <= correct <= guesses:
        raise InvalidInputError(f"correct guesses must be between 0 and {guesses}, got {correct}")
    if guesses == 0 or p_value(0.0, guesses, correct, canaries, delta) > alpha:
        return 0.0
    low, high = 0.0, _logit(alpha ** (1.0 / guesses))
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if p_value(middle, guesses, correct, canaries, delta) <= alpha:
            low = middle
        else:
            high = middle
    return low


def count_correct(scores: np.ndarray, included: np.ndarray, positives: int, negatives: int, tie_break: np.ndarray) -> int:
    """Right guesses when the ``positives`` highest scores are called in and the ``negatives`` lowest out;
    equal scores are ordered by ``tie_break`` (random numbers drawn without looking at ``included``)."""
    order = np.lexsort((tie_break, scores))  # ascending by score, ties by tie_break
    lowest, highest = order[:negatives], order[len(order) - positives :]
    return int(included[highest].sum() + (~included[lowest]).sum())


def one_run_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    tie_break: Sequence[float],
    confidence: float = DEFAULT_CONFIDENCE,
    grid: Sequence[tuple[int, int]] | None = None,
) -> OneRunBound:
    """The lower bound on epsilon at ``delta`` from canary ``scores`` (higher: more likely included) and the
    inclusion bits, at ``confidence``, Bonferroni-corrected over ``grid`` (default :func:`guess_grid`)."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    tie_break = np.asarray(tie_break, dtype=float)
    if scores.shape != included.shape or scores.shape != tie_break.shape or scores.ndim != 1:
        raise InvalidInputError("scores, inclusion bits and tie-breakers must be vectors of one length")
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError("every canary score must be finite")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 <= delta < 1.0:
        raise InvalidInputError(f"delta must be in [0, 1), got {delta}")
    canaries = len(scores)
    grid = tuple(grid or guess_grid(canaries))
    if any(k_plus + k_minus > canaries or min(k_plus, k_minus) < 0 for k_plus, k_minus in grid):
        raise InvalidInputError(f"a guess count exceeds the {canaries} canaries")
    alpha = (1.0 - confidence) / len(grid)
    counts = []
    for positives, negatives in grid:
        correct = count_correct(scores, included, positives, negatives, tie_break)
        epsilon = epsilon_lower_bound(positives + negatives, correct, canaries, delta, alpha)
        counts.append(GuessCount(positives, negatives, correct, epsilon))
    ceiling = max(epsilon_lower_bound(k_plus + k_minus, k_plus + k_minus, canaries, delta, alpha) for k_plus, k_minus in grid)
    return OneRunBound(
        epsilon=max(count.epsilon for count in counts),
        confidence=confidence,
        delta=delta,
        canaries=canaries,
        included=int(included.sum()),
        ceiling=ceiling,
        counts=tuple(counts),
    )


def check_audit_layout(settings: Any, counts: Sequence[str]) -> None:
    """An audit run's layout, for the central audit and the federated one alike: each integer setting named in
    ``counts`` at least 1, at least 2 canaries per holder (each holder owns a disjoint range of them), and
    ``steps`` a whole number of releases of ``local_steps`` each."""
    for name in counts:
        _check_count(name.replace("_", " "), getattr(settings, name), 1)
    if settings.canaries < 2 * settings.holders:
        raise InvalidInputError(f"at least 2 canaries per holder are needed, got {settings.canaries} for {settings.holders}")
    if settings.steps % settings.local_steps:
        raise InvalidInputError(f"steps ({settings.steps}) must be a multiple of local steps ({settings.local_steps})")


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p)) if 0.0 < p < 1.0 else (math.inf if p >= 1.0 else -math.inf)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
