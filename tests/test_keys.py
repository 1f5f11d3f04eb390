"""The coordinator's credentials: TLS certificates Python's ssl accepts, its ledger key, and a registry of the
holders' public cards (the holders generate their own keys: tests/test_agent_keys.py)."""

import ipaddress
import json
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import SigningKey, verify_signature
from ewtune.agent.keys import init_holder_keys
from ewtune.coordinator.credentials import add_holder, init_credentials, load_credentials


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    root = tmp_path_factory.mktemp("creds")
    credentials = init_credentials(root / "fed", ["127.0.0.1", "localhost"])
    for holder_id in ("holder0", "holder1"):
        add_holder(credentials.directory, init_holder_keys(root / "holders" / holder_id, holder_id).card)
    return load_credentials(credentials.directory)


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


def test_registered_public_keys_are_what_flwr_supernode_register_reads(credentials):
    from flwr.cli.supernode.register import try_load_public_key

    for holder in credentials.holders.values():
        public = load_ssh_public_key(holder.supernode_public_key.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert holder.supernode_public_key_line.startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(holder.supernode_public_key)  # what `flwr supernode register` runs


def test_registry_lists_every_holder_and_the_coordinator_holds_no_holder_private_key(credentials):
    registry = json.loads(credentials.registry.read_text())
    assert [entry["holder_id"] for entry in registry["holders"]] == ["holder0", "holder1"]
    for entry in registry["holders"]:
        holder = credentials.holders[entry["holder_id"]]
        assert entry["ledger_public_key"] == holder.ledger_public_key
        assert entry["supernode_public_key"] == holder.supernode_public_key_line
    coordinator = SigningKey.load(credentials.coordinator_ledger_key)
    assert coordinator.public_key_text == credentials.coordinator_ledger_public_key
    keys = [path for path in credentials.directory.rglob("*") if path.is_file() and path.suffix == ".key"]
    assert sorted(path.relative_to(credentials.directory).as_posix() for path in keys) == [
        "ca/ca.key", "coordinator/ledger.key", "superlink/server.key"
    ]


def test_private_keys_are_owner_only_and_load_credentials_round_trips(credentials):
    for path in [credentials.ca_key, credentials.server_key, credentials.coordinator_ledger_key]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert load_credentials(credentials.directory) == credentials


def test_duplicate_holder_ids_and_keys_are_refused(tmp_path, credentials):
    """A second card with a registered holder id, SuperNode key or ledger key is refused; the registry is
    unchanged."""
    before = credentials.registry.read_text()
    first = json.loads((credentials.directory.parent / "holders" / "holder0" / "holder.json").read_text())
    fresh = init_holder_keys(tmp_path / "fresh", "fresh").public_card().to_json()
    cases = {
        "holder id 'holder0' is already registered": {**fresh, "holder_id": "holder0"},
        "SuperNode key of 'copycat' is already registered to 'holder0'": {**fresh, "holder_id": "copycat", "supernode_public_key": first["supernode_public_key"]},
        "ledger key of 'copycat' is already registered to 'holder0'": {**fresh, "holder_id": "copycat", "ledger_public_key": first["ledger_public_key"]},
    }
    for message, card in cases.items():
        path = tmp_path / "card.json"
        path.write_text(json.dumps(card))
        with pytest.raises(InvalidInputError, match=message):
            add_holder(credentials.directory, path)
    assert credentials.registry.read_text() == before


@pytest.mark.parametrize(
    "card, message",
    [
        ({"holder_id": "x", "supernode_public_key": "ssh-ed25519 AAAA", "ledger_public_key": "x"}, "OpenSSH"),
        ({"holder_id": "../evil", "supernode_public_key": "x", "ledger_public_key": "x"}, "invalid holder id"),
        ({"holder_id": "x"}, "lacks"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_cards_are_refused(tmp_path, credentials, card, message):
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(InvalidInputError, match=message):
        add_holder(credentials.directory, path)


def test_bad_input_and_existing_credentials_are_refused(tmp_path, credentials):
    with pytest.raises(InvalidInputError, match="not empty"):
        init_credentials(credentials.directory)
    with pytest.raises(InvalidInputError, match="invalid address"):
        init_credentials(tmp_path / "c", ["127.0.0.1:9092"])
    with pytest.raises(InvalidInputError, match="no supernodes.json"):
        load_credentials(tmp_path)


def test_a_missing_or_unreadable_key_file_is_named_not_blamed_on_its_contents(tmp_path, credentials):
    import shutil

    copy = tmp_path / "fed"
    shutil.copytree(credentials.directory, copy)
    public = copy / "coordinator" / "ledger.pub"
    public.unlink()  # before: a FileNotFoundError traceback out of load_credentials
    with pytest.raises(InvalidInputError, match=r"cannot read the coordinator's ledger public key .*ledger\.pub: No such file"):
        load_credentials(copy)
    public.write_text("not base64!\n")
    with pytest.raises(InvalidInputError, match=r"ledger\.pub: the public key is not valid base64"):
        load_credentials(copy)
    (tmp_path / "card").mkdir()
    with pytest.raises(InvalidInputError, match=r"cannot read holder card .*card: Is a directory"):
        add_holder(credentials.directory, tmp_path / "card")
