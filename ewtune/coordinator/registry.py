"""The holder registry (``supernodes.json``): which SuperNode key belongs to which holder, and which ledger key
that holder signs with.

Each holder generates its own keys (``ewtune agent keys init``) and hands the coordinator a public card
(:mod:`ewtune.federation.cards`); ``ewtune keys add-holder`` appends it here. The registry pins SuperNode public key -> holder id -> ledger
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ewtune.accountant.errors import InvalidInputError
from ewtune.federation.cards import HolderCard, UnsupportedKey, holder_card, public_key_der

REGISTRY_FILE = "supernodes.json"


@dataclass(frozen=True)
class Registry:
    path: Path
    holders: tuple[HolderCard, ...]
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
            registry = registry.with_holder(holder_card(entry, f"{path}: holder {index}"))
        return registry

    def with_holder(self, holder: HolderCard) -> "Registry":
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

    def holder(self, holder_id: str) -> HolderCard:
        for holder in self.holders:
            if holder.holder_id == holder_id:
                return holder
        raise InvalidInputError(f"holder {holder_id!r} is not in the registry {self.path}")

    def check_node(self, node_id: int, node_public_key: Any, holder_id: str, ledger_public_key: str) -> HolderCard:
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


def _node_key_der(value: Any) -> bytes | None:
    if not value:
        return None
    data = value if isinstance(value, bytes) else str(value).encode("ascii", "replace")
    for loader in (serialization.load_pem_public_key, serialization.load_der_public_key, serialization.load_ssh_public_key):
        try:
            return public_key_der(loader(data.strip() if loader is serialization.load_ssh_public_key else data))
        except (ValueError, TypeError, UnsupportedAlgorithm, UnsupportedKey):
            continue
    return None
