"""Offline audit of a ledger: the chain, the signatures, the rules, and every epsilon recomputed from events.

An auditor needs only the file and (ideally) the writer's public key, obtained out of band and pinned: a
ledger re-signed from genesis with another key is self-consistent, and only the pinned key exposes it.
Without a pinned key the report says which key it trusted (the ledger's own genesis key) and that it was not
pinned. Epsilon is recomputed by composing each holder's events with the certified accountant pinned in
genesis; stated epsilons must match to a relative 1e-9 (the accountant is deterministic). When this release's
accountant differs from the pinned one, the statements cannot be checked and the report says so.

A file alone cannot show that it is the whole ledger: a copy cut at a line boundary, or an older backup, is a
valid shorter ledger. A head kept elsewhere (the writer's head file, or a ``SEQ:HASH`` a holder or the
coordinator recorded) exposes it: the ledger must hold entry SEQ with that hash, which through the chain pins
every entry before it. Entries after the head are fine: the head is a lower bound of what was written.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant import certified as certified_engine  # its CERTIFIED_ACCOUNTANT read at each check
from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.entries import (
    AbortEntry,
    AuditEntry,
    CommitEntry,
    EntryView,
    GenesisEntry,
    RepairEntry,
    ReserveEntry,
    entry_view,
)
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import ComposedEvent, event_from_json
from ewtune.accountant.ledger_head import Head, default_head_path, head_mismatch, parse_head
from ewtune.accountant.ledger_lines import ChainChecker, SplitFile, entry_hash, parse_line, split_lines
from ewtune.accountant.signing import canonical_json
from ewtune.accountant.spend import HolderSpend, LedgerState, check_audit_bound, mechanism_rows

RELATIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class BadEntry:
    """The first entry that fails: its seq (the expected one when the line is unreadable), 1-based line."""

    seq: int
    line: int
    reason: str

    def __str__(self) -> str:
        return f"seq {self.seq} (line {self.line}): {self.reason}"


@dataclass
class VerificationReport:
    path: str
    writer: str | None = None
    public_key: str | None = None
    key_pinned: bool = False  # whether ``public_key`` was checked against a key given out of band
    entries_verified: int = 0
    first_bad: BadEntry | None = None
    torn_tail: dict[str, Any] | None = None
    accountant_mismatch: str | None = None
    heads: list[dict[str, Any]] = field(default_factory=list)  # each head checked: source, seq, hash
    head_failure: str | None = None
    holders: dict[str, HolderSpend] = field(default_factory=dict)
    reservations: list[dict[str, Any]] = field(default_factory=list)
    repairs: list[dict[str, Any]] = field(default_factory=list)
    audits: list[dict[str, Any]] = field(default_factory=list)  # audit runs' lower bounds (see audit_statement)

    @property
    def holder_ids(self) -> list[str]:
        """The holders whose spend this ledger accounts: every account but a coordinator's own, which spends
        nothing (no reservation ever) while it writes for the holders it registered."""
        reserved_for = {row["holder"] for row in self.reservations}
        return [
            holder_id for holder_id in self.holders
            if not (holder_id == self.writer and len(self.holders) > 1 and holder_id not in reserved_for)
        ]  # fmt: skip

    @property
    def ok(self) -> bool:
        return self.first_bad is None and self.accountant_mismatch is None and self.head_failure is None

    @property
    def key_note(self) -> str | None:
        """Which key the signatures were checked against, and whether it was pinned."""
        if self.public_key is None:
            return None
        if self.key_pinned:
            return f"signatures checked against the pinned key {self.public_key}"
        return (
            f"signatures checked against the ledger's own genesis key {self.public_key}, "
            "not pinned: pass --public-key to pin it"
        )

    def summary(self) -> str:
        """One line: what holds, or the first thing that does not."""
        if self.first_bad is not None:
            return f"ledger {self.path}: FAILED at {self.first_bad}"
        if self.head_failure is not None:
            return f"ledger {self.path}: FAILED against its head: {self.head_failure}"
        if self.accountant_mismatch is not None:
            return f"ledger {self.path}: NOT VERIFIED: {self.accountant_mismatch}"
        heads = "".join(f", head seq {head['seq']} ({head['source']}) matched" for head in self.heads)
        checked = "chain, signatures, " if self.key_pinned else "chain intact, signatures not checked against a pinned key, "
        return (
            f"ledger {self.path}: OK: {self.entries_verified} entries by {self.writer!r}, {checked}"
            f"rules and {len(self.holder_ids)} holder spend(s) verified"
            + (f", {len(self.repairs)} repair(s)" if self.repairs else "")
            + heads
            + _audits_note(self.audits)
            + f" ({self.key_note})"
        )

    def to_json(self, figures: bool = True) -> dict[str, Any]:
        """The report as JSON; ``figures=False`` leaves out the spends and reservations (for a ledger that
        did not verify, whose figures must not be read as valid)."""
        report = {
            "path": self.path,
            "ok": self.ok,
            "summary": self.summary(),
            "writer": self.writer,
            "public_key": self.public_key,
            "public_key_pinned": self.key_pinned,
            "key_note": self.key_note,
            "entries_verified": self.entries_verified,
            "first_bad": None if self.first_bad is None else vars(self.first_bad),
            "torn_tail": self.torn_tail,
            "accountant_mismatch": self.accountant_mismatch,
            "heads": self.heads,
            "head_failure": self.head_failure,
            "repairs": self.repairs,
        }
        if figures:
            report["holders"] = {holder_id: spend.to_json() for holder_id, spend in self.holders.items()}
            report["reservations"] = self.reservations
            report["audits"] = self.audits
        else:
            report["figures_withheld"] = True
        return report


def verify_ledger(path: str | Path, public_keys: str | Mapping[str, str] | None = None, *,
                  expect_head: Head | str | None = None, head_path: str | Path | None = None) -> VerificationReport:
    """Verify the ledger at ``path``. ``public_keys`` pins the writer's key: one base64 key, or a mapping
    from writer id to key. ``expect_head`` (a :class:`Head` or ``SEQ:HASH``) and ``head_path`` (a head
    file, its signature checked under the pinned key, else the genesis key) are heads kept elsewhere that the
    ledger must contain. A file that is not a ledger at all, or an unreadable head file, raises
    ``InvalidInputError``; every other defect is reported in the result, naming the first bad entry."""
    path = Path(path)
    data = _read_file(path, "ledger")
    heads = [] if expect_head is None else [("expected", expect_head if isinstance(expect_head, Head) else Head.parse(expect_head))]
    head_bytes = None if head_path is None else _read_file(head_path, "head file")
    split = split_lines(data)
    report = VerificationReport(str(path))
    writer = _genesis_writer(path, split.lines)
    pinned = public_keys.get(writer) if isinstance(public_keys, Mapping) else public_keys
    report.key_pinned = pinned is not None
    chain, state = ChainChecker(pinned), LedgerState()
    if isinstance(public_keys, Mapping) and pinned is None:
        report.first_bad = BadEntry(chain.next_seq, 1, f"no pinned public key was given for the writer {writer!r}")
        hashes: list[str] = []
    else:
        hashes = _check_entries(report, split.lines, chain, state)
    if report.first_bad is None and split.torn_tail:
        _report_torn_tail(report, split, chain, state)
    if head_bytes is not None and report.public_key is not None:
        try:
            record = parse_head(head_bytes, pinned or report.public_key, head_path)
            heads.append((f"head file {head_path}", record.head))
        except InvalidInputError as error:
            report.head_failure = str(error)
    _check_heads(report, heads, hashes)
    report.holders = _spends(state)
    report.reservations = _reservations(state)
    return report


def _read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read {what} {path}: {error.strerror or error}") from None


def _check_entries(report: VerificationReport, lines: tuple[bytes, ...], chain: ChainChecker,
                   state: LedgerState) -> list[str]:
    """Check each complete line in turn (canonical form, chain, signature, rules, stated spends, repair offsets,
    audit statements), filling ``report`` up to the first bad entry; the hashes of the entries that passed."""
    hashes: list[str] = []
    offset = 0
    for number, line in enumerate(lines, start=1):
        seq = chain.next_seq  # the entry is named by the seq it should carry: its own may be the defect
        try:
            entry = parse_line(line)
            chain.check(entry)
            holder_id = state.apply(entry)
            view = entry_view(entry)  # the rules passed: a kind this release reads, and a payload object
            if number == 1:
                report.writer, report.public_key = state.writer, state.public_key
                report.accountant_mismatch = _accountant_mismatch(state.accountant)
            _check_repair_offset(view, offset)
            _check_statements(report, view, state, holder_id)
        except InvalidInputError as error:
            report.first_bad = BadEntry(seq, number, str(error))
            break
        if isinstance(view, RepairEntry):
            report.repairs.append(_repair_row(view, number))
        report.entries_verified += 1
        hashes.append(entry_hash(entry))
        offset += len(line) + 1
    return hashes


def _check_statements(report: VerificationReport, view: EntryView, state: LedgerState, holder_id: str | None) -> None:
    """Recompute what an entry states (its spend, an audit's lower bounds) unless the pinned accountant differs.
    An entry that changed a holder's spend (``holder_id``) is a reservation, a commit or an abort."""
    if report.accountant_mismatch is not None:
        return
    if isinstance(view, AuditEntry):
        report.audits.extend(federated_audit_statements(view, state))
    if holder_id is not None and _states_or_reserves(view):
        _check_spend(view, state.spend(holder_id))
        audit = audit_statement(view, state.spend(holder_id).budget_delta)
        if audit is not None:
            report.audits.append(audit)


def _repair_row(repair: RepairEntry, line: int) -> dict[str, Any]:
    """A repair as the report lists it: its seq and line, and what its entry states."""
    return {"seq": repair.seq, "line": line, "offset": repair.offset, "saved_as": repair.saved_as,
            "torn_bytes": repair.torn_bytes, "torn_sha256": repair.torn_sha256}


def _report_torn_tail(report: VerificationReport, split: SplitFile, chain: ChainChecker,
                      state: LedgerState) -> None:
    """Describe a torn last line (bytes after the last newline) and report it as the first bad entry."""
    torn_seq = chain.next_seq  # before _is_next_entry, whose passing check advances the chain
    report.torn_tail = {
        "line": len(split.lines) + 1,
        "offset": split.torn_offset,
        "bytes": len(split.torn_tail),
        "sha256": hashlib.sha256(split.torn_tail).hexdigest(),
        "complete_entry": _is_next_entry(split.torn_tail, chain, state),
    }
    what = (
        "a complete entry that lost its newline; opening the ledger for writing completes it"
        if report.torn_tail["complete_entry"]
        else "a crash mid-write; opening the ledger for writing saves it aside and cuts it"
    )
    report.first_bad = BadEntry(
        torn_seq,
        len(split.lines) + 1,
        f"torn last line: {len(split.torn_tail)} bytes without a newline ({what})",
    )


def _check_heads(report: VerificationReport, heads: list[tuple[str, Head]], hashes: list[str]) -> None:
    """Each head kept elsewhere must name an entry the ledger holds, with that hash (the first failure is kept)."""
    for source, head in heads:
        report.heads.append({"source": source, "seq": head.seq, "hash": head.hash})
        reason = head_mismatch(hashes, head) if report.public_key is not None else None
        if reason is not None and report.head_failure is None:
            report.head_failure = f"{reason} ({source} {head})"


def ledger_writer(path: str | Path) -> str | None:
    """The writer its genesis names (not verified); a file that is not a ledger raises ``InvalidInputError``."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read ledger {path}: {error.strerror or error}") from None
    return _genesis_writer(Path(path), split_lines(data).lines)


def verify_with_its_head(path: str | Path, public_keys: str | Mapping[str, str] | None = None) -> VerificationReport:
    """:func:`verify_ledger` with the head file beside the ledger (``LEDGER.head``) when there is one, as
    ``ewtune ledger verify`` checks by default; what ``ledger crosscheck`` and ``ledger report`` verify."""
    head = default_head_path(path)
    return verify_ledger(path, public_keys, head_path=head if head.is_file() else None)


def audit_statement(view: EntryView, delta: float) -> dict[str, Any] | None:
    """The lower bound of an audit run's commit (``extra.audit``, written by ``ewtune audit --ledger``) beside
    the certified epsilon of that commit's event alone, recomputed here (the stated lifetime epsilon is checked
    like any other); None for any other entry. A malformed statement raises ``InvalidInputError``."""
    if not isinstance(view, CommitEntry) or not view.states_audit:
        return None
    audit = view.audit
    check_audit_bound(audit, "extra.audit")
    bound, confidence, canaries = audit["epsilon_lower_bound"], audit["confidence"], audit["canaries"]
    certified = certified_epsilon(event_from_json(view.event), delta)
    return {
        "seq": view.seq,
        "epsilon_lower_bound": bound,
        "confidence": confidence,
        "canaries": canaries,
        "epsilon_certified_run": certified,
        "exceeds_certified": bound > certified,
    }


def federated_audit_statements(audit: AuditEntry, state: LedgerState) -> list[dict[str, Any]]:
    """The lower bounds of a federated audit entry (checked by the rules before), each beside the certified
    epsilon of what the coordinator committed for that holder in that run, recomputed here; the pooled bound beside
    the largest of them (each canary belongs to one holder, so the run is (max epsilon, delta)-DP for every canary)."""
    statements, largest = [], 0.0
    for holder_id, bound in audit.holders.items():
        events = state.run_events(holder_id, audit.run_id)
        certified = certified_epsilon(ComposedEvent(events), state.spend(holder_id).budget_delta) if events else 0.0
        largest = max(largest, certified)
        statements.append(_audit_row(audit.seq, bound, certified, holder=holder_id))
    statements.append(_audit_row(audit.seq, audit.pooled, largest, holder="pooled"))
    return statements


def _audit_row(seq: int, bound: Mapping[str, Any], certified: float, holder: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "holder": holder,
        "epsilon_lower_bound": bound["epsilon_lower_bound"],
        "confidence": bound["confidence"],
        "canaries": bound["canaries"],
        "epsilon_certified_run": certified,
        "exceeds_certified": bound["epsilon_lower_bound"] > certified,
    }


def _audits_note(audits: list[dict[str, Any]]) -> str:
    if not audits:
        return ""
    alarms = [str(audit["seq"]) for audit in audits if audit["exceeds_certified"]]
    if alarms:
        return f", {len(audits)} audit(s), AUDIT ALARM at seq {', '.join(alarms)}: lower bound above the certified epsilon"
    return f", {len(audits)} audit(s) with lower bound at most the certified epsilon"


def _is_next_entry(torn: bytes, chain: ChainChecker, state: LedgerState) -> bool:
    """Whether a torn tail is the complete next entry (rules, chain, signature), as :meth:`Ledger.open` tests
    it before completing it. Called last: a passing chain check advances ``chain``."""
    try:
        entry = parse_line(torn)
        state.prepare(entry)
        chain.check(entry)
    except InvalidInputError:
        return False
    return True


def _genesis_writer(path: Path, lines: tuple[bytes, ...]) -> str | None:
    """The writer named by genesis; a file whose first line is not a genesis entry is not a ledger."""
    if not lines:
        raise InvalidInputError(f"{path} is not a ledger: it holds no complete line")
    try:
        genesis = parse_line(lines[0])
    except InvalidInputError as error:
        raise InvalidInputError(f"{path} is not a ledger: line 1: {error}") from None
    try:
        view = entry_view(genesis)
    except InvalidInputError:
        view = None  # a kind this release does not read
    if not isinstance(view, GenesisEntry):
        raise InvalidInputError(f"{path} is not a ledger: line 1 is not a genesis entry")
    return view.writer


def _accountant_mismatch(pinned: Any) -> str | None:
    if canonical_json(pinned) == canonical_json(dict(certified_engine.CERTIFIED_ACCOUNTANT)):
        return None
    return (
        f"the ledger pins the accountant {canonical_json(pinned).decode()} but this release has "
        f"{canonical_json(dict(certified_engine.CERTIFIED_ACCOUNTANT)).decode()}: stated epsilons were not checked"
    )


def _check_repair_offset(view: EntryView, offset: int) -> None:
    """A repair entry is appended right where the torn bytes were cut: its own line starts at that offset."""
    if isinstance(view, RepairEntry) and view.offset != offset:
        raise InvalidInputError(f"the repair entry states offset {view.offset!r} but starts at byte {offset}")


def _states_or_reserves(view: ReserveEntry | CommitEntry | AbortEntry) -> bool:
    """Whether the spend an entry leads to needs recomputing: a reservation (checked against the budget) or
    an entry stating an epsilon."""
    return isinstance(view, ReserveEntry) or bool(view.stated)


def _check_spend(view: ReserveEntry | CommitEntry | AbortEntry, spend: HolderSpend) -> None:
    """Stated epsilons must equal the recomputed spend the entry leads to; a reservation must fit the budget."""
    if isinstance(view, ReserveEntry) and spend.epsilon_certified > spend.budget_epsilon * (1 + RELATIVE_TOLERANCE):
        raise InvalidInputError(
            f"the reservation takes holder {spend.holder_id!r} to certified epsilon "
            f"{spend.epsilon_certified!r} beyond its budget {spend.budget_epsilon!r}"
        )
    recomputed = {"epsilon_certified": spend.epsilon_certified, "epsilon_edgeworth": spend.epsilon_edgeworth}
    for name, stated in view.stated.items():
        actual = recomputed[name]
        if isinstance(stated, bool) or not isinstance(stated, (int, float)):
            raise InvalidInputError(f"{name} must be a number, got {stated!r}")
        if actual is None or not math.isclose(stated, actual, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12):
            raise InvalidInputError(
                f"{name} stated {stated!r} for holder {spend.holder_id!r}, recomputed from the events {actual!r}"
            )


def _spends(state: LedgerState) -> dict[str, HolderSpend]:
    spends = {}
    for holder_id in state.holders:
        try:
            spends[holder_id] = state.spend(holder_id)
        except InvalidInputError:
            continue  # an entry was refused for this reason already, or the accountant differs: reported
    return spends


def _reservations(state: LedgerState) -> list[dict[str, Any]]:
    """One row per reservation: planned and executed mechanisms, and whether it is open, committed or aborted."""
    rows = []
    for seq, reservation in state.reservations.items():
        closed_by = state.closed.get(seq)
        executed = state.holders[reservation.holder_id].committed.get(closed_by)
        status = "open" if closed_by is None else ("committed" if executed is not None else "aborted")
        rows.append({
            "seq": seq,
            "holder": reservation.holder_id,
            "run_id": reservation.run_id,
            "round": reservation.round,
            "status": status,
            "closed_by": closed_by,
            "planned": mechanism_rows(reservation.event),
            "executed": None if executed is None else mechanism_rows(executed),
        })
    return rows

