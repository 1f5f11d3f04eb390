"""Ctrl-C during ``ewtune agent train-local --ledger``: the interrupted phase is committed with exactly the steps
that began (the interrupted one included), with the reason "interrupted after k step(s) ...", no reservation
is left open for a later start to call a crash, and the command ends with one line and exit 130.

The SIGINT is real: a launcher wraps the DP-SGD step (``ewtune.agent.dpsgd.step.DPSGDStep.step``) so that the process
sends SIGINT to itself as step K begins, after its Poisson sample was drawn and its batch built."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from support.ledgers import read_entries as _entries
from support.training import INTERRUPTING_LAUNCHER, _argv, _holder_ledger

REPO = Path(__file__).resolve().parents[1]


def test_ctrl_c_charges_the_steps_that_began_and_leaves_no_open_reservation(tiny_bert_dir, mr_csv, tmp_path):
    from ewtune.accountant.verify import verify_ledger

    interrupt_at = 3
    argv = _argv(tiny_bert_dir, mr_csv, *_holder_ledger(tmp_path, 9.0), "--probe-epochs", "3", "--device", "cpu")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", INTERRUPTING_LAUNCHER, str(interrupt_at), *argv], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"ewtune: interrupted: interrupted after {interrupt_at} step(s) of ")
    assert last_line.endswith(f"; {interrupt_at} step(s) charged")
    assert "Traceback" not in result.stderr

    entries = _entries(tmp_path / "ledger.jsonl")
    reserves = {e["seq"]: e["payload"] for e in entries if e["kind"] == "reserve"}
    closed = {e["payload"]["reservation"]: e for e in entries if e["kind"] in ("commit", "abort")}
    assert set(reserves) == set(closed), "a reservation was left open"
    probe_reservation = max(reserves)  # the count's reservation first, then the probe's; the tune phase never began
    probe = closed[probe_reservation]
    assert probe["kind"] == "commit" and probe["payload"]["extra"]["phase"] == "probe"
    planned_steps = reserves[probe_reservation]["event"]["event"]["steps"]
    charged = probe["payload"]["event"]["event"]
    assert charged["steps"] == interrupt_at < planned_steps, (charged, planned_steps)
    reason = probe["payload"]["extra"]["reason"]
    assert reason.startswith(f"interrupted after {interrupt_at} step(s) of {planned_steps} began ({interrupt_at - 1} completed)")
    assert probe["payload"]["extra"]["released"] is False
    report = verify_ledger(tmp_path / "ledger.jsonl")
    assert report.ok, report.summary()
