"""``ewtune bench federation``: coordination overhead per round with three holders on loopback.

Overhead of a round = its wall time at the coordinator (reserve, send, wait for every reply, verify receipts,
aggregate, commit, checkpoint) minus the slowest holder's local DP-SGD time in that round, read from the
holder's own ledger (its reserve -> commit time for the round). Holders do not release their training time
in their replies (it would leak their Poisson batch sizes); on this one machine the benchmark can read their
ledgers instead. One real federation (TLS SuperLink with SuperNode authentication, three agent daemons with
SuperNodes, MiniLM + MR, LoRA) runs the same plan twice on the same processes:

- ``tuned``: the weights travel packed in one buffer per message (:mod:`federation.packing`) and the
  coordinator pulls replies itself every 0.1 s;
- ``flower-defaults`` (the baseline): one Flower ``Array`` per tensor, as ``ArrayRecord(state_dict)`` sends
  them, and replies pulled every 3 s, as ``Grid.send_and_receive`` does in flwr 1.42.

Both use the torch-free ClientApp shim in front of a long-lived daemon (the model stays loaded), SuperExec
polling every 0.1 s, and no evaluation during the rounds.

The table gives medians over rounds and the ratio baseline / tuned; the JSON keeps every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGURATIONS = {"tuned": (0.1, True), "flower-defaults": (3.0, False)}  # name -> (reply polling interval (s), packed weights)
GOAL_SECONDS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=4, help="rounds per configuration (default 4)")
    parser.add_argument("--local-steps", type=int, default=2, help="DP-SGD steps per holder per round (default 2)")
    parser.add_argument("--batch-size", type=float, default=8, help="expected batch size (default 8)")
    parser.add_argument("--rows-per-holder", type=int, default=200)
    parser.add_argument("--output", default="benchmarks/results/federation", help="writes OUTPUT.md and OUTPUT.json")
    parser.add_argument("--work-dir", help="keep credentials, ledgers and logs here (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    from accountant.errors import InvalidInputError

    if args.rounds < 1 or args.local_steps < 1:
        raise InvalidInputError("--rounds and --local-steps must be >= 1")
    load_before = os.getloadavg()
    started = time.monotonic()
    if args.work_dir:
        statuses = _measure(Path(args.work_dir).resolve(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="ewtune-bench-federation-") as work:
            statuses = _measure(Path(work), args)
    results = {name: _summary(status) for name, status in statuses.items()}
    document = {
        "benchmark": "federation",
        "command": "ewtune bench federation " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if k in ("rounds", "local_steps", "batch_size", "rows_per_holder")),
        "definition": "overhead per round = round wall time at the coordinator - slowest holder's reserve->commit time in its own ledger",
        "holders": 3,
        "goal_seconds": GOAL_SECONDS,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "wall_seconds": time.monotonic() - started,
        "configurations": results,
        "ratio_baseline_over_tuned": _ratio(results),
    }
    markdown = _markdown(document)
    print(markdown)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown + "\n")
    return 0


def _measure(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from agent.assets import minilm_model_dir, write_mr_csv
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

    names = ("holder-a", "holder-b", "holder-c")
    source = write_mr_csv(work / "data" / "mr.csv", max_rows=args.rows_per_holder * len(names), seed=0)
    partitions = partition_csv(source, work / "data", len(names), names)
    model_dir = minilm_model_dir()
    training = {"model_dir": str(model_dir), "max_length": 32, "mode": "lora", "lora_rank": 8, "lora_target_modules": ["query", "key", "value"], "physical_batch_size": 16, "eval_fraction": 0.1}
    # A large lifetime budget: both configurations run a plan at epsilon 4 against the same ledgers.
    holders = [HolderSetup(name, path, budget_epsilon=100.0, training=training) for name, path in zip(names, partitions)]
    weights = initial_weights(model_dir, work / "initial.safetensors", training)
    statuses = {}
    with LocalFederation(work, holders, log=print) as federation:
        federation.start()
        federation.wait_for_daemons()
        for name, (poll_interval, packed) in CONFIGURATIONS.items():
            job = FederationJob(
                federation={
                    "name": f"bench-{name}", "rounds": args.rounds, "local_steps": args.local_steps, "expected_batch_size": args.batch_size,
                    "clip_norm": 1.0, "learning_rate": 0.003, "target_epsilon": 4.0, "delta": 1e-5, "min_holders": 3, "expected_holders": 3,
                },
                model={"initial_weights": str(weights), "mode": "lora", "evaluate": "never", "pack_weights": packed},
                timeouts={"nodes": 300, "query": 120, "round": 600, "poll_interval": poll_interval},
            )
            print(f"running {args.rounds} rounds ({name}: replies polled every {poll_interval:g} s, weights {'packed' if packed else 'one object per tensor'})", flush=True)
            status = federation.run(job, name=name, timeout=3600)
            if status.get("state") != "finished":
                raise RuntimeError(f"the {name} run ended {status.get('state')}: {status.get('reason')}")
            status["breakdown"] = ledger_breakdown(work, status["run_id"], names)
            statuses[name] = status
    return statuses


def ledger_breakdown(work: Path, run_id: str, holders) -> list[dict[str, Any]]:
    """Per round and holder, from the ledgers' timestamps (one clock, one machine): ``deliver`` = coordinator
    reserve -> holder reserve (Flower delivery, the ClientApp process start, the daemon's plan and budget
    checks), ``train`` = holder reserve -> holder commit (DP-SGD and the holder's ledger), ``return`` = holder
    commit -> coordinator commit (Flower's return path, receipt checks, aggregation, earlier commits)."""
    from datetime import datetime

    from coordinator.ledger_crosscheck import read_entries

    def seconds(entry):
        return datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()

    def by_round(entries, holder):
        reserves = {e["seq"]: e for e in entries if e["kind"] == "reserve" and e["payload"]["run_id"] == run_id and e["payload"].get("holder", holder) == holder}
        commits = {e["payload"]["reservation"]: e for e in entries if e["kind"] == "commit" and e["payload"]["reservation"] in reserves}
        return {reserves[seq]["payload"]["round"]: (reserves[seq], commit) for seq, commit in commits.items()}

    coordinator = read_entries(work / "coordinator" / "ledger.jsonl")
    rows = []
    for holder in holders:
        own = by_round(read_entries(work / "holders" / holder / "ledger.jsonl"), holder)
        for round, (reserve, commit) in sorted(by_round(coordinator, holder).items()):
            if round in own:
                held_reserve, held_commit = own[round]
                rows.append({
                    "round": round, "holder": holder,
                    "deliver_seconds": seconds(held_reserve) - seconds(reserve),
                    "train_seconds": seconds(held_commit) - seconds(held_reserve),
                    "return_seconds": seconds(commit) - seconds(held_commit),
                })
    return rows


def round_overheads(rounds: list[dict[str, Any]], breakdown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: its wall time at the coordinator, the slowest holder's training time from the ledgers
    (:func:`ledger_breakdown`'s ``train_seconds``, holder reserve -> holder commit) and their difference;
    a round with no ledger row has None for both."""
    slowest: dict[int, float] = {}
    for row in breakdown:
        slowest[row["round"]] = max(slowest.get(row["round"], 0.0), row["train_seconds"])
    result = []
    for record in rounds:
        train = slowest.get(record["round"])
        result.append({
            "round": record["round"],
            "seconds": record["seconds"],
            "slowest_train_seconds": train,
            "overhead_seconds": None if train is None else record["seconds"] - train,
        })
    return result


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    breakdown = status.get("breakdown", [])
    rounds = round_overheads(status["rounds"], breakdown)
    overheads = [r["overhead_seconds"] for r in rounds if r["overhead_seconds"] is not None]
    if not overheads:
        raise RuntimeError(f"run {status['run_id']}: no holder ledger recorded a committed round")
    return {
        "run_id": status["run_id"],
        "breakdown": breakdown,
        **{f"median_{part}_seconds": statistics.median(row[f"{part}_seconds"] for row in breakdown) for part in ("deliver", "train", "return") if breakdown},
        "rounds": rounds,
        "median_round_seconds": statistics.median(r["seconds"] for r in rounds),
        "median_slowest_train_seconds": statistics.median(r["slowest_train_seconds"] for r in rounds if r["slowest_train_seconds"] is not None),
        "median_overhead_seconds": statistics.median(overheads),
        "min_overhead_seconds": min(overheads),
        "max_overhead_seconds": max(overheads),
    }


def _ratio(results: dict[str, dict[str, Any]]) -> float | None:
    tuned, baseline = results.get("tuned"), results.get("flower-defaults")
    if not tuned or not baseline or tuned["median_overhead_seconds"] <= 0:
        return None
    return baseline["median_overhead_seconds"] / tuned["median_overhead_seconds"]


def _markdown(document: dict[str, Any]) -> str:
    lines = [
        "## Federation: coordination overhead per round (3 holders, loopback, TLS + SuperNode auth)",
        "",
        f"`{document['command']}`; {document['definition']}; goal <= {document['goal_seconds']:g} s.",
        f"Load average before/after (1, 5, 15 min): {_load(document['load_average_before'])} / {_load(document['load_average_after'])} on {document['cpu_count']} CPUs.",
        "",
        "| configuration | rounds | median round (s) | median slowest local training (s) | median overhead (s) | min-max overhead (s) | median deliver / train / return per holder (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in document["configurations"].items():
        lines.append(
            f"| {name} | {len(result['rounds'])} | {result['median_round_seconds']:.2f} | {result['median_slowest_train_seconds']:.2f} | "
            f"{result['median_overhead_seconds']:.2f} | {result['min_overhead_seconds']:.2f}-{result['max_overhead_seconds']:.2f} | "
            f"{result.get('median_deliver_seconds', float('nan')):.1f} / {result.get('median_train_seconds', float('nan')):.1f} / {result.get('median_return_seconds', float('nan')):.1f} |"
        )
    ratio = document["ratio_baseline_over_tuned"]
    lines.append("")
    lines.append(f"Ratio flower-defaults / tuned (median overhead): {ratio:.2f}" if ratio else "Ratio: n/a")
    lines.append("")
    lines.append("deliver = coordinator reserve -> holder reserve (Flower delivery, ClientApp process start, the daemon's plan and "
                 "budget checks); train = holder reserve -> holder commit; return = holder commit -> coordinator commit "
                 "(Flower's return path, receipt checks, aggregation). Times from the ledgers' timestamps.")
    return "\n".join(lines)


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
