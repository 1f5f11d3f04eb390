"""The exact privacy curve of composed Gaussian mechanisms (sampling rate q = 1), evaluated in the safe direction.

With q = 1 every record is in every batch, so a step is the Gaussian mechanism with sensitivity 1 (add/remove-one)
or 2 (replace-one: one record's clipped gradient is swapped for another, which moves the sum by up to 2C) and
noise standard deviation sigma C. Its dominating pair is N(s/sigma, 1) against N(0, 1), s the sensitivity; the
composition of steps with noise multipliers sigma_i is the pair N(mu, 1) against N(0, 1) with
mu = s sqrt(sum_i T_i / sigma_i^2) (Dong, Roth, Su 2022, "Gaussian differential privacy", Cor. 3.3: composed
GDP parameters add in squares). Its exact curve is

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)

(Balle & Wang 2018, "Improving the Gaussian mechanism", Thm. 8; Dong, Roth, Su 2022, Cor. 2.13), decreasing in
eps. The two directions of add/remove-one are symmetric here (the pair and its reverse have the same curve).

*Soundness.* Every number returned is checked in 50-digit arithmetic (mpmath, whose normal CDF is accurate to
the working precision) from the exact binary values of the inputs, mu included: :func:`gaussian_epsilon`
returns a double eps at which the 50-digit delta(eps) is at most delta (1 - 1e-30), so it is at or above the
exact epsilon(delta) because delta(eps) decreases; :func:`gaussian_delta` returns the 50-digit value rounded up
to the next double. The double-precision root finder only proposes the candidate: if the check fails, the
candidate is raised by growing steps until it passes, and the checked epsilon is raised by a further 1e-12
relative (delta decreases in eps, so it stays sound), so that no double-precision evaluation of the closed form
(accurate to about 1e-14) lies above it. The result is within about 2e-12 relative of the exact value.
"""

from __future__ import annotations

import math

import mpmath
from scipy import optimize, special

from ewtune.accountant.errors import InvalidInputError

_DIGITS = 50
_CHECK_MARGIN = 1e-30  # the 50-digit delta must lie this far (relative) below the target
_SAFE_MARGIN = 1e-12  # added (relative) to the checked epsilon: double-precision evaluations of the closed form
# (accurate to about 1e-14) then never exceed it
_LARGEST_MU = 1e150  # epsilon is about mu^2 / 2: beyond this it leaves the double range


def _context() -> mpmath.ctx_mp.MPContext:
    """A private context, so that no other user of mpmath's global precision can change ours mid-way."""
    context = mpmath.MPContext()
    context.dps = _DIGITS
    return context


def gaussian_mu(mechanisms: tuple[tuple[float, int], ...], sensitivity: int, context=None):
    """mu = sensitivity * sqrt(sum T_i / sigma_i^2) of (sigma_i, T_i) pairs, in 50-digit arithmetic."""
    context = context or _context()
    return sensitivity * context.sqrt(context.fsum(context.mpf(steps) / context.mpf(sigma) ** 2 for sigma, steps in mechanisms))


def _exact_delta(context, mu, epsilon):
    """Balle & Wang 2018, Thm. 8, in the context's precision."""
    epsilon = context.mpf(epsilon)
    return context.ncdf(-epsilon / mu + mu / 2) - context.exp(epsilon) * context.ncdf(-epsilon / mu - mu / 2)


def _log_delta_double(epsilon: float, mu: float) -> float:
    """log delta(eps) in double precision, from log-space normal tails (no overflow of e^eps): a proposal only."""
    first = special.log_ndtr(-epsilon / mu + mu / 2)
    second = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    gap = second - first
    return first + math.log(-math.expm1(gap)) if gap < 0 else -math.inf


def _proposal(delta: float, mu: float) -> float:
    """A double near the exact epsilon(delta): Brent's method on log delta(eps) - log delta."""
    target = math.log(delta)
    if _log_delta_double(0.0, mu) <= target:
        return 0.0
    high = mu * mu / 2 + mu * (math.sqrt(2 * -target) + 2) + 1.0
    while _log_delta_double(high, mu) > target:
        high *= 2
    return optimize.brentq(lambda e: _log_delta_double(e, mu) - target, 0.0, high, xtol=1e-300, rtol=1e-14)


def gaussian_epsilon(mechanisms: tuple[tuple[float, int], ...], sensitivity: int, delta: float) -> float:
    """An upper bound on epsilon(delta) of the composed Gaussian mechanisms, within about 1e-12 relative of the
    exact value (module docstring). ``mechanisms`` holds (sigma, steps) pairs."""
    context = _context()
    mu = gaussian_mu(mechanisms, sensitivity, context)
    if mu > _LARGEST_MU:
        raise InvalidInputError(
            f"noise multiplier {min(sigma for sigma, _ in mechanisms):g} is too small to account: epsilon would exceed 1e300"
        )
    limit = context.mpf(delta) * (1 - _CHECK_MARGIN)
    epsilon = _proposal(delta, float(mu))
    step = max(epsilon * 2.0**-40, 1e-15)
    while _exact_delta(context, mu, epsilon) > limit:
        epsilon, step = epsilon + step, 2 * step
    return epsilon * (1 + _SAFE_MARGIN)


def gaussian_delta(mechanisms: tuple[tuple[float, int], ...], sensitivity: int, epsilon: float) -> float:
    """delta(eps) of the composed Gaussian mechanisms, rounded up to a double (module docstring)."""
    context = _context()
    exact = _exact_delta(context, gaussian_mu(mechanisms, sensitivity, context), epsilon)
    rounded = float(exact)
    if context.mpf(rounded) < exact:
        rounded = math.nextafter(rounded, math.inf)
    return min(max(rounded, 0.0), 1.0)
