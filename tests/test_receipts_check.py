"""The coordinator accepts a train reply only with a valid receipt: signature by the key learned at query
time, this run/round/holder, the planned mechanism, and the digest of the arrays actually received."""

import json

import numpy as np
import pytest

from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.receipts import Receipt, sign_receipt, update_digest
from ewtune.accountant.signing import SigningKey
from ewtune.coordinator.receipts_check import ReceiptRejected, check_receipt

PLANNED = PoissonGaussianEvent(0.05, 1.3, 10)


@pytest.fixture(scope="module")
def key():
    return SigningKey.generate()


def _arrays():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.float32)}


def _signed(key, event=PLANNED, arrays=None, run_id="run-1", round=2, holder_id="h0"):
    receipt = Receipt(run_id, round, holder_id, event, update_digest(arrays or _arrays()))
    return json.dumps(sign_receipt(key, receipt))


def _check(document, key, arrays=None, planned=PLANNED):
    return check_receipt(
        document, arrays or _arrays(), public_key=key.public_key_text, run_id="run-1", round=2, holder_id="h0", planned=planned
    )


def test_valid_receipt_is_accepted_with_fewer_steps(key):
    executed = PoissonGaussianEvent(0.05, 1.3, 7)
    receipt = _check(_signed(key, event=executed), key)
    assert receipt.event == executed


def test_wrong_key_is_rejected(key):
    with pytest.raises(ReceiptRejected, match="signature"):
        _check(_signed(SigningKey.generate()), key)


def test_altered_event_breaks_the_signature(key):
    document = json.loads(_signed(key))
    document["receipt"]["event"]["event"]["noise_multiplier"] = 2.0
    with pytest.raises(ReceiptRejected, match="signature"):
        _check(json.dumps(document), key)


def test_altered_update_is_rejected(key):
    arrays = _arrays()
    arrays["w"][0, 0] += 1e-3
    with pytest.raises(ReceiptRejected, match="does not match its receipt"):
        _check(_signed(key), key, arrays=arrays)


@pytest.mark.parametrize(
    "event, message",
    [
        (PoissonGaussianEvent(0.05, 1.0, 10), "sigma"),
        (PoissonGaussianEvent(0.1, 1.3, 10), "q="),
        (PoissonGaussianEvent(0.05, 1.3, 11), "11 steps"),
        (compose(PoissonGaussianEvent(0.05, 1.3, 5), PoissonGaussianEvent(0.05, 2.0, 5)), "mixes"),
    ],
)
def test_event_inconsistent_with_the_plan_is_rejected(key, event, message):
    with pytest.raises(ReceiptRejected, match=message):
        _check(_signed(key, event=event), key)


@pytest.mark.parametrize("field, value", [("run_id", "run-2"), ("round", 3), ("holder_id", "h1")])
def test_receipt_for_another_run_round_or_holder_is_rejected(key, field, value):
    with pytest.raises(ReceiptRejected, match=field):
        _check(_signed(key, **{field: value}), key)


def test_malformed_document_is_rejected(key):
    with pytest.raises(ReceiptRejected):
        _check("{not json", key)


def test_a_single_mechanism_composed_event_is_accepted(key):
    executed = compose(PoissonGaussianEvent(0.05, 1.3, 4), PoissonGaussianEvent(0.05, 1.3, 3))
    assert _check(_signed(key, event=executed), key).event == executed


@pytest.mark.parametrize("field", ["sampling_rate", "noise_multiplier"])
def test_q_or_sigma_one_ulp_off_the_plan_is_rejected(key, field):
    """The ledger commits only an exactly planned mechanism, so the receipt check demands the same."""
    values = {"sampling_rate": PLANNED.sampling_rate, "noise_multiplier": PLANNED.noise_multiplier}
    values[field] = float(np.nextafter(values[field], 2.0))
    with pytest.raises(ReceiptRejected, match="must be equal exactly"):
        _check(_signed(key, event=PoissonGaussianEvent(steps=10, **values)), key)
