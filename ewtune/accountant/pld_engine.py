"""Pessimistic privacy loss distributions (PLD) of the Poisson-subsampled Gaussian, composed by FFT.

Private engine of :mod:`ewtune.accountant.certified`. Everything here errs on the safe side: every number it
returns is an upper bound on the true hockey-stick divergence delta(epsilon) of the composed mechanism.

The argument, in five steps:

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
3. *Composition.* If each step's pair is dominated by a discrete pair, the T-fold product is dominated by
   the product of the discrete pairs (domination is a statement about trade-off functions and is kept by
   composition: Dong, Roth, Su 2019, Lemma C.3; Doroshenko et al. 2022, Thm 3.3), whose loss is the sum of
   independent discrete losses: its PMF is the convolution, computed here on a circle of N grid cells by
   FFT, raising each mechanism's transform to its number of steps in one shot (Koskela et al. 2021).
4. *Wrap-around.* The circle (a power of two, N cells) holds the window of sums found by Chernoff bounds
   on the untilted PMFs (tail_mass on each side), widened to that of the tilted ones (step 5; tilted mass
   _TILTED_UPPER_TAIL above it, and at most _TILTED_WINDOW_FACTOR times as wide). Mass of the true sum above
   the circle may wrap to lower losses: a bound on it is added to delta (infinite loss): the smaller of
   Chernoff's on the untilted PMFs and e^{log M - theta x} Pr_tilted[J >= x] with Chernoff's on the tilted
   ones; what wraps stays in the circle as extra non-negative mass (only more delta, so the window only
   decides tightness). With no tilt, mass below the window wraps to higher losses, which only
   increases delta; with a positive tilt (which would shrink it), a bound on it is put at the window's
   lowest loss (moving mass up only increases delta). Every window is therefore sound, and with a positive
   tilt the window may start _TILTED_LOWER_SDS tilted standard deviations below the tilted mean (the
   epsilon the tilt is centred at) instead of at the untilted sum's lower edge: the cells below carry no
   delta at losses above the start, and the tilted mass below the window lands on higher cells multiplied
   by at most e^{-theta h N} (at most tail_mass in all, the condition for starting there). Answers at or
   below such a start are recomputed on the full window (:mod:`ewtune.accountant.certified`).
5. *Round-off, bounded cell by cell.* The FFT runs on the PMFs tilted by e^{theta loss} and normalised
   (Wilson & Keich's exponential shift: the cells where delta(eps) is decided are then not far below the
   largest, so absolute round-off is small against them), on a circle of N = 2^k cells. Every computed
   cell gets a rigorous bound B on its absolute error (in tilted units): the forward FFT's per-entry error
   is at most g(N) sqrt(N) ||x||_2 (Higham 2002, "Accuracy and stability of numerical algorithms",
   Thm 24.2, normwise, radix 2, twiddle error taken as 8u) plus the input's rounding; raising to the T-th
   power propagates it by |prod a^T - prod b^T| <= sum_i T_i |a_i - b_i| r_i^{T_i-1} prod_{k!=i} r_k^{T_k}
   (r the larger modulus) and adds the error of evaluating exp(T log b); the inverse FFT moves a cell by at
   most (1/N) times the l1 norm of the spectrum's error, plus its own g(N) ||z||_2. Each cell's upper
   bound is max(computed + B, 0) times e^{log M - theta loss} (the untilting, with its own relative
   rounding added); delta is increasing in every cell's mass, so these cell-wise upper bounds give an upper
   bound on delta. ComposedPmf.epsilon solves against delta (1 - 1e-6), which covers the summation error of
   its tail sums (at most n u of them, n <= 2^23 cells), and rounds the answer up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import fft, special

_UNIT_ROUNDOFF = np.finfo(float).eps / 2
_SUMMATION_MARGIN = 1e-6  # relative: covers the rounding of ComposedPmf.epsilon's tail sums (step 5)


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
            done = np.all(np.abs(w_next - w) <= 4 * _UNIT_ROUNDOFF * (1 + np.abs(w)))
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
            self._by_shift[shift] = np.maximum(big - small, 0.0), 8 * _UNIT_ROUNDOFF * big
        return self._by_shift[shift]

    def mixture(self, mixture: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        weight, shift = mixture
        mass, error = self.normal(0.0)
        if weight == 0.0:
            return mass, error
        shifted, shifted_error = self.normal(shift)
        return (
            (1 - weight) * mass + weight * shifted,
            (1 - weight) * error + weight * shifted_error + 2 * _UNIT_ROUNDOFF * mass,
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
    numerator_error = a_error + b_error * scale + 4 * _UNIT_ROUNDOFF * (a + b * scale)
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


@dataclass(frozen=True)
class ComposedPmf:
    """The composed pessimistic PLD: ``probs[i]`` at loss ``start + i*h``; ``infinite`` is the mass counted
    as infinite loss (truncated tails, wrap-around bound), already pessimistic; every cell is an upper bound."""

    start: float
    h: float
    probs: np.ndarray
    infinite: float
    round_off: float = math.inf  # the largest round-off bound added to a cell above the window's middle

    def round_off_share(self, epsilon: float) -> float:
        """An upper bound on how much of delta(epsilon) the round-off bounds make up (a guide for choosing
        the tilt: a share far below delta needs no tilt)."""
        above = self.probs.size - max(0, min(self.probs.size, math.floor((epsilon - self.start) / self.h)))
        return above * self.round_off

    def delta(self, epsilon: float) -> float:
        """delta(eps) = infinite + sum over losses l > eps of (1 - e^{eps - l}) p(l)."""
        losses = self.start + self.h * np.arange(self.probs.size)
        above = losses > epsilon
        return float(self.infinite + np.sum(-np.expm1(epsilon - losses[above]) * self.probs[above]))

    def epsilon(self, delta: float) -> float:
        """The smallest eps >= 0 with delta(eps) <= delta, solved exactly between grid points, where
        delta(eps) = A - e^{eps - l} S with A, S tail sums; rounded up by 1e-10 (1 + eps), far above the
        round-off of the sums and far below any accuracy that matters."""
        delta = delta * (1 - _SUMMATION_MARGIN)
        if self.infinite >= delta:
            return math.inf
        p = self.probs
        tail_mass = np.cumsum(p[::-1])[::-1]  # A_j = sum_{i >= j} p_i
        # S_j = sum_{i >= j} p_i e^{-(l_i - l_j)}, block by block from the top: within a block of L cells
        # from `start`, S_j = e^{h k} sum_{k' >= k} p_{start+k'} e^{-h k'} + e^{-h (L-k)} S_end (k = j - start;
        # L h <= 30 keeps e^{h k} far from overflow, and a closed form over the whole grid would overflow).
        # delta at grid loss l_j counts the cells above j:
        # A_{j+1} + infinite - e^{-h} S_{j+1}. The answer lies above the last j where that exceeds delta,
        # which the scan from the top meets first, usually high in the upper tail: it stops there.
        decay = math.exp(-self.h)
        discounted = np.empty(p.size)
        block, longest = _SCAN_CELLS, max(1, int(30 / self.h))
        end, last_over, carried = p.size, None, 0.0
        while end > 0 and last_over is None:
            start = max(0, end - min(block, longest))
            block *= 2  # the answer is usually met in the first blocks; if not, longer ones mean fewer steps
            k = np.arange(end - start)
            within = np.cumsum((p[start:end] * np.exp(-self.h * k))[::-1])[::-1]
            discounted[start:end] = within * np.exp(self.h * k) + np.exp(-self.h * (end - start - k)) * carried
            carried = float(discounted[start])
            above = min(end, p.size - 1)
            delta_at_grid = tail_mass[start + 1 : above + 1] - decay * discounted[start + 1 : above + 1] + self.infinite
            if above < end:  # the top cell: nothing above it but the infinite mass
                delta_at_grid = np.append(delta_at_grid, 0.0 + self.infinite)
            over = np.nonzero(delta_at_grid > delta)[0]
            if over.size:
                last_over = start + int(over[-1])
            end = start
        if last_over is None:
            epsilon = self.start + math.log(max((tail_mass[0] + self.infinite - delta) / discounted[0], 1e-300))
        else:
            j = last_over
            epsilon = self.start + self.h * (j + 1) + math.log((tail_mass[j + 1] + self.infinite - delta) / discounted[j + 1])
        return max(0.0, epsilon) + 1e-10 * (1 + max(0.0, epsilon))


def compose(
    pmfs: tuple[tuple[StepPmf, int], ...],
    h: float,
    tail_mass: float,
    tilt: float = 0.0,
    near_centre: bool = True,
    circle: "Circle | None" = None,
) -> ComposedPmf:
    """The FFT composition of ``steps`` copies of each PMF (module docstring, steps 3 to 5), on a window
    sized by Chernoff bounds so that at most about ``tail_mass`` of the sum lies outside it, computed on the
    PMFs tilted by e^{tilt * loss} (step 5) and returned as cell-wise upper bounds. With a tilt and
    ``near_centre``, the window starts a few tilted standard deviations below the tilted centre (step 4):
    then only the losses above ``start`` are resolved (the rest is an atom at ``start``). ``circle`` is
    :meth:`Circle.of` the same arguments, if the caller keeps it."""
    if any(not np.any(pmf.probs > 0) for pmf, _ in pmfs):  # a step with no finite loss: nothing is certified
        return ComposedPmf(0.0, h, np.zeros(1), 1.0)
    circle = circle or Circle.of(pmfs, h, tail_mass, tilt, near_centre)
    window_lo, size, cell_tilt, log_scale = circle.window_lo, circle.size, tilt * h, circle.log_scale
    # The circle holds the sums J in [window_lo, window_lo + size); heavier sums wrap to lower losses and
    # count as infinite: by Chernoff on the untilted PMFs, or on the tilted ones as
    # Pr[J >= x] <= e^{log_scale - cell_tilt x} Pr_tilted[J >= x], whichever is smaller.
    first_above = window_lo + size
    outside = min(
        circle.bulk.upper.mass_from(first_above, circle.support),
        math.exp(min(0.0, log_scale - cell_tilt * first_above)) * circle.upper.mass_from(first_above, circle.support),
    )
    values, error = _circular_power(circle.tilted, size)
    local = window_lo + np.arange(size)
    log_untilt = log_scale - cell_tilt * local
    # Relative round-off of exp(log_scale - cell_tilt J) (step 5, last item).
    untilt_error = 8 * _UNIT_ROUNDOFF * (1 + abs(log_scale) + float(np.max(np.abs(cell_tilt * local))))
    with np.errstate(divide="ignore"):
        log_upper = np.log(np.maximum(np.roll(values, -(window_lo % size)) + error, 0.0)) + log_untilt
    # No cell holds more than probability 1: capping there keeps an upper bound and avoids overflow.
    probs = np.minimum(np.exp(np.minimum(log_upper, 0.0)) * (1 + untilt_error), 1.0)
    if tilt > 0:  # lighter sums wrapped up shrink when untilted: their mass is put at the window's lowest loss
        probs[0] += min(math.exp(circle.finite_log_mass), circle.bulk.lower.mass_below(window_lo))
    infinite = -math.expm1(circle.finite_log_mass) + outside + size * _SMALLEST_COUNTED
    # The round-off bound in loss units decreases with the loss when tilted; untilted it is the same everywhere.
    round_off = error * math.exp(min(700.0, float(np.max(log_untilt[size // 2 :])))) * (1 + untilt_error)
    return ComposedPmf((circle.base + window_lo) * h, h, probs, min(1.0, infinite), round_off)


@dataclass(frozen=True)
class Bulk:
    """The untilted sum's window [lo, hi] (local indices of the composed support) and the Chernoff bounds on
    its mass below and above: the same for every tilt."""

    lo: int
    hi: int
    upper: "_ChernoffBound"
    lower: "_ChernoffBound"

    @property
    def circle_size(self) -> int:
        """The power of two above the window's width: about the untilted composition's circle."""
        return 1 << max(1, (self.hi - self.lo).bit_length())


def untilted_bulk(pmfs: tuple[tuple[StepPmf, int], ...], tail_mass: float) -> Bulk:
    """The :class:`Bulk` of the untilted composition of ``pmfs``: mass at most tail_mass outside, each side."""
    support = sum(steps * (pmf.probs.size - 1) for pmf, steps in pmfs) + 1
    return Bulk(*_window([(pmf.probs, steps) for pmf, steps in pmfs], support, tail_mass, tail_mass))


_TILTED_WINDOW_FACTOR = 4
_TILTED_LOWER_SDS = 3.0  # a tilted window may start this many tilted standard deviations below the tilted mean
_TILTED_UPPER_TAIL = 1e-7  # tilted mass above the circle's top (a guide: what wraps is counted, step 4)


@dataclass(frozen=True)
class Circle:
    """The window of sums that the FFT circle of :func:`compose` holds (module docstring, step 4), in local
    indices of the composed support (which starts at loss ``base * h``), with the tilted probability vectors
    and the Chernoff bounds that bound the mass outside it."""

    base: int
    support: int
    finite_log_mass: float
    log_scale: float
    tilted: list[tuple[np.ndarray, int]]
    upper: "_ChernoffBound"  # of the tilted sum
    bulk: Bulk
    window_lo: int
    size: int

    @classmethod
    def of(
        cls, pmfs: tuple[tuple[StepPmf, int], ...], h: float, tail_mass: float, tilt: float, near_centre: bool = True, bulk: Bulk | None = None
    ) -> "Circle":
        """The circle :func:`compose` uses for these arguments; ``bulk`` is :func:`untilted_bulk` of the same
        PMFs and tail_mass, if the caller keeps it."""
        bulk = bulk or untilted_bulk(pmfs, tail_mass)
        support = sum(steps * (pmf.probs.size - 1) for pmf, steps in pmfs) + 1
        cell_tilt = tilt * h
        tilted = [(_tilted(pmf.probs, cell_tilt), steps) for pmf, steps in pmfs]
        tilted_probs = [(probs, steps) for (probs, _), steps in tilted]
        # The full window covers the tilted sum's bulk (its top only where the tilted mass above is at most
        # _TILTED_UPPER_TAIL: more wraps, sound but looser) and the untilted sum's bulk (so that little
        # untilted mass lies below it, step 4).
        tilted_lo, tilted_hi, upper, _ = _window(tilted_probs, support, tail_mass, _TILTED_UPPER_TAIL)
        untilted_lo, untilted_hi = bulk.lo, bulk.hi
        window_lo, size = _circle_window(min(tilted_lo, untilted_lo), tilted_hi, untilted_lo, untilted_hi)
        # Tilted, the window may start near the tilted centre (step 4): the cells below carry no delta at the
        # epsilon aimed at, and what lies below the window wraps to the circle's top shrunk by e^{-tilt h size}
        # (at most tail_mass in all when tilt h size >= log(1 / tail_mass)).
        raised = max(window_lo, _tilted_centre_less_sds(tilted_probs, _TILTED_LOWER_SDS))
        if tilt > 0 and near_centre and raised < tilted_hi:
            raised_lo, raised_size = _circle_window(raised, tilted_hi, untilted_lo, untilted_hi)
            if cell_tilt * raised_size >= -math.log(tail_mass):
                window_lo, size = raised_lo, raised_size
        return cls(
            base=sum(steps * pmf.offset for pmf, steps in pmfs),
            support=support,
            finite_log_mass=sum(steps * math.log1p(-pmf.infinite) for pmf, steps in pmfs),
            log_scale=sum(steps * log_norm for (_, log_norm), steps in tilted),
            tilted=tilted_probs,
            upper=upper,
            bulk=bulk,
            window_lo=window_lo,
            size=size,
        )


def _circle_window(lo: int, tilted_hi: int, untilted_lo: int, untilted_hi: int) -> tuple[int, int]:
    """The circle's first sum ``lo`` and its size, the power of two above the window from ``lo`` to the
    tilted upper edge, which a tilted heavy tail can put far away, so capped at _TILTED_WINDOW_FACTOR times
    the untilted window's width (any window is sound: what wraps is counted, step 4), at the price of
    looseness that the choice among tilts then avoids."""
    hi = max(untilted_hi, min(tilted_hi, lo + _TILTED_WINDOW_FACTOR * (untilted_hi - untilted_lo + 1)))
    return lo, 1 << max(1, (hi - lo).bit_length())  # a power of two: Higham's Thm 24.2 (step 5)


def _tilted_centre_less_sds(pmfs: list[tuple[np.ndarray, int]], sds: float) -> int:
    """floor(mean - sds * sd) of the sum J of the probability vectors' local indices (a guide for the window's
    start: any start is sound, module docstring step 4)."""
    mean = variance = 0.0
    for probs, steps in pmfs:
        cells = np.arange(probs.size)
        step_mean = float(np.sum(probs * cells))
        mean += steps * step_mean
        variance += steps * float(np.sum(probs * np.square(cells - step_mean)))
    return math.floor(mean - sds * math.sqrt(variance))
_SMALLEST_COUNTED = 1e-300  # per cell: covers an upper bound that underflows to 0


def _tilted(probs: np.ndarray, cell_tilt: float) -> tuple[np.ndarray, float]:
    """probs_j e^{cell_tilt j} / m and log m, m = sum_j probs_j e^{cell_tilt j}: a probability vector."""
    with np.errstate(divide="ignore"):
        exponent = np.log(probs) + cell_tilt * np.arange(probs.size)
    peak = float(np.max(exponent))
    weights = np.exp(exponent - peak)
    total = float(np.sum(weights))
    return weights / total, peak + math.log(total)


def _fft_error_factor(size: int) -> float:
    """g(N) = log2(N) eta / (1 - log2(N) eta), eta = mu + gamma_4 (sqrt 2 + mu): Higham 2002, Thm 24.2, the
    normwise relative error of a radix-2 FFT; mu, the error of the twiddle factors, is taken as 8 u
    (pocketfft computes them to about one ulp)."""
    twiddle = 8 * _UNIT_ROUNDOFF
    gamma_4 = 4 * _UNIT_ROUNDOFF / (1 - 4 * _UNIT_ROUNDOFF)
    eta = twiddle + gamma_4 * (math.sqrt(2) + twiddle)
    levels = math.log2(size)
    return levels * eta / (1 - levels * eta)


def _circular_power(pmfs: list[tuple[np.ndarray, int]], size: int) -> tuple[np.ndarray, float]:
    """The circular convolution of ``steps`` copies of each probability vector, by FFT, and a bound on the
    absolute error of every computed cell (module docstring, step 5). Complex logarithms and exponentials
    are evaluated only at the frequencies whose powered modulus is representable (above e^-745): a long
    composition's spectrum is negligible beyond its lowest frequencies, and elsewhere the composed entry is
    set to 0 with its true modulus, at most e^-745 there, counted as its error."""
    g = _fft_error_factor(size)
    spectra, log_moduli, log_radii, entry_errors = [], [], [], []
    for probs, steps in pmfs:
        wrapped = _wrap(probs, size)
        spectrum = fft.rfft(wrapped)
        # Per-entry error of the spectrum: the normwise bound g ||F x||_2 = g sqrt(N) ||x||_2, plus the
        # rounding of the tilted input and of its wrapping (at most 4 u in l1, hence in every entry).
        entry_error = 1.01 * g * math.sqrt(size) * _l2_norm(wrapped) + 4 * _UNIT_ROUNDOFF
        modulus = np.abs(spectrum)
        with np.errstate(divide="ignore"):
            log_moduli.append(np.log(modulus))
        log_radii.append(np.log(np.minimum(modulus + entry_error, 1.0 + entry_error)))
        spectra.append((spectrum, steps))
        entry_errors.append((entry_error, steps))
    log_modulus = sum(steps * log_mod for log_mod, (_, steps) in zip(log_moduli, spectra))
    alive = np.nonzero(log_modulus > -745.0)[0]
    composed, evaluated = _powered_alive(spectra, alive, log_modulus)
    # Powering: |prod a^T - prod b^T| <= sum_i T_i |a_i - b_i| r_i^{T_i - 1} prod_{k != i} r_k^{T_k},
    # r the larger of the true and computed moduli (at most |b| + error, and the true one at most 1).
    log_all = sum(steps * log_radius for log_radius, (_, steps) in zip(log_radii, spectra))
    propagated = sum(
        np.exp(math.log(steps * error) + log_all - log_radius)
        for log_radius, (error, steps) in zip(log_radii, entry_errors)
    )
    spectrum_error = propagated + evaluated
    circle = fft.irfft(composed, size)
    # The inverse DFT of the spectrum's errors: each cell moves by at most (1/N) sum over all N frequencies
    # (the rfft half counted twice); its own rounding is g ||z||_2 with ||z||_2 <= (||computed||_2 + that) / (1 - g).
    full_l1 = 2 * float(np.sum(spectrum_error))
    full_l2 = math.sqrt(2 * float(np.sum(spectrum_error**2)))
    own = g / (1 - g) * (_l2_norm(circle) + full_l2 / math.sqrt(size))
    return circle, full_l1 / size + own


def _powered_alive(spectra: list[tuple[np.ndarray, int]], alive: np.ndarray, log_modulus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prod b^T = exp(sum T log b) at the ``alive`` frequencies (0 elsewhere), and a bound on the error of
    evaluating it at every frequency: elsewhere the product's modulus itself, exp(log_modulus)."""
    log_spectra = [(np.log(spectrum[alive]), steps) for spectrum, steps in spectra]
    composed = np.zeros(log_modulus.size, dtype=complex)
    composed[alive] = np.exp(sum(steps * log_spectrum for log_spectrum, steps in log_spectra))
    evaluated = np.exp(log_modulus)
    # Evaluating exp(sum T log b): log b to within 2u|log b| + 8u absolute, each sum term's rounding, exp's.
    drift = sum(steps * (2 * _UNIT_ROUNDOFF * np.abs(log_spectrum) + 8 * _UNIT_ROUNDOFF) for log_spectrum, steps in log_spectra)
    evaluated[alive] = np.abs(composed[alive]) * (np.expm1(np.minimum(drift, 700.0)) + 4 * _UNIT_ROUNDOFF)
    return composed, evaluated


def _l2_norm(values: np.ndarray) -> float:
    """||values||_2 rounded up by 1%, far more than its own rounding (np.sum, not BLAS: no thread start-up)."""
    return 1.01 * math.sqrt(float(np.sum(np.square(values))))


def _wrap(probs: np.ndarray, size: int) -> np.ndarray:
    rows = -(-probs.size // size)
    padded = np.zeros(rows * size)
    padded[: probs.size] = probs
    return padded.reshape(rows, size).sum(axis=0)


def _window(pmfs, support: int, lower_tail: float, upper_tail: float) -> tuple[int, int, "_ChernoffBound", "_ChernoffBound"]:
    """Index range [lo, hi] (relative to the composed support's start) outside which the composed sum has
    mass <= lower_tail below and <= upper_tail above, by Chernoff's bound Pr[J >= x] <= E[e^{lam J}] e^{-lam x}."""
    exact = [(_Support.of(probs), steps) for probs, steps in pmfs]
    coarse = [(support_.coarsened(_SEARCH_CELLS), steps) for support_, steps in exact]
    variance = sum(steps * support_.variance() for support_, steps in exact)
    log_lam = lambda tail: 0.5 * math.log(2 * -math.log(tail) / max(variance, 1.0))  # noqa: E731  the Gaussian optimum
    upper = _ChernoffBound(exact, coarse, 1.0, -math.log(upper_tail), log_lam(upper_tail))
    lower = _ChernoffBound(exact, coarse, -1.0, -math.log(lower_tail), log_lam(lower_tail))
    hi = min(support - 1, math.ceil(upper.edge))
    return min(max(0, math.floor(lower.edge)), hi), hi, upper, lower


_SEARCH_CELLS = 1024
_SCAN_CELLS = 4096  # cells in the first step of ComposedPmf.epsilon's downward scan (each next one twice as many)


@dataclass(frozen=True)
class _Support:
    """The positive cells of a PMF: grid indices (floats) and log-probabilities."""

    index: np.ndarray
    log_probs: np.ndarray

    @classmethod
    def of(cls, probs: np.ndarray) -> "_Support":
        index = np.nonzero(probs > 0)[0]
        return cls(index.astype(float), np.log(probs[index]))

    def variance(self) -> float:
        probs = np.exp(self.log_probs)
        mean = float(np.sum(probs * self.index)) / float(np.sum(probs))
        return float(np.sum(probs * (self.index - mean) ** 2)) / float(np.sum(probs))

    def coarsened(self, cells: int) -> "_Support":
        """Consecutive cells merged into about ``cells`` atoms at their mean index: the same mass and mean,
        for *searching* lam cheaply (no bound is ever computed from it)."""
        if self.index.size <= cells:
            return self
        starts = np.arange(0, self.index.size, -(-self.index.size // cells))
        probs = np.exp(self.log_probs)
        mass = np.add.reduceat(probs, starts)
        keep = mass > 0
        mean_index = np.add.reduceat(probs * self.index, starts)[keep] / mass[keep]
        return _Support(mean_index, np.log(mass[keep]))

    def cumulants(self, lam: float) -> tuple[float, float, float]:
        """log E[e^{lam J}] and its first two derivatives in lam."""
        exponent = self.log_probs + lam * self.index
        peak = float(exponent.max())
        weights = np.exp(exponent - peak)
        total = float(np.sum(weights))
        mean = float(np.sum(weights * self.index)) / total
        return peak + math.log(total), mean, float(np.sum(weights * (self.index - mean) ** 2)) / total


class _ChernoffBound:
    """The Chernoff edge of the composed finite part (a sub-probability; J the sum of local grid indices)
    on one side: x = (K(lam) + c) / lam with K(lam) = log E[e^{sign lam J}], so that
    Pr[sign J >= x] <= e^{-c} for every lam > 0. The best lam solves g(lam) = lam K' - K - c = 0 (g is
    increasing: g' = lam K''); it is sought by safeguarded Newton in log lam on coarsened PMFs, and the
    edge is then computed from the exact PMFs at the lam found (any lam gives a valid bound)."""

    def __init__(self, exact, coarse, sign: float, log_inverse_tail: float, log_lam: float) -> None:
        self.sign = sign
        bracket = [-math.inf, math.inf]
        for _ in range(60):
            k0, k1, k2 = self._cumulants(coarse, math.exp(log_lam))
            lam = math.exp(log_lam)
            g = lam * k1 - k0 - log_inverse_tail
            bracket[0 if g < 0 else 1] = log_lam
            proposal = log_lam + max(min(-g / max(lam * lam * k2, 1e-300), 2.0), -2.0)  # dg/dlog lam = lam^2 K''
            if not bracket[0] < proposal < bracket[1] and math.isfinite(bracket[0] + bracket[1]):
                proposal = (bracket[0] + bracket[1]) / 2
            if abs(proposal - log_lam) < 1e-3:
                break
            log_lam = proposal
        self.lam = math.exp(log_lam)
        self.log_mgf = self._cumulants(exact, self.lam)[0]
        self.edge = sign * (self.log_mgf + log_inverse_tail) / self.lam

    def _cumulants(self, supports, lam: float) -> tuple[float, float, float]:
        """K(lam), K'(lam), K''(lam) of sign * J."""
        k0 = k1 = k2 = 0.0
        for support_, steps in supports:
            c0, c1, c2 = support_.cumulants(self.sign * lam)
            k0, k1, k2 = k0 + steps * c0, k1 + steps * self.sign * c1, k2 + steps * c2
        return k0, k1, k2

    def mass_below(self, first: int) -> float:
        """Bound on Pr[J < first] (for the lower side): Pr[-J >= 1 - first] <= E[e^{-lam J}] e^{lam (first - 1)}."""
        if first <= 0:
            return 0.0
        return math.exp(min(0.0, self.log_mgf + self.lam * (first - 1)))

    def mass_from(self, first: int, support: int) -> float:
        """Bound on Pr[J >= first] (for the upper side); 0 when that lies beyond the support."""
        if first >= support:
            return 0.0
        return math.exp(min(0.0, self.log_mgf - self.lam * first))
