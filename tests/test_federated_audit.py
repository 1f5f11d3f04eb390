"""The federated audit through real Flower processes on 127.0.0.1 (``ewtune audit --federated``): a TLS SuperLink,
one audit daemon with its SuperNode per holder, the coordinator's ServerApp. Each daemon decides its own canaries
on its own coordinates (bits from the OS's secure source), the coordinator scores each update as received before
aggregation, fixes the scores, then asks for the reveals, and records the bounds per holder and pooled in its
ledger, which ``ledger verify`` states beside the certified epsilon of each holder's commits in the run.

In CI (about 2 to 3 minutes on 2 cores): three holders of 400 canaries, 5 rounds of 10 local steps at the
planner's sigma for certified epsilon 1.65, the first holder's engine broken on purpose (noise off). Slow: four
correct holders of 250 canaries, 10 rounds of 5 local steps (the audit notes' federated recipe)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from ewtune.accountant.crosscheck import cross_check, read_entries
from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE
from ewtune.accountant.one_run_audit import one_run_bound
from ewtune.accountant.verify import verify_ledger
from ewtune.coordinator.canary_audit import scores_digest
from ewtune.cli import main

CERTIFIED = 1.6525  # the target the planner calibrates sigma to: q 0.1, 50 steps, delta 1e-5


def _audit(work, *arguments):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main(["audit", "--federated", "--json", "--work-dir", str(work), "--steps", "50", *arguments])
    return code, json.loads(output.getvalue())


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("federated-audit")
    code, report = _audit(work, "--holders", "3", "--canaries", "1200", "--local-steps", "10", "--broken-engine", "noise off")
    return work, code, report


def test_a_holder_whose_engine_adds_no_noise_is_caught_and_the_correct_ones_are_not(broken_run):
    work, code, report = broken_run
    audit = report["audit"]
    assert report["state"] == "finished" and audit["state"] == "scored", audit.get("reason")
    holders = audit["holders"]
    assert set(holders) == {"audit-0", "audit-1", "audit-2"}
    assert all(h["canaries"] == 400 and h["rounds_observed"] == 5 for h in holders.values())
    assert all(h["epsilon_certified_run"] == pytest.approx(CERTIFIED, abs=0.01) for h in holders.values())
    assert holders["audit-0"]["engine_broken_on_purpose"] == "noise off"
    assert holders["audit-0"]["epsilon_lower_bound"] >= 3.0
    for correct in ("audit-1", "audit-2"):
        assert holders[correct]["engine_broken_on_purpose"] is None
        assert 0.0 <= holders[correct]["epsilon_lower_bound"] <= holders[correct]["epsilon_certified_run"]
    assert audit["passed"] is False and code == 1


def test_the_correct_holders_pooled_bound_is_within_the_certified_epsilon(broken_run):
    """Recomputed from what the coordinator kept: its scores (fixed before the reveals) and the revealed bits."""
    work, _, report = broken_run
    scores = np.load(work / "coordinator" / "run" / "audit-scores.npz")
    revealed = np.load(work / "coordinator" / "run" / "audit-canaries.npz")
    parts = []
    for holder in ("audit-1", "audit-2"):
        first = int(revealed[f"first:{holder}"])
        own = slice(first, first + 400)
        parts.append((scores[f"scores:{holder}"][own], revealed[f"included:{holder}"], revealed["tie_break"][own]))
    pooled = one_run_bound(*(np.concatenate([p[i] for p in parts]) for i in range(2)), 1e-5, np.concatenate([p[2] for p in parts]))
    assert pooled.canaries == 800
    assert 0.0 <= pooled.epsilon <= report["audit"]["holders"]["audit-1"]["epsilon_certified_run"]


def test_the_scores_were_fixed_before_the_reveal_and_the_bounds_are_in_the_verified_ledger(broken_run):
    work, _, report = broken_run
    audit = report["audit"]
    scores = np.load(work / "coordinator" / "run" / "audit-scores.npz")
    digest = scores_digest({name.split(":", 1)[1]: scores[name] for name in scores.files if name.startswith("scores:")})
    assert digest == audit["scores_sha256"]
    for holder in ("audit-0", "audit-1", "audit-2"):  # each holder logged the digest it was sent with the reveal request
        assert digest in (work / "holders" / holder / "agent.log").read_text()
    rows = {row["holder"]: row for row in report["ledger_audits"]}
    assert set(rows) == {"audit-0", "audit-1", "audit-2", "pooled"}
    for holder, bound in audit["holders"].items():
        assert rows[holder]["epsilon_lower_bound"] == bound["epsilon_lower_bound"]
        assert rows[holder]["epsilon_certified_run"] == pytest.approx(bound["epsilon_certified_run"], rel=1e-3)
    assert rows["audit-0"]["exceeds_certified"] and not rows["audit-1"]["exceeds_certified"]
    entry = read_entries(work / "coordinator" / "ledger.jsonl")[audit["ledger_seq"]]
    assert entry["kind"] == "audit" and entry["payload"]["scores_sha256"] == digest


def test_the_holders_ledgers_record_audit_releases_and_cross_check(broken_run):
    work, _, _ = broken_run
    registry = json.loads((work / "keys" / "supernodes.json").read_text())
    keys = {card["holder_id"]: card["ledger_public_key"] for card in registry["holders"]}
    entries = {}
    for holder, key in keys.items():
        path = work / "holders" / holder / "ledger.jsonl"
        assert verify_ledger(path, key).ok
        entries[holder] = read_entries(path)
        commits = [e["payload"] for e in entries[holder] if e["kind"] == "commit"]
        assert len(commits) == 5 and all(c["extra"]["purpose"] == AUDIT_PURPOSE for c in commits)
        assert all(("engine_broken_on_purpose" in c["extra"]) == (holder == "audit-0") for c in commits)
    check = cross_check(read_entries(work / "coordinator" / "ledger.jsonl"), entries)
    assert check.ok, check.mismatches
    assert check.matched == 15 and not check.not_aggregated


@pytest.mark.slow
def test_a_correct_federation_of_four_holders_stays_within_the_certified_epsilon(tmp_path):
    code, report = _audit(tmp_path, "--holders", "4", "--canaries", "1000", "--local-steps", "5")
    audit = report["audit"]
    assert audit["state"] == "scored", audit.get("reason")
    assert all(h["rounds_observed"] == 10 and h["canaries"] == 250 for h in audit["holders"].values())
    assert all(h["epsilon_lower_bound"] <= h["epsilon_certified_run"] for h in audit["holders"].values())
    assert audit["pooled"]["canaries"] == 1000
    assert 0.0 <= audit["pooled"]["epsilon_lower_bound"] <= audit["pooled"]["epsilon_certified_run"]
    assert audit["passed"] is True and code == 0
    assert not any(row["exceeds_certified"] for row in report["ledger_audits"])
