"""Weighted federated averaging of the trainable parameters (McMahan et al. 2017, "Communication-efficient
learning of deep networks from decentralized data", Alg. 1: w <- sum_k (n_k / n) w_k).

Only verified updates reach this function; each is checked against the global weights it started from
(same names, shapes, finite values) so that a malformed update fails loudly instead of broadcasting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from accountant.errors import InvalidInputError


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Refuse an update that is not exactly the reference's parameters (names, shapes) or holds NaN/inf."""
    names = set(update)
    if names != set(reference):
        missing, unknown = sorted(set(reference) - names), sorted(names - set(reference))
        raise InvalidInputError(f"update does not match the trainable parameters (missing {missing[:3]}, unknown {unknown[:3]})")
    for name, array in update.items():
        array = np.asarray(array)
        if array.shape != np.shape(reference[name]):
            raise InvalidInputError(f"update {name!r} has shape {array.shape}, expected {np.shape(reference[name])}")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise InvalidInputError(f"update {name!r} must hold finite floating-point values")


def weighted_average(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]], reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The average of ``updates`` (pairs of weights and a positive weight, e.g. the holder's dataset size),
    in float64, cast back to the reference's dtypes."""
    if not updates:
        raise InvalidInputError("nothing to aggregate: no verified update")
    total = 0.0
    for update, weight in updates:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (weight > 0 and math.isfinite(weight)):
            raise InvalidInputError(f"aggregation weights must be finite numbers > 0, got {weight!r}")
        check_update(update, reference)
        total += weight
    averaged = {}
    for name, base in reference.items():
        accumulator = np.zeros(np.shape(base), dtype=np.float64)
        for update, weight in updates:
            accumulator += (weight / total) * np.asarray(update[name], dtype=np.float64)
        averaged[name] = accumulator.astype(np.asarray(base).dtype)
    return averaged
