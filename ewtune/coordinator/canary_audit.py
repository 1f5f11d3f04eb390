"""The coordinator's side of a federated audit run: white-box Dirac canaries (Nasr et al. 2023) scored from
what the coordinator receives, and the one-run lower bound on epsilon (Steinke, Nasr, Jagielski 2023) per
holder and pooled.

Each audit daemon owns canaries on its own coordinates of the audit block (``[audit] parameter`` of
federation.toml) and keeps their inclusion bits to itself (:mod:`ewtune.agent.audit.holder`). The coordinator observes
each holder's update **as received: after unpacking, after its receipt and update checks, before aggregation**
(the update it commits and averages): the change of every audit coordinate, times -q N / (lr C), is that
round's sum of x = B + sigma z over the holder's L local steps (plain SGD; N the holder's described N, q its
sampling rate). After the last round it scores every coordinate of every holder's observations with the
claimed q and sigma (:func:`ewtune.accountant.canary_scores.likelihood_ratio_scores`), never with the bits, fixes the
scores (their SHA-256 rides in the reveal request and is recorded) and the tie-breakers (the operating system's
secure source), and only then asks each holder to reveal its canaries. Each holder's bound uses its own
coordinates; the pooled bound all holders' canaries (valid: each canary belongs to one holder, so the run is
(max over holders of epsilon, delta)-DP with respect to each).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ewtune.accountant.canary_scores import likelihood_ratio_scores
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.one_run_audit import OneRunBound, one_run_bound

VIEW = "each holder's update as received: unpacked, receipt and update checked, before aggregation"


@dataclass(frozen=True)
class Canaries:
    """What a holder revealed: its coordinates ``first .. first + count - 1`` and their inclusion bits."""

    holder_id: str
    first: int
    count: int
    included: np.ndarray
    breakage: str

    @classmethod
    def from_reveal(cls, holder_id: str, record: Mapping[str, Any], block: int) -> "Canaries":
        first, count, bits = record.get("first"), record.get("count"), record.get("included")
        if record.get("holder_id") != holder_id:
            raise InvalidInputError(f"the reveal names holder {record.get('holder_id')!r}, not {holder_id!r}")
        for name, value in (("first", first), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"the reveal's {name} must be an integer >= 0, got {value!r}")
        if count < 2 or first + count > block:
            raise InvalidInputError(f"the revealed canaries {first}..{first + count - 1} do not fit the audit block of {block}")
        if not isinstance(bits, str) or len(bits) != count or set(bits) - {"0", "1"}:
            raise InvalidInputError(f"the reveal's included must be {count} characters 0 or 1")
        return cls(holder_id, first, count, np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1"), str(record.get("breakage", "")))


class CanaryObserver:
    """Keeps, per holder, the audit block's observations of every update received (module docstring)."""

    def __init__(self, parameter: str):
        self.parameter = parameter
        self.observations: dict[str, list[np.ndarray]] = {}

    def observe(self, holder_id: str, update: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray],
                sampling_rate: float, dataset_size: int, learning_rate: float, clip_norm: float) -> None:
        if self.parameter not in weights:
            raise InvalidInputError(f"the global model has no audit block {self.parameter!r}")
        change = np.asarray(update[self.parameter], dtype=np.float64).ravel() - np.asarray(weights[self.parameter], dtype=np.float64).ravel()
        self.observations.setdefault(holder_id, []).append(change * (-sampling_rate * dataset_size / (learning_rate * clip_norm)))

    def scores(self, holder_id: str, sampling_rate: float, noise_multiplier: float, local_steps: int) -> np.ndarray:
        """Every audit coordinate's score from ``holder_id``'s updates, under the claimed q and sigma."""
        return likelihood_ratio_scores(np.stack(self.observations[holder_id]), sampling_rate, noise_multiplier, local_steps)


def scores_digest(scores: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the holders' ids and scores (float64, little-endian), in holder order."""
    digest = hashlib.sha256()
    for holder_id in sorted(scores):
        digest.update(holder_id.encode() + b"\0" + np.asarray(scores[holder_id], dtype="<f8").tobytes())
    return digest.hexdigest()


def secure_tie_break(count: int) -> np.ndarray:
    """Uniform tie-breakers in [0, 1) from the operating system's secure source (53 bits each)."""
    words = np.frombuffer(secrets.token_bytes(8 * count), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def audit_bounds(scores: Mapping[str, np.ndarray], canaries: Mapping[str, Canaries], delta: float,
                 tie_break: np.ndarray) -> tuple[dict[str, OneRunBound], OneRunBound]:
    """(each holder's bound over its own canaries, the pooled bound); overlapping canaries are refused."""
    owner = np.full(len(tie_break), "", dtype=object)
    for holder in canaries.values():
        own = slice(holder.first, holder.first + holder.count)
        if any(owner[own]):
            raise InvalidInputError(f"holder {holder.holder_id}'s canaries overlap another holder's")
        owner[own] = holder.holder_id
    parts = {
        holder_id: (scores[holder_id][h.first : h.first + h.count], h.included, tie_break[h.first : h.first + h.count])
        for holder_id, h in canaries.items()
    }
    holders = {holder_id: one_run_bound(s, bits, delta, tie) for holder_id, (s, bits, tie) in parts.items()}
    pooled_scores, pooled_bits, pooled_ties = (np.concatenate([part[i] for part in parts.values()]) for i in range(3))
    pooled = one_run_bound(pooled_scores, pooled_bits, delta, pooled_ties)
    return holders, pooled
