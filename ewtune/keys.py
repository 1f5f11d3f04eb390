"""Credentials for a federation: TLS, SuperNode authentication and ledger signing keys.

``init_credentials(directory, holders, addresses)`` writes, with ``cryptography`` only:

- ``ca/ca.crt``, ``ca/ca.key``: a P-384 certificate authority (the root every SuperNode and the ``flwr``
  CLI trust: ``--root-certificates`` / ``root-certificates``);
- ``superlink/server.pem``, ``superlink/server.key``: the SuperLink certificate, signed by the CA, with a
  subject alternative name for every address clients dial and ``ExtendedKeyUsage(serverAuth)``
  (``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile``);
- ``holders/<id>/supernode.key`` and ``supernode.pub``: the SuperNode authentication key pair in the
  format Flower 1.42 requires, an EC key on a NIST curve, the private key in OpenSSH format
  (``--auth-supernode-private-key``), the public key as an OpenSSH line (``flwr supernode register``);
- ``holders/<id>/ledger.key`` and ``ledger.pub``: the holder's Ed25519 ledger and receipt key;
- ``coordinator/ledger.key`` and ``ledger.pub``: the coordinator's Ed25519 ledger key;
- ``supernodes.json``: the holders' public SuperNode keys (and ledger public keys) to register with the
  SuperLink, one entry per holder.

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

from accountant.errors import InvalidInputError
from accountant.signing import SigningKey

DEFAULT_ADDRESSES = ("127.0.0.1", "localhost")
REGISTRY_FILE = "supernodes.json"
_CURVE = ec.SECP384R1()
_HOLDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CA_DAYS = 5 * 365
_SERVER_DAYS = 365


@dataclass(frozen=True)
class HolderCredentials:
    holder_id: str
    supernode_private_key: Path  # OpenSSH EC P-384, for --auth-supernode-private-key
    supernode_public_key: Path  # OpenSSH line, for `flwr supernode register`
    supernode_public_key_line: str  # "ecdsa-sha2-nistp384 AAAA..."
    ledger_key: Path  # Ed25519 PEM, accountant.signing.SigningKey.load
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


def init_credentials(
    directory: str | os.PathLike, holders: Sequence[str], addresses: Sequence[str] = DEFAULT_ADDRESSES
) -> Credentials:
    """Create every credential of a federation under ``directory`` (new or empty) and return their paths."""
    holders = _checked_holders(holders)
    addresses = _checked_addresses(addresses)
    root = Path(directory).expanduser().resolve()
    if root.exists() and any(root.iterdir()):
        raise InvalidInputError(f"{root} is not empty: refusing to overwrite existing credentials")
    for sub in ("ca", "superlink", "coordinator", *(f"holders/{h}" for h in holders)):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    ca_key = ec.generate_private_key(_CURVE)
    ca_cert = _ca_certificate(ca_key)
    _write_private(root / "ca/ca.key", _pkcs8_pem(ca_key))
    _write_public(root / "ca/ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(_CURVE)
    _write_private(root / "superlink/server.key", _pkcs8_pem(server_key))
    server_cert = _server_certificate(server_key, ca_key, ca_cert, addresses)
    _write_public(root / "superlink/server.pem", server_cert.public_bytes(serialization.Encoding.PEM))

    _new_ledger_key(root / "coordinator")
    entries = [_new_holder_keys(root / "holders" / holder, holder) for holder in holders]
    _write_public(root / REGISTRY_FILE, _registry_json(entries, addresses))
    return load_credentials(root)


def load_credentials(directory: str | os.PathLike) -> Credentials:
    """The :class:`Credentials` of a directory made by :func:`init_credentials`."""
    root = Path(directory).expanduser().resolve()
    registry = root / REGISTRY_FILE
    if not registry.is_file():
        raise InvalidInputError(f"{root} holds no credentials (no {REGISTRY_FILE}); run `ewtune keys init {root}`")
    try:
        document = json.loads(registry.read_text())
        entries = document["holders"]
        addresses = tuple(document["addresses"])
    except (ValueError, KeyError, TypeError) as bad:
        raise InvalidInputError(f"{registry} is malformed: {bad}") from None
    holders = {
        entry["holder_id"]: HolderCredentials(
            holder_id=entry["holder_id"],
            supernode_private_key=root / "holders" / entry["holder_id"] / "supernode.key",
            supernode_public_key=root / "holders" / entry["holder_id"] / "supernode.pub",
            supernode_public_key_line=entry["supernode_public_key"],
            ledger_key=root / "holders" / entry["holder_id"] / "ledger.key",
            ledger_public_key=entry["ledger_public_key"],
        )
        for entry in entries
    }
    return Credentials(
        directory=root,
        ca_certificate=root / "ca/ca.crt",
        ca_key=root / "ca/ca.key",
        server_certificate=root / "superlink/server.pem",
        server_key=root / "superlink/server.key",
        coordinator_ledger_key=root / "coordinator/ledger.key",
        coordinator_ledger_public_key=(root / "coordinator/ledger.pub").read_text().strip(),
        holders=holders,
        registry=registry,
        addresses=addresses,
    )


def _checked_holders(holders: Sequence[str]) -> tuple[str, ...]:
    if isinstance(holders, str):
        holders = [holders]
    holders = tuple(holders)
    if not holders:
        raise InvalidInputError("at least one holder id is needed")
    for holder in holders:
        if not isinstance(holder, str) or not _HOLDER_ID.match(holder):
            raise InvalidInputError(
                f"invalid holder id {holder!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
    if len(set(holders)) != len(holders):
        raise InvalidInputError(f"holder ids must be distinct, got {list(holders)}")
    return holders


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


def _new_holder_keys(folder: Path, holder_id: str) -> dict[str, str]:
    """Writes the holder's SuperNode and ledger key pairs; returns its entry in the registry."""
    node_key = ec.generate_private_key(_CURVE)
    _write_private(
        folder / "supernode.key",
        node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public_line = node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    _write_public(folder / "supernode.pub", f"{public_line} ewtune-{holder_id}\n".encode())
    return {
        "holder_id": holder_id,
        "supernode_public_key_file": str(folder / "supernode.pub"),
        "supernode_public_key": public_line,
        "ledger_public_key": _new_ledger_key(folder).public_key_text,
    }


def _new_ledger_key(folder: Path) -> SigningKey:
    key = SigningKey.generate()
    key.save(folder / "ledger.key")
    _write_public(folder / "ledger.pub", (key.public_key_text + "\n").encode())
    return key


def _registry_json(entries: list[dict[str, str]], addresses: tuple[str, ...]) -> bytes:
    return (json.dumps({"holders": entries, "addresses": list(addresses)}, indent=2) + "\n").encode()


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
