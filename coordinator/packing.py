"""Named arrays packed into one byte buffer for transport, and back, bit for bit.

Flower 1.42 moves every ``Array`` of a message as separate objects, one authenticated HTTP request each, on
every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A LoRA model's ~40 trainable tensors
thus cost hundreds of requests per holder and round; one packed buffer costs a handful. The layout (name,
dtype, shape, in order) travels beside the buffer as JSON. Both the ServerApp and the holder's ClientApp
(:mod:`ewtune.flower_clientapp`) use it; a message without a layout carries plain named arrays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from accountant.errors import InvalidInputError

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
    """The named arrays of :func:`pack`; a buffer whose size disagrees with the layout is refused."""
    try:
        layout = json.loads(layout_json)
        entries = [(str(name), np.dtype(dtype), tuple(int(n) for n in shape)) for name, dtype, shape in layout]
    except (ValueError, TypeError) as bad:
        raise InvalidInputError(f"malformed array layout: {bad}") from None
    data = np.ascontiguousarray(buffer, dtype=np.uint8).reshape(-1)
    arrays, offset = {}, 0
    for name, dtype, shape in entries:
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if offset + size > data.size:
            raise InvalidInputError(f"packed buffer too short for {name!r}")
        arrays[name] = data[offset : offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != data.size:
        raise InvalidInputError(f"packed buffer has {data.size - offset} bytes beyond its layout")
    if len(arrays) != len(entries):
        raise InvalidInputError("the layout names an array twice")
    return arrays


def weight_records(arrays: Mapping[str, np.ndarray], packed: bool) -> dict:
    """The records that carry ``arrays``: ``{"arrays": ...}`` plus ``{"layout": ...}`` when packed."""
    if not packed:
        return {"arrays": ArrayRecord({name: Array(np.asarray(array)) for name, array in arrays.items()})}
    buffer, layout = pack(arrays)
    return {"arrays": ArrayRecord({PACKED_NAME: Array(buffer)}), LAYOUT_KEY: ConfigRecord({"json": layout})}


def weights_of(content: RecordDict) -> dict[str, np.ndarray]:
    """The named arrays a message carries, packed or not."""
    if "arrays" not in content:
        raise InvalidInputError("the message carries no 'arrays'")
    arrays = {name: array.numpy() for name, array in content["arrays"].items()}
    if LAYOUT_KEY not in content:
        return arrays
    if set(arrays) != {PACKED_NAME}:
        raise InvalidInputError(f"a packed message must carry exactly one array named {PACKED_NAME!r}")
    return unpack(arrays[PACKED_NAME], str(content[LAYOUT_KEY].get("json", "")))
