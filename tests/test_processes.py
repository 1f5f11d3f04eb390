"""One environment for every Flower process and one way to stop a process group
(ewtune/federation/processes.py), used by the coordinator, the holder's SuperNode supervisor and the local
federation alike."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ewtune.federation.processes import QUIET_FLOWER_ENVIRONMENT, flower_environment, stop_process_group

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")  # a zombie waiting for its parent counts as gone


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _group_leader_with_child(script: str, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A shell started in its own session that starts a child and writes the child's pid."""
    pid_file = tmp_path / "child.pid"
    process = subprocess.Popen(["sh", "-c", script.replace("PIDFILE", str(pid_file))], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    return process, int(pid_file.read_text())


def test_the_whole_group_stops_with_its_leader(tmp_path):
    process, child = _group_leader_with_child("sleep 300 & echo $! > PIDFILE; wait", tmp_path)
    stop_process_group(process, timeout=10)
    assert process.returncode is not None
    assert _wait_gone(child), "the leader's child outlived it"


def test_children_of_a_leader_that_already_exited_are_stopped_too(tmp_path):
    # The bug this catches: the coordinator's old stop_process returned as soon as the leader had exited,
    # leaving what it started (a SuperExec, a ServerApp) running.
    process, child = _group_leader_with_child("sleep 300 & echo $! > PIDFILE; exit 0", tmp_path)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop_process_group(process, timeout=10)
    assert _wait_gone(child), "a child of an exited leader was left running"


def test_a_leader_that_ignores_sigterm_is_killed_after_the_timeout():
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert process.stdout.readline().strip() == b"1"  # the handler is installed
    started = time.monotonic()
    stop_process_group(process, timeout=0.5)
    assert process.returncode == -signal.SIGKILL and time.monotonic() - started < 10


def test_a_reaped_process_is_left_alone():
    process = subprocess.Popen(["true"], start_new_session=True)
    process.wait()
    stop_process_group(process)  # its pid may belong to someone else now: nothing is signalled
    assert process.returncode == 0


def test_the_flower_environment_is_quiet_offline_and_finds_this_pythons_scripts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # an operator's setting does not turn telemetry back on
    environment = flower_environment(tmp_path, {"OMP_NUM_THREADS": "1"})
    assert {name: environment[name] for name in QUIET_FLOWER_ENVIRONMENT} == QUIET_FLOWER_ENVIRONMENT
    assert environment["FLWR_TELEMETRY_ENABLED"] == "0" and environment["HF_HUB_OFFLINE"] == "1"
    assert environment["FLWR_HOME"] == str(tmp_path) and environment["OMP_NUM_THREADS"] == "1"
    assert environment["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    monkeypatch.delenv("FLWR_HOME", raising=False)
    assert "FLWR_HOME" not in flower_environment()  # the SuperNode's: Flower's own default home


def test_no_other_module_builds_the_flower_environment_or_signals_a_group():
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("ewtune", "tests")  # every part is under ewtune/
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name not in ("processes.py", "test_processes.py")
        and ('"FLWR_TELEMETRY_ENABLED"' in path.read_text() or "os.killpg(" in path.read_text())
    ]
    assert offenders == [], (
        f"{offenders}: build a Flower process's environment with ewtune.federation.processes.flower_environment and stop "
        "a process group with ewtune.federation.processes.stop_process_group (one helper each)"
    )


def test_the_superlinks_own_superexec_polls_at_flowers_interval_not_the_short_one(tmp_path):
    """The SuperLink started as ewtune starts it hands its SuperExec :data:`SUPERLINK_TASK_POLL_S`, although every
    Flower process is started with the short poll of :data:`QUIET_FLOWER_ENVIRONMENT`: that SuperExec asks the one
    SuperLink for a task all the time, run or no run."""
    from tiny_federation import descendants

    from ewtune.local_federation import LocalFederation
    from ewtune.federation.processes import SUPERLINK_TASK_POLL_S

    assert float(SUPERLINK_TASK_POLL_S) > float(QUIET_FLOWER_ENVIRONMENT["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"])
    with LocalFederation(tmp_path, []) as federation:
        federation.start(daemons=False)
        superlink = federation.processes["superlink"].pid
        deadline, superexecs = time.monotonic() + 60, []
        while not superexecs and time.monotonic() < deadline:
            superexecs = [pid for pid in descendants(superlink) if b"flower-superexec" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert superexecs, "the SuperLink started no SuperExec"
        environment = dict(
            entry.split(b"=", 1) for entry in Path(f"/proc/{superexecs[0]}/environ").read_bytes().split(b"\0") if b"=" in entry
        )
        assert environment[b"FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == SUPERLINK_TASK_POLL_S.encode()

