"""Explicit uniform bound on the error of the first-order Edgeworth expansion of a standardised sum.

Derumigny, Girard, Guyonvarch, "Explicit non-asymptotic bounds for the distance to the first-order
Edgeworth expansion", arXiv 2101.05780: Theorem 2.1 in the setting of Theorem A.2 (independent, not
necessarily identically distributed, centred variables; no continuity assumption; skewed case), i.e.
Eqs. (11) and (15) and the integrated remainder of Sec. C.3.1, with the numerical constants of the
paper (chi_1 = 0.09916191, |Psi(t)| <= 1.0253 / (2 pi |t|)). For X_1..X_n with
B^2 = (1/n) sum E X_i^2, K_3 = (1/n) sum E|X_i|^3 / B^3, lambda_3 = (1/n) sum E X_i^3 / B^3,
K_4 = (1/n) sum E X_i^4 / B^4 and K~_3 = K_3 + (1/n) sum E|X_i| Var(X_i) / B^3, it gives delta_n with

    sup_x | P(S_n <= x) - Phi(x) - lambda_3 / (6 sqrt n) (1 - x^2) phi(x) | <= delta_n,

for every free parameter eps in (0, 1/3); :func:`uniform_error` takes the best of a small grid of eps.
The Edgeworth accountant paper (arXiv 2206.04236, Sec. 4.2) adds this bound to both PLLR tails.
"""

from __future__ import annotations

import math

from scipy import special

_CHI_1 = 0.09916191
_PSI = 1.0253  # |Psi(t)| <= _PSI / (2 pi |t|)
_EPS_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def uniform_error(n: float, k3: float, k3_tilde: float, k4: float, lambda3: float) -> float:
    """The smallest bound delta_n over a grid of the free parameter eps; ``math.inf`` when the theorem's
    remainder is not defined (Delta <= 0, i.e. n < ~2.75 K_4: far too few steps for any use)."""
    if _delta_constant(k4, n) <= 0.0:
        return math.inf
    return min(_bound(eps, n, k3, k3_tilde, k4, lambda3) for eps in _EPS_GRID)


def _bound(eps: float, n: float, k3: float, k3_tilde: float, k4: float, lambda3: float) -> float:
    main = 0.1995 * k3_tilde / math.sqrt(n) + (
        0.031 * k3_tilde**2 + 0.327 * k4 * (1.0 / 12.0 + 1.0 / (4.0 * (1.0 - 3.0 * eps) ** 2))
    ) / n
    skewness = (0.054 * abs(lambda3) * k3_tilde + 0.037 * _e1(eps) * lambda3**2) / n
    return main + skewness + _remainder(eps, n, k3, k3_tilde, k4, lambda3)


def _remainder(eps: float, n: float, k3: float, k3_tilde: float, k4: float, lambda3: float) -> float:
    """r_{1,n}^{inid,skew}(eps), Eq. (15)."""
    cut = 2.0 * math.sqrt(n) / k3_tilde
    low = min(math.sqrt(2.0 * eps) * (n / k4) ** 0.25, cut)
    return (
        (14.1961 + 67.0415) * k3_tilde**4 / (16.0 * math.pi**4 * n**2)
        + 4.3394 * abs(lambda3) * k3_tilde**3 / (8.0 * math.pi**3 * n**2)
        + _integrated_remainder(eps, n, k4, lambda3)
        + abs(lambda3) * (_upper_gamma(1.5, low) - _upper_gamma(1.5, cut)) / math.sqrt(n)
        + _PSI * k3 * _delta_term(eps, 3, n, k4, k3_tilde) / (6.0 * math.pi * math.sqrt(n))
    )


def _integrated_remainder(eps: float, n: float, k4: float, lambda3: float) -> float:
    """bar R_n^{inid}(eps), Sec. C.3.1 (skewed case): terms A_1n .. A_7n."""
    r = k4 / n
    denom = (1.0 - 3.0 * eps) ** 2 * math.pi
    inner = 1.0 / 24.0 + _p1(eps) / (2.0 * (1.0 - 3.0 * eps) ** 2)
    g = math.gamma
    return (
        _PSI / (48.0 * denom) * r**1.5 * 2**3 * g(5)
        + _PSI / (24.0**2 * 2.0 * denom) * r**2 * 2**4 * g(6)
        + _PSI / (12.0 * denom) * r**1.25 * 2**2.5 * g(4.5)
        + _PSI / (72.0 * denom) * r**1.5 * 2**3 * g(5)
        + _PSI / (144.0 * denom) * r**1.75 * 2**3.5 * g(5.5)
        + _PSI * _e1(eps) / (2.0 * math.pi) * r**2 * inner**2 * 2**4 * g(6)
        + _PSI * _e1(eps) / (6.0 * math.pi) * abs(lambda3) * k4 / n**1.5 * inner * 2**4 * g(6)
    )


def _delta_constant(k4: float, n: float) -> float:
    return (1.0 - 4.0 * _CHI_1 - math.sqrt(k4 / n)) / 2.0


def _delta_term(eps: float, p: int, n: float, k4: float, k3_tilde: float) -> float:
    """The curly-brace term of Eq. (15) (Delta > 0 is checked by the caller)."""
    delta = _delta_constant(k4, n)
    upper = 2.0 * delta * min(eps * math.sqrt(n / k4), 2.0 * n / k3_tilde**2)
    lower = 4.0 * delta * n / k3_tilde**2
    return 0.5 * delta ** (-p / 2.0) * abs(_lower_gamma(p / 2.0, lower) - _lower_gamma(p / 2.0, upper))


def _p1(eps: float) -> float:
    """P_{1,n}(eps), Sec. C.1 (skewed case)."""
    return (144.0 + 48.0 * eps + 4.0 * eps**2 + 96.0 * math.sqrt(2.0 * eps) + 32.0 * eps
            + 16.0 * math.sqrt(2.0) * eps**1.5) / 576.0


def _e1(eps: float) -> float:
    """e_{1,n}(eps), Sec. C.1 (skewed case)."""
    return math.exp(eps**2 * (1.0 / 6.0 + 2.0 * _p1(eps) / (1.0 - 3.0 * eps) ** 2))


def _upper_gamma(a: float, x: float) -> float:
    return math.gamma(a) * float(special.gammaincc(a, x))


def _lower_gamma(a: float, x: float) -> float:
    return math.gamma(a) * float(special.gammainc(a, x))
