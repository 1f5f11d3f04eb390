"""The window of sums that the FFT circle holds, and the Chernoff bounds on the mass outside it.

Step 4 of the argument of :mod:`ewtune.accountant.pld_engine`:

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ewtune.accountant.pld_grid import StepPmf


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


def _tilted(probs: np.ndarray, cell_tilt: float) -> tuple[np.ndarray, float]:
    """probs_j e^{cell_tilt j} / m and log m, m = sum_j probs_j e^{cell_tilt j}: a probability vector."""
    with np.errstate(divide="ignore"):
        exponent = np.log(probs) + cell_tilt * np.arange(probs.size)
    peak = float(np.max(exponent))
    weights = np.exp(exponent - peak)
    total = float(np.sum(weights))
    return weights / total, peak + math.log(total)


_SEARCH_CELLS = 1024


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
