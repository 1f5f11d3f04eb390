"""Crash recovery of the agent daemon: a progress journal, and the reconciliation of open reservations at start.

Between a reservation and its commit the ledger alone cannot tell what happened: the daemon may have died
before the first step (nothing ran), after some steps (their privacy is spent, though nothing left), or
after signing the receipt. Left open, a reservation counts as spent in full forever; aborted blindly, it would
let anyone who can kill the daemon mid-round (on purpose, to reset its spend) run steps that are never charged.
So the daemon keeps a journal beside its ledger (``<ledger>.progress``, JSON Lines, mode 0600), each line
fsynced before the call returns, in this order:

1. ``begin`` with the seq the reservation will take, written *before* the reservation is appended;
2. ``step`` k, written before step k may run (a DP-SGD step, or the noised confusion matrix of a private
   evaluation): a step that ran is always recorded, a recorded step is charged whether it ran or not;
3. ``receipt``, the signed receipt document, written before the commit; the update leaves only after the
   commit, so a crash before it releases nothing.

At start, :func:`reconcile` closes each of the holder's open reservations from what the journal proves:

- a signed receipt of that reservation (its signature checked with the holder's key): commit its event;
- k >= 1 steps recorded: commit k steps of the reserved mechanism, marked ``released: false``;
- ``begin`` and no step: abort; every step is recorded before it runs, so provably none ran;
- no ``begin`` (the journal is missing, cut, or older than the reservation): commit the reserved event in
  full, marked ``released: false``: what the journal cannot prove is charged.

The journal holds at most one reservation (the daemon serves one request at a time) and is emptied once its
reservation is closed in the ledger.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent, mechanisms
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_files import FILE_MODE
from ewtune.accountant.receipts import receipt_digest, verify_receipt
from ewtune.accountant.signing import canonical_json
from ewtune.accountant.spend import Reservation

log = logging.getLogger(__name__)


def journal_path(ledger_path: str | os.PathLike) -> Path:
    """``<ledger path>.progress``: beside the ledger, in the daemon's own state directory."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ".progress")


@dataclass(frozen=True)
class Progress:
    """What the journal proves about one reservation: ``steps`` that may have run, and the signed receipt."""

    reservation: int
    steps: int = 0
    receipt: Mapping[str, Any] | None = None


class ProgressJournal:
    """The append-only, fsynced progress record of the reservation in flight."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        os.fchmod(self._fd, FILE_MODE)

    def begin(self, reservation: int) -> None:
        self._write({"kind": "begin", "reservation": reservation})

    def step(self, reservation: int, step: int) -> None:
        self._write({"kind": "step", "reservation": reservation, "step": step})

    def receipt(self, reservation: int, document: Mapping[str, Any]) -> None:
        self._write({"kind": "receipt", "reservation": reservation, "document": dict(document)})

    def progress(self) -> Progress | None:
        """The reservation the journal last began, with its recorded steps and receipt (None: no ``begin``)."""
        return read_progress(self.path)

    def finish(self, ledger: Ledger) -> None:
        """Empty the journal once no reservation it covers is open in ``ledger`` any more."""
        current = self.progress()
        if current is not None and current.reservation in ledger.open_reservations():
            return
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write(self, record: Mapping[str, Any]) -> None:
        line = canonical_json(record) + b"\n"
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as error:
            raise EwtuneError(f"cannot write the progress journal {self.path}: {error.strerror or error}") from None


def read_progress(path: str | os.PathLike) -> Progress | None:
    """The last ``begin`` of the journal at ``path`` and what followed it. A torn last line (a crash while it
    was written, before the step it announced could start) is ignored; a missing file proves nothing."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise InvalidInputError(f"cannot read the progress journal {path}: {error.strerror or error}") from None
    current: Progress | None = None
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline is torn
        try:
            record = json.loads(line)
            kind, reservation = record["kind"], record["reservation"]
        except (ValueError, KeyError, TypeError):
            raise InvalidInputError(f"progress journal {path}: line {number} is not a journal record") from None
        if kind == "begin":
            current = Progress(reservation)
        elif current is None or reservation != current.reservation:
            continue
        elif kind == "step":
            current = Progress(reservation, max(current.steps, int(record["step"])), current.receipt)
        elif kind == "receipt":
            current = Progress(reservation, current.steps, record["document"])
    return current


@dataclass(frozen=True)
class Outcome:
    """How one open reservation was closed at start: ``action`` is ``commit`` or ``abort``."""

    reservation: int
    action: str
    steps: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"reservation": self.reservation, "action": self.action, "steps": self.steps, "reason": self.reason}


def reconcile(ledger: Ledger, holder_id: str, journal_file: str | os.PathLike,
              release_facts: Mapping[str, Any]) -> list[Outcome]:
    """Close every open reservation of ``holder_id`` in ``ledger`` as the journal proves (module docstring).
    ``release_facts`` (randomness, public metadata) go into a commit made from a signed receipt."""
    progress = read_progress(journal_file)
    outcomes = []
    for seq, reservation in sorted(ledger.open_reservations(holder_id).items()):
        known = progress if progress is not None and progress.reservation == seq else None
        outcome = _close(ledger, reservation, known, release_facts)
        log.warning("open reservation %d (run %s, round %d) from a crash: %s, %d step(s) charged: %s",
                    seq, reservation.run_id, reservation.round, outcome.action, outcome.steps, outcome.reason)
        outcomes.append(outcome)
    return outcomes


def _close(ledger: Ledger, reservation: Reservation, progress: Progress | None,
           release_facts: Mapping[str, Any]) -> Outcome:
    seq, planned = reservation.seq, reservation.event
    if progress is None:
        reason = "no progress record covers it: charged in full"
        ledger.commit(seq, planned, extra={"released": False, "recovered": reason})
        return Outcome(seq, "commit", _steps(planned), reason)
    receipt = _receipt_event(progress, reservation, ledger.public_key_text)
    if receipt is not None:
        reason = "its receipt was signed before the crash"
        extra = {"receipt_sha256": receipt_digest(progress.receipt), **release_facts, "recovered": reason}
        ledger.commit(seq, receipt, extra=extra)
        return Outcome(seq, "commit", _steps(receipt), reason)
    if progress.steps == 0:
        reason = "no step ran and nothing was released"
        ledger.abort(seq, f"recovered after a crash: {reason}")
        return Outcome(seq, "abort", 0, reason)
    steps = min(progress.steps, _steps(planned))
    reason = f"{steps} step(s) may have run; nothing was released"
    ledger.commit(seq, _first_steps(planned, steps), extra={"released": False, "recovered": reason})
    return Outcome(seq, "commit", steps, reason)


def _receipt_event(progress: Progress, reservation: Reservation, public_key_text: str):
    """The executed event of the journal's receipt when it is this reservation's, signed by the holder."""
    if progress.receipt is None:
        return None
    try:
        receipt = verify_receipt(progress.receipt, public_key_text)
    except InvalidInputError as bad:
        log.error("reservation %d: the journal's receipt is not valid (%s); ignored", reservation.seq, bad)
        return None
    if (receipt.run_id, receipt.round, receipt.holder_id) != (reservation.run_id, reservation.round, reservation.holder_id):
        log.error("reservation %d: the journal's receipt is for another round; ignored", reservation.seq)
        return None
    return receipt.event


def _steps(event) -> int:
    return sum(mechanisms(event).values())


def _first_steps(planned, steps: int):
    """The first ``steps`` steps of the reserved event; a reservation of several mechanisms (the daemon
    reserves one) cannot be cut step by step, so it is charged in full."""
    planned_mechanisms = mechanisms(planned)
    if len(planned_mechanisms) != 1:
        return planned
    (rate, sigma, relation), _ = next(iter(planned_mechanisms.items()))
    return PoissonGaussianEvent(rate, sigma, steps, relation)
