"""Signed training receipts: what a data holder attests it released in one round.

A receipt binds the executed DP event (the steps actually run, with their q and sigma) to one update, by
the SHA-256 of its arrays, for one run, round and holder; the holder signs it with its Ed25519 ledger key.
The coordinator verifies the signature with the key learned at query time, recomputes the digest of the
arrays it received, and checks the event against its plan before aggregating.

The signed body carries ``kind`` and ``schema`` so that a receipt can never be mistaken for a ledger entry
or another signed document (domain separation), and a reader that meets an unknown schema says so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import DpEvent, event_from_json, event_to_json
from ewtune.accountant.signing import SigningKey, canonical_json, verify_signature

RECEIPT_KIND = "ewtune.receipt"
RECEIPT_SCHEMA = 1

_DIGEST_DOMAIN = b"ewtune.update.v1\0"


def update_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of named arrays: for each name in sorted order, the name, the dtype (little-endian),
    the shape and the C-order bytes, every field length-prefixed so that no two inputs share an encoding."""
    digest = hashlib.sha256(_DIGEST_DOMAIN)
    for name in sorted(arrays):
        if not isinstance(name, str):
            raise InvalidInputError(f"array names must be strings, got {name!r}")
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise InvalidInputError(f"array {name!r} has dtype object; only numeric arrays can be hashed")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        for field in (name.encode("utf-8"), little.dtype.str.encode("ascii"), _shape_bytes(little.shape)):
            digest.update(len(field).to_bytes(8, "big"))
            digest.update(field)
        digest.update(little.nbytes.to_bytes(8, "big"))
        digest.update(little.tobytes(order="C"))
    return digest.hexdigest()


def receipt_digest(document: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a signed receipt document's canonical JSON. The holder's commit records it for the
    document it sends, the coordinator's commit for the document as parsed on arrival; the cross-check of the
    two ledgers matches them, so both sides compute it here."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    return b"".join(int(size).to_bytes(8, "big") for size in shape)


@dataclass(frozen=True)
class Receipt:
    """One holder's attestation: in ``round`` of ``run_id`` it executed ``event`` and released the update
    whose :func:`update_digest` is ``update_sha256``."""

    run_id: str
    round: int
    holder_id: str
    event: DpEvent
    update_sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise InvalidInputError(f"receipt run_id must be a non-empty string, got {self.run_id!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise InvalidInputError(f"receipt round must be an integer >= 0, got {self.round!r}")
        if not isinstance(self.holder_id, str) or not self.holder_id:
            raise InvalidInputError(f"receipt holder_id must be a non-empty string, got {self.holder_id!r}")
        if not _is_sha256_hex(self.update_sha256):
            raise InvalidInputError(f"receipt update_sha256 must be 64 lowercase hex digits, got {self.update_sha256!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": RECEIPT_KIND,
            "schema": RECEIPT_SCHEMA,
            "run_id": self.run_id,
            "round": self.round,
            "holder_id": self.holder_id,
            "event": event_to_json(self.event),
            "update_sha256": self.update_sha256,
        }

    @classmethod
    def from_json(cls, body: Any) -> "Receipt":
        if not isinstance(body, dict):
            raise InvalidInputError(f"a receipt must be a JSON object, got {type(body).__name__}")
        if body.get("kind") != RECEIPT_KIND:
            raise InvalidInputError(f"not a receipt: kind is {body.get('kind')!r}, expected {RECEIPT_KIND!r}")
        if body.get("schema") != RECEIPT_SCHEMA:
            raise InvalidInputError(f"unknown receipt schema {body.get('schema')!r} (this release reads {RECEIPT_SCHEMA})")
        missing = [field for field in ("run_id", "round", "holder_id", "event", "update_sha256") if field not in body]
        if missing:
            raise InvalidInputError(f"receipt lacks the field(s) {', '.join(missing)}")
        return cls(
            run_id=body["run_id"],
            round=body["round"],
            holder_id=body["holder_id"],
            event=event_from_json(body["event"]),
            update_sha256=body["update_sha256"],
        )


def _is_sha256_hex(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sign_receipt(key: SigningKey, receipt: Receipt) -> dict[str, Any]:
    """The signed document ``{"receipt": body, "signature": base64 Ed25519 over canonical_json(body)}``."""
    body = receipt.to_json()
    return {"receipt": body, "signature": key.sign(canonical_json(body))}


def verify_receipt(document: Any, public_key_text: str) -> Receipt:
    """The receipt in ``document`` if its signature verifies under ``public_key_text``; otherwise
    :class:`InvalidInputError` naming what is wrong. Accepts the document or its JSON text."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, RecursionError) as bad:  # RecursionError: nesting deeper than the parser goes
            raise InvalidInputError(f"receipt document is not valid JSON: {bad}") from None
    if not isinstance(document, dict) or set(document) != {"receipt", "signature"}:
        raise InvalidInputError("a signed receipt must be an object with exactly the keys 'receipt' and 'signature'")
    body, signature = document["receipt"], document["signature"]
    if not isinstance(signature, str):
        raise InvalidInputError("receipt signature must be a base64 string")
    if not verify_signature(public_key_text, canonical_json(body), signature):
        raise InvalidInputError("receipt signature does not verify under the holder's public key")
    return Receipt.from_json(body)
