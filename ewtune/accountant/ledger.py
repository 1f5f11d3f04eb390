"""The privacy ledger: append-only JSON Lines, hash-chained with SHA-256 and signed with Ed25519.

Kinds (a kind is never removed and its meaning never changes, so that an old ledger always reads the same):
genesis (writer, public key, budget policy, the pinned certified accountant, schema), holder (a coordinator
registers a holder's id, public key and budget), reserve (a planned event for a holder, run and round),
commit (the event actually executed for a reservation: its steps may be fewer, never more), abort (a
reservation released nothing), repair (a torn last line left by a crash was cut off; its length and hash),
audit (a federated audit run's empirical lower bounds on epsilon, per holder and pooled; no spend).
The writer is itself a holder with the genesis budget; a holder's own ledger has no other.

The line format, entry hashes and the chain check: :mod:`ewtune.accountant.ledger_lines`. Durability (O_APPEND,
fsync, the writer lock, torn tails): :mod:`ewtune.accountant.ledger_files`. Rollback, and the head file that
anchors the last entry outside the ledger: :mod:`ewtune.accountant.ledger_head`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.events import DpEvent, event_to_json
from ewtune.accountant.ledger_files import FILE_MODE, fsync_directory, lock_writer, read_all, write_all
from ewtune.accountant.ledger_head import (
    Head,
    default_head_path,
    head_document,
    head_mismatch,
    read_head,
    write_head,
)
from ewtune.accountant.ledger_lines import (
    ChainChecker,
    SplitFile,
    entry_hash,
    format_time,
    parse_line,
    signed_bytes,
    split_lines,
)
from ewtune.accountant.ledger_payloads import (
    STATED_EPSILONS,
    Policy,
    as_float,
    check_event,
    stated_epsilons,
)
from ewtune.accountant.signing import SigningKey, canonical_json
from ewtune.accountant.spend import LEDGER_SCHEMA, HolderSpend, LedgerState, Reservation

log = logging.getLogger(__name__)


def _serialised(method):
    """Run a writing method under the ledger's thread lock: seq, prev and the pre-flight must not interleave."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Ledger:
    """A ledger open for appending by its writer (the holder of the genesis key).

    Use :meth:`create` or :meth:`open`; close it (or use ``with``) to release the writer lock. The head file
    (``head_path``, default ``<path>.head``) anchors the last entry outside the ledger file; see
    :mod:`ewtune.accountant.ledger_head` for why, and :meth:`anchor` for an operator who moved a ledger on purpose.
    """

    def __init__(self, path: Path, key: SigningKey, fd: int, head_path: Path | None = None) -> None:
        self._path, self._key, self._fd = path, key, fd
        self._head_path = default_head_path(path) if head_path is None else Path(head_path)
        self._chain = ChainChecker()
        self._state = LedgerState()
        self._entries: list[dict[str, Any]] = []
        self._broken: str | None = None
        self._lock = threading.RLock()  # one append at a time within the process (flock covers other processes)
        self.repair: dict[str, Any] | None = None  # the repair entry written when this open cut a torn tail
        self.completed_tail: dict[str, Any] | None = None  # the entry whose lost newline this open restored

    # -- opening -----------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, key: SigningKey, writer_id: str,
               policy: Policy | Mapping[str, Any], head_path: str | os.PathLike | None = None) -> "Ledger":
        """A new ledger holding only its genesis entry, and its head file. An existing ledger is never
        overwritten, and an existing head file refuses the creation too: it anchors a ledger that was
        there (deleting a ledger must not hand its writer a fresh budget)."""
        # scipy, mpmath: +0.5 s for every module that imports the ledger, most only to read or append to one
        from ewtune.accountant.certified import CERTIFIED_ACCOUNTANT

        path = Path(path)
        head_path = default_head_path(path) if head_path is None else Path(head_path)
        policy = Policy.coerce(policy)
        if os.path.lexists(path):
            raise InvalidInputError(f"refusing to overwrite the existing ledger {path}")
        if os.path.lexists(head_path):
            raise InvalidInputError(
                f"refusing to create ledger {path}: the head file {head_path} exists, so a ledger was "
                "written there before (restore it, or move the head away if that ledger is truly retired)"
            )
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            raise InvalidInputError(f"refusing to overwrite the existing ledger {path}") from None
        except OSError as error:
            raise InvalidInputError(f"cannot create ledger {path}: {error.strerror or error}") from None
        ledger = cls(path, key, fd, head_path)
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have narrowed it further, never widened: make it exact
            lock_writer(fd, path)
            genesis = {
                "writer": writer_id,
                "public_key": key.public_key_text,
                "policy": policy.to_json(),
                "accountant": dict(CERTIFIED_ACCOUNTANT),
                "estimate": {"name": "edgeworth", "order": 1},
                "schema": LEDGER_SCHEMA,
            }
            ledger._append(ledger._new_entry("genesis", genesis, writer=writer_id), update_head=False)
            fsync_directory(path)  # the ledger's name is durable before a head can point at it
            ledger._write_head(replace=False)
        except BaseException:
            ledger.close()
            path.unlink()  # nothing was acknowledged: a half-made ledger must not block a retry
            raise
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike, key: SigningKey, head_path: str | os.PathLike | None = None) -> "Ledger":
        """Open an existing ledger for appending. Every entry is checked (chain, signatures, rules) and
        ``key`` must be the genesis key. The head file must exist, be signed by that key, and anchor an
        entry the ledger holds, with that hash: otherwise the ledger was rolled back, truncated or replaced
        by another copy, and opening it would let its writer spend again what it already spent. A torn
        last line that is a complete, valid next entry is completed with its newline; any other is saved
        to ``PATH.torn-<time>``, cut off, and the cut recorded as a signed repair entry (``self.repair``).
        All these checks come before the first write, so a refused ledger is left exactly as it was."""
        return cls._open(Path(path), key, head_path, anchor=False)

    @classmethod
    def anchor(cls, path: str | os.PathLike, key: SigningKey, head_path: str | os.PathLike | None = None) -> Head:
        """Write a head file for the ledger as it is now, accepting its current state as the truth: the
        escape hatch for an operator who moved a ledger (or upgrades one written before head files). Only
        when no head file exists: an existing head is evidence and is never overwritten. Logged."""
        with cls._open(Path(path), key, head_path, anchor=True) as ledger:
            return ledger.head

    @classmethod
    def _open(cls, path: Path, key: SigningKey, head_path: str | os.PathLike | None, anchor: bool) -> "Ledger":
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except OSError as error:
            raise InvalidInputError(f"cannot open ledger {path}: {error.strerror or error}") from None
        ledger = cls(path, key, fd, head_path)
        try:
            lock_writer(fd, path)
            split = split_lines(read_all(fd))
            ledger._load(split.lines)
            tail = ledger._tail_entry(split.torn_tail) if split.torn_tail else None
            if anchor:
                ledger._refuse_existing_head()
                anchored = None
            else:
                anchored = ledger._check_head([*ledger._entries, *([tail[0]] if tail else [])])
            if tail is not None:
                ledger._complete_tail(*tail)
            elif split.torn_tail:
                ledger._repair(split)
            if anchor:
                ledger._write_head(replace=False)
                log.warning("ledger %s: head %s written to %s by `ewtune ledger anchor`, accepting the "
                            "ledger's current state as the truth", path, ledger.head, ledger._head_path)
            elif ledger.head != anchored:
                ledger._write_head()  # a crash came between an fsynced append and its head update
                log.info("ledger %s: head brought forward from seq %d to %d", path, anchored.seq, ledger.head.seq)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def _load(self, lines: tuple[bytes, ...]) -> None:
        if not lines:
            raise InvalidInputError(f"{self._path} holds no complete genesis entry")
        for number, line in enumerate(lines, start=1):
            try:
                entry = parse_line(line)
                self._chain.check(entry)
                self._state.apply(entry)
            except InvalidInputError as error:
                raise InvalidInputError(
                    f"cannot write to {self._path}: line {number} is bad ({error}); "
                    "run `ewtune ledger verify` on it"
                ) from None
            self._entries.append(entry)
        if self._chain.public_key != self._key.public_key_text:
            raise InvalidInputError(f"this signing key is not the writer key of {self._path}")

    def _tail_entry(self, torn: bytes):
        """The torn tail as ``(entry, change)`` when it is the complete next entry that lost only its
        newline (canonical JSON, the rules, chain and writer signature all hold), else None. The rules are
        checked before the chain, because a successful chain check advances the checker."""
        try:
            entry = parse_line(torn)
            change = self._state.prepare(entry)
            self._chain.check(entry)
        except InvalidInputError:
            return None
        return entry, change

    def _complete_tail(self, entry: dict[str, Any], change) -> None:
        """Restore the newline of a complete last entry: it was signed and fully written, and may already
        have been acknowledged (a reservation the caller relies on), so cutting it would lose it."""
        try:
            write_all(self._fd, b"\n")
            os.fsync(self._fd)
        except OSError as error:
            raise EwtuneError(f"cannot complete the last line of ledger {self._path}: {error.strerror or error}") from None
        change()
        self._entries.append(entry)
        self.completed_tail = entry

    def _check_head(self, entries: list[dict[str, Any]]) -> Head:
        """The anchored head, once checked against ``entries`` (those loaded, and a completable tail)."""
        path, head_path = self._path, self._head_path
        if not os.path.lexists(head_path):
            raise InvalidInputError(
                f"refusing to open ledger {path}: its head file {head_path} is missing, so the ledger may have "
                f"been restored from an older copy or moved; if you moved it on purpose, run `ewtune ledger "
                f"anchor {path} --key KEY --head {head_path}` to accept its current state as the truth"
            )
        record = read_head(head_path, self._chain.public_key)
        if record.ledger != path.name:
            raise InvalidInputError(
                f"refusing to open ledger {path}: its head file {head_path} anchors the ledger {record.ledger!r}"
            )
        reason = head_mismatch([entry_hash(entry) for entry in entries], record.head)
        if reason is not None:
            raise InvalidInputError(f"refusing to open ledger {path}: {reason} (head file {head_path})")
        return record.head

    def _refuse_existing_head(self) -> None:
        if os.path.lexists(self._head_path):
            raise InvalidInputError(
                f"refusing to anchor ledger {self._path}: the head file {self._head_path} exists and is never "
                "overwritten (open the ledger normally; remove that head by hand only if you are certain it is stale)"
            )

    def _write_head(self, replace: bool = True) -> None:
        document = head_document(self._path.name, self._state.writer, self.head, self._key)
        try:
            write_head(self._head_path, document, replace=replace)
        except FileExistsError:
            raise InvalidInputError(f"refusing to overwrite the existing head file {self._head_path}") from None
        except OSError as error:
            self._broken = f"head file {self._head_path}: {error.strerror or error}"
            raise EwtuneError(
                f"entry {self.head.seq} is written to ledger {self._path} but its head file {self._head_path} "
                f"could not be updated ({error.strerror or error}); reopen the ledger to bring the head forward"
            ) from None

    def _repair(self, split: SplitFile) -> None:
        torn = split.torn_tail
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        saved = self._path.with_name(f"{self._path.name}.torn-{stamp}")
        fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_directory(saved)
        os.ftruncate(self._fd, split.torn_offset)
        os.fsync(self._fd)
        payload = {
            "torn_bytes": len(torn),
            "torn_sha256": hashlib.sha256(torn).hexdigest(),
            "offset": split.torn_offset,
            "saved_as": saved.name,
        }
        self._append(self._new_entry("repair", payload), update_head=False)  # the open writes the head
        self.repair = self._entries[-1]

    # -- reading -----------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def head_path(self) -> Path:
        return self._head_path

    @property
    def head(self) -> Head:
        """Seq and entry hash of the last entry: what the head file anchors, and what a holder or the
        coordinator can keep to check a copy of this ledger later (``ewtune ledger verify --expect-head``)."""
        return Head(self._entries[-1]["seq"], self._chain.last_hash)

    @property
    def writer_id(self) -> str:
        return self._state.writer

    @property
    def public_key_text(self) -> str:
        return self._key.public_key_text

    @property
    def entries(self) -> tuple[dict[str, Any], ...]:
        return tuple(self._entries)

    def spend(self, holder_id: str) -> HolderSpend:
        if holder_id not in self._state.holders:
            raise InvalidInputError(f"unknown holder {holder_id!r}")
        return self._state.spend(holder_id)

    def spend_with(self, holder_id: str, event: DpEvent) -> HolderSpend:
        """The spend ``holder_id`` would have with ``event`` reserved too (a pre-flight that writes nothing)."""
        check_event(event)
        account = self._state.holders.get(holder_id)
        if account is None:
            raise InvalidInputError(f"unknown holder {holder_id!r}")
        return account.spend(open_={**account.open, len(self._entries): event})

    def open_reservations(self, holder_id: str | None = None) -> dict[int, Reservation]:
        return {
            seq: reservation
            for seq, reservation in self._state.reservations.items()
            if seq not in self._state.closed and holder_id in (None, reservation.holder_id)
        }

    # -- writing -----------------------------------------------------------------------------------------

    @_serialised
    def register_holder(self, holder_id: str, public_key_text: str, budget_epsilon: float,
                        budget_delta: float) -> int:
        """Register a holder (coordinator ledgers) with its signing key and its own budget."""
        payload = {
            "holder": holder_id,
            "public_key": public_key_text,
            "budget_epsilon": as_float(budget_epsilon),
            "budget_delta": as_float(budget_delta),
        }
        return self._append(self._new_entry("holder", payload))

    @_serialised
    def reserve(self, holder_id: str, run_id: str, round: int, event: DpEvent) -> int:
        """Reserve ``event`` for a holder's round; refused when the holder's certified epsilon over its
        committed events, open reservations and this one, composed, would exceed its budget."""
        check_event(event)
        payload = {"holder": holder_id, "run_id": run_id, "round": round, "event": event_to_json(event)}
        entry = self._new_entry("reserve", payload)
        change = self._state.prepare(entry)
        spend = self.spend_with(holder_id, event)
        if not spend.within_budget:
            raise InvalidInputError(
                f"reservation refused: holder {holder_id!r} would reach certified epsilon "
                f"{spend.epsilon_certified:.6g} > budget {spend.budget_epsilon:g} (delta {spend.budget_delta:g})"
            )
        payload.update(stated_epsilons(spend))
        return self._append(entry, change)

    @_serialised
    def commit(self, reservation_seq: int, event: DpEvent, extra: Mapping[str, Any] | None = None) -> int:
        """Close a reservation with the event actually executed (its steps may be fewer than reserved,
        never more). ``extra`` may hold ``receipt_sha256`` and any other JSON facts worth keeping."""
        check_event(event)
        reservation = self._state.open_reservation(reservation_seq)
        payload: dict[str, Any] = {"reservation": reservation_seq, "event": event_to_json(event)}
        extra = dict(extra or {})
        if STATED_EPSILONS[0] in extra or STATED_EPSILONS[1] in extra:
            raise InvalidInputError("the ledger states epsilons itself; do not pass them in extra")
        if "receipt_sha256" in extra:
            payload["receipt_sha256"] = extra.pop("receipt_sha256")
        if extra:
            payload["extra"] = extra
        entry = self._new_entry("commit", payload)
        change = self._state.prepare(entry)
        account = self._state.holders[reservation.holder_id]
        still_open = {seq: planned for seq, planned in account.open.items() if seq != reservation_seq}
        payload.update(stated_epsilons(account.spend(committed=(event,), open_=still_open)))
        return self._append(entry, change)

    @_serialised
    def record_audit(self, run_id: str, holders: Mapping[str, Mapping[str, Any]], pooled: Mapping[str, Any],
                     facts: Mapping[str, Any] | None = None) -> int:
        """Record a federated audit of run ``run_id``: each holder's lower bound on epsilon and the pooled one
        (each a JSON object with ``epsilon_lower_bound``, ``confidence``, ``canaries``), and ``facts`` about how
        it was measured. A verifier states each beside the certified epsilon of the holder's commits in that run."""
        payload = {**dict(facts or {}), "run_id": run_id, "holders": {h: dict(b) for h, b in holders.items()}, "pooled": dict(pooled)}
        entry = self._new_entry("audit", payload)
        return self._append(entry, self._state.prepare(entry))

    @_serialised
    def abort(self, reservation_seq: int, reason: str) -> int:
        """Close a reservation that released nothing (the update never left the holder)."""
        return self._append(self._new_entry("abort", {"reservation": reservation_seq, "reason": reason}))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _new_entry(self, kind: str, payload: dict[str, Any], writer: str | None = None) -> dict[str, Any]:
        now = format_time(datetime.now(timezone.utc))
        last = self._entries[-1]["time"] if self._entries else now
        return {
            "seq": len(self._entries),
            "time": max(now, last),  # fixed-width UTC text: string order is time order
            "kind": kind,
            "writer": writer or self._state.writer,
            "payload": payload,
            "prev": self._chain.last_hash,
        }

    def _append(self, entry: dict[str, Any], change=None, update_head: bool = True) -> int:
        """Sign, write and fsync one line, then (``update_head``) anchor it in the head file. The head is
        written only after the line is durable, so the head never anchors an entry the file may lack."""
        if self._fd < 0:
            raise InvalidInputError(f"ledger {self._path} is closed")
        if self._broken:
            raise EwtuneError(f"ledger {self._path} is unusable after a failed write ({self._broken}); reopen it")
        change = change or self._state.prepare(entry)
        entry["signature"] = self._key.sign(signed_bytes(entry))
        line = canonical_json(entry) + b"\n"
        self._chain.check(entry)
        try:
            write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as error:
            self._broken = error.strerror or str(error)
            raise EwtuneError(f"cannot append to ledger {self._path}: {self._broken}") from None
        change()
        self._entries.append(entry)
        if update_head:
            self._write_head()
        return entry["seq"]

