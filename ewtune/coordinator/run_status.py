"""``status.json``: a federated run's progress and results, as the ServerApp writes it and every reader reads it.

The schema is :class:`RunStatus` (each field documented where it is declared). The ServerApp
(:mod:`ewtune.coordinator.server_app`) is its one writer: it rewrites the file atomically after every step
(:func:`write_status`). Its readers: ``ewtune coordinator run`` and ``ewtune demo`` follow a run with
:class:`ewtune.coordinator.run_progress.RunProgress`; ``ewtune coordinator status`` prints its table; the status
page (:mod:`ewtune.coordinator.status_server`) serves the file as it is to the page's script
(:mod:`ewtune.coordinator.status_view`), which reads the same names.

A field declared ``_omitted_when_none`` is absent from the file while it has no value (a reader tells "not yet"
from "none"); every other field is always there, null when it has no value. :meth:`RunStatus.from_json` reads a
file from any stage of a run (a missing field takes its default, an unknown one is ignored), so a reader never
fails on a status written before the field existed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATUS_FILE = "status.json"
FINAL_STATES = ("finished", "stopped", "failed", "interrupted")
"""A run's last states. ``interrupted``: fewer than ``min_holders`` holders were left (they dropped: a daemon
stopped, a reply that never came); the run record stays open and the next ``ewtune coordinator run`` with the same
federation.toml resumes it from the last committed round once the holders are back (:mod:`ewtune.coordinator.resume`)."""


def _omitted_when_none(default: Any = None) -> Any:
    return field(default=default, metadata={"omit_none": True})


def _of(kind: type, default_factory: Any) -> Any:
    """A dict or list field whose values are ``kind`` records."""
    return field(default_factory=default_factory, metadata={"of": kind})


@dataclass
class HolderOutcome:
    """What became of one holder's update in one round."""

    status: str = "aborted"  # "committed" (verified, charged in the ledger, aggregated) or "aborted"
    reason: str | None = _omitted_when_none()  # why it was aborted (one line)
    steps: int | None = _omitted_when_none()  # the DP-SGD steps its receipt certifies
    update_norm: float | None = _omitted_when_none()  # L2 distance of its update from the global weights
    metrics: dict[str, float] | None = _omitted_when_none()  # what it released beside the update: {"steps": n} or {}
    weight_share: float | None = _omitted_when_none()  # its share of the capped FedAvg average
    # When its reply arrived, from the round's start; absent when none did (or in a round rebuilt after a restart).
    reply_seconds: float | None = _omitted_when_none()


@dataclass
class RoundRecord:
    """One round, as the coordinator saw it."""

    round: int = 0
    seconds: float | None = None  # the round's wall time (a rebuilt round: the rebuild's)
    exchange_seconds: float | None = None  # until the last reply arrived (None: a rebuilt round)
    # Holders no longer release their training time: ``ewtune bench federation`` reads their ledgers instead.
    slowest_train_seconds: float | None = None
    overhead_seconds: float | None = None
    evaluation_included: bool = False  # the train messages asked for the previous round's evaluation
    holders: dict[str, HolderOutcome] = _of(HolderOutcome, dict)
    # The share of the average the previous global weights keep (capped_fedavg); None: nothing aggregated.
    global_weights_share: float | None = None
    # Rebuilt after a restart from the updates committed before it (ewtune.coordinator.recovery); absent otherwise.
    rebuilt_after_restart: bool | None = _omitted_when_none()


@dataclass
class HolderStatus:
    """One planned holder: its plan, its state, what it released, and its spend as this coordinator's ledger
    records it (the guarantee: every event committed for it, in all of this coordinator's runs)."""

    node_id: str = ""  # its Flower node id, as text (JSON numbers lose 64-bit ids)
    dataset_size: int | None = None  # the noised count N_noisy it released (never the exact N)
    sampling_rate: float | None = None  # the plan's q
    noise_multiplier: float | None = None  # the plan's sigma
    planned_epsilon_certified: float | None = None  # the whole plan's certified epsilon
    warning: str | None = None  # its budget left makes its updates mostly noise (ewtune.coordinator.planner)
    active: bool = True  # still sent rounds; False once dropped
    reason: str | None = None  # why it was dropped
    rounds_committed: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)  # round -> the (noised) accuracy it released
    perplexity: dict[str, float] = field(default_factory=dict)  # round -> the (noised) perplexity (a causal LM)
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)  # round -> every metric it released
    evaluation_missing: dict[str, str] = field(default_factory=dict)  # round -> why it released none (one line)
    # Its spend in this coordinator's ledger; absent until the ledger is open.
    budget_epsilon: float | None = _omitted_when_none()
    budget_delta: float | None = _omitted_when_none()
    epsilon_certified: float | None = _omitted_when_none()
    epsilon_edgeworth_estimate: float | None = _omitted_when_none()  # an estimate beside the certified bound
    epsilon_rdp: float | None = _omitted_when_none()  # the looser RDP baseline

    @classmethod
    def from_json(cls, document: Any) -> "HolderStatus":
        """One holder's line of a status of any stage (as :meth:`RunStatus.from_json` reads it)."""
        return _from_json(cls, document if isinstance(document, dict) else {})


@dataclass
class PlanStatus:
    """The federation's schedule and bounds (federation.toml's ``[federation]``, with the derived update bound)."""

    rounds: int = 0
    local_steps: int = 0
    expected_batch_size: float = 0.0
    clip_norm: float = 0.0
    learning_rate: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    max_weight_share: float | None = None  # None: the default cap (ewtune.coordinator.aggregation)
    max_update_norm: float | None = None  # the bound every update's norm is checked against


@dataclass
class ResumeStatus:
    """A run that resumed earlier runs of the same federation (ewtune.coordinator.recovery)."""

    from_runs: list[str] = field(default_factory=list)  # the earlier runs' ids
    rounds_completed: int = 0  # rounds done before this run started
    reconciled: list[dict[str, Any]] = field(default_factory=list)  # each open reservation closed (Outcome.to_json)


@dataclass
class RunStatus:
    """The run's ``status.json``."""

    run_id: str = ""  # "<federation name>-<Flower run id>"
    flower_run_id: int | None = None
    state: str = "starting"  # starting, querying, running, then one of FINAL_STATES
    reason: str | None = None  # why the run stopped early or failed
    rounds_planned: int = 0
    rounds_completed: int = 0
    ledger: str = ""  # the coordinator ledger's path
    elapsed_seconds: float | None = None  # since the ServerApp started, at the last write
    plan: PlanStatus | None = _omitted_when_none()  # absent until the plan is made
    holders: dict[str, HolderStatus] = _of(HolderStatus, dict)  # the planned holders, by holder id
    skipped: dict[str, str] = field(default_factory=dict)  # holder id (or "node-<id>") -> why it was left out
    rounds: list[RoundRecord] = _of(RoundRecord, list)
    checkpoints: list[str] = field(default_factory=list)  # each round's global model, in order
    adapter: str | None = None  # the PEFT adapter directory of a LoRA run's final model
    adapter_error: str | None = _omitted_when_none()  # why no adapter was written (the final weights are)
    resumed: ResumeStatus | None = _omitted_when_none()
    # An audit run's bounds per holder and pooled, and whether they stay below the certified epsilon
    # (ewtune.coordinator.federated_audit); absent in a training run.
    audit: dict[str, Any] | None = _omitted_when_none()

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, document: Any) -> "RunStatus":
        """A status of any stage of a run; anything that is not a JSON object reads as an empty status."""
        return _from_json(cls, document if isinstance(document, dict) else {})

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def _to_json(record: Any) -> Any:
    if dataclasses.is_dataclass(record):
        return {
            f.name: _to_json(getattr(record, f.name))
            for f in dataclasses.fields(record)
            if not (f.metadata.get("omit_none") and getattr(record, f.name) is None)
        }
    if isinstance(record, dict):
        return {str(key): _to_json(value) for key, value in record.items()}
    if isinstance(record, (list, tuple)):
        return [_to_json(value) for value in record]
    if isinstance(record, (np.floating, np.integer)):
        return record.item()
    if isinstance(record, Path):
        return str(record)
    return record


_NESTED = {"plan": PlanStatus, "resumed": ResumeStatus}


def _from_json(kind: type, document: dict[str, Any]) -> Any:
    values = {}
    for f in dataclasses.fields(kind):
        if f.name not in document:
            continue
        value = document[f.name]
        nested, of = _NESTED.get(f.name) if kind is RunStatus else None, f.metadata.get("of")
        if nested is not None and isinstance(value, dict):
            value = _from_json(nested, value)
        elif of is not None and isinstance(value, dict):
            value = {key: _from_json(of, item) for key, item in value.items() if isinstance(item, dict)}
        elif of is not None and isinstance(value, list):
            value = [_from_json(of, item) for item in value if isinstance(item, dict)]
        values[f.name] = value
    return kind(**values)


def status_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / STATUS_FILE


def write_status(output_dir: Path, status: RunStatus) -> None:
    """Replace ``output_dir/status.json`` atomically: a reader sees the previous status or this one, whole."""
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / (STATUS_FILE + ".partial")
    partial.write_text(json.dumps(status.to_json(), indent=2, sort_keys=True))
    os.replace(partial, output_dir / STATUS_FILE)


def read_status(output_dir: str | os.PathLike) -> RunStatus | None:
    """The last status written in ``output_dir``, or None when there is none (or it cannot be read)."""
    try:
        document = json.loads(status_path(output_dir).read_text())
    except (OSError, ValueError):
        return None
    return RunStatus.from_json(document) if isinstance(document, dict) else None
