"""bench accountant --repeats: the speed ratio's pair timed N times cold, the median kept (issue 20 asks for the
median and worst ratio of repeated cold timings)."""

from __future__ import annotations

import argparse
import time

import pytest

from ewtune.bench.accountant import measure, positive_int_argument


def test_repeats_time_every_call_and_keep_the_median():
    pauses = iter([0.03, 0.0, 0.01])
    calls = []

    def compute() -> float:
        calls.append(1)
        time.sleep(next(pauses))
        return 1.5

    entry = measure(compute, repeats=3)
    assert len(calls) == 3 and len(entry["seconds_each"]) == 3
    assert entry["epsilon"] == 1.5
    assert sorted(entry["seconds_each"])[1] == entry["seconds"]
    assert 0.01 <= entry["seconds"] < 0.03


def test_one_repeat_is_the_plain_cold_timing():
    entry = measure(lambda: 2.0)
    assert entry["epsilon"] == 2.0 and "seconds_each" not in entry


@pytest.mark.parametrize("text", ["0", "-2", "three", "1.5"])
def test_repeats_must_be_a_positive_whole_number(text):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int_argument(text)
