"""A data holder's own keys, generated on its own machine (``ewtune agent keys init DIR --holder-id ID``).

The private keys never leave the holder: the coordinator receives only the public "holder card". Were the
coordinator to generate them, it could sign receipts and ledger entries as any holder, and a holder's
ledger and receipts would prove nothing against it. ``init_holder_keys`` writes into ``DIR``:

- ``supernode.key`` (0600) and ``supernode.pub``: the SuperNode authentication key pair in the format Flower
  1.42 requires, an EC key on a NIST curve (P-384), the private key in OpenSSH format
  (``flower-supernode --auth-supernode-private-key``), the public key as an OpenSSH line (what the
  coordinator passes to ``flwr supernode register``);
- ``ledger.key`` (0600) and ``ledger.pub``: the Ed25519 key that signs the holder's ledger and its receipts
  (:class:`ewtune.accountant.signing.SigningKey`);
- ``holder.json``: the card (:mod:`ewtune.federation.cards`) to hand to the coordinator (``ewtune keys add-holder``),
  which pins SuperNode key -> holder id -> ledger key.

No file is ever overwritten: a second ``init`` in the same folder is refused before anything is written.
This module imports neither torch nor flwr nor the ``ewtune`` CLI package (it runs on a bare holder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import SigningKey, write_private, write_public
from ewtune.federation.cards import CARD_FILE, SUPERNODE_CURVE, HolderCard, check_holder_id

_FILES = ("supernode.key", "supernode.pub", "ledger.key", "ledger.pub", CARD_FILE)


@dataclass(frozen=True)
class HolderKeys:
    holder_id: str
    directory: Path
    supernode_private_key: Path  # OpenSSH EC P-384, for --auth-supernode-private-key
    supernode_public_key: Path  # OpenSSH line, for `flwr supernode register`
    supernode_public_key_line: str  # "ecdsa-sha2-nistp384 AAAA..."
    ledger_key: Path  # Ed25519 PEM, ewtune.accountant.signing.SigningKey.load
    ledger_public_key: str  # base64 of the raw 32 bytes
    card: Path  # holder.json

    def public_card(self) -> HolderCard:
        return HolderCard(self.holder_id, self.supernode_public_key_line, self.ledger_public_key)


def init_holder_keys(directory: str | os.PathLike, holder_id: str) -> HolderKeys:
    """Generate the holder's SuperNode and ledger key pairs and its card in ``directory`` (created 0700
    when missing); refuses when any of the files already exists."""
    holder_id = check_holder_id(holder_id)
    folder = Path(directory).expanduser().resolve()
    existing = [name for name in _FILES if (folder / name).exists()]
    if existing:
        raise InvalidInputError(f"{folder} already holds {', '.join(existing)}: refusing to overwrite a holder's keys")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    public_line = new_supernode_key(folder / "supernode.key", folder / "supernode.pub", f"ewtune-{holder_id}")
    ledger = SigningKey.generate()
    ledger.save(folder / "ledger.key")
    write_public(folder / "ledger.pub", (ledger.public_key_text + "\n").encode())
    keys = HolderKeys(
        holder_id=holder_id,
        directory=folder,
        supernode_private_key=folder / "supernode.key",
        supernode_public_key=folder / "supernode.pub",
        supernode_public_key_line=public_line,
        ledger_key=folder / "ledger.key",
        ledger_public_key=ledger.public_key_text,
        card=folder / CARD_FILE,
    )
    write_public(keys.card, (json.dumps(keys.public_card().to_json(), indent=2) + "\n").encode())
    return keys


def new_supernode_key(private_path: Path, public_path: Path, comment: str) -> str:
    """Write a SuperNode key pair (EC P-384, OpenSSH formats); returns the public OpenSSH line (no comment)."""
    key = ec.generate_private_key(SUPERNODE_CURVE)
    write_private(
        private_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    write_public(public_path, f"{line} {comment}\n".encode())
    return line
