"""What a holder's own ledger says about its past releases (:class:`ewtune.agent.daemon.Daemon`): the private
evaluations committed in a window (the policy's max_evaluations_per_day) and the rounds of a run whose training
update left (a replayed round is refused; an audit's canaries are revealed only after one)."""

from __future__ import annotations

from datetime import datetime

from ewtune.accountant.entries import commit_entries, reservations_and_commits
from ewtune.accountant.ledger_payloads import EVALUATION_PURPOSE


def evaluations_since(entries, since: datetime) -> int:
    """Private evaluations committed at or after ``since``, whatever their run: commits marked with the
    evaluation purpose (a failed one that read records included). Ledger times are fixed-width UTC text."""
    cutoff = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    evaluations = [commit for commit in commit_entries(entries) if commit.purpose == EVALUATION_PURPOSE]
    return sum(1 for commit in evaluations if commit.time >= cutoff)


def released_rounds(entries, run_id: str) -> list[int]:
    """Rounds of ``run_id`` whose training update was released: commits that carry a receipt's digest."""
    reservations, commits = reservations_and_commits(entries)
    released = [reservations.get(commit.reservation) for commit in commits if commit.receipt_sha256 is not None]
    return [reserved.round for reserved in released if reserved is not None and reserved.run_id == run_id]
