"""A federation started again after it was killed: the ServerApp's side of :mod:`ewtune.coordinator.recovery`.

The recorded plan (the same q and sigma for the whole federation) is kept for the holders that describe
themselves again; the earlier runs' open reservations are closed (committed when the update in the inbox
verifies again, aborted otherwise); the last checkpoint is restored, and a round whose updates were committed
but not checkpointed is rebuilt from the inbox. status.json carries over the earlier runs' rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger import Ledger
from ewtune.coordinator.checkpoints import checkpoint_path
from ewtune.coordinator.planner import FederationPlan, FederationSettings, SkippedHolder
from ewtune.coordinator.recovery import Inbox, Outcome, ResumePoint, RunRecord, committed_rounds, reconcile, resume_point
from ewtune.coordinator.registry import Registry
from ewtune.coordinator.run_log import log
from ewtune.coordinator.run_status import HolderOutcome, ResumeStatus, RoundRecord, RunStatus
from ewtune.federation.contract import HolderDescription


def resumed_plan(record: RunRecord, descriptions: list[HolderDescription], settings: FederationSettings) -> FederationPlan:
    """The recorded plan for the holders that described themselves again (at the node they answered from);
    fewer than ``min_holders`` of them is a failure, which a later start may resume."""
    described = {description.holder_id: description for description in descriptions}
    plans, skipped = [], []
    for plan in record.plans:
        description = described.get(plan.holder_id)
        if description is None:
            skipped.append(SkippedHolder(plan.holder, "planned, but it did not describe itself after the restart"))
        else:
            plans.append(dataclasses.replace(plan, holder=dataclasses.replace(plan.holder, node_id=description.node_id)))
    if len(plans) < settings.min_holders:
        raise InvalidInputError(
            f"resuming {', '.join(record.segments)}: {len(plans)} planned holder(s) answered, {settings.min_holders} needed"
        )
    return FederationPlan(settings, tuple(plans), tuple(skipped))


class Resumption:
    """The earlier runs of the run record (all its segments but this run's), as this run takes them over."""

    def __init__(self, ledger: Ledger, record: RunRecord, inbox: Inbox, output_dir: Path, registry: Registry):
        self.ledger, self.record, self.inbox, self.output_dir, self.registry = ledger, record, inbox, output_dir, registry
        self.earlier = record.segments[:-1]
        self.outcomes: list[Outcome] = []

    def reconcile(self, node_ids: Mapping[str, int]) -> ResumePoint:
        """Close the earlier runs' open reservations; where the federation stands."""
        public_keys = {card.holder_id: card.ledger_public_key for card in self.registry.holders}
        self.outcomes = reconcile(self.ledger, self.earlier, self.inbox, public_keys=public_keys, node_ids=node_ids)
        return resume_point(self.ledger, self.record, self.output_dir, self.inbox)

    def checkpoints(self, completed: int) -> list[str]:
        return [str(checkpoint_path(self.output_dir, r)) for r in range(1, completed + 1)]

    def earlier_rounds(self, previous: RunStatus | None, completed: int) -> list[RoundRecord]:
        """The round records of the status the earlier runs wrote, up to round ``completed``."""
        if previous is None or previous.run_id not in self.earlier:
            return []
        return [record for record in previous.rounds if record.round <= completed]

    @staticmethod
    def rebuilt_round(round: int, seconds: float, shares: Mapping[str, float], kept: float | None) -> RoundRecord:
        """A round rebuilt from the inbox: ``seconds`` are the rebuild's (its exchange happened before the restart)."""
        return RoundRecord(round=round, seconds=seconds, rebuilt_after_restart=True, global_weights_share=kept,
                           holders={holder_id: HolderOutcome("committed", weight_share=share) for holder_id, share in shares.items()})

    def committed_rounds(self) -> dict[str, int]:
        return committed_rounds(self.ledger.entries, self.record.segments)

    def status(self, completed: int) -> ResumeStatus:
        for o in self.outcomes:
            log(f"reservation {o.reservation} ({o.holder_id}, run {o.run_id}, round {o.round}): {o.action}, {o.reason}")
        log(f"resumed {', '.join(self.earlier)} after {completed} round(s)")
        return ResumeStatus(list(self.earlier), completed, [o.to_json() for o in self.outcomes])
