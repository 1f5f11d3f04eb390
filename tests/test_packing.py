"""Packing named arrays into one transport buffer is exact and refuses inconsistent layouts."""

import numpy as np
import pytest

from accountant.errors import InvalidInputError
from accountant.receipts import update_digest
from coordinator.packing import LAYOUT_KEY, pack, unpack, weight_records, weights_of
from flwr.app import RecordDict

ARRAYS = {
    "layer.lora_A.default.weight": np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32),
    "head.bias": np.array([1.5, -2.0], dtype=np.float64),
    "scalar": np.array(3.0, dtype=np.float16),
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def test_round_trip_is_bit_exact_and_keeps_the_digest():
    buffer, layout = pack(ARRAYS)
    assert buffer.dtype == np.uint8 and buffer.ndim == 1
    restored = unpack(buffer, layout)
    assert list(restored) == list(ARRAYS)
    for name, array in ARRAYS.items():
        assert restored[name].dtype == array.dtype and restored[name].shape == array.shape
        np.testing.assert_array_equal(restored[name], array)
    assert update_digest(restored) == update_digest(ARRAYS)


def test_records_round_trip_packed_and_plain():
    for packed in (True, False):
        content = RecordDict(weight_records(ARRAYS, packed))
        assert (LAYOUT_KEY in content) == packed
        assert len(content["arrays"]) == (1 if packed else len(ARRAYS))
        restored = weights_of(content)
        assert update_digest(restored) == update_digest(ARRAYS)


def test_inconsistent_buffers_are_refused():
    buffer, layout = pack(ARRAYS)
    with pytest.raises(InvalidInputError, match="too short"):
        unpack(buffer[:-8], layout)
    with pytest.raises(InvalidInputError, match="beyond its layout"):
        unpack(np.concatenate([buffer, np.zeros(4, np.uint8)]), layout)
    with pytest.raises(InvalidInputError, match="malformed"):
        unpack(buffer, "{not json")
