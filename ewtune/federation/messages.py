"""The messages a holder and the coordinator exchange over Flower, and how weights ride in them.

The exchange (Flower's Message API; every reply answers one message of the ServerApp). What each record holds
is a message of :mod:`ewtune.federation.contract`, encoded and decoded there, the same on both sides:

- ``query`` (empty) -> :data:`DESCRIPTION`: the holder's public description, a
  :class:`~ewtune.federation.contract.HolderDescription` (holder_id; dataset_size, the noised count of its
  training records released once per data set and charged to its ledger, never the exact N; budget, spent
  certified epsilon, spent_mechanisms (its ledger's events, committed and reserved, which the planner composes
  with its plan as the daemon's own budget check does), ledger public key, model id, policy limits);
- ``train``: the global trainable weights (packed in :data:`LAYOUT`, or plain in :data:`ARRAYS`) and
  :data:`CONFIG`, the holder's :class:`~ewtune.federation.contract.RoundPlan` (with ``evaluate_round``: evaluate
  the same incoming weights, the global model after that round, first) -> one :data:`RESULT` record: a
  :class:`~ewtune.federation.contract.TrainReply` (the signed receipt as JSON text, the steps executed), the
  noised weights (packed as the request was: inside :data:`RESULT`, or plain in :data:`ARRAYS`) and, when an
  evaluation was asked, an :class:`~ewtune.federation.contract.EvaluationReply` (the metrics as a JSON object,
  or the reason none were released). Evaluation rides inside the train message so that a round costs one
  message per holder, and the reply is one record so that it costs three Flower objects (see
  :func:`weight_records`);
- ``query`` with :data:`REVEAL`, a :class:`~ewtune.federation.contract.RevealRequest` (audit runs only, after
  the last round and after the coordinator has fixed its canary scores) -> :data:`CANARIES` {holder_id, first,
  count, included: one "0"/"1" per canary, breakage}: an audit daemon's canaries and inclusion bits, revealed once;
- ``evaluate``: the weights and :data:`CONFIG`, an :class:`~ewtune.federation.contract.EvaluationRequest` ->
  :data:`METRICS` (accuracy, f1, num_examples, noise_multiplier) from a noised confusion matrix (a causal LM:
  perplexity, loss, num_examples, noise_multiplier from its noised clipped loss sums), only when the
  holder opts in to private evaluation; otherwise a refusal. Sent alone only after the last round.

A refusal or failure is a Flower ``Error`` with one of the codes below and the daemon's reason (generic for
failures after work on the data began). Nothing else leaves a holder (SECURITY.md, "What leaves a holder").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ewtune.accountant.errors import InvalidInputError
from ewtune.federation.packing import check_weight_dtype, pack, unpack

DESCRIPTION = "description"  # ConfigRecord: the reply to a query (a HolderDescription, ewtune.federation.contract)
ARRAYS = "arrays"  # ArrayRecord: trainable weights, by parameter name or packed
LAYOUT = "layout"  # ConfigRecord {LAYOUT_JSON: layout, BUFFER: packed bytes} or {LAYOUT_JSON: layout} beside a packed ArrayRecord
LAYOUT_JSON = "json"  # the packed weights' layout (ewtune.federation.packing), in LAYOUT or in a train reply's RESULT
BUFFER = "buffer"  # the packed weights' bytes, beside LAYOUT_JSON
PACKED_NAME = "packed"  # the single entry of a packed ArrayRecord
INLINE_LIMIT_BYTES = 5 * 1024 * 1024  # packed weights up to Flower's Array chunk size ride inside the LAYOUT record
CONFIG = "config"  # ConfigRecord: a train message's RoundPlan, an evaluate message's EvaluationRequest (ewtune.federation.contract)
RESULT = "result"  # ConfigRecord: all of a train reply but plain weights (its TrainReply, EvaluationReply, packed weights)
METRICS = "metrics"  # MetricRecord: the reply to an evaluate message
REVEAL = "reveal"  # ConfigRecord in a query (a RevealRequest, ewtune.federation.contract): an audit daemon's canaries, please
CANARIES = "canaries"  # ConfigRecord: the reply to a reveal

# Flower Error codes of the holder's replies.
FAILED = 4000  # anything else (the reason says what)
REFUSED = 4001  # the holder's policy or budget refuses the plan; nothing was charged
INVALID = 4002  # the message was malformed (weights or plan)
UNAVAILABLE = 4003  # the daemon is down, stopping or timed out


def weight_records(arrays: Mapping[str, np.ndarray], packed: bool, inline_limit: int = INLINE_LIMIT_BYTES,
                   record: str = LAYOUT, fields: Mapping[str, Any] | None = None) -> dict:
    """The records that carry ``arrays`` and, in the ConfigRecord ``record``, the other ``fields`` of the
    message: plain, one Flower ``Array`` per tensor in :data:`ARRAYS` (and ``record`` holding ``fields``, if
    any); packed, ``record`` holding ``fields``, the layout and, up to ``inline_limit`` bytes, the buffer itself.

    Every record, ``Array`` and array chunk is an object that each hop moves with its own signed request, and
    the one SuperLink serves all of them for every holder, one after the other for each message: a buffer
    inside a ConfigRecord is 1 object where an ``ArrayRecord`` beside it is 4 (record, ``Array``, chunk,
    layout), and a train reply whose receipt, steps, evaluation and weights share one record is 3 objects
    (message, record dict, record) where a record each was 6. A buffer larger than one Flower chunk (5 MiB)
    rides in an ``ArrayRecord``, which Flower moves in chunks. The global weights of a train message ride in a
    record of their own, :data:`LAYOUT`: the same object for every holder, which the ServerApp pushes once."""
    fields = dict(fields or {})
    if not packed:
        plain = {ARRAYS: ArrayRecord({name: Array(np.asarray(array)) for name, array in arrays.items()})}
        return {**plain, record: ConfigRecord(fields)} if fields else plain
    buffer, layout = pack(arrays)
    if buffer.nbytes <= inline_limit:
        return {record: ConfigRecord({**fields, LAYOUT_JSON: layout, BUFFER: buffer.tobytes()})}
    return {ARRAYS: ArrayRecord({PACKED_NAME: Array(buffer)}), record: ConfigRecord({**fields, LAYOUT_JSON: layout})}


def unpack_in_place(content: RecordDict) -> bool:
    """Replace packed weights in ``content`` by the named arrays; True when they were packed."""
    if LAYOUT not in content:
        return False
    content[ARRAYS] = weight_records(weights_of(content), packed=False)[ARRAYS]
    del content[LAYOUT]
    return True


def weights_of(content: RecordDict, record: str = LAYOUT) -> dict[str, np.ndarray]:
    """The named arrays a message carries, packed (their layout in ``record``, the buffer inline or beside) or
    not, each in one of :data:`WEIGHT_DTYPES`."""
    if record in content and (record == LAYOUT or LAYOUT_JSON in content[record]):
        layout = content[record]
        if not isinstance(layout, ConfigRecord) or not isinstance(layout.get(LAYOUT_JSON), str):
            raise InvalidInputError(f"the {record!r} record must hold the layout as the string {LAYOUT_JSON!r}")
        return unpack(_packed_buffer(content, layout, record), layout[LAYOUT_JSON])
    arrays = {name: _numpy(name, array, packed=False) for name, array in _array_record(content).items()}
    for name, array in arrays.items():
        check_weight_dtype(name, array.dtype)
    return arrays


def _packed_buffer(content: RecordDict, layout: ConfigRecord, record: str) -> np.ndarray:
    if BUFFER in layout:
        if ARRAYS in content:
            raise InvalidInputError(f"packed weights must ride either inside {record!r} or in {ARRAYS!r}, not both")
        if not isinstance(layout[BUFFER], bytes):
            raise InvalidInputError(f"the {record!r} record's {BUFFER!r} must be bytes")
        return np.frombuffer(layout[BUFFER], dtype=np.uint8)
    beside = _array_record(content)
    if set(beside) != {PACKED_NAME}:
        raise InvalidInputError(f"a packed message must carry exactly one array named {PACKED_NAME!r}")
    return _numpy(PACKED_NAME, beside[PACKED_NAME], packed=True)


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
