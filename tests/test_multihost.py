"""The coordinator and two holders on separate network namespaces of one machine, made by the test itself: the
coordinator's namespace holds the SuperLink (on its own 127.0.0.1), the ServerApp and nginx running
deploy/nginx/ewtune-fleet.conf on the bridge address 10.77.0.1 (TLS with the federation's CA, TLS again to the
SuperLink); each holder's namespace holds its agent daemon and SuperNode, at 10.77.0.2 and 10.77.0.3, and reaches
the coordinator only through the proxy. Addresses exist inside those namespaces only.

One round of a tiny BERT with LoRA completes with both holders, every ledger verifies and the coordinator's commits
match the holders'; the proxy's log shows the Fleet requests of both holders' addresses; from a holder's namespace
the SuperLink's own port cannot be reached and the Control API through the proxy is refused (403).

Skipped, with the reason, where network namespaces cannot be made (not root, no `ip`, no permission) or nginx is
missing. About 2 minutes on 2 cores (two daemons and the Flower processes start); it runs in CI, where namespaces
can be made."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fleet_proxy import nginx_missing
from netns import Namespaces, unavailable
from tiny_federation import mr_holders, verified_ledgers

from ewtune.accountant.crosscheck import cross_check, read_entries
from ewtune.coordinator.credentials import load_credentials

REPO = Path(__file__).resolve().parents[1]
PROXY_PORT = 8443


@pytest.fixture(scope="module")
def multihost(tiny_bert_dir, mr_csv, tmp_path_factory):
    reason = unavailable() or nginx_missing()
    if reason:
        pytest.skip(f"no multi-host test here: {reason}")
    work = tmp_path_factory.mktemp("multihost")
    holders, initial = mr_holders(tiny_bert_dir, mr_csv, work, {"h0": 8.0, "h1": 8.0})
    with Namespaces([holder.holder_id for holder in holders]) as spaces:
        spec = {
            "work_dir": str(work / "federation"),
            "namespaces": spaces.holders,
            "proxy": [spaces.coordinator_address, PROXY_PORT],
            "holders": [{"holder_id": h.holder_id, "data_file": str(h.data_file), "training": h.training} for h in holders],
            "job": {
                "federation": {
                    "name": "multihost", "rounds": 1, "local_steps": 3, "expected_batch_size": 16, "clip_norm": 1.0,
                    "learning_rate": 0.01, "target_epsilon": 1.0, "delta": 1e-5, "min_holders": 2, "expected_holders": 2,
                    "max_noise_multiplier": 50.0,
                },
                "model": {"initial_weights": str(initial), "mode": "lora", "evaluate": "never"},
                "timeouts": {"nodes": 180, "query": 60, "round": 240},
            },
        }
        (work / "spec.json").write_text(json.dumps(spec))
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
        driver = subprocess.run(
            [*spaces.exec_prefix(spaces.coordinator), sys.executable, str(REPO / "tests" / "netns_coordinator.py"),
             str(work / "spec.json"), str(work / "result.json")],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=900,
        )
        assert driver.returncode == 0, (driver.stdout[-3000:], driver.stderr[-3000:])
    result = json.loads((work / "result.json").read_text())
    return work / "federation", result, spaces


def test_one_round_completes_with_both_holders_through_the_proxy(multihost):
    _, result, _ = multihost
    status = result["status"]
    assert status["state"] == "finished" and status["rounds_completed"] == 1, status.get("reason")
    assert {holder: outcome["status"] for holder, outcome in status["rounds"][0]["holders"].items()} == {"h0": "committed", "h1": "committed"}


def test_every_ledger_verifies_and_the_coordinator_matches_the_holders(multihost):
    work, _, _ = multihost
    _, _, holder_entries = verified_ledgers(work, load_credentials(work / "keys"))
    check = cross_check(read_entries(work / "coordinator" / "ledger.jsonl"), holder_entries)
    assert check.ok and check.matched == 2 and not check.not_aggregated, check


def test_the_holders_reach_only_the_fleet_api_and_only_through_the_proxy(multihost):
    _, result, spaces = multihost
    access = Path(result["access_log"]).read_text().splitlines()
    for holder_id, address in spaces.addresses.items():
        fleet = [line for line in access if line.startswith(f"{address} ") and '"POST /v1/fleet/' in line]
        assert fleet, f"no Fleet request of {holder_id} ({address}) went through the proxy"
        direct, control = result["probes"][holder_id]
        assert direct in ("ConnectionRefusedError", "TimeoutError", "OSError"), direct  # the SuperLink is on loopback
        assert control == 403  # the Control API is not proxied
