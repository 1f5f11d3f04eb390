"""``ewtune ledger report``: the auditor's HTML page and PNG plots, built from verified ledgers only."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import struct

import pytest
from browser import chromium_page, loaded_images

from ewtune.report.audit_report import build_report
from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.events import ComposedEvent, PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey
from ewtune.cli import main

RUN = "run-1"
BUDGET = {"budget_epsilon": 8.0, "budget_delta": 1e-5}
EVENTS = (PoissonGaussianEvent(0.02, 1.0, 60), PoissonGaussianEvent(0.02, 1.0, 40), PoissonGaussianEvent(0.02, 1.3, 50))
HOLDERS = ("bank", "clinic")


def receipt(holder: str, round_: int) -> str:
    return format(hash((holder, round_)) & (2**256 - 1), "064x")


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    """A coordinator's ledger and two holders' own (each public key in NAME.pub beside them), each holder
    committing three rounds (the third with another sigma), and a demo result with the global model's accuracy
    by round."""
    directory = tmp_path_factory.mktemp("report")
    coordinator_path = directory / "coordinator.jsonl"
    paths = [coordinator_path]
    coordinator_key = SigningKey.generate()
    (directory / "coordinator.pub").write_text(coordinator_key.public_key_text)
    with Ledger.create(coordinator_path, coordinator_key, "coordinator", BUDGET) as coordinator:
        for holder in HOLDERS:
            key = SigningKey.generate()
            coordinator.register_holder(holder, key.public_key_text, 8.0, 1e-5)
            paths.append(directory / f"{holder}.jsonl")
            (directory / f"{holder}.pub").write_text(key.public_key_text)
            with Ledger.create(paths[-1], key, holder, BUDGET) as own:
                for round_, event in enumerate(EVENTS):
                    own.commit(own.reserve(holder, RUN, round_, event), event, extra={"receipt_sha256": receipt(holder, round_)})
                    seq = coordinator.reserve(holder, RUN, round_, event)
                    coordinator.commit(seq, event, extra={"receipt_sha256": receipt(holder, round_)})
    accuracy = directory / "demo.json"
    accuracy.write_text(json.dumps({"accuracy_by_round": [
        {"round": r, "accuracy": a, "macro_f1": a, "majority_baseline": 0.55, "num_examples": 100}
        for r, a in enumerate((0.5, 0.7, 0.74, 0.76))]}))  # fmt: skip
    return paths, accuracy


@pytest.fixture(scope="module")
def written(ledgers, tmp_path_factory):
    """``ewtune ledger report`` of all three ledgers with the accuracy, the coordinator's key pinned: (exit code,
    stdout, output directory)."""
    paths, accuracy = ledgers
    out_dir = tmp_path_factory.mktemp("written")
    pinned = str(paths[0].with_name("coordinator.pub"))
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = main(["ledger", "report", *map(str, paths), "--out", str(out_dir), "--accuracy", str(accuracy),
                     "--public-key", pinned])
    return code, stdout.getvalue(), out_dir


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_curves_compose_the_committed_events_round_by_round(ledgers):
    paths, _ = ledgers
    report = build_report(paths[1:2])
    (curve,) = report.curves
    assert curve.holder_id == "bank" and curve.labels == [f"{RUN}:{r}" for r in range(3)]
    for count, value in enumerate(curve.epsilons["certified"], start=1):
        assert value == pytest.approx(certified_epsilon(ComposedEvent(EVENTS[:count]), 1e-5), rel=1e-12)
    assert curve.epsilons["certified"] == sorted(curve.epsilons["certified"])  # spend only grows
    assert curve.epsilons["rdp"][-1] > curve.epsilons["certified"][-1]  # RDP is the looser bound
    assert curve.epsilon_certified == curve.epsilons["certified"][-1]
    assert curve.budget_left_epsilon == pytest.approx(8.0 - curve.epsilon_certified)


def test_the_report_page_embeds_every_plot_and_names_the_verification(written):
    code, out, tmp_path = written
    assert code == 0, out
    assert "receipts: 6 coordinator commit(s) matched, OK" in out
    page = (tmp_path / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    # each holder twice: in the coordinator's ledger and in its own
    assert pngs == ["accuracy.png", "budget.png", "epsilon-1-bank.png", "epsilon-2-clinic.png", "epsilon-3-bank.png",
                    "epsilon-4-clinic.png"]
    assert len(uris) == len(pngs)
    assert sorted(png_size(base64.b64decode(uri)) for uri in uris) == [(900, 400)] * 6
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere: readable offline
    assert page.count("<span class=ok>verified</span>") == 1 + 3  # overall, three ledgers (all pinned)
    assert page.count("<span class=ok>matched</span>") == 1  # receipts
    assert "overall: verified" in out
    for holder in HOLDERS:
        assert f"{RUN}" in page and f"<td>{holder}</td>" in page


def test_a_ledger_that_fails_is_reported_and_its_figures_withheld(ledgers, tmp_path, capsys):
    paths, _ = ledgers
    broken = tmp_path / "bank.jsonl"
    lines = paths[1].read_bytes().split(b"\n")
    broken.write_bytes(b"\n".join(lines[:2] + [lines[2].replace(b'"steps":60', b'"steps":6')] + lines[3:]))
    code = main(["ledger", "report", str(broken), str(paths[2]), "--out", str(tmp_path / "out"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and not result["ok"]
    assert [h["holder"] for h in result["holders"]] == ["clinic"]
    assert list(result["entries"]) == [str(paths[2])]
    assert "FAILED" in (tmp_path / "out" / "report.html").read_text()


def test_bad_accuracy_input_is_a_one_line_error(ledgers, tmp_path, capsys):
    paths, _ = ledgers
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["ledger", "report", str(paths[1]), "--out", str(tmp_path), "--accuracy", str(bad)]) == 2
    assert "holds a JSON list, not an object with accuracy_by_round (ewtune demo --json)" in capsys.readouterr().err


def test_every_plot_loads_in_chromium_offline(written, tmp_path):
    page_path = written[2] / "report.html"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "report.html").write_bytes(page_path.read_bytes())  # the page alone, without the PNG files beside it
    with chromium_page(offline=True) as page:
        page.goto((alone / "report.html").as_uri())
        page.wait_for_load_state("load")
        assert loaded_images(page) == [[True, 900, 400]] * 6
        assert page.locator("h1").text_content() == "Privacy audit report"


# -- the auditor's words agree with the flags and with `ledger crosscheck` -------------------------------------


def report_text(capsys, *argv) -> tuple[int, str]:
    code = main(["ledger", "report", *map(str, argv)])
    return code, capsys.readouterr().out


def test_a_ledger_without_a_pinned_key_is_intact_not_verified_and_the_suggested_flag_works(ledgers, tmp_path, capsys):
    """The report said "verified" with no key pinned and suggested --public-key, which it refused. Now it says
    "chain intact, signatures not checked against a pinned key", and the --public-key it suggests pins the key."""
    paths, _ = ledgers
    unpinned = "chain intact, signatures not checked against a pinned key"
    code, out = report_text(capsys, paths[1], "--out", tmp_path / "a")
    assert code == 0 and f"overall: {unpinned}" in out and "pass --public-key to pin it" in out
    assert f"OK: 7 entries by 'bank', {unpinned}, rules" in out
    page = (tmp_path / "a" / "report.html").read_text()
    assert "<span class=ok>verified</span>" not in page and page.count(f"<span class=unpinned>{unpinned}</span>") == 2

    code, out = report_text(capsys, paths[1], "--out", tmp_path / "b", "--public-key", paths[1].with_name("bank.pub"))
    assert code == 0 and "overall: verified" in out and "signatures checked against the pinned key" in out
    assert (tmp_path / "b" / "report.html").read_text().count("<span class=ok>verified</span>") == 2

    code, out = report_text(capsys, paths[1], "--out", tmp_path / "c", "--public-key", paths[1].with_name("clinic.pub"))
    assert code == 1 and "overall: FAILED" in out and "differs from the pinned public key" in out

    # All three unpinned: the holders are pinned by the keys the coordinator registered, the coordinator is not.
    code, out = report_text(capsys, *paths, "--out", tmp_path / "d")
    assert code == 0 and f"overall: {unpinned}" in out
    page = (tmp_path / "d" / "report.html").read_text()
    assert page.count("<span class=ok>verified</span>") == 2 and page.count(f"<span class=unpinned>{unpinned}</span>") == 2


def test_public_key_with_several_ledgers_and_no_coordinator_is_a_one_line_error(ledgers, tmp_path, capsys):
    paths, _ = ledgers
    code = main(["ledger", "report", str(paths[1]), str(paths[2]), "--out", str(tmp_path), "--public-key", str(paths[1].with_name("bank.pub"))])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "--public-key pins the coordinator's ledger" in error


def test_a_tampered_holder_ledger_fails_the_receipts_exactly_as_crosscheck_does(ledgers, tmp_path, capsys):
    """A holder ledger with an edited line beside the intact ones: the report showed receipts "verified" (the
    broken ledger left out, the other holder's commits matched) while `ledger crosscheck` failed. Now both are
    the one function's result: the same JSON, FAILED, exit 1."""
    paths, _ = ledgers
    broken = tmp_path / "bank.jsonl"
    lines = paths[1].read_bytes().split(b"\n")
    broken.write_bytes(b"\n".join(lines[:2] + [lines[2].replace(b'"steps":60', b'"steps":6')] + lines[3:]))
    code = main(["ledger", "report", str(paths[0]), str(broken), str(paths[2]), "--out", str(tmp_path / "out"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["verdict"] == "FAILED"
    receipts = report["receipts"]
    assert receipts["checked"] and not receipts["ok"]
    crosscheck_code = main(["ledger", "crosscheck", str(paths[0]), f"bank={broken}", f"clinic={paths[2]}", "--json"])
    assert crosscheck_code == 1
    assert {k: v for k, v in receipts.items() if k != "checked"} == json.loads(capsys.readouterr().out)
    page = (tmp_path / "out" / "report.html").read_text()
    receipts_html = page[page.index("<h3>Receipts</h3>"):page.index("<h2>", page.index("<h3>Receipts</h3>"))]
    assert "<span class=failed>FAILED</span>" in receipts_html and "matched</span>" not in receipts_html
    assert f"bank: ledger {broken}: FAILED at seq 2" in receipts_html
    assert main(["ledger", "crosscheck", str(paths[0]), f"bank={broken}", f"clinic={paths[2]}"]) == 1
    crosscheck_findings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert main(["ledger", "report", str(paths[0]), str(broken), str(paths[2]), "--out", str(tmp_path / "text")]) == 1
    out = capsys.readouterr().out
    assert crosscheck_findings and [line for line in out.splitlines() if line.startswith("  ")] == crosscheck_findings
    assert "overall: FAILED" in out


def test_a_holders_lifetime_composes_all_its_runs_and_the_coordinators_record_only_its_own(tmp_path, capsys):
    """Why `coordinator status` showed 0.015 for holders that had spent 7.98: the coordinator's ledger composes
    every event IT committed for a holder (here two federated runs), never what the holder spent elsewhere (a
    local run before). The holder's own ledger composes all three runs: its lifetime spend. The report shows
    both, each from its own ledger, each the composition of all its events, never a last run's figure."""
    key, coordinator_key = SigningKey.generate(), SigningKey.generate()
    local, federated = PoissonGaussianEvent(0.05, 0.9, 300), PoissonGaussianEvent(0.02, 40.0, 30)  # 7.19, then 0.006 each
    own_path, coordinator_path = tmp_path / "bank.jsonl", tmp_path / "coordinator.jsonl"
    with Ledger.create(own_path, key, "bank", BUDGET) as own, \
            Ledger.create(coordinator_path, coordinator_key, "coordinator", BUDGET) as coordinator:
        coordinator.register_holder("bank", key.public_key_text, 8.0, 1e-5)
        own.commit(own.reserve("bank", "local", 0, local), local)
        for run in ("fed-1", "fed-2"):
            digest = receipt(run, 0)
            own.commit(own.reserve("bank", run, 0, federated), federated, extra={"receipt_sha256": digest})
            coordinator.commit(coordinator.reserve("bank", run, 0, federated), federated, extra={"receipt_sha256": digest})
    code = main(["ledger", "report", str(coordinator_path), str(own_path), "--out", str(tmp_path / "out"), "--json",
                 "--public-key", coordinator_key.public_key_text])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "verified" and report["receipts"]["matched"] == 2
    spent = {curve["writer"]: curve["epsilon_certified"] for curve in report["holders"]}
    assert spent["bank"] == pytest.approx(certified_epsilon(ComposedEvent((local, federated, federated)), 1e-5), rel=1e-12)
    assert spent["coordinator"] == pytest.approx(certified_epsilon(ComposedEvent((federated, federated)), 1e-5), rel=1e-12)
    assert spent["coordinator"] > certified_epsilon(federated, 1e-5)  # both federated runs, not the last one
    assert spent["bank"] > 10 * spent["coordinator"]  # the holder's lifetime, far above what this coordinator saw
