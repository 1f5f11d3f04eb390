"""Weighted FedAvg over the trainable parameters, and the refusal of malformed updates."""

import numpy as np
import pytest

from ewtune.accountant.errors import InvalidInputError
from ewtune.coordinator.aggregation import (
    adam_coordinate_step_bound,
    capped_fedavg,
    capped_shares,
    check_update_norm,
    default_update_norm_bound,
    kept_global_share,
    weighted_average,
)


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


def test_shares_follow_dataset_sizes_below_the_cap():
    assert capped_shares([100, 300], 0.8) == pytest.approx([0.25, 0.75])


def test_a_huge_claimed_dataset_is_capped_and_its_excess_redistributed():
    """A holder claiming N = 10^9 beside two holders of 100 records gets half the average, not all of it."""
    shares = capped_shares([100, 100, 10**9])
    assert shares == pytest.approx([0.25, 0.25, 0.5])
    shares = capped_shares([1, 2, 3, 100], 0.4)
    assert shares == pytest.approx([0.1, 0.2, 0.3, 0.4])  # the excess goes in proportion to the others' sizes
    assert max(capped_shares([5, 10**6, 10**7, 1], 0.3)) <= 0.3 + 1e-12


def test_a_cap_at_or_below_one_over_k_gives_each_holder_the_cap_and_the_rest_to_the_global_weights():
    assert capped_shares([1, 1000], 0.2) == pytest.approx([0.2, 0.2])
    assert capped_shares([7]) == [0.5]  # one holder of a federation: the default cap still holds
    assert capped_shares([7], 1.0) == [1.0]
    assert capped_shares([1, 1000], 0.5) == pytest.approx([0.5, 0.5])
    assert kept_global_share(capped_shares([1, 1000], 0.2)) == pytest.approx(0.6)
    assert kept_global_share(capped_shares([1, 2, 3, 100], 0.4)) == 0.0


def test_one_reply_under_the_cap_moves_the_global_weights_only_by_the_cap():
    """The attack: the other holders' replies are dropped so that one holder's update replaces the global
    model. With the cap 0.5 it moves the global weights half way: w = 0.5 w_global + 0.5 w_1."""
    reference = _weights(2.0)
    averaged, shares, kept = capped_fedavg([_weights(1000.0)], [10**9], reference, 0.5)
    assert shares == [0.5] and kept == 0.5
    np.testing.assert_allclose(averaged["a"], np.full((2, 3), 501.0))
    averaged, shares, kept = capped_fedavg([_weights(10.0), _weights(20.0)], [100, 300], reference, 0.3)
    assert shares == pytest.approx([0.3, 0.3]) and kept == pytest.approx(0.4)
    np.testing.assert_allclose(averaged["a"], np.full((2, 3), 0.4 * 2 + 0.3 * 10 + 0.3 * 20))
    averaged, shares, kept = capped_fedavg([_weights(10.0), _weights(20.0)], [100, 300], reference, 0.8)
    assert shares == pytest.approx([0.25, 0.75]) and kept == 0.0  # no cap binds: McMahan et al.'s average
    np.testing.assert_allclose(averaged["a"], np.full((2, 3), 17.5))


def test_capped_average_limits_a_big_holder_s_pull():
    reference = _weights(0.0)
    shares = capped_shares([100, 10**9])
    averaged = weighted_average([(_weights(1.0), shares[0]), (_weights(1000.0), shares[1])], reference)
    np.testing.assert_allclose(averaged["a"], np.full((2, 3), 500.5))


@pytest.mark.parametrize("share", [0, -0.1, 1.5, float("nan")])
def test_invalid_caps_are_refused(share):
    with pytest.raises(InvalidInputError, match="max_weight_share"):
        capped_shares([1, 2], share)


def test_adam_step_bound_holds_for_adversarial_gradients_and_is_reached():
    """Simulate Adam's bias-corrected step on the gradient sequence that makes Cauchy-Schwarz tight
    (g_i growing like (beta1/beta2)^i) and on random heavy-tailed ones: no step exceeds the bound, and the
    adversarial sequence comes within 1% of it."""
    beta1, beta2 = 0.9, 0.999
    bound = adam_coordinate_step_bound(beta1, beta2)
    assert 7.2 < bound < 7.3

    def largest_step(gradients):
        m = v = 0.0
        largest = 0.0
        for t, g in enumerate(gradients, start=1):
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            if v > 0:
                largest = max(largest, abs(m / (1 - beta1**t)) / np.sqrt(v / (1 - beta2**t)))
        return largest

    t = 6000
    # Cauchy-Schwarz is tight at step t; older terms are negligible (and would underflow when squared).
    adversarial = [(beta1 / beta2) ** (t - i) if t - i < 400 else 0.0 for i in range(1, t + 1)]
    assert bound * 0.99 < largest_step(adversarial) <= bound * (1 + 1e-9)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert largest_step(rng.standard_cauchy(300)) <= bound


def test_default_update_norm_bound_is_lr_steps_sqrt_d_times_the_adam_bound():
    assert default_update_norm_bound(0.01, 20, 400) == pytest.approx(0.01 * 20 * 20 * adam_coordinate_step_bound())


def test_an_update_beyond_the_norm_bound_is_refused():
    reference = _weights(0.0)
    assert check_update_norm(_weights(0.1), reference, 1.0) == pytest.approx(0.1 * np.sqrt(10))
    with pytest.raises(InvalidInputError, match="more than the bound"):
        check_update_norm(_weights(100.0), reference, 1.0)


def test_an_update_of_integers_is_refused():
    update = {"a": np.zeros((2, 3), np.int32), "b": np.zeros(4, np.float32)}
    with pytest.raises(InvalidInputError, match="dtype"):
        weighted_average([(update, 1)], _weights(0.0))
