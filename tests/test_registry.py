"""The holder registry pins SuperNode key -> holder id -> ledger key; a node is accepted only when the
SuperLink's record of its key (PEM bytes, as Flower 1.42's NodeInfo.public_key holds them) is registered
and its description claims exactly the registered holder id and ledger key."""

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import SigningKey
from ewtune.coordinator.registry import Registry, new_registry
from ewtune.federation.cards import holder_card


def _holder(holder_id):
    node_key = ec.generate_private_key(ec.SECP384R1())
    line = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    pem = node_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ledger = SigningKey.generate().public_key_text
    return holder_card({"holder_id": holder_id, "supernode_public_key": f"{line} ewtune-{holder_id}", "ledger_public_key": ledger}), pem


@pytest.fixture()
def registry(tmp_path):
    (a, a_pem), (b, b_pem) = _holder("a"), _holder("b")
    registry = new_registry(tmp_path / "supernodes.json", ("127.0.0.1",)).with_holder(a).with_holder(b)
    registry.save()
    return Registry.load(registry.path), {"a": (a, a_pem), "b": (b, b_pem)}


def test_the_registered_node_is_accepted(registry):
    registry, holders = registry
    a, pem = holders["a"]
    assert registry.check_node(1, pem, "a", a.ledger_public_key) == a
    assert a.supernode_public_key.count(" ") == 1  # the card's comment is not kept


def test_a_node_claiming_another_holder_s_id_is_rejected(registry):
    registry, holders = registry
    a, a_pem = holders["a"]
    b, _ = holders["b"]
    with pytest.raises(InvalidInputError, match="claims holder id 'b' but its SuperNode key is registered to 'a'"):
        registry.check_node(1, a_pem, "b", b.ledger_public_key)


def test_a_node_giving_another_ledger_key_is_rejected(registry):
    registry, holders = registry
    _, a_pem = holders["a"]
    with pytest.raises(InvalidInputError, match="ledger key other than the registered one"):
        registry.check_node(1, a_pem, "a", SigningKey.generate().public_key_text)


def test_an_unregistered_or_missing_node_key_is_rejected(registry):
    registry, holders = registry
    _, stranger_pem = _holder("a")
    a, _ = holders["a"]
    with pytest.raises(InvalidInputError, match="not in the holder registry"):
        registry.check_node(1, stranger_pem, "a", a.ledger_public_key)
    for missing in (b"", None, b"garbage"):
        with pytest.raises(InvalidInputError, match="no SuperNode public key"):
            registry.check_node(1, missing, "a", a.ledger_public_key)


def test_malformed_registry_files_are_one_line_errors(tmp_path):
    path = tmp_path / "supernodes.json"
    with pytest.raises(InvalidInputError, match="does not exist"):
        Registry.load(path)
    path.write_text("{")
    with pytest.raises(InvalidInputError, match="not JSON"):
        Registry.load(path)
    path.write_text(json.dumps({"holders": {}}))
    with pytest.raises(InvalidInputError, match="lacks the list"):
        Registry.load(path)
    a, _ = _holder("a")
    path.write_text(json.dumps({"holders": [a.to_json(), a.to_json()]}))
    with pytest.raises(InvalidInputError, match="already registered"):
        Registry.load(path)
