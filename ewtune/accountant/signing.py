"""Ed25519 keys and the canonical JSON that every hash and signature in the project is computed over.

Ed25519 (RFC 8032) is deterministic: the same key and bytes always give the same signature, so a ledger can
be re-verified byte for byte. A public key travels as the base64 of its raw 32 bytes (RFC 8032, 5.1.5);
a private key is stored as unencrypted PKCS#8 PEM, readable only by its owner (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ewtune.accountant.errors import InvalidInputError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (exactly, whatever the umask); an existing file is never replaced (that
    would lose a key whose signatures are already in ledgers)."""
    _create(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0644; an existing file is never replaced."""
    _create(path, data, 0o644)


def _create(path: Path, data: bytes, mode: int) -> None:
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InvalidInputError(f"{path} exists: refusing to overwrite it") from None
    except OSError as error:
        raise InvalidInputError(f"cannot create {path}: {error.strerror or error}") from None
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it, never widened: make it exact
        handle.write(data)
        os.fsync(handle.fileno())


def canonical_json(obj: Any) -> bytes:
    """``obj`` as canonical JSON: keys sorted, no whitespace, UTF-8, floats as Python's shortest round-trip
    ``repr``. NaN and infinities are refused (JSON has no spelling for them), and so are non-string keys,
    which ``json`` would otherwise silently turn into strings."""
    _check_canonical(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _check_canonical(obj: Any) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise InvalidInputError(f"canonical JSON cannot hold the float {obj!r}")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"canonical JSON needs string keys, got {key!r}")
            _check_canonical(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_canonical(value)
    elif not isinstance(obj, (str, int, float, type(None))):
        raise InvalidInputError(f"canonical JSON cannot hold a {type(obj).__name__}")


class SigningKey:
    """An Ed25519 private key that signs ledger entries and receipts."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SigningKey":
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise InvalidInputError(f"cannot read signing key {path}: {error.strerror or error}") from None
        try:
            private_key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as error:
            raise InvalidInputError(f"{path} is not an unencrypted PEM private key: {error}") from None
        if not isinstance(private_key, Ed25519PrivateKey):
            raise InvalidInputError(f"{path} holds a {type(private_key).__name__}, not an Ed25519 key")
        return cls(private_key)

    def save(self, path: str | os.PathLike) -> None:
        """Write the key as PEM with mode 0600; an existing file is never overwritten (that would lose a key
        whose signatures are already in ledgers)."""
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(Path(path), pem)

    @property
    def public_key_text(self) -> str:
        raw = self._private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._private_key.sign(data)).decode("ascii")


def load_public_key(public_key_text: str) -> Ed25519PublicKey:
    """The key behind ``public_key_text`` (base64 of 32 raw bytes); a one-line error if it is not one."""
    raw = _b64decode(public_key_text, "public key")
    if len(raw) != PUBLIC_KEY_BYTES:
        raise InvalidInputError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_text_from_pem(pem: bytes) -> str:
    """The base64 raw form of a PEM public key (SubjectPublicKeyInfo), as an auditor may be handed one."""
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as error:
        raise InvalidInputError(f"not a PEM public key: {error}") from None
    if not isinstance(public_key, Ed25519PublicKey):
        raise InvalidInputError(f"the PEM key is a {type(public_key).__name__}, not an Ed25519 key")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def verify_signature(public_key_text: str, data: bytes, signature_text: str) -> bool:
    """True when ``signature_text`` is a valid Ed25519 signature of ``data`` by that key; any malformed input
    is simply not a valid signature."""
    try:
        public_key = load_public_key(public_key_text)
        signature = _b64decode(signature_text, "signature")
        public_key.verify(signature, data)
    except (InvalidInputError, InvalidSignature, ValueError):
        return False
    return True


def is_base64(text: Any) -> bool:
    """Whether ``text`` is base64 text (whatever it decodes to)."""
    try:
        _b64decode(text, "text")
    except InvalidInputError:
        return False
    return True


def _b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInputError(f"a {what} must be base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidInputError(f"the {what} is not valid base64") from None
