"""bench accountant --repeats: the speed ratio's pair timed N times cold, the median kept (issue 20 asks for the
median and worst ratio of repeated cold timings)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from ewtune.bench.accountant import measure, positive_int_argument


def test_repeats_time_every_call_and_keep_the_median(monkeypatch):
    """On a clock that each call advances by a set amount (sleeps timed on the wall clock of a loaded machine
    overshoot by more than their gaps): every call is timed, in order, and the median kept, not the mean
    (1/3), the first (3/4), the last (0), the least or the most."""
    from ewtune.bench import report

    now = [1024.0]
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    pauses = iter([0.75, 0.25, 0.0])  # binary fractions: the differences of the clock's readings are exact
    calls = []

    def compute() -> float:
        calls.append(1)
        now[0] += next(pauses)
        return 1.5

    entry = measure(compute, repeats=3)
    assert len(calls) == 3 and entry["seconds_each"] == [0.75, 0.25, 0.0]
    assert entry["epsilon"] == 1.5 and entry["seconds"] == 0.25


def test_one_repeat_is_the_plain_cold_timing():
    entry = measure(lambda: 2.0)
    assert entry["epsilon"] == 2.0 and "seconds_each" not in entry


@pytest.mark.parametrize("text", ["0", "-2", "three", "1.5"])
def test_repeats_must_be_a_positive_whole_number(text):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int_argument(text)
