"""Scores of Dirac gradient canaries (Nasr et al. 2023, "Tight auditing of differentially private machine
learning", USENIX Security): a canary owns one coordinate of an audit parameter block, and whenever it is
sampled its clipped gradient adds exactly C to that coordinate. What a released update shows on the coordinate,
divided by C, is then, per step, x = B + sigma * z with B ~ Bernoulli(q) if the canary is included (B = 0 if
not) and z ~ N(0, 1).

The score is the log-likelihood ratio of "included" against "not included" under the *claimed* q and sigma,
never the inclusion bits. For an observer who sees the sum y of L such steps per release (a holder's round of
L local steps; L = 1 for every step), with K ~ Binomial(L, q) the number of times the canary was sampled and
y ~ N(K, L sigma^2):

    s = sum over releases of log sum_{k=0..L} Binom(k; L, q) exp((2 k y - k^2) / (2 L sigma^2)),

the Neyman-Pearson optimal statistic per release (L = 1: log(1 - q + q exp((x - 1/2) / sigma^2))).
"""

from __future__ import annotations

import numpy as np

from ewtune.accountant.errors import InvalidInputError


def likelihood_ratio_scores(observations: np.ndarray, sampling_rate: float, noise_multiplier: float, local_steps: int) -> np.ndarray:
    """One score per canary from ``observations`` [releases, canaries]: each release's change of the canary's
    coordinate divided by C, summed over the release's ``local_steps`` steps (module docstring)."""
    observations = np.asarray(observations, dtype=float)
    if observations.ndim != 2:
        raise InvalidInputError("canary observations are a [releases, canaries] array")
    if not 0.0 < sampling_rate <= 1.0 or not noise_multiplier > 0 or local_steps < 1:
        raise InvalidInputError("scores need 0 < q <= 1, sigma > 0 and at least one step per release")
    # scipy.stats: +0.65 s on the ServerApp's start (server_app imports canary_audit -> this module)
    from scipy.special import logsumexp
    from scipy.stats import binom

    k = np.arange(local_steps + 1, dtype=float)
    log_weights = binom.logpmf(k, local_steps, sampling_rate)
    variance = local_steps * noise_multiplier**2
    exponents = (2.0 * k * observations[..., None] - k**2) / (2.0 * variance)  # [releases, canaries, k]
    return logsumexp(exponents + log_weights, axis=-1).sum(axis=0)

