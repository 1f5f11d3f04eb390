"""``ewtune ledger verify|show``: exit codes, one-line errors, the pinned key, the head, and what is shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support.ledgers import BUDGET, ROUND, WRITER, build_ledger, read_entries

from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_lines import entry_hash
from ewtune.accountant.signing import SigningKey
from ewtune.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    path = directory / "ledger.jsonl"
    return path, build_ledger(path)


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_ok_exits_0(built, capsys):
    path, _ = built
    code, out, err = run(capsys, "ledger", "verify", str(path))
    assert code == 0 and err == ""
    assert out.startswith(f"ledger {path}: OK: 6 entries by '{WRITER}'")


def test_verify_with_the_pinned_key_inline_or_in_a_file(built, capsys, tmp_path):
    path, key = built
    assert run(capsys, "ledger", "verify", str(path), "--public-key", key.public_key_text)[0] == 0
    text_file = tmp_path / "writer.pub"
    text_file.write_text(key.public_key_text + "\n")
    assert run(capsys, "ledger", "verify", str(path), "--public-key", str(text_file))[0] == 0
    private_pem = tmp_path / "writer.pem"
    key.save(private_pem)
    assert run(capsys, "ledger", "verify", str(path), "--public-key", str(private_pem))[0] == 0
    public_pem = tmp_path / "writer-public.pem"
    public_pem.write_bytes(
        SigningKey.load(private_pem)._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert run(capsys, "ledger", "verify", str(path), "--public-key", str(public_pem))[0] == 0


def test_verify_against_another_pinned_key_exits_1_naming_genesis(built, capsys):
    path, _ = built
    code, out, _ = run(capsys, "ledger", "verify", str(path), "--public-key", SigningKey.generate().public_key_text)
    assert code == 1
    assert out.splitlines()[0] == (
        f"ledger {path}: FAILED at seq 0 (line 1): the genesis public key differs from the pinned public key"
    )


def test_verify_tampered_exits_1_with_one_line_naming_the_entry(built, capsys, tmp_path):
    path = tmp_path / "tampered.jsonl"
    lines = built[0].read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b"holder went offline", b"holder went offlinE")
    path.write_bytes(b"\n".join(lines))
    code, out, err = run(capsys, "ledger", "verify", str(path))
    assert code == 1 and err == ""
    assert out == f"ledger {path}: FAILED at seq 4 (line 5): the signature does not verify with the writer's public key\n"


def test_verify_json_report(built, capsys):
    path, key = built
    code, out, _ = run(capsys, "ledger", "verify", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["public_key"] == key.public_key_text
    holder = report["holders"][WRITER]
    assert holder["epsilon_certified"] == read_entries(path)[5]["payload"]["epsilon_certified"]
    assert holder["mechanisms"] == [
        {"sampling_rate": 0.01, "noise_multiplier": 1.0, "neighbouring": "add_remove", "steps": 350}
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not json\n", "is not a ledger: line 1: the line is not valid JSON"),
        (b"", "is not a ledger: it holds no complete line"),
        (None, "cannot read ledger"),
    ],
)
def test_malformed_or_unreadable_ledger_exits_2_with_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    for command in ("verify", "show"):
        code, out, err = run(capsys, "ledger", command, str(path))
        assert code == 2 and out == ""
        assert err.startswith("ewtune: error: ") and message in err and err.count("\n") == 1


def test_bad_public_key_argument_exits_2(built, capsys):
    code, _, err = run(capsys, "ledger", "verify", str(built[0]), "--public-key", "c2hvcnQ=")
    assert code == 2 and "32 bytes" in err and err.count("\n") == 1


def test_a_public_key_file_that_is_not_there_is_reported_as_a_missing_file(built, tmp_path, capsys):
    missing = tmp_path / "keys" / "ledger.pub"  # before: "the public key is not valid base64"
    code, _, err = run(capsys, "ledger", "verify", str(built[0]), "--public-key", str(missing))
    assert code == 2 and f"public key {missing}: no such file" in err and err.count("\n") == 1
    code, _, err = run(capsys, "ledger", "verify", str(built[0]), "--public-key", str(tmp_path))
    assert code == 2 and f"public key {tmp_path} is not a regular file" in err


def test_show_labels_the_guarantee_and_the_estimate(built, capsys):
    path, _ = built
    code, out, _ = run(capsys, "ledger", "show", str(path))
    spend = json.loads(run(capsys, "ledger", "show", str(path), "--json")[1])["holders"][WRITER]
    assert code == 0
    assert f"certified epsilon (the guarantee)     {spend['epsilon_certified']:.6f}" in out
    assert f"Edgeworth estimate (not a guarantee)  {spend['epsilon_edgeworth_estimate']:.6f}" in out
    assert f"budget left                           epsilon {spend['budget_left_epsilon']:.6f}" in out
    assert "open reservations (counted as spent)  5" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "3 ", "5 "))]
    assert rows == [
        ["1", "run-1", "0", "committed", "0.01", "1", "150", "200"],
        ["3", "run-1", "1", "aborted", "0.01", "1", "-", "200"],
        ["5", "run-1", "2", "open", "0.01", "1", "-", "200"],
    ]


def test_a_fresh_process_recomputes_the_stated_epsilons_exactly(built):
    path, key = built
    result = subprocess.run(
        [sys.executable, "-m", "ewtune.cli", "ledger", "verify", str(path), "--public-key", key.public_key_text],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 6 entries" in result.stdout


def test_the_installed_command_prints_no_traceback_and_starts_light(built, tmp_path):
    """The real entry point on a malformed ledger: exit 2, one line on stderr; and the ledger modules do not
    import torch, transformers or flwr."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x00garbage")
    result = subprocess.run(
        [sys.executable, "-m", "ewtune.cli", "ledger", "verify", str(bad)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("ewtune: error:") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    probe = (
        "import sys, ewtune.ledger_cli, ewtune.accountant.verify, ewtune.accountant.ledger, ewtune.accountant.spend, ewtune.accountant.crosscheck; "
        "print(sorted(m for m in ('torch', 'transformers', 'flwr') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert imported.stdout.strip() == "[]", imported.stderr


def test_show_a_coordinator_ledger_lists_each_registered_holder(capsys, tmp_path):
    from ewtune.accountant.events import PoissonGaussianEvent
    from ewtune.accountant.ledger import Ledger

    path = tmp_path / "coordinator.jsonl"
    with Ledger.create(path, SigningKey.generate(), "coordinator", {"budget_epsilon": 8.0, "budget_delta": 1e-5}) as ledger:
        for holder, budget, steps in (("bank", 2.0, 100), ("clinic", 5.0, 300)):
            ledger.register_holder(holder, SigningKey.generate().public_key_text, budget, 1e-5)
            ledger.reserve(holder, "run-7", 0, PoissonGaussianEvent(0.02, 1.1, steps))
    code, out, _ = run(capsys, "ledger", "show", str(path))
    assert code == 0
    assert "holder coordinator" not in out
    assert "holder bank" in out and "epsilon 2 at delta 1e-05" in out
    assert "holder clinic" in out and "epsilon 5 at delta 1e-05" in out
    assert out.count("run-7") == 2
    clinic = json.loads(run(capsys, "ledger", "show", str(path), "--json")[1])["holders"]["clinic"]
    assert f"(max over holders, certified): {clinic['epsilon_certified']:.6f} (clinic)" in out


# -- which key, which head, and figures only from a ledger that verified -------------------------------------------


def test_verify_says_whether_the_key_was_pinned(built, capsys):
    path, key = built
    code, out, _ = run(capsys, "ledger", "verify", str(path))
    assert code == 0 and out.rstrip().endswith(
        f"(signatures checked against the ledger's own genesis key {key.public_key_text}, "
        "not pinned: pass --public-key to pin it)"
    )
    report = json.loads(run(capsys, "ledger", "verify", str(path), "--json")[1])
    assert report["public_key_pinned"] is False and "not pinned" in report["key_note"]
    code, out, _ = run(capsys, "ledger", "verify", str(path), "--public-key", key.public_key_text)
    assert code == 0 and f"(signatures checked against the pinned key {key.public_key_text})" in out
    assert "not pinned" not in out
    report = json.loads(run(capsys, "ledger", "verify", str(path), "--public-key", key.public_key_text, "--json")[1])
    assert report["public_key_pinned"] is True


def test_verify_checks_the_head_file_next_to_the_ledger_by_default(built, capsys):
    path, _ = built
    code, out, _ = run(capsys, "ledger", "verify", str(path))
    assert code == 0 and f"head seq 5 (head file {path}.head) matched" in out


def _rolled_back(built, tmp_path):
    """A copy of the built ledger cut at a line boundary (its open reservation dropped), with no head beside it."""
    path = tmp_path / "rolled-back.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in built[0].read_bytes().split(b"\n")[:-2]))
    return path


def test_expect_head_passes_on_the_right_head_and_fails_on_a_rolled_back_file(built, capsys, tmp_path):
    path, _ = built
    head = f"5:{entry_hash(read_entries(path)[5])}"
    code, out, _ = run(capsys, "ledger", "verify", str(path), "--expect-head", head)
    assert code == 0 and "head seq 5 (expected) matched" in out
    earlier = f"2:{entry_hash(read_entries(path)[2])}"  # an older head: the ledger has grown since, fine
    assert run(capsys, "ledger", "verify", str(path), "--expect-head", earlier)[0] == 0

    rolled_back = _rolled_back(built, tmp_path)
    assert run(capsys, "ledger", "verify", str(rolled_back))[0] == 0  # nothing to compare with: it looks fine
    code, out, _ = run(capsys, "ledger", "verify", str(rolled_back), "--expect-head", head)
    assert code == 1
    assert out.startswith(f"ledger {rolled_back}: FAILED against its head: it holds 5 entries but its head "
                          "anchors seq 5: the ledger was rolled back or truncated")
    report = json.loads(run(capsys, "ledger", "verify", str(rolled_back), "--expect-head", head, "--json")[1])
    assert report["ok"] is False and "rolled back" in report["head_failure"]


def test_verify_against_a_head_file_kept_elsewhere_fails_on_a_rolled_back_file(built, capsys, tmp_path):
    rolled_back = _rolled_back(built, tmp_path)
    code, out, _ = run(capsys, "ledger", "verify", str(rolled_back), "--head", f"{built[0]}.head")
    assert code == 1 and "FAILED against its head" in out and "rolled back or truncated" in out


@pytest.mark.parametrize("argument", [["--expect-head", "5"], ["--expect-head", "five:" + "0" * 64],
                                      ["--head", "/nonexistent/ledger.head"]])
def test_a_bad_head_argument_exits_2_with_one_line(built, capsys, argument):
    code, out, err = run(capsys, "ledger", "verify", str(built[0]), *argument)
    assert code == 2 and out == "" and err.startswith("ewtune: error: ") and err.count("\n") == 1


def test_show_withholds_the_figures_of_a_tampered_ledger(built, capsys, tmp_path):
    path = tmp_path / "tampered.jsonl"
    entries = read_entries(built[0])
    stated = entries[2]["payload"]["epsilon_certified"]
    path.write_bytes(built[0].read_bytes().replace(repr(stated).encode(), repr(stated / 2).encode()))
    code, out, _ = run(capsys, "ledger", "show", str(path))
    assert code == 1
    assert out.splitlines() == [
        f"ledger {path}: FAILED at seq 2 (line 3): the signature does not verify with the writer's public key",
        "INVALID LEDGER, figures withheld",
    ]
    code, out, _ = run(capsys, "ledger", "show", str(path), "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["figures_withheld"] is True
    assert "holders" not in report and "reservations" not in report


def test_show_withholds_the_figures_of_a_rolled_back_ledger(built, capsys, tmp_path):
    rolled_back = _rolled_back(built, tmp_path)
    assert run(capsys, "ledger", "show", str(rolled_back))[0] == 0  # alone, it is a valid shorter ledger
    code, out, _ = run(capsys, "ledger", "show", str(rolled_back), "--head", f"{built[0]}.head")
    assert code == 1 and "rolled back or truncated" in out and "INVALID LEDGER, figures withheld" in out
    assert "certified epsilon" not in out and "budget left" not in out


def test_verify_of_a_coordinator_ledger_counts_only_the_holders_not_the_coordinator(tmp_path, capsys):
    path, key = tmp_path / "coordinator.jsonl", SigningKey.generate()
    with Ledger.create(path, key, "coordinator", BUDGET) as ledger:
        for holder in ("bank", "clinic"):
            ledger.register_holder(holder, SigningKey.generate().public_key_text, 8.0, 1e-5)
        ledger.commit(ledger.reserve("clinic", "run", 0, ROUND), ROUND)
    code, out, _ = run(capsys, "ledger", "verify", str(path))
    assert code == 0 and "rules and 2 holder spend(s) verified" in out  # before: 3, the coordinator counted
    code, out, _ = run(capsys, "ledger", "show", str(path))
    assert code == 0 and "holder bank" in out and "holder clinic" in out and "holder coordinator" not in out
    assert "(max over holders, certified)" in out and "(clinic)" in out
