"""Federation credentials: TLS certificates Python's ssl accepts, SuperNode keys in Flower's format."""

import ipaddress
import json
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from accountant.errors import InvalidInputError
from accountant.signing import SigningKey, verify_signature
from ewtune.keys import init_credentials, load_credentials


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    return init_credentials(tmp_path_factory.mktemp("creds") / "fed", ["holder0", "holder1"], ["127.0.0.1", "localhost"])


def test_server_certificate_has_the_sans_and_chains_to_the_ca(credentials):
    server = x509.load_pem_x509_certificate(credentials.server_certificate.read_bytes())
    ca = x509.load_pem_x509_certificate(credentials.ca_certificate.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_python_ssl_loads_the_pair_and_verifies_the_hostnames(credentials):
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(credentials.server_certificate, credentials.server_key)
    client_context = ssl.create_default_context(cafile=str(credentials.ca_certificate))
    for hostname in ("127.0.0.1", "localhost"):
        _handshake(server_context, client_context, hostname)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_context, client_context, "example.org")


def _handshake(server_context, client_context, hostname):
    """A TLS handshake over in-memory BIOs, the client checking ``hostname`` against the certificate."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def test_supernode_keys_are_in_the_format_flower_requires(credentials):
    from flwr.cli.supernode.register import try_load_public_key

    for holder in credentials.holders.values():
        private = load_ssh_private_key(holder.supernode_private_key.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = load_ssh_public_key(holder.supernode_public_key.read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert holder.supernode_public_key_line.startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(holder.supernode_public_key)  # what `flwr supernode register` runs


def test_ledger_keys_sign_and_registry_lists_every_holder(credentials):
    registry = json.loads(credentials.registry.read_text())
    assert [entry["holder_id"] for entry in registry["holders"]] == ["holder0", "holder1"]
    for entry in registry["holders"]:
        holder = credentials.holders[entry["holder_id"]]
        assert entry["ledger_public_key"] == holder.ledger_public_key
        assert entry["supernode_public_key"] == holder.supernode_public_key_line
        key = SigningKey.load(holder.ledger_key)
        assert verify_signature(entry["ledger_public_key"], b"x", key.sign(b"x"))
    coordinator = SigningKey.load(credentials.coordinator_ledger_key)
    assert coordinator.public_key_text == credentials.coordinator_ledger_public_key
    assert len({h.ledger_public_key for h in credentials.holders.values()} | {coordinator.public_key_text}) == 3


def test_private_keys_are_owner_only_and_load_credentials_round_trips(credentials):
    private_files = [credentials.ca_key, credentials.server_key, credentials.coordinator_ledger_key]
    for holder in credentials.holders.values():
        private_files += [holder.supernode_private_key, holder.ledger_key]
    for path in private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert load_credentials(credentials.directory) == credentials


def test_bad_input_and_existing_credentials_are_refused(tmp_path, credentials):
    with pytest.raises(InvalidInputError, match="not empty"):
        init_credentials(credentials.directory, ["holder0"])
    with pytest.raises(InvalidInputError, match="distinct"):
        init_credentials(tmp_path / "a", ["h", "h"])
    with pytest.raises(InvalidInputError, match="invalid holder id"):
        init_credentials(tmp_path / "b", ["../evil"])
    with pytest.raises(InvalidInputError, match="invalid address"):
        init_credentials(tmp_path / "c", ["h"], ["127.0.0.1:9092"])
    with pytest.raises(InvalidInputError, match="no supernodes.json"):
        load_credentials(tmp_path)
