"""Named arrays packed into one byte buffer for transport, and back, bit for bit.

Flower 1.42 moves every ``Array`` of a message as separate objects, one authenticated HTTP request each, on
every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A LoRA model's ~40 trainable tensors
thus cost hundreds of requests per holder and round; one packed buffer costs a handful. The layout (name,
dtype, shape, in order) travels beside the buffer as JSON. Both the ServerApp and the holder's ClientApp
(:mod:`ewtune.flower_clientapp`) use it; a message without a layout carries plain named arrays.

A layout comes from a holder and is not trusted: only the floating-point dtypes of
:data:`coordinator.aggregation.WEIGHT_DTYPES` (float16, float32, float64, little-endian; a bfloat16 parameter travels as float32, which holds it exactly,
since numpy has no bfloat16) and shapes of non-negative integers are accepted, so that a crafted layout
(dtype object, a structured dtype, a negative or absurd shape) is a one-line refusal of that holder's reply
rather than an exception from numpy deep in the round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from accountant.errors import InvalidInputError
from coordinator.aggregation import WEIGHT_DTYPES, check_weight_dtype  # noqa: F401 - WEIGHT_DTYPES re-exported

PACKED_NAME = "packed"  # the single entry of a packed ArrayRecord
LAYOUT_KEY = "layout"  # the ConfigRecord beside it: {"json": layout}


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """(uint8 buffer, layout JSON) holding ``arrays`` in C order, each in its own dtype (little-endian)."""
    layout, parts = [], []
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise InvalidInputError(f"array {name!r} has dtype object and cannot be packed")
        little = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # keeps 0-d shapes
        layout.append([name, little.dtype.str, list(little.shape)])
        parts.append(np.ascontiguousarray(little.reshape(-1)).view(np.uint8))
    buffer = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return buffer, json.dumps(layout)


def unpack(buffer: np.ndarray, layout_json: str) -> dict[str, np.ndarray]:
    """The named arrays of :func:`pack`; a layout with a dtype outside :data:`WEIGHT_DTYPES`, a shape that is
    not a list of non-negative integers, a repeated name, or a buffer whose size disagrees is refused."""
    try:
        layout = json.loads(layout_json)
    except ValueError as bad:
        raise InvalidInputError(f"malformed array layout: {bad}") from None
    if not isinstance(layout, list):
        raise InvalidInputError("malformed array layout: not a list of [name, dtype, shape]")
    entries = [_layout_entry(entry) for entry in layout]
    if len({name for name, _, _ in entries}) != len(entries):
        raise InvalidInputError("the layout names an array twice")
    data = np.ascontiguousarray(buffer, dtype=np.uint8).reshape(-1)
    arrays, offset = {}, 0
    for name, dtype, shape in entries:
        size = dtype.itemsize * math.prod(shape)  # Python integers: a huge shape cannot wrap around
        if offset + size > data.size:
            raise InvalidInputError(f"packed buffer too short for {name!r}")
        arrays[name] = data[offset : offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != data.size:
        raise InvalidInputError(f"packed buffer has {data.size - offset} bytes beyond its layout")
    return arrays


def _layout_entry(entry) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(entry, list) or len(entry) != 3:
        raise InvalidInputError("malformed array layout: each entry must be [name, dtype, shape]")
    name, dtype_text, shape = entry
    if not isinstance(name, str) or not isinstance(dtype_text, str):
        raise InvalidInputError("malformed array layout: name and dtype must be strings")
    try:
        dtype = np.dtype(dtype_text)
    except (TypeError, ValueError):
        raise InvalidInputError(f"array {name!r} has an unknown dtype {dtype_text[:40]!r}") from None
    check_weight_dtype(name, dtype)
    if not isinstance(shape, list) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape):
        raise InvalidInputError(f"array {name!r} has shape {str(shape)[:60]}: it must be a list of integers >= 0")
    return name, dtype, tuple(shape)


def weight_records(arrays: Mapping[str, np.ndarray], packed: bool) -> dict:
    """The records that carry ``arrays``: ``{"arrays": ...}`` plus ``{"layout": ...}`` when packed."""
    if not packed:
        return {"arrays": ArrayRecord({name: Array(np.asarray(array)) for name, array in arrays.items()})}
    buffer, layout = pack(arrays)
    return {"arrays": ArrayRecord({PACKED_NAME: Array(buffer)}), LAYOUT_KEY: ConfigRecord({"json": layout})}


def weights_of(content: RecordDict) -> dict[str, np.ndarray]:
    """The named arrays a message carries, packed or not, each in one of :data:`WEIGHT_DTYPES`."""
    if "arrays" not in content:
        raise InvalidInputError("the message carries no 'arrays'")
    record = content["arrays"]
    if not isinstance(record, ArrayRecord):
        raise InvalidInputError("the message's 'arrays' is not an array record")
    if LAYOUT_KEY in content:
        if set(record) != {PACKED_NAME}:
            raise InvalidInputError(f"a packed message must carry exactly one array named {PACKED_NAME!r}")
        layout = content[LAYOUT_KEY]
        if not isinstance(layout, ConfigRecord) or not isinstance(layout.get("json"), str):
            raise InvalidInputError(f"the {LAYOUT_KEY!r} record must hold the layout as the string 'json'")
        return unpack(_numpy(PACKED_NAME, record[PACKED_NAME], packed=True), layout["json"])
    arrays = {name: _numpy(name, array, packed=False) for name, array in record.items()}
    for name, array in arrays.items():
        check_weight_dtype(name, array.dtype)
    return arrays


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
