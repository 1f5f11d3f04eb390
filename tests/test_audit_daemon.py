"""The holder's side of the federated audit (ewtune.agent.audit.holder, the daemon's audit mode) and the coordinator
ledger's ``audit`` entry, without Flower: an audit run is a run kind of its own that the policy must allow, its
canaries' bits leave only through one reveal after a released round, and the bounds recorded in the ledger are
stated by ``ledger verify`` beside the certified epsilon of the holder's commits in that run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.agent.audit.holder import AuditHolderConfig, AuditTrainer
from ewtune.agent.policy import HolderPolicy, PlanRefused

HOLDER = "audit-0"
BUDGET = {"budget_epsilon": 10.0, "budget_delta": 1e-5}
PLAN = {"run_id": "audit-1", "round": 1, "steps": 4, "sampling_rate": 0.1, "noise_multiplier": 2.0, "clip_norm": 1.0,
        "learning_rate": 0.5, "delta": 1e-5, "purpose": AUDIT_PURPOSE}


def _daemon(tmp_path, audit_runs=True, **audit):
    from ewtune.agent.daemon import Daemon

    key = SigningKey.generate()
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, HOLDER, BUDGET)
    trainer = AuditTrainer(AuditHolderConfig(**{"block": 40, "first": 10, "count": 20, "records": 200, **audit}))
    return Daemon(HOLDER, HolderPolicy(**BUDGET, audit_runs=audit_runs), trainer, ledger, key)


def _weights(daemon):
    return {name: tensor.numpy().copy() for name, tensor in daemon.trainer.trainable_state().items()}


def _kinds(daemon):
    return [entry["kind"] for entry in daemon.ledger.entries]


def test_an_audit_daemon_needs_a_policy_that_allows_audit_runs(tmp_path):
    with pytest.raises(InvalidInputError, match="audit_runs"):
        _daemon(tmp_path, audit_runs=False)


def test_an_audit_daemon_trains_only_audit_plans_and_reveals_once_after_a_released_round(tmp_path):
    daemon = _daemon(tmp_path)
    with pytest.raises(PlanRefused, match="only audit runs"):
        daemon.train(_weights(daemon), {**PLAN, "purpose": ""})
    with pytest.raises(PlanRefused, match="released no audit round"):
        daemon.reveal_audit({"run_id": "audit-1"})
    assert _kinds(daemon) == ["genesis"]  # refusals charge nothing
    before = _weights(daemon)
    reply = daemon.train(before, PLAN)
    commit = daemon.ledger.entries[-1]["payload"]
    assert commit["extra"]["purpose"] == AUDIT_PURPOSE and "engine_broken_on_purpose" not in commit["extra"]
    moved = np.flatnonzero(reply.arrays["audit.weight"][:, 0] != before["audit.weight"][:, 0])
    assert len(moved) == 40  # the noise touches every coordinate of the block, not only this holder's
    with pytest.raises(PlanRefused, match="released no audit round"):
        daemon.reveal_audit({"run_id": "another-run"})
    revealed = daemon.reveal_audit({"run_id": "audit-1", "scores_sha256": "0" * 64})
    assert (revealed["holder_id"], revealed["first"], revealed["count"]) == (HOLDER, 10, 20)
    assert len(revealed["included"]) == 20 and set(revealed["included"]) <= {"0", "1"}
    with pytest.raises(PlanRefused, match="revealed already"):
        daemon.reveal_audit({"run_id": "audit-1"})
    entries = len(daemon.ledger.entries)
    with pytest.raises(PlanRefused, match="revealed"):
        daemon.train(reply.arrays, {**PLAN, "round": 2})
    assert len(daemon.ledger.entries) == entries  # refused before anything is charged
    daemon.close()


def test_each_daemons_inclusion_bits_come_from_the_secure_source():
    config = AuditHolderConfig(block=400, first=0, count=400)
    first, second = AuditTrainer(config), AuditTrainer(config)
    assert first.randomness == "os-secure"
    bits = first.reveal()["included"], second.reveal()["included"]
    assert bits[0] != bits[1]  # two draws of 400 fair bits agree with probability 2^-400
    assert 120 < bits[0].count("1") < 280


def test_a_broken_engine_is_named_in_every_commit(tmp_path):
    daemon = _daemon(tmp_path, breakage="noise off")
    weights = _weights(daemon)
    reply = daemon.train(weights, PLAN)
    assert daemon.ledger.entries[-1]["payload"]["extra"]["engine_broken_on_purpose"] == "noise off"
    change = reply.arrays["audit.weight"][:, 0] - weights["audit.weight"][:, 0]
    assert np.count_nonzero(change[:10]) == 0 and np.count_nonzero(change[30:]) == 0  # no noise off its own canaries
    daemon.close()


def test_a_training_daemon_refuses_audit_plans_and_reveals(tmp_path):
    from ewtune.agent.daemon import Daemon

    class Plain:  # the trainer interface of a training daemon (no reveal); never reached past the refusals
        model_id, randomness, dataset_size, record_count = "plain", "os-secure", 1000, 1000
        config = SimpleNamespace(data_file=__file__)  # its data file, whose fingerprint ties the released count

        def trainable_state(self):
            return {}

    key = SigningKey.generate()
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, HOLDER, BUDGET)
    daemon = Daemon(HOLDER, HolderPolicy(**BUDGET, audit_runs=True), Plain(), ledger, key)
    with pytest.raises(PlanRefused, match="not a run of purpose 'audit'"):
        daemon.train({}, PLAN)
    with pytest.raises(PlanRefused, match="no canaries"):
        daemon.reveal_audit({"run_id": "audit-1"})
    assert [entry["kind"] for entry in ledger.entries] == ["genesis", "reserve", "commit"]  # only the noised count
    daemon.close()


@pytest.mark.parametrize("bad, match", [
    ({"first": 30, "count": 20}, "outside the block"),
    ({"breakage": "noise off by half"}, "unknown engine breakage"),
    ({"raw_norm": 1.0}, "raw_norm"),
])
def test_bad_audit_tables_are_refused(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        AuditHolderConfig(**{"block": 40, "first": 0, "count": 20, **bad})


def _bound(value, canaries=500):
    return {"epsilon_lower_bound": value, "confidence": 0.95, "canaries": canaries, "ceiling": 4.5}


def test_the_coordinator_ledger_records_an_audit_and_verify_states_it_beside_each_runs_certified_epsilon(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "coordinator.jsonl"
    event = PoissonGaussianEvent(0.1, 2.0, 10)
    with Ledger.create(path, key, "coordinator", BUDGET) as ledger:
        for holder in ("a", "b"):
            ledger.register_holder(holder, SigningKey.generate().public_key_text, 10.0, 1e-5)
            for round in (1, 2):
                ledger.commit(ledger.reserve(holder, "audit-7", round, event), event)
        ledger.commit(ledger.reserve("a", "other-run", 1, event), event)  # not part of the audited run
        with pytest.raises(InvalidInputError, match="unregistered holder"):
            ledger.record_audit("audit-7", {"c": _bound(0.1)}, _bound(0.1, 1000))
        with pytest.raises(InvalidInputError, match="epsilon_lower_bound"):
            ledger.record_audit("audit-7", {"a": _bound(-1.0)}, _bound(0.1, 1000))
        seq = ledger.record_audit("audit-7", {"a": _bound(0.3), "b": _bound(4.2)}, _bound(2.0, 1000), {"view": "as received"})
    report = verify_ledger(path, key.public_key_text)
    assert report.ok, report.summary()
    run = certified_epsilon(PoissonGaussianEvent(0.1, 2.0, 20), 1e-5)
    assert [(a["seq"], a["holder"], a["exceeds_certified"]) for a in report.audits] == [
        (seq, "a", False), (seq, "b", True), (seq, "pooled", True)]
    assert all(a["epsilon_certified_run"] == pytest.approx(run, rel=1e-9) for a in report.audits)
    assert "AUDIT ALARM" in report.summary()
