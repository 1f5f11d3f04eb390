"""The federation benchmark's own arithmetic: the SuperLink's CPU seconds per round, and the overhead split."""

import os
import time

from ewtune.bench.federation import SuperLinkCpu, round_overheads


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_superlink_cpu_per_round_counts_only_rounds_after_the_first():
    meter = SuperLinkCpu(os.getpid())  # this process stands in for the SuperLink
    meter.on_status({"rounds": []})
    _burn(0.3)  # start-up and round 1: left out
    meter.on_status({"rounds": [{"round": 1}]})
    assert meter.per_round_after_first() is None  # one round is not a rate
    _burn(0.2)
    meter.on_status({"rounds": [{"round": 1}]})  # a status update within round 2 keeps the first reading
    _burn(0.2)
    meter.on_status({"rounds": [{"round": 1}, {"round": 2}]})
    _burn(0.4)
    meter.on_status({"rounds": [{"round": 1}, {"round": 2}, {"round": 3}]})
    per_round = meter.per_round_after_first()
    assert 0.4 * 0.98 <= per_round <= 0.4 * 1.3  # (0.2 + 0.2 + 0.4) s over rounds 2 and 3, plus what else this process did


def test_overhead_is_round_time_minus_the_slowest_holder_and_none_without_a_ledger_row():
    rounds = [{"round": 1, "seconds": 5.0, "exchange_seconds": 4.5}, {"round": 2, "seconds": 3.0, "exchange_seconds": 2.9}]
    breakdown = [{"round": 1, "train_seconds": 1.0}, {"round": 1, "train_seconds": 2.0}]
    first, second = round_overheads(rounds, breakdown)
    assert first["overhead_seconds"] == 3.0 and first["slowest_train_seconds"] == 2.0
    assert abs(first["aggregate_seconds"] - 0.5) < 1e-12
    assert second["overhead_seconds"] is None and second["slowest_train_seconds"] is None
