"""A whole federation on one machine, on loopback: credentials, a real SuperLink (TLS, SuperNode
authentication), one agent daemon per holder with its SuperNode, and ``flwr run`` of the coordinator's app.

Keys follow the real flow: the coordinator's credentials come from :func:`ewtune.coordinator.credentials.init_credentials`;
each holder generates its own keys in its own folder with the holder-side function
(:func:`ewtune.agent.keys.init_holder_keys`, what ``ewtune agent keys init`` runs) and only its public card is
registered (:func:`ewtune.coordinator.credentials.add_holder`). :meth:`LocalFederation.prepare_holder` is the one place where
a holder's folder, keys and agent.toml are prepared.

Used by ``ewtune demo``, ``ewtune bench federation`` and the end-to-end tests. Every process it starts is
started in its own session and stopped by pid (its process group) in :meth:`LocalFederation.stop`, which
also runs on failure and on Ctrl-C (``with LocalFederation(...) as federation``).
"""

from __future__ import annotations

import csv
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ewtune.accountant.errors import EwtuneError
from ewtune.agent.keys import init_holder_keys
from ewtune.coordinator import superlink
from ewtune.coordinator.checkpoints import save_weights
from ewtune.coordinator.cli import follow_run
from ewtune.coordinator.config import load_federation_config
from ewtune.coordinator.credentials import add_holder, init_credentials, load_credentials
from ewtune.federation.processes import flower_environment, stop_process_group


@dataclass(frozen=True)
class HolderSetup:
    """One data holder: its id, its CSV, its lifetime budget and its training settings (agent.toml); or, for an
    audit daemon, no CSV and its ``[audit]`` table (ewtune.agent.audit.holder.AuditHolderConfig fields)."""

    holder_id: str
    data_file: Path | None
    budget_epsilon: float = 8.0
    budget_delta: float = 1e-5
    training: dict[str, Any] = field(default_factory=dict)  # ewtune.agent.training.TrainingConfig fields
    policy: dict[str, Any] = field(default_factory=dict)  # [policy] of agent.toml
    supernode: dict[str, Any] = field(default_factory=dict)  # more [supernode] settings of agent.toml (isolation)
    audit: dict[str, Any] | None = None  # [audit] of an audit daemon, which has no [training]


@dataclass(frozen=True)
class FederationJob:
    """The coordinator's side of federation.toml (see ewtune.coordinator.config)."""

    federation: dict[str, Any]
    model: dict[str, Any]
    timeouts: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] | None = None  # [audit]: the run is an empirical privacy audit (ewtune.coordinator.canary_audit)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def partition_csv(source: Path, directory: Path, parts: int, names: Sequence[str]) -> list[Path]:
    """Split a CSV's rows round-robin into ``parts`` files named ``<name>.csv`` (disjoint holders' data)."""
    with open(source, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names[:parts]):
        path = directory / f"{name}.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(body[index::parts])
        paths.append(path)
    return paths


def initial_weights(model_dir: Path, path: Path, training: dict[str, Any], num_labels: int = 2) -> Path:
    """The global trainable parameters before round 1, from the holders' own model recipe (same seed)."""
    # deferred: torch loads only where initial weights are made ('ewtune demo' starts without it)
    import torch

    from ewtune.agent import models

    torch.manual_seed(int(training.get("seed", 0)))
    model = models.load_model(
        model_dir,
        task=training.get("task", "classification"),
        num_labels=num_labels,
        mode=training.get("mode", "lora"),
        lora_rank=int(training.get("lora_rank", 8)),
        lora_alpha=float(training.get("lora_alpha", 16.0)),
        lora_target_modules=training.get("lora_target_modules"),
        tune_layers=int(training.get("tune_layers", 0)),
    )
    return save_weights(path, {name: tensor.numpy() for name, tensor in models.trainable_state(model).items()})


class LocalFederation:
    """``with LocalFederation(work_dir, holders) as federation: federation.start(); federation.run(job)``."""

    def __init__(self, work_dir: Path, holders: Sequence[HolderSetup], log: Callable[[str], None] | None = None,
                 superlink_launcher: Sequence[str] = ()):
        self.work_dir = Path(work_dir).resolve()
        # A module (and its arguments) run in place of ewtune.coordinator.superlink_main, which it must end by
        # running: `ewtune bench federation`'s request recorder (ewtune.bench.superlink_requests).
        self.superlink_launcher = list(superlink_launcher)
        self.holders = list(holders)
        self.log = log or (lambda text: None)
        self.processes: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.flwr_home = self.work_dir / "coordinator" / "flwr-home"
        self.credentials = None
        self.holder_keys: dict[str, Any] = {}  # holder id -> ewtune.agent.keys.HolderKeys (the holder's own files)
        self.agent_configs: dict[str, Path] = {}
        self.node_ids: dict[str, int] = {}

    def __enter__(self) -> "LocalFederation":
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    # -- starting ------------------------------------------------------------------------------------------

    def start(self, register: Sequence[str] | None = None, daemons: bool = True) -> None:
        """The coordinator's credentials, each holder prepared in its own folder (its own keys, its card in
        the coordinator's registry, agent.toml), the SuperLink, the registration of ``register`` (default:
        every holder) with it and, with ``daemons``, one agent daemon with its SuperNode per holder."""
        self.credentials = init_credentials(self.work_dir / "keys")
        self.log(f"coordinator credentials in {self.credentials.directory} (CA, SuperLink certificate, ledger key, registry)")
        for holder in self.holders:
            self.prepare_holder(holder, initialise=daemons)
        self.credentials = load_credentials(self.credentials.directory)
        self.log(f"holders {', '.join(self.holder_keys)} generated their own keys; their public cards are registered")
        self.start_superlink()
        for holder_id in register if register is not None else [h.holder_id for h in self.holders]:
            self.node_ids[holder_id] = superlink.register_supernode(
                self.flwr_home, self.credentials.holders[holder_id].supernode_public_key, holder_id
            )
        self.log(f"SuperLink on 127.0.0.1:{self.port} (TLS, SuperNode authentication); registered {', '.join(self.node_ids)}")
        if daemons:
            for holder in self.holders:
                self.start_daemon(holder)
            self.log(f"{len(self.holders)} agent daemons started, each with its SuperNode")

    def start_superlink(self) -> None:
        coordinator = self.work_dir / "coordinator"
        coordinator.mkdir(parents=True, exist_ok=True)
        credentials = self.credentials
        superlink.write_connection(self.flwr_home, f"127.0.0.1:{self.port}", credentials.ca_certificate)
        command = superlink.superlink_command(
            credentials.ca_certificate, credentials.server_certificate, credentials.server_key, coordinator / "superlink.db", port=self.port
        )
        if self.superlink_launcher:
            at = command.index("ewtune.coordinator.superlink_main")
            command[at:at + 1] = self.superlink_launcher
        process = self._spawn("superlink", command, coordinator / "superlink.log", flower_environment(self.flwr_home), cwd=coordinator)
        superlink.wait_for_port("127.0.0.1", self.port, 60, process)

    def prepare_holder(self, holder: HolderSetup, initialise: bool = True) -> Path:
        """THE place where a holder is prepared, as the holder itself would on its machine: its folder
        ``holders/<id>``, its own keys in ``holders/<id>/keys`` (``ewtune agent keys init``), its public card
        handed to the coordinator (``ewtune keys add-holder``), its agent.toml and, with ``initialise`` (a
        holder that will run a daemon), its ledger (``ewtune agent init``). Returns agent.toml."""
        folder = self.work_dir / "holders" / holder.holder_id
        if holder.holder_id not in self.holder_keys:
            folder.mkdir(parents=True, exist_ok=True)
            keys = init_holder_keys(folder / "keys", holder.holder_id)  # holder side: private keys stay in its folder
            add_holder(self.credentials.directory, keys.card)  # coordinator side: only the public card crosses over
            self.holder_keys[holder.holder_id] = keys
        path = self.agent_toml(holder)
        if initialise and holder.holder_id not in self.agent_configs:
            # Holder-side initialisation from agent.toml, after the keys and agent.toml exist and before any
            # daemon starts: `ewtune agent init` creates the holder's ledger (the daemon never creates one).
            self._holder_command(holder.holder_id, ["agent", "init", "--config", str(path)], folder / "agent-init.log")
            self.agent_configs[holder.holder_id] = path
        return path

    def _holder_command(self, holder_id: str, arguments: list[str], log_path: Path) -> None:
        """Run ``ewtune ARGUMENTS`` as the holder would (a separate process, output to ``log_path``)."""
        with open(log_path, "ab") as output:
            result = subprocess.run([sys.executable, "-m", "ewtune", *arguments], stdout=output, stderr=subprocess.STDOUT, timeout=300)
        if result.returncode != 0:
            raise EwtuneError(f"`ewtune {' '.join(arguments[:2])}` failed for {holder_id}: {_last_line(log_path.read_text(errors='replace'))}")

    def agent_toml(self, holder: HolderSetup) -> Path:
        """Write ``holders/<id>/agent.toml`` from the holder's own keys and the SuperLink's address."""
        keys = self.holder_keys[holder.holder_id]
        folder = self.work_dir / "holders" / holder.holder_id
        folder.mkdir(parents=True, exist_ok=True)
        document = {
            "holder": {"id": holder.holder_id},
            "budget": {"epsilon": holder.budget_epsilon, "delta": holder.budget_delta},
            "policy": dict(holder.policy),
            "ledger": {"path": str(folder / "ledger.jsonl"), "signing_key": str(keys.ledger_key)},
            "rpc": {"address": f"unix://{folder / 'agent.sock'}"},
            **({"audit": holder.audit} if holder.audit is not None else {"training": {"data_file": str(holder.data_file), **holder.training}}),
            "supernode": {
                "superlink": f"127.0.0.1:{self.port}",
                "root_certificates": str(self.credentials.ca_certificate),
                "auth_private_key": str(keys.supernode_private_key),
                "port": free_port(),
                **holder.supernode,
            },
        }
        path = folder / "agent.toml"
        path.write_text(_toml(document))
        return path

    def start_daemon(self, holder: HolderSetup) -> None:
        folder = self.work_dir / "holders" / holder.holder_id
        config = self.prepare_holder(holder)  # rewrites agent.toml; keys and ledger are made only once
        command = [
            sys.executable, "-m", "ewtune", "agent", "start", "--config", str(config),
            "--supernode-log", str(folder / "supernode.log"), "--grace", "5",
        ]
        environment = flower_environment(self.flwr_home, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self._spawn(f"agent:{holder.holder_id}", command, folder / "agent.log", environment, cwd=folder)

    def wait_for_daemons(self, timeout: float = 300.0) -> None:
        """Until every daemon says it is serving (its model and data are loaded)."""
        deadline = time.monotonic() + timeout
        pending = {h.holder_id for h in self.holders}
        while pending:
            for holder_id in list(pending):
                process = self.processes[f"agent:{holder_id}"]
                log = (self.work_dir / "holders" / holder_id / "agent.log").read_text(errors="replace")
                if "serving on" in log:
                    pending.discard(holder_id)
                elif process.poll() is not None:
                    raise EwtuneError(f"the agent daemon of {holder_id} exited ({process.returncode}): {_last_line(log)}")
            if pending and time.monotonic() > deadline:
                raise EwtuneError(f"agent daemons {sorted(pending)} not ready after {timeout:g} s")
            time.sleep(0.3)

    # -- running -------------------------------------------------------------------------------------------

    def federation_toml(self, job: FederationJob, name: str = "run") -> Path:
        """federation.toml for ``job``; the run's checkpoints and status go to ``coordinator/<name>``."""
        coordinator = self.work_dir / "coordinator"
        document = {
            "federation": job.federation,
            "coordinator": {
                "id": "coordinator",
                "ledger": str(coordinator / "ledger.jsonl"),
                "signing_key": str(self.credentials.coordinator_ledger_key),
                "registry": str(self.credentials.registry),
                "output_dir": str(coordinator / name),
            },
            "model": job.model,
            "timeouts": job.timeouts,
            **({"audit": job.audit} if job.audit is not None else {}),
        }
        path = coordinator / f"{name}.toml"
        path.write_text(_toml(document))
        return path

    def run(self, job: FederationJob, on_status: Callable[[dict], None] | None = None, timeout: float = 3600, name: str = "run") -> dict[str, Any]:
        """Submit the job with ``flwr run`` and follow ``status.json`` until the run ends; returns the status. A job
        that federation.toml's reader refuses is a one-line error here, as with ``ewtune coordinator run``, before
        anything is submitted (the ServerApp would otherwise fail before it wrote any status)."""
        config_path = self.federation_toml(job, name)
        load_federation_config(config_path)
        status_path = self.work_dir / "coordinator" / name / "status.json"
        superlink.stop_unfinished_runs(self.flwr_home, status_path.parent)  # as `ewtune coordinator run` does
        process = self._spawn(
            "flwr-run", superlink.run_command(config_path), self.work_dir / "coordinator" / "flwr-run.log",
            flower_environment(self.flwr_home), cwd=self.work_dir / "coordinator",
        )
        try:
            return follow_run(process, status_path, on_status, timeout)
        finally:
            stop_process_group(process)

    # -- stopping ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process started here, newest first, by pid (and its process group)."""
        for name in reversed(list(self.processes)):
            stop_process_group(self.processes.pop(name), timeout=15)

    def _spawn(self, name: str, command: list[str], log_path: Path, environment: dict[str, str], cwd: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=cwd, start_new_session=True)
        self.processes[name] = process
        return process


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _toml(document: dict[str, Any]) -> str:
    """The TOML text of ``document`` (tables of values; None values are left out, paths written as text)."""
    return tomli_w.dumps({table: {key: _plain(value) for key, value in values.items() if value is not None} for table, values in document.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
