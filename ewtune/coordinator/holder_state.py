"""A planned holder during a run, as the ServerApp keeps it: its plan, whether it is still active, its rounds
committed and the evaluations it released (or why it released none), and its line of status.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import Message

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.rdp import RdpAccountant
from ewtune.coordinator.planner import HolderPlan
from ewtune.coordinator.round_messages import EvaluationMissing, released_metrics
from ewtune.coordinator.run_log import log, reason
from ewtune.coordinator.run_status import HolderStatus

MISSING_REASON_CHARACTERS = 200  # the longest reason for a missing evaluation kept in status.json


@dataclass
class HolderState:
    plan: HolderPlan
    active: bool = True
    reason: str | None = None
    rounds_committed: int = 0
    accuracy: dict[int, float] = field(default_factory=dict)
    perplexity: dict[int, float] = field(default_factory=dict)  # a causal LM's holders release a perplexity instead
    evaluation: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluation_missing: dict[int, str] = field(default_factory=dict)  # round -> why no evaluation came back

    @property
    def holder_id(self) -> str:
        return self.plan.holder_id

    def drop(self, why: str) -> None:
        self.active, self.reason = False, why
        log(f"holder {self.holder_id} dropped: {why}")

    def record_evaluation(self, round: int, reply: Message | None, inside_train: bool = False) -> None:
        """Keep the numeric metrics of an evaluation of the model after ``round`` (an evaluate reply's, or a
        train reply's with ``inside_train``). A holder releases none by default (its daemon refuses): no reply, a
        refusal, an error or anything malformed changes nothing else (the holder is neither dropped nor aborted
        for it); its short reason is logged and kept per round (status.json's "evaluation_missing")."""
        try:
            metrics = released_metrics(reply, inside_train)
        except EvaluationMissing as missing:
            return self._evaluation_missing(round, str(missing))
        except Exception as failure:  # noqa: BLE001 - a malformed evaluation reply is ignored, not fatal
            return self._evaluation_missing(round, f"reply ignored: {reason(failure)}")
        self.evaluation[round] = metrics
        if "accuracy" in metrics:
            self.accuracy[round] = metrics["accuracy"]
        if "perplexity" in metrics:
            self.perplexity[round] = metrics["perplexity"]
        log(f"holder {self.holder_id}: global model after round {round}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

    def _evaluation_missing(self, round: int, why: str) -> None:
        """Why no evaluation of the model after ``round`` came back: logged, and kept (one line, at most
        :data:`MISSING_REASON_CHARACTERS` characters: holders write it) for status.json, the status page and the report."""
        short = " ".join(why.split())[:MISSING_REASON_CHARACTERS]
        self.evaluation_missing[round] = short
        log(f"holder {self.holder_id}: no evaluation of round {round} ({short})")

    def status(self, ledger: Ledger | None, rdp_accountant: RdpAccountant) -> HolderStatus:
        """Its line of status.json; its spend as ``ledger`` (the coordinator's, once open) records it."""
        plan = self.plan
        status = HolderStatus(
            node_id=str(plan.holder.node_id), dataset_size=plan.holder.dataset_size, sampling_rate=plan.sampling_rate,
            noise_multiplier=plan.noise_multiplier, planned_epsilon_certified=plan.epsilon_certified, warning=plan.warning,
            active=self.active, reason=self.reason, rounds_committed=self.rounds_committed,
            accuracy={str(k): v for k, v in sorted(self.accuracy.items())},
            perplexity={str(k): v for k, v in sorted(self.perplexity.items())},
            evaluation={str(k): v for k, v in sorted(self.evaluation.items())},
            evaluation_missing={str(k): v for k, v in sorted(self.evaluation_missing.items())},
        )  # fmt: skip
        if ledger is not None:
            spend = ledger.spend(plan.holder_id)
            status.budget_epsilon, status.budget_delta = spend.budget_epsilon, spend.budget_delta
            status.epsilon_certified, status.epsilon_edgeworth_estimate = spend.epsilon_certified, spend.epsilon_edgeworth
            status.epsilon_rdp = _rdp(spend, rdp_accountant)
        return status


def _rdp(spend, accountant: RdpAccountant) -> float | None:
    """The RDP epsilon of the holder's composed events, shown beside the certified one (a looser baseline);
    ``accountant`` keeps each mechanism's RDP curve from one status to the next."""
    if not spend.committed_events and not spend.open_reservations:
        return 0.0
    try:
        return float(accountant.epsilon_of(spend.event, spend.budget_delta))
    except InvalidInputError:
        return None
