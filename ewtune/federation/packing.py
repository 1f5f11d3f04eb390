"""Named arrays packed into one byte buffer for transport, and back, bit for bit.

Flower 1.42 moves every ``Array`` of a message as separate objects, one authenticated HTTP request each, on
every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A LoRA model's ~40 trainable tensors
thus cost hundreds of requests per holder and round; one packed buffer costs a handful. The layout (name,
dtype, shape, in order) travels beside the buffer as JSON (:func:`ewtune.federation.messages.weight_records`).
Imports numpy only.

A layout comes from a holder and is not trusted: only the floating-point dtypes of
:data:`WEIGHT_DTYPES` (float16, float32, float64, little-endian; a bfloat16 parameter travels as float32, which holds it exactly,
since numpy has no bfloat16) and shapes of non-negative integers are accepted, so that a crafted layout
(dtype object, a structured dtype, a negative or absurd shape) is a one-line refusal of that holder's reply
rather than an exception from numpy deep in the round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from ewtune.accountant.errors import InvalidInputError

WEIGHT_DTYPES = tuple(np.dtype(name) for name in ("<f2", "<f4", "<f8"))  # the only dtypes weights travel in


def check_weight_dtype(name: str, dtype: np.dtype) -> None:
    """Refuse an array whose dtype is not one weights travel in (:data:`WEIGHT_DTYPES`, either byte order):
    float16, float32 or float64 (a bfloat16 parameter travels as float32, which holds it exactly)."""
    if np.dtype(dtype).newbyteorder("<") not in WEIGHT_DTYPES:
        raise InvalidInputError(f"array {name!r} has dtype {np.dtype(dtype).str!r}; weights travel as float16, float32 or float64")


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
    except (ValueError, RecursionError) as bad:  # RecursionError: nesting deeper than the parser goes
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
