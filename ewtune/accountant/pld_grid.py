"""One step of the Poisson-subsampled Gaussian as a pessimistic discrete privacy loss distribution (PLD).

Steps 1 and 2 of the argument of :mod:`ewtune.accountant.pld_engine` (every number here errs on the safe side):

1. *Dominating pairs.* One step with sampling rate q and noise multiplier sigma (mu = 1/sigma) is, in the
   add/remove relation, dominated by the one-dimensional pairs (remove) P = (1-q)N(0,1) + qN(mu,1) against
   Q = N(0,1), and (add) the reversed pair; for replace-one by P = (1-q)N(0,1) + qN(mu,1) against
   Q = (1-q)N(0,1) + qN(-mu,1) (Zhu, Dong, Wang 2022; dp_accounting's ``privacy_loss_mechanism``). In each
   case the privacy loss L(w) = log dP/dQ(w) is increasing in the coordinate w used below, and
   delta(eps) = E_P[(1 - e^{eps - L})_+] (Koskela et al. 2020, eq. 3; Meiser & Mohammadi 2018).
2. *Connect-the-dots discretisation* (Doroshenko et al. 2022, "Connect the dots"). Cut the w-line at the
   points where L equals a grid value k*h. On a cell whose losses lie in [k h, (k+1) h], replace the
   P-mass a of the cell by two atoms at k h and (k+1) h that keep both a and the cell's Q-mass
   b = E_P[e^{-L}; cell]. With u = e^{-L}, the function u -> (1 - e^{eps} u)_+ is convex, and the two-point
   law on the end points of [e^{-(k+1)h}, e^{-kh}] with the same mean dominates every law on that interval
   in the convex order; so the discrete pair has a larger delta(eps) for *every* eps. The lower tail below
   the grid is moved up to the lowest grid point and the upper tail beyond the grid becomes an atom at
   +infinity (counted as delta 1): both only increase delta. Round-off in a and b is covered by moving a
   bounded extra amount of mass to the upper atom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import special

UNIT_ROUNDOFF = np.finfo(float).eps / 2


class Direction(str, Enum):
    """Which dominating pair of one step (see the module docstring, step 1)."""

    REMOVE = "remove"
    ADD = "add"
    REPLACE = "replace"


@dataclass(frozen=True)
class _Pair:
    """P = (1-qp)N(0,1) + qp N(cp,1) against Q = (1-qq)N(0,1) + qq N(cq,1), loss increasing in w."""

    direction: Direction
    q: float
    mu: float

    @property
    def p_mixture(self) -> tuple[float, float]:
        return (0.0, 0.0) if self.direction is Direction.ADD else (self.q, self.mu)

    @property
    def q_mixture(self) -> tuple[float, float]:
        return (0.0, 0.0) if self.direction is Direction.REMOVE else (self.q, -self.mu)

    def loss(self, w: np.ndarray) -> np.ndarray:
        """L(w) = log dP/dQ(w), with g(w) = log(1 - q + q exp(mu w - mu^2/2)) computed stably."""
        if self.direction is Direction.REMOVE:
            return self._g(w)
        if self.direction is Direction.ADD:
            return -self._g(-w)
        return self._g(w) - self._g(-w)

    def _g(self, w: np.ndarray) -> np.ndarray:
        exponent = self.mu * np.asarray(w, dtype=float) - self.mu**2 / 2 + math.log(self.q)
        if self.q == 1.0:
            return exponent
        return np.logaddexp(math.log1p(-self.q), exponent)

    def threshold(self, eps: np.ndarray) -> np.ndarray:
        """The w with L(w) = eps; -inf below the loss range, +inf above it."""
        eps = np.asarray(eps, dtype=float)
        if self.direction is Direction.REMOVE:
            return self._g_inverse(eps)
        if self.direction is Direction.ADD:
            return -self._g_inverse(-eps)
        return self._replace_threshold(eps)

    def _g_inverse(self, value: np.ndarray) -> np.ndarray:
        """w with g(w) = value: g ranges over (log(1-q), inf), so -inf at or below log(1-q)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            inside = np.expm1(value) + self.q
            w = (np.log(inside) - math.log(self.q) + self.mu**2 / 2) / self.mu
        return np.where(inside > 0, w, -np.inf)

    def _replace_threshold(self, eps: np.ndarray) -> np.ndarray:
        """Safeguarded Newton on the odd, increasing L(w) = g(w) - g(-w). For eps >= 0 the root w >= 0,
        where g(-w) lies in [log(1-q), log(1-q + q e^{-mu^2/2})]; inverting g at eps plus either end
        brackets the root tightly. For q = 1, L(w) = 2 mu w exactly."""
        if self.q == 1.0:
            return eps / (2 * self.mu)
        size = np.abs(eps)
        lo = np.maximum(self._g_inverse(size + math.log1p(-self.q)), 0.0)
        hi = self._g_inverse(size + float(np.logaddexp(math.log1p(-self.q), math.log(self.q) - self.mu**2 / 2)))
        w = (lo + hi) / 2
        for _ in range(100):
            value = self.loss(w) - size
            lo, hi = np.where(value < 0, w, lo), np.where(value >= 0, w, hi)
            slope = self.mu * (special.expit(self._logit(w)) + special.expit(self._logit(-w)))
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = w - value / slope
            w_next = np.where((newton >= lo) & (newton <= hi), newton, (lo + hi) / 2)
            done = np.all(np.abs(w_next - w) <= 4 * UNIT_ROUNDOFF * (1 + np.abs(w)))
            w = w_next
            if done:
                break
        return np.sign(eps) * w

    def _logit(self, w: np.ndarray) -> np.ndarray:
        return self.mu * w - self.mu**2 / 2 + math.log(self.q) - math.log1p(-self.q)

    def w_range(self, tail: float = 1e-21) -> tuple[float, float]:
        """A range of w outside which P has mass at most ``tail`` on each side."""
        shifts = [0.0, self.p_mixture[1]]
        width = -float(special.ndtri(tail))
        return min(shifts) - width, max(shifts) + width


class _CellMasses:
    """Pr[cut_i < W <= cut_{i+1}] for W ~ N(shift, 1) and consecutive cuts, each as a difference of the
    smaller normal tails (no cancellation against 1), with a bound on its absolute round-off error
    (scipy's ``ndtr`` is accurate to a few ulps); the tails are evaluated once per cut and per shift."""

    def __init__(self, cuts: np.ndarray) -> None:
        self.cuts = cuts
        self._by_shift: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def normal(self, shift: float) -> tuple[np.ndarray, np.ndarray]:
        if shift not in self._by_shift:
            z = self.cuts - shift
            smaller_tail = special.ndtr(-np.abs(z))
            upper = np.where(z > 0, smaller_tail, 1.0 - smaller_tail)
            lower = np.where(z > 0, 1.0 - smaller_tail, smaller_tail)
            right = z[:-1] > 0
            big = np.where(right, upper[:-1], lower[1:])
            small = np.where(right, upper[1:], lower[:-1])
            self._by_shift[shift] = np.maximum(big - small, 0.0), 8 * UNIT_ROUNDOFF * big
        return self._by_shift[shift]

    def mixture(self, mixture: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        weight, shift = mixture
        mass, error = self.normal(0.0)
        if weight == 0.0:
            return mass, error
        shifted, shifted_error = self.normal(shift)
        return (
            (1 - weight) * mass + weight * shifted,
            (1 - weight) * error + weight * shifted_error + 2 * UNIT_ROUNDOFF * mass,
        )


@dataclass(frozen=True)
class StepPmf:
    """One step's pessimistic discrete PLD: ``probs[j]`` at loss (offset + j) * h, ``infinite`` at +inf."""

    offset: int
    probs: np.ndarray
    infinite: float


def step_pmf(direction: Direction, q: float, sigma: float, h: float, tail: float) -> StepPmf:
    """Connect-the-dots PMF of one step on the grid h*Z (module docstring, step 2); the grid spans the
    losses of all but a P-mass ``tail`` on each side (the upper rest becomes infinite loss)."""
    pair = _Pair(direction, q, 1.0 / sigma)
    w_lo, w_hi = pair.w_range(tail)
    loss_lo, loss_hi = pair.loss(np.array([w_lo, w_hi]))
    k_lo, k_hi = math.floor(loss_lo / h), max(math.ceil(loss_hi / h), math.floor(loss_lo / h) + 1)
    grid = np.arange(k_lo, k_hi + 1) * h
    # Cells of w between consecutive cuts, plus the two tails beyond the grid.
    cells = _CellMasses(np.concatenate(([-np.inf], pair.threshold(grid), [np.inf])))
    a_all, a_error_all = cells.mixture(pair.p_mixture)
    b_all, b_error_all = cells.mixture(pair.q_mixture)
    a, a_error, b, b_error = a_all[1:-1], a_error_all[1:-1], b_all[1:-1], b_error_all[1:-1]
    # Split a between k h and (k+1) h keeping the Q-mass b:  w_up = (a - b e^{kh}) / (1 - e^{-h}).
    scale = np.exp(grid[:-1])
    numerator = a - b * scale
    numerator_error = a_error + b_error * scale + 4 * UNIT_ROUNDOFF * (a + b * scale)
    upper = np.clip((numerator + numerator_error) / -math.expm1(-h), 0.0, a)
    probs = np.zeros(grid.size)
    probs[:-1] += a - upper
    probs[1:] += upper
    probs[0] += a_all[0]
    return StepPmf(k_lo, probs, float(a_all[-1] + a_error_all[-1] + a_error_all[0]))


def loss_moments(direction: Direction, q: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of one step's loss under P by the trapezoid rule (spectrally accurate for these
    smooth, Gaussian-decaying integrands); they size the grids and never enter a bound."""
    pair = _Pair(direction, q, 1.0 / sigma)
    w = np.linspace(*pair.w_range(), 4001)
    weight, shift = pair.p_mixture
    density = (1 - weight) * np.exp(-(w**2) / 2) + weight * np.exp(-((w - shift) ** 2) / 2)
    density /= np.sum(density)
    loss = pair.loss(w)
    mean = float(np.sum(density * loss))
    return mean, float(np.sum(density * (loss - mean) ** 2))
