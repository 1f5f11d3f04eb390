"""Typed, read-only views of ledger entries (:mod:`ewtune.accountant.ledger` writes them as JSON objects): the
fields a reader needs of a holder registration, a reservation and a commit, named once here instead of read key
by key wherever a ledger is read. A view reads an entry as the ledger wrote it; whether the entry may be trusted
is the verifier's question (:mod:`ewtune.accountant.verify`), asked before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HOLDER, RESERVE, COMMIT = "holder", "reserve", "commit"  # the entry kinds viewed here

Entry = Mapping[str, Any]


@dataclass(frozen=True)
class HolderEntry:
    """A coordinator ledger's registration of a holder: the key its receipts are signed with, and its budget."""

    seq: int
    holder: str
    public_key: str
    budget_epsilon: float
    budget_delta: float

    @classmethod
    def of(cls, entry: Entry) -> "HolderEntry":
        payload = entry["payload"]
        return cls(entry["seq"], payload["holder"], payload["public_key"], payload["budget_epsilon"], payload["budget_delta"])


@dataclass(frozen=True)
class ReserveEntry:
    """A reservation of a planned event for a holder (the writer itself in a holder's ledger), run and round."""

    seq: int
    holder: str
    run_id: str
    round: int

    @classmethod
    def of(cls, entry: Entry) -> "ReserveEntry":
        payload = entry["payload"]
        return cls(entry["seq"], payload.get("holder", entry["writer"]), payload["run_id"], payload["round"])


@dataclass(frozen=True)
class CommitEntry:
    """The commit of a reservation: the event executed (as JSON), the receipt's hash and the facts beside it."""

    seq: int
    reservation: int
    event: Mapping[str, Any]
    receipt_sha256: str | None
    extra: Mapping[str, Any]

    @classmethod
    def of(cls, entry: Entry) -> "CommitEntry":
        payload = entry["payload"]
        return cls(entry["seq"], payload["reservation"], payload["event"], payload.get("receipt_sha256"), payload.get("extra", {}))

    @property
    def purpose(self) -> str | None:
        """What the charged event was for (ewtune.accountant.ledger's purposes); None: a training round."""
        return self.extra.get("purpose")


def holder_entries(entries: Iterable[Entry]) -> list[HolderEntry]:
    return [HolderEntry.of(entry) for entry in entries if entry["kind"] == HOLDER]


def registered_keys(entries: Iterable[Entry]) -> dict[str, str]:
    """holder id -> the public key its registration pins (a coordinator ledger registers a holder once)."""
    return {registration.holder: registration.public_key for registration in holder_entries(entries)}


def reservations_and_commits(entries: Iterable[Entry]) -> tuple[dict[int, ReserveEntry], list[CommitEntry]]:
    """The reservations by sequence number and the commits, in ledger order."""
    reservations, commits = {}, []
    for entry in entries:
        if entry["kind"] == RESERVE:
            reservation = ReserveEntry.of(entry)
            reservations[reservation.seq] = reservation
        elif entry["kind"] == COMMIT:
            commits.append(CommitEntry.of(entry))
    return reservations, commits
