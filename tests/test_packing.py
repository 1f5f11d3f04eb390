"""Packing named arrays into one transport buffer is exact and refuses inconsistent layouts."""

import numpy as np
import pytest

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.receipts import update_digest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ewtune.federation.messages import BUFFER, LAYOUT, PACKED_NAME, unpack_in_place, weight_records, weights_of
from ewtune.federation.packing import pack, unpack

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


def test_records_round_trip_plain_packed_inline_and_packed_beside():
    buffer, _ = pack(ARRAYS)
    plain = RecordDict(weight_records(ARRAYS, packed=False))
    assert LAYOUT not in plain and len(plain["arrays"]) == len(ARRAYS)
    inline = RecordDict(weight_records(ARRAYS, packed=True))  # small: the buffer rides inside the layout record
    assert list(inline) == [LAYOUT] and inline[LAYOUT][BUFFER] == buffer.tobytes()
    beside = RecordDict(weight_records(ARRAYS, packed=True, inline_limit=buffer.nbytes - 1))  # large: in an ArrayRecord
    assert set(beside) == {LAYOUT, "arrays"} and BUFFER not in beside[LAYOUT] and list(beside["arrays"]) == [PACKED_NAME]
    for content in (plain, inline, beside):
        assert update_digest(weights_of(content)) == update_digest(ARRAYS)
        assert unpack_in_place(content) == (content is not plain)
        assert LAYOUT not in content and update_digest(weights_of(content)) == update_digest(ARRAYS)


def test_an_inline_buffer_is_fewer_flower_objects_than_an_array_record():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    buffer, _ = pack(ARRAYS)
    inline = RecordDict(weight_records(ARRAYS, packed=True))
    beside = RecordDict(weight_records(ARRAYS, packed=True, inline_limit=buffer.nbytes - 1))
    assert len(get_all_nested_objects(inline)) == 2  # the RecordDict and the layout record
    assert len(get_all_nested_objects(beside)) == 5  # ... and an ArrayRecord, its Array and the Array's chunk


def test_a_reply_record_carries_its_other_fields_beside_the_weights_in_every_form():
    fields = {"receipt": "{}", "steps": 3}
    buffer, _ = pack(ARRAYS)
    plain = RecordDict(weight_records(ARRAYS, packed=False, record="result", fields=fields))
    inline = RecordDict(weight_records(ARRAYS, packed=True, record="result", fields=fields))
    beside = RecordDict(weight_records(ARRAYS, packed=True, inline_limit=buffer.nbytes - 1, record="result", fields=fields))
    assert set(plain) == {"arrays", "result"} and dict(plain["result"]) == fields  # no layout: the arrays are plain
    assert list(inline) == ["result"] and inline["result"][BUFFER] == buffer.tobytes()
    assert set(beside) == {"arrays", "result"} and BUFFER not in beside["result"]
    for content in (plain, inline, beside):
        assert {key: content["result"][key] for key in fields} == fields
        assert update_digest(weights_of(content, "result")) == update_digest(ARRAYS)
    with pytest.raises(InvalidInputError, match="inside 'result' or in 'arrays', not both"):
        weights_of(RecordDict({**dict(inline), "arrays": beside["arrays"]}), "result")


def test_inline_buffers_that_are_not_bytes_or_ride_twice_are_refused():
    buffer, layout = pack(ARRAYS)
    with pytest.raises(InvalidInputError, match="must be bytes"):
        weights_of(RecordDict({LAYOUT: ConfigRecord({"json": layout, BUFFER: "not bytes"})}))
    twice = RecordDict({"arrays": ArrayRecord({PACKED_NAME: Array(buffer)}), LAYOUT: ConfigRecord({"json": layout, BUFFER: buffer.tobytes()})})
    with pytest.raises(InvalidInputError, match="not both"):
        weights_of(twice)
    with pytest.raises(InvalidInputError, match="too short"):
        weights_of(RecordDict({LAYOUT: ConfigRecord({"json": layout, BUFFER: buffer.tobytes()[:-4]})}))


def test_inconsistent_buffers_are_refused():
    buffer, layout = pack(ARRAYS)
    with pytest.raises(InvalidInputError, match="too short"):
        unpack(buffer[:-8], layout)
    with pytest.raises(InvalidInputError, match="beyond its layout"):
        unpack(np.concatenate([buffer, np.zeros(4, np.uint8)]), layout)
    with pytest.raises(InvalidInputError, match="malformed"):
        unpack(buffer, "{not json")


def _layout(*entries):
    import json

    return json.dumps([list(entry) for entry in entries])


@pytest.mark.parametrize(
    "layout, message",
    [
        (_layout(["w", "|O", [1]]), "dtype"),  # object: numpy would hand back pointers
        (_layout(["w", "<i8", [1]]), "dtype"),  # integers are not weights
        (_layout(["w", "<c16", [1]]), "dtype"),
        (_layout(["w", "[('a', '<f4')]", [1]]), "dtype"),  # a structured dtype
        (_layout(["w", "no such dtype", [1]]), "unknown dtype"),
        (_layout(["w", "<f4", [-2, -4]]), "integers >= 0"),  # negative dims whose product is positive
        (_layout(["w", "<f4", [2.5]]), "integers >= 0"),
        (_layout(["w", "<f4", [True]]), "integers >= 0"),
        (_layout(["w", "<f4", 8]), "integers >= 0"),
        (_layout(["w", "<f4", [2**62, 2**62]]), "too short"),  # would wrap around in int64
        (_layout(["w", "<f4"]), "malformed"),
        ('{"w": 1}', "malformed"),
        (_layout(["w", "<f4", [1]], ["w", "<f4", [1]]), "twice"),
    ],
)
def test_crafted_layouts_are_refused_with_one_line(layout, message):
    """A hostile holder's layout reaches unpack() through weights_of(): every crafted variant is an
    InvalidInputError (the coordinator aborts that holder), never another exception."""
    buffer = np.zeros(8, np.uint8)
    content = RecordDict({"arrays": ArrayRecord({PACKED_NAME: Array(buffer)}), LAYOUT: ConfigRecord({"json": layout})})
    with pytest.raises(InvalidInputError, match=message):
        weights_of(content)


def test_plain_arrays_outside_the_weight_dtypes_are_refused():
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(4, dtype=np.int64))})})
    with pytest.raises(InvalidInputError, match="dtype"):
        weights_of(content)


def test_an_undecodable_array_is_refused_with_one_line():
    broken = Array(dtype="<f4", shape=(1_000,), stype="numpy.ndarray", data=b"not a .npy file")
    with pytest.raises(InvalidInputError, match="cannot be decoded"):
        weights_of(RecordDict({"arrays": ArrayRecord({"w": broken})}))


def test_a_layout_that_is_not_a_string_is_refused():
    buffer, _ = pack(ARRAYS)
    content = RecordDict({"arrays": ArrayRecord({PACKED_NAME: Array(buffer)}), LAYOUT: ConfigRecord({"json": 3})})
    with pytest.raises(InvalidInputError, match="layout"):
        weights_of(content)
