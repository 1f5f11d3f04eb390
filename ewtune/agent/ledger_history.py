"""What a holder's own ledger says about its past releases (:class:`ewtune.agent.daemon.Daemon`): the private
evaluations committed in a window (the policy's max_evaluations_per_day) and the rounds of a run whose training
update left (a replayed round is refused; an audit's canaries are revealed only after one)."""

from __future__ import annotations

from datetime import datetime

from ewtune.accountant.ledger_payloads import EVALUATION_PURPOSE


def evaluations_since(entries, since: datetime) -> int:
    """Private evaluations committed at or after ``since``, whatever their run: commits marked with the
    evaluation purpose (a failed one that read records included). Ledger times are fixed-width UTC text."""
    cutoff = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return sum(
        1
        for entry in entries
        if entry["kind"] == "commit"
        and entry["payload"].get("extra", {}).get("purpose") == EVALUATION_PURPOSE
        and entry["time"] >= cutoff
    )


def released_rounds(entries, run_id: str) -> list[int]:
    """Rounds of ``run_id`` whose training update was released: commits that carry a receipt's digest."""
    reserved = {entry["seq"]: entry["payload"] for entry in entries if entry["kind"] == "reserve"}
    return [
        reserved[entry["payload"]["reservation"]]["round"]
        for entry in entries
        if entry["kind"] == "commit"
        and "receipt_sha256" in entry["payload"]
        and reserved.get(entry["payload"]["reservation"], {}).get("run_id") == run_id
    ]
