"""The coordinator's credentials: TLS, and the registry of the holders' public keys.

``init_credentials(directory, addresses)`` writes, with ``cryptography`` only:

- ``ca/ca.crt``, ``ca/ca.key``: a P-384 certificate authority (the root every SuperNode and the ``flwr``
  CLI trust: ``--root-certificates`` / ``root-certificates``);
- ``superlink/server.pem``, ``superlink/server.key``: the SuperLink certificate, signed by the CA, with a
  subject alternative name for every address clients dial and ``ExtendedKeyUsage(serverAuth)``
  (``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile``);
- ``coordinator/ledger.key`` and ``ledger.pub``: the coordinator's Ed25519 ledger key;
- ``supernodes.json``: the holder registry (:mod:`ewtune.coordinator.registry`), empty at first.

It generates no holder key: each holder runs ``ewtune agent keys init`` on its own machine
(:mod:`ewtune.agent.keys`) and hands over only its public card (:mod:`ewtune.federation.cards`), which ``add_holder`` (``ewtune keys add-holder``)
appends to the registry, writing the SuperNode public key to ``holders/<id>.pub`` for ``flwr supernode
register``. A coordinator holding the holders' private keys could sign receipts and ledger entries as
any of them.

Private keys are created with mode 0600 and never overwritten. Every path is absolute.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import SigningKey, load_public_key, write_private, write_public
from ewtune.coordinator.registry import REGISTRY_FILE, Registry, new_registry
from ewtune.federation.cards import SUPERNODE_CURVE, holder_card

DEFAULT_ADDRESSES = ("127.0.0.1", "localhost")
_CURVE = SUPERNODE_CURVE
_CA_DAYS = 5 * 365
_SERVER_DAYS = 365


@dataclass(frozen=True)
class HolderCredentials:
    """What the coordinator knows of a holder: public keys only."""

    holder_id: str
    supernode_public_key: Path  # OpenSSH line, for `flwr supernode register`
    supernode_public_key_line: str  # "ecdsa-sha2-nistp384 AAAA..."
    ledger_public_key: str  # base64 of the raw 32 bytes


@dataclass(frozen=True)
class Credentials:
    directory: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    coordinator_ledger_key: Path
    coordinator_ledger_public_key: str
    holders: dict[str, HolderCredentials]
    registry: Path  # supernodes.json
    addresses: tuple[str, ...]

    @property
    def supernode_public_keys(self) -> dict[str, Path]:
        """Each registered holder's SuperNode public key file, for ``flwr supernode register``."""
        return {holder_id: holder.supernode_public_key for holder_id, holder in self.holders.items()}


def init_credentials(directory: str | os.PathLike, addresses: Sequence[str] = DEFAULT_ADDRESSES) -> Credentials:
    """Create the coordinator's credentials and an empty holder registry under ``directory`` (new or empty)."""
    if not isinstance(addresses, str) and any(not isinstance(a, str) for a in addresses):
        raise InvalidInputError("addresses must be strings")
    addresses = _checked_addresses(addresses)
    root = Path(directory).expanduser().resolve()
    if root.exists() and any(root.iterdir()):
        raise InvalidInputError(f"{root} is not empty: refusing to overwrite existing credentials")
    for sub in ("ca", "superlink", "coordinator", "holders"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    ca_key = ec.generate_private_key(_CURVE)
    ca_cert = _ca_certificate(ca_key)
    write_private(root / "ca/ca.key", _pkcs8_pem(ca_key))
    write_public(root / "ca/ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(_CURVE)
    write_private(root / "superlink/server.key", _pkcs8_pem(server_key))
    server_cert = _server_certificate(server_key, ca_key, ca_cert, addresses)
    write_public(root / "superlink/server.pem", server_cert.public_bytes(serialization.Encoding.PEM))

    key = SigningKey.generate()
    key.save(root / "coordinator/ledger.key")
    write_public(root / "coordinator/ledger.pub", (key.public_key_text + "\n").encode())
    new_registry(root / REGISTRY_FILE, addresses).save()
    return load_credentials(root)


def add_holder(directory: str | os.PathLike, card_path: str | os.PathLike) -> HolderCredentials:
    """Append a holder's public card (``holder.json`` of ``ewtune agent keys init``) to the registry;
    a holder id, SuperNode key or ledger key already registered is refused."""
    credentials = load_credentials(directory)
    path = Path(card_path).expanduser()
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"holder card {path} does not exist") from None
    except OSError as error:
        raise InvalidInputError(f"cannot read holder card {path}: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as bad:
        raise InvalidInputError(f"holder card {path} is not JSON: {bad}") from None
    holder = holder_card(card, f"holder card {path}")
    registry = Registry.load(credentials.registry).with_holder(holder)
    write_public(credentials.directory / "holders" / f"{holder.holder_id}.pub", f"{holder.supernode_public_key} ewtune-{holder.holder_id}\n".encode())
    registry.save()
    return load_credentials(credentials.directory).holders[holder.holder_id]


def load_credentials(directory: str | os.PathLike) -> Credentials:
    """The :class:`Credentials` of a directory made by :func:`init_credentials`."""
    root = Path(directory).expanduser().resolve()
    path = root / REGISTRY_FILE
    if not path.is_file():
        raise InvalidInputError(f"{root} holds no credentials (no {REGISTRY_FILE}); run `ewtune keys init {root}`")
    registry = Registry.load(path)
    holders = {
        entry.holder_id: HolderCredentials(
            holder_id=entry.holder_id,
            supernode_public_key=root / "holders" / f"{entry.holder_id}.pub",
            supernode_public_key_line=entry.supernode_public_key,
            ledger_public_key=entry.ledger_public_key,
        )
        for entry in registry.holders
    }
    return Credentials(
        directory=root,
        ca_certificate=root / "ca/ca.crt",
        ca_key=root / "ca/ca.key",
        server_certificate=root / "superlink/server.pem",
        server_key=root / "superlink/server.key",
        coordinator_ledger_key=root / "coordinator/ledger.key",
        coordinator_ledger_public_key=_ledger_public_key(root / "coordinator/ledger.pub"),
        holders=holders,
        registry=path,
        addresses=registry.addresses,
    )


def _ledger_public_key(path: Path) -> str:
    """The coordinator's ledger public key (base64) from ``path``; a missing or unreadable file says so."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError as error:
        raise InvalidInputError(f"cannot read the coordinator's ledger public key {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"the coordinator's ledger public key {path} is not base64 text") from None
    try:
        load_public_key(text)
    except InvalidInputError as bad:
        raise InvalidInputError(f"the coordinator's ledger public key {path}: {bad}") from None
    return text


def _checked_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    if isinstance(addresses, str):
        addresses = [addresses]
    addresses = tuple(dict.fromkeys(a.strip() for a in addresses))
    if not addresses or any(not a for a in addresses):
        raise InvalidInputError("the SuperLink certificate needs at least one non-empty address")
    for address in addresses:
        if _ip(address) is None and not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", address):
            raise InvalidInputError(f"invalid address {address!r}: give an IP address or a DNS name without a port")
    return addresses


def _ip(address: str):
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _subject_alternative_names(addresses: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for address in addresses:
        ip = _ip(address)
        names.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(address))
    return x509.SubjectAlternativeName(names)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ewtune federation CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    addresses: Sequence[str],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_SERVER_DAYS))
        .add_extension(_subject_alternative_names(addresses), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
