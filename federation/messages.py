"""The messages a holder and the coordinator exchange over Flower, and how weights ride in them.

The exchange (Flower's Message API; every reply answers one message of the ServerApp):

- ``query`` (empty) -> :data:`DESCRIPTION`: the holder's public description (holder_id, dataset_size, budget,
  spent certified epsilon, ledger public key, model id, policy limits; ``agent.daemon.Daemon.describe``);
- ``train``: the global trainable weights (packed in :data:`LAYOUT`, or plain in :data:`ARRAYS`) and
  :data:`CONFIG` (the holder's plan: run_id, round, sampling rate, noise multiplier, steps, clip norm,
  learning rate, delta), and optionally :data:`EVALUATE` {run_id, round}: evaluate the same incoming weights
  (the global model after that round) first -> the noised weights (packed as the request was), :data:`RECEIPT` {:data:`RECEIPT_DOCUMENT`: the signed receipt as JSON text}, :data:`METRICS`
  {steps: the steps executed} and, when :data:`EVALUATE` was asked, either :data:`EVALUATION` (the
  evaluation's metrics, as below) or :data:`EVALUATION_REFUSED` {reason}. Evaluation rides inside the train
  message so that a round costs one message per holder;
- ``query`` with :data:`REVEAL` {run_id, scores_sha256} (audit runs only, after the last round and after the
  coordinator has fixed its canary scores) -> :data:`CANARIES` {holder_id, first, count, included: one "0"/"1"
  per canary, breakage}: an audit daemon's canaries and inclusion bits, revealed once;
- ``evaluate``: the weights and :data:`CONFIG` {run_id, round} -> :data:`METRICS` (accuracy, f1,
  num_examples, noise_multiplier) from a noised confusion matrix, only when the holder opts in to private
  evaluation; otherwise a refusal. Sent alone only after the last round.

A refusal or failure is a Flower ``Error`` with one of the codes below and the daemon's reason (generic for
failures after work on the data began). Nothing else leaves a holder (SECURITY.md, "What leaves a holder").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from accountant.errors import InvalidInputError
from federation.packing import check_weight_dtype, pack, unpack

DESCRIPTION = "description"  # ConfigRecord: the reply to a query
ARRAYS = "arrays"  # ArrayRecord: trainable weights, by parameter name or packed
LAYOUT = "layout"  # ConfigRecord {"json": layout, BUFFER: packed bytes} or {"json": layout} beside a packed ArrayRecord
BUFFER = "buffer"  # the packed weights' bytes, inside the LAYOUT record
PACKED_NAME = "packed"  # the single entry of a packed ArrayRecord
INLINE_LIMIT_BYTES = 5 * 1024 * 1024  # packed weights up to Flower's Array chunk size ride inside the LAYOUT record
CONFIG = "config"  # ConfigRecord: the plan of a train message, {run_id, round} of an evaluate message
RECEIPT = "receipt"  # ConfigRecord {RECEIPT_DOCUMENT: JSON text}
RECEIPT_DOCUMENT = "document"
METRICS = "metrics"  # MetricRecord
EVALUATE = "evaluate"  # ConfigRecord {run_id, round} in a train message: evaluate the incoming weights first
EVALUATION = "evaluation"  # MetricRecord in a train reply: the metrics of that evaluation
EVALUATION_REFUSED = "evaluation_refused"  # ConfigRecord {"reason": text} in a train reply: none released
REVEAL = "reveal"  # ConfigRecord {run_id, scores_sha256} in a query: an audit daemon's canaries, please
CANARIES = "canaries"  # ConfigRecord: the reply to a reveal
PURPOSE = "purpose"  # in a train message's CONFIG: accountant.ledger.AUDIT_PURPOSE for an audit run's round

# Flower Error codes of the holder's replies.
FAILED = 4000  # anything else (the reason says what)
REFUSED = 4001  # the holder's policy or budget refuses the plan; nothing was charged
INVALID = 4002  # the message was malformed (weights or plan)
UNAVAILABLE = 4003  # the daemon is down, stopping or timed out

# The SuperNode's node config (``flower-supernode --node-config``), read by the ClientApp.
DAEMON_ADDRESS_KEY = "daemon-address"
DAEMON_TIMEOUT_KEY = "daemon-timeout-s"
HOLDER_ID_KEY = "holder-id"


def weight_records(arrays: Mapping[str, np.ndarray], packed: bool, inline_limit: int = INLINE_LIMIT_BYTES) -> dict:
    """The records that carry ``arrays``: plain, one Flower ``Array`` per tensor in :data:`ARRAYS`; packed, one
    :data:`LAYOUT` record holding the layout and, up to ``inline_limit`` bytes, the buffer itself.

    Every record, ``Array`` and array chunk is an object that each hop moves with its own signed request, and
    the one SuperLink serves all of them for every holder: a buffer inside the layout record is 1 object where
    an ``ArrayRecord`` beside it is 4 (record, ``Array``, chunk, layout), so a round costs each holder 6 fewer
    requests. A buffer larger than one Flower chunk (5 MiB) rides in an ``ArrayRecord``, which Flower moves in
    chunks."""
    if not packed:
        return {ARRAYS: ArrayRecord({name: Array(np.asarray(array)) for name, array in arrays.items()})}
    buffer, layout = pack(arrays)
    if buffer.nbytes <= inline_limit:
        return {LAYOUT: ConfigRecord({"json": layout, BUFFER: buffer.tobytes()})}
    return {ARRAYS: ArrayRecord({PACKED_NAME: Array(buffer)}), LAYOUT: ConfigRecord({"json": layout})}


def unpack_in_place(content: RecordDict) -> bool:
    """Replace packed weights in ``content`` by the named arrays; True when they were packed."""
    if LAYOUT not in content:
        return False
    content[ARRAYS] = weight_records(weights_of(content), packed=False)[ARRAYS]
    del content[LAYOUT]
    return True


def weights_of(content: RecordDict) -> dict[str, np.ndarray]:
    """The named arrays a message carries, packed (inline or beside) or not, each in one of :data:`WEIGHT_DTYPES`."""
    if LAYOUT in content:
        layout = content[LAYOUT]
        if not isinstance(layout, ConfigRecord) or not isinstance(layout.get("json"), str):
            raise InvalidInputError(f"the {LAYOUT!r} record must hold the layout as the string 'json'")
        return unpack(_packed_buffer(content, layout), layout["json"])
    record = _array_record(content)
    arrays = {name: _numpy(name, array, packed=False) for name, array in record.items()}
    for name, array in arrays.items():
        check_weight_dtype(name, array.dtype)
    return arrays


def _packed_buffer(content: RecordDict, layout: ConfigRecord) -> np.ndarray:
    if BUFFER in layout:
        if ARRAYS in content:
            raise InvalidInputError(f"packed weights must ride either inside {LAYOUT!r} or in {ARRAYS!r}, not both")
        if not isinstance(layout[BUFFER], bytes):
            raise InvalidInputError(f"the {LAYOUT!r} record's {BUFFER!r} must be bytes")
        return np.frombuffer(layout[BUFFER], dtype=np.uint8)
    record = _array_record(content)
    if set(record) != {PACKED_NAME}:
        raise InvalidInputError(f"a packed message must carry exactly one array named {PACKED_NAME!r}")
    return _numpy(PACKED_NAME, record[PACKED_NAME], packed=True)


def _array_record(content: RecordDict) -> ArrayRecord:
    if ARRAYS not in content:
        raise InvalidInputError(f"the message carries no {ARRAYS!r}")
    record = content[ARRAYS]
    if not isinstance(record, ArrayRecord):
        raise InvalidInputError(f"the message's {ARRAYS!r} is not an array record")
    return record


def _numpy(name: str, array: Array, packed: bool) -> np.ndarray:
    """The array's values, or a one-line refusal: Flower deserialises the bytes a holder sent, and a
    crafted ``Array`` (inconsistent dtype, shape and data) raises whatever numpy raises."""
    try:
        values = array.numpy()
    except Exception as bad:  # noqa: BLE001 - any failure to decode is the holder's malformed reply
        raise InvalidInputError(f"array {name!r} cannot be decoded: {type(bad).__name__}: {str(bad)[:120]}") from None
    if packed and values.dtype != np.uint8:
        raise InvalidInputError(f"the packed buffer must be uint8, got {values.dtype.str!r}")
    return values
