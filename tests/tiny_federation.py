"""What the tests that start a real federation of tiny-BERT holders (ewtune.local_federation) share: the holders'
LoRA training settings, holders on disjoint shares of the MR sentences with the initial global weights, and the
ledgers read back after each has been verified against its pinned key, and the processes a Flower process started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ewtune.accountant.crosscheck import read_entries
from ewtune.accountant.verify import verify_ledger
from ewtune.local_federation import HolderSetup, initial_weights, partition_csv

MINIMAL_FEDERATION_TOML = """
[federation]
name = "t"
rounds = 2
local_steps = 3
expected_batch_size = 10
clip_norm = 1.0
learning_rate = 0.1
target_epsilon = 8.0
delta = 1e-5
[coordinator]
ledger = "ledger.jsonl"
signing_key = "coordinator.key"
output_dir = "out"
registry = "supernodes.json"
[model]
initial_weights = "initial.safetensors"
"""
"""A federation.toml with every required key and paths relative to its folder, for the command-line tests."""


def lora_training(model_dir: Path) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir), "max_length": 32, "mode": "lora", "lora_rank": 4,
        "lora_target_modules": ["query", "value"], "physical_batch_size": 32, "eval_fraction": 0.2,
    }


def mr_holders(model_dir: Path, mr_csv: Path, work: Path, budgets: dict[str, float]) -> tuple[list[HolderSetup], Path]:
    """One holder per entry of ``budgets`` (holder id -> lifetime epsilon), each with its share of the MR sentences,
    and the initial global weights (``work/initial.safetensors``)."""
    names = list(budgets)
    partitions = partition_csv(mr_csv, work / "data", len(names), names)
    training = lora_training(model_dir)
    holders = [HolderSetup(name, path, budget_epsilon=budgets[name], training=training) for name, path in zip(names, partitions)]
    return holders, initial_weights(model_dir, work / "initial.safetensors", training)


def verified_ledgers(work: Path, credentials) -> tuple[Any, dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(the coordinator's verification report, each holder's, each holder's entries); every ledger must verify."""
    report = verify_ledger(work / "coordinator" / "ledger.jsonl", credentials.coordinator_ledger_public_key)
    assert report.ok, report.summary()
    reports, entries = {}, {}
    for holder_id, holder in credentials.holders.items():
        path = work / "holders" / holder_id / "ledger.jsonl"
        reports[holder_id] = verify_ledger(path, holder.ledger_public_key)
        assert reports[holder_id].ok, reports[holder_id].summary()
        entries[holder_id] = read_entries(path)
    return report, reports, entries


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _serverapps(superlink_pid: int) -> list[int]:
    """The ``flwr-serverapp`` processes below a SuperLink."""
    pids = []
    for pid in descendants(superlink_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"flwr-serverapp" in command:
            pids.append(pid)
    return pids

