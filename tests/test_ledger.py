"""The ledger writer: keys, canonical JSON, durability, the budget pre-flight, and the reserve/commit/abort rules."""

from __future__ import annotations

import json
import math
import stat
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.ledgers import BUDGET, DIGEST, ROUND, WRITER, build_ledger, read_entries

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_lines import GENESIS_PREV, entry_hash, signed_bytes
from ewtune.accountant.signing import SigningKey, canonical_json, verify_signature
from ewtune.accountant.spend import holder_spends, spend_with


def certified(event, delta=BUDGET["budget_delta"]):
    from ewtune.accountant.certified import certified_epsilon

    return certified_epsilon(event, delta)


@pytest.fixture()
def key() -> SigningKey:
    return SigningKey.generate()


# -- keys and canonical JSON --------------------------------------------------------------------------------


def test_key_round_trip_is_private_and_never_overwritten(tmp_path, key):
    path = tmp_path / "ledger.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SigningKey.load(path)
    assert loaded.public_key_text == key.public_key_text
    assert verify_signature(key.public_key_text, b"data", loaded.sign(b"data"))
    with pytest.raises(InvalidInputError, match="refusing to overwrite"):
        SigningKey.generate().save(path)
    assert SigningKey.load(path).public_key_text == key.public_key_text


def test_bad_key_files_are_refused_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(InvalidInputError, match="not an unencrypted PEM"):
        SigningKey.load(garbage)
    with pytest.raises(InvalidInputError, match="cannot read"):
        SigningKey.load(tmp_path / "missing.pem")


def test_signatures_bind_key_and_data(key):
    signature = key.sign(b"payload")
    assert verify_signature(key.public_key_text, b"payload", signature)
    assert not verify_signature(key.public_key_text, b"payloaD", signature)
    assert not verify_signature(SigningKey.generate().public_key_text, b"payload", signature)
    assert not verify_signature("not base64!", b"payload", signature)
    assert not verify_signature(key.public_key_text, b"payload", "AAAA")


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1.5, "é", None, True]}) == '{"a":[1.5,"é",null,true],"b":1}'.encode()
    for bad in (math.nan, math.inf, {"x": -math.inf}, {1: "int key"}, {"x": object()}):
        with pytest.raises(InvalidInputError):
            canonical_json(bad)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_json_floats_round_trip(value):
    assert json.loads(canonical_json({"v": value}))["v"] == value
    assert canonical_json(json.loads(canonical_json({"v": value}))) == canonical_json({"v": value})


# -- writing --------------------------------------------------------------------------------------------------


def test_entries_are_chained_signed_and_monotone(tmp_path):
    path = tmp_path / "ledger.jsonl"
    key = build_ledger(path)
    entries = read_entries(path)
    assert [entry["seq"] for entry in entries] == list(range(6))
    assert [entry["kind"] for entry in entries] == ["genesis", "reserve", "commit", "reserve", "abort", "reserve"]
    assert entries[0]["prev"] == GENESIS_PREV
    for previous, entry in zip(entries, entries[1:]):
        assert entry["prev"] == entry_hash(previous)
        assert entry["time"] >= previous["time"]
    for entry in entries:
        assert verify_signature(key.public_key_text, signed_bytes(entry), entry["signature"])
    genesis = entries[0]["payload"]
    from ewtune.accountant.verify import verify_ledger

    assert genesis["public_key"] == key.public_key_text
    # The accountant the writer pins reads back, from the file, as the one this release verifies with.
    assert verify_ledger(path).accountant_mismatch is None
    assert genesis["policy"] == BUDGET and genesis["writer"] == WRITER
    assert entries[2]["payload"]["receipt_sha256"] == DIGEST


def test_create_refuses_an_existing_ledger_and_open_refuses_another_key(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    build_ledger(path, key)
    before = path.read_bytes()
    with pytest.raises(InvalidInputError, match="refusing to overwrite"):
        Ledger.create(path, key, WRITER, BUDGET)
    with pytest.raises(InvalidInputError, match="not the writer key"):
        Ledger.open(path, SigningKey.generate())
    assert path.read_bytes() == before


def test_a_second_writer_is_locked_out(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    with Ledger.create(path, key, WRITER, BUDGET):
        with pytest.raises(InvalidInputError, match="open for writing by another"):
            Ledger.open(path, key)
    Ledger.open(path, key).close()  # released on close


def test_threads_sharing_one_ledger_do_not_interleave(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    small = PoissonGaussianEvent(0.001, 2.0, 10)
    with Ledger.create(path, key, WRITER, BUDGET) as ledger:
        def work(run):
            for round_ in range(3):
                ledger.commit(ledger.reserve(WRITER, run, round_, small), small)

        threads = [threading.Thread(target=work, args=(f"run-{index}",)) for index in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    entries = read_entries(path)
    assert [entry["seq"] for entry in entries] == list(range(19))
    assert all(entry["prev"] == entry_hash(previous) for previous, entry in zip(entries, entries[1:]))
    assert holder_spends(entries)[WRITER].committed_events == (small,) * 9


def test_reopened_ledger_continues_the_chain(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    build_ledger(path, key)
    with Ledger.open(path, key) as ledger:
        assert ledger.repair is None
        open_seq = next(iter(ledger.open_reservations(WRITER)))
        assert open_seq == 5
        ledger.commit(open_seq, ROUND)
    entries = read_entries(path)
    assert entries[-1]["seq"] == 6 and entries[-1]["prev"] == entry_hash(entries[-2])


# -- budget pre-flight and the reservation rules ---------------------------------------------------------------


def test_preflight_refuses_a_reservation_beyond_the_budget_and_writes_nothing(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    big = PoissonGaussianEvent(0.05, 0.8, 2000)
    assert certified(big) > BUDGET["budget_epsilon"]
    with Ledger.create(path, key, WRITER, BUDGET) as ledger:
        before = path.read_bytes()
        with pytest.raises(InvalidInputError, match="reservation refused.*budget 3"):
            ledger.reserve(WRITER, "run", 0, big)
        assert path.read_bytes() == before and ledger.open_reservations() == {}


def test_open_reservations_count_as_spent_composed_not_summed(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    single = certified(ROUND)
    with Ledger.create(path, key, WRITER, BUDGET) as ledger:
        ledger.reserve(WRITER, "run", 0, ROUND)
        ledger.reserve(WRITER, "run", 1, ROUND)
        spend = ledger.spend(WRITER)
    both = certified(compose(ROUND, ROUND))
    assert spend.epsilon_certified == pytest.approx(both, rel=1e-12)
    assert single < both < 2 * single  # composition is tighter than summing epsilons
    assert spend.open_reservations.keys() == {1, 2}
    assert spend.budget_left_epsilon == pytest.approx(BUDGET["budget_epsilon"] - both)
    entries = read_entries(path)
    assert entries[2]["payload"]["epsilon_certified"] == spend.epsilon_certified
    assert holder_spends(entries)[WRITER].epsilon_certified == spend.epsilon_certified


def test_reservation_refused_when_only_the_open_ones_make_it_exceed(tmp_path, key):
    half = PoissonGaussianEvent(0.02, 0.9, 400)
    budget = {"budget_epsilon": (certified(half) + certified(compose(half, half))) / 2, "budget_delta": 1e-5}
    with Ledger.create(tmp_path / "ledger.jsonl", key, WRITER, budget) as ledger:
        ledger.reserve(WRITER, "run", 0, half)
        with pytest.raises(InvalidInputError, match="reservation refused"):
            ledger.reserve(WRITER, "run", 1, half)
        assert spend_with(ledger.entries, WRITER, half).epsilon_certified > budget["budget_epsilon"]
        assert ledger.spend_with(WRITER, half) == spend_with(ledger.entries, WRITER, half)


def test_early_stop_commit_spends_only_the_steps_run(tmp_path, key):
    with Ledger.create(tmp_path / "ledger.jsonl", key, WRITER, BUDGET) as ledger:
        seq = ledger.reserve(WRITER, "run", 0, ROUND)
        stopped = PoissonGaussianEvent(0.01, 1.0, 37)
        ledger.commit(seq, stopped)
        spend = ledger.spend(WRITER)
        assert spend.epsilon_certified == pytest.approx(certified(stopped), rel=1e-12)
        assert spend.epsilon_certified < certified(ROUND)
        assert spend.open_reservations == {} and spend.committed_events == (stopped,)
        assert ledger.entries[-1]["payload"]["epsilon_certified"] == spend.epsilon_certified


@pytest.mark.parametrize(
    "executed, reason",
    [
        (PoissonGaussianEvent(0.01, 1.0, 201), "201 steps .* only 200 were reserved"),
        (PoissonGaussianEvent(0.01, 0.9, 100), "only 0 were reserved"),  # a smaller sigma was never reserved
        (compose(PoissonGaussianEvent(0.01, 1.0, 150), PoissonGaussianEvent(0.01, 1.0, 51)), "201 steps"),
    ],
)
def test_commit_never_records_more_than_reserved(tmp_path, key, executed, reason):
    with Ledger.create(tmp_path / "ledger.jsonl", key, WRITER, BUDGET) as ledger:
        seq = ledger.reserve(WRITER, "run", 0, ROUND)
        with pytest.raises(InvalidInputError, match=reason):
            ledger.commit(seq, executed)
        assert len(ledger.entries) == 2 and ledger.open_reservations().keys() == {seq}


def test_a_reservation_closes_once(tmp_path, key):
    with Ledger.create(tmp_path / "ledger.jsonl", key, WRITER, BUDGET) as ledger:
        committed = ledger.reserve(WRITER, "run", 0, ROUND)
        ledger.commit(committed, ROUND)
        with pytest.raises(InvalidInputError, match="already closed by entry 2"):
            ledger.commit(committed, ROUND)
        with pytest.raises(InvalidInputError, match="already closed"):
            ledger.abort(committed, "late")
        aborted = ledger.reserve(WRITER, "run", 1, ROUND)
        ledger.abort(aborted, "timeout")
        with pytest.raises(InvalidInputError, match="already closed by entry 4"):
            ledger.commit(aborted, ROUND)
        with pytest.raises(InvalidInputError, match="not a reservation"):
            ledger.commit(0, ROUND)  # genesis
        assert ledger.spend(WRITER).epsilon_certified == pytest.approx(certified(ROUND), rel=1e-12)


def test_abort_releases_the_reservation(tmp_path, key):
    with Ledger.create(tmp_path / "ledger.jsonl", key, WRITER, BUDGET) as ledger:
        seq = ledger.reserve(WRITER, "run", 0, ROUND)
        ledger.abort(seq, "receipt did not verify")
        assert ledger.spend(WRITER).epsilon_certified == 0.0
        assert ledger.entries[-1]["payload"] == {"reservation": seq, "reason": "receipt did not verify"}


def test_coordinator_ledger_accounts_each_registered_holder_against_its_own_budget(tmp_path, key):
    bank, clinic = SigningKey.generate(), SigningKey.generate()
    with Ledger.create(tmp_path / "coordinator.jsonl", key, "coordinator", BUDGET) as ledger:
        ledger.register_holder("bank", bank.public_key_text, 1.0, 1e-6)
        ledger.register_holder("clinic", clinic.public_key_text, 8.0, 1e-5)
        with pytest.raises(InvalidInputError, match="already registered"):
            ledger.register_holder("bank", bank.public_key_text, 2.0, 1e-6)
        with pytest.raises(InvalidInputError, match="unregistered holder"):
            ledger.reserve("bakery", "run", 0, ROUND)
        with pytest.raises(InvalidInputError, match="holder 'bank' .* budget 1 "):
            ledger.reserve("bank", "run", 0, ROUND)
        ledger.reserve("clinic", "run", 0, ROUND)
        spends = holder_spends(ledger.entries)
    assert spends["clinic"].epsilon_certified == pytest.approx(certified(ROUND, 1e-5), rel=1e-12)
    assert spends["bank"].epsilon_certified == 0.0 and spends["bank"].budget_delta == 1e-6


@pytest.mark.parametrize(
    "call, reason",
    [
        (lambda ledger: ledger.reserve(WRITER, "run", -1, ROUND), "round must be"),
        (lambda ledger: ledger.reserve(WRITER, "", 0, ROUND), "run_id must be"),
        (lambda ledger: ledger.reserve(WRITER, "run", 0, {"steps": 3}), "expected a DP event"),
        (lambda ledger: ledger.register_holder("x", "bad key", 1.0, 1e-5), "not valid base64"),
        (lambda ledger: ledger.register_holder("x", SigningKey.generate().public_key_text, 1.0, 2.0), "delta"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, key, call, reason):
    path = tmp_path / "ledger.jsonl"
    with Ledger.create(path, key, WRITER, BUDGET) as ledger:
        before = path.read_bytes()
        with pytest.raises(InvalidInputError, match=reason):
            call(ledger)
        assert path.read_bytes() == before
