"""Typed, read-only views of ledger entries, one per kind: the one place where a reader names an entry's fields.

The readers read a ledger through these views: the rules that replay it (:class:`ewtune.accountant.spend.LedgerState`,
for the writer's pre-flight and the auditor alike), the verifier, the cross-check, the enrolment, the coordinator's
recovery, the holder's own history and released count, and the report's curves. A new field is added here, once.
Still reading keys themselves: the chain check (:class:`ewtune.accountant.ledger_lines.ChainChecker`: the
envelope, and genesis's key and writer before any rule runs), the report's table rows
(``ewtune.report.audit_report.entry_row``) and the federation benchmark; an audit's lower-bound record
(``epsilon_lower_bound``, ``confidence``, ``canaries``) is read where :func:`ewtune.accountant.spend.check_audit_bound`
checks it.

What is *written* is defined by the writer's payload builders, which keep building dicts because each is already
the one definition of its kind: :class:`ewtune.accountant.ledger.Ledger`'s ``create`` (genesis),
``register_holder``, ``reserve``, ``commit``, ``abort``, ``_repair`` and ``record_audit``, the spend an entry states
(:func:`ewtune.accountant.ledger_payloads.stated_epsilons`), and a count release's facts
(:func:`ewtune.agent.released_count.count_facts`). The envelope (seq, time, kind, writer, payload, prev,
signature) is :mod:`ewtune.accountant.ledger_lines`', checked by its ``parse_line`` before a view is taken.

A view never judges the entry it reads, so reading a malformed one raises nothing: a field the entry lacks reads
None, and a field of the wrong type is read as it is. Refusing it, in one line that names the field, is the
rules' job (``LedgerState.prepare``), which runs on every entry before anything else reads it; only
:func:`entry_view` refuses an entry, whose kind is unknown or whose payload is not an object, since no view fits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Union, get_args

from ewtune.accountant.errors import InvalidInputError, UnknownEventKindError
from ewtune.accountant.ledger_payloads import DATASET_SIZE_PURPOSE, STATED_EPSILONS

GENESIS, HOLDER, RESERVE, COMMIT = "genesis", "holder", "reserve", "commit"
ABORT, REPAIR, AUDIT = "abort", "repair", "audit"

Entry = Mapping[str, Any]


def _seq_and_payload(entry: Entry) -> tuple[int | None, Mapping[str, Any]]:
    """The envelope's seq and payload (read as empty when it is not an object, which the rules refuse)."""
    payload = entry.get("payload")
    return entry.get("seq"), payload if isinstance(payload, Mapping) else {}


def _budget(fields: Mapping[str, Any]) -> tuple[Any, Any]:
    """(budget_epsilon, budget_delta) of a genesis policy or a holder registration."""
    return fields.get("budget_epsilon"), fields.get("budget_delta")


def _stated(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The epsilons an entry states (those it holds of :data:`STATED_EPSILONS`), for the verifier to recompute."""
    return {name: payload[name] for name in STATED_EPSILONS if name in payload}


@dataclass(frozen=True)
class GenesisEntry:
    """A ledger's first entry: its writer, the writer's public key and lifetime budget (the ``policy`` object),
    the certified accountant it pins, and the ledger schema."""

    kind: ClassVar[str] = GENESIS
    seq: int
    writer: str | None
    public_key: str | None
    policy: Mapping[str, Any] | None
    budget_epsilon: float | None  # the policy's, None when the policy is not an object
    budget_delta: float | None
    accountant: Mapping[str, Any] | None
    schema: int | None

    @classmethod
    def of(cls, entry: Entry) -> "GenesisEntry":
        seq, payload = _seq_and_payload(entry)
        policy = payload.get("policy")
        budget = _budget(policy) if isinstance(policy, Mapping) else (None, None)
        return cls(seq, payload.get("writer"), payload.get("public_key"), policy, *budget, payload.get("accountant"),
                   payload.get("schema"))


@dataclass(frozen=True)
class HolderEntry:
    """A coordinator ledger's registration of a holder: the key its receipts are signed with, and its budget."""

    kind: ClassVar[str] = HOLDER
    seq: int
    holder: str | None
    public_key: str | None
    budget_epsilon: float | None
    budget_delta: float | None

    @classmethod
    def of(cls, entry: Entry) -> "HolderEntry":
        seq, payload = _seq_and_payload(entry)
        return cls(seq, payload.get("holder"), payload.get("public_key"), *_budget(payload))


@dataclass(frozen=True)
class ReserveEntry:
    """A reservation of a planned event (as JSON) for a holder (the writer itself in a holder's ledger), run and
    round, with the spend it leads to as stated."""

    kind: ClassVar[str] = RESERVE
    seq: int
    holder: str | None
    run_id: str | None
    round: int | None
    event: Mapping[str, Any] | None
    stated: Mapping[str, Any]
    time: str | None = None

    @classmethod
    def of(cls, entry: Entry) -> "ReserveEntry":
        seq, payload = _seq_and_payload(entry)
        return cls(seq, payload.get("holder"), payload.get("run_id"), payload.get("round"), payload.get("event"),
                   _stated(payload), entry.get("time"))


@dataclass(frozen=True)
class CommitEntry:
    """The commit of a reservation: the event executed (as JSON), the receipt's hash and the facts beside it
    (``extra``), when it was written, and the spend it leads to as stated."""

    kind: ClassVar[str] = COMMIT
    seq: int
    reservation: int | None
    event: Mapping[str, Any] | None
    receipt_sha256: str | None
    extra: Mapping[str, Any]
    time: str
    stated: Mapping[str, Any]

    @classmethod
    def of(cls, entry: Entry) -> "CommitEntry":
        seq, payload = _seq_and_payload(entry)
        return cls(seq, payload.get("reservation"), payload.get("event"), payload.get("receipt_sha256"),
                   payload.get("extra", {}), entry.get("time"), _stated(payload))

    @property
    def purpose(self) -> str | None:
        """What the charged event was for (ewtune.accountant.ledger_payloads' purposes); None: a training round
        (also when ``extra`` is not an object, which the rules do not refuse: it was free-form from the start)."""
        return self.extra.get("purpose") if isinstance(self.extra, Mapping) else None

    @property
    def states_audit(self) -> bool:
        """Whether ``extra`` states an audit run's lower bound (written by ``ewtune audit --ledger``)."""
        return isinstance(self.extra, Mapping) and AUDIT in self.extra

    @property
    def audit(self) -> Any:
        """That lower bound as written (:func:`ewtune.accountant.spend.check_audit_bound` checks it); None when
        the commit states none."""
        return self.extra[AUDIT] if self.states_audit else None

    @property
    def released_count(self) -> int | None:
        """The value of a holder's private count of its training records (purpose ``dataset_size``,
        ``extra.public.dataset_size``: :mod:`ewtune.agent.released_count`); None for any other commit."""
        if self.purpose != DATASET_SIZE_PURPOSE or "public" not in self.extra:
            return None
        return int(self.extra["public"]["dataset_size"])


@dataclass(frozen=True)
class AbortEntry:
    """The close of a reservation that released nothing, and why."""

    kind: ClassVar[str] = ABORT
    seq: int
    reservation: int | None
    reason: str | None
    stated: Mapping[str, Any]  # none written; stated all the same, it must hold like any statement

    @classmethod
    def of(cls, entry: Entry) -> "AbortEntry":
        seq, payload = _seq_and_payload(entry)
        return cls(seq, payload.get("reservation"), payload.get("reason"), _stated(payload))


@dataclass(frozen=True)
class RepairEntry:
    """A torn last line cut off when the ledger was opened: its length and hash, the byte offset where it
    started (this entry's own line starts there), and the file it was saved to."""

    kind: ClassVar[str] = REPAIR
    seq: int
    torn_bytes: int | None
    torn_sha256: str | None
    offset: int | None
    saved_as: str | None

    @classmethod
    def of(cls, entry: Entry) -> "RepairEntry":
        seq, payload = _seq_and_payload(entry)
        return cls(seq, payload.get("torn_bytes"), payload.get("torn_sha256"), payload.get("offset"),
                   payload.get("saved_as"))


@dataclass(frozen=True)
class AuditEntry:
    """A federated audit of a run: each registered holder's empirical lower bound on epsilon and the pooled one
    (each an object with ``epsilon_lower_bound``, ``confidence`` and ``canaries``); it changes no spend."""

    kind: ClassVar[str] = AUDIT
    seq: int
    run_id: str | None
    holders: Mapping[str, Any] | None
    pooled: Mapping[str, Any] | None

    @classmethod
    def of(cls, entry: Entry) -> "AuditEntry":
        seq, payload = _seq_and_payload(entry)
        return cls(seq, payload.get("run_id"), payload.get("holders"), payload.get("pooled"))


EntryView = Union[GenesisEntry, HolderEntry, ReserveEntry, CommitEntry, AbortEntry, RepairEntry, AuditEntry]
VIEWS: dict[str, type] = {view.kind: view for view in get_args(EntryView)}
KINDS = tuple(VIEWS)  # a kind is never removed and its meaning never changes (ewtune.accountant.ledger)


def entry_view(entry: Entry) -> EntryView:
    """The view of ``entry`` by its kind. An unknown kind (``UnknownEventKindError``) or a payload that is not a
    JSON object (``InvalidInputError``) is refused in one line: no view fits it."""
    kind = entry.get("kind")
    if kind not in KINDS:
        raise UnknownEventKindError(f"unknown entry kind {kind!r}: this release cannot account it")
    if not isinstance(entry.get("payload"), dict):
        raise InvalidInputError(f"the payload of a {kind} entry must be a JSON object")
    return VIEWS[kind].of(entry)


def _of_kind(entries: Iterable[Entry], view: type) -> list:
    return [view.of(entry) for entry in entries if entry.get("kind") == view.kind]


def holder_entries(entries: Iterable[Entry]) -> list[HolderEntry]:
    return _of_kind(entries, HolderEntry)


def commit_entries(entries: Iterable[Entry]) -> list[CommitEntry]:
    """The commits, in ledger order."""
    return _of_kind(entries, CommitEntry)


def registered_keys(entries: Iterable[Entry]) -> dict[str, str]:
    """holder id -> the public key its registration pins (a coordinator ledger registers a holder once)."""
    return {registration.holder: registration.public_key for registration in holder_entries(entries)}


def reservations_and_commits(entries: Iterable[Entry]) -> tuple[dict[int, ReserveEntry], list[CommitEntry]]:
    """The reservations by sequence number and the commits, in ledger order."""
    reservations, commits = {}, []
    for entry in entries:
        if entry.get("kind") == RESERVE:
            reservation = ReserveEntry.of(entry)
            reservations[reservation.seq] = reservation
        elif entry.get("kind") == COMMIT:
            commits.append(CommitEntry.of(entry))
    return reservations, commits
