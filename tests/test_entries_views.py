"""Every ledger entry kind read through its view (ewtune.accountant.entries), from ledgers the real Ledger wrote;
and a malformed entry, read through the views by the rules, the verifier and ``ewtune ledger verify``, refused
in one line naming the field it lacks (never a KeyError)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.ledgers import BUDGET, DIGEST, WRITER, read_entries, resign, write_entries

from ewtune.accountant.entries import (
    AbortEntry,
    AuditEntry,
    CommitEntry,
    GenesisEntry,
    HolderEntry,
    RepairEntry,
    ReserveEntry,
    entry_view,
)
from ewtune.accountant.errors import InvalidInputError, UnknownEventKindError
from ewtune.accountant.events import PoissonGaussianEvent, event_from_json
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE, Policy
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.spend import LedgerState
from ewtune.accountant.verify import verify_ledger
from ewtune.agent.released_count import count_event, count_facts, latest_count

REPO = Path(__file__).resolve().parents[1]
ROUND = PoissonGaussianEvent(0.01, 1.0, 200)
BOUND = {"epsilon_lower_bound": 0.5, "confidence": 0.95, "canaries": 100}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A coordinator's ledger: genesis, a holder, a reservation and its commit, one aborted, a federated audit."""
    path = tmp_path_factory.mktemp("coordinator") / "ledger.jsonl"
    key, holder_key = SigningKey.generate(), SigningKey.generate()
    with Ledger.create(path, key, "coordinator", Policy(8.0, 1e-5)) as ledger:
        ledger.register_holder("hospital-a", holder_key.public_key_text, 3.0, 1e-5)
        reserved = ledger.reserve("hospital-a", "run-1", 1, ROUND)
        ledger.commit(reserved, ROUND, extra={"receipt_sha256": DIGEST})
        ledger.abort(ledger.reserve("hospital-a", "run-1", 2, ROUND), "holder went offline")
        ledger.record_audit("run-1", {"hospital-a": BOUND}, BOUND, facts={"method": "canaries"})
    return path, key, holder_key


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    """A holder's ledger: a count release, an audit run's commit, and a repair of a torn last line."""
    path = tmp_path_factory.mktemp("holder") / "ledger.jsonl"
    key = SigningKey.generate()
    with Ledger.create(path, key, WRITER, BUDGET) as ledger:
        counted = ledger.reserve(WRITER, "dataset-size", 0, count_event(20.0))
        ledger.commit(counted, count_event(20.0), extra=count_facts(1234, 20.0))
        audited = ledger.reserve(WRITER, "audit-1", 0, ROUND)
        ledger.commit(audited, ROUND, extra={"purpose": AUDIT_PURPOSE, "audit": BOUND})
    torn = b'{"seq": 5, "tor'
    intact = path.read_bytes()
    path.write_bytes(intact + torn)
    Ledger.open(path, key).close()
    return path, key, len(intact), torn


def test_each_kind_of_a_coordinator_ledger_reads_as_written(coordinator):
    path, key, holder_key = coordinator
    views = [entry_view(entry) for entry in read_entries(path)]
    assert [type(view) for view in views] == [GenesisEntry, HolderEntry, ReserveEntry, CommitEntry, ReserveEntry,
                                              AbortEntry, AuditEntry]
    genesis, registration, reserve, commit, _, abort, audit = views
    assert (genesis.writer, genesis.public_key, genesis.budget_epsilon, genesis.budget_delta, genesis.schema) == (
        "coordinator", key.public_key_text, 8.0, 1e-5, 1)
    assert genesis.accountant["name"] and genesis.policy == {"budget_epsilon": 8.0, "budget_delta": 1e-5}
    assert registration == HolderEntry(1, "hospital-a", holder_key.public_key_text, 3.0, 1e-5)
    assert (reserve.holder, reserve.run_id, reserve.round) == ("hospital-a", "run-1", 1)
    assert event_from_json(reserve.event) == ROUND
    assert set(reserve.stated) == {"epsilon_certified", "epsilon_edgeworth"}
    assert (commit.reservation, commit.receipt_sha256, commit.purpose, commit.states_audit) == (2, DIGEST, None, False)
    assert commit.time == read_entries(path)[3]["time"] and commit.stated["epsilon_certified"] > 0
    assert (abort.reservation, abort.reason, abort.stated) == (4, "holder went offline", {})
    assert (audit.run_id, audit.holders, audit.pooled) == ("run-1", {"hospital-a": BOUND}, BOUND)


def test_each_kind_of_a_holder_ledger_reads_as_written(holder):
    path, _, offset, torn = holder
    entries = read_entries(path)
    count, audit_commit, repair = (entry_view(entries[seq]) for seq in (2, 4, 5))
    assert count.released_count == 1234 and latest_count(entries).value == 1234
    assert audit_commit.states_audit and audit_commit.audit == BOUND and audit_commit.released_count is None
    assert isinstance(repair, RepairEntry)
    assert (repair.torn_bytes, repair.offset) == (len(torn), offset)
    assert repair.torn_sha256 == hashlib.sha256(torn).hexdigest()
    assert repair.saved_as.startswith("ledger.jsonl.torn-")


def test_a_view_of_an_entry_lacking_every_field_reads_none_and_raises_nothing(coordinator, holder):
    for entry in read_entries(coordinator[0]) + read_entries(holder[0]):
        view = entry_view({**entry, "payload": {}})
        fields = {name: value for name, value in vars(view).items() if name not in ("seq", "time")}  # the envelope's
        assert all(value in (None, {}) for value in fields.values()), (entry["kind"], fields)


def test_an_entry_no_view_fits_is_refused_in_one_line(coordinator):
    genesis = read_entries(coordinator[0])[0]
    with pytest.raises(UnknownEventKindError, match="unknown entry kind 'rebate'"):
        entry_view({**genesis, "kind": "rebate"})
    with pytest.raises(InvalidInputError, match="the payload of a genesis entry must be a JSON object"):
        entry_view({**genesis, "payload": ["not", "an", "object"]})


@pytest.mark.parametrize("seq, field, reason", [
    (0, "schema", "unknown ledger schema None"),
    (0, "policy", "genesis lacks the policy object"),
    (1, "public_key", "public_key must be a non-empty string, got None"),
    (1, "budget_delta", "budget delta must be in (0, 1), got None"),
    (2, "run_id", "run_id must be a non-empty string, got None"),
    (2, "round", "round must be an integer >= 0, got None"),
    (3, "reservation", "seq None is not a reservation"),
    (5, "reason", "reason must be a non-empty string, got None"),
    (6, "holders", "an audit entry needs the object 'holders'"),
    (6, "pooled", "pooled must be a JSON object"),
])
def test_a_signed_entry_lacking_a_field_fails_verification_naming_it(coordinator, tmp_path, seq, field, reason):
    path, key, _ = coordinator
    forged = tmp_path / "ledger.jsonl"
    entries = read_entries(path)
    del entries[seq]["payload"][field]
    write_entries(forged, resign(entries, key, start=seq))
    report = verify_ledger(forged, key.public_key_text)
    assert not report.ok and (report.first_bad.seq, report.first_bad.line) == (seq, seq + 1)
    assert reason in report.first_bad.reason and report.entries_verified == seq
    with pytest.raises(InvalidInputError, match=re.escape(reason)):  # the rules the writer's open runs, too
        _replayed(entries[:seq]).prepare(entries[seq])


def _replayed(entries):
    state = LedgerState()
    for entry in entries:
        state.apply(entry)
    return state


def test_ledger_verify_refuses_a_line_lacking_a_field_in_one_line(holder, tmp_path):
    """Through the real CLI, in a process of its own: exit 1, the first bad entry named, no traceback."""
    path, key, _, _ = holder
    forged = tmp_path / "ledger.jsonl"
    entries = read_entries(path)
    del entries[3]["payload"]["event"]
    write_entries(forged, resign(entries, key, start=3))
    result = subprocess.run(
        [sys.executable, "-m", "ewtune.cli", "ledger", "verify", str(forged), "--public-key", key.public_key_text],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"ledger {forged}: FAILED at seq 3 (line 4): an event document needs")
    assert len(result.stdout.splitlines()) == 1 and "Traceback" not in result.stdout + result.stderr


def test_a_repair_payload_cannot_rename_its_report_row(holder, tmp_path):
    """A forger with the writer's key adds ``seq`` and ``line`` to a repair's payload: the report lists the repair
    at the entry's own seq and line, with the fields a repair states (the payload was spread over the row before)."""
    path, key, offset, torn = holder
    forged = tmp_path / "ledger.jsonl"
    entries = read_entries(path)
    entries[5]["payload"].update({"seq": 0, "line": 1})
    write_entries(forged, resign(entries, key, start=5))
    report = verify_ledger(forged, key.public_key_text)
    assert report.ok, report.summary()
    [row] = report.repairs
    assert (row["seq"], row["line"], row["offset"], row["torn_bytes"]) == (5, 6, offset, len(torn))
    assert set(row) == {"seq", "line", "offset", "saved_as", "torn_bytes", "torn_sha256"}
