"""The ledger's head anchor: its last entry (seq and entry hash) in a head file signed by the writer key.

Rollback (:class:`ewtune.accountant.ledger.Ledger`): the chain and the signatures prove that every entry of a
file was written by the writer in that order, but not that the file is *all* the writer wrote: a copy cut at a
line boundary, or an older backup, is a valid shorter ledger whose holder has spent less. So the ledger's head
(seq and entry hash of its last entry) is anchored outside the file, in a head file signed by the writer key
(default ``PATH.head``; an operator should put it on another volume or directory, which a restore of the
ledger file cannot reach). Every append updates it after the line is fsynced, atomically (temporary file,
fsync, rename, directory fsync). :meth:`Ledger.open <ewtune.accountant.ledger.Ledger.open>` refuses a ledger
that lacks the anchored entry or holds another one there. A ledger *ahead* of its head is accepted: each append
fsyncs its line before it touches the head, so a crash in between leaves the ledger one entry ahead, and
entries beyond the anchored one are signed by the writer and chained onto it: they can only add spend, never
hide it. The head is then brought forward.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger_files import FILE_MODE, fsync_directory, write_all
from ewtune.accountant.ledger_lines import format_time, refuse_constant, signed_bytes
from ewtune.accountant.signing import SigningKey, canonical_json, verify_signature

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
HEAD_TYPE = "ewtune-ledger-head"  # no ledger entry has a "type" field: a signed head never reads as an entry
HEAD_FIELDS = ("type", "ledger", "writer", "seq", "hash", "time", "signature")


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
        "time": format_time(datetime.now(timezone.utc)),
    }
    document["signature"] = key.sign(signed_bytes(document))
    return document


def parse_head(data: bytes, public_key_text: str, source: str | os.PathLike = "the head file") -> HeadRecord:
    """A head file's bytes, checked: its fields, and its signature under ``public_key_text`` (the ledger's
    genesis key, or the key an auditor pinned). Raises ``InvalidInputError`` naming what is wrong."""
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
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
            write_all(fd, canonical_json(document) + b"\n")
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
    fsync_directory(path)
