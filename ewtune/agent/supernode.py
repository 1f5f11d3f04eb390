"""Start and supervise the holder's Flower SuperNode (flwr 1.42), with TLS and SuperNode authentication.

The command (flwr 1.42's ``flower-supernode``; deploy/README.md shows it as a systemd unit)::

    flower-supernode --superlink HOST:PORT --root-certificates ca.crt \\
        --auth-supernode-private-key supernode.key --port 9094 \\
        --node-config 'daemon-address="unix:///run/ewtune/agent.sock" holder-id="holder0"'

By default the SuperNode runs in ``--isolation process`` under :mod:`ewtune.agent.warm_supernode`, whose one task
loop serves every message with the ClientApp already imported, and whose Runtime API answers only that loop
(a fresh SuperExec secret per start); ``isolation = "subprocess"`` in ``[supernode]`` keeps Flower's default (a
fresh ClientApp process per message, started by ``flower-superexec``), whose Runtime API on 127.0.0.1 any local
process can ask for tasks: flwr 1.42 ignores the SuperExec secret in that mode.

The node id is fixed when the operator registers the public key (``flwr supernode register``), so restarts
keep it. The SuperNode runs in its own process group: stopping it also stops its ``flower-superexec`` and
ClientApp children. A SuperNode that exits is restarted with exponential backoff (1 s doubling up to 60 s,
reset after 60 s of healthy running). Telemetry, the update check and runtime dependency installation stay off.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.policy import SuperNodeConfig
from ewtune.federation.contract import DAEMON_ADDRESS_KEY, HOLDER_ID_KEY
from ewtune.federation.processes import flower_environment, stop_process_group

log = logging.getLogger(__name__)

_BACKOFF_START_S, _BACKOFF_MAX_S, _HEALTHY_AFTER_S = 1.0, 60.0, 60.0
def node_config_text(values: Mapping[str, Any]) -> str:
    """``--node-config`` text: space separated ``key=value`` pairs, values TOML-typed (strings quoted)."""
    pairs = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


def supernode_command(config: SuperNodeConfig, daemon_address: str, holder_id: str) -> list[str]:
    """The SuperNode command line for this holder: ``python -m ewtune.agent.warm_supernode`` (flower-supernode's
    arguments, one warm task loop for every message) or, with ``isolation = "subprocess"``, Flower's own
    ``flower-supernode`` (a ClientApp process per message)."""
    if config.isolation == "warm":
        command = [sys.executable, "-m", "ewtune.agent.warm_supernode"]
    else:
        log.warning("isolation = \"subprocess\": the SuperNode's Runtime API on 127.0.0.1:%d is open to every local "
                    "process (flwr 1.42 ignores the SuperExec secret in this mode); the default \"warm\" closes it", config.port)
        command = [_executable(config)]
    command += ["--superlink", config.superlink, "--port", str(config.port)]
    if config.insecure:
        command.append("--insecure")
    else:
        for path in (config.root_certificates, config.auth_private_key):
            if path is None or not Path(path).is_file():
                raise InvalidInputError(f"SuperNode credential {path} does not exist")
        command += ["--root-certificates", str(config.root_certificates)]
        command += ["--auth-supernode-private-key", str(config.auth_private_key)]
    node_config = {DAEMON_ADDRESS_KEY: daemon_address, HOLDER_ID_KEY: holder_id, **config.extra_node_config}
    return command + ["--node-config", node_config_text(node_config)]


def _executable(config: SuperNodeConfig) -> str:
    if config.executable:
        return config.executable
    beside_python = Path(sys.executable).parent / "flower-supernode"
    found = str(beside_python) if beside_python.exists() else shutil.which("flower-supernode")
    if not found:
        raise InvalidInputError("flower-supernode is not installed (pip install 'ewtune[federation]')")
    return found


class SuperNodeSupervisor:
    """Runs ``command`` and restarts it when it exits, until :meth:`stop`."""

    def __init__(self, command: list[str], log_path: Path | None = None, environment: Mapping[str, str] | None = None):
        self.command = command
        self.log_path = log_path
        self.environment = flower_environment(extra=environment)
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="supernode-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> "SuperNodeSupervisor":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop supervising, then SIGTERM the SuperNode's process group (SIGKILL after ``timeout``)."""
        self._stopping.set()
        self._thread.join(timeout=timeout)
        if self._process is not None:
            stop_process_group(self._process, timeout)

    def _supervise(self) -> None:
        backoff = _BACKOFF_START_S
        while not self._stopping.is_set():
            started = time.monotonic()
            self._process = self._spawn()
            log.info("SuperNode started (pid %d): %s", self._process.pid, " ".join(self.command))
            while self._process.poll() is None:
                if self._stopping.wait(0.5):
                    return
            if time.monotonic() - started > _HEALTHY_AFTER_S:
                backoff = _BACKOFF_START_S
            log.warning("SuperNode exited with code %s; restarting in %.0f s", self._process.returncode, backoff)
            self.restarts += 1
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _spawn(self) -> subprocess.Popen:
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                self.command, stdout=output, stderr=subprocess.STDOUT, env=self.environment, start_new_session=True
            )
        finally:
            if self.log_path:
                output.close()
