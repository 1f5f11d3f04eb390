"""The certified accountant: an upper bound on epsilon(delta) that is never below the true value.

The bound is the privacy loss distribution (PLD) of the composition, discretised pessimistically with
connect-the-dots (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the dots: tighter discrete
approximations of privacy loss distributions", PETS 2022) and composed by FFT (Koskela, Jalko, Honkela
2020; Koskela, Jalko, Prediger, Honkela 2021); truncated tails count as infinite loss (Meiser & Mohammadi
2018, "privacy buckets"). Add/remove-one composes the remove pairs and the add pairs separately and takes
the maximum at the end; replace-one uses its own (symmetric) pair. :mod:`ewtune.accountant.pld_engine` states
the soundness argument step by step.

*q = 1.* When every step samples every record, the composition is one Gaussian mechanism and its exact
curve is the answer (:mod:`ewtune.accountant.gaussian_closed_form`, checked in 50-digit arithmetic). Sampling only
helps (the q < 1 pair is the q = 1 pair after the Markov kernel "keep the output with probability q, else
replace it by fresh N(0, 1)", the same kernel for both sides; data processing), so that closed form is also
a sound bound for every q: it answers when the grid's bound is infinite and when some noise multiplier is
below 0.2, where the loss spans more than the grids are built for (the answer is then loose, never low).

*Round-off.* The composition is computed on exponentially tilted PMFs with a rigorous per-cell bound on the
FFT's round-off (:mod:`ewtune.accountant.pld_engine`, step 5). Any tilt is sound; a good one keeps the round-off
bounds negligible where delta(epsilon) is decided. The tilt is found without composing: theta solving the
saddle-point approximation of delta on the grid PMFs' cumulant generating function K,
log delta = K(theta) - theta K'(theta) - log(sqrt(2 pi K''(theta)) theta (1 + theta)), i.e. the tilt centred
at about the epsilon that answers delta (delta rounded down to a power of two, so that delta(epsilon) can
find the same tilt from a guess). Where that tilt makes the tilted loss heavy-tailed (the grid's top
cells weigh e^{theta loss}, as for q = 1e-4 at sigma 1) its FFT circle widens to hold the tail; the largest
smaller tilt whose circle is at most _LIGHTER_TILT_WIDENING times the untilted one's is used instead. The
tilt is kept if its round-off bounds make up at most _NEGLIGIBLE_ROUND_OFF of delta on the coarse grid;
otherwise the tilt is searched as before: from the untilted bound, the saddle point K'(theta) = bound,
re-centred at each bound found while that decreases (at most _RECENTRINGS times). delta(epsilon) takes the
smallest of the untilted bound, the bound at the tilt centred at epsilon and the bounds at the tilts that
epsilon(delta) would use for the deltas about a first guess, on every interval. Tilted compositions
resolve only the losses from a few tilted standard deviations below the tilted centre (a circle half as
large or less); an answer at or below that start is recomputed on the full window (both are sound:
pld_engine, step 4).

*Choice of the discretisation interval h.* Every interval gives a sound upper bound; a coarse one is
merely loose. Connect-the-dots converges like h^2 (its error is mostly the variance it adds, about h^2/6
per step), so the engine computes the bound at two dyadic intervals 2h and h, h about half the per-step
loss's standard deviation, fits error(h) = c h^2 to their difference (Richardson) and, if the error at h
exceeds the target, jumps to the dyadic interval that the h^2 law predicts meets it (and checks again
there). The target is the error dp_accounting would leave at its default interval 1e-4 (c * 1e-8), so that
the bound is at least as accurate as dp_accounting's, but never looser than ``TARGET_RELATIVE_ERROR``
(0.25% of epsilon: half the documented promise of 0.5%, the other half a margin for the error of
Richardson's estimate) and never tighter than 0.007% of epsilon. The cap binds only where dp_accounting's
own error at 1e-4 exceeds 0.25% (5% at q = 1e-4, sigma 1, T = 1e5, delta 1e-8). Of the two add/remove
directions, the dominated one is refined only until its bound falls below the dominating one's, its first
step guided by the dominating direction's c. The answer is the smallest of the sound bounds computed, so
it is always a certified upper bound. Measured
(ewtune/bench/certified_sweep.py, benchmarks/results/certified_sweep.*): at q = 1 within 2e-12 of the exact
value; elsewhere the tests check 0.5% against dp_accounting's fine pessimistic PLD.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ewtune.accountant.gaussian_closed_form import gaussian_delta, gaussian_epsilon
from ewtune.accountant.events import DpEvent, Neighbouring, mechanisms, neighbouring_of
from ewtune.accountant.memo import Memo
from ewtune.accountant.privacy_accountant import Kind, PrivacyAccountant
from ewtune.accountant.pld_engine import ComposedPmf, compose
from ewtune.accountant.pld_grid import Direction, StepPmf, loss_moments, step_pmf
from ewtune.accountant.pld_window import Bulk, Circle, untilted_bulk

TARGET_RELATIVE_ERROR = 2.5e-3
"""Loosest error aimed at by the interval choice: half the documented promise, 0.5%, checked in tests."""

_DEFAULT_TAIL = 1e-12  # mass allowed outside the grids in total; lowered for delta below 1e-8
_MAX_REFINEMENTS = 3
_FINEST_LOG2_INTERVAL = -26  # h >= 1.5e-8: a guard against runaway grids, never reached in practice
_BASELINE_INTERVAL = 1e-4  # dp_accounting's default: the bound aims to be at least as accurate as it
_ERROR_FLOOR = 7e-5
_MAX_TILT = 1024.0
_TILT_RESOLUTION = 1 / 64
_RECENTRINGS = 5
_SETTLED_TILT_CHANGE = 0.05  # relative: a re-centred tilt this close to the last one is not tried
_LIGHTER_TILT_BISECTIONS = 4
_LIGHTER_TILT_WIDENING = 2  # a tilted circle may be this many times the untilted one's size
_GUESS_FACTORS = (0.25, 0.5, 1.0, 2.0)  # delta(epsilon) tries the tilts of these multiples of its first guess
_NEGLIGIBLE_ROUND_OFF = 1e-4  # of delta: a tilt (or none) whose round-off bounds make up less is kept
_SMALLEST_GRID_SIGMA = 0.2
_MAX_GRID_CELLS = 2**22  # the composed window's expected size is kept below this (memory and time)

CERTIFIED_ACCOUNTANT = {
    "name": "ewtune-certified-pld",
    "version": "5",
    "discretisation": (
        "q = 1 or sigma < 0.2: Gaussian closed form (q = 1) checked in 50 digits; else connect-the-dots PLD, both directions, tilted "
        "FFT composition with a per-cell round-off bound; dyadic interval chosen per event by "
        "Richardson's h^2 law: error at most that of interval 1e-4, at most "
        f"{TARGET_RELATIVE_ERROR:g} and at least {_ERROR_FLOOR:g} of epsilon"
    ),
}

_Mechanisms = tuple[tuple[float, float, int], ...]


class CertifiedAccountant(PrivacyAccountant):
    """The certified bound: the guarantee. Owns its caches: the step PMFs per (direction, q, sigma,
    interval, tail), the untilted windows per (direction, mechanisms, interval, tail), the FFT circles and the
    composed PMFs per (direction, mechanisms, interval, tail, tilt) and their epsilons per delta, the loss
    moments per (direction, q, sigma), the first intervals per (direction, mechanisms), and (from
    :class:`PrivacyAccountant`) its answers per event."""

    name = "certified"
    label = "certified epsilon (PLD upper bound: the guarantee)"
    kind = Kind.BOUND

    def __init__(self) -> None:
        super().__init__()
        self._step_pmfs = Memo(maxsize=256)
        self._composed_pmfs = Memo(maxsize=64)
        self._composed_epsilons = Memo(maxsize=256)
        self._moments = Memo(maxsize=1024)
        self._bulks = Memo(maxsize=64)
        self._circles = Memo(maxsize=256)
        self._log2_intervals = Memo(maxsize=256)

    def _epsilon(self, event: DpEvent, delta: float) -> float:
        """An upper bound on the epsilon at which ``event`` is (epsilon, delta)-DP; ``inf`` if none exists
        below the mass that the bound must count as infinite loss."""
        relation, mechs = _mechanisms_of(event)
        if _all_full_batch(mechs) or _noise_too_small_for_the_grid(mechs):
            return gaussian_epsilon(_gaussian_mechanisms(mechs), _sensitivity(relation), delta)
        tail = min(_DEFAULT_TAIL, 1e-4 * delta)
        tilts = {d: self._better_tilt(d, mechs, delta, tail) for d in _directions(relation)}
        coarse = {d: self._composed_epsilon(d, mechs, self._first_log2_interval(d, mechs) + 1, tail, tilts[d], delta) for d in tilts}
        bound, slope = 0.0, None
        # The maximum over directions only needs each direction refined until its (sound) bound falls below
        # the bound already established by a dominating direction, whose h^2 law guides the way there.
        for direction in sorted(coarse, key=coarse.get, reverse=True):
            if coarse[direction] > bound:
                refined = self._refined_epsilons(direction, mechs, delta, tail, tilts[direction], enough=bound, slope=slope)
                bound, slope = max(bound, min(refined.values())), slope or _richardson_slope(refined)
        if not math.isfinite(bound):  # sampling only helps: the q = 1 closed form bounds every q (module docstring)
            return gaussian_epsilon(_gaussian_mechanisms(mechs), _sensitivity(relation), delta)
        return float(bound)

    def _delta(self, event: DpEvent, epsilon: float) -> float:
        """An upper bound on delta(epsilon) of ``event``: the smallest of the bounds on every dyadic interval
        from the initial one down to the finest that :meth:`_epsilon` would use at that delta (so that
        delta(epsilon(delta)) <= delta)."""
        relation, mechs = _mechanisms_of(event)
        if _all_full_batch(mechs) or _noise_too_small_for_the_grid(mechs):
            return gaussian_delta(_gaussian_mechanisms(mechs), _sensitivity(relation), epsilon)
        full_batch = gaussian_delta(_gaussian_mechanisms(mechs), _sensitivity(relation), epsilon)
        return min(full_batch, float(max(self._delta_one_direction(direction, mechs, epsilon) for direction in _directions(relation))))

    def _refined_epsilons(
        self,
        direction: Direction,
        mechs: _Mechanisms,
        delta: float,
        tail: float,
        tilt: float,
        enough: float = 0.0,
        slope: float | None = None,
    ) -> dict[int, float]:
        """Epsilon bounds keyed by log2 of the interval, refined until Richardson's error estimate of the
        finest meets :func:`_error_target` (module docstring), or until a bound is at most ``enough``. With
        ``slope`` (c of another direction's error(h) = c h^2) and ``enough``, the first step goes from the
        coarse interval straight to where that law puts the bound below ``enough``."""
        log2_fine = self._first_log2_interval(direction, mechs)
        estimates: dict[int, float] = {}

        def at(log2_h: int) -> float:
            if log2_h not in estimates:
                estimates[log2_h] = self._composed_epsilon(direction, mechs, log2_h, tail, tilt, delta)
            return estimates[log2_h]

        if slope is not None and enough > 0.0:
            log2_fine, c = log2_fine + 1, slope
            at(log2_fine)
        else:  # error(h) = c h^2: the drop from 2h to h is 3 c h^2.
            c = (at(log2_fine + 1) - at(log2_fine)) / (3.0 * 4.0**log2_fine)
        for _ in range(_MAX_REFINEMENTS):
            fine = estimates[log2_fine]
            if not (math.isfinite(c) and c > 0.0 and math.isfinite(fine)) or fine <= enough:
                break
            error, target = c * 4.0**log2_fine, _error_target(c, fine)
            halvings = math.ceil(0.5 * math.log2(error / target))  # to bring the error to the target
            if halvings <= 0:
                break
            # Fewer may bring the bound below `enough`, which is all a dominated direction needs.
            drop = lambda k: c * (4.0**log2_fine - 4.0 ** (log2_fine - k))  # noqa: E731
            halvings = next((k for k in range(1, halvings) if drop(k) > 1.05 * (fine - enough) > 0), halvings)
            finer = max(log2_fine - halvings, _FINEST_LOG2_INTERVAL)
            if finer == log2_fine:
                break
            c = (fine - at(finer)) / (4.0**log2_fine - 4.0**finer)
            log2_fine = finer
        return estimates

    def _delta_one_direction(self, direction: Direction, mechs: _Mechanisms, epsilon: float) -> float:
        """The smallest of the bounds, untilted, at the tilt centred at ``epsilon`` and at the tilts that
        :meth:`_epsilon` would use at the deltas near a first guess (a quarter of it to twice it), on every
        dyadic interval from the initial one down to the finest that :meth:`_epsilon` would use at that delta."""
        initial = self._first_log2_interval(direction, mechs) + 1
        probe = min(self._composed(direction, mechs, initial - 1, _DEFAULT_TAIL, 0.0).delta(epsilon), 1.0)
        if probe <= 0.0 or probe >= 1.0:
            return probe
        tail = _DEFAULT_TAIL if probe >= 1e-8 else 1e-4 * probe
        untilted_pmf = self._composed(direction, mechs, initial - 1, tail, 0.0)
        tilts = [0.0]
        if untilted_pmf.round_off_share(epsilon) > _NEGLIGIBLE_ROUND_OFF * probe:
            tilts.append(self._tilt(direction, mechs, initial - 1, tail, epsilon))
        delta_at = lambda tilt: self._composed_delta(direction, mechs, initial - 1, tail, tilt, epsilon)  # noqa: E731
        guess = min(min(map(delta_at, tilts)), probe)
        # epsilon(delta) used the tilt of delta's power of two: one of those about the guess.
        tilts.extend({self._better_tilt(direction, mechs, guess * factor, tail) for factor in _GUESS_FACTORS if guess * factor > 0})
        better = min(tilts, key=delta_at)
        finest = min(self._refined_epsilons(direction, mechs, min(delta_at(better), probe), tail, better))
        return min(
            self._composed_delta(direction, mechs, log2_h, tail, tilt, epsilon)
            for log2_h in range(initial, finest - 1, -1)
            for tilt in set(tilts)
        )

    def _composed(
        self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, near_centre: bool = True
    ) -> ComposedPmf:
        key = (direction, mechs, log2_h, tail, tilt, near_centre)
        return self._composed_pmfs.get(key, lambda: self._compose(direction, mechs, log2_h, tail, tilt, near_centre))

    def _composed_epsilon(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, delta: float) -> float:
        key = (direction, mechs, log2_h, tail, tilt, delta)
        return self._composed_epsilons.get(key, lambda: self._resolved_epsilon(direction, mechs, log2_h, tail, tilt, delta))

    def _resolved_epsilon(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, delta: float) -> float:
        """The bound from the composition whose window starts near the tilted centre, unless the answer falls
        at or below its first cell (the centre was far above the answer): then from the full window."""
        epsilon = self._composed(direction, mechs, log2_h, tail, tilt).epsilon(delta)
        if self._resolves(direction, mechs, log2_h, tail, tilt, epsilon):
            return epsilon
        return self._composed(direction, mechs, log2_h, tail, tilt, near_centre=False).epsilon(delta)

    def _composed_delta(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, epsilon: float) -> float:
        """delta(epsilon) from the composition whose window starts near the tilted centre if that lies below
        epsilon, else from the full window."""
        near_centre = self._resolves(direction, mechs, log2_h, tail, tilt, epsilon)
        return self._composed(direction, mechs, log2_h, tail, tilt, near_centre).delta(epsilon)

    def _resolves(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, epsilon: float) -> bool:
        """Whether ``epsilon`` lies above the first cell of the composition near the tilted centre (pld_engine,
        compose), so that the losses deciding delta there are resolved cell by cell."""
        return epsilon > self._composed(direction, mechs, log2_h, tail, tilt).start + 2.0**log2_h

    def _compose(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, near_centre: bool) -> ComposedPmf:
        circle = self._circle(direction, mechs, log2_h, tail, tilt, near_centre)
        return compose(self._grid_step_pmfs(direction, mechs, log2_h, tail), 2.0**log2_h, tail / 4, tilt, near_centre, circle)

    def _circle(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float, near_centre: bool = True) -> Circle:
        key = (direction, mechs, log2_h, tail, tilt, near_centre)
        return self._circles.get(key, lambda: Circle.of(
            self._grid_step_pmfs(direction, mechs, log2_h, tail), 2.0**log2_h, tail / 4, tilt, near_centre, self._bulk(direction, mechs, log2_h, tail)
        ))

    def _bulk(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float) -> Bulk:
        """The untilted sum's window, shared by the compositions at every tilt."""
        key = (direction, mechs, log2_h, tail)
        return self._bulks.get(key, lambda: untilted_bulk(self._grid_step_pmfs(direction, mechs, log2_h, tail), tail / 4))

    def _grid_step_pmfs(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float) -> tuple[tuple[StepPmf, int], ...]:
        h = 2.0**log2_h
        step_tail = tail / (4 * sum(steps for _, _, steps in mechs))
        return tuple((self._step_pmf(direction, q, sigma, h, step_tail), steps) for q, sigma, steps in mechs)

    def _step_pmf(self, direction: Direction, q: float, sigma: float, h: float, tail: float) -> StepPmf:
        return self._step_pmfs.get((direction, q, sigma, h, tail), lambda: step_pmf(direction, q, sigma, h, tail))

    def _loss_moments(self, direction: Direction, q: float, sigma: float) -> tuple[float, float]:
        return self._moments.get((direction, q, sigma), lambda: loss_moments(direction, q, sigma))

    def _better_tilt(self, direction: Direction, mechs: _Mechanisms, delta: float, tail: float) -> float:
        """The tilt for ``delta`` on the coarse grid: the saddle-point tilt (:meth:`_saddle_point_tilt`), made
        lighter where its circle would be wider than the untilted one (:meth:`_lighter_tilt`), if the round-off
        bounds then make up at most _NEGLIGIBLE_ROUND_OFF of delta; else the one :meth:`_searched_tilt` finds.
        It depends on delta only through :func:`_tilt_delta`, so that delta(epsilon) can find it."""
        log2_h, delta = self._first_log2_interval(direction, mechs) + 1, _tilt_delta(delta)
        tilt = self._lighter_tilt(direction, mechs, log2_h, tail, self._saddle_point_tilt(direction, mechs, log2_h, tail, delta))
        bound = self._composed_epsilon(direction, mechs, log2_h, tail, tilt, delta)
        near_centre = self._resolves(direction, mechs, log2_h, tail, tilt, bound)
        composed = self._composed(direction, mechs, log2_h, tail, tilt, near_centre)
        if math.isfinite(bound) and composed.round_off_share(bound) <= _NEGLIGIBLE_ROUND_OFF * delta:
            return tilt
        return self._searched_tilt(direction, mechs, log2_h, delta, tail)

    def _searched_tilt(self, direction: Direction, mechs: _Mechanisms, log2_h: int, delta: float, tail: float) -> float:
        """The tilt with the smallest bound on the coarse grid among no tilt and the tilts centred
        (:meth:`_tilt`) at each bound found, starting from the untilted one (module docstring)."""
        untilted_pmf = self._composed(direction, mechs, log2_h, tail, 0.0)
        untilted = self._composed_epsilon(direction, mechs, log2_h, tail, 0.0, delta)
        if not math.isfinite(untilted) or untilted_pmf.round_off_share(untilted) <= _NEGLIGIBLE_ROUND_OFF * delta:
            return 0.0
        bound_at = lambda tilt: self._composed_epsilon(direction, mechs, log2_h, tail, tilt, delta)  # noqa: E731
        best, best_bound = 0.0, untilted
        # Each tilted bound is nearer the true epsilon than the one it was centred at: re-centre there, unless
        # the tilt would barely move.
        for _ in range(_RECENTRINGS):
            tilt = self._tilt(direction, mechs, log2_h, tail, best_bound)
            if abs(tilt - best) <= _SETTLED_TILT_CHANGE * best or bound_at(tilt) >= best_bound:
                break
            best, best_bound = tilt, bound_at(tilt)
        return best

    def _lighter_tilt(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, tilt: float) -> float:
        """The largest tilt up to ``tilt`` whose FFT circle is at most _LIGHTER_TILT_WIDENING times the
        untilted window's (bisected _LIGHTER_TILT_BISECTIONS times on multiples of 1/64): a large tilt can
        make the tilted loss heavy-tailed (the grid's top cells weigh e^{tilt loss}), and the circle then
        widens to hold that tail."""
        size = lambda t: self._circle(direction, mechs, log2_h, tail, t * _TILT_RESOLUTION).size  # noqa: E731
        low, high = 0, round(tilt / _TILT_RESOLUTION)
        affordable = _LIGHTER_TILT_WIDENING * self._bulk(direction, mechs, log2_h, tail).circle_size
        if size(high) <= affordable:
            return tilt
        for _ in range(_LIGHTER_TILT_BISECTIONS):
            middle = (low + high) // 2
            low, high = (middle, high) if size(middle) <= affordable else (low, middle)
        return low * _TILT_RESOLUTION

    def _saddle_point_tilt(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, delta: float) -> float:
        """The tilt theta at which the saddle-point approximation of delta, with the composed grid loss's
        cumulant generating function K,
            log delta ~ K(theta) - theta K'(theta) - log(sqrt(2 pi K''(theta)) theta (1 + theta))
        (the tilted loss taken as normal about K'(theta)), equals ``delta``: the tilt centred at the epsilon
        that answers ``delta``, found without composing. Newton's method in log theta (the right side
        decreases in theta) from the normal approximation's tilt to within 1%, safeguarded by bisection in
        [1/64, _MAX_TILT]; rounded down to 1/64, 0 if below. A guide only: any tilt gives a sound bound."""
        cumulants, target = self._cumulant_function(direction, mechs, log2_h, tail), math.log(delta)

        def excess(log_theta: float) -> tuple[float, float]:
            """The approximation's log delta minus log ``delta``, and its derivative in log theta."""
            theta = math.exp(log_theta)
            k0, k1, k2 = cumulants(theta)
            value = k0 - theta * k1 - 0.5 * math.log(2 * math.pi * max(k2, 1e-300)) - log_theta - math.log1p(theta)
            return value - target, -theta * theta * k2 - 1.0 - theta / (1.0 + theta)

        low, high = math.log(_TILT_RESOLUTION), math.log(_MAX_TILT)
        if excess(low)[0] <= 0.0:
            return 0.0
        # From the normal approximation's tilt, sqrt(2 log(1/delta) / K''(0)).
        log_theta = min(max(0.5 * math.log(-2 * target / max(cumulants(0.0)[2], 1e-300)), low), high)
        last = math.inf
        for _ in range(64):
            value, slope = excess(log_theta)
            low, high = (log_theta, high) if value > 0 else (low, log_theta)
            proposal = log_theta - value / min(slope, -1e-300)
            # Bisect where Newton leaves the bracket or crawls (a heavy tilted tail makes K steep).
            if not low < proposal < high or abs(value) > last / 2:
                proposal = (low + high) / 2
            last = abs(value)
            if abs(proposal - log_theta) < 1e-2:
                break
            log_theta = proposal
        return math.floor(math.exp(log_theta) / _TILT_RESOLUTION) * _TILT_RESOLUTION

    def _tilt(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float, epsilon: float) -> float:
        """The exponential tilt that centres the composed loss at ``epsilon`` (pld_engine, step 5): the
        saddle point theta of the grid PMFs' cumulant generating function K, K'(theta) = epsilon, found by
        Newton's method (K'' > 0) safeguarded by bisection in [0, _MAX_TILT], and rounded down to 1/64 (nearby
        queries share composed PMFs). Any tilt gives a sound bound; this one keeps the round-off bound small
        where delta(epsilon) is decided."""
        cumulants = self._cumulant_function(direction, mechs, log2_h, tail)
        low, high, theta = 0.0, _MAX_TILT, 0.0
        for _ in range(64):
            _, mean, variance = cumulants(theta)
            low, high = (theta, high) if mean < epsilon else (low, theta)
            proposal = theta + (epsilon - mean) / max(variance, 1e-300)
            if not low < proposal < high:
                proposal = (low + high) / 2
            if abs(proposal - theta) < _TILT_RESOLUTION / 16:
                break
            theta = proposal
        return math.floor(theta / _TILT_RESOLUTION) * _TILT_RESOLUTION

    def _cumulant_function(self, direction: Direction, mechs: _Mechanisms, log2_h: int, tail: float) -> Callable[[float], tuple[float, float, float]]:
        """theta -> K(theta), K'(theta), K''(theta): the cumulant generating function of the composed loss of
        the grid PMFs (the finite part, renormalised) and its first two derivatives, i.e. the log-normaliser,
        mean and variance of the composed loss tilted by theta."""
        h = 2.0**log2_h
        supports = []
        for pmf, steps in self._grid_step_pmfs(direction, mechs, log2_h, tail):
            cells = np.nonzero(pmf.probs > 0)[0]
            supports.append((steps, pmf.offset, cells.astype(float), np.log(pmf.probs[cells])))

        def cumulants(theta: float) -> tuple[float, float, float]:
            k0 = k1 = k2 = 0.0
            for steps, offset, cells, log_probs in supports:
                exponent = log_probs + theta * h * cells
                peak = float(exponent.max())
                weights = np.exp(exponent - peak)
                total = float(np.sum(weights))
                weights /= total
                cell_mean = float(np.sum(weights * cells))
                k0 += steps * (peak + math.log(total) + theta * h * offset)
                k1 += steps * h * (offset + cell_mean)
                k2 += steps * h * h * float(np.sum(weights * np.square(cells - cell_mean)))
            return k0, k1, k2

        return cumulants

    def _first_log2_interval(self, direction: Direction, mechs: _Mechanisms) -> int:
        return self._log2_intervals.get((direction, mechs), lambda: self._initial_log2_interval(direction, mechs))

    def _initial_log2_interval(self, direction: Direction, mechs: _Mechanisms) -> int:
        """The finer of the first two dyadic intervals: at most half the root-mean-square per-step standard
        deviation of the loss (the variance connect-the-dots adds is then about 4%: a cheap start for
        Richardson's estimate, which then jumps to the interval the target needs), but no finer than keeps
        the composed window (mean plus 16 standard deviations, a guide only) within _MAX_GRID_CELLS."""
        total_steps = sum(steps for _, _, steps in mechs)
        moments = [(steps, *self._loss_moments(direction, q, sigma)) for q, sigma, steps in mechs]
        mean = sum(steps * m for steps, m, _ in moments)
        variance = sum(steps * v for steps, _, v in moments)
        per_step_sd = math.sqrt(max(variance / total_steps, 1e-300))
        wanted = math.floor(math.log2(per_step_sd / 2))
        window = abs(mean) + 16 * math.sqrt(variance)
        affordable = math.ceil(math.log2(max(window, 1e-300) / _MAX_GRID_CELLS))
        return min(max(wanted, affordable, _FINEST_LOG2_INTERVAL + 4), -2)


def certified_epsilon(event: DpEvent, delta: float) -> float:
    """The certified bound on epsilon(delta) of ``event``, computed cold by a new
    :class:`CertifiedAccountant` (callers that ask about many events keep one instead)."""
    return CertifiedAccountant().epsilon_of(event, delta)


def certified_delta(event: DpEvent, epsilon: float) -> float:
    """The certified bound on delta(epsilon) of ``event``, computed cold by a new :class:`CertifiedAccountant`."""
    return CertifiedAccountant().delta_of(event, epsilon)


def _richardson_slope(estimates: dict[int, float]) -> float | None:
    """c of error(h) = c h^2 from the two finest bounds (keyed by log2 h), if there are two."""
    if len(estimates) < 2:
        return None
    fine, coarser = sorted(estimates)[:2]
    return (estimates[coarser] - estimates[fine]) / (4.0**coarser - 4.0**fine)


def _tilt_delta(delta: float) -> float:
    """The power of two at or below ``delta`` (at most 1/2): the delta the tilt is chosen for."""
    return 2.0 ** math.floor(math.log2(min(delta, 0.5)))


def _error_target(c: float, epsilon: float) -> float:
    """The error aimed at: what dp_accounting's default interval would leave (c * 1e-4^2, so that the
    bound is at least as accurate as it), capped at TARGET_RELATIVE_ERROR and floored at
    _ERROR_FLOOR of epsilon (finer than that buys nothing)."""
    return max(_ERROR_FLOOR * epsilon, min(TARGET_RELATIVE_ERROR * epsilon, c * _BASELINE_INTERVAL**2))


def _directions(relation: Neighbouring) -> tuple[Direction, ...]:
    if relation is Neighbouring.ADD_REMOVE:
        return (Direction.REMOVE, Direction.ADD)
    return (Direction.REPLACE,)


def _mechanisms_of(event: DpEvent) -> tuple[Neighbouring, _Mechanisms]:
    relation = neighbouring_of(event)
    mechs = tuple(sorted((q, sigma, steps) for (q, sigma, _), steps in mechanisms(event).items()))
    return relation, mechs


def _all_full_batch(mechs: _Mechanisms) -> bool:
    """Whether every step samples with q = 1: the composition is then one Gaussian mechanism, answered by
    its closed form (:mod:`ewtune.accountant.gaussian_closed_form`)."""
    return all(q == 1.0 for q, _, _ in mechs)


def _noise_too_small_for_the_grid(mechs: _Mechanisms) -> bool:
    """Whether some step's noise multiplier is below _SMALLEST_GRID_SIGMA, where the loss spans more than the
    grids are built for (one step's epsilon is then in the tens or more): the q = 1 closed form, an upper bound
    for every q (module docstring), answers instead."""
    return any(sigma < _SMALLEST_GRID_SIGMA for _, sigma, _ in mechs)


def _gaussian_mechanisms(mechs: _Mechanisms) -> tuple[tuple[float, int], ...]:
    return tuple((sigma, steps) for _, sigma, steps in mechs)


def _sensitivity(relation: Neighbouring) -> int:
    """The sensitivity of the clipped sum in units of C: 2 for replace-one (one gradient swapped for another)."""
    return 2 if relation is Neighbouring.REPLACE_ONE else 1
