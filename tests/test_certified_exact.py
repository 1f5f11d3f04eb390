"""Soundness and tightness of the certified accountant beyond one step, against an exact value computed
independently: two steps of the Poisson-subsampled Gaussian, by direct numerical integration of the privacy
loss over the pair of outputs (numpy only, not our PLD engine).

For add/remove-one neighbours the tight epsilon at delta is the larger of the two directions: with base
measure P (remove: the mixture (1-q) N(0, s^2) + q N(1, s^2)) or Q (add: N(0, s^2)) and per-step loss
l(x) = +/- log((1 - q) + q exp((2x - 1) / (2 s^2))), two steps give
delta(eps) = sum_i sum_j w_i w_j (1 - exp(eps - l_i - l_j))_+ over a fine grid of x with weights w (Dwork &
Roth 2014, the hockey-stick divergence; Koskela et al. 2020 for the subsampled Gaussian's losses). Halving
the grid spacing moves the exact epsilon by about 1e-6 relative; the certified bound must not fall below it
and must stay within 0.1% of it.
"""

from __future__ import annotations

import numpy as np
import pytest

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.events import PoissonGaussianEvent

GRID = 3000


def _one_step(q: float, sigma: float, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(weights, losses) of one step's output on a grid covering the Gaussians' mass to 14 sigma."""
    x = np.linspace(-14 * sigma, 1 + 14 * sigma, GRID)
    dx = x[1] - x[0]
    normal = lambda mean: np.exp(-((x - mean) ** 2) / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi))  # noqa: E731
    log_ratio = np.log((1 - q) + q * np.exp((2 * x - 1) / (2 * sigma**2)))
    if direction == "remove":
        return ((1 - q) * normal(0.0) + q * normal(1.0)) * dx, log_ratio
    return normal(0.0) * dx, -log_ratio


def _two_step_delta(weights: np.ndarray, losses: np.ndarray, epsilon: float) -> float:
    total = 0.0
    for start in range(0, len(losses), 500):
        pair_losses = losses[start : start + 500, None] + losses[None, :]
        pair_weights = weights[start : start + 500, None] * weights[None, :]
        total += float(np.sum(pair_weights * np.clip(1 - np.exp(epsilon - pair_losses), 0.0, None)))
    return total


def _exact_two_step_epsilon(q: float, sigma: float, delta: float) -> float:
    epsilons = []
    for direction in ("remove", "add"):
        weights, losses = _one_step(q, sigma, direction)
        low, high = 0.0, 50.0
        for _ in range(45):
            middle = (low + high) / 2
            low, high = (middle, high) if _two_step_delta(weights, losses, middle) > delta else (low, middle)
        epsilons.append(high)
    return max(epsilons)


@pytest.mark.parametrize("q, sigma", [(0.2, 1.0), (0.05, 0.6)])
def test_two_steps_of_the_subsampled_gaussian_are_certified_soundly_and_tightly(q, sigma):
    exact = _exact_two_step_epsilon(q, sigma, 1e-5)
    certified = certified_epsilon(PoissonGaussianEvent(q, sigma, 2), 1e-5)
    assert exact <= certified <= exact * (1 + 1e-3)
