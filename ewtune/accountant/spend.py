"""What a ledger's entries mean: per-holder accounts, replayed entry by entry, and each holder's spend.

A holder's spend is the *composition* of every event recorded for it that can still release something:
the committed events (steps actually run) plus the open reservations (planned, not yet committed or aborted).
Epsilon is recomputed from that one composed event with the certified accountant (the guarantee); the
Edgeworth estimate (arXiv 2206.04236) is computed beside it and labelled as an estimate. Epsilons are never
summed: basic composition overstates them (by 29-110% in the heterogeneous cases of ``ewtune bench accountant``).

Both the writer (:mod:`ewtune.accountant.ledger`, pre-flight) and the auditor (:mod:`ewtune.accountant.verify`) replay
entries through :class:`LedgerState`, so both read a ledger the same way. Each state owns its two
accountants (:class:`SpendAccountants`), so their caches last as long as the ledger it reads: an auditor's
fresh state recomputes every figure from the events, never from what a writer computed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ewtune.accountant.entries import (
    AbortEntry,
    AuditEntry,
    CommitEntry,
    GenesisEntry,
    HolderEntry,
    RepairEntry,
    ReserveEntry,
    entry_view,
)
from ewtune.accountant.errors import EwtuneError, InvalidInputError, UnknownEventKindError
from ewtune.accountant.events import (
    ComposedEvent,
    DpEvent,
    Neighbouring,
    PoissonGaussianEvent,
    event_from_json,
    mechanisms,
)
from ewtune.accountant.signing import load_public_key

LEDGER_SCHEMA = 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

MechanismKey = tuple[tuple[tuple[float, float, Neighbouring], int], ...]


@dataclass(frozen=True)
class HolderSpend:
    """One holder's spend: ``epsilon_certified`` is the guarantee at ``budget_delta``; ``epsilon_edgeworth``
    is the order-1 Edgeworth *estimate* of the same composition (None when it could not be computed)."""

    holder_id: str
    budget_epsilon: float
    budget_delta: float
    committed_events: tuple[DpEvent, ...]
    open_reservations: Mapping[int, DpEvent]
    epsilon_certified: float
    epsilon_edgeworth: float | None

    @property
    def event(self) -> ComposedEvent:
        return ComposedEvent(self.committed_events + tuple(self.open_reservations.values()))

    @property
    def budget_left_epsilon(self) -> float:
        return max(0.0, self.budget_epsilon - self.epsilon_certified)

    @property
    def within_budget(self) -> bool:
        return self.epsilon_certified <= self.budget_epsilon

    def to_json(self) -> dict[str, Any]:
        return {
            "holder": self.holder_id,
            "budget_epsilon": self.budget_epsilon,
            "budget_delta": self.budget_delta,
            "epsilon_certified": self.epsilon_certified,
            "epsilon_edgeworth_estimate": self.epsilon_edgeworth,
            "budget_left_epsilon": self.budget_left_epsilon,
            "mechanisms": mechanism_rows(self.event),
            "committed_events": len(self.committed_events),
            "open_reservations": sorted(self.open_reservations),
        }


class SpendAccountants:
    """The certified accountant and the order-1 Edgeworth estimate that a ledger's spend is stated with,
    created on first use (they load numpy and scipy) and kept with their caches: a ledger asks for the
    spend after every entry, mostly about compositions it asked about before."""

    def __init__(self) -> None:
        self._certified: Any = None
        self._edgeworth: Any = None

    def epsilons(self, key: MechanismKey, delta: float) -> tuple[float, float | None]:
        """(certified epsilon, Edgeworth estimate or None) of the composition ``key`` at ``delta``; both 0
        when nothing was spent."""
        if not key:
            return 0.0, 0.0
        if self._certified is None:
            # scipy, mpmath: +0.5 s; ledger.py imports this module, and a ledger read or appended to prices nothing
            from ewtune.accountant.certified import CertifiedAccountant
            from ewtune.accountant.edgeworth import EdgeworthAccountant

            self._certified, self._edgeworth = CertifiedAccountant(), EdgeworthAccountant(order=1)
        event = _event_of(key)
        return float(self._certified.epsilon_of(event, delta)), self._estimate(event, delta)

    def _estimate(self, event: DpEvent, delta: float) -> float | None:
        try:
            value = float(self._edgeworth.epsilon_of(event, delta))
        except EwtuneError:
            return None
        return value if math.isfinite(value) else None


@dataclass
class HolderAccount:
    """A holder's budget and the events recorded for it so far, keyed by the seq of their entries; its
    spend is computed by the ``accountants`` of the ledger state that holds it."""

    holder_id: str
    public_key: str | None
    budget_epsilon: float
    budget_delta: float
    accountants: SpendAccountants = field(default_factory=SpendAccountants, repr=False, compare=False)
    committed: dict[int, DpEvent] = field(default_factory=dict)  # commit seq -> executed event
    open: dict[int, DpEvent] = field(default_factory=dict)  # reserve seq -> planned event
    committed_steps: Counter = field(default_factory=Counter)  # steps per mechanism over ``committed``

    def add_commit(self, seq: int, event: DpEvent) -> None:
        self.committed[seq] = event
        self.committed_steps.update(mechanisms(event))

    def spend(self, committed: Iterable[DpEvent] = (), open_: Mapping[int, DpEvent] | None = None) -> HolderSpend:
        """The spend now, or with hypothetical ``committed`` events added and ``open_`` replacing the open
        reservations (the writer states the spend an entry leads to before it writes the entry)."""
        extra = tuple(committed)
        open_events = dict(self.open if open_ is None else open_)
        steps = Counter(self.committed_steps)
        for event in extra + tuple(open_events.values()):
            steps.update(mechanisms(event))  # kept incrementally: a long ledger is not recounted per entry
        # Composition is commutative: the sorted steps per distinct mechanism identify the composed event,
        # so the writer and every verifier account exactly the same event, and the cache hits across orders.
        key = tuple(sorted(steps.items()))
        epsilon_certified, epsilon_edgeworth = self.accountants.epsilons(key, self.budget_delta)
        return HolderSpend(
            holder_id=self.holder_id,
            budget_epsilon=self.budget_epsilon,
            budget_delta=self.budget_delta,
            committed_events=tuple(self.committed.values()) + extra,
            open_reservations=open_events,
            epsilon_certified=epsilon_certified,
            epsilon_edgeworth=epsilon_edgeworth,
        )


@dataclass(frozen=True)
class Reservation:
    seq: int
    holder_id: str
    run_id: str
    round: int
    event: DpEvent


class LedgerState:
    """Replays entries (already checked for chain and signature) and refuses any that breaks the rules:
    holders registered once, reservations for known holders, each reservation closed once, a commit never
    recording more steps than reserved. ``prepare`` validates without changing anything and returns the
    change to apply, so a refused entry leaves the state as it was."""

    def __init__(self) -> None:
        self.writer: str | None = None
        self.public_key: str | None = None
        self.accountant: Any = None
        self.holders: dict[str, HolderAccount] = {}
        self.reservations: dict[int, Reservation] = {}
        self.closed: dict[int, int] = {}  # reserve seq -> seq of the commit/abort that closed it
        self.repairs: list[int] = []
        self.audits: dict[int, str] = {}  # audit entry seq -> its run
        self.accountants = SpendAccountants()

    def apply(self, entry: Mapping[str, Any]) -> str | None:
        """Apply ``entry``; returns the holder whose spend it changed, if any."""
        return self.prepare(entry)()

    def prepare(self, entry: Mapping[str, Any]) -> Callable[[], str | None]:
        """Check ``entry`` (read through its view, :mod:`ewtune.accountant.entries`) against the rules; the change
        to apply. A field it lacks or holds with the wrong type is refused here, naming the field."""
        view = entry_view(entry)
        if not isinstance(view, GenesisEntry) and self.writer is None:
            raise InvalidInputError("the first entry must be the genesis entry")
        return getattr(self, f"_prepare_{view.kind}")(view)

    def spend(self, holder_id: str) -> HolderSpend:
        return self.holders[holder_id].spend()

    def open_reservation(self, seq: Any) -> Reservation:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self.reservations:
            raise InvalidInputError(f"seq {seq!r} is not a reservation")
        if seq in self.closed:
            raise InvalidInputError(f"reservation {seq} was already closed by entry {self.closed[seq]}")
        return self.reservations[seq]

    def _prepare_genesis(self, genesis: GenesisEntry) -> Callable[[], None]:
        if self.writer is not None or genesis.seq != 0:
            raise InvalidInputError("a ledger has exactly one genesis entry, at seq 0")
        if genesis.schema != LEDGER_SCHEMA:
            raise UnknownEventKindError(
                f"unknown ledger schema {genesis.schema!r} (this release reads {LEDGER_SCHEMA})"
            )
        writer = _text(genesis.writer, "writer")
        public_key = _public_key(genesis.public_key)
        if not isinstance(genesis.policy, dict):
            raise InvalidInputError("genesis lacks the policy object")
        budget = _budget(genesis.budget_epsilon, genesis.budget_delta)
        account = HolderAccount(writer, public_key, *budget, accountants=self.accountants)
        accountant = genesis.accountant

        def change() -> None:
            self.writer, self.public_key, self.accountant = writer, public_key, accountant
            self.holders[writer] = account

        return change

    def _prepare_holder(self, registration: HolderEntry) -> Callable[[], None]:
        holder_id = _text(registration.holder, "holder")
        if holder_id in self.holders:
            raise InvalidInputError(f"holder {holder_id!r} is already registered")
        public_key = _public_key(registration.public_key)
        budget = _budget(registration.budget_epsilon, registration.budget_delta)
        account = HolderAccount(holder_id, public_key, *budget, accountants=self.accountants)

        def change() -> None:
            self.holders[holder_id] = account

        return change

    def _prepare_reserve(self, reserve: ReserveEntry) -> Callable[[], str]:
        holder_id = _text(reserve.holder, "holder")
        if holder_id not in self.holders:
            raise InvalidInputError(f"reservation for the unregistered holder {holder_id!r}")
        run_id = _text(reserve.run_id, "run_id")
        round_ = reserve.round
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise InvalidInputError(f"round must be an integer >= 0, got {round_!r}")
        seq = reserve.seq
        reservation = Reservation(seq, holder_id, run_id, round_, _event(reserve.event))

        def change() -> str:
            self.reservations[seq] = reservation
            self.holders[holder_id].open[seq] = reservation.event
            return holder_id

        return change

    def _prepare_commit(self, commit: CommitEntry) -> Callable[[], str]:
        reservation = self.open_reservation(commit.reservation)
        executed = _event(commit.event)
        check_within(executed, reservation.event)
        digest = commit.receipt_sha256
        if digest is not None and not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
            raise InvalidInputError("receipt_sha256 must be 64 lower-case hex digits")
        seq = commit.seq

        def change() -> str:
            account = self.holders[reservation.holder_id]
            del account.open[reservation.seq]
            account.add_commit(seq, executed)
            self.closed[reservation.seq] = seq
            return reservation.holder_id

        return change

    def _prepare_abort(self, abort: AbortEntry) -> Callable[[], str]:
        reservation = self.open_reservation(abort.reservation)
        _text(abort.reason, "reason")

        def change() -> str:
            del self.holders[reservation.holder_id].open[reservation.seq]
            self.closed[reservation.seq] = abort.seq
            return reservation.holder_id

        return change

    def _prepare_audit(self, audit: AuditEntry) -> Callable[[], None]:
        """A federated audit's lower bounds (:meth:`ewtune.accountant.ledger.Ledger.record_audit`): per registered
        holder and pooled; it changes no spend."""
        run_id = _text(audit.run_id, "run_id")
        holders = audit.holders
        if not isinstance(holders, dict) or not holders:
            raise InvalidInputError("an audit entry needs the object 'holders' (holder id -> its lower bound)")
        for holder_id, bound in holders.items():
            if holder_id not in self.holders:
                raise InvalidInputError(f"audit of the unregistered holder {holder_id!r}")
            check_audit_bound(bound, f"holders.{holder_id}")
        check_audit_bound(audit.pooled, "pooled")

        def change() -> None:
            self.audits[audit.seq] = run_id

        return change

    def run_events(self, holder_id: str, run_id: str) -> tuple[DpEvent, ...]:
        """The events committed for ``holder_id`` in run ``run_id``."""
        account = self.holders[holder_id]
        return tuple(
            account.committed[self.closed[seq]]
            for seq, reservation in self.reservations.items()
            if reservation.holder_id == holder_id and reservation.run_id == run_id and self.closed.get(seq) in account.committed
        )

    def _prepare_repair(self, repair: RepairEntry) -> Callable[[], None]:
        length = repair.torn_bytes
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InvalidInputError("a repair entry needs torn_bytes >= 1")
        if not (isinstance(repair.torn_sha256, str) and _SHA256_HEX.fullmatch(repair.torn_sha256)):
            raise InvalidInputError("a repair entry needs torn_sha256 (64 hex digits)")

        def change() -> None:
            self.repairs.append(repair.seq)

        return change


def check_audit_bound(bound: Any, where: str) -> None:
    """An audit's lower bound record: ``epsilon_lower_bound`` >= 0, ``confidence`` in (0, 1), ``canaries`` >= 1."""
    if not isinstance(bound, dict):
        raise InvalidInputError(f"{where} must be a JSON object (an audit's lower bound)")
    value, confidence, canaries = bound.get("epsilon_lower_bound"), bound.get("confidence"), bound.get("canaries")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise InvalidInputError(f"{where}.epsilon_lower_bound must be a number >= 0, got {value!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise InvalidInputError(f"{where}.confidence must be in (0, 1), got {confidence!r}")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
        raise InvalidInputError(f"{where}.canaries must be an integer >= 1, got {canaries!r}")


def check_within(executed: DpEvent, planned: DpEvent) -> None:
    """Refuse an executed event that is not a sub-composition of the planned one: it may run fewer steps
    of each planned mechanism (stopped early), never more, and no mechanism that was not planned."""
    planned_steps = mechanisms(planned)
    for mechanism, steps in mechanisms(executed).items():
        allowed = planned_steps.get(mechanism, 0)
        if steps > allowed:
            q, sigma, relation = mechanism
            raise InvalidInputError(
                f"commit records {steps} steps of (q={q!r}, sigma={sigma!r}, {relation.value}) "
                f"but only {allowed} were reserved"
            )


def holder_spends(entries: Iterable[Mapping[str, Any]]) -> dict[str, HolderSpend]:
    """Every holder's spend after ``entries`` (parsed ledger lines, in order)."""
    state = replay(entries)
    return {holder_id: state.spend(holder_id) for holder_id in state.holders}


def spend_with(entries: Iterable[Mapping[str, Any]], holder_id: str, extra_event: DpEvent) -> HolderSpend:
    """The spend ``holder_id`` would have after reserving ``extra_event`` as the next entry (the pre-flight
    check)."""
    entries = list(entries)
    state = replay(entries)
    if holder_id not in state.holders:
        raise InvalidInputError(f"unknown holder {holder_id!r}")
    account = state.holders[holder_id]
    return account.spend(open_={**account.open, len(entries): extra_event})


def replay(entries: Iterable[Mapping[str, Any]]) -> LedgerState:
    state = LedgerState()
    for entry in entries:
        state.apply(entry)
    return state


def mechanism_rows(event: DpEvent) -> list[dict[str, Any]]:
    """The steps per distinct mechanism of ``event`` as JSON rows (for reports)."""
    return [
        {"sampling_rate": q, "noise_multiplier": sigma, "neighbouring": relation.value, "steps": steps}
        for (q, sigma, relation), steps in sorted(mechanisms(event).items())
    ]


def _event_of(key: MechanismKey) -> ComposedEvent:
    return ComposedEvent(tuple(PoissonGaussianEvent(q, sigma, steps, relation) for (q, sigma, relation), steps in key))


def _text(value: Any, name: str) -> str:
    """``value``, the entry's field ``name``, which must be a non-empty string (the name is for the message)."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _public_key(value: Any) -> str:
    text = _text(value, "public_key")
    load_public_key(text)
    return text


def _budget(epsilon: Any, delta: Any) -> tuple[float, float]:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (0 < epsilon < math.inf):
        raise InvalidInputError(f"budget epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise InvalidInputError(f"budget delta must be in (0, 1), got {delta!r}")
    return float(epsilon), float(delta)


def _event(document: Any) -> DpEvent:
    event = event_from_json(document)
    if not mechanisms(event):
        raise InvalidInputError("an event with no steps cannot be reserved or committed")
    return event
