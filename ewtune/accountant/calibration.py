"""Noise calibration: the noise multiplier sigma for a target (epsilon, delta) over a whole training plan.

A plan is a sequence of phases (sampling rate q, steps) that all share one sigma, e.g. rounds x local
steps with a changing sampling rate. Two policies:

* ``"certified"`` (the default and the guarantee): the returned sigma satisfies
  certified_epsilon(plan_event(phases, sigma), delta) <= epsilon, and a sigma 0.2% smaller does not. The
  order-1 Edgeworth estimate (O(1) in the number of steps) gives the starting point and the local slope
  d log(epsilon) / d log(sigma); the certified accountant is then evaluated only a few times, each new
  sigma a secant step in log-log coordinates on the certified values themselves, until a failing sigma
  and a passing one lie within 0.2% (arXiv 2206.04236 proposes the Edgeworth estimate for exactly this
  inverse problem; here it only steers, it never decides).
* ``"edgeworth"`` reproduces EW-Tune (arXiv 2210.15042; ``privacy_analysis.get_sigma`` in its code): a
  descending grid from sigma = 2 with steps 0.5, 0.05, 0.005, 0.0005, keeping the smallest grid sigma
  whose order-1 Edgeworth estimate is below epsilon. That sigma is *not* certified; the calibration
  reports the certified epsilon it actually yields beside it (8.29 for EW-Tune's SST-2 run at 8.0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from scipy import optimize

from ewtune.accountant.certified import CertifiedAccountant
from ewtune.accountant.edgeworth import EdgeworthAccountant
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import DpEvent, Neighbouring, PoissonGaussianEvent, compose

POLICIES = ("certified", "edgeworth")
SIGMA_TOLERANCE = 0.002
"""A calibrated sigma is within this relative distance of the smallest certified sigma."""
MIN_SIGMA, MAX_SIGMA = 0.05, 1000.0
"""The sane range searched; a target that needs sigma outside it is refused."""

_MAX_CERTIFIED_EVALUATIONS = 40
_EWTUNE_START, _EWTUNE_STEPS = 2.0, (0.5, 0.05, 0.005, 0.0005)


@dataclass(frozen=True)
class Calibration:
    noise_multiplier: float
    epsilon_certified: float
    epsilon_edgeworth: float
    policy: str
    certified_evaluations: int
    seconds: float


def plan_event(
    phases: Sequence[tuple[float, int]], noise_multiplier: float, neighbouring: Neighbouring = Neighbouring.ADD_REMOVE
) -> DpEvent:
    """The event of running every phase (q, steps) with one noise multiplier."""
    events = [PoissonGaussianEvent(q, noise_multiplier, steps, neighbouring) for q, steps in phases]
    return events[0] if len(events) == 1 else compose(*events)


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    phases: Sequence[tuple[float, int]],
    policy: str = "certified",
    neighbouring: Neighbouring = Neighbouring.ADD_REMOVE,
) -> Calibration:
    """The noise multiplier for the target (epsilon, delta) over ``phases`` (module docstring)."""
    started = time.perf_counter()
    phases = _checked(epsilon, delta, phases, policy, neighbouring)
    event_at = lambda sigma: plan_event(phases, sigma, neighbouring)  # noqa: E731
    certified_of, estimator = CertifiedAccountant().epsilon_of, EdgeworthAccountant()  # one calibration's caches
    estimate_at = lambda sigma: _edgeworth_estimate(estimator, event_at(sigma), delta)  # noqa: E731
    if policy == "edgeworth":
        sigma = _ewtune_grid_search(estimate_at, epsilon)
        evaluations, certified = 1, certified_of(event_at(sigma), delta)
    else:
        search = _CertifiedSearch(lambda s: certified_of(event_at(s), delta), epsilon)
        sigma, certified = search.run(_edgeworth_start(estimate_at, epsilon))
        evaluations = search.evaluations
    return Calibration(
        noise_multiplier=sigma,
        epsilon_certified=certified,
        epsilon_edgeworth=estimate_at(sigma),
        policy=policy,
        certified_evaluations=evaluations,
        seconds=time.perf_counter() - started,
    )


def _checked(epsilon, delta, phases, policy, neighbouring) -> list[tuple[float, int]]:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (0 < epsilon < math.inf):
        raise InvalidInputError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise InvalidInputError(f"target delta must be in (0, 1), got {delta!r}")
    if policy not in POLICIES:
        raise InvalidInputError(f"unknown calibration policy {policy!r} (choose from {', '.join(POLICIES)})")
    phases = [tuple(phase) for phase in phases]
    if not phases:
        raise InvalidInputError("a plan needs at least one phase (sampling rate, steps)")
    if any(len(phase) != 2 for phase in phases):
        raise InvalidInputError("each phase must be a pair (sampling rate, steps)")
    plan_event(phases, 1.0, Neighbouring(neighbouring))  # validates q and steps with the events' own messages
    return phases


def _edgeworth_start(estimate: Callable[[float], float], epsilon: float) -> tuple[float, float]:
    """The sigma where the order-1 Edgeworth estimate (``estimate`` of sigma) meets epsilon, and
    d log eps / d log sigma there; a plain guess when the estimate is unusable (it is an estimate: any
    start works, a good one is fast)."""
    try:
        low, high = 0.3, 3.0
        while estimate(low) <= epsilon and low > MIN_SIGMA:
            low /= 2
        while estimate(high) >= epsilon and high < MAX_SIGMA:
            high *= 2
        root = math.exp(optimize.brentq(lambda log_sigma: estimate(math.exp(log_sigma)) - epsilon, math.log(low), math.log(high), xtol=1e-4))
        slope = (math.log(estimate(root * 1.01)) - math.log(estimate(root / 1.01))) / (2 * math.log(1.01))
        if math.isfinite(root) and math.isfinite(slope) and slope < 0:
            return root, slope
    except (ArithmeticError, ValueError):
        pass
    return 1.0, -1.5


def _edgeworth_estimate(estimator: EdgeworthAccountant, event: DpEvent, delta: float) -> float:
    """The order-1 Edgeworth estimate, or nan where the expansion breaks down (extreme sigma)."""
    try:
        return estimator.epsilon_of(event, delta)
    except (ArithmeticError, ValueError, IndexError):
        return math.nan


class _CertifiedSearch:
    """Bracketing secant search in (log sigma, log epsilon) on certified epsilons, which decrease in
    sigma; keeps the largest failing sigma and the smallest passing one."""

    def __init__(self, certified: Callable[[float], float], target: float) -> None:
        self.certified, self.target = certified, target
        self.evaluations = 0
        self.failing: tuple[float, float] | None = None  # (sigma, eps) with eps > target
        self.passing: tuple[float, float] | None = None  # (sigma, eps) with eps <= target

    def evaluate(self, sigma: float) -> float:
        if self.evaluations >= _MAX_CERTIFIED_EVALUATIONS:
            raise InvalidInputError("noise calibration did not converge (certified epsilon is not monotone here)")
        self.evaluations += 1
        value = self.certified(sigma)
        if value > self.target:
            if self.failing is None or sigma > self.failing[0]:
                self.failing = (sigma, value)
        elif self.passing is None or sigma < self.passing[0]:
            self.passing = (sigma, value)
        return value

    def run(self, start: tuple[float, float]) -> tuple[float, float]:
        sigma, slope = start
        sigma = min(max(sigma, MIN_SIGMA), MAX_SIGMA)
        value = self.evaluate(sigma)
        while self.failing is None or self.passing is None:
            # Step past the target along the local slope (slightly beyond, so the bracket closes).
            overshoot = 1 + SIGMA_TOLERANCE / 2 if value > self.target else 1 - SIGMA_TOLERANCE / 2
            previous = (sigma, value)
            if math.isfinite(value) and value > 0:
                sigma *= math.exp(math.log(self.target / value) / slope) * overshoot
            else:
                sigma *= 2.0 if value > self.target else 0.5
            if sigma > MAX_SIGMA or sigma < MIN_SIGMA:
                sigma = self._edge(sigma)
            value = self.evaluate(sigma)
            slope = self._secant(slope, previous, sigma, value)
        while self.passing[0] / self.failing[0] > 1 + SIGMA_TOLERANCE:
            self.evaluate(self._next_inside())
        return self.passing

    def _edge(self, sigma: float) -> float:
        """Clamp to the sane range, refusing a target that the range cannot reach."""
        if sigma > MAX_SIGMA:
            if self.failing is not None and self.failing[0] >= MAX_SIGMA:
                raise InvalidInputError(
                    f"target epsilon {self.target:g} is unreachable: it would need a noise multiplier above {MAX_SIGMA:g}"
                )
            return MAX_SIGMA
        if self.passing is not None and self.passing[0] <= MIN_SIGMA:
            raise InvalidInputError(
                f"target epsilon {self.target:g} is so large that the noise multiplier would fall below {MIN_SIGMA:g}"
            )
        return MIN_SIGMA

    @staticmethod
    def _secant(slope: float, previous: tuple[float, float], sigma: float, value: float) -> float:
        """The log-log secant slope through the last two evaluations when it is usable, else ``slope``."""
        (last_sigma, last_value), run = previous, math.log(sigma / previous[0])
        if abs(run) < 1e-6 or not (math.isfinite(last_value) and math.isfinite(value)) or min(value, last_value) <= 0:
            return slope
        secant = math.log(value / last_value) / run
        return secant if secant < 0 else slope

    def _next_inside(self) -> float:
        """Secant root in log-log between the bracket ends, aimed a little to the passing side, and kept
        at least a sixth of the way from either end (so that the bracket shrinks geometrically)."""
        (low, low_eps), (high, high_eps) = self.failing, self.passing
        span = math.log(high / low)
        if math.isfinite(low_eps) and high_eps > 0:
            fraction = (math.log(low_eps) - math.log(self.target)) / (math.log(low_eps) - math.log(high_eps))
        else:
            fraction = 0.5
        aim = fraction * span + 0.4 * math.log1p(SIGMA_TOLERANCE)
        aim = min(max(aim, span / 6), span * 5 / 6)
        return low * math.exp(aim)


def _ewtune_grid_search(estimate: Callable[[float], float], epsilon: float) -> float:
    """EW-Tune's ``get_sigma``: from sigma = 2, walk down each grid (0.5, 0.05, 0.005, 0.0005) while the
    estimate stays below epsilon, then step back to the last passing sigma. Where EW-Tune assumed that
    sigma = 2 passes, the start is doubled until it does (within the sane range)."""
    sigma = _EWTUNE_START
    while not estimate(sigma) < epsilon:
        sigma *= 2
        if sigma > MAX_SIGMA:
            raise InvalidInputError(
                f"target epsilon {epsilon:g} is unreachable: it would need a noise multiplier above {MAX_SIGMA:g}"
            )
    for step in _EWTUNE_STEPS:
        while sigma > step and estimate(sigma - step) < epsilon:
            sigma -= step
    return round(sigma, 6)  # a point of the 0.0005 grid, without the float residue of the walk
