"""The coordinator's Flower processes: the SuperLink (TLS, SuperNode authentication, a database, telemetry and
runtime dependency installation off, every API on one loopback port), the registration of the holders'
SuperNode keys, and ``flwr run`` of the federation app.

The Control API of open-source Flower 1.42 is unauthenticated and shares the Fleet API's port: anyone who
reaches it can submit a run, that is run code on the coordinator. The SuperLink therefore binds to
127.0.0.1, and :func:`check_bind_address` refuses any other address unless the operator states that a
reverse proxy passing only ``/v1/fleet/`` stands in front (``--behind-fleet-proxy``; see deploy/).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.federation.apps import APP_DIR, RUN_CONFIG_KEY
from ewtune.federation.processes import flower_environment

CONNECTION = "ewtune"
def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        raise InvalidInputError(f"{name} is not installed beside {sys.executable} (pip install 'ewtune[federation]')")
    return str(beside)


def check_bind_address(host: str, behind_fleet_proxy: bool) -> None:
    """Refuse a non-loopback bind address unless ``behind_fleet_proxy``: the Control API on the same port
    would be open to whoever can reach it."""
    if behind_fleet_proxy or is_loopback(host):
        return
    raise InvalidInputError(
        f"--host {host} would expose Flower's unauthenticated Control API (anyone reaching it can run code on this "
        "machine): bind to 127.0.0.1, or pass --behind-fleet-proxy if a reverse proxy in front forwards only /v1/fleet/"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def superlink_command(ca_certificate: Path, server_certificate: Path, server_key: Path, database: Path, host: str = "127.0.0.1", port: int = 9092) -> list[str]:
    for path in (ca_certificate, server_certificate, server_key):
        if not Path(path).is_file():
            raise InvalidInputError(f"SuperLink credential {path} does not exist (run `ewtune keys init DIR`)")
    return [
        sys.executable, "-m", "ewtune.coordinator.superlink_main",  # flower-superlink, patient with its database's locks
        "--ssl-ca-certfile", str(ca_certificate),
        "--ssl-certfile", str(server_certificate),
        "--ssl-keyfile", str(server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(database),
        "--host", host,
        "--port", str(port),
    ]


def write_connection(flwr_home: Path, address: str, ca_certificate: Path, name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one TLS connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{Path(ca_certificate).resolve()}"\n'
    )
    return path


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already answers on (most often a SuperLink started earlier): a second
    SuperLink could not bind it, and every later step would talk to the first one."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            pass
    except OSError:
        return
    raise EwtuneError(
        f"{host}:{port} is already in use (another `ewtune coordinator start`?): stop what listens there or pass another --port"
    )


def check_superlink_reachable(flwr_home: Path, state_dir: str) -> None:
    """Refuse to submit a run when nothing answers at the SuperLink address of ``flwr_home``'s connection
    (written by ``ewtune coordinator start --state-dir state_dir``): ``flwr run`` would only fail later."""
    path = flwr_home / "config.toml"
    try:
        address = tomllib.loads(path.read_text())["superlink"][CONNECTION]["address"]
        host, _, port = address.rpartition(":")
        host, port = host.strip("[]"), int(port)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidInputError(f"{path} holds no SuperLink address ({error}): start the SuperLink with "
                                f"`ewtune coordinator start --state-dir {state_dir}`") from None
    try:
        with socket.create_connection((host, port), timeout=5.0):
            return
    except OSError as error:
        raise EwtuneError(
            f"no SuperLink answers at {address} ({error.strerror or error}): start it with "
            f"`ewtune coordinator start --credentials DIR --state-dir {state_dir}` and keep it running"
        ) from None


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EwtuneError(f"the process meant to listen on {host}:{port} exited with code {process.returncode} before it did")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise EwtuneError(f"nothing listens on {host}:{port} after {timeout:g} s")


def register_supernode(flwr_home: Path, public_key: Path, name: str) -> int:
    """Register a holder's SuperNode public key with the SuperLink; returns its node id (fixed from now on)."""
    result = subprocess.run(
        [executable("flwr"), "supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json"],
        capture_output=True, text=True, env=flower_environment(flwr_home), timeout=120,
    )
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        answer = {}
    if not answer.get("success"):
        reason = answer.get("error-message") or result.stderr.strip() or result.stdout.strip()
        raise EwtuneError(f"cannot register the SuperNode key of {name}: {reason.splitlines()[-1] if reason else 'no answer'}")
    return int(answer["node-id"])


def stop_unfinished_runs(flwr_home: Path, output_dir: Path) -> list[int]:
    """Before a federation is submitted again after a crash: ask the SuperLink to stop the Flower runs of its
    unfinished earlier starts (the run record in ``output_dir``, :mod:`ewtune.coordinator.recovery`). A ServerApp killed
    mid-round leaves its run "running" until the SuperLink misses its heartbeats (about a minute in flwr 1.42);
    meanwhile a SuperNode keeps waiting for the objects of a message that run never finished pushing, and answers
    no other. Stopped, the run's pending messages are released at once. Returns the Flower run ids stopped (a run
    the SuperLink already ended is left as it is)."""
    # numpy, the ledger, checkpoints: +110 ms on every `ewtune` command (coordinator.cli imports this module)
    from ewtune.coordinator.recovery import earlier_flower_run_ids

    stopped = []
    for flower_run_id in earlier_flower_run_ids(output_dir):
        result = subprocess.run(
            [executable("flwr"), "stop", str(flower_run_id), CONNECTION, "--format", "json"],
            capture_output=True, text=True, env=flower_environment(flwr_home), timeout=120,
        )
        try:
            answer = json.loads(result.stdout)
        except ValueError:
            answer = {}
        if answer.get("success"):
            stopped.append(flower_run_id)
    return stopped


def run_command(config_path: Path) -> list[str]:
    """``flwr run`` of the federation app, pointed at ``federation.toml`` (absolute: the ServerApp's working
    directory is the SuperLink's)."""
    return [
        executable("flwr"), "run", str(APP_DIR), CONNECTION,
        "--run-config", f'{RUN_CONFIG_KEY}="{Path(config_path).resolve()}"',
        "--stream",
    ]
