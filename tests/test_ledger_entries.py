"""Typed views of ledger entries (ewtune.accountant.entries), read from a ledger written by the real Ledger."""

from __future__ import annotations

from ewtune.accountant.entries import HolderEntry, holder_entries, registered_keys, reservations_and_commits
from ewtune.accountant.events import PoissonGaussianEvent, event_from_json
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_payloads import EVALUATION_PURPOSE, Policy
from ewtune.accountant.signing import SigningKey

ROUND = PoissonGaussianEvent(0.01, 1.0, 200)


def test_the_views_read_what_the_ledger_wrote(tmp_path):
    holder_key = SigningKey.generate()
    ledger = Ledger.create(tmp_path / "coordinator.jsonl", SigningKey.generate(), "coordinator", Policy(8.0, 1e-5))
    ledger.register_holder("hospital-a", holder_key.public_key_text, 3.0, 1e-5)
    reserved = ledger.reserve("hospital-a", "run-1", 2, ROUND)
    ledger.commit(reserved, ROUND, extra={"receipt_sha256": "ab" * 32})
    evaluated = ledger.reserve("hospital-a", "run-1", 3, PoissonGaussianEvent(1.0, 20.0, 1))
    ledger.commit(evaluated, PoissonGaussianEvent(1.0, 20.0, 1), extra={"purpose": EVALUATION_PURPOSE})
    entries = ledger.entries
    ledger.close()

    assert holder_entries(entries) == [HolderEntry(1, "hospital-a", holder_key.public_key_text, 3.0, 1e-5)]
    assert registered_keys(entries) == {"hospital-a": holder_key.public_key_text}
    reservations, commits = reservations_and_commits(entries)
    assert [(r.holder, r.run_id, r.round) for r in reservations.values()] == [("hospital-a", "run-1", 2), ("hospital-a", "run-1", 3)]
    training, evaluation = commits
    assert training.reservation == reserved and training.purpose is None and training.receipt_sha256 == "ab" * 32
    assert event_from_json(training.event) == ROUND
    assert evaluation.reservation == evaluated and evaluation.purpose == EVALUATION_PURPOSE
