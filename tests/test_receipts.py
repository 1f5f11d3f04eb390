"""Signed receipts: a holder's attestation of the event it executed and the update it released."""

import json

import numpy as np
import pytest

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.receipts import Receipt, receipt_digest, sign_receipt, update_digest, verify_receipt
from ewtune.accountant.signing import SigningKey, canonical_json

EVENT = PoissonGaussianEvent(sampling_rate=0.01, noise_multiplier=1.1, steps=30)


def _update():
    return {"lora.A": np.arange(6, dtype=np.float32).reshape(2, 3), "lora.B": np.ones(4, dtype=np.float32)}


def _receipt(update=None):
    return Receipt("run-7", 2, "holder0", EVENT, update_digest(update if update is not None else _update()))


def test_signed_receipt_verifies_and_round_trips_through_json_text():
    key = SigningKey.generate()
    document = sign_receipt(key, _receipt())
    text = json.dumps(document)
    assert verify_receipt(text, key.public_key_text) == _receipt()
    assert verify_receipt(json.loads(text), key.public_key_text).event == EVENT


def test_composed_event_survives_signing():
    key = SigningKey.generate()
    event = compose(EVENT, PoissonGaussianEvent(0.02, 0.9, 5))
    receipt = Receipt("r", 0, "h", event, update_digest(_update()))
    assert verify_receipt(sign_receipt(key, receipt), key.public_key_text).event == event


def test_wrong_key_is_rejected():
    document = sign_receipt(SigningKey.generate(), _receipt())
    with pytest.raises(InvalidInputError, match="signature does not verify"):
        verify_receipt(document, SigningKey.generate().public_key_text)


@pytest.mark.parametrize(
    "field, value",
    [
        (("event", "event", "noise_multiplier"), 5.0),
        (("event", "event", "steps"), 3),
        (("update_sha256",), "0" * 64),
        (("round",), 3),
        (("holder_id",), "holder1"),
        (("run_id",), "run-8"),
    ],
)
def test_any_altered_field_is_rejected(field, value):
    key = SigningKey.generate()
    document = sign_receipt(key, _receipt())
    target = document["receipt"]
    for name in field[:-1]:
        target = target[name]
    assert target[field[-1]] != value
    target[field[-1]] = value
    with pytest.raises(InvalidInputError, match="signature does not verify"):
        verify_receipt(document, key.public_key_text)


def test_altered_update_no_longer_matches_the_receipt():
    key = SigningKey.generate()
    receipt = verify_receipt(sign_receipt(key, _receipt()), key.public_key_text)
    tampered = _update()
    tampered["lora.B"][0] += np.float32(1e-6)
    assert receipt.update_sha256 == update_digest(_update())
    assert receipt.update_sha256 != update_digest(tampered)


@pytest.mark.parametrize("bad", [{}, {"receipt": {}}, {"receipt": {}, "signature": 3}, "not json", [1]])
def test_malformed_documents_are_rejected_with_a_clear_error(bad):
    with pytest.raises(InvalidInputError):
        verify_receipt(bad, SigningKey.generate().public_key_text)


def test_a_signed_body_of_another_kind_is_not_a_receipt():
    key = SigningKey.generate()
    document = sign_receipt(key, _receipt())
    body = dict(document["receipt"], kind="ewtune.ledger")
    forged = {"receipt": body, "signature": key.sign(canonical_json(body))}
    with pytest.raises(InvalidInputError, match="not a receipt"):
        verify_receipt(forged, key.public_key_text)


def test_digest_depends_on_names_dtype_shape_and_values_not_on_order_or_memory_layout():
    base = update_digest(_update())
    reordered = dict(reversed(list(_update().items())))
    assert update_digest(reordered) == base
    fortran = _update()
    fortran["lora.A"] = np.asfortranarray(fortran["lora.A"])
    big_endian = _update()
    big_endian["lora.A"] = big_endian["lora.A"].astype(">f4")
    assert update_digest(fortran) == base
    assert update_digest(big_endian) == base
    renamed = {("lora.C" if k == "lora.B" else k): v for k, v in _update().items()}
    reshaped = dict(_update(), **{"lora.A": _update()["lora.A"].reshape(3, 2)})
    retyped = dict(_update(), **{"lora.B": np.ones(4, dtype=np.float64)})
    digests = {update_digest(x) for x in (renamed, reshaped, retyped)}
    assert base not in digests and len(digests) == 3
    # length prefixes: moving bytes between a name and the next field cannot collide
    assert update_digest({"ab": np.zeros(1, np.uint8)}) != update_digest({"a": np.zeros(1, np.uint8)})


def test_invalid_receipt_fields_are_refused():
    with pytest.raises(InvalidInputError, match="update_sha256"):
        Receipt("r", 0, "h", EVENT, "xyz")
    with pytest.raises(InvalidInputError, match="round"):
        Receipt("r", -1, "h", EVENT, "0" * 64)
    with pytest.raises(InvalidInputError, match="object"):
        update_digest({"x": np.array([object()])})


def test_the_receipt_digest_is_the_same_on_both_sides_of_the_wire_and_names_one_receipt():
    """The holder hashes the document it sends, the coordinator the document as it parsed it on arrival;
    the bug this catches is a digest of the text as written (key order, spacing), which would make every
    cross-check of a holder's ledger against the coordinator's fail."""
    key = SigningKey.generate()
    sent = sign_receipt(key, _receipt())
    arrived = json.loads(json.dumps({name: sent[name] for name in reversed(list(sent))}, indent=4))
    assert json.dumps(arrived) != json.dumps(sent)  # the text differs...
    assert receipt_digest(arrived) == receipt_digest(sent)  # ...the digest does not
    other_round = sign_receipt(key, Receipt("run-7", 3, "holder0", EVENT, update_digest(_update())))  # round 3, not 2
    assert receipt_digest(other_round) != receipt_digest(sent)
