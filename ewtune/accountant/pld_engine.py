"""Pessimistic privacy loss distributions (PLD) of the Poisson-subsampled Gaussian, composed by FFT.

Private engine of :mod:`ewtune.accountant.certified`. Everything here errs on the safe side: every number it
returns is an upper bound on the true hockey-stick divergence delta(epsilon) of the composed mechanism.

The argument, in five steps, each stated in full beside the code it justifies:

1. *Dominating pairs* and 2. *connect-the-dots discretisation* (Doroshenko et al. 2022): one step's pessimistic
   discrete PLD, :mod:`ewtune.accountant.pld_grid`.
3. *Composition.* If each step's pair is dominated by a discrete pair, the T-fold product is dominated by
   the product of the discrete pairs (domination is a statement about trade-off functions and is kept by
   composition: Dong, Roth, Su 2019, Lemma C.3; Doroshenko et al. 2022, Thm 3.3), whose loss is the sum of
   independent discrete losses: its PMF is the convolution, computed here on a circle of N grid cells by
   FFT, raising each mechanism's transform to its number of steps in one shot (Koskela et al. 2021).
4. *Wrap-around*: the window of sums the FFT circle holds, and bounds on the mass outside it,
   :mod:`ewtune.accountant.pld_window`.
5. *Round-off, bounded cell by cell*: the FFT runs on tilted PMFs and every computed cell gets a rigorous
   bound B on its absolute error (in tilted units), :mod:`ewtune.accountant.pld_fft`. Each cell's upper
   bound is max(computed + B, 0) times e^{log M - theta loss} (the untilting, with its own relative
   rounding added); delta is increasing in every cell's mass, so these cell-wise upper bounds give an upper
   bound on delta. ComposedPmf.epsilon solves against delta (1 - 1e-6), which covers the summation error of
   its tail sums (at most n u of them, n <= 2^23 cells), and rounds the answer up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ewtune.accountant.pld_fft import circular_power
from ewtune.accountant.pld_grid import UNIT_ROUNDOFF, StepPmf
from ewtune.accountant.pld_window import Circle

_SUMMATION_MARGIN = 1e-6  # relative: covers the rounding of ComposedPmf.epsilon's tail sums (step 5)
_SCAN_CELLS = 4096  # cells in the first step of ComposedPmf.epsilon's downward scan (each next one twice as many)
_SMALLEST_COUNTED = 1e-300  # per cell: covers an upper bound that underflows to 0


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
    values, error = circular_power(circle.tilted, size)
    local = window_lo + np.arange(size)
    log_untilt = log_scale - cell_tilt * local
    # Relative round-off of exp(log_scale - cell_tilt J) (step 5, last item).
    untilt_error = 8 * UNIT_ROUNDOFF * (1 + abs(log_scale) + float(np.max(np.abs(cell_tilt * local))))
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
