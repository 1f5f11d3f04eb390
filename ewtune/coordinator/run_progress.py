"""A federated run's progress, read from the status file the ServerApp rewrites (``status.json``) and reported
through :class:`ewtune.federation.progress.Progress`: each holder's plan, a holder skipped, each round (holders
committed and aborted, its seconds, the certified epsilon each holder has spent), the accuracy a holder
released, and the run's state. ``ewtune coordinator run`` and ``ewtune demo`` both follow a run with it.

Only what the status file holds is shown: holders release no training loss, and an accuracy appears only when
a holder's policy releases its (noised) evaluation; otherwise the reason it sent instead (a refusal by its
policy, its daily limit, a failure, no reply) is shown for that round.
"""

from __future__ import annotations

from typing import Any

from ewtune.federation.progress import Progress


class RunProgress:
    """Called with each new status (``ewtune.coordinator.cli.follow_run``'s ``on_status``); reports each thing once."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self._seen: set[tuple] = set()

    def __call__(self, status: dict[str, Any]) -> None:
        holders = status.get("holders", {})
        for holder_id, holder in sorted(holders.items()):
            self._once(("plan", holder_id), "plan", _plan_text(holder_id, holder), holder=holder_id,
                       dataset_size=holder.get("dataset_size"), sampling_rate=holder.get("sampling_rate"),
                       noise_multiplier=holder.get("noise_multiplier"),
                       planned_epsilon_certified=holder.get("planned_epsilon_certified"))  # fmt: skip
            if holder.get("warning"):
                self._once(("warning", holder_id), "warning", f"  WARNING: {holder['warning']}", holder=holder_id, warning=holder["warning"])
        for holder_id, reason in sorted(status.get("skipped", {}).items()):
            self._once(("skipped", holder_id), "skipped", f"  skipped {holder_id}: {reason}", holder=holder_id, reason=reason)
        rounds = status.get("rounds", [])
        for record in rounds:
            # the spend is known only as of now: it is shown for the latest round alone
            spent = _certified_spent(holders) if record is rounds[-1] else None
            text, fields = _round_report(record, status.get("rounds_planned"), spent)
            self._once(("round", record["round"]), "round", text, **fields)
        for holder_id, holder in sorted(holders.items()):
            for round, accuracy in sorted(holder.get("accuracy", {}).items(), key=lambda item: int(item[0])):
                metrics = holder.get("evaluation", {}).get(round, {})
                self._once(("accuracy", holder_id, round), "accuracy",
                           f"    {holder_id} released a private (noised) accuracy of the global model after round {round}: {accuracy:.3f}",
                           holder=holder_id, round=int(round), accuracy=accuracy,
                           **{key: metrics[key] for key in ("f1", "majority_baseline") if key in metrics})  # fmt: skip
            for round, reason in sorted(holder.get("evaluation_missing", {}).items(), key=lambda item: int(item[0])):
                self._once(("evaluation missing", holder_id, round), "evaluation_missing",
                           f"    {holder_id} released no evaluation of the global model after round {round}: {reason}",
                           holder=holder_id, round=int(round), reason=reason)  # fmt: skip
        state, reason = status.get("state"), status.get("reason")
        self._once(("state", state), "state", f"  run {state}" + (f" ({reason})" if reason else ""), state=state, reason=reason)

    def _once(self, key: tuple, kind: str, text: str, **fields: Any) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.progress.event(kind, text, **fields)


def missing_evaluations(holder: dict[str, Any]) -> str:
    """A holder's status.json "evaluation_missing" in one line: each reason once, after the rounds it was
    given for, e.g. ``no evaluation of rounds 0, 1: refused: ...``; empty when every evaluation came back."""
    rounds_by_reason: dict[str, list[int]] = {}
    for round, reason in sorted(holder.get("evaluation_missing", {}).items(), key=lambda item: int(item[0])):
        rounds_by_reason.setdefault(reason, []).append(int(round))
    return "; ".join(
        f"no evaluation of round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}: {reason}"
        for reason, rounds in rounds_by_reason.items()
    )


def _plan_text(holder_id: str, holder: dict[str, Any]) -> str:
    return (
        f"  plan for {holder_id}: {holder.get('dataset_size')} records (noised count), q={_fmt(holder.get('sampling_rate'), '.4f')}, "
        f"sigma={_fmt(holder.get('noise_multiplier'), '.4f')}, certified epsilon after the plan "
        f"{_fmt(holder.get('planned_epsilon_certified'), '.3f')}"
    )


def _certified_spent(holders: dict[str, Any]) -> dict[str, float]:
    """Each holder's certified epsilon spent so far, as the coordinator's ledger records it (the guarantee)."""
    return {h: holder["epsilon_certified"] for h, holder in sorted(holders.items()) if holder.get("epsilon_certified") is not None}


def _round_report(record: dict[str, Any], planned: int | None, spent: dict[str, float] | None) -> tuple[str, dict[str, Any]]:
    outcomes = record.get("holders", {})
    committed = sorted(h for h, outcome in outcomes.items() if outcome.get("status") == "committed")
    aborted = {h: outcome.get("reason") for h, outcome in sorted(outcomes.items()) if outcome.get("status") != "committed"}
    text = f"  round {record['round']}/{planned}: {len(committed)} update(s) verified and aggregated"
    if aborted:
        text += f", {len(aborted)} aborted (" + "; ".join(f"{h}: {reason}" for h, reason in aborted.items()) + ")"
    text += f" in {record['seconds']:.1f} s"
    kept = record.get("global_weights_share")
    if kept:  # too few holders for their capped shares to sum to 1 (ewtune.coordinator.aggregation.capped_fedavg)
        text += f" (max_weight_share caps each holder: the update was scaled by {1 - kept:.3g})"
    if spent:
        text += "; certified epsilon spent: " + ", ".join(f"{h} {epsilon:.3f}" for h, epsilon in spent.items())
    fields = {"round": record["round"], "rounds_planned": planned, "committed": committed, "aborted": aborted,
              "seconds": record["seconds"], "epsilon_certified": spent, "global_weights_share": kept}  # fmt: skip
    return text, fields


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
