"""Cross-check of the coordinator's ledger against the holders' own ledgers (an auditor's second look).

Each ledger is first verified on its own (:func:`ewtune.accountant.verify.verify_ledger`: chain, signatures, rules,
epsilons recomputed); a holder's ledger is verified against the public key the coordinator registered for
that holder, which pins it. Then, for every commit in the coordinator's ledger, the holder's ledger must hold
a commit for the same run and round with the same executed event and the same receipt hash (SHA-256 of the
canonical JSON of the signed receipt, which both sides record). A holder commit that the coordinator did not
commit (an update it rejected or never received) is listed apart: the holder spent that privacy, so the
holder's own ledger, never the coordinator's, is the record of what it has spent.

This is also what catches a holder ledger rolled back together with its head file (a restore of the whole
directory): such a ledger is a valid, shorter ledger on its own, but the coordinator's ledger, written on
another machine, still records the commits the holder's copy lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ewtune.accountant.entries import registered_keys, reservations_and_commits
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger_lines import parse_line, split_lines
from ewtune.accountant.ledger_payloads import EVALUATION_PURPOSE
from ewtune.accountant.verify import verify_with_its_head


@dataclass
class CrossCheck:
    matched: int = 0
    mismatches: list[str] = field(default_factory=list)  # coordinator commits the holder's ledger contradicts
    not_aggregated: list[str] = field(default_factory=list)  # holder commits absent from the coordinator's ledger

    @property
    def ok(self) -> bool:
        return not self.mismatches


def read_entries(path) -> list[dict[str, Any]]:
    """Every complete line of a ledger, parsed (not verified: use :func:`ewtune.accountant.verify.verify_ledger`)."""
    with open(path, "rb") as handle:
        return [parse_line(line) for line in split_lines(handle.read()).lines]


def commits_by_round(entries: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(holder, run_id, round) -> {"event": ..., "receipt_sha256": ...} for every training commit of a ledger
    (a holder's private evaluations are charged in its own ledger but never aggregated: they are left out)."""
    reservations, commits = reservations_and_commits(entries)
    by_round = {}
    for commit in commits:
        if commit.purpose != EVALUATION_PURPOSE:
            reserved = reservations[commit.reservation]
            by_round[reserved.holder, reserved.run_id, reserved.round] = {"event": commit.event, "receipt_sha256": commit.receipt_sha256}
    return by_round


def cross_check(coordinator_entries: Iterable[Mapping[str, Any]], holder_entries: Mapping[str, Iterable[Mapping[str, Any]]]) -> CrossCheck:
    """Compare every coordinator commit with the holder ledgers in ``holder_entries`` (holder id -> entries)."""
    result = CrossCheck()
    coordinator = commits_by_round(coordinator_entries)
    holders = {holder_id: commits_by_round(entries) for holder_id, entries in holder_entries.items()}
    for (holder_id, run_id, round), commit in sorted(coordinator.items()):
        if holder_id not in holders:
            continue
        own = holders[holder_id].get((holder_id, run_id, round))
        where = f"{holder_id}, run {run_id}, round {round}"
        if own is None:
            result.mismatches.append(
                f"{where}: committed by the coordinator, absent from the holder's ledger "
                "(the holder's ledger was rolled back or truncated, or the commit was never written)"
            )
        elif own["event"] != commit["event"]:
            result.mismatches.append(f"{where}: the executed events differ")
        elif own["receipt_sha256"] != commit["receipt_sha256"]:
            result.mismatches.append(f"{where}: the receipt hashes differ")
        else:
            result.matched += 1
    runs = {run_id for (_, run_id, _) in coordinator}
    for holder_id, commits in holders.items():
        for key in sorted(commits):
            if key[1] in runs and key not in coordinator:
                result.not_aggregated.append(f"{holder_id}, run {key[1]}, round {key[2]}")
    return result


@dataclass
class LedgersCrossCheck:
    """Each ledger's own verification (``reports``: "coordinator" and each holder id) and the cross-check of
    their verified entries."""

    reports: dict[str, Any]
    check: CrossCheck

    @property
    def ok(self) -> bool:
        return self.check.ok and all(report.ok for report in self.reports.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "ledgers": {name: report.to_json(figures=False) for name, report in self.reports.items()},
            "matched": self.check.matched,
            "mismatches": self.check.mismatches,
            "not_aggregated": self.check.not_aggregated,
        }


def cross_check_ledgers(coordinator_path: str | Path, holder_paths: Mapping[str, str | Path],
                        coordinator_key: str | None = None) -> LedgersCrossCheck:
    """Verify the coordinator's ledger (against ``coordinator_key`` when given) and each holder's (against the
    key the coordinator registered for it, when it did), each with its head file when there is one, then
    cross-check the entries that verified. Only verified entries are compared: a defect past them is already
    reported by that ledger's verification. ``ewtune ledger crosscheck`` and the receipts of ``ewtune ledger
    report`` are both this result."""
    coordinator = verify_with_its_head(coordinator_path, coordinator_key)
    coordinator_entries = _verified_entries(coordinator_path, coordinator.entries_verified)
    registered = registered_keys(coordinator_entries)
    reports: dict[str, Any] = {"coordinator": coordinator}
    holder_entries = {}
    for holder_id, path in holder_paths.items():
        if holder_id == "coordinator":
            raise InvalidInputError("'coordinator' names the coordinator's ledger; give holders their own ids")
        reports[holder_id] = report = verify_with_its_head(path, registered.get(holder_id))
        holder_entries[holder_id] = _verified_entries(path, report.entries_verified)
    return LedgersCrossCheck(reports, cross_check(coordinator_entries, holder_entries))


def _verified_entries(path: str | Path, count: int) -> list[dict[str, Any]]:
    lines = split_lines(Path(path).read_bytes()).lines[:count]
    return [parse_line(line) for line in lines]
