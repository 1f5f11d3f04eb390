"""The privacy ledger: append-only JSON Lines, hash-chained with SHA-256 and signed with Ed25519.

Each line is one entry in canonical JSON (:func:`accountant.signing.canonical_json`)::

    {"seq": n, "time": "2026-...Z", "kind": ..., "writer": ..., "payload": {...},
     "prev": sha256 of the previous line's canonical JSON (64 zeros for genesis),
     "signature": Ed25519 by the writer over the canonical JSON of the entry without "signature"}

Kinds (a kind is never removed and its meaning never changes; see DESIGN.md, trust boundaries):
genesis (writer, public key, budget policy, the pinned certified accountant, schema), holder (a coordinator
registers a holder's id, public key and budget), reserve (a planned event for a holder, run and round),
commit (the event actually executed for a reservation: its steps may be fewer, never more), abort (a
reservation released nothing), repair (a torn last line left by a crash was cut off; its length and hash).
The writer is itself a holder with the genesis budget; a holder's own ledger has no other.

Durability: a line is written with O_APPEND and fsynced before the call returns; the directory is fsynced
when the file is created; ``fcntl.flock`` keeps a second writer out. Nothing written is ever rewritten:
a torn tail is saved to ``PATH.torn-<time>`` before it is cut off, and the cut is recorded as an entry.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from accountant.errors import EwtuneError, InvalidInputError
from accountant.events import DpEvent, ComposedEvent, PoissonGaussianEvent, event_to_json
from accountant.signing import SigningKey, canonical_json, verify_signature
from accountant.spend import LEDGER_SCHEMA, HolderSpend, LedgerState, Reservation

GENESIS_PREV = "0" * 64
ENTRY_FIELDS = ("seq", "time", "kind", "writer", "payload", "prev", "signature")
STATED_EPSILONS = ("epsilon_certified", "epsilon_edgeworth")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


@dataclass(frozen=True)
class Policy:
    """A ledger writer's lifetime budget: record-level (epsilon, delta)-DP, add/remove neighbours."""

    budget_epsilon: float
    budget_delta: float

    @classmethod
    def coerce(cls, policy: "Policy | Mapping[str, Any]") -> "Policy":
        if isinstance(policy, Policy):
            return policy
        if not isinstance(policy, Mapping) or not {"budget_epsilon", "budget_delta"} <= policy.keys():
            raise InvalidInputError("a ledger policy needs budget_epsilon and budget_delta")
        return cls(policy["budget_epsilon"], policy["budget_delta"])

    def to_json(self) -> dict[str, Any]:
        return {"budget_epsilon": _as_float(self.budget_epsilon), "budget_delta": _as_float(self.budget_delta)}


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the entry's canonical JSON, signature included: what the next entry's ``prev`` holds."""
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def signed_bytes(entry: Mapping[str, Any]) -> bytes:
    """The bytes the writer signs: the canonical JSON of the entry without its ``signature``."""
    return canonical_json({name: value for name, value in entry.items() if name != "signature"})


def parse_time(text: Any) -> datetime:
    """An entry time: UTC ISO-8601 with microseconds, e.g. ``2026-11-29T01:20:00.123456Z``."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise InvalidInputError(f"time {text!r} is not UTC ISO-8601 with microseconds")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise InvalidInputError(f"time {text!r} is not a valid date") from None


def _format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class SplitFile:
    """A ledger file cut at newlines: the complete lines, and any torn tail after the last newline
    (a crash mid-write; an append is acknowledged only once its newline is on disk)."""

    lines: tuple[bytes, ...]
    torn_tail: bytes
    torn_offset: int


def split_lines(data: bytes) -> SplitFile:
    end = data.rfind(b"\n") + 1
    return SplitFile(tuple(data[:end].split(b"\n")[:-1]), data[end:], end)


def parse_line(line: bytes) -> dict[str, Any]:
    """One line as an entry object; it must be exactly the canonical JSON of what it parses to."""
    try:
        entry = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInputError("the line is not valid JSON") from None
    if not isinstance(entry, dict):
        raise InvalidInputError("the line is not a JSON object")
    missing = [name for name in ENTRY_FIELDS if name not in entry]
    if missing:
        raise InvalidInputError(f"the entry lacks {', '.join(missing)}")
    if isinstance(entry["seq"], bool) or not isinstance(entry["seq"], int):
        raise InvalidInputError(f"seq must be an integer, got {entry['seq']!r}")
    wrong = [name for name in ("time", "kind", "writer", "prev", "signature") if not isinstance(entry[name], str)]
    if wrong or not isinstance(entry["payload"], dict):
        raise InvalidInputError(f"the entry has fields of the wrong type: {', '.join(wrong) or 'payload'}")
    if canonical_json(entry) != line:
        raise InvalidInputError("the line is not in canonical JSON form (it was edited)")
    return entry


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class ChainChecker:
    """Checks entries one after another: contiguous seq, ``prev`` hashes, one writer, Ed25519 signatures
    by the genesis key (or the key an auditor pinned), times non-decreasing. Raises ``InvalidInputError``
    with the reason at the first entry that fails."""

    def __init__(self, pinned_public_key: str | None = None) -> None:
        self.pinned_public_key = pinned_public_key
        self.public_key: str | None = None
        self.writer: str | None = None
        self.next_seq = 0
        self.last_hash = GENESIS_PREV
        self.last_time: datetime | None = None

    def check(self, entry: Mapping[str, Any]) -> None:
        seq = entry["seq"]
        if seq != self.next_seq:
            raise InvalidInputError(f"seq {seq!r} where {self.next_seq} was expected (an entry is missing or moved)")
        if entry["prev"] != self.last_hash:
            raise InvalidInputError("prev does not hash the previous entry (the chain is broken)")
        if seq == 0:
            self._adopt_genesis(entry)
        if entry["writer"] != self.writer:
            raise InvalidInputError(f"writer {entry['writer']!r} is not the ledger's writer {self.writer!r}")
        if not verify_signature(self.public_key, signed_bytes(entry), entry["signature"]):
            raise InvalidInputError("the signature does not verify with the writer's public key")
        moment = parse_time(entry["time"])
        if self.last_time is not None and moment < self.last_time:
            raise InvalidInputError(f"time {entry['time']} goes back before the previous entry")
        self.next_seq, self.last_hash, self.last_time = seq + 1, entry_hash(entry), moment

    def _adopt_genesis(self, entry: Mapping[str, Any]) -> None:
        payload = entry["payload"]
        if entry["kind"] != "genesis" or not isinstance(payload, dict):
            raise InvalidInputError("the first entry is not a genesis entry")
        public_key = payload.get("public_key")
        if self.pinned_public_key is not None and public_key != self.pinned_public_key:
            raise InvalidInputError("the genesis public key differs from the pinned public key")
        self.public_key, self.writer = public_key, payload.get("writer")


def _serialised(method):
    """Run a writing method under the ledger's thread lock: seq, prev and the pre-flight must not interleave."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Ledger:
    """A ledger open for appending by its writer (the holder of the genesis key).

    Use :meth:`create` or :meth:`open`; close it (or use ``with``) to release the writer lock.
    """

    def __init__(self, path: Path, key: SigningKey, fd: int) -> None:
        self._path, self._key, self._fd = path, key, fd
        self._chain = ChainChecker()
        self._state = LedgerState()
        self._entries: list[dict[str, Any]] = []
        self._broken: str | None = None
        self._lock = threading.RLock()  # one append at a time within the process (flock covers other processes)
        self.repair: dict[str, Any] | None = None  # the repair entry written when this open cut a torn tail

    # -- opening -----------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, key: SigningKey, writer_id: str,
               policy: Policy | Mapping[str, Any]) -> "Ledger":
        """A new ledger holding only its genesis entry; an existing file is never overwritten."""
        from accountant.certified import CERTIFIED_ACCOUNTANT

        path = Path(path)
        policy = Policy.coerce(policy)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise InvalidInputError(f"refusing to overwrite the existing ledger {path}") from None
        except OSError as error:
            raise InvalidInputError(f"cannot create ledger {path}: {error.strerror or error}") from None
        ledger = cls(path, key, fd)
        try:
            _lock(fd, path)
            genesis = {
                "writer": writer_id,
                "public_key": key.public_key_text,
                "policy": policy.to_json(),
                "accountant": dict(CERTIFIED_ACCOUNTANT),
                "estimate": {"name": "edgeworth", "order": 1},
                "schema": LEDGER_SCHEMA,
            }
            ledger._append(ledger._new_entry("genesis", genesis, writer=writer_id))
            _fsync_directory(path)
        except BaseException:
            ledger.close()
            path.unlink()  # nothing was acknowledged: a half-made ledger must not block a retry
            raise
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike, key: SigningKey) -> "Ledger":
        """Open an existing ledger for appending. Every entry is checked (chain, signatures, rules) and
        ``key`` must be the genesis key. A torn last line is saved to ``PATH.torn-<time>``, cut off, and
        the cut recorded as a signed repair entry (``self.repair``)."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except OSError as error:
            raise InvalidInputError(f"cannot open ledger {path}: {error.strerror or error}") from None
        ledger = cls(path, key, fd)
        try:
            _lock(fd, path)
            split = split_lines(_read_all(fd))
            ledger._load(split.lines)
            if split.torn_tail:
                ledger._repair(split)
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

    def _repair(self, split: SplitFile) -> None:
        torn = split.torn_tail
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        saved = self._path.with_name(f"{self._path.name}.torn-{stamp}")
        fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(saved)
        os.ftruncate(self._fd, split.torn_offset)
        os.fsync(self._fd)
        payload = {
            "torn_bytes": len(torn),
            "torn_sha256": hashlib.sha256(torn).hexdigest(),
            "offset": split.torn_offset,
            "saved_as": saved.name,
        }
        self._append(self._new_entry("repair", payload))
        self.repair = self._entries[-1]

    # -- reading -----------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

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
        _check_event(event)
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
            "budget_epsilon": _as_float(budget_epsilon),
            "budget_delta": _as_float(budget_delta),
        }
        return self._append(self._new_entry("holder", payload))

    @_serialised
    def reserve(self, holder_id: str, run_id: str, round: int, event: DpEvent) -> int:
        """Reserve ``event`` for a holder's round; refused when the holder's certified epsilon over its
        committed events, open reservations and this one, composed, would exceed its budget."""
        _check_event(event)
        payload = {"holder": holder_id, "run_id": run_id, "round": round, "event": event_to_json(event)}
        entry = self._new_entry("reserve", payload)
        change = self._state.prepare(entry)
        spend = self.spend_with(holder_id, event)
        if not spend.within_budget:
            raise InvalidInputError(
                f"reservation refused: holder {holder_id!r} would reach certified epsilon "
                f"{spend.epsilon_certified:.6g} > budget {spend.budget_epsilon:g} (delta {spend.budget_delta:g})"
            )
        payload.update(_statements(spend))
        return self._append(entry, change)

    @_serialised
    def commit(self, reservation_seq: int, event: DpEvent, extra: Mapping[str, Any] | None = None) -> int:
        """Close a reservation with the event actually executed (its steps may be fewer than reserved,
        never more). ``extra`` may hold ``receipt_sha256`` and any other JSON facts worth keeping."""
        _check_event(event)
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
        payload.update(_statements(account.spend(committed=(event,), open_=still_open)))
        return self._append(entry, change)

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
        now = _format_time(datetime.now(timezone.utc))
        last = self._entries[-1]["time"] if self._entries else now
        return {
            "seq": len(self._entries),
            "time": max(now, last),  # fixed-width UTC text: string order is time order
            "kind": kind,
            "writer": writer or self._state.writer,
            "payload": payload,
            "prev": self._chain.last_hash,
        }

    def _append(self, entry: dict[str, Any], change=None) -> int:
        if self._fd < 0:
            raise InvalidInputError(f"ledger {self._path} is closed")
        if self._broken:
            raise EwtuneError(f"ledger {self._path} is unusable after a failed write ({self._broken}); reopen it")
        change = change or self._state.prepare(entry)
        entry["signature"] = self._key.sign(signed_bytes(entry))
        line = canonical_json(entry) + b"\n"
        self._chain.check(entry)
        try:
            _write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as error:
            self._broken = error.strerror or str(error)
            raise EwtuneError(f"cannot append to ledger {self._path}: {self._broken}") from None
        change()
        self._entries.append(entry)
        return entry["seq"]


def _statements(spend: HolderSpend) -> dict[str, float]:
    """The spend an entry leads to, stated so that an auditor can recompute and compare it."""
    stated = {"epsilon_certified": spend.epsilon_certified}
    if spend.epsilon_edgeworth is not None:
        stated["epsilon_edgeworth"] = spend.epsilon_edgeworth
    return stated


def _as_float(value: Any) -> Any:
    """Budgets are recorded as JSON doubles; anything that is not a number is left for validation to refuse."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _check_event(event: Any) -> None:
    if not isinstance(event, (PoissonGaussianEvent, ComposedEvent)):
        raise InvalidInputError(f"expected a DP event, got {type(event).__name__}")


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InvalidInputError(f"ledger {path} is open for writing by another process") from None


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_directory(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
