"""Bad arguments are one line naming the option, with exit code 2, before anything heavy loads."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["agent", "train-local", "--model", "m", "--data", "d", "--epsilon", "abc", "--delta", "1e-5"], "--epsilon"),
        (["accountant", "epsilon", "--sampling-rate", "x", "--noise-multiplier", "1", "--steps", "9", "--delta", "1e-5"], "sampling"),
        (["coordinator", "start", "--port", "x"], "--port"),
        (["ledger", "nonsense"], "invalid choice"),
    ],
)
def test_argument_errors_are_one_line_with_exit_2(argv, named):
    result = subprocess.run([sys.executable, "-m", "ewtune", *argv], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ewtune") and "error:" in lines[0] and named in lines[0]
    assert "usage:" not in result.stderr
