"""What ``ewtune ledger report`` shows, as data: each ledger verified, each holder's epsilon round by round
under every accountant, its budget, every entry, the receipts cross-check, and the accuracy by round.

Figures come only from ledgers that verify (:func:`ewtune.accountant.verify.verify_ledger`); a ledger that fails
is listed with its failure and its figures are withheld, as ``ewtune ledger show`` withholds them.

A holder's curve has one point per committed round, in ledger order: the composition of every event
committed so far (steps actually run; open reservations are counted in the recorded spend, not in the
curve), accounted by each accountant of :func:`ewtune.accountant.accountants.standard_accountants`. The certified
epsilon is the guarantee; the Edgeworth values are estimates, RDP and the Edgeworth bound are looser bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ewtune.accountant.accountants import standard_accountants
from ewtune.accountant.crosscheck import cross_check_ledgers
from ewtune.accountant.entries import COMMIT, RESERVE, CommitEntry, ReserveEntry
from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.events import ComposedEvent, event_from_json
from ewtune.accountant.ledger_lines import parse_line, split_lines
from ewtune.accountant.privacy_accountant import PrivacyAccountant
from ewtune.accountant.spend import LedgerState, mechanism_rows
from ewtune.accountant.verify import VerificationReport, ledger_writer, verify_with_its_head
from ewtune.report.accuracy_records import read_accuracy


VERIFIED = "verified"
UNPINNED = "chain intact, signatures not checked against a pinned key"
FAILED = "FAILED"


def ledger_verdict(report: VerificationReport) -> str:
    """A ledger's verdict in the report's words (see :attr:`AuditReport.verdict`)."""
    if not report.ok:
        return FAILED
    return VERIFIED if report.key_pinned else UNPINNED


@dataclass
class HolderCurve:
    """One holder's epsilon after each committed round: ``points[k]`` is the state after commit k+1."""

    ledger: str
    writer: str  # whose ledger: the holder's own, or the coordinator's record of it
    holder_id: str
    budget_epsilon: float
    budget_delta: float
    epsilon_certified: float  # recorded spend (committed and open reservations), the guarantee
    epsilon_edgeworth: float | None
    budget_left_epsilon: float
    labels: list[str] = field(default_factory=list)  # "run:round" of each point
    epsilons: dict[str, list[float | None]] = field(default_factory=dict)  # accountant name -> one value per point
    accountant_labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger, "writer": self.writer, "holder": self.holder_id, "budget_epsilon": self.budget_epsilon,
            "budget_delta": self.budget_delta, "epsilon_certified": self.epsilon_certified,
            "epsilon_edgeworth_estimate": self.epsilon_edgeworth, "budget_left_epsilon": self.budget_left_epsilon,
            "rounds": self.labels, "epsilon_by_accountant": self.epsilons,
        }  # fmt: skip


@dataclass
class AuditReport:
    ledgers: list[VerificationReport]
    curves: list[HolderCurve]
    entries: dict[str, list[dict[str, Any]]]  # ledger path -> one row per verified entry
    receipts: dict[str, Any]  # the cross-check of coordinator commits and receipt hashes, or why none ran
    accuracy: list[dict[str, Any]]  # series: {"name", "rounds", "values", "baseline"}

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.ledgers) and self.receipts.get("ok", True)

    @property
    def verdict(self) -> str:
        """"verified" only when every ledger verified against a pinned key (its signatures then prove who wrote
        it); a ledger that verified against its own genesis key alone is "chain intact", not verified."""
        if not self.ok:
            return FAILED
        return VERIFIED if all(report.key_pinned for report in self.ledgers) else UNPINNED

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "ledgers": [report.to_json(figures=report.ok) for report in self.ledgers],
            "holders": [curve.to_json() for curve in self.curves],
            "entries": self.entries,
            "receipts": self.receipts,
            "accuracy": self.accuracy,
        }


def build_report(paths: Sequence[str | Path], accuracy_path: str | Path | None = None,
                 public_key: str | None = None) -> AuditReport:
    """Verify every ledger in ``paths`` and gather the report's figures (see the module docstring).
    ``public_key`` pins the coordinator's ledger (the one that registers holders), or the only ledger given."""
    if len({str(Path(p).resolve()) for p in paths}) != len(paths):
        raise InvalidInputError("a ledger is given twice")
    by_path, receipts = _verify_and_cross_check([str(p) for p in paths], public_key)
    reports = [by_path[str(path)] for path in paths]
    verified = {
        str(path): _verified_entries(path, report.entries_verified) for path, report in zip(paths, reports) if report.ok
    }
    accountants = standard_accountants()  # shared by every ledger: a coordinator's and a holder's record the same
    curves = [curve for path, entries in verified.items() for curve in holder_curves(path, entries, accountants)]
    rows = {path: [entry_row(entry) for entry in entries] for path, entries in verified.items()}
    accuracy = [] if accuracy_path is None else read_accuracy(accuracy_path)
    return AuditReport(reports, curves, rows, receipts, accuracy)


def holder_curves(
    path: str, entries: Sequence[Mapping[str, Any]], accountants: Sequence[PrivacyAccountant]
) -> list[HolderCurve]:
    """The epsilon of each holder of one verified ledger after each of its committed rounds, by each of
    ``accountants``. A coordinator's own (writer) account, which spends nothing while holders are
    registered, has no curve."""
    state, reserved = LedgerState(), {}
    points: dict[str, list[tuple[str, ComposedEvent]]] = {}
    for entry in entries:
        state.apply(entry)
        if entry["kind"] == RESERVE:
            reservation = ReserveEntry.of(entry)
            reserved[reservation.seq] = f"{reservation.run_id}:{reservation.round}"
        elif entry["kind"] == COMMIT:
            commit = CommitEntry.of(entry)
            holder_id = next(h for h, account in state.holders.items() if commit.seq in account.committed)
            events = tuple(state.holders[holder_id].committed.values())
            points.setdefault(holder_id, []).append((reserved[commit.reservation], ComposedEvent(events)))
    curves = []
    for holder_id, account in state.holders.items():
        if holder_id not in points and holder_id == state.writer and len(state.holders) > 1:
            continue
        spend = state.spend(holder_id)
        curve = HolderCurve(
            path, state.writer, holder_id, account.budget_epsilon, account.budget_delta, spend.epsilon_certified,
            spend.epsilon_edgeworth, spend.budget_left_epsilon,
        )  # fmt: skip
        for label, event in points.get(holder_id, []):
            curve.labels.append(label)
            for accountant in accountants:
                curve.accountant_labels[accountant.name] = accountant.label
                curve.epsilons.setdefault(accountant.name, []).append(_epsilon(accountant, event, account.budget_delta))
        curves.append(curve)
    return curves


def entry_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One verified entry as a table row: what it is, for whom, and the epsilons it states."""
    payload = entry["payload"]
    event = payload.get("event")
    steps = None if event is None else mechanism_rows(event_from_json(event))
    return {
        "seq": entry["seq"],
        "time": entry.get("time"),
        "kind": entry["kind"],
        "holder": payload.get("holder", entry["writer"] if entry["kind"] == "genesis" else None),
        "run_id": payload.get("run_id"),
        "round": payload.get("round"),
        "reservation": payload.get("reservation"),
        "mechanisms": steps,
        "epsilon_certified": payload.get("epsilon_certified"),
        "epsilon_edgeworth": payload.get("epsilon_edgeworth"),
        "note": payload.get("reason") or payload.get("receipt_sha256") or payload.get("extra", {}).get("receipt_sha256"),
    }


def _verify_and_cross_check(paths: list[str], public_key: str | None) -> tuple[dict[str, VerificationReport], dict[str, Any]]:
    """Each ledger's verification (path -> report) and the receipts cross-check. Given one coordinator's ledger
    (the one that registers holders) beside holders' ledgers, both are :func:`ewtune.accountant.crosscheck.cross_check_ledgers`,
    exactly as ``ewtune ledger crosscheck COORDINATOR HOLDER=LEDGER...`` computes them: each holder's ledger pinned
    to the key the coordinator registered for it, every holder ledger given taken into the cross-check (one that
    fails its own verification fails the receipts too)."""
    coordinators = [path for path in paths if _registers_holders(path)]
    if len(coordinators) == 1 and len(paths) > 1:
        holders = _holder_ledgers([path for path in paths if path != coordinators[0]])
        result = cross_check_ledgers(coordinators[0], holders, public_key)
        by_path = {coordinators[0]: result.reports["coordinator"]}
        by_path.update({path: result.reports[holder_id] for holder_id, path in holders.items()})
        return by_path, {"checked": True, **result.to_json()}
    if public_key is not None and len(paths) > 1:
        raise InvalidInputError("--public-key pins the coordinator's ledger (the one that registers holders) or the "
                                f"only ledger given; {len(coordinators)} coordinator ledgers are among the {len(paths)} given")
    why = ("no coordinator ledger given" if not coordinators else "more than one coordinator ledger given"
           if len(coordinators) > 1 else "no holder ledger given beside the coordinator's")
    return {path: verify_with_its_head(path, public_key) for path in paths}, {"checked": False, "why": why}


def _registers_holders(path: str) -> bool:
    """Whether any readable line of the ledger at ``path`` (verified or not) registers a holder: a coordinator's."""
    try:
        lines = split_lines(Path(path).read_bytes()).lines
    except OSError:
        return False  # its verification names the failure
    for line in lines:
        try:
            if parse_line(line)["kind"] == "holder":
                return True
        except (InvalidInputError, KeyError, TypeError):
            continue
    return False


def _holder_ledgers(paths: list[str]) -> dict[str, str]:
    """Holder id (the writer its genesis names) -> ledger path; two ledgers of one writer are refused."""
    holders: dict[str, str] = {}
    for path in paths:
        writer = ledger_writer(path)
        if writer in holders:
            raise InvalidInputError(f"{holders[writer]} and {path} are both ledgers of {writer!r}")
        holders[writer] = path
    return holders


def _verified_entries(path, count: int) -> list[dict[str, Any]]:
    return [parse_line(line) for line in split_lines(Path(path).read_bytes()).lines[:count]]


def _epsilon(accountant: PrivacyAccountant, event: ComposedEvent, delta: float) -> float | None:
    """``accountant``'s epsilon for ``event``, or None where it refuses it or certifies nothing."""
    try:
        value = accountant.epsilon_of(event, delta)
    except EwtuneError:
        return None
    return float(value) if value is not None and math.isfinite(value) else None

