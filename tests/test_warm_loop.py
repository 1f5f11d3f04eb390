"""The warm task loop killed mid-round, with real Flower processes on 127.0.0.1.

Two holders serve their ClientApp from the warm task loop inside their SuperNode process (the default,
``ewtune.agent.warm_supernode``). When h0's daemon has reserved round 1 (its plan was delivered and training began),
h0's SuperNode process is SIGKILLed, warm loop and all. The round must end within its deadline with h0's
reservation aborted at the coordinator and h1 aggregated; h0 is charged exactly once for round 1 in its own
ledger (the daemon commits what ran even though the reply never left), every ledger verifies and the
cross-check lists h0's round as spent but not aggregated. The daemon's supervisor restarts the SuperNode, and
a second run shows the fresh warm loop serving h0 again (once flwr lets the node id activate again, about a
minute after the kill). About 3 minutes on 2 cores."""

import json
import os
import re
import signal
import threading
import time

import pytest
from tiny_federation import mr_holders, verified_ledgers

from ewtune.coordinator.ledger_crosscheck import cross_check, read_entries
from ewtune.local_federation import FederationJob, LocalFederation

ROUND_TIMEOUT_S = 25.0


def _supernode_pids(agent_log):
    return [int(pid) for pid in re.findall(r"SuperNode started \(pid (\d+)\)", agent_log.read_text(errors="replace"))]


def _reserved_for_run(ledger, run_name: str) -> bool:
    """Whether the ledger holds a reservation of a run named ``run_name`` (not the daemon's own, such as its
    dataset-size release at start); a line still being written is not read."""
    for line in ledger.read_text().splitlines() if ledger.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry["kind"] == "reserve" and str(entry["payload"].get("run_id", "")).startswith(run_name + "-"):
            return True
    return False


def _kill_supernode_when_reserved(holder_folder, killed: dict, stop: threading.Event):
    """SIGKILL the holder's SuperNode as soon as its ledger holds a reservation of the run "killed" (its daemon
    is training)."""
    ledger = holder_folder / "ledger.jsonl"
    while not stop.is_set():
        if _reserved_for_run(ledger, "killed"):
            pid = _supernode_pids(holder_folder / "agent.log")[-1]
            os.kill(pid, signal.SIGKILL)
            activations = (holder_folder / "supernode.log").read_text(errors="replace").count("SuperNode ID:")
            killed.update(pid=pid, at=time.monotonic(), activations=activations)
            return
        time.sleep(0.01)


def _wait_for_reactivation(supernode_log, killed: dict, timeout: float = 200.0):
    """Until a SuperNode started after the kill has activated with the SuperLink: flwr 1.42 refuses to activate
    a node id that it still counts as online, until the killed node misses its heartbeats (about 60 s), so the
    supervisor's restarts fail until then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if supernode_log.read_text(errors="replace").count("SuperNode ID:") > killed.get("activations", 0):
            return
        time.sleep(1.0)
    raise AssertionError(f"h0's SuperNode did not come back within {timeout:g} s of the kill")


@pytest.fixture(scope="module")
def killed_run(tiny_bert_dir, mr_csv, tmp_path_factory):
    work = tmp_path_factory.mktemp("warm")
    holders, initial = mr_holders(tiny_bert_dir, mr_csv, work, {"h0": 8.0, "h1": 8.0})

    def job(name, rounds):
        return FederationJob(
            federation={
                "name": name, "rounds": rounds, "local_steps": 40, "expected_batch_size": 16, "clip_norm": 1.0,
                "learning_rate": 0.01, "target_epsilon": 3.0, "delta": 1e-5, "min_holders": 1, "expected_holders": 2,
                "max_noise_multiplier": 50.0,
            },
            model={"initial_weights": str(initial), "mode": "lora", "evaluate": "never"},
            timeouts={"nodes": 240, "query": 60, "round": ROUND_TIMEOUT_S},
        )

    killed, stop = {}, threading.Event()
    with LocalFederation(work, holders) as federation:
        federation.start()
        federation.wait_for_daemons()
        killer = threading.Thread(target=_kill_supernode_when_reserved, args=(work / "holders" / "h0", killed, stop), daemon=True)
        killer.start()
        first = federation.run(job("killed", 2), timeout=600, name="killed")
        stop.set()
        _wait_for_reactivation(work / "holders" / "h0" / "supernode.log", killed)
        second = federation.run(job("after", 1), timeout=600, name="after")
    return work, federation.credentials, first, second, killed


def test_the_round_aborts_the_killed_holder_within_its_deadline_and_goes_on(killed_run):
    _, _, first, _, killed = killed_run
    assert killed, "h0's SuperNode was never killed"
    assert first["state"] == "finished" and first["rounds_completed"] == 2, first.get("reason")
    round_1 = first["rounds"][0]
    h0 = round_1["holders"]["h0"]
    # The SuperLink answers for the dead node (the message is gone with it), or the round's deadline passes.
    assert h0["status"] == "aborted" and ("no reply within" in h0["reason"] or "Message Unavailable" in h0["reason"]), h0
    assert round_1["holders"]["h1"]["status"] == "committed"
    assert round_1["seconds"] < ROUND_TIMEOUT_S + 10  # the deadline held; nothing hung
    assert not first["holders"]["h0"]["active"] and first["holders"]["h1"]["rounds_committed"] == 2


def test_nothing_is_charged_twice_and_every_ledger_verifies(killed_run):
    work, credentials, first, _, _ = killed_run
    coordinator = read_entries(work / "coordinator" / "ledger.jsonl")
    _, _, holder_entries = verified_ledgers(work, credentials)
    reserved = {e["seq"]: e for e in coordinator if e["kind"] == "reserve" and e["payload"]["holder"] == "h0"
                and e["payload"]["run_id"] == first["run_id"]}
    aborted = [e for e in coordinator if e["kind"] == "abort" and e["payload"]["reservation"] in reserved]
    committed = [e for e in coordinator if e["kind"] == "commit" and e["payload"]["reservation"] in reserved]
    assert len(reserved) == 1 and len(aborted) == 1 and not committed
    own_reserves = {e["seq"]: e for e in holder_entries["h0"] if e["kind"] == "reserve" and e["payload"]["run_id"] == first["run_id"]}
    own_commits = [e for e in holder_entries["h0"] if e["kind"] == "commit" and e["payload"]["reservation"] in own_reserves]
    assert [own_reserves[e["payload"]["reservation"]]["payload"]["round"] for e in own_commits] == [1]  # once, for what ran
    check = cross_check(coordinator, holder_entries)
    assert check.ok, check.mismatches
    assert f"h0, run {first['run_id']}, round 1" in check.not_aggregated


def test_the_restarted_supernode_serves_the_next_run_from_a_fresh_warm_loop(killed_run):
    work, _, _, second, killed = killed_run
    pids = _supernode_pids(work / "holders" / "h0" / "agent.log")
    assert killed["pid"] in pids and pids[-1] != killed["pid"]  # the supervisor started a new SuperNode
    assert second["state"] == "finished", second.get("reason")
    assert second["holders"]["h0"]["rounds_committed"] == 1 and second["holders"]["h1"]["rounds_committed"] == 1
    served = (work / "holders" / "h0" / "supernode.log").read_text(errors="replace")
    assert "ewtune task loop INFO train message answered" in served
