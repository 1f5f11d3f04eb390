"""Every way of tampering with a ledger is detected, and the report names the first bad entry."""

from __future__ import annotations

import hashlib

import pytest
from support.ledgers import BUDGET, ROUND, WRITER, anchor_head_at, ledger, lines_of, pristine, read_entries, resign, write_entries  # noqa: F401 - ledger and pristine are fixtures

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_head import default_head_path, read_head
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def assert_first_bad(path, seq, line, reason, public_keys=None):
    report = verify_ledger(path, public_keys)
    assert not report.ok
    assert (report.first_bad.seq, report.first_bad.line) == (seq, line), report.first_bad
    assert reason in report.first_bad.reason
    assert report.entries_verified == line - 1
    return report


def test_the_untouched_ledger_verifies_and_its_spend_is_recomputed(ledger):
    path, key = ledger
    report = verify_ledger(path, key.public_key_text)  # a fresh state, cold accountants: recomputed from the events
    assert report.ok and report.first_bad is None and report.entries_verified == 6, report.summary()
    assert report.writer == WRITER and report.repairs == [] and report.torn_tail is None
    spend = report.holders[WRITER]
    stated = read_entries(path)[5]["payload"]["epsilon_certified"]
    assert spend.epsilon_certified == stated and list(spend.open_reservations) == [5]
    assert [row["status"] for row in report.reservations] == ["committed", "aborted", "open"]
    assert verify_ledger(path, {WRITER: key.public_key_text}).ok


def test_flipped_byte_in_a_payload_breaks_that_entry_signature(ledger):
    path, _ = ledger
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"run_id":"run-1"', b'"run_id":"run-2"')
    write_lines(path, lines)
    assert_first_bad(path, 3, 4, "signature does not verify")


def test_flipped_byte_that_breaks_json_names_the_entry(ledger):
    path, _ = ledger
    lines = lines_of(path)
    lines[2] = lines[2][:40] + bytes([lines[2][40] ^ 0x01 | 0x80]) + lines[2][41:]
    write_lines(path, lines)
    assert_first_bad(path, 2, 3, "not valid JSON")


def test_flipped_byte_in_a_stated_epsilon_is_caught(ledger):
    path, _ = ledger
    lines = lines_of(path)
    stated = read_entries(path)[2]["payload"]["epsilon_certified"]
    lines[2] = lines[2].replace(repr(stated).encode(), repr(stated * 0.5).encode())
    write_lines(path, lines)
    assert_first_bad(path, 2, 3, "signature does not verify")


def test_dropped_entry_is_named(ledger):
    path, _ = ledger
    lines = lines_of(path)
    del lines[2]
    write_lines(path, lines)
    assert_first_bad(path, 2, 3, "seq 3 where 2 was expected")


def test_dropped_last_entry_verifies_alone_and_fails_against_the_head(ledger):
    """A suffix cut at a line boundary is, on its own, indistinguishable from a ledger written up to there:
    only a head kept outside the file (the head file, or a SEQ:HASH someone recorded) exposes it."""
    path, key = ledger
    head = read_head(default_head_path(path), key.public_key_text).head
    write_lines(path, lines_of(path)[:-1])
    report = verify_ledger(path)
    assert report.ok and report.entries_verified == 5
    for against in ({"head_path": default_head_path(path)}, {"expect_head": head}):
        report = verify_ledger(path, key.public_key_text, **against)
        assert not report.ok and report.first_bad is None
        assert "holds 5 entries but its head anchors seq 5" in report.head_failure


def test_reordered_entries_are_named(ledger):
    path, _ = ledger
    lines = lines_of(path)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(path, lines)
    assert_first_bad(path, 3, 4, "seq 4 where 3 was expected")


def test_renumbered_reorder_breaks_the_chain(ledger):
    path, _ = ledger
    entries = read_entries(path)
    entries[3], entries[4] = entries[4], entries[3]
    entries[3]["seq"], entries[4]["seq"] = 3, 4
    write_entries(path, entries)
    assert_first_bad(path, 3, 4, "prev does not hash")


def test_forged_signature_is_named(ledger):
    path, _ = ledger
    entries = read_entries(path)
    entries[4]["payload"]["reason"] = "forged"
    resign(entries[:5], SigningKey.generate(), start=4)
    write_entries(path, entries)
    assert_first_bad(path, 4, 5, "signature does not verify")


def test_genesis_key_swapped_without_resigning_fails_at_genesis(ledger):
    path, _ = ledger
    entries = read_entries(path)
    entries[0]["payload"]["public_key"] = SigningKey.generate().public_key_text
    write_entries(path, entries)
    assert_first_bad(path, 0, 1, "signature does not verify")


def test_ledger_resigned_with_another_key_fails_only_against_the_pinned_key(ledger):
    path, key = ledger
    forger = SigningKey.generate()
    entries = read_entries(path)
    entries[0]["payload"]["public_key"] = forger.public_key_text
    write_entries(path, resign(entries, forger))
    assert verify_ledger(path).ok  # self-consistent: only a key obtained out of band exposes it
    assert_first_bad(path, 0, 1, "differs from the pinned public key", key.public_key_text)
    assert_first_bad(path, 0, 1, "differs from the pinned", {WRITER: key.public_key_text})
    assert_first_bad(path, 0, 1, "no pinned public key was given for the writer", {"other": key.public_key_text})


def test_wrong_stated_epsilon_signed_by_the_writer_is_caught(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[2]["payload"]["epsilon_certified"] *= 0.9
    write_entries(path, resign(entries, key, start=2))
    assert_first_bad(path, 2, 3, "epsilon_certified stated")


def test_wrong_edgeworth_statement_is_caught(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[1]["payload"]["epsilon_edgeworth"] += 1e-6
    write_entries(path, resign(entries, key, start=1))
    assert_first_bad(path, 1, 2, "epsilon_edgeworth stated")


def test_commit_of_more_steps_than_reserved_is_caught(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[2]["payload"]["event"]["event"]["steps"] = 201
    del entries[2]["payload"]["epsilon_certified"], entries[2]["payload"]["epsilon_edgeworth"]
    write_entries(path, resign(entries, key, start=2))
    assert_first_bad(path, 2, 3, "only 200 were reserved")


def test_double_close_signed_by_the_writer_is_caught(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[4]["payload"]["reservation"] = 1  # abort the already committed reservation
    write_entries(path, resign(entries, key, start=4))
    assert_first_bad(path, 4, 5, "reservation 1 was already closed by entry 2")


def test_reservation_beyond_the_budget_signed_by_the_writer_is_caught(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[0]["payload"]["policy"]["budget_epsilon"] = 0.5
    write_entries(path, resign(entries, key))
    assert_first_bad(path, 1, 2, "beyond its budget 0.5")


def test_unknown_kind_is_reported_as_unknown(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[3]["kind"] = "transfer"
    write_entries(path, resign(entries, key, start=3))
    assert_first_bad(path, 3, 4, "unknown entry kind 'transfer'")


def test_time_going_back_is_caught(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[3]["time"] = "2000-01-01T00:00:00.000000Z"
    write_entries(path, resign(entries, key, start=3))
    assert_first_bad(path, 3, 4, "goes back")


def test_non_canonical_line_is_caught(ledger):
    path, _ = ledger
    lines = lines_of(path)
    lines[1] = lines[1].replace(b'"kind":"reserve"', b'"kind": "reserve"')
    write_lines(path, lines)
    assert_first_bad(path, 1, 2, "not in canonical JSON form")


def test_other_accountant_is_reported_not_mistaken_for_a_mismatch(ledger):
    path, key = ledger
    entries = read_entries(path)
    entries[0]["payload"]["accountant"] = {"name": "some-older-accountant", "version": "0.0"}
    entries[2]["payload"]["epsilon_certified"] = 123.0  # would be a mismatch if it were checked
    write_entries(path, resign(entries, key))
    report = verify_ledger(path, key.public_key_text)
    assert not report.ok and report.first_bad is None
    assert "some-older-accountant" in report.accountant_mismatch and "not checked" in report.accountant_mismatch


def test_truncated_mid_line_is_reported_then_repaired_on_open(ledger):
    path, key = ledger
    anchor_head_at(path, key, 4)  # the crash came while entry 5 was written: its head was never written
    data = path.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1 + 57  # 57 bytes into the last line
    path.write_bytes(data[:cut])
    torn = data[data.rfind(b"\n", 0, len(data) - 1) + 1:cut]

    report = assert_first_bad(path, 5, 6, "torn last line: 57 bytes")
    assert report.torn_tail["bytes"] == 57 and report.torn_tail["sha256"] == hashlib.sha256(torn).hexdigest()

    with Ledger.open(path, key) as ledger_:
        repair = ledger_.repair["payload"]
        ledger_.reserve(WRITER, "run-1", 2, ROUND)  # the lost reservation is made again
    saved = path.with_name(repair["saved_as"])
    assert saved.read_bytes() == torn
    assert repair["torn_bytes"] == 57 and repair["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert path.read_bytes().startswith(data[:cut - 57])  # nothing already written was rewritten

    report = verify_ledger(path, key.public_key_text)
    assert report.ok, report.summary()
    assert [(r["seq"], r["torn_bytes"]) for r in report.repairs] == [(5, 57)]
    assert report.entries_verified == 7
    assert read_head(default_head_path(path), key.public_key_text).head.seq == 6  # the repair and the reserve


def test_forged_repair_offset_is_caught(ledger):
    path, key = ledger
    anchor_head_at(path, key, 4)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    Ledger.open(path, key).close()
    entries = read_entries(path)
    entries[5]["payload"]["offset"] += 1
    write_entries(path, resign(entries, key, start=5))
    assert_first_bad(path, 5, 6, "repair entry states offset")


def test_a_tampered_ledger_cannot_be_opened_for_writing(ledger):
    path, key = ledger
    lines = lines_of(path)
    del lines[1]
    write_lines(path, lines)
    with pytest.raises(InvalidInputError, match="line 2 is bad .*seq 2 where 1"):
        Ledger.open(path, key)


@pytest.mark.parametrize("content", [b"", b"garbage\n", b'{"seq": 0}\n', b"\x00\xff" * 40, b"{no newline"])
def test_a_file_that_is_not_a_ledger_is_an_input_error(tmp_path, content):
    path = tmp_path / "not-a-ledger.jsonl"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="is not a ledger"):
        verify_ledger(path)


def test_a_signed_genesis_with_an_invalid_policy_is_caught(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.jsonl"
    Ledger.create(path, key, WRITER, BUDGET).close()
    entries = read_entries(path)
    entries[0]["payload"]["policy"]["budget_delta"] = 1.5
    write_entries(path, resign(entries, key))
    assert_first_bad(path, 0, 1, "budget delta must be in (0, 1)")


def test_a_ledger_torn_inside_genesis_cannot_be_opened(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.jsonl"
    Ledger.create(path, key, WRITER, BUDGET).close()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InvalidInputError, match="holds no complete genesis entry"):
        Ledger.open(path, key)
    with pytest.raises(InvalidInputError, match="is not a ledger"):
        verify_ledger(path)
