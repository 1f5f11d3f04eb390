"""The coordinator's cross-check catches a holder ledger rolled back together with its head file (a restore of
the holder's whole directory), which no check of that ledger alone can; ``ewtune ledger crosscheck``."""

from __future__ import annotations

import json

import pytest
from support.ledgers import anchor_head_at, read_entries, resign, write_entries

import ewtune.coordinator.ledger_crosscheck as coordinator_crosscheck
from ewtune.accountant import crosscheck
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_head import default_head_path
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.cli import main

HOLDER = "bank"
RUN = "run-9"
EVENT = PoissonGaussianEvent(0.01, 1.1, 100)
BUDGET = {"budget_epsilon": 8.0, "budget_delta": 1e-5}


def receipt(round_):
    return f"{round_:02d}" * 32


@pytest.fixture()
def ledgers(tmp_path):
    """A coordinator ledger and the holder's own, both with commits for rounds 0 and 1 of one run."""
    coordinator_key, holder_key = SigningKey.generate(), SigningKey.generate()
    coordinator_path, holder_path = tmp_path / "coordinator.jsonl", tmp_path / "bank.jsonl"
    with Ledger.create(coordinator_path, coordinator_key, "coordinator", BUDGET) as coordinator_ledger, \
            Ledger.create(holder_path, holder_key, HOLDER, BUDGET) as holder_ledger:
        coordinator_ledger.register_holder(HOLDER, holder_key.public_key_text, 8.0, 1e-5)
        for round_ in (0, 1):
            own = holder_ledger.reserve(HOLDER, RUN, round_, EVENT)
            holder_ledger.commit(own, EVENT, extra={"receipt_sha256": receipt(round_)})
            seq = coordinator_ledger.reserve(HOLDER, RUN, round_, EVENT)
            coordinator_ledger.commit(seq, EVENT, extra={"receipt_sha256": receipt(round_)})
    return coordinator_path, holder_path, coordinator_key, holder_key


def roll_back_with_its_head(path, key, keep):
    """Keep the first ``keep`` lines, and a head file signed for them: what a restore of the directory gives."""
    path.write_bytes(b"".join(line + b"\n" for line in path.read_bytes().split(b"\n")[:keep]))
    anchor_head_at(path, key, keep - 1)


def test_intact_ledgers_match(ledgers):
    coordinator_path, holder_path, _, _ = ledgers
    check = crosscheck.cross_check(crosscheck.read_entries(coordinator_path), {HOLDER: crosscheck.read_entries(holder_path)})
    assert check.ok and check.matched == 2 and check.mismatches == [] and check.not_aggregated == []
    result = crosscheck.cross_check_ledgers(coordinator_path, {HOLDER: holder_path})
    assert result.ok and result.reports[HOLDER].key_pinned  # pinned to the key the coordinator registered


def test_a_holder_ledger_rolled_back_with_its_head_is_caught_by_the_cross_check(ledgers, capsys):
    coordinator_path, holder_path, _, holder_key = ledgers
    spent = verify_ledger(holder_path).holders[HOLDER].epsilon_certified
    roll_back_with_its_head(holder_path, holder_key, keep=3)  # genesis, reserve r0, commit r0: round 1 gone

    alone = verify_ledger(holder_path, holder_key.public_key_text, head_path=default_head_path(holder_path))
    assert alone.ok and alone.holders[HOLDER].epsilon_certified < spent  # self-consistent, and spends less
    Ledger.open(holder_path, holder_key).close()  # its own head agrees with it: only the coordinator knows

    check = crosscheck.cross_check(crosscheck.read_entries(coordinator_path), {HOLDER: crosscheck.read_entries(holder_path)})
    assert not check.ok and check.matched == 1
    assert check.mismatches == [
        f"{HOLDER}, run {RUN}, round 1: committed by the coordinator, absent from the holder's ledger "
        "(the holder's ledger was rolled back or truncated, or the commit was never written)"
    ]

    code = main(["ledger", "crosscheck", str(coordinator_path), f"{HOLDER}={holder_path}"])
    out = capsys.readouterr().out
    assert code == 1
    assert "cross-check: 1 coordinator commit(s) matched, 1 mismatch(es): FAILED" in out
    assert f"  mismatch: {HOLDER}, run {RUN}, round 1: committed by the coordinator, absent" in out
    code = main(["ledger", "crosscheck", str(coordinator_path), f"{HOLDER}={holder_path}", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["ok"] is False and result["matched"] == 1 and len(result["mismatches"]) == 1
    assert "holders" not in result["ledgers"][HOLDER]  # no figures in a cross-check report


def test_the_crosscheck_command_passes_on_intact_ledgers(ledgers, capsys):
    coordinator_path, holder_path, coordinator_key, _ = ledgers
    argv = ["ledger", "crosscheck", str(coordinator_path), f"{HOLDER}={holder_path}"]
    assert main(argv + ["--public-key", coordinator_key.public_key_text]) == 0
    out = capsys.readouterr().out
    assert "cross-check: 2 coordinator commit(s) matched, 0 mismatch(es): OK" in out
    assert f"{HOLDER}: ledger {holder_path}: OK" in out and "pinned key" in out


def test_a_holder_ledger_resigned_with_another_key_fails_against_the_registered_key(ledgers, capsys):
    coordinator_path, holder_path, _, _ = ledgers
    forger = SigningKey.generate()
    entries = read_entries(holder_path)
    entries[0]["payload"]["public_key"] = forger.public_key_text
    write_entries(holder_path, resign(entries, forger))
    assert verify_ledger(holder_path).ok  # self-consistent
    result = crosscheck.cross_check_ledgers(coordinator_path, {HOLDER: holder_path})
    assert not result.ok and "differs from the pinned public key" in result.reports[HOLDER].summary()
    assert main(["ledger", "crosscheck", str(coordinator_path), f"{HOLDER}={holder_path}"]) == 1


@pytest.mark.parametrize("holder", ["bank", "=x.jsonl", "bank="])
def test_a_malformed_holder_argument_exits_2(ledgers, capsys, holder):
    code = main(["ledger", "crosscheck", str(ledgers[0]), holder])
    err = capsys.readouterr().err
    assert code == 2 and "HOLDER_ID=PATH" in err and err.count("\n") == 1


def test_the_coordinator_module_re_exports_the_accountant_cross_check():
    assert coordinator_crosscheck.cross_check is crosscheck.cross_check
    assert coordinator_crosscheck.read_entries is crosscheck.read_entries
    assert coordinator_crosscheck.CrossCheck is crosscheck.CrossCheck


def test_a_holders_private_evaluations_do_not_shadow_its_training_commits(tmp_path):
    """A private evaluation of round r's model is reserved under (run, r) like round r's training: charged in the
    holder's ledger, never aggregated, so it must not replace the training commit the coordinator matches."""
    from ewtune.accountant.ledger_payloads import EVALUATION_PURPOSE

    coordinator_key, holder_key = SigningKey.generate(), SigningKey.generate()
    coordinator_path, holder_path = tmp_path / "coordinator.jsonl", tmp_path / "bank.jsonl"
    evaluation = PoissonGaussianEvent(1.0, 20.0, 1)
    with Ledger.create(coordinator_path, coordinator_key, "coordinator", BUDGET) as coordinator_ledger, \
            Ledger.create(holder_path, holder_key, HOLDER, BUDGET) as holder_ledger:
        coordinator_ledger.register_holder(HOLDER, holder_key.public_key_text, 8.0, 1e-5)
        own = holder_ledger.reserve(HOLDER, RUN, 1, EVENT)
        holder_ledger.commit(own, EVENT, extra={"receipt_sha256": receipt(1)})
        seq = coordinator_ledger.reserve(HOLDER, RUN, 1, EVENT)
        coordinator_ledger.commit(seq, EVENT, extra={"receipt_sha256": receipt(1)})
        checked = holder_ledger.reserve(HOLDER, RUN, 1, evaluation)
        holder_ledger.commit(checked, evaluation, extra={"purpose": EVALUATION_PURPOSE})
    check = crosscheck.cross_check(crosscheck.read_entries(coordinator_path), {HOLDER: crosscheck.read_entries(holder_path)})
    assert check.ok and check.matched == 1 and check.not_aggregated == []
