"""The holder registry (``supernodes.json``): which SuperNode key belongs to which holder, and which ledger key
that holder signs with.

Each holder generates its own keys (``ewtune agent keys init``) and hands the coordinator a public card;
``ewtune keys add-holder`` appends it here. The registry pins SuperNode public key -> holder id -> ledger
public key. Flower authenticates a SuperNode by its key (``flwr supernode register``), but the description a
node sends at query time is just data: without the pin, a registered node could claim another holder's id
(and be charged against, or speak for, that holder) or a ledger key of its choosing. The ServerApp therefore
accepts a node only when its SuperNode key (``NodeInfo.public_key`` from the SuperLink) is registered and its
description's holder id and ledger key are the registered ones; receipts are verified against the
registered ledger key.

File format::

    {"holders": [{"holder_id": ..., "supernode_public_key": "ecdsa-sha2-nistp384 AAAA...",
                  "ledger_public_key": "<base64 Ed25519>"}, ...],
     "addresses": ["127.0.0.1", ...]}

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from accountant.errors import InvalidInputError
from accountant.signing import load_public_key

REGISTRY_FILE = "supernodes.json"
_HOLDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class RegisteredHolder:
    holder_id: str
    supernode_public_key: str  # the OpenSSH line, as the holder's card gave it
    ledger_public_key: str  # base64 of the raw Ed25519 key

    @property
    def supernode_key_der(self) -> bytes:
        return _der(_ssh_key(self.supernode_public_key, self.holder_id))

    def to_json(self) -> dict[str, str]:
        return {"holder_id": self.holder_id, "supernode_public_key": self.supernode_public_key, "ledger_public_key": self.ledger_public_key}


def holder_from_card(card: Any, source: str = "holder card") -> RegisteredHolder:
    """A registry entry from a holder's card; every field is checked (the card comes from outside)."""
    if not isinstance(card, Mapping):
        raise InvalidInputError(f"{source} must be a JSON object")
    missing = [name for name in ("holder_id", "supernode_public_key", "ledger_public_key") if not isinstance(card.get(name), str)]
    if missing:
        raise InvalidInputError(f"{source} lacks the string field(s) {', '.join(missing)}")
    holder_id = card["holder_id"]
    if not _HOLDER_ID.match(holder_id):
        raise InvalidInputError(f"{source}: invalid holder id {holder_id!r}")
    line = " ".join(card["supernode_public_key"].split()[:2])  # drop a trailing comment
    _ssh_key(line, holder_id)
    try:
        load_public_key(card["ledger_public_key"])
    except InvalidInputError as bad:
        raise InvalidInputError(f"{source}: ledger_public_key: {bad}") from None
    return RegisteredHolder(holder_id, line, card["ledger_public_key"])


@dataclass(frozen=True)
class Registry:
    path: Path
    holders: tuple[RegisteredHolder, ...]
    addresses: tuple[str, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Registry":
        path = Path(path).expanduser().resolve()
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidInputError(f"holder registry {path} does not exist (`ewtune keys init` creates it)") from None
        except ValueError as bad:
            raise InvalidInputError(f"holder registry {path} is not JSON: {bad}") from None
        if not isinstance(document, dict) or not isinstance(document.get("holders"), list):
            raise InvalidInputError(f"holder registry {path} lacks the list 'holders'")
        addresses = document.get("addresses", [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise InvalidInputError(f"holder registry {path}: 'addresses' must be a list of strings")
        registry = cls(path, (), tuple(addresses))
        for index, entry in enumerate(document["holders"]):
            registry = registry.with_holder(holder_from_card(entry, f"{path}: holder {index}"))
        return registry

    def with_holder(self, holder: RegisteredHolder) -> "Registry":
        """This registry plus ``holder``; refused when its holder id, SuperNode key or ledger key is taken."""
        for other in self.holders:
            if other.holder_id == holder.holder_id:
                raise InvalidInputError(f"holder id {holder.holder_id!r} is already registered")
            if other.supernode_key_der == holder.supernode_key_der:
                raise InvalidInputError(f"the SuperNode key of {holder.holder_id!r} is already registered to {other.holder_id!r}")
            if other.ledger_public_key == holder.ledger_public_key:
                raise InvalidInputError(f"the ledger key of {holder.holder_id!r} is already registered to {other.holder_id!r}")
        return Registry(self.path, (*self.holders, holder), self.addresses)

    def save(self) -> None:
        """Rewrite the file atomically."""
        document = {"holders": [holder.to_json() for holder in self.holders], "addresses": list(self.addresses)}
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(document, indent=2) + "\n")
        os.chmod(partial, 0o644)
        os.replace(partial, self.path)

    def holder(self, holder_id: str) -> RegisteredHolder:
        for holder in self.holders:
            if holder.holder_id == holder_id:
                return holder
        raise InvalidInputError(f"holder {holder_id!r} is not in the registry {self.path}")

    def check_node(self, node_id: int, node_public_key: Any, holder_id: str, ledger_public_key: str) -> RegisteredHolder:
        """The registered holder of a node, or :class:`InvalidInputError` with the reason to leave it out.

        ``node_public_key`` is what the SuperLink reports for the node (``NodeInfo.public_key``: PEM
        SubjectPublicKeyInfo bytes in Flower 1.42, from the key given to ``flwr supernode register``); the
        holder id and ledger key are what the node's description claims."""
        der = _node_key_der(node_public_key)
        if der is None:
            raise InvalidInputError(f"node {node_id} has no SuperNode public key at the SuperLink (SuperNode authentication off?)")
        owner = next((holder for holder in self.holders if holder.supernode_key_der == der), None)
        if owner is None:
            raise InvalidInputError(f"node {node_id}'s SuperNode key is not in the holder registry")
        if holder_id != owner.holder_id:
            raise InvalidInputError(f"node {node_id} claims holder id {holder_id!r} but its SuperNode key is registered to {owner.holder_id!r}")
        if ledger_public_key != owner.ledger_public_key:
            raise InvalidInputError(f"node {node_id} ({owner.holder_id}) gives a ledger key other than the registered one")
        return owner


def new_registry(path: str | os.PathLike, addresses: tuple[str, ...]) -> Registry:
    """An empty registry at ``path`` (written by :meth:`Registry.save`)."""
    return Registry(Path(path).expanduser().resolve(), (), tuple(addresses))


def _ssh_key(line: str, holder_id: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(line.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm):
        raise InvalidInputError(f"the SuperNode public key of {holder_id!r} is not an OpenSSH public key line") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise InvalidInputError(f"the SuperNode public key of {holder_id!r} must be an EC key on a NIST curve (Flower requires it)")
    return key


def _node_key_der(value: Any) -> bytes | None:
    if not value:
        return None
    data = value if isinstance(value, bytes) else str(value).encode("ascii", "replace")
    for loader in (serialization.load_pem_public_key, serialization.load_der_public_key, serialization.load_ssh_public_key):
        try:
            return _der(loader(data.strip() if loader is serialization.load_ssh_public_key else data))
        except (ValueError, TypeError, UnsupportedAlgorithm, UnsupportedKey):
            continue
    return None


class UnsupportedKey(Exception):
    """A key cryptography loaded but cannot express as SubjectPublicKeyInfo."""


def _der(key) -> bytes:
    try:
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        raise UnsupportedKey from None
