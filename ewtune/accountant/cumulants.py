"""Cumulants of the privacy-loss log-likelihood ratio (PLLR) of one Poisson-subsampled Gaussian step.

The Edgeworth accountant (Wang, Gao, Zhang, Shen, Su, arXiv 2206.04236, Sec. 3-4) needs, for each
distinct mechanism, the first cumulants of the PLLR l = log dP/dQ under both members of the dominating
pair: the *null* side X = l(Z), Z ~ Q, and the *alternative* side Y = l(Z'), Z' ~ P. With mu = 1/sigma:

- remove (add/remove-one): P = (1-q) N(0,1) + q N(mu,1), Q = N(0,1) (arXiv 2206.04236, Sec. 5.1;
  dp_accounting ``GaussianPrivacyLoss``, REMOVE adjacency);
- add: the reversed pair (Q, P). Its PLLR is -l, so its null side is -Y and its alternative side is -X:
  kappa_j changes sign for odd j and the sides swap. No new integral is needed;
- replace_one: P = (1-q) N(0,1) + q N(mu,1), Q = (1-q) N(0,1) + q N(-mu,1), the pair dp_accounting uses
  for Poisson subsampling under substitution (``privacy_loss_mechanism.AdditiveNoisePrivacyLoss``,
  REPLACE adjacency; Zhu, Dong, Wang, AISTATS 2022, Sec. 5). Reflecting z -> -z swaps P and Q, so this
  pair is its own reverse and one direction suffices.

The integrals are computed by the composite trapezoid rule on a wide uniform grid: the integrands are
analytic in a strip of half-width pi/mu around the real axis and decay like a Gaussian, so the rule
converges geometrically in 1/h (Trefethen & Weideman, SIAM Review 2014, Thm 5.1); the step is chosen
so that the discretisation error is far below double precision. Under composition cumulants add,
K_j = sum_i n_i kappa_j(q_i, sigma_i), so accounting cost does not grow with the number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring

MAX_ORDER = 5  # kappa_1..kappa_5: enough for the order-3 expansion (kappa_5 enters at order 3)
_TAIL = 40.0  # integrate z over [-mu - 40, mu + 40]: the Gaussian weight beyond is below 1e-340
_STEP = 0.01  # grid step for mu <= 10; smaller for larger mu (see _grid)


@dataclass(frozen=True)
class SideCumulants:
    """Cumulants kappa_1..kappa_5 of one side (X or Y) of a PLLR, plus the moments of the centred step
    W - kappa_1 that the finite-sample Edgeworth error bound needs (arXiv 2101.05780, Thm 2.1 / A.2):
    E|W - kappa_1|^3, E(W - kappa_1)^4 and E|W - kappa_1| * Var W. For a composition every field holds the
    sum over steps (cumulants add; the bound for independent, non-identical steps uses these sums)."""

    kappa: tuple[float, float, float, float, float]
    abs_moment_3: float
    moment_4: float
    abs_moment_1_times_variance: float

    def negated(self) -> "SideCumulants":
        """Cumulants of -W: odd cumulants change sign, absolute and even moments do not."""
        signs = (-1.0, 1.0, -1.0, 1.0, -1.0)
        return SideCumulants(
            tuple(s * k for s, k in zip(signs, self.kappa)),
            self.abs_moment_3,
            self.moment_4,
            self.abs_moment_1_times_variance,
        )

    def scaled(self, count: int) -> "SideCumulants":
        """The sum of ``count`` independent copies."""
        return SideCumulants(
            tuple(count * k for k in self.kappa),
            count * self.abs_moment_3,
            count * self.moment_4,
            count * self.abs_moment_1_times_variance,
        )

    def __add__(self, other: "SideCumulants") -> "SideCumulants":
        return SideCumulants(
            tuple(a + b for a, b in zip(self.kappa, other.kappa)),
            self.abs_moment_3 + other.abs_moment_3,
            self.moment_4 + other.moment_4,
            self.abs_moment_1_times_variance + other.abs_moment_1_times_variance,
        )


@dataclass(frozen=True)
class PairCumulants:
    """Both sides of the PLLR of one ordered pair (P, Q): ``null`` is X = l(Z), Z ~ Q; ``alternative`` is
    Y = l(Z'), Z' ~ P."""

    null: SideCumulants
    alternative: SideCumulants

    def reversed(self) -> "PairCumulants":
        """The pair (Q, P): its PLLR is -l, so null' = -Y and alternative' = -X."""
        return PairCumulants(self.alternative.negated(), self.null.negated())

    def scaled(self, count: int) -> "PairCumulants":
        return PairCumulants(self.null.scaled(count), self.alternative.scaled(count))

    def __add__(self, other: "PairCumulants") -> "PairCumulants":
        return PairCumulants(self.null + other.null, self.alternative + other.alternative)


def directions(relation: Neighbouring) -> tuple[str, ...]:
    """The directions whose maximum is the guarantee under ``relation``."""
    return ("remove", "add") if Neighbouring(relation) is Neighbouring.ADD_REMOVE else ("replace",)


def step_cumulants(
    sampling_rate: float,
    noise_multiplier: float,
    direction: str,
    integrate: Callable[[float, float, str], PairCumulants] | None = None,
) -> PairCumulants:
    """PLLR cumulants of one step in ``direction`` ("remove", "add" or "replace"). ``integrate`` (q, sigma,
    pair) -> cumulants is :func:`pair_cumulants` unless an accountant passes its own cached one."""
    integrate = integrate or pair_cumulants
    if direction == "remove":
        return integrate(float(sampling_rate), float(noise_multiplier), "remove")
    if direction == "add":
        return integrate(float(sampling_rate), float(noise_multiplier), "remove").reversed()
    if direction == "replace":
        return integrate(float(sampling_rate), float(noise_multiplier), "replace")
    raise InvalidInputError(f"unknown PLLR direction {direction!r}")


def _grid(mu: float) -> np.ndarray:
    # Trapezoid error ~ exp(-2 pi d / h) with d = pi / mu the half-width of analyticity: mu * h <= 0.1
    # makes it exp(-197), negligible.
    step = min(_STEP, 0.1 / mu)
    return np.arange(-mu - _TAIL, mu + _TAIL + step, step)


def _log_ratio_terms(z: np.ndarray, sampling_rate: float, mu: float) -> np.ndarray:
    """log((1-q) + q exp(mu z - mu^2/2)) = log[((1-q) phi(z) + q phi(z - mu)) / phi(z)], stably: as a
    log-sum-exp it neither overflows for large mu z nor loses the q = 1 case (log(1 - q) = -inf)."""
    with np.errstate(divide="ignore"):
        log_keep = np.log1p(-sampling_rate)
    return np.logaddexp(log_keep, np.log(sampling_rate) + mu * z - 0.5 * mu * mu)


def pair_cumulants(sampling_rate: float, noise_multiplier: float, pair: str) -> PairCumulants:
    """Both sides' cumulants of the "remove" or "replace" pair, by the trapezoid rule (module docstring)."""
    mu = 1.0 / noise_multiplier
    z = _grid(mu)
    step = z[1] - z[0]
    log_mix_plus = _log_ratio_terms(z, sampling_rate, mu)  # log of the mixture with N(mu,1), over phi
    log_phi = -0.5 * z * z - 0.5 * np.log(2.0 * np.pi)
    if pair == "remove":
        pllr = log_mix_plus
        density_null = np.exp(log_phi)
    else:  # replace: Q = (1-q) N(0,1) + q N(-mu,1)
        log_mix_minus = _log_ratio_terms(-z, sampling_rate, mu)
        pllr = log_mix_plus - log_mix_minus
        density_null = np.exp(log_phi + log_mix_minus)
    density_alternative = np.exp(log_phi + log_mix_plus)  # (1-q) phi(z) + q phi(z - mu)
    return PairCumulants(
        _side(pllr, density_null * step), _side(pllr, density_alternative * step)
    )


def _side(values: np.ndarray, weights: np.ndarray) -> SideCumulants:
    """Cumulants from central moments m_k: kappa_2 = m_2, kappa_3 = m_3, kappa_4 = m_4 - 3 m_2^2,
    kappa_5 = m_5 - 10 m_3 m_2. The weights are the trapezoid weights (the grid ends carry ~0 mass)."""
    total = weights.sum()
    mean = float(np.dot(weights, values) / total)
    centred = values - mean
    powers = [centred]
    for _ in range(MAX_ORDER - 1):
        powers.append(powers[-1] * centred)
    m = [float(np.dot(weights, p) / total) for p in powers]  # m[0] = m_1 (~0), ..., m[4] = m_5
    m2, m3, m4, m5 = m[1], m[2], m[3], m[4]
    return SideCumulants(
        kappa=(mean, m2, m3, m4 - 3.0 * m2 * m2, m5 - 10.0 * m3 * m2),
        abs_moment_3=float(np.dot(weights, np.abs(powers[2])) / total),
        moment_4=m4,
        abs_moment_1_times_variance=float(np.dot(weights, np.abs(centred)) / total) * m2,
    )
