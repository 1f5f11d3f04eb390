"""What ledger entries' payloads say: the writer's budget policy, commit purposes, the epsilons an entry states.

The entries themselves are built and appended by :class:`ewtune.accountant.ledger.Ledger`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import ComposedEvent, PoissonGaussianEvent

if TYPE_CHECKING:  # the annotation only: spend.py reads entries through entries.py, which imports this module
    from ewtune.accountant.spend import HolderSpend

# A commit's ``extra.purpose`` for a release that is not a training update (a holder's private evaluation):
# charged like any event, but never aggregated, so the coordinator's ledger has no commit to match it.
EVALUATION_PURPOSE = "evaluation"
# A commit's ``extra.purpose`` for an audit run's release (synthetic records and canaries, never a model for use).
AUDIT_PURPOSE = "audit"
# A commit's ``extra.purpose`` for a holder's private count of its training records (``extra.public.dataset_size``,
# noised and charged like any event; ewtune.agent.released_count): never aggregated, no coordinator commit matches it.
DATASET_SIZE_PURPOSE = "dataset_size"
STATED_EPSILONS = ("epsilon_certified", "epsilon_edgeworth")


@dataclass(frozen=True)
class Policy:
    """A ledger writer's lifetime budget: record-level (epsilon, delta)-DP, add/remove neighbours."""

    budget_epsilon: float
    budget_delta: float

    @classmethod
    def coerce(cls, policy: "Policy | Mapping[str, Any]") -> "Policy":
        if isinstance(policy, Policy):
            return policy
        if not isinstance(policy, Mapping) or not {"budget_epsilon", "budget_delta"} <= policy.keys():
            raise InvalidInputError("a ledger policy needs budget_epsilon and budget_delta")
        return cls(policy["budget_epsilon"], policy["budget_delta"])

    def to_json(self) -> dict[str, Any]:
        return {"budget_epsilon": as_float(self.budget_epsilon), "budget_delta": as_float(self.budget_delta)}


def stated_epsilons(spend: HolderSpend) -> dict[str, float]:
    """The spend an entry leads to, stated so that an auditor can recompute and compare it."""
    stated = {"epsilon_certified": spend.epsilon_certified}
    if spend.epsilon_edgeworth is not None:
        stated["epsilon_edgeworth"] = spend.epsilon_edgeworth
    return stated


def as_float(value: Any) -> Any:
    """Budgets are recorded as JSON doubles; anything that is not a number is left for validation to refuse."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def check_event(event: Any) -> None:
    if not isinstance(event, (PoissonGaussianEvent, ComposedEvent)):
        raise InvalidInputError(f"expected a DP event, got {type(event).__name__}")
