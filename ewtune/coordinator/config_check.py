"""``federation.toml`` checked as a whole before a run is submitted (``ewtune config check``, ``ewtune
coordinator run``): every table and key against the dataclasses the loader builds
(:mod:`ewtune.accountant.config_check`), the timeouts' ranges, then what the file names: the coordinator's ledger
key (readable by its owner only), the holder registry and the initial weights (readable), the base model
directory (a Hugging Face ``config.json``), the ledger's and output's directories (writable).
"""

from __future__ import annotations

import dataclasses
import math
import os

from ewtune.accountant.config_check import (
    Problems,
    check_dataclass_table,
    check_directory,
    check_keys,
    check_parent_writable,
    check_readable_file,
    check_tables,
    key_name,
    section,
)
from ewtune.accountant.errors import EwtuneError
from ewtune.accountant.tomlfiles import read_toml
from ewtune.coordinator.config import AuditSettings, ModelConfig, Timeouts, load_federation_config
from ewtune.coordinator.planner import FederationSettings
from ewtune.federation.contract import TASKS

TABLES = ("federation", "coordinator", "model")
OPTIONAL_TABLES = ("timeouts", "audit")
COORDINATOR_KEYS = ("id", "ledger", "signing_key", "registry", "output_dir")
VALID_SETTINGS = {"rounds": 1, "local_steps": 1, "expected_batch_size": 1.0, "clip_norm": 1.0, "learning_rate": 1.0,
                  "target_epsilon": 1.0, "delta": 1e-6}
# Timeouts that may be zero (run_deadline = 0: no deadline); the others must be > 0.
MAY_BE_ZERO = ("run_deadline",)


def check_federation_config(path: str | os.PathLike) -> Problems:
    """Every problem of the federation.toml at ``path`` (an unreadable or non-TOML file raises at once)."""
    document, path = read_toml(path)
    problems, base = Problems(path), path.parent
    check_tables(document, TABLES, OPTIONAL_TABLES, problems)
    federation = dict(section(document, "federation"))
    extra = {key: federation.pop(key) for key in ("name", "expected_holders") if key in federation}
    check_dataclass_table(FederationSettings, federation, "federation", problems, base=VALID_SETTINGS)
    expected = extra.get("expected_holders")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 1):
        problems.add(key_name("federation", "expected_holders"), f"must be an integer >= 1, got {expected!r}")
    coordinator = section(document, "coordinator")
    check_keys(coordinator, "coordinator", COORDINATOR_KEYS, problems, required=COORDINATOR_KEYS[1:])
    check_readable_file(coordinator, "coordinator", "signing_key", base, problems, private=True)
    check_readable_file(coordinator, "coordinator", "registry", base, problems)
    check_parent_writable(coordinator, "coordinator", "ledger", base, problems)
    check_parent_writable(coordinator, "coordinator", "output_dir", base, problems)
    model = section(document, "model")
    check_dataclass_table(ModelConfig, model, "model", problems, base={"initial_weights": ""})
    check_readable_file(model, "model", "initial_weights", base, problems)
    check_directory(model, "model", "base_model_dir", base, problems, must_contain="config.json")
    if model.get("task", "classification") not in TASKS:  # the final adapter is written for this task
        problems.add(key_name("model", "task"), f"must be one of {', '.join(TASKS)}, got {model['task']!r}")
    if "audit" in document:
        check_dataclass_table(AuditSettings, section(document, "audit"), "audit", problems)
    timeouts = section(document, "timeouts")
    check_dataclass_table(Timeouts, timeouts, "timeouts", problems)
    _check_timeouts(timeouts, problems)
    if not problems.found:
        try:  # what the dataclasses cannot see (rules between tables)
            load_federation_config(path)
        except EwtuneError as error:
            problems.add("[file]", str(error).removeprefix(f"{path}: "))
    return problems


def _check_timeouts(values, problems: Problems) -> None:
    for item in dataclasses.fields(Timeouts):
        value = values.get(item.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent, or of the wrong type (reported already)
        low_ok = value >= 0 if item.name in MAY_BE_ZERO else value > 0
        if not (low_ok and math.isfinite(value)):
            bound = ">= 0" if item.name in MAY_BE_ZERO else "> 0"
            problems.add(key_name("timeouts", item.name), f"must be a finite number of seconds {bound}, got {value!r}")
