"""How either side runs Flower's processes (SuperLink, SuperNode, ``flwr`` commands): one environment for
all of them, and one way to stop one together with the children it started.

Standard library only, so that the command line may import it without loading flwr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping

QUIET_FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # default 1 s between SuperExec polls
    "HF_HUB_OFFLINE": "1",
}
"""No telemetry, no update check, no dependency installation, nothing from a model hub; short polls."""

SUPERLINK_TASK_POLL_S = "1.0"
"""How often the SuperLink's own SuperExec asks it for a ServerApp task (Flower's default). It asks all the time,
run or no run, each ask a request the one SuperLink process serves (its handler first rewrites the expired task
tokens): at :data:`QUIET_FLOWER_ENVIRONMENT`'s 0.1 s, 666 of them in one 10-holder bench of 5 rounds, more than
the holders' message pulls; at 1 s, 113. A run starts at most 1 s later instead."""


def flower_environment(flwr_home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: this one's, made quiet and offline
    (:data:`QUIET_FLOWER_ENVIRONMENT`), ``FLWR_HOME`` when given, then ``extra``; and this Python's scripts
    first on PATH (the SuperLink and the SuperNode start ``flower-superexec`` and ``flwr-serverapp`` by
    name)."""
    environment = {**os.environ, **QUIET_FLOWER_ENVIRONMENT}
    if flwr_home is not None:
        environment["FLWR_HOME"] = str(flwr_home)
    environment.update(extra or {})
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def stop_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM ``process`` and every process of the group it leads (it was started with
    ``start_new_session=True``; a process that leads no group is signalled alone), SIGKILL after
    ``timeout`` seconds; waits for it. A leader that exited but was not yet reaped still has its group
    signalled, so that children it left behind (a SuperExec, a ServerApp) do not outlive it."""
    if process.returncode is not None:  # reaped already: its pid may now be another process's
        return
    leads_group = _leads_group(process)
    _signal(process, signal.SIGTERM, leads_group)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL, leads_group)
        process.wait()


def _leads_group(process: subprocess.Popen) -> bool:
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return False


def _signal(process: subprocess.Popen, signum: int, group: bool) -> None:
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:  # gone already
        pass
