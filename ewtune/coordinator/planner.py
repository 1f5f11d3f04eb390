"""The federation plan: one schedule for everyone, one noise multiplier per holder.

Every holder runs the same schedule (``rounds`` rounds of ``local_steps`` DP-SGD steps at an expected batch of
``expected_batch_size`` records, clip norm C, learning rate); a holder that released the noised count N_noisy
of its records (its exact N never leaves it: ewtune.agent.released_count) samples at q = B / N_noisy (Poisson; a
function of released values, so the q in its ledger reveals nothing more about N), rounded up to the rate its sampler executes exactly
(:func:`ewtune.accountant.sampling.executable_sampling_rate`): the receipt's event must equal the plan's to the bit,
so the plan names the rate that will actually run. It meets each holder's stated floors (its minimum expected
batch q*N_noisy and minimum noise multiplier; its daemon refuses a plan below them) and delta < 1/N_noisy.

Its sigma is the smallest that meets two certified bounds (events are accounted, never epsilons subtracted):

- the *whole* plan alone, ``rounds * local_steps`` steps at rate q, within min(target epsilon, the holder's
  budget epsilon) at the smaller of the federation's delta and its budget delta (:mod:`ewtune.accountant.calibration`);
- the plan composed after every event the holder's ledger already holds (its Describe reply's
  ``spent_mechanisms``: the steps per distinct mechanism, committed and reserved, the released count among
  them) within the holder's budget at its budget delta (:func:`ewtune.accountant.phases.smallest_sigma_after`), which
  is the check its daemon makes against its own ledger before every round (``Daemon._check_budget``: the
  ledger's events with the round reserved, composed). Subtracting epsilons overstates the cost: a count
  released at sigma 20 has epsilon about 0.16 alone, but composed with a plan at epsilon 8 it adds about 0.004.
  A holder that does not state its events is planned to min(target, budget - spent), as before.

Holders whose budget cannot fund the plan are skipped with the reason, before anything is reserved or sent. A
holder planned at a sigma over :data:`USELESS_SIGMA_RATIO` times what a fresh budget would give (its budget is
nearly spent: its update would be mostly noise) is planned with a warning naming it and its budget left.

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.privacy_accountant import delta_too_large
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.federation.contract import HolderDescription, positive  # the reply to a query, as both sides read it

# The budget bound's search stops within 0.02% of the smallest sigma (the calibration's 0.2% would leave up to
# about 0.3% of the budget unspent; a few more certified evaluations cost well under a second).
LEDGER_SIGMA_TOLERANCE = 2e-4
# A plan's sigma over this many times a fresh budget's is warned about: 16 times the noise variance, so the
# updates carry the signal-to-noise of a run 16 times shorter.
USELESS_SIGMA_RATIO = 4.0


@dataclass(frozen=True)
class FederationSettings:
    """The coordinator's schedule and privacy target (``[federation]`` of federation.toml)."""

    rounds: int
    local_steps: int
    expected_batch_size: float
    clip_norm: float
    learning_rate: float
    target_epsilon: float
    delta: float
    max_noise_multiplier: float = 50.0  # above it the update is noise: the holder is skipped instead
    min_holders: int = 1
    # No holder's share of the FedAvg average exceeds it (ewtune.coordinator.aggregation.capped_shares); None: 0.5.
    max_weight_share: float | None = None
    # An update that moves the global weights farther (L2) is refused; None: derived from the plan
    # (ewtune.coordinator.aggregation.default_update_norm_bound).
    max_update_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "min_holders"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("expected_batch_size", "clip_norm", "learning_rate", "target_epsilon", "max_noise_multiplier"):
            positive(name, getattr(self, name))
        if not _number(self.delta) or not 0 < self.delta < 1:
            raise InvalidInputError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.max_weight_share is not None and (not _number(self.max_weight_share) or not 0 < self.max_weight_share <= 1):
            raise InvalidInputError(f"max_weight_share must be in (0, 1], got {self.max_weight_share!r}")
        if self.max_update_norm is not None:
            positive("max_update_norm", self.max_update_norm)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps


@dataclass(frozen=True)
class HolderPlan:
    """One holder's part of the plan: its sampling rate, its sigma and the certified epsilon of the whole
    plan (the Edgeworth estimate beside it), at ``delta``."""

    holder: HolderDescription
    sampling_rate: float
    noise_multiplier: float
    epsilon_target: float
    delta: float
    epsilon_certified: float
    epsilon_edgeworth: float | None
    warning: str | None = None  # the plan runs, but the holder's update will be mostly noise (module docstring)

    @property
    def holder_id(self) -> str:
        return self.holder.holder_id

    def round_event(self, steps: int) -> PoissonGaussianEvent:
        return PoissonGaussianEvent(self.sampling_rate, self.noise_multiplier, steps)


@dataclass(frozen=True)
class SkippedHolder:
    holder: HolderDescription
    reason: str


@dataclass(frozen=True)
class FederationPlan:
    settings: FederationSettings
    holders: tuple[HolderPlan, ...]
    skipped: tuple[SkippedHolder, ...]

    def by_holder(self) -> dict[str, HolderPlan]:
        return {plan.holder_id: plan for plan in self.holders}


def plan_federation(settings: FederationSettings, descriptions: Iterable[HolderDescription]) -> FederationPlan:
    """Calibrate every holder's sigma for the whole plan; skip those whose budget cannot fund it.

    Raises :class:`InvalidInputError` when fewer than ``settings.min_holders`` holders remain, or when two
    nodes claim the same holder id."""
    descriptions = list(descriptions)
    seen: set[str] = set()
    for description in descriptions:
        if description.holder_id in seen:
            raise InvalidInputError(f"two nodes claim the holder id {description.holder_id!r}")
        seen.add(description.holder_id)
    planned, skipped = [], []
    for description in sorted(descriptions, key=lambda d: d.holder_id):
        outcome = _plan_holder(settings, description)
        (planned if isinstance(outcome, HolderPlan) else skipped).append(outcome)
    if len(planned) < settings.min_holders:
        reasons = "; ".join(f"{s.holder.holder_id}: {s.reason}" for s in skipped) or "no holder answered"
        raise InvalidInputError(
            f"only {len(planned)} holder(s) can fund the plan, {settings.min_holders} needed ({reasons})"
        )
    return FederationPlan(settings, tuple(planned), tuple(skipped))


def _plan_holder(settings: FederationSettings, holder: HolderDescription) -> HolderPlan | SkippedHolder:
    # scipy, mpmath: +0.6 s; `ewtune` builds its parser through config_check -> this module
    from ewtune.accountant.calibration import calibrate_noise_multiplier

    if holder.dataset_size is None:
        return SkippedHolder(holder, "its budget cannot fund the release of its noised count of records")
    if holder.budget_left_epsilon <= 0:
        return SkippedHolder(holder, f"its budget is spent ({holder.spent_epsilon_certified:.4g} of {holder.budget_epsilon:g})")
    epsilon = min(settings.target_epsilon, holder.budget_epsilon)
    delta = min(settings.delta, holder.budget_delta)
    too_large = delta_too_large(delta, holder.dataset_size)
    if too_large:
        return SkippedHolder(holder, too_large)
    sampling_rate = executable_sampling_rate(min(1.0, settings.expected_batch_size / holder.dataset_size))
    if sampling_rate * holder.dataset_size < holder.min_expected_batch:
        return SkippedHolder(
            holder, f"expected batch {sampling_rate * holder.dataset_size:.4g} is below its minimum {holder.min_expected_batch:g}"
        )
    plan = [(sampling_rate, settings.total_steps)]
    try:
        calibration = calibrate_noise_multiplier(epsilon, delta, plan, policy="certified")
        fresh_sigma = float(calibration.noise_multiplier)
        within_ledger = _sigma_within_ledger(settings, holder, plan, delta)
    except InvalidInputError as failure:
        return SkippedHolder(holder, f"no noise multiplier keeps the plan within its budget: {failure}")
    sigma = max(fresh_sigma, within_ledger, holder.min_noise_multiplier)
    if sigma > calibration.noise_multiplier:  # more noise than the plan alone needs: its epsilon falls
        calibration = _at_sigma(sigma, delta, sampling_rate, settings.total_steps)
    if not math.isfinite(sigma) or sigma > settings.max_noise_multiplier:
        return SkippedHolder(
            holder,
            f"its budget left needs noise multiplier {sigma:.4g} > {settings.max_noise_multiplier:g} "
            f"for {settings.total_steps} steps at q={sampling_rate:.4g}",
        )
    return HolderPlan(
        holder=holder,
        sampling_rate=sampling_rate,
        noise_multiplier=sigma,
        epsilon_target=epsilon if holder.spent_events is not None else min(epsilon, holder.budget_left_epsilon),
        delta=delta,
        epsilon_certified=float(calibration.epsilon_certified),
        epsilon_edgeworth=None if calibration.epsilon_edgeworth is None else float(calibration.epsilon_edgeworth),
        warning=_useless_warning(holder, sigma, fresh_sigma),
    )


def _sigma_within_ledger(settings: FederationSettings, holder: HolderDescription, plan, delta: float) -> float:
    """The smallest sigma for which the ``plan`` [(q, steps)], composed after the events of the holder's ledger,
    stays within its budget at its budget delta: the daemon's own check. A holder that does not state its
    events: the plan alone within min(target, budget - spent) at ``delta`` (0 when nothing was spent)."""
    # scipy, mpmath: +0.6 s; `ewtune` builds its parser through config_check -> this module
    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.accountant.phases import Phase, smallest_sigma_after

    spent = holder.spent_events
    if spent is None:
        left = min(settings.target_epsilon, holder.budget_left_epsilon)
        if left >= min(settings.target_epsilon, holder.budget_epsilon):
            return 0.0  # the plan's own calibration already holds
        return float(calibrate_noise_multiplier(left, delta, plan).noise_multiplier)
    ((sampling_rate, steps),) = plan
    plan_phase = Phase("plan", sampling_rate, steps)
    sigma, _ = smallest_sigma_after(spent, plan_phase, holder.budget_epsilon, holder.budget_delta, LEDGER_SIGMA_TOLERANCE)
    return sigma


def _useless_warning(holder: HolderDescription, sigma: float, fresh_sigma: float) -> str | None:
    """A warning when the holder's budget left forces a sigma over USELESS_SIGMA_RATIO times the plan's own."""
    if sigma <= USELESS_SIGMA_RATIO * fresh_sigma:
        return None
    left = holder.budget_epsilon - holder.spent_epsilon_certified
    return (
        f"holder {holder.holder_id} has epsilon {left:.4g} of {holder.budget_epsilon:g} left: its noise multiplier "
        f"{sigma:.4g} is {sigma / fresh_sigma:.0f}x what a fresh budget gives ({fresh_sigma:.4g}), so its updates "
        "will be mostly noise"
    )


@dataclass(frozen=True)
class _Calibration:
    noise_multiplier: float
    epsilon_certified: float
    epsilon_edgeworth: float | None


def _at_sigma(sigma: float, delta: float, sampling_rate: float, steps: int) -> _Calibration:
    """The plan's epsilons at a sigma fixed by a holder's floor instead of the calibration."""
    # scipy, mpmath: +0.6 s; `ewtune` builds its parser through config_check -> this module
    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.edgeworth import edgeworth_epsilon

    event = PoissonGaussianEvent(sampling_rate, sigma, steps)
    try:
        estimate = float(edgeworth_epsilon(event, delta))
    except InvalidInputError:
        estimate = None
    return _Calibration(sigma, float(certified_epsilon(event, delta)), estimate)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
