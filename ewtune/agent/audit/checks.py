"""Checks beside the one-run bound, for what it cannot see (Steinke et al. detect a broken mechanism, not an
accounting error within a factor of a few, nor a sensitivity bug that only natural data trigger):

- :func:`sensitivity`: the engine's clipped sum over a batch with and without each example, in turn; the
  difference is that example's whole contribution to the release, whose norm DP-SGD's guarantee needs to be at
  most C (a leave-one-out test, so batch-level clipping or a clip that misses a layer shows too).
- :func:`executed_accounting`: epsilon recomputed from the steps the engine executed (counted by the step
  callback, not by the plan) at the rate its sampler executes, and whether the batches it drew fit that rate.
- :func:`noise_scale`: the noise on the coordinates of the canaries left out must be N(0, L sigma^2) per release;
  a chi-square test of their variance, false-alarm rate NOISE_P_LIMIT on a correct engine (exact: those
  coordinates carry nothing but the engine's Gaussian noise, plus the real records' gradient on them where the
  canaries sit in a real layer: under 0.05 C per step with the noise off, against sigma C, in
  ``tests/test_audit_sharper.py``).
- :func:`dpsgd_hypothesis`: the f-DP one-run test (Mahloujifar et al. 2025) of the claim itself, "the run is at
  least as private as DP-SGD(q, T, sigma)", from the canaries' scores and bits: false-alarm rate at most
  1 - confidence on a correct engine; it catches halved noise where the canaries are enough (RELIABILITY.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.fdp_one_run import claimed_curve_refuted

SENSITIVITY_TOLERANCE = 1e-4  # relative: float32 sums of a few dozen gradients
RATE_Z_LIMIT = 5.0  # a realised batch total this many binomial standard deviations off the rate fails
NOISE_P_LIMIT = 1e-6  # a chi-square p-value below this fails


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    figures: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, **self.figures}


def sensitivity(clipper, batch: dict[str, torch.Tensor], clip_norm: float) -> Check:
    """max over the examples i of ||S(batch) - S(batch without i)|| / C, S the engine's clipped sum."""
    size = len(next(iter(batch.values())))
    whole = _flat(clipper.clipped_grad_sum(batch).grads)
    largest = 0.0
    for i in range(size):
        keep = torch.tensor([j for j in range(size) if j != i], dtype=torch.int64)
        without = _flat(clipper.clipped_grad_sum({key: value[keep] for key, value in batch.items()}).grads)
        largest = max(largest, float(torch.linalg.vector_norm(whole - without)) / clip_norm)
    return Check("sensitivity", largest <= 1.0 + SENSITIVITY_TOLERANCE, {"examples": size, "largest_contribution_over_clip_norm": largest})


def executed_accounting(rate: float, noise_multiplier: float, steps_executed: int, sampled: int, population: int,
                        delta: float, epsilon_claimed: float) -> Check:
    """The certified epsilon of the executed event against the claimed one, and the realised batches' total
    against Binomial(steps * population, rate) (a z-score)."""
    trials = steps_executed * population
    z = (sampled - trials * rate) / math.sqrt(trials * rate * (1.0 - rate)) if 0.0 < rate < 1.0 and trials else 0.0
    executed = certified_epsilon(PoissonGaussianEvent(rate, noise_multiplier, steps_executed), delta) if steps_executed else 0.0
    ok = abs(z) <= RATE_Z_LIMIT and executed <= epsilon_claimed * (1.0 + 1e-9)
    return Check("executed_accounting", ok, {
        "steps_executed": steps_executed,
        "realised_rate": sampled / trials if trials else 0.0,
        "rate_z": z,
        "epsilon_certified_executed": executed,
        "epsilon_certified_claimed": epsilon_claimed,
    })


def noise_scale(observations: np.ndarray, included: np.ndarray, noise_multiplier: float, local_steps: int) -> Check:
    """Observations [releases, canaries] of the left-out canaries against N(0, L sigma^2): the ratio of the
    measured standard deviation to the claimed one, and the two-sided chi-square p-value of their variance."""
    left_out = np.asarray(observations, dtype=float)[:, ~np.asarray(included, dtype=bool)].ravel()
    claimed = noise_multiplier * math.sqrt(local_steps)
    statistic = float(np.sum(left_out**2)) / claimed**2
    dof = left_out.size
    p = 2.0 * min(chi2.cdf(statistic, dof), chi2.sf(statistic, dof))
    return Check("noise_scale", bool(p >= NOISE_P_LIMIT), {
        "std_over_claimed": math.sqrt(statistic / dof) if dof else math.nan,
        "p_value": float(p),
        "coordinates": dof,
    })


def dpsgd_hypothesis(scores: np.ndarray, included: np.ndarray, tie_break: np.ndarray, rate: float, steps: int,
                     noise_multiplier: float, confidence: float) -> Check:
    """Whether the canaries refute DP-SGD(q, T, sigma) with the claimed sigma (:func:`claimed_curve_refuted`)."""
    refuted = claimed_curve_refuted(scores, included, tie_break, rate, steps, noise_multiplier, confidence)
    return Check("dpsgd_hypothesis", not refuted, {"claimed_curve_refuted": refuted, "canaries": len(scores),
                                                   "false_alarm_rate_at_most": 1.0 - confidence})


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grad.double().reshape(-1) for grad in grads.values()])
