"""The empirical privacy audit (ewtune/agent/audit, ewtune audit) on the real DP-SGD engine: validity on a correct run,
power against an engine broken in its noise, clipping or sampling (each broken in the engine's own code, the audit
run unchanged), the checks beside the bound, and the canary plumbing."""

import json

import numpy as np
import pytest
import torch

from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey
from ewtune.agent.audit.breakages import broken
from ewtune.agent.audit.canaries import AuditedModel, CanaryCollator, audited_loss
from ewtune.agent.audit.run import AuditConfig, FeatureClassifier, run_audit
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.losses import classification_loss
from ewtune.cli import main

CERTIFIED_AT_DEFAULTS = 1.6525  # q 0.1, sigma 2, 50 steps, delta 1e-5 (the recipe of the audit notes: 1.653)


def _failed_checks(result) -> set[str]:
    return {check.name for holder in result.holders for check in holder.checks if not check.ok}


@pytest.mark.parametrize("seed", [1, 2])
def test_a_correct_engine_passes(seed):
    result = run_audit(AuditConfig(seed=seed, fdp=True))
    assert result.epsilon_certified == pytest.approx(CERTIFIED_AT_DEFAULTS, abs=1e-3)
    assert 0.0 <= result.pooled.epsilon <= result.epsilon_certified
    assert 0.0 <= result.fdp.epsilon <= result.epsilon_certified and result.passed
    assert result.pooled.ceiling == pytest.approx(5.19, abs=0.01)
    assert _failed_checks(result) == set()


def test_noise_switched_off_is_caught():
    with broken("noise off"):
        result = run_audit(AuditConfig(seed=3, fdp=True))
    assert result.pooled.epsilon >= 3.0 and result.pooled.epsilon > result.epsilon_certified
    assert result.fdp.epsilon >= 3.0 and not result.passed
    assert "noise_scale" in _failed_checks(result)
    # Without noise each included canary's observations count the steps that sampled it: Binomial(T m_in, q).
    holder = result.holders[0]
    sampled = holder.observations[:, holder.included].sum()
    trials = holder.observations.shape[0] * holder.included.sum()
    assert abs(sampled - 0.1 * trials) < 5 * np.sqrt(trials * 0.1 * 0.9)
    assert np.allclose(holder.observations, np.round(holder.observations), atol=1e-3)


def test_clipping_bypassed_is_caught():
    with broken("clipping bypassed"):
        result = run_audit(AuditConfig(seed=4))
    assert result.pooled.epsilon >= 3.0
    assert "sensitivity" in _failed_checks(result)


def test_every_record_in_every_step_is_caught():
    with broken("every record in every step"):
        result = run_audit(AuditConfig(seed=5))
    assert result.pooled.epsilon >= 3.0
    assert "executed_accounting" in _failed_checks(result)


def test_noise_four_times_too_small_exceeds_the_certified_claim():
    with broken("noise 4x too small"):
        result = run_audit(AuditConfig(seed=6, fdp=True))
    assert result.pooled.epsilon > result.epsilon_certified
    assert result.fdp.epsilon > result.epsilon_certified
    assert "noise_scale" in _failed_checks(result)


def test_federated_canaries_per_holder_and_pooled():
    """4 holders x 250 canaries on disjoint coordinates, 10 rounds of 5 local steps, scored from round updates."""
    config = AuditConfig(seed=7, holders=4, local_steps=5)
    correct = run_audit(config)
    assert [h.observations.shape for h in correct.holders] == [(10, 250)] * 4
    assert correct.pooled.canaries == 1000
    assert all(h.bound.epsilon <= correct.epsilon_certified for h in correct.holders)
    assert correct.pooled.epsilon <= correct.epsilon_certified
    assert _failed_checks(correct) == set()
    with broken("noise off"):
        noiseless = run_audit(config)
    assert noiseless.pooled.epsilon >= 3.0
    assert all(h.bound.epsilon > noiseless.epsilon_certified for h in noiseless.holders)


def test_canaries_touch_only_their_own_coordinate_and_never_the_logits():
    torch.manual_seed(0)
    model = AuditedModel(FeatureClassifier(4), canaries=6)
    torch.nn.init.normal_(model.audit.weight)
    features = torch.randn(5, 4)
    collator = CanaryCollator(features, torch.tensor([0, 1, 0, 1, 1]), included=torch.tensor([1, 4]))
    batch = collator(torch.arange(collator.size))
    assert batch["canary"].tolist() == [-1] * 5 + [1, 4]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(model(**inputs).logits[:5], model.model(features=features).logits)
    clipper = PerExampleClipper(model, 1.0, audited_loss(classification_loss, 10.0))
    canaries_only = clipper.clipped_grad_sum(collator(torch.tensor([5, 6])))
    assert canaries_only.per_example_norms.tolist() == pytest.approx([10.0, 10.0])
    audit = canaries_only.grads["audit.weight"][:, 0]
    assert audit.tolist() == pytest.approx([0, 1, 0, 0, 1, 0], abs=1e-6)  # clipped to C = 1, on coordinates 1 and 4
    assert all(float(g.abs().max()) == 0.0 for name, g in canaries_only.grads.items() if name != "audit.weight")
    real_only = clipper.clipped_grad_sum(collator(torch.arange(5)))
    assert float(real_only.grads["audit.weight"].abs().max()) == 0.0
    clipper.close()


def test_cli_prints_the_three_figures_and_records_the_bound_in_the_ledger(tmp_path, capsys):
    key = SigningKey.generate()
    key_path = tmp_path / "ledger.key"
    key.save(key_path)
    ledger_path = tmp_path / "holder.ledger"
    Ledger.create(ledger_path, key, "holder-a", {"budget_epsilon": 10.0, "budget_delta": 1e-5}).close()
    code = main(["audit", "--seed", "1", "--json", "--ledger", str(ledger_path), "--signing-key", str(key_path)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["epsilon_certified"] == pytest.approx(CERTIFIED_AT_DEFAULTS, abs=1e-3)
    assert report["epsilon_edgeworth_estimate"] > 0
    assert 0 <= report["audit"]["epsilon_lower_bound"] <= report["epsilon_certified"]
    commit = [json.loads(line) for line in ledger_path.read_text().splitlines()][-1]
    assert commit["kind"] == "commit" and commit["payload"]["extra"]["purpose"] == "audit"
    recorded = commit["payload"]["extra"]["audit"]
    assert recorded["epsilon_lower_bound"] == report["audit"]["epsilon_lower_bound"]
    assert recorded["epsilon_certified_run"] == pytest.approx(commit["payload"]["epsilon_certified"])
    assert main(["ledger", "verify", str(ledger_path), "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["audits"] == [{
        "seq": commit["seq"],
        "epsilon_lower_bound": recorded["epsilon_lower_bound"],
        "confidence": 0.95,
        "canaries": 1000,
        "epsilon_certified_run": pytest.approx(recorded["epsilon_certified_run"], rel=1e-9),
        "exceeds_certified": False,
    }]


def test_cli_bad_input_is_one_line(capsys):
    assert main(["audit", "--canaries", "1"]) == 2
    assert main(["audit", "--steps", "10", "--local-steps", "3"]) == 2
    assert main(["audit", "--holders", "2", "--ledger", "x", "--signing-key", "y"]) == 2
    assert main(["audit", "--model", "transformer", "--canaries", "3000"]) == 2  # 2048 coordinates in its weight
    assert main(["audit", "--federated", "--model", "transformer"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("ewtune: error: ") for line in errors)
