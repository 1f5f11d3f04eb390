"""The Edgeworth accountant (Wang, Gao, Zhang, Shen, Su, arXiv 2206.04236): an O(1)-in-steps *estimate*.

For a composition, the PLLR sums S_X (under Q) and S_Y (under P) have cumulants K_j = sum_i n_i kappa_j
(see :mod:`ewtune.accountant.cumulants`). Their tails are approximated by the Edgeworth expansion of order 1, 2
or 3 (arXiv 2206.04236, Sec. 4, Eq. 4.2; Hall, *The Bootstrap and Edgeworth Expansion*, 1992, Sec. 2.2)
and the (epsilon, delta) curve follows from the primal-dual conversion (Dong, Roth, Su, JRSSB 2022,
Prop. 2.12; arXiv 2206.04236, Eq. 3.3):

    delta(eps) = Pr[S_Y > eps] - e^eps Pr[S_X > eps].

Add/remove-one takes the maximum over the remove pair and the add pair. The result is an approximation
with no guarantee: at practical delta it can fall below the true epsilon (EW-Tune's SST-2 run: 7.9929
here and in EW-Tune's log, against about 8.29 by tight PLD). It is reported beside the certified bound,
never instead of it. :func:`edgeworth_bound_epsilon` is the rigorous version, which is vacuous at
practical delta.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import special

from ewtune.accountant.cumulants import PairCumulants, SideCumulants, directions, pair_cumulants, step_cumulants
from ewtune.accountant.edgeworth_error import uniform_error
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import DpEvent, mechanisms, neighbouring_of, total_steps
from ewtune.accountant.memo import Memo
from ewtune.accountant.privacy_accountant import Kind, PrivacyAccountant

ORDERS = (1, 2, 3)
_GRID_POINTS = 2001
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def composed_cumulants(
    event: DpEvent, direction: str, step: Callable[[float, float, str], PairCumulants] = step_cumulants
) -> PairCumulants:
    """Sum of the per-step PLLR cumulants of ``event`` in ``direction``: exact for any composition.
    ``step`` (q, sigma, direction) -> cumulants is :func:`step_cumulants` or an accountant's cached one."""
    parts = [step(q, sigma, direction).scaled(steps) for (q, sigma, _), steps in mechanisms(event).items()]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def edgeworth_delta(event: DpEvent, epsilon: float, order: int = 1) -> float:
    """Edgeworth estimate of delta(epsilon), computed cold by a new :class:`EdgeworthAccountant`."""
    return EdgeworthAccountant(order).delta_of(event, epsilon)


def edgeworth_epsilon(event: DpEvent, delta: float, order: int = 1) -> float:
    """Edgeworth estimate of epsilon(delta), computed cold by a new :class:`EdgeworthAccountant`."""
    return EdgeworthAccountant(order).epsilon_of(event, delta)


def edgeworth_bound_epsilon(event: DpEvent, delta: float) -> float | None:
    """The rigorous Edgeworth bound on epsilon(delta) or None, computed cold by a new
    :class:`EdgeworthBoundAccountant`."""
    return EdgeworthBoundAccountant().epsilon_of(event, delta)


def edgeworth_bound_delta(event: DpEvent, epsilon: float) -> float:
    """The rigorous Edgeworth bound on delta(epsilon), computed cold by a new :class:`EdgeworthBoundAccountant`."""
    return EdgeworthBoundAccountant().delta_of(event, epsilon)


def _errors(pair: PairCumulants, steps: int) -> tuple[float, float]:
    return _uniform_error(pair.null, steps), _uniform_error(pair.alternative, steps)


def _upper_delta(pair: PairCumulants, errors: tuple[float, float], eps: float) -> float:
    """min(S_Y + e_Y, 1) - e^eps max(S_X - e_X, 0): an upper bound on the true delta(eps)."""
    error_x, error_y = errors
    x_y, correction_y = _standardise(pair.alternative, np.array([eps]), 1)
    x_x, correction_x = _standardise(pair.null, np.array([eps]), 1)
    survival_y = special.ndtr(-x_y) + np.exp(-0.5 * x_y * x_y - _LOG_SQRT_2PI) * correction_y
    survival_x = special.ndtr(-x_x) + np.exp(-0.5 * x_x * x_x - _LOG_SQRT_2PI) * correction_x
    lower_x = max(float(survival_x[0]) - error_x, 0.0)
    return min(float(survival_y[0]) + error_y, 1.0) - (math.exp(eps) * lower_x if lower_x > 0 else 0.0)


def _bound_for_pair(pair: PairCumulants, steps: int, delta: float) -> float | None:
    errors = _errors(pair, steps)
    if not (errors[1] < delta):  # the upper curve tends to e_Y as eps grows (inf or nan: no bound at all)
        return None

    def upper_delta(eps: float) -> float:
        return _upper_delta(pair, errors, eps)

    if upper_delta(0.0) <= delta:
        return 0.0
    grid = np.linspace(0.0, _upper_end(pair), _GRID_POINTS)
    below = next((i for i, eps in enumerate(grid) if upper_delta(float(eps)) <= delta), None)
    if below is None:
        return None
    low, high = float(grid[below - 1]), float(grid[below])
    for _ in range(60):  # bisection keeping upper_delta(high) <= delta: the answer stays certified
        middle = 0.5 * (low + high)
        if upper_delta(middle) <= delta:
            high = middle
        else:
            low = middle
    return high


def _uniform_error(side: SideCumulants, steps: int) -> float:
    """Theorem A.2's delta_n for the standardised sum of ``steps`` independent PLLR terms of one side."""
    b = math.sqrt(side.kappa[1] / steps)  # average per-step standard deviation
    return uniform_error(
        n=steps,
        k3=side.abs_moment_3 / steps / b**3,
        k3_tilde=(side.abs_moment_3 + side.abs_moment_1_times_variance) / steps / b**3,
        k4=side.moment_4 / steps / b**4,
        lambda3=side.kappa[2] / steps / b**3,
    )


def _check_order(order: int) -> None:
    if order not in ORDERS:
        raise InvalidInputError(f"Edgeworth order must be one of {ORDERS}, got {order!r}")


def _epsilon_for_pair(pair: PairCumulants, delta: float, order: int) -> float:
    def excess(eps: np.ndarray) -> np.ndarray:
        return _delta_curve(pair, eps, order) - delta

    high = _upper_end(pair)
    for _ in range(20):  # the tails vanish 40 standard deviations out; extend only in pathological cases
        if excess(np.array([high]))[0] <= 0.0:
            break
        high *= 2.0
    else:
        return math.inf
    grid = np.linspace(0.0, high, _GRID_POINTS)
    values = excess(grid)
    crossings = np.flatnonzero((values[:-1] > 0.0) & (values[1:] <= 0.0))
    if crossings.size == 0:  # delta_hat <= delta everywhere (it can even be negative at 0 when skewed)
        return 0.0
    i = int(crossings[-1])
    if values[i + 1] == 0.0:
        return float(grid[i + 1])
    return _bisect(lambda e: excess(np.array([e]))[0], float(grid[i]), float(grid[i + 1]))


def _bisect(excess, low: float, high: float) -> float:
    """The root of ``excess`` (positive at ``low``, at most 0 at ``high``) within 1e-12 (relative above 1):
    the end where excess <= 0, so that delta_hat(epsilon) <= delta holds at the value returned."""
    while high - low > 1e-12 * max(1.0, high):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if excess(middle) > 0.0:
            low = middle
        else:
            high = middle
    return high


def _upper_end(pair: PairCumulants) -> float:
    y = pair.alternative.kappa
    return max(abs(y[0]) + 40.0 * math.sqrt(y[1]), 1.0)


def _delta_curve(pair: PairCumulants, eps: np.ndarray, order: int) -> np.ndarray:
    """delta_hat(eps) = S_Y(eps) - e^eps S_X(eps), with S the Edgeworth survival functions.

    Each tail estimate is clipped to [0, 1]: far out, the truncated series goes negative when the side
    is skewed towards eps's other end (always the case for the add pair, whose sides are -Y and -X), and
    e^eps would turn a negative S_X into a large spurious delta. The X term is formed in log space so that
    e^eps never overflows."""
    x_y, correction_y = _standardise(pair.alternative, eps, order)
    x_x, correction_x = _standardise(pair.null, eps, order)
    survival_y = special.ndtr(-x_y) + np.exp(-0.5 * x_y * x_y - _LOG_SQRT_2PI) * correction_y
    log_gauss_x = special.log_ndtr(-x_x)
    # S_X / Phi(-x) = 1 + phi(x) c(x) / Phi(-x): clip the ratio so that S_X stays in [0, 1].
    ratio_x = 1.0 + np.exp(-0.5 * x_x * x_x - _LOG_SQRT_2PI - log_gauss_x) * correction_x
    ratio_x = np.clip(ratio_x, 0.0, np.exp(np.minimum(-log_gauss_x, 700.0)))
    return np.clip(survival_y, 0.0, 1.0) - np.exp(eps + log_gauss_x) * ratio_x


def _standardise(side: SideCumulants, eps: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """x = (eps - K_1)/sqrt(K_2) and c(x) with S(eps) ~ Q(x) + phi(x) c(x) (1 - Edgeworth CDF)."""
    k1, k2 = side.kappa[0], side.kappa[1]
    scale = math.sqrt(k2)
    x = (eps - k1) / scale
    lam3, lam4, lam5 = (side.kappa[j - 1] / scale**j for j in (3, 4, 5))
    return x, edgeworth_correction(x, lam3, lam4, lam5, order)


def edgeworth_correction(x: np.ndarray, lam3: float, lam4: float, lam5: float, order: int) -> np.ndarray:
    """c(x) such that F(x) ~ Phi(x) - phi(x) c(x), with standardised cumulants lam_j = K_j / K_2^(j/2)
    (arXiv 2206.04236, Eq. 4.2; Hall 1992, Eq. 2.17): order 1 keeps the skewness term, order 2 adds the
    O(1/n) terms, order 3 the O(n^-3/2) terms."""
    he = _hermite(x)
    correction = lam3 / 6.0 * he[2]
    if order >= 2:
        correction = correction + lam4 / 24.0 * he[3] + lam3**2 / 72.0 * he[5]
    if order >= 3:
        correction = correction + lam5 / 120.0 * he[4] + lam3 * lam4 / 144.0 * he[6] + lam3**3 / 1296.0 * he[8]
    return correction


def _hermite(x: np.ndarray) -> list[np.ndarray]:
    """Probabilists' Hermite polynomials He_0..He_8 by the recurrence He_{n+1} = x He_n - n He_{n-1}."""
    he = [np.ones_like(x), x]
    for n in range(1, 8):
        he.append(x * he[n] - n * he[n - 1])
    return he


class _CumulantAccountant(PrivacyAccountant):
    """An accountant computed from the PLLR cumulants; owns their cache per (q, sigma, pair)."""

    def __init__(self) -> None:
        super().__init__()
        self._pairs = Memo(maxsize=4096)

    def _composed_cumulants(self, event: DpEvent, direction: str) -> PairCumulants:
        return composed_cumulants(event, direction, self._step_cumulants)

    def _step_cumulants(self, q: float, sigma: float, direction: str) -> PairCumulants:
        return step_cumulants(q, sigma, direction, self._pair_cumulants)

    def _pair_cumulants(self, q: float, sigma: float, pair: str) -> PairCumulants:
        return self._pairs.get((q, sigma, pair), lambda: pair_cumulants(q, sigma, pair))


class EdgeworthAccountant(_CumulantAccountant):
    """The Edgeworth estimate of order 1, 2 or 3: not a guarantee."""

    kind = Kind.ESTIMATE

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        _check_order(order)
        self.order = order
        self.name = "edgeworth" if order == 1 else f"edgeworth_order{order}"
        self.label = f"Edgeworth estimate, order {order} (not a guarantee)"

    def _epsilon(self, event: DpEvent, delta: float) -> float:
        """The largest root of delta_hat(eps) = delta (last sign change on a grid, refined by bisection),
        max over the directions of the relation. EW-Tune uses order 1 (arXiv 2210.15042, Sec. 4) on the
        remove direction only; the remove direction dominates in its runs."""
        return max(
            _epsilon_for_pair(self._composed_cumulants(event, d), delta, self.order)
            for d in directions(neighbouring_of(event))
        )

    def _delta(self, event: DpEvent, epsilon: float) -> float:
        """delta_hat(epsilon), clipped to [0, 1]; max over the directions of the relation."""
        estimate = max(
            float(_delta_curve(self._composed_cumulants(event, d), np.array([epsilon]), self.order)[0])
            for d in directions(neighbouring_of(event))
        )
        return min(max(estimate, 0.0), 1.0)


class EdgeworthBoundAccountant(_CumulantAccountant):
    """The rigorous Edgeworth bound (arXiv 2206.04236, Sec. 4.2); its epsilon is None where vacuous."""

    name = "edgeworth_bound"
    label = "Edgeworth bound (rigorous, arXiv 2206.04236)"
    kind = Kind.BOUND

    def _epsilon(self, event: DpEvent, delta: float) -> float | None:
        """An epsilon whose true delta is at most ``delta``, or None when the bound is vacuous.

        Each PLLR tail is the order-1 expansion widened by the explicit uniform error e of Derumigny, Girard
        & Guyonvarch (arXiv 2101.05780, Thm 2.1 / A.2; :mod:`ewtune.accountant.edgeworth_error`, the full bound,
        not only its main term): delta(eps) <= min(S_Y + e_Y, 1) - e^eps max(S_X - e_X, 0). Since the true
        delta(eps) decreases in eps, the first eps where that upper curve reaches ``delta`` already bounds
        the true epsilon. The curve never drops below about e_Y ~ 0.2 K~_3/sqrt(T), which is 1e-3..1e-1 for
        DP-SGD, so at practical delta (<= 1e-5) the answer is None: nothing is certified. Rigorous up to the
        quadrature and floating-point error of the cumulants."""
        worst = 0.0
        for direction in directions(neighbouring_of(event)):
            bound = _bound_for_pair(self._composed_cumulants(event, direction), total_steps(event), delta)
            if bound is None:
                return None
            worst = max(worst, bound)
        return worst

    def _delta(self, event: DpEvent, epsilon: float) -> float:
        """The upper curve of :meth:`_epsilon` at ``epsilon``, max over the directions of the relation,
        clipped to [0, 1]; 1 where the uniform error is not finite."""
        bound = 0.0
        for direction in directions(neighbouring_of(event)):
            pair = self._composed_cumulants(event, direction)
            value = _upper_delta(pair, _errors(pair, total_steps(event)), epsilon)
            bound = max(bound, value if math.isfinite(value) else 1.0)
        return min(bound, 1.0)
