"""The head anchor: a ledger cut at a line boundary, restored from an older copy, or given a forged head is
refused; a lost final newline or a crash before the head update loses nothing; files are private (0600)."""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest
from support.ledgers import BUDGET, ROUND, WRITER, anchor_head_at, build_ledger, read_entries
from support.ledgers import ledger, lines_of, pristine  # noqa: F401 - fixtures shared with the tamper tests

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_head import Head, default_head_path, head_document, read_head, write_head
from ewtune.accountant.ledger_lines import entry_hash
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.cli import main


def head_of(path, key):
    return read_head(default_head_path(path), key.public_key_text).head


def torn_files(path):
    return sorted(p.name for p in path.parent.iterdir() if ".torn-" in p.name)


# -- rollback and truncation -----------------------------------------------------------------------------------


def test_a_ledger_cut_at_a_line_boundary_is_refused_and_fails_verification_against_its_head(ledger, capsys):
    path, key = ledger
    spent = Ledger.open(path, key)
    before_cut = spent.spend(WRITER).epsilon_certified
    spent.close()
    path.write_bytes(b"".join(line + b"\n" for line in lines_of(path)[:-1]))  # drop the open reservation
    cut = path.read_bytes()
    assert verify_ledger(path).ok  # the file alone is a valid, shorter ledger: only the head exposes it

    with pytest.raises(InvalidInputError, match="holds 5 entries but its head anchors seq 5: the ledger was rolled back"):
        Ledger.open(path, key)
    assert path.read_bytes() == cut and torn_files(path) == []  # a refused open writes nothing

    report = verify_ledger(path, head_path=default_head_path(path))
    assert not report.ok and "rolled back or truncated" in report.head_failure
    code = main(["ledger", "verify", str(path), "--head", str(default_head_path(path))])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED against its head" in out and "rolled back or truncated" in out
    assert before_cut > verify_ledger(path).holders[WRITER].epsilon_certified  # what the cut would have hidden


def test_a_mid_line_cut_of_an_anchored_entry_is_refused_not_repaired(ledger):
    """The head anchors entry 5, so its line was complete on disk: a tail torn out of it is damage, not a
    crash mid-write, and must not be cut off and forgotten."""
    path, key = ledger
    path.write_bytes(path.read_bytes()[:-10])
    damaged = path.read_bytes()
    with pytest.raises(InvalidInputError, match="holds 5 entries but its head anchors seq 5"):
        Ledger.open(path, key)
    assert path.read_bytes() == damaged and torn_files(path) == []


def test_an_older_copy_restored_is_refused(ledger, tmp_path):
    path, key = ledger
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(path, backup / path.name)
    shutil.copy(default_head_path(path), default_head_path(backup / path.name))
    with Ledger.open(path, key) as writer:
        writer.commit(5, ROUND)  # spent after the backup was taken

    shutil.copy(backup / path.name, path)  # restore the older ledger file only: the head is newer
    with pytest.raises(InvalidInputError, match="holds 6 entries but its head anchors seq 6"):
        Ledger.open(path, key)

    # a different copy of the same length: the backup, continued on its own (abort where the real one committed)
    with Ledger.open(backup / path.name, key) as other:
        other.abort(5, "diverged")
    shutil.copy(backup / path.name, path)
    with pytest.raises(InvalidInputError, match="entry 6 has hash .* the ledger is an older or a different copy"):
        Ledger.open(path, key)


def test_deleting_the_ledger_does_not_hand_out_a_fresh_budget(ledger):
    path, key = ledger
    path.unlink()
    with pytest.raises(InvalidInputError, match="the head file .* exists, so a ledger was written there before"):
        Ledger.create(path, key, WRITER, BUDGET)
    assert not path.exists()


# -- the head file itself --------------------------------------------------------------------------------------


def test_a_missing_head_is_refused_naming_the_anchor_command_which_then_accepts_the_ledger(ledger, capsys):
    path, key = ledger
    head = default_head_path(path)
    head.unlink()
    with pytest.raises(InvalidInputError, match=r"head file .* is missing.*`ewtune ledger anchor "):
        Ledger.open(path, key)
    assert not head.exists()

    key_file = path.parent / "writer.pem"
    key.save(key_file)
    assert main(["ledger", "anchor", str(path), "--key", str(key_file)]) == 0
    assert "now the truth" in capsys.readouterr().out
    anchored = head.read_bytes()
    assert head_of(path, key) == Head(5, entry_hash(read_entries(path)[5]))
    with Ledger.open(path, key) as reopened:
        assert reopened.head.seq == 5

    assert main(["ledger", "anchor", str(path), "--key", str(key_file)]) == 2  # never overwrites a head
    err = capsys.readouterr().err
    assert "never overwritten" in err and err.count("\n") == 1 and "Traceback" not in err
    assert head.read_bytes() == anchored


@pytest.mark.parametrize("forgery", ["other key", "edited seq", "garbage"])
def test_a_forged_head_is_refused(ledger, forgery):
    path, key = ledger
    entries = read_entries(path)
    head = default_head_path(path)
    if forgery == "other key":  # a head for the cut ledger, signed by someone else
        forged = head_document(path.name, WRITER, Head(4, entry_hash(entries[4])), SigningKey.generate())
        write_head(head, forged)
        reason = "not signed by the ledger's writer key"
    elif forgery == "edited seq":  # the real head, moved back without re-signing
        document = head_document(path.name, WRITER, Head(5, entry_hash(entries[5])), key)
        write_head(head, {**document, "seq": 4, "hash": entry_hash(entries[4])})
        reason = "not signed by the ledger's writer key"
    else:
        head.write_bytes(b"{not json")
        reason = "is not valid JSON"
    with pytest.raises(InvalidInputError, match=reason):
        Ledger.open(path, key)
    assert not verify_ledger(path, head_path=head).ok


def test_a_head_of_another_ledger_is_refused(ledger):
    path, key = ledger
    other = path.parent / "other.jsonl"
    Ledger.create(other, key, WRITER, BUDGET).close()
    shutil.copy(default_head_path(other), default_head_path(path))
    with pytest.raises(InvalidInputError, match="anchors the ledger 'other.jsonl'"):
        Ledger.open(path, key)


def test_the_head_can_live_elsewhere_and_auditors_can_read_it(tmp_path):
    key = SigningKey.generate()
    path, anchors = tmp_path / "ledger.jsonl", tmp_path / "anchors"
    anchors.mkdir()
    head_path = anchors / "hospital-a.head"
    with Ledger.create(path, key, WRITER, BUDGET, head_path=head_path) as ledger:
        ledger.reserve(WRITER, "run", 0, ROUND)
        assert ledger.head_path == head_path and ledger.head == Head(1, entry_hash(ledger.entries[-1]))
        kept = ledger.head
    assert not default_head_path(path).exists()
    record = read_head(head_path, key.public_key_text)
    assert record.head == kept and record.ledger == "ledger.jsonl" and record.writer == WRITER
    with pytest.raises(InvalidInputError, match="not signed by the ledger's writer key"):
        read_head(head_path, SigningKey.generate().public_key_text)
    with pytest.raises(InvalidInputError, match="head file .* is missing"):
        Ledger.open(path, key)  # the default place holds no head
    Ledger.open(path, key, head_path=head_path).close()
    assert verify_ledger(path, key.public_key_text, head_path=head_path).ok
    assert verify_ledger(path, expect_head=str(kept)).ok


@pytest.mark.parametrize("text", ["5", "x:" + "a" * 64, "-1:" + "a" * 64, "5:" + "A" * 64, "5:abc"])
def test_a_malformed_head_text_is_an_input_error(text):
    with pytest.raises(InvalidInputError, match="a head is SEQ:HASH"):
        Head.parse(text)


# -- crashes lose nothing ----------------------------------------------------------------------------------------


def test_losing_only_the_final_newline_keeps_the_complete_entry(ledger):
    path, key = ledger
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    report = verify_ledger(path)
    assert report.first_bad.seq == 5 and report.torn_tail["complete_entry"] is True
    with Ledger.open(path, key) as reopened:
        assert reopened.repair is None and reopened.completed_tail["seq"] == 5
        assert list(reopened.open_reservations(WRITER)) == [5]  # the open reservation is still counted
    assert path.read_bytes() == whole and torn_files(path) == []
    assert verify_ledger(path, key.public_key_text, head_path=default_head_path(path)).ok


def test_a_complete_last_entry_ahead_of_the_head_is_completed_and_the_head_advanced(ledger):
    """A crash after the line was written but before its newline reached the disk and before the head update."""
    path, key = ledger
    anchor_head_at(path, key, 4)
    whole = path.read_bytes()
    path.write_bytes(whole[:-1])
    with Ledger.open(path, key) as reopened:
        assert reopened.completed_tail["seq"] == 5
    assert path.read_bytes() == whole and head_of(path, key).seq == 5


def test_a_crash_between_the_fsynced_append_and_the_head_update_is_accepted(ledger, monkeypatch):
    path, key = ledger
    import ewtune.accountant.ledger as ledger_module

    def failing_write_head(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    with Ledger.open(path, key) as writer:
        monkeypatch.setattr(ledger_module, "write_head", failing_write_head)
        with pytest.raises(EwtuneError, match="entry 6 is written to ledger .* could not be updated"):
            writer.commit(5, ROUND)
        with pytest.raises(EwtuneError, match="unusable"):
            writer.abort(3, "late")
        monkeypatch.undo()
    assert head_of(path, key).seq == 5 and len(read_entries(path)) == 7  # the ledger is one entry ahead

    with Ledger.open(path, key) as reopened:
        assert reopened.head == Head(6, entry_hash(read_entries(path)[6]))
        assert reopened.open_reservations() == {}  # the commit is kept
    assert head_of(path, key) == Head(6, entry_hash(read_entries(path)[6]))


# -- permissions ---------------------------------------------------------------------------------------------------


def test_ledger_head_and_torn_files_are_created_private(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "ledger.jsonl"
    previous = os.umask(0)  # even a permissive umask does not widen them
    try:
        build_ledger(path, key)
        anchor_head_at(path, key, 4)
        path.write_bytes(path.read_bytes()[:-10])  # a crash mid-write of entry 5
        with Ledger.open(path, key) as reopened:
            saved = path.with_name(reopened.repair["payload"]["saved_as"])
    finally:
        os.umask(previous)
    for made in (path, default_head_path(path), saved):
        assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
