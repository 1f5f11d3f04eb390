"""The sampling rates a Poisson sampler executes exactly, and the rate that must be accounted.

A sampler that draws a uniform on a grid of spacing 2^-b and keeps a record when the draw is below q does not
realise rate q: it realises ceil(q 2^b) / 2^b, and never less than 2^-b. ``torch.rand`` has b = 24, so a plan
with q = 1e-12 ran at about 6e-8 while an accountant told q charged next to nothing.

The agent's sampler compares a 53-bit uniform integer u (from the secure source) with the threshold
T = ceil(q 2^53): a record joins when u < T, with probability exactly T / 2^53. Both steps are exact in binary
floating point (q 2^53 is a power-of-two scaling of a double, T <= 2^53 is an integer a double holds, and
T / 2^53 is again a power-of-two scaling), so the executed rate is known to the bit and is never below q.
The rate that is accounted, planned and recorded is this executed rate: a planner that rounds its q with
:func:`executable_sampling_rate` first plans exactly what will run.

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import math

from ewtune.accountant.errors import InvalidInputError

RATE_BITS = 53
_GRID = 2**RATE_BITS


def _checked(sampling_rate: float) -> float:
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float)) or not 0.0 < sampling_rate <= 1.0:
        raise InvalidInputError(f"sampling rate must be in (0, 1], got {sampling_rate!r}")
    return float(sampling_rate)


def sampling_threshold(sampling_rate: float) -> int:
    """T = ceil(q 2^53): a record joins a batch when its 53-bit uniform draw is below T."""
    return math.ceil(_checked(sampling_rate) * _GRID)


def executable_sampling_rate(sampling_rate: float) -> float:
    """The rate the sampler actually realises for a requested ``sampling_rate``: ceil(q 2^53) / 2^53 >= q,
    exact as a double; equal to q when q is already on the 2^-53 grid."""
    return sampling_threshold(sampling_rate) / _GRID
