"""Bad arguments are one line naming the option, with exit code 2, before anything heavy loads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_federation import MINIMAL_FEDERATION_TOML

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


# -- a reader that leaves early (`ewtune ... | head`) ------------------------------------------------------------



@pytest.fixture()
def large_status(tmp_path):
    """A federation.toml whose status.json lists 2,000 holders: its table is far beyond a pipe's 64 KiB buffer."""
    import json

    (tmp_path / "federation.toml").write_text(MINIMAL_FEDERATION_TOML)
    (tmp_path / "out").mkdir()
    holders = {f"holder-{i:04d}": {"budget_epsilon": 8.0, "epsilon_certified": 1.5, "rounds_committed": 2} for i in range(2000)}
    (tmp_path / "out" / "status.json").write_text(json.dumps(
        {"run_id": "t-1", "state": "finished", "rounds_completed": 2, "rounds_planned": 2, "holders": holders}))
    return tmp_path / "federation.toml"


@pytest.mark.parametrize("buffered", [False, True])
def test_coordinator_status_piped_into_head_exits_141_without_a_traceback(large_status, buffered):
    """The user's command as typed: `ewtune coordinator status | head -3`; head exits after three lines while the
    table is still being written. Exit 141 (128 + SIGPIPE, as `cat` and `git` give), nothing on stderr."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        environment["PYTHONUNBUFFERED"] = "1"
    script = (f'"{sys.executable}" -m ewtune coordinator status --config "{large_status}" 2>"{large_status.parent}/err" | head -3; '
              'echo "exit ${PIPESTATUS[0]}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, env=environment, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[0] == "run t-1: finished, 2/2 rounds" and len(lines) == 4, result.stdout
    assert lines[-1] == "exit 141"
    assert (large_status.parent / "err").read_text() == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["coordinator", "status", "--json", "--config", "{config}"],
        ["accountant", "epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "100", "--delta", "1e-5"],
        ["coordinator", "--help"],
    ],
)
def test_any_command_whose_stdout_is_already_closed_exits_quietly(large_status, argv):
    """stdout a pipe whose reader has gone before the first write: every command stops at its first write with
    exit code 141 and prints nothing on stderr (stdout block-buffered, as in a pipe without PYTHONUNBUFFERED: the
    write that fails is the final flush)."""
    reader, writer = os.pipe()
    os.close(reader)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        result = subprocess.run([sys.executable, "-m", "ewtune", *(a.format(config=large_status) for a in argv)],
                                stdout=writer, stderr=subprocess.PIPE, text=True, cwd=REPO, env=environment, timeout=120)
    finally:
        os.close(writer)
    assert result.returncode == 141 and result.stderr == ""
