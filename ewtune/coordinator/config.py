"""``federation.toml``: what ``ewtune coordinator run`` submits and the ServerApp reads.

Relative paths are resolved against the file's directory (the ServerApp's working directory is the
SuperLink's, so every path it uses is absolute)::

    [federation]                 # ewtune.coordinator.planner.FederationSettings
    name = "demo"
    rounds = 3
    local_steps = 20
    expected_batch_size = 64
    clip_norm = 1.0
    learning_rate = 0.002
    target_epsilon = 8.0
    delta = 1e-5
    min_holders = 2
    max_weight_share = 0.5       # no holder's share of the FedAvg average above it (default 0.5)
    max_update_norm = 10.0       # optional: default derived from the plan (ewtune.coordinator.aggregation)

    [coordinator]
    id = "coordinator"
    ledger = "coordinator/ledger.jsonl"      # created on first use
    signing_key = "keys/coordinator/ledger.key"
    registry = "keys/supernodes.json"        # required: SuperNode key -> holder id -> ledger key
    output_dir = "coordinator/run"           # checkpoints, status.json

    [model]
    initial_weights = "init.safetensors"     # the global trainable parameters before round 1
    base_model_dir = "models/minilm"         # optional: with mode = "lora", a PEFT adapter is saved at the end
    mode = "lora"
    task = "classification"
    lora_alpha = 16.0
    evaluate = "every_round"                 # or "final" or "never"
    pack_weights = true                      # one buffer per message instead of one Flower object per tensor

    [timeouts]                               # seconds
    nodes = 120          # wait for the expected number of nodes to connect
    query = 60           # a node that does not describe itself in time is left out
    round = 900          # a holder that does not answer a train message in time is aborted
    evaluate = 300
    run_deadline = 0     # > 0: no round starts after this many seconds (the run stops cleanly)
    poll_interval = 0.1  # how often the ServerApp pulls replies (Flower's send_and_receive: 3 s)
    short_waits = true   # re-pull a reply whose objects lag its header after 50 ms (Flower: 1 s, doubling)

    [audit]              # optional: this run is an empirical privacy audit (ewtune.coordinator.canary_audit)
    parameter = "audit.weight"   # the audit block of the global model; only audit daemons train such runs

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.tomlfiles import read_toml, required, resolve, table
from ewtune.coordinator.planner import FederationSettings
from ewtune.federation.contract import TASKS

EVALUATE_MODES = ("every_round", "final", "never")


@dataclass(frozen=True)
class Timeouts:
    nodes: float = 120.0
    query: float = 60.0
    round: float = 900.0
    evaluate: float = 300.0
    run_deadline: float = 0.0
    poll_interval: float = 0.1
    short_waits: bool = True


@dataclass(frozen=True)
class ModelConfig:
    initial_weights: Path
    base_model_dir: Path | None = None
    mode: str = "lora"
    task: str = "classification"
    lora_alpha: float = 16.0
    evaluate: str = "every_round"
    pack_weights: bool = True


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: the run is a federated audit; ``parameter`` names the audit block the holders' canaries own."""

    parameter: str = "audit.weight"

    def __post_init__(self) -> None:
        if not isinstance(self.parameter, str) or not self.parameter:
            raise InvalidInputError(f"parameter must be a non-empty string, got {self.parameter!r}")


@dataclass(frozen=True)
class FederationConfig:
    path: Path
    name: str
    expected_holders: int
    settings: FederationSettings
    coordinator_id: str
    ledger: Path
    signing_key: Path
    registry: Path
    output_dir: Path
    model: ModelConfig
    timeouts: Timeouts
    audit: AuditSettings | None = None


def load_federation_config(path: str | os.PathLike) -> FederationConfig:
    document, path = read_toml(path)
    base = path.parent
    federation = dict(table(document, "federation", path))
    name = str(federation.pop("name", "federation"))
    expected = federation.pop("expected_holders", federation.get("min_holders", 1))
    settings = _build(FederationSettings, federation, "federation", path)
    coordinator = table(document, "coordinator", path)
    model = dict(table(document, "model", path))
    model["initial_weights"] = resolve(base, required(model, "initial_weights", "model", path))
    if model.get("base_model_dir"):
        model["base_model_dir"] = resolve(base, model["base_model_dir"])
    model_config = _build(ModelConfig, model, "model", path)
    if model_config.evaluate not in EVALUATE_MODES:
        raise InvalidInputError(f"{path}: [model] evaluate must be one of {', '.join(EVALUATE_MODES)}")
    if model_config.task not in TASKS:
        raise InvalidInputError(f"{path}: [model] task must be one of {', '.join(TASKS)}, got {model_config.task!r}")
    timeouts = _build(Timeouts, dict(document.get("timeouts", {})), "timeouts", path)
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < settings.min_holders:
        raise InvalidInputError(f"{path}: expected_holders must be an integer >= min_holders, got {expected!r}")
    return FederationConfig(
        path=path,
        name=name,
        expected_holders=expected,
        settings=settings,
        coordinator_id=str(coordinator.get("id", "coordinator")),
        ledger=resolve(base, required(coordinator, "ledger", "coordinator", path)),
        signing_key=resolve(base, required(coordinator, "signing_key", "coordinator", path)),
        registry=resolve(base, required(coordinator, "registry", "coordinator", path)),
        output_dir=resolve(base, required(coordinator, "output_dir", "coordinator", path)),
        model=model_config,
        timeouts=timeouts,
        audit=_build(AuditSettings, dict(table(document, "audit", path)), "audit", path) if "audit" in document else None,
    )


def _build(cls, values: Mapping[str, Any], section: str, path: Path):
    try:
        return cls(**values)
    except TypeError as bad:
        raise InvalidInputError(f"{path}: [{section}] {bad}") from None
    except InvalidInputError as bad:
        raise InvalidInputError(f"{path}: [{section}] {bad}") from None





