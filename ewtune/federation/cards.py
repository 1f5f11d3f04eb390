"""The holder card: the public half of a holder's keys, which the holder hands the coordinator.

A holder generates its keys on its own machine (:mod:`ewtune.agent.keys`) and writes this card as ``holder.json``;
the coordinator registers it (:mod:`ewtune.coordinator.registry`), pinning SuperNode public key -> holder id ->
ledger public key. Format::

    {"holder_id": "hospital-a", "supernode_public_key": "ecdsa-sha2-nistp384 AAAA...",
     "ledger_public_key": "<base64 of the raw Ed25519 key>"}

The SuperNode key must be an EC key on a NIST curve: Flower 1.42 authenticates SuperNodes with nothing
else. Every field of a card is checked where it is read, since the card comes from outside.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import load_public_key

CARD_FILE = "holder.json"
CARD_FIELDS = ("holder_id", "supernode_public_key", "ledger_public_key")
SUPERNODE_CURVE = ec.SECP384R1()
_HOLDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_holder_id(holder_id: Any) -> str:
    if not isinstance(holder_id, str) or not _HOLDER_ID.match(holder_id):
        raise InvalidInputError(
            f"invalid holder id {holder_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return holder_id


@dataclass(frozen=True)
class HolderCard:
    holder_id: str
    supernode_public_key: str  # the OpenSSH line, without comment
    ledger_public_key: str  # base64 of the raw Ed25519 key

    @property
    def supernode_key_der(self) -> bytes:
        return public_key_der(_ssh_key(self.supernode_public_key, self.holder_id))

    def to_json(self) -> dict[str, str]:
        return {"holder_id": self.holder_id, "supernode_public_key": self.supernode_public_key, "ledger_public_key": self.ledger_public_key}


def holder_card(document: Any, source: str = "holder card") -> HolderCard:
    """The :class:`HolderCard` of a JSON document; every field is checked."""
    if not isinstance(document, Mapping):
        raise InvalidInputError(f"{source} must be a JSON object")
    missing = [name for name in CARD_FIELDS if not isinstance(document.get(name), str)]
    if missing:
        raise InvalidInputError(f"{source} lacks the string field(s) {', '.join(missing)}")
    holder_id = document["holder_id"]
    if not _HOLDER_ID.match(holder_id):
        raise InvalidInputError(f"{source}: invalid holder id {holder_id!r}")
    line = " ".join(document["supernode_public_key"].split()[:2])  # drop a trailing comment
    _ssh_key(line, holder_id)
    try:
        load_public_key(document["ledger_public_key"])
    except InvalidInputError as bad:
        raise InvalidInputError(f"{source}: ledger_public_key: {bad}") from None
    return HolderCard(holder_id, line, document["ledger_public_key"])


class UnsupportedKey(Exception):
    """A key cryptography loaded but cannot express as SubjectPublicKeyInfo."""


def public_key_der(key) -> bytes:
    """The key as DER SubjectPublicKeyInfo, the form in which two encodings of one key compare equal."""
    try:
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        raise UnsupportedKey from None


def _ssh_key(line: str, holder_id: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(line.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm):
        raise InvalidInputError(f"the SuperNode public key of {holder_id!r} is not an OpenSSH public key line") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise InvalidInputError(f"the SuperNode public key of {holder_id!r} must be an EC key on a NIST curve (Flower requires it)")
    return key
