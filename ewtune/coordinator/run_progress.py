"""A federated run's progress, read from the status file the ServerApp rewrites (``status.json``, whose schema is
:class:`ewtune.coordinator.run_status.RunStatus`) and reported
through :class:`ewtune.federation.progress.Progress`: each holder's plan, a holder skipped, each round (holders
committed and aborted, its seconds, the certified epsilon each holder has spent), the accuracy (a causal LM:
the perplexity) a holder released, and the run's state. ``ewtune coordinator run`` and ``ewtune demo`` both follow a run with it.

Only what the status file holds is shown: holders release no training loss, and an accuracy appears only when
a holder's policy releases its (noised) evaluation; otherwise the reason it sent instead (a refusal by its
policy, its daily limit, a failure, no reply) is shown for that round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ewtune.coordinator.run_status import HolderStatus, RoundRecord, RunStatus
from ewtune.federation.progress import Progress


class RunProgress:
    """Called with each new status (``ewtune.coordinator.cli.follow_run``'s ``on_status``: status.json as read,
    a :class:`~ewtune.coordinator.run_status.RunStatus` in its JSON form); reports each thing once."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self._seen: set[tuple] = set()

    def __call__(self, document: Mapping[str, Any]) -> None:
        status = RunStatus.from_json(document)
        for holder_id, holder in sorted(status.holders.items()):
            self._once(("plan", holder_id), "plan", _plan_text(holder_id, holder), holder=holder_id,
                       dataset_size=holder.dataset_size, sampling_rate=holder.sampling_rate,
                       noise_multiplier=holder.noise_multiplier, planned_epsilon_certified=holder.planned_epsilon_certified)  # fmt: skip
            if holder.warning:
                self._once(("warning", holder_id), "warning", f"  WARNING: {holder.warning}", holder=holder_id, warning=holder.warning)
        for holder_id, reason in sorted(status.skipped.items()):
            self._once(("skipped", holder_id), "skipped", f"  skipped {holder_id}: {reason}", holder=holder_id, reason=reason)
        for record in status.rounds:
            # the spend is known only as of now: it is shown for the latest round alone
            spent = _certified_spent(status.holders) if record is status.rounds[-1] else None
            text, fields = _round_report(record, status.rounds_planned, spent)
            self._once(("round", record.round), "round", text, **fields)
        for holder_id, holder in sorted(status.holders.items()):
            self._released(holder_id, holder)
        state, reason = status.state, status.reason
        self._once(("state", state), "state", f"  run {state}" + (f" ({reason})" if reason else ""), state=state, reason=reason)

    def _released(self, holder_id: str, holder: HolderStatus) -> None:
        """The accuracy (a causal LM: the perplexity) a holder released after each round, or why it released none."""
        for round, perplexity in sorted(holder.perplexity.items(), key=lambda item: int(item[0])):
            self._once(("perplexity", holder_id, round), "perplexity",
                       f"    {holder_id} released a private (noised) perplexity of the global model after round {round}: {perplexity:.2f}",
                       holder=holder_id, round=int(round), perplexity=perplexity)  # fmt: skip
        for round, accuracy in sorted(holder.accuracy.items(), key=lambda item: int(item[0])):
            metrics = holder.evaluation.get(round, {})
            self._once(("accuracy", holder_id, round), "accuracy",
                       f"    {holder_id} released a private (noised) accuracy of the global model after round {round}: {accuracy:.3f}",
                       holder=holder_id, round=int(round), accuracy=accuracy,
                       **{key: metrics[key] for key in ("f1", "majority_baseline") if key in metrics})  # fmt: skip
        for round, reason in sorted(holder.evaluation_missing.items(), key=lambda item: int(item[0])):
            self._once(("evaluation missing", holder_id, round), "evaluation_missing",
                       f"    {holder_id} released no evaluation of the global model after round {round}: {reason}",
                       holder=holder_id, round=int(round), reason=reason)  # fmt: skip

    def _once(self, key: tuple, kind: str, text: str, **fields: Any) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.progress.event(kind, text, **fields)


def missing_evaluations(holder: HolderStatus | Mapping[str, Any]) -> str:
    """A holder's status.json "evaluation_missing" in one line: each reason once, after the rounds it was
    given for, e.g. ``no evaluation of rounds 0, 1: refused: ...``; empty when every evaluation came back."""
    if not isinstance(holder, HolderStatus):
        holder = HolderStatus.from_json(holder)
    rounds_by_reason: dict[str, list[int]] = {}
    for round, reason in sorted(holder.evaluation_missing.items(), key=lambda item: int(item[0])):
        rounds_by_reason.setdefault(reason, []).append(int(round))
    return "; ".join(
        f"no evaluation of round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}: {reason}"
        for reason, rounds in rounds_by_reason.items()
    )


def _plan_text(holder_id: str, holder: HolderStatus) -> str:
    return (
        f"  plan for {holder_id}: {holder.dataset_size} records (noised count), q={_fmt(holder.sampling_rate, '.4f')}, "
        f"sigma={_fmt(holder.noise_multiplier, '.4f')}, certified epsilon after the plan "
        f"{_fmt(holder.planned_epsilon_certified, '.3f')}"
    )


def _certified_spent(holders: Mapping[str, HolderStatus]) -> dict[str, float]:
    """Each holder's certified epsilon spent so far, as the coordinator's ledger records it (the guarantee)."""
    return {h: holder.epsilon_certified for h, holder in sorted(holders.items()) if holder.epsilon_certified is not None}


def _round_report(record: RoundRecord, planned: int | None, spent: dict[str, float] | None) -> tuple[str, dict[str, Any]]:
    outcomes = record.holders
    committed = sorted(h for h, outcome in outcomes.items() if outcome.status == "committed")
    aborted = {h: outcome.reason for h, outcome in sorted(outcomes.items()) if outcome.status != "committed"}
    text = f"  round {record.round}/{planned}: {len(committed)} update(s) verified and aggregated"
    if aborted:
        text += f", {len(aborted)} aborted (" + "; ".join(f"{h}: {reason}" for h, reason in aborted.items()) + ")"
    text += f" in {record.seconds:.1f} s"
    kept = record.global_weights_share
    if kept:  # too few holders for their capped shares to sum to 1 (ewtune.coordinator.aggregation.capped_fedavg)
        text += f" (max_weight_share caps each holder: the update was scaled by {1 - kept:.3g})"
    if spent:
        text += "; certified epsilon spent: " + ", ".join(f"{h} {epsilon:.3f}" for h, epsilon in spent.items())
    fields = {"round": record.round, "rounds_planned": planned, "committed": committed, "aborted": aborted,
              "seconds": record.seconds, "epsilon_certified": spent, "global_weights_share": kept}  # fmt: skip
    return text, fields


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
