"""The privacy ledger: append-only JSON Lines, hash-chained with SHA-256 and signed with Ed25519.

Each line is one entry in canonical JSON (:func:`ewtune.accountant.signing.canonical_json`)::

    {"seq": n, "time": "2026-...Z", "kind": ..., "writer": ..., "payload": {...},
     "prev": sha256 of the previous line's canonical JSON (64 zeros for genesis),
     "signature": Ed25519 by the writer over the canonical JSON of the entry without "signature"}

Kinds (a kind is never removed and its meaning never changes, so that an old ledger always reads the same):
genesis (writer, public key, budget policy, the pinned certified accountant, schema), holder (a coordinator
registers a holder's id, public key and budget), reserve (a planned event for a holder, run and round),
commit (the event actually executed for a reservation: its steps may be fewer, never more), abort (a
reservation released nothing), repair (a torn last line left by a crash was cut off; its length and hash),
audit (a federated audit run's empirical lower bounds on epsilon, per holder and pooled; no spend).
The writer is itself a holder with the genesis budget; a holder's own ledger has no other.

Durability: a line is written with O_APPEND and fsynced before the call returns; the directory is fsynced
when the file is created; ``fcntl.flock`` keeps a second writer out. Nothing written is ever rewritten:
a torn tail that is a complete, valid entry (only its newline was lost) is completed with its newline; any
other torn tail is saved to ``PATH.torn-<time>`` before it is cut off, and the cut is recorded as an entry.
Files are created with mode 0600: a ledger says which data sets were trained on, and when.

Rollback: the chain and the signatures prove that every entry of a file was written by the writer in that
order, but not that the file is *all* the writer wrote: a copy cut at a line boundary, or an older backup,
is a valid shorter ledger whose holder has spent less. So the ledger's head (seq and entry hash of its last
entry) is anchored outside the file, in a head file signed by the writer key (default ``PATH.head``; an
operator should put it on another volume or directory, which a restore of the ledger file cannot reach).
Every append updates it after the line is fsynced, atomically (temporary file, fsync, rename, directory
fsync). :meth:`Ledger.open` refuses a ledger that lacks the anchored entry or holds another one there. A
ledger *ahead* of its head is accepted: each append fsyncs its line before it touches the head, so a crash
in between leaves the ledger one entry ahead, and entries beyond the anchored one are signed by the writer
and chained onto it: they can only add spend, never hide it. The head is then brought forward.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.events import DpEvent, ComposedEvent, PoissonGaussianEvent, event_to_json
from ewtune.accountant.signing import SigningKey, canonical_json, verify_signature
from ewtune.accountant.spend import LEDGER_SCHEMA, HolderSpend, LedgerState, Reservation

GENESIS_PREV = "0" * 64
# A commit's ``extra.purpose`` for a release that is not a training update (a holder's private evaluation):
# charged like any event, but never aggregated, so the coordinator's ledger has no commit to match it.
EVALUATION_PURPOSE = "evaluation"
# A commit's ``extra.purpose`` for an audit run's release (synthetic records and canaries, never a model for use).
AUDIT_PURPOSE = "audit"
# A commit's ``extra.purpose`` for a holder's private count of its training records (``extra.public.dataset_size``,
# noised and charged like any event; ewtune.agent.released_count): never aggregated, no coordinator commit matches it.
DATASET_SIZE_PURPOSE = "dataset_size"
ENTRY_FIELDS = ("seq", "time", "kind", "writer", "payload", "prev", "signature")
STATED_EPSILONS = ("epsilon_certified", "epsilon_edgeworth")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
HEAD_TYPE = "ewtune-ledger-head"  # no ledger entry has a "type" field: a signed head never reads as an entry
HEAD_FIELDS = ("type", "ledger", "writer", "seq", "hash", "time", "signature")
FILE_MODE = 0o600

log = logging.getLogger(__name__)


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
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
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


# -- the head anchor -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """A ledger's last entry, named by seq and entry hash. The hash covers, through ``prev``, every entry
    before it, so a head pins the whole prefix of the ledger up to ``seq``."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> "Head":
        """``SEQ:HASH`` (as printed by ``str(head)``), e.g. from a head file or the coordinator's records."""
        seq_text, _, digest = str(text).partition(":")
        if not (seq_text.isascii() and seq_text.isdigit()) or not _SHA256_HEX.fullmatch(digest):  # int() refuses "²"
            raise InvalidInputError(
                f"a head is SEQ:HASH (an entry number and 64 lower-case hex digits), got {text!r}"
            )
        return cls(int(seq_text), digest)


@dataclass(frozen=True)
class HeadRecord:
    """A head file's content, its signature verified: the ledger file name it anchors, the writer, when it
    was written, and the head itself."""

    path: Path
    ledger: str
    writer: str
    time: str
    head: Head


def default_head_path(ledger_path: str | os.PathLike) -> Path:
    """``<ledger path>.head``: next to the ledger, where a restore of the whole directory also reaches it;
    pass another ``head_path`` to keep it out of reach."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ".head")


def head_document(ledger_name: str, writer: str, head: Head, key: SigningKey) -> dict[str, Any]:
    """The signed head: canonical JSON signed by the writer key, like an entry, but with a ``type`` field
    that no entry has, so that one can never be passed off as the other."""
    document: dict[str, Any] = {
        "type": HEAD_TYPE,
        "ledger": ledger_name,
        "writer": writer,
        "seq": head.seq,
        "hash": head.hash,
        "time": _format_time(datetime.now(timezone.utc)),
    }
    document["signature"] = key.sign(signed_bytes(document))
    return document


def parse_head(data: bytes, public_key_text: str, source: str | os.PathLike = "the head file") -> HeadRecord:
    """A head file's bytes, checked: its fields, and its signature under ``public_key_text`` (the ledger's
    genesis key, or the key an auditor pinned). Raises ``InvalidInputError`` naming what is wrong."""
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidInputError(f"head file {source} is not valid JSON") from None
    if not isinstance(document, dict) or document.get("type") != HEAD_TYPE:
        raise InvalidInputError(f"head file {source} is not a ledger head")
    missing = [name for name in HEAD_FIELDS if name not in document]
    if missing:
        raise InvalidInputError(f"head file {source} lacks {', '.join(missing)}")
    seq, digest = document["seq"], document["hash"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise InvalidInputError(f"head file {source}: seq must be an integer >= 0, got {seq!r}")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise InvalidInputError(f"head file {source}: hash must be 64 lower-case hex digits")
    if not all(isinstance(document[name], str) for name in ("ledger", "writer", "time", "signature")):
        raise InvalidInputError(f"head file {source} has fields of the wrong type")
    if not verify_signature(public_key_text, signed_bytes(document), document["signature"]):
        raise InvalidInputError(
            f"head file {source} is not signed by the ledger's writer key (forged, or the head of another ledger)"
        )
    return HeadRecord(Path(source), document["ledger"], document["writer"], document["time"], Head(seq, digest))


def read_head(path: str | os.PathLike, public_key_text: str) -> HeadRecord:
    """Read and verify a head file (for auditors: compare its head with a ledger copy, see
    :func:`head_mismatch`). An unreadable file or a bad one raises ``InvalidInputError``."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read head file {path}: {error.strerror or error}") from None
    return parse_head(data, public_key_text, path)


def head_mismatch(entry_hashes: "list[str] | tuple[str, ...]", head: Head) -> str | None:
    """Why a ledger whose entries hash to ``entry_hashes`` (in seq order) does not contain ``head``, or None
    when it does. More entries than the head's are fine (they were appended after it was written)."""
    if head.seq >= len(entry_hashes):
        return (
            f"it holds {len(entry_hashes)} entries but its head anchors seq {head.seq}: "
            "the ledger was rolled back or truncated"
        )
    if entry_hashes[head.seq] != head.hash:
        return (
            f"entry {head.seq} has hash {entry_hashes[head.seq][:16]}... where its head anchors "
            f"{head.hash[:16]}...: the ledger is an older or a different copy"
        )
    return None


def write_head(path: str | os.PathLike, document: Mapping[str, Any], replace: bool = True) -> None:
    """Write a head file atomically: a temporary file (mode 0600) in the same directory is written and
    fsynced, then renamed over ``path`` (or, with ``replace=False``, linked to it, which fails rather than
    overwrite an existing head), and the directory is fsynced. A reader sees the old head or the new one,
    never a torn one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, canonical_json(document) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            os.unlink(temporary)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(path)


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

    Use :meth:`create` or :meth:`open`; close it (or use ``with``) to release the writer lock. The head file
    (``head_path``, default ``<path>.head``) anchors the last entry outside the ledger file; see the module
    docstring for why, and :meth:`anchor` for an operator who moved a ledger on purpose.
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
            _lock(fd, path)
            genesis = {
                "writer": writer_id,
                "public_key": key.public_key_text,
                "policy": policy.to_json(),
                "accountant": dict(CERTIFIED_ACCOUNTANT),
                "estimate": {"name": "edgeworth", "order": 1},
                "schema": LEDGER_SCHEMA,
            }
            ledger._append(ledger._new_entry("genesis", genesis, writer=writer_id), update_head=False)
            _fsync_directory(path)  # the ledger's name is durable before a head can point at it
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
            _lock(fd, path)
            split = split_lines(_read_all(fd))
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
            _write_all(self._fd, b"\n")
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
            _write_all(self._fd, line)
            os.fsync(self._fd)
        except OSError as error:
            self._broken = error.strerror or str(error)
            raise EwtuneError(f"cannot append to ledger {self._path}: {self._broken}") from None
        change()
        self._entries.append(entry)
        if update_head:
            self._write_head()
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
