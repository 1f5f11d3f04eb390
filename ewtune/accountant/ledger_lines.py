"""The ledger file's lines: canonical JSON entries, their hashes and signed bytes, and the chain check.

Each line is one entry in canonical JSON (:func:`ewtune.accountant.signing.canonical_json`)::

    {"seq": n, "time": "2026-...Z", "kind": ..., "writer": ..., "payload": {...},
     "prev": sha256 of the previous line's canonical JSON (64 zeros for genesis),
     "signature": Ed25519 by the writer over the canonical JSON of the entry without "signature"}

The kinds and what they mean: :mod:`ewtune.accountant.ledger`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import canonical_json, verify_signature

GENESIS_PREV = "0" * 64
ENTRY_FIELDS = ("seq", "time", "kind", "writer", "payload", "prev", "signature")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


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


def format_time(moment: datetime) -> str:
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
        entry = json.loads(line.decode("utf-8"), parse_constant=refuse_constant)
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


def refuse_constant(name: str) -> None:
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
