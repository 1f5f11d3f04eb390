"""``ewtune ledger report`` without the ``report`` extra (matplotlib not importable): the real command, in a fresh
process whose imports of matplotlib fail as on a machine without it, ends in one line naming the fix, exit 2,
and leaves no report behind: no HTML page, no PNG, not even the directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey
from ewtune.cli import main

REPO = Path(__file__).resolve().parents[1]
# `python -m ewtune ARGS...` where importing matplotlib (or any of its modules) fails as when it is not installed
WITHOUT_MATPLOTLIB = """
import importlib.abc, runpy, sys

class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoMatplotlib())
sys.argv = ["ewtune", *sys.argv[1:]]
runpy.run_module("ewtune", run_name="__main__")
"""
ONE_LINE = "ewtune: error: the report's plots need matplotlib (No module named 'matplotlib'): pip install 'ewtune[report]'\n"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> tuple[Path, str]:
    """A holder's ledger of two committed rounds (so the report has plots to draw) and its public key."""
    path = tmp_path_factory.mktemp("ledger") / "bank.jsonl"
    key = SigningKey.generate()
    with Ledger.create(path, key, "bank", {"budget_epsilon": 8.0, "budget_delta": 1e-5}) as own:
        for round_ in range(2):
            event = PoissonGaussianEvent(0.02, 1.0, 50)
            own.commit(own.reserve("bank", "run-1", round_, event), event)
    return path, key.public_key_text


def _report_without_matplotlib(ledger: Path, public_key: str, out: Path, *options: str) -> subprocess.CompletedProcess:
    command = ["ledger", "report", str(ledger), "--public-key", public_key, "--out", str(out), *options]
    return subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, *command], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("options", [(), ("--json",)], ids=["text", "json"])
def test_a_report_without_matplotlib_is_one_line_naming_the_extra_and_writes_nothing(ledger, tmp_path, options):
    out = tmp_path / "report"
    result = _report_without_matplotlib(*ledger, out, *options)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", ONE_LINE)
    assert not out.exists()


def test_an_existing_report_directory_is_left_as_it_was(ledger, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("the auditor's own file")
    result = _report_without_matplotlib(*ledger, out)
    assert (result.returncode, result.stderr) == (2, ONE_LINE)
    assert sorted(item.name for item in out.iterdir()) == ["notes.txt"]


def test_with_matplotlib_the_same_report_is_written(ledger, tmp_path, capsys):
    """The control: the same command with matplotlib importable draws the plots and writes the page."""
    path, public_key = ledger
    out = tmp_path / "report"
    assert main(["ledger", "report", str(path), "--public-key", public_key, "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (out / "report.html").is_file() and sorted(item.suffix for item in out.iterdir()).count(".png") == 2
