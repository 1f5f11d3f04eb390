"""Weighted FedAvg over the trainable parameters, and the refusal of malformed updates."""

import numpy as np
import pytest

from accountant.errors import InvalidInputError
from coordinator.aggregation import weighted_average


def _weights(value, dtype=np.float32):
    return {"a": np.full((2, 3), value, dtype=dtype), "b": np.full(4, -value, dtype=dtype)}


def test_weighted_average_weights_by_dataset_size():
    reference = _weights(0.0)
    averaged = weighted_average([(_weights(1.0), 100), (_weights(4.0), 300)], reference)
    np.testing.assert_allclose(averaged["a"], np.full((2, 3), 3.25))
    np.testing.assert_allclose(averaged["b"], np.full(4, -3.25))
    assert averaged["a"].dtype == np.float32


def test_single_update_is_returned_unchanged():
    update = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    averaged = weighted_average([(update, 7)], _weights(0.0))
    for name in update:
        np.testing.assert_array_equal(averaged[name], update[name])


@pytest.mark.parametrize(
    "update, message",
    [
        ({"a": np.zeros((2, 3), np.float32)}, "missing"),
        ({**_weights(1.0), "c": np.zeros(1, np.float32)}, "unknown"),
        ({"a": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32)}, "shape"),
        ({"a": np.full((2, 3), np.nan, np.float32), "b": np.zeros(4, np.float32)}, "finite"),
    ],
)
def test_malformed_update_is_refused(update, message):
    with pytest.raises(InvalidInputError, match=message):
        weighted_average([(_weights(1.0), 1), (update, 1)], _weights(0.0))


def test_refuses_empty_and_bad_weights():
    with pytest.raises(InvalidInputError, match="nothing to aggregate"):
        weighted_average([], _weights(0.0))
    with pytest.raises(InvalidInputError, match="weights"):
        weighted_average([(_weights(1.0), 0)], _weights(0.0))
