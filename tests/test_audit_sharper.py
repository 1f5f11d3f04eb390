"""Where the audit was blind (issue 20): a clip norm other than 1 (the sigma vs sigma C mix-up), halved noise
(from the canaries' scores themselves, through the f-DP test of the claimed DP-SGD curve), and canaries that
ride a real transformer layer instead of an audit block. Every run goes through the real engine
(ewtune.agent.audit.run.run_audit); each breakage patches the engine's own code (ewtune.agent.audit.breakages)."""

import numpy as np
import pytest
import torch

from ewtune.agent.audit.breakages import broken
from ewtune.agent.audit.run import AuditConfig, run_audit


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared machine: one intra-op thread is several times faster than two that contend
    (the transformer test: 22 s against 144 s at a load average of 7)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _failed_checks(result) -> set[str]:
    return {check.name for holder in result.holders for check in holder.checks if not check.ok}


def _check(result, name):
    return next(check for check in result.holders[0].checks if check.name == name)


def test_at_clip_norm_2_the_correct_engine_passes_and_every_breakage_is_flagged():
    config = AuditConfig(seed=11, clip_norm=2.0)
    correct = run_audit(config)
    assert correct.passed and _failed_checks(correct) == set()
    assert _check(correct, "noise_scale").figures["std_over_claimed"] == pytest.approx(1.0, abs=0.03)
    expected = {
        "noise std sigma, not sigma C": "noise_scale",
        "noise halved": "noise_scale",
        "clipping bypassed": "sensitivity",
        "noise off": "noise_scale",
    }
    for breakage, check in expected.items():
        with broken(breakage):
            result = run_audit(config)
        assert check in _failed_checks(result) and not result.passed, breakage
    with broken("noise std sigma, not sigma C"):
        mixed_up = run_audit(config)
    assert _check(mixed_up, "noise_scale").figures["std_over_claimed"] == pytest.approx(0.5, abs=0.02)


def test_the_sigma_vs_sigma_c_mix_up_is_the_correct_mechanism_at_clip_norm_1():
    """At C = 1, sigma and sigma C are one number: the mix-up releases exactly what the correct engine does
    (which is why an audit at C = 1 alone could never see it)."""
    config = AuditConfig(seed=12, canaries=200, steps=10)
    correct = run_audit(config)
    with broken("noise std sigma, not sigma C"):
        mixed_up = run_audit(config)
    assert np.array_equal(correct.holders[0].observations, mixed_up.holders[0].observations)


def test_halved_noise_refutes_the_claimed_dpsgd_curve_with_enough_canaries():
    """5000 canaries: the f-DP test of "the run is at least as private as DP-SGD(q, T, sigma = 2)" refutes the
    claim when the engine's noise is halved (its Steinke bound, about 1.4, stays below the certified 1.65);
    on the correct engine the claim stands (the test's false-alarm rate is at most 5%)."""
    config = AuditConfig(seed=13, canaries=5000)
    correct = run_audit(config)
    assert _check(correct, "dpsgd_hypothesis").ok and correct.passed
    with broken("noise halved"):
        halved = run_audit(config)
    assert not _check(halved, "dpsgd_hypothesis").ok
    assert halved.pooled.epsilon < halved.epsilon_certified  # the bound alone does not see it


def test_canaries_in_a_transformer_feed_forward_weight_through_the_real_engine():
    """Canaries on coordinates of BERT's top feed-forward weight, which the real records train too: a correct
    engine passes with the left-out coordinates' spread at sigma (the records' interference is small); with
    the sigma vs sigma C mix-up at C = 2 the noise check flags it."""
    config = AuditConfig(seed=14, model="transformer", records=16, canaries=500, clip_norm=2.0)
    correct = run_audit(config)
    assert correct.passed and _failed_checks(correct) == set()
    assert _check(correct, "noise_scale").figures["std_over_claimed"] == pytest.approx(1.0, abs=0.03)
    with broken("noise std sigma, not sigma C"):
        mixed_up = run_audit(config)
    assert "noise_scale" in _failed_checks(mixed_up) and not mixed_up.passed


def test_transformer_canaries_without_noise_show_the_records_interference_and_exceed_3():
    with broken("noise off"):
        noiseless = run_audit(AuditConfig(seed=15, model="transformer", records=16, canaries=500, clip_norm=2.0))
    assert noiseless.pooled.epsilon >= 3.0 and not noiseless.passed
    observed = noiseless.holders[0].observations  # no noise: each step shows B (0 or 1) plus the interference
    assert np.abs(observed - np.round(observed)).max() < 0.05


@pytest.mark.parametrize("breakage", ["noise halved", "clipping bypassed"])
def test_transformer_canaries_flag_more_breakages(breakage):
    config = AuditConfig(seed=15, model="transformer", records=16, canaries=500, clip_norm=2.0)
    with broken(breakage):
        result = run_audit(config)
    assert not result.passed
    assert {"noise halved": "noise_scale", "clipping bypassed": "sensitivity"}[breakage] in _failed_checks(result)
