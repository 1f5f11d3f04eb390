"""Calibration of a recipe in phases, each with its own noise multiplier, under one budget.

Linear probing then fine-tuning (LP-FT; Kumar et al. 2022) trains the head alone first, then the adapters or
the whole model. Under DP the two phases are two mechanisms with different sampling rates, steps and noise,
composed into one heterogeneous event. The recipe gives each phase but the last a share of the budget: phase
i's sigma is the smallest for which the composition of phases 1..i has certified epsilon at most
(share_1 + ... + share_i) * epsilon; the last phase's sigma is the smallest for which the whole composition
has certified epsilon at most epsilon. Every step of this is a certified epsilon of the composed event
(:func:`ewtune.accountant.certified.certified_epsilon`), so the total is the guarantee, not a sum of per-phase
epsilons (summing would overstate it).

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ewtune.accountant.calibration import MIN_SIGMA, MAX_SIGMA, SIGMA_TOLERANCE
from ewtune.accountant.certified import CertifiedAccountant
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import DpEvent, PoissonGaussianEvent, compose


@dataclass(frozen=True)
class Phase:
    """One phase of a recipe: ``steps`` at ``sampling_rate``; ``budget_share`` of the epsilon budget for every
    phase but the last (which takes what is left)."""

    name: str
    sampling_rate: float
    steps: int
    budget_share: float | None = None


@dataclass(frozen=True)
class CalibratedPhase:
    phase: Phase
    event: PoissonGaussianEvent
    epsilon_certified_so_far: float  # the composition of this phase and every one before it


def calibrate_phases(epsilon: float, delta: float, phases: Sequence[Phase]) -> list[CalibratedPhase]:
    """Each phase's event, its sigma calibrated as the module docstring says."""
    _check(epsilon, delta, phases)
    accountant = CertifiedAccountant()  # the earlier phases' step PMFs are reused by every later search
    calibrated: list[CalibratedPhase] = []
    spent_share = 0.0
    for index, phase in enumerate(phases):
        last = index == len(phases) - 1
        spent_share = 1.0 if last else spent_share + phase.budget_share
        target = min(epsilon, spent_share * epsilon)
        prefix = [done.event for done in calibrated]
        sigma, reached = _smallest_sigma(accountant, target, delta, prefix, phase)
        event = PoissonGaussianEvent(phase.sampling_rate, sigma, phase.steps)
        calibrated.append(CalibratedPhase(phase, event, reached))
    return calibrated


def composed(calibrated: Sequence[CalibratedPhase]) -> DpEvent:
    """The recipe's whole event: every phase, composed."""
    events = [done.event for done in calibrated]
    return events[0] if len(events) == 1 else compose(*events)


def smallest_sigma_after(spent: Sequence[DpEvent], phase: Phase, target: float, delta: float,
                         tolerance: float = SIGMA_TOLERANCE) -> tuple[float, float]:
    """(sigma, certified epsilon): the smallest sigma (within ``tolerance``, relative, on the passing side) for
    which ``phase`` run after the ``spent`` events keeps the composition's certified epsilon at ``delta`` within
    ``target``, e.g. a plan within a holder's budget after what its ledger already holds."""
    _check(target, delta, [phase])
    return _smallest_sigma(CertifiedAccountant(), target, delta, list(spent), phase, tolerance)


def _smallest_sigma(
    accountant: CertifiedAccountant, target: float, delta: float, prefix: list[DpEvent], phase: Phase,
    tolerance: float = SIGMA_TOLERANCE,
) -> tuple[float, float]:
    """(sigma, certified epsilon): bisection in log sigma between a failing and a passing sigma until they lie
    within ``tolerance``; the passing one is returned, so the target always holds."""

    def epsilon_at(sigma: float) -> float:
        event = PoissonGaussianEvent(phase.sampling_rate, sigma, phase.steps)
        return accountant.epsilon_of(compose(*prefix, event) if prefix else event, delta)

    passing, failing = MAX_SIGMA, MIN_SIGMA
    at_passing = epsilon_at(passing)
    if at_passing > target:
        raise InvalidInputError(
            f"phase {phase.name!r}: even sigma {MAX_SIGMA:g} exceeds certified epsilon {target:.4g} "
            "(the earlier phases spent too much of the budget)"
        )
    if epsilon_at(failing) <= target:
        return failing, epsilon_at(failing)
    while passing / failing > 1 + tolerance:
        middle = math.sqrt(passing * failing)
        at_middle = epsilon_at(middle)
        if at_middle <= target:
            passing, at_passing = middle, at_middle
        else:
            failing = middle
    return passing, at_passing


def _check(epsilon: float, delta: float, phases: Sequence[Phase]) -> None:
    if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and 0 < epsilon < math.inf):
        raise InvalidInputError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
        raise InvalidInputError(f"delta must be in (0, 1), got {delta!r}")
    if not phases:
        raise InvalidInputError("a recipe needs at least one phase")
    shares = [phase.budget_share for phase in phases[:-1]]
    if any(not (isinstance(s, (int, float)) and 0 < s < 1) for s in shares) or sum(shares) >= 1:
        raise InvalidInputError(f"every phase but the last needs a budget share in (0, 1), summing below 1; got {shares}")
