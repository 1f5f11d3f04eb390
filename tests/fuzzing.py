"""Shared pieces of the property-based fuzzing tests (``tests/test_fuzz_*.py``): the settings every fuzz test
runs under, and strategies for hostile input.

The budget is fixed and the examples are derived from the test's name (``derandomize``), so CI runs the same
cases every time; ``EWTUNE_FUZZ_EXAMPLES=5000 scripts/test tests/test_fuzz_files.py`` runs a deeper campaign
(RELIABILITY.md lists the budgets and what they found)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EWTUNE_FUZZ_EXAMPLES", "150"))


def fuzz_settings(share: float = 1.0) -> settings:
    """Fixed, reproducible settings: ``share`` of the example budget (a slow target gets fewer)."""
    return settings(
        max_examples=max(10, int(EXAMPLES * share)),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` after one to three edits: a byte flipped, a cut, random bytes inserted, a slice deleted or
    repeated: what a disk error, a truncation or a careless (or hostile) edit leaves."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(("flip", "cut", "insert", "delete", "repeat")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if edit == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif edit == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)
