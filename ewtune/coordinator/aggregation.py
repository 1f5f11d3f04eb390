"""Weighted federated averaging of the trainable parameters (McMahan et al. 2017, "Communication-efficient
learning of deep networks from decentralized data", Alg. 1: w <- sum_k (n_k / n) w_k).

Only verified updates reach this function; each is checked against the global weights it started from
(same names, shapes, finite values) so that a malformed update fails loudly instead of broadcasting.

Two limits keep one holder from steering the global model alone (a receipt proves the privacy of what a
holder released, not that its update is honest):

- :func:`capped_shares`: no holder's share of the average exceeds ``max_share`` (the excess is spread over
  the others in proportion to their sizes; when too few holders reply for their capped shares to reach 1,
  :func:`capped_fedavg` leaves the rest with the global weights: the round's update is scaled down);
- :func:`check_update_norm`: an update whose change from the global weights exceeds a bound is refused;
  :func:`default_update_norm_bound` derives the bound from the plan when the operator sets none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ewtune.accountant.errors import InvalidInputError
from ewtune.federation.packing import check_weight_dtype

DEFAULT_MAX_SHARE = 0.5  # one holder alone moves the global weights half way to its update
ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the holders' trainer uses


def capped_shares(sizes: Sequence[float], max_share: float | None = None) -> list[float]:
    """Each holder's share of the FedAvg average: proportional to its dataset size N (McMahan et al.), with
    no share above ``max_share`` (default :data:`DEFAULT_MAX_SHARE`); a capped holder's excess goes to the
    uncapped ones in proportion to their sizes, repeatedly until no share exceeds the cap (water-filling).
    Where the cap is at most 1/k for k holders, every share is the cap and they sum to k x cap <= 1: the rest,
    1 - k x cap, belongs to the global weights (:func:`capped_fedavg`), never to a holder.

    The sizes are the holders' released counts N_noisy: each daemon releases N plus Gaussian noise once per
    data set, charged to its ledger (ewtune.agent.released_count), and states it in its description; the planner
    derives q = B / N_noisy from the same value, so the ledger's q, the plan and these weights agree and none
    reveals the exact N. The count is not verified: a holder claiming a huge N gains weight only up to the cap.
    (Its own privacy does not rest on the count being true: it samples its real records at the planned q and
    is accounted at that q.)"""
    sizes = [float(size) for size in sizes]
    if not sizes:
        raise InvalidInputError("no shares of nothing: no update to aggregate")
    for size in sizes:
        if not (size > 0 and math.isfinite(size)):
            raise InvalidInputError(f"aggregation weights must be finite numbers > 0, got {size!r}")
    cap = DEFAULT_MAX_SHARE if max_share is None else float(max_share)
    if not 0 < cap <= 1:
        raise InvalidInputError(f"max_weight_share must be in (0, 1], got {max_share!r}")
    count = len(sizes)
    if cap * count <= 1:
        return [cap] * count
    shares = [0.0] * count
    free = set(range(count))
    left = 1.0
    while True:
        total = sum(sizes[i] for i in free)
        over = {i for i in free if left * sizes[i] / total > cap}
        if not over:
            for i in free:
                shares[i] = left * sizes[i] / total
            return shares
        for i in over:
            shares[i] = cap
        left -= cap * len(over)
        free -= over


def kept_global_share(shares: Sequence[float]) -> float:
    """The share of the FedAvg average that stays with the global weights: 1 - sum of the holders' shares
    (0 when the capped shares sum to 1, up to rounding)."""
    kept = 1.0 - math.fsum(shares)
    return kept if kept > 1e-12 else 0.0


def capped_fedavg(
    updates: Sequence[Mapping[str, np.ndarray]], sizes: Sequence[float], reference: Mapping[str, np.ndarray],
    max_share: float | None = None,
) -> tuple[dict[str, np.ndarray], list[float], float]:
    """FedAvg with a per-holder cap: (the new global weights, each holder's share, the global weights' share).

    With s_k = :func:`capped_shares` of the sizes and s_0 = 1 - sum_k s_k (:func:`kept_global_share`),
        w_new = s_0 w_global + sum_k s_k w_k = w_global + sum_k s_k (w_k - w_global),
    McMahan et al.'s Alg. 1 (s_k = n_k / n) when no cap binds. When the k holders that replied cannot reach 1
    within the cap c (k c < 1, e.g. one holder of a federation at c = 0.5), s_0 = 1 - k c > 0: the round's
    update is scaled by k c rather than one holder (or a few) replacing the global model."""
    shares = capped_shares(sizes, max_share)
    kept = kept_global_share(shares)
    pairs = [(update, share) for update, share in zip(updates, shares)]
    if kept:
        pairs.append((reference, kept))
    return weighted_average(pairs, reference), shares, kept


def adam_coordinate_step_bound(beta1: float = ADAM_BETAS[0], beta2: float = ADAM_BETAS[1]) -> float:
    """The largest change of one coordinate in one Adam(W) step, in units of the learning rate (no weight
    decay; epsilon only shrinks the step), whatever the gradients.

    Step t moves a coordinate by lr * |m_t| / sqrt(v_t) * sqrt(1 - beta2^t) / (1 - beta1^t) (bias-corrected
    moments). With m_t = (1 - beta1) sum_i beta1^(t-i) g_i and v_t = (1 - beta2) sum_i beta2^(t-i) g_i^2,
    Cauchy-Schwarz gives |m_t| / sqrt(v_t) <= (1 - beta1) / sqrt(1 - beta2) * sqrt(sum_{j<t} (beta1^2/beta2)^j),
    an equality for gradients growing like (beta1/beta2)^i. The bound is the supremum over t of the product;
    it is 1 at t = 1 and tends to (1 - beta1) / sqrt((1 - beta2) (1 - beta1^2 / beta2)), about 7.27 for
    beta = (0.9, 0.999). (Kingma & Ba's |step| <= lr is the usual case, not a bound.)"""
    if not (0 <= beta1 < 1 and 0 < beta2 < 1 and beta1 * beta1 < beta2):
        raise InvalidInputError(f"Adam betas must satisfy 0 <= beta1 < 1, 0 < beta2 < 1, beta1^2 < beta2; got {beta1}, {beta2}")
    ratio = beta1 * beta1 / beta2
    scale = (1 - beta1) / math.sqrt(1 - beta2)
    best = scale / math.sqrt(1 - ratio)  # t -> infinity
    for t in range(1, 1 << 16):  # the bias corrections make early steps larger than the limit for some betas
        value = scale * math.sqrt((1 - ratio**t) / (1 - ratio)) * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        best = max(best, value)
    return best


def default_update_norm_bound(learning_rate: float, local_steps: int, coordinates: int) -> float:
    """The ``max_update_norm`` used when federation.toml sets none: the largest L2 change an honest holder's
    round of AdamW can make, learning rate x local steps x sqrt(trainable coordinates) x
    :func:`adam_coordinate_step_bound` (each step moves every coordinate by at most lr x that bound, the
    steps add up, and d coordinates each moved by at most a have norm at most a sqrt(d)).

    It holds for the holders' AdamW without weight decay, whatever the data and the noise; with SGD (whose
    step grows with the noised gradient) set ``max_update_norm`` explicitly. It does not stop a holder that
    stays within it; it stops the model-replacement attack (an update scaled up to override the others)."""
    if coordinates < 1:
        raise InvalidInputError("the model has no trainable coordinate")
    return float(learning_rate) * int(local_steps) * math.sqrt(coordinates) * adam_coordinate_step_bound()


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``update - reference`` over every parameter, in float64."""
    squares = 0.0
    for name, base in reference.items():
        difference = np.asarray(update[name], dtype=np.float64) - np.asarray(base, dtype=np.float64)
        squares += float(np.dot(difference.ravel(), difference.ravel()))
    return math.sqrt(squares)


def check_update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], bound: float) -> float:
    """The update's change from ``reference`` (L2), or :class:`InvalidInputError` when it exceeds ``bound``."""
    norm = update_norm(update, reference)
    if not norm <= bound:
        raise InvalidInputError(f"update changes the global weights by {norm:.4g} (L2), more than the bound {bound:.4g}")
    return norm


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
        check_weight_dtype(name, array.dtype)
        if not np.isfinite(array).all():
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
