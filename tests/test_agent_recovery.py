"""Crash recovery of the agent daemon (ewtune/agent/recovery.py): a real `ewtune agent start` process is killed with
SIGKILL at a chosen point of a round, then the daemon starts again on the same ledger and closes the open
reservation from what its progress journal proves: abort only when provably no step ran, the steps recorded
otherwise, the receipt's event once signed, and the whole reservation when no record covers it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from ewtune.accountant.events import PoissonGaussianEvent, event_from_json
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.receipts import verify_receipt
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.agent.policy import load_agent_config
from ewtune.agent.recovery import ProgressJournal, journal_path, read_progress
from ewtune.agent.rpc import DaemonClient, DaemonError
from ewtune.coordinator.recovery import commit_extra
from support.daemon import COUNT, HOLDER, PLAN, REPO, _agent_toml, _global_weights, _kinds, _wait_for_daemon, count_epsilon
from support.daemon import trainer  # noqa: F401 - the fixture
from support.ledgers import read_entries as _entries

PLANNED = PoissonGaussianEvent(executable_sampling_rate(PLAN["sampling_rate"]), PLAN["noise_multiplier"], PLAN["steps"])

# Runs `ewtune agent start` with one function replaced by one that SIGKILLs the process at a kill point:
# before or after the original runs, optionally only when a keyword argument has a given value.
LAUNCHER = """
import os, signal, sys
import importlib
module_name, name, when, match = sys.argv[1:5]
owner_name, _, attribute = name.rpartition(".")
owner = importlib.import_module(module_name)
for part in filter(None, owner_name.split(".")):
    owner = getattr(owner, part)
original = getattr(owner, attribute)

def killing(*args, **kwargs):
    hit = match == "-" or str(args[-1]) == match
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, attribute, killing)
from ewtune.cli import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.fixture
def holder(tmp_path, tiny_bert_dir, mr_csv, trainer):
    from ewtune.cli import main

    config_path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    assert main(["agent", "init", "--config", str(config_path)]) == 0
    _restart(config_path, trainer).close()  # the first start releases the noised count, which later starts reuse
    return config_path


def _crash_during_a_round(config_path, trainer, kill_point):
    """Start the daemon with ``kill_point`` (module, function, before|after, argument value or -), send one
    Train request, and wait for the SIGKILL. The request must fail: nothing may leave a killed round."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", LAUNCHER, *kill_point, "agent", "start", "--config", str(config_path)]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = load_agent_config(config_path).rpc_address
        _wait_for_daemon(address, process)
        with DaemonClient(address, timeout=120) as client, pytest.raises(DaemonError):
            client.train(_global_weights(trainer), PLAN)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]


def _restart(config_path, trainer):
    """The daemon's start on the same ledger (in this process, with the test's trainer)."""
    from ewtune.agent.daemon import Daemon

    config = load_agent_config(config_path)
    key = SigningKey.load(config.signing_key)
    return Daemon(config.holder_id, config.policy, trainer, Ledger.open(config.ledger_path, key), key)


def _closing_entry(config_path):
    entries = _entries(load_agent_config(config_path).ledger_path)
    reservations = [entry for entry in entries if entry["kind"] == "reserve"]
    assert [entry["payload"]["run_id"] for entry in reservations] == ["dataset-size", PLAN["run_id"]]
    closing = [entry for entry in entries if entry["payload"].get("reservation") == reservations[1]["seq"]]
    assert len(closing) == 1
    return closing[0]


def _status(config_path, capsys):
    from ewtune.cli import main

    assert main(["agent", "status", "--config", str(config_path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_killed_after_steps_ran_the_restart_charges_exactly_the_steps_recorded(holder, trainer, capsys):
    """The attack: kill the daemon mid-round so that the steps that ran are never charged. Step 2 is the
    last recorded before the kill, so the restart commits two steps, released: false."""
    _crash_during_a_round(holder, trainer, ("ewtune.agent.recovery", "ProgressJournal.step", "after", "2"))
    ledger_path = load_agent_config(holder).ledger_path
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve"]
    status = _status(holder, capsys)
    assert [row["seq"] for row in status["open_reservations"]] == [3]
    assert "2 step(s) recorded" in status["open_reservations"][0]["journal"]
    assert status["spent_epsilon_certified"] > 0  # an open reservation counts as spent in full
    spent_while_open = status["spent_epsilon_certified"]

    daemon = _restart(holder, trainer)
    try:
        assert [outcome.to_json()["action"] for outcome in daemon.recovered] == ["commit"]
        assert daemon.describe()["open_reservations"] == 0
    finally:
        daemon.close()
    closing = _closing_entry(holder)
    assert closing["kind"] == "commit" and closing["payload"]["extra"]["released"] is False
    assert event_from_json(closing["payload"]["event"]) == PoissonGaussianEvent(PLANNED.sampling_rate, PLANNED.noise_multiplier, 2)
    assert verify_ledger(ledger_path).ok
    after = _status(holder, capsys)
    assert after["open_reservations"] == [] and 0 < after["spent_epsilon_certified"] < spent_while_open
    assert read_progress(journal_path(ledger_path)) is None  # emptied once the reservation is closed


def test_killed_before_the_first_step_the_restart_aborts(holder, trainer):
    _crash_during_a_round(holder, trainer, ("ewtune.agent.recovery", "ProgressJournal.step", "before", "1"))
    daemon = _restart(holder, trainer)
    daemon.close()
    closing = _closing_entry(holder)
    assert closing["kind"] == "abort" and "no step ran" in closing["payload"]["reason"]
    spent = verify_ledger(load_agent_config(holder).ledger_path).holders[HOLDER].epsilon_certified
    assert spent == pytest.approx(count_epsilon(), rel=1e-12)  # the count released at the first start, nothing more


def test_killed_after_the_receipt_was_signed_the_restart_commits_the_receipt(holder, trainer):
    _crash_during_a_round(holder, trainer, ("ewtune.agent.recovery", "ProgressJournal.receipt", "after", "-"))
    ledger_path = load_agent_config(holder).ledger_path
    receipt = read_progress(journal_path(ledger_path)).receipt
    daemon = _restart(holder, trainer)
    daemon.close()
    closing = _closing_entry(holder)
    assert closing["kind"] == "commit"
    public_key = SigningKey.load(load_agent_config(holder).signing_key).public_key_text
    # The coordinator records the digest of the receipt as it arrives (JSON text, parsed): the holder's
    # recovered commit must record the same, or the cross-check of the two ledgers fails.
    arrived = json.loads(json.dumps(receipt, indent=1))
    coordinator_side = commit_extra(arrived, verify_receipt(arrived, public_key), node_id=1)["receipt_sha256"]
    assert closing["payload"]["receipt_sha256"] == coordinator_side
    assert event_from_json(closing["payload"]["event"]) == verify_receipt(receipt, public_key).event == PLANNED
    assert verify_ledger(ledger_path).ok


def test_killed_after_the_commit_the_restart_has_nothing_to_reconcile(holder, trainer):
    _crash_during_a_round(holder, trainer, ("ewtune.accountant.ledger", "Ledger.commit", "after", "-"))
    ledger_path = load_agent_config(holder).ledger_path
    daemon = _restart(holder, trainer)
    daemon.close()
    assert daemon.recovered == [] and _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]
    assert read_progress(journal_path(ledger_path)) is None


def _reserve_without_the_daemon(config_path):
    """An open reservation as a crash leaves it, written straight to the ledger (no daemon, no journal)."""
    config = load_agent_config(config_path)
    with Ledger.open(config.ledger_path, SigningKey.load(config.signing_key)) as ledger:
        return ledger.reserve(HOLDER, PLAN["run_id"], PLAN["round"], PLANNED)


def test_a_reservation_no_journal_covers_is_charged_in_full(holder, trainer):
    """The attack: delete the journal after a crash so that the restart cannot see the steps that ran (a
    ledger written before the journal existed looks the same)."""
    _reserve_without_the_daemon(holder)
    ledger_path = load_agent_config(holder).ledger_path
    journal_path(ledger_path).unlink()  # the journal the first start left (empty), deleted
    _restart(holder, trainer).close()
    closing = _closing_entry(holder)
    assert closing["kind"] == "commit" and event_from_json(closing["payload"]["event"]) == PLANNED
    assert "charged in full" in closing["payload"]["extra"]["recovered"]
    assert verify_ledger(ledger_path).ok


def test_a_journal_record_of_another_reservation_proves_nothing(holder, trainer):
    """A ``begin`` whose reservation never reached the ledger (killed in between) is stale: it can neither
    abort the reservation that later took its seq nor lower its charge."""
    seq = _reserve_without_the_daemon(holder)
    journal = ProgressJournal(journal_path(load_agent_config(holder).ledger_path))
    journal.begin(seq + 1)
    journal.close()
    _restart(holder, trainer).close()
    closing = _closing_entry(holder)
    assert closing["kind"] == "commit" and event_from_json(closing["payload"]["event"]) == PLANNED


def test_the_journal_ignores_a_torn_last_line_and_stale_records(tmp_path):
    path = tmp_path / "ledger.jsonl.progress"
    journal = ProgressJournal(path)
    journal.begin(1)
    journal.step(1, 1)
    journal.begin(3)  # a later reservation: the records of 1 no longer count
    journal.step(3, 1)
    journal.step(3, 2)
    journal.close()
    with open(path, "ab") as torn:
        torn.write(b'{"kind":"step","reservation":3,"st')  # the write of step 3 never completed
    progress = read_progress(path)
    assert (progress.reservation, progress.steps, progress.receipt) == (3, 2, None)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_completed_round_journals_each_step_before_it_runs_and_empties_the_journal(holder, trainer):
    daemon = _restart(holder, trainer)
    recorded = []
    original = daemon._journal.step
    daemon._journal.step = lambda reservation, step: (recorded.append((reservation, step)), original(reservation, step))
    try:
        reply = daemon.train(_global_weights(trainer), PLAN)
    finally:
        daemon.close()
    assert recorded == [(3, 1), (3, 2), (3, 3)] and reply.metrics["steps"] == 3
    ledger_path = load_agent_config(holder).ledger_path
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]
    assert read_progress(journal_path(ledger_path)) is None
