"""The coordinator's check of a holder's train reply before its update may be aggregated.

A reply is accepted only when:
- the receipt's signature verifies under the ledger key the holder gave at query time;
- it names this run, this round and this holder;
- its event is the planned mechanism (the same q and sigma, compared exactly, add/remove) with at most the
  planned steps, and at least one step (an update with no step released nothing and is not an update);
- the SHA-256 of the arrays received equals the receipt's ``update_sha256`` (:func:`ewtune.accountant.receipts.update_digest`).
Anything else raises :class:`ReceiptRejected` naming what is wrong; the update is then discarded.

q and sigma are compared for exact equality, the rule :meth:`ewtune.accountant.ledger.Ledger.commit` applies to an
executed event against its reservation: the planner's floats travel to the holder and back in JSON doubles,
which round-trip exactly, so any difference at all is a different mechanism. A tolerance here would let
through a receipt the ledger then refuses (and the epsilon of the two would not be the one reserved).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent, mechanisms
from ewtune.accountant.receipts import Receipt, update_digest, verify_receipt


class ReceiptRejected(InvalidInputError):
    """A train reply failed verification; its update is not aggregated."""


def check_receipt(
    document: Any,
    arrays: Mapping[str, np.ndarray],
    *,
    public_key: str,
    run_id: str,
    round: int,
    holder_id: str,
    planned: PoissonGaussianEvent,
) -> Receipt:
    """The verified receipt of one train reply, or :class:`ReceiptRejected`."""
    try:
        receipt = verify_receipt(document, public_key)
    except InvalidInputError as failure:
        raise ReceiptRejected(f"receipt of {holder_id}: {failure}") from None
    expected = {"run_id": run_id, "round": round, "holder_id": holder_id}
    for name, value in expected.items():
        if getattr(receipt, name) != value:
            raise ReceiptRejected(f"receipt of {holder_id}: {name} is {getattr(receipt, name)!r}, expected {value!r}")
    _check_event(receipt, planned)
    try:
        digest = update_digest(arrays)
    except InvalidInputError as failure:
        raise ReceiptRejected(f"update of {holder_id}: {failure}") from None
    if digest != receipt.update_sha256:
        raise ReceiptRejected(f"update of {holder_id} does not match its receipt (SHA-256 {digest[:12]}... != {receipt.update_sha256[:12]}...)")
    return receipt


def _check_event(receipt: Receipt, planned: PoissonGaussianEvent) -> None:
    executed = mechanisms(receipt.event)
    if len(executed) != 1:
        raise ReceiptRejected(f"receipt of {receipt.holder_id}: the event mixes {len(executed)} mechanisms, one was planned")
    ((q, sigma, relation), steps), = executed.items()
    if relation != Neighbouring.ADD_REMOVE or relation != planned.neighbouring:
        raise ReceiptRejected(f"receipt of {receipt.holder_id}: neighbouring {relation.value}, planned {planned.neighbouring.value}")
    if q != planned.sampling_rate or sigma != planned.noise_multiplier:
        raise ReceiptRejected(
            f"receipt of {receipt.holder_id}: executed q={q!r}, sigma={sigma!r}; planned "
            f"q={planned.sampling_rate!r}, sigma={planned.noise_multiplier!r} (must be equal exactly)"
        )
    if not 1 <= steps <= planned.steps:
        raise ReceiptRejected(f"receipt of {receipt.holder_id}: {steps} steps executed, planned at most {planned.steps}")
