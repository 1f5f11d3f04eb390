"""The coordinator's ServerApp killed by SIGKILL mid-round and started again, with real Flower processes on
127.0.0.1 (a TLS SuperLink with SuperNode authentication, two agent daemons with their SuperNodes, a tiny BERT
with LoRA, two rounds).

Each federation is submitted with ``flwr run``; its ServerApp (the ``flwr-serverapp`` process the SuperLink's
SuperExec starts) is killed, ``flwr run`` is stopped, and the same federation.toml is submitted again, as an
operator would with ``ewtune coordinator run``. Kill points:

- (slow) from outside, as soon as round 1's reservations are in the coordinator's ledger (the holders are training):
  both reservations are aborted at restart (nothing was received) and round 1 is trained again under the new run
  id; what the holders spent on the lost round stays in their own ledgers, listed by the cross-check as spent
  but not aggregated;
- at the crash point after round 1's first commit (its second update is received, not yet committed): the
  restart commits the second from the inbox and rebuilds round 1, so the ledgers hold exactly what an
  uninterrupted run would: the cross-check matches every commit and lists nothing unaggregated;
- (slow) after round 1's checkpoint;
- (slow) the SuperLink itself killed while the holders train round 1, then started again on its database.

Every time: the run finishes its two rounds, every ledger verifies, every reservation is closed once, each
holder has one commit per round in the coordinator's ledger and never two for one (run, round) in its own.
The federation starts once (about a minute on 2 cores); each kill point costs a run and its restart (about 45 s).
``scripts/test --slow`` runs all three."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_federation import _serverapps, mr_holders, verified_ledgers

from ewtune.accountant.crosscheck import cross_check, read_entries
from ewtune.coordinator import crash_points
from ewtune.coordinator.checkpoints import load_weights
from ewtune.coordinator.superlink import run_command
from ewtune.local_federation import FederationJob, LocalFederation
from ewtune.federation.processes import flower_environment, stop_process_group


def _reserved_round(ledger: Path, name: str, round: int, holders: int = 2) -> bool:
    """Whether the round's reservations of all ``holders`` are in the ledger."""
    if not ledger.exists():
        return False
    return holders == sum(
        1 for e in read_entries(ledger)
        if e["kind"] == "reserve" and e["payload"]["run_id"].startswith(f"{name}-") and e["payload"]["round"] == round
    )


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def _killed_run(federation: LocalFederation, job: FederationJob, name: str, point: str | None) -> None:
    """Submit ``job`` and kill its ServerApp: at the crash point ``point``, or from outside (SIGKILL) once round 1
    is reserved when ``point`` is None; then stop ``flwr run``."""
    superlink = federation.processes["superlink"].pid
    crash_file = federation.work_dir / "crash-point"
    if point is not None:
        crash_file.write_text(point)
    config = federation.federation_toml(job, name)
    earlier = set(_serverapps(superlink))  # the previous run's ServerApp may still be exiting
    environment = flower_environment(federation.flwr_home)
    with open(federation.work_dir / "coordinator" / f"flwr-run-{name}.log", "ab") as log:
        submitted = subprocess.Popen(run_command(config), stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    try:
        _wait(lambda: set(_serverapps(superlink)) - earlier, 120, "the ServerApp start")
        (serverapp,) = set(_serverapps(superlink)) - earlier
        if point is None:
            _wait(lambda: _reserved_round(federation.work_dir / "coordinator" / "ledger.jsonl", name, 1), 300, "round 1's reservations")
            os.kill(serverapp, signal.SIGKILL)
        _wait(lambda: not Path(f"/proc/{serverapp}").exists() or b"zombie" in _state(serverapp), 300, "the ServerApp's death")
        assert not crash_file.exists(), f"the ServerApp never reached {point}"
    finally:
        stop_process_group(submitted, timeout=30)


def _state(pid: int) -> bytes:
    try:
        return b"zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else b""
    except OSError:
        return b""


@pytest.fixture(scope="module")
def federation(tiny_bert_dir, mr_csv, tmp_path_factory):
    work = tmp_path_factory.mktemp("crash")
    holders, initial = mr_holders(tiny_bert_dir, mr_csv, work, {"h0": 8.0, "h1": 8.0})
    previous = os.environ.get(crash_points.ENVIRONMENT)
    os.environ[crash_points.ENVIRONMENT] = str(work / "crash-point")  # inherited by the SuperLink and its ServerApps
    try:
        with LocalFederation(work, holders) as running:
            running.start()
            running.wait_for_daemons()
            yield running, initial
    finally:
        if previous is None:
            os.environ.pop(crash_points.ENVIRONMENT, None)
        else:
            os.environ[crash_points.ENVIRONMENT] = previous


def _job(name: str, initial: Path) -> FederationJob:
    return FederationJob(
        federation={
            "name": name, "rounds": 2, "local_steps": 3, "expected_batch_size": 16, "clip_norm": 1.0, "learning_rate": 0.01,
            # 1.0 of each holder's 8: room for a round trained again after a kill, and for every kill point
            "target_epsilon": 1.0, "delta": 1e-5, "min_holders": 2, "expected_holders": 2, "max_noise_multiplier": 50.0,
        },
        model={"initial_weights": str(initial), "mode": "lora", "evaluate": "never"},
        timeouts={"nodes": 120, "query": 60, "round": 240},
    )


def _killed_and_resumed(federation, name: str, point: str | None):
    running, initial = federation
    job = _job(name, initial)
    _killed_run(running, job, name, point)
    status = running.run(job, timeout=600, name=name)
    return running, status, initial


def _check_ledgers(running: LocalFederation, status: dict, name: str):
    """Every ledger verifies; each reservation of the federation closed once; one commit per holder and round;
    returns the cross-check restricted to this federation's runs."""
    work = running.work_dir
    _, _, holder_entries = verified_ledgers(work, running.credentials)
    ours = lambda entry: entry["payload"]["run_id"].startswith(f"{name}-")  # noqa: E731
    coordinator = read_entries(work / "coordinator" / "ledger.jsonl")
    reserved = {e["seq"]: (e["payload"]["holder"], e["payload"]["round"]) for e in coordinator if e["kind"] == "reserve" and ours(e)}
    closed = [e["payload"]["reservation"] for e in coordinator if e["kind"] in ("commit", "abort") and e["payload"]["reservation"] in reserved]
    assert sorted(closed) == sorted(reserved)
    committed = sorted(reserved[e["payload"]["reservation"]] for e in coordinator if e["kind"] == "commit" and e["payload"]["reservation"] in reserved)
    assert committed == [("h0", 1), ("h0", 2), ("h1", 1), ("h1", 2)]
    for holder_id in holder_entries:
        own_reserved = {e["seq"]: (e["payload"]["run_id"], e["payload"]["round"]) for e in holder_entries[holder_id] if e["kind"] == "reserve"}
        own_commits = [own_reserved[e["payload"]["reservation"]] for e in holder_entries[holder_id] if e["kind"] == "commit"]
        assert len(own_commits) == len(set(own_commits))  # never charged twice for one (run, round)
    check = cross_check(coordinator, holder_entries)
    assert check.ok, check.mismatches
    final = load_weights(work / "coordinator" / name / "final.safetensors")
    last = load_weights(work / "coordinator" / name / "checkpoints" / "round-002.safetensors")
    assert all(np.array_equal(final[key], last[key]) for key in final)
    return [line for line in check.not_aggregated if f"run {name}-" in line]


@pytest.mark.slow
def test_a_serverapp_killed_while_the_holders_train_round_1_resumes_and_trains_it_again(federation):
    running, status, _ = _killed_and_resumed(federation, "outside", None)
    assert status["state"] == "finished" and status["rounds_completed"] == 2, status.get("reason")
    (killed,) = status["resumed"]["from_runs"]
    assert sorted((o["holder_id"], o["round"], o["action"]) for o in status["resumed"]["reconciled"]) == [("h0", 1, "abort"), ("h1", 1, "abort")]
    not_aggregated = _check_ledgers(running, status, "outside")
    # What the holders spent on the lost round is theirs alone: at most round 1 of the killed run, per holder.
    assert set(not_aggregated) <= {f"h0, run {killed}, round 1", f"h1, run {killed}, round 1"}


def test_a_serverapp_killed_between_two_commits_resumes_with_the_ledgers_of_an_uninterrupted_run(federation):
    running, status, _ = _killed_and_resumed(federation, "between", "committed:1:1")
    assert status["state"] == "finished" and status["rounds_completed"] == 2, status.get("reason")
    assert [(o["round"], o["action"]) for o in status["resumed"]["reconciled"]] == [(1, "commit")]
    assert status["rounds"][0]["rebuilt_after_restart"]
    assert _check_ledgers(running, status, "between") == []  # every release of this federation was aggregated


@pytest.mark.slow
def test_a_serverapp_killed_after_a_checkpoint_goes_on_from_the_next_round(federation):
    running, status, _ = _killed_and_resumed(federation, "checkpointed", "checkpointed:1")
    assert status["state"] == "finished" and status["rounds_completed"] == 2, status.get("reason")
    assert status["resumed"]["reconciled"] == [] and status["resumed"]["rounds_completed"] == 1
    assert _check_ledgers(running, status, "checkpointed") == []


@pytest.mark.slow
def test_a_superlink_killed_mid_round_and_started_again_resumes_the_federation(federation):
    running, initial = federation
    name = "superlink"
    job = _job(name, initial)
    config = running.federation_toml(job, name)
    superlink = running.processes["superlink"]
    environment = flower_environment(running.flwr_home)
    with open(running.work_dir / "coordinator" / f"flwr-run-{name}.log", "ab") as log:
        submitted = subprocess.Popen(run_command(config), stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    try:
        _wait(lambda: _reserved_round(running.work_dir / "coordinator" / "ledger.jsonl", name, 1), 300, "round 1's reservations")
        serverapps = _serverapps(superlink.pid)
        os.kill(superlink.pid, signal.SIGKILL)
        superlink.wait()
        # Its SuperExec and ServerApp notice their parent's death and exit (flwr's --parent-pid).
        _wait(lambda: all(not Path(f"/proc/{pid}").exists() or _state(pid) for pid in serverapps), 120, "the ServerApp's exit")
    finally:
        stop_process_group(submitted, timeout=30)
    running.start_superlink()  # the same port and database; the SuperNodes reconnect by themselves
    status = running.run(job, timeout=600, name=name)
    assert status["state"] == "finished" and status["rounds_completed"] == 2, status.get("reason")
    assert status["resumed"]["from_runs"]
    coordinator = read_entries(running.work_dir / "coordinator" / "ledger.jsonl")
    killed = set(status["resumed"]["from_runs"])
    first = {e["seq"] for e in coordinator if e["kind"] == "reserve" and e["payload"]["run_id"] in killed}
    assert len(first) == 2 and all(e["kind"] == "abort" for e in coordinator if e["kind"] in ("commit", "abort") and e["payload"]["reservation"] in first)
    not_aggregated = _check_ledgers(running, status, name)
    assert set(not_aggregated) <= {f"{h}, run {run}, round 1" for h in ("h0", "h1") for run in killed}
