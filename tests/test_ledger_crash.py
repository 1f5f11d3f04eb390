"""Crash at every write: a real writer process appending to a ledger is killed (SIGKILL) at each point of
each of its appends (``tests/ledger_crash_writer.py``: before the write, mid-line, after the write before its
fsync, after the fsync before the head update, mid-way through the head update, after it), then the ledger is
reopened as the restarted daemon would. Every time it opens, verifies (against its head file too), keeps every
entry that was acknowledged, accepts the next append, and its certified spend is never lower than what the
acknowledged entries charge (a reservation counts as spent until it is committed or aborted, so an update is
released only after its commit is acknowledged).

SIGKILL ends the process but not the kernel: bytes written before it stay in the page cache and reach the
file. A power cut, which loses writes that were not fsynced, leaves the file as in the ``before-write`` or
``mid-line`` cases (a prefix of what was written), which are tested as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ledger_crash_writer import APPENDS, POINTS, ROUND, WRITER

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.events import compose, event_from_json
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_head import default_head_path
from ewtune.accountant.ledger_lines import entry_hash
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger

BUDGET = {"budget_epsilon": 3.0, "budget_delta": 1e-5}
WRITER_SCRIPT = Path(__file__).with_name("ledger_crash_writer.py")
REPOSITORY = Path(__file__).resolve().parent.parent


def _crash(tmp_path: Path, point: str, crash_at: int):
    key = SigningKey.generate()
    key.save(tmp_path / "writer.key")
    path = tmp_path / "ledger.jsonl"
    Ledger.create(path, key, WRITER, BUDGET).close()
    environment = {**os.environ, "PYTHONPATH": f"{REPOSITORY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    finished = subprocess.run(
        [sys.executable, str(WRITER_SCRIPT), str(path), str(tmp_path / "writer.key"), point, str(crash_at)],
        capture_output=True, text=True, timeout=120, env=environment,
    )
    acknowledged = [json.loads(line[4:]) for line in finished.stdout.splitlines() if line.startswith("ACK ")]
    return path, key, finished, acknowledged


def _owed(acknowledged: list[dict], still_open: set[int]) -> list:
    """What must stay charged: every acknowledged commit (its update may have been released), and every
    acknowledged reservation that no entry on disk closed (its round may still be running)."""
    return [
        event_from_json(record["event"])
        for record in acknowledged
        if record["operation"] == "commit" or (record["operation"] == "reserve" and record["seq"] in still_open)
    ]


@pytest.mark.parametrize("crash_at", range(1, APPENDS + 1))
@pytest.mark.parametrize("point", POINTS)
def test_a_writer_killed_at_any_point_of_an_append_loses_no_acknowledged_spend(tmp_path, point, crash_at):
    path, key, finished, acknowledged = _crash(tmp_path, point, crash_at)
    assert finished.returncode == -signal.SIGKILL, finished.stderr[-2000:]
    assert len(acknowledged) == crash_at - 1  # the killed append was never acknowledged

    with Ledger.open(path, key) as reopened:
        entries = reopened.entries
        for record in acknowledged:
            assert entry_hash(entries[record["seq"]]) == record["hash"], record
        spent = reopened.spend(WRITER).epsilon_certified
        owed = _owed(acknowledged, set(reopened.open_reservations()))
        assert spent >= (certified_epsilon(compose(*owed), BUDGET["budget_delta"]) if owed else 0.0)
        durable = len(entries) - (1 if reopened.repair else 0)
        assert durable in (crash_at, crash_at + 1)  # genesis + the acknowledged appends, and the killed one if it was whole
        if point in ("before-write", "mid-line"):
            assert durable == crash_at
        if point in ("before-head", "mid-head", "after-head", "before-fsync"):
            assert durable == crash_at + 1  # the whole line reached the file: kept, charged
        assert (reopened.repair is not None) == (point == "mid-line")
        after = reopened.reserve(WRITER, "run", 9, ROUND)  # the restarted writer goes on
    report = verify_ledger(path, key.public_key_text, head_path=default_head_path(path))
    assert report.ok, report.summary()
    assert report.entries_verified == after + 1


def test_the_writer_runs_to_the_end_when_not_killed(tmp_path):
    """The control: with its crash placed beyond its last append, the writer acknowledges all five."""
    path, key, finished, acknowledged = _crash(tmp_path, "before-write", APPENDS + 1)
    assert finished.returncode == 0 and finished.stdout.rstrip().endswith("DONE"), finished.stderr[-2000:]
    assert [record["operation"] for record in acknowledged] == ["reserve", "commit", "reserve", "abort", "reserve"]
    assert verify_ledger(path, key.public_key_text, head_path=default_head_path(path)).ok
