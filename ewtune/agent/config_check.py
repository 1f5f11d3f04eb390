"""``agent.toml`` checked as a whole before the daemon starts (``ewtune config check``, ``ewtune agent init``
and ``start``): every table and key against the dataclasses the loader builds (:mod:`ewtune.accountant.config_check`),
then what the file names: the model directory (a Hugging Face ``config.json``), the data file (readable; the
budget's delta below 1/N for its N records), the ledger key (readable by its owner only), the ledger's
directory (writable), the SuperNode's certificate and key. Every problem is reported at once.

Imports neither torch, transformers, pandas nor flwr for a valid file (a data file the light count cannot vouch
for is read by the loader, see :func:`_records`), so the check answers at once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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
from ewtune.accountant.privacy_accountant import delta_too_large
from ewtune.accountant.tomlfiles import read_toml
from ewtune.agent.audit.holder_config import AuditHolderConfig
from ewtune.agent.policy import HolderPolicy, SuperNodeConfig, load_agent_config
from ewtune.agent.record_count import count_records
from ewtune.agent.training_config import TrainingConfig

TABLES = ("holder", "budget", "ledger", "rpc")
OPTIONAL_TABLES = ("policy", "supernode", "training", "audit")  # one of training and audit (an audit daemon)
VALID_BUDGET = {"budget_epsilon": 1.0, "budget_delta": 1e-6}


def check_agent_config(path: str | os.PathLike) -> Problems:
    """Every problem of the agent.toml at ``path`` (an unreadable or non-TOML file raises at once)."""
    document, path = read_toml(path)
    problems, base = Problems(path), path.parent
    check_tables(document, TABLES, OPTIONAL_TABLES, problems)
    holder = section(document, "holder")
    check_keys(holder, "holder", ("id",), problems, required=("id",))
    if "id" in holder and (not isinstance(holder["id"], str) or not holder["id"]):
        problems.add(key_name("holder", "id"), f"must be a non-empty string, got {holder['id']!r}")
    budget = section(document, "budget")
    check_dataclass_table(HolderPolicy, budget, "budget", problems, base=VALID_BUDGET,
                          keys={"epsilon": "budget_epsilon", "delta": "budget_delta"})
    check_dataclass_table(HolderPolicy, section(document, "policy"), "policy", problems, base=VALID_BUDGET,
                          exclude=tuple(VALID_BUDGET))
    ledger = section(document, "ledger")
    check_keys(ledger, "ledger", ("path", "signing_key", "head"), problems, required=("path", "signing_key"))
    check_parent_writable(ledger, "ledger", "path", base, problems)
    check_parent_writable(ledger, "ledger", "head", base, problems)
    check_readable_file(ledger, "ledger", "signing_key", base, problems, private=True)
    check_keys(section(document, "rpc"), "rpc", ("address", "max_message_mb"), problems)
    if "audit" in document:
        check_dataclass_table(AuditHolderConfig, section(document, "audit"), "audit", problems,
                              base={"block": 2**62, "first": 0, "count": 2})
    else:
        _check_training(section(document, "training"), budget, base, problems)
    if "supernode" in document:
        _check_supernode(section(document, "supernode"), base, problems)
    if not problems.found:
        try:  # what the dataclasses cannot see (rules between tables, keys that are gone)
            load_agent_config(path)
        except EwtuneError as error:
            problems.add("[file]", str(error).removeprefix(f"{path}: "))
    return problems


def _check_training(training, budget, base: Path, problems: Problems) -> None:
    if not training:
        problems.add(key_name("training"), "missing table (or [audit] for an audit daemon)")
        return
    check_dataclass_table(TrainingConfig, training, "training", problems,
                          base={"model_dir": "", "data_file": ""}, exclude=("insecure_seeded_randomness",))
    check_directory(training, "training", "model_dir", base, problems, must_contain="config.json")
    data_file = check_readable_file(training, "training", "data_file", base, problems)
    if data_file is not None and isinstance(budget.get("delta"), float):
        _check_delta_against_records(data_file, training, budget["delta"], problems)


def _check_delta_against_records(data_file: Path, training, delta: float, problems: Problems) -> None:
    """The budget's delta must be below 1/N for the N records the data file holds (at most ``max_examples``)."""
    try:
        records = _records(data_file)
    except (EwtuneError, OSError, ValueError) as error:
        problems.add(key_name("training", "data_file"), f"cannot read the examples of {data_file}: {error}")
        return
    if isinstance(training.get("max_examples"), int):
        records = min(records, training["max_examples"])
    if records < 1:
        problems.add(key_name("training", "data_file"), f"{data_file} holds no examples")
        return
    too_large = delta_too_large(delta, records)
    if too_large:
        problems.add(key_name("budget", "delta"), f"{too_large} (N: the {records} records of {data_file})")


def _records(data_file: Path) -> int:
    """The records of ``data_file``: counted alone (:mod:`ewtune.agent.record_count`), or, for a file that count
    cannot vouch for, read by the loader, whose error is then the problem reported."""
    records = count_records(data_file)
    if records is None:
        # deferred: the loader imports torch, transformers and datasets (7 s); only such a file needs it
        from ewtune.agent.data import read_table

        records = len(read_table(str(data_file)))
    return records


def _check_supernode(values, base: Path, problems: Problems) -> None:
    if values.get("insecure") is True:  # no TLS (tests): neither the certificate nor the key is needed
        values = {"root_certificates": None, "auth_private_key": None, **values}
    keys = {item.name: item.name for item in dataclasses.fields(SuperNodeConfig) if item.name != "extra_node_config"}
    check_dataclass_table(SuperNodeConfig, values, "supernode", problems,
                          base={"superlink": "", "root_certificates": None, "auth_private_key": None},
                          keys={**keys, "node_config": "extra_node_config"})
    check_readable_file(values, "supernode", "root_certificates", base, problems)
    check_readable_file(values, "supernode", "auth_private_key", base, problems, private=True)
