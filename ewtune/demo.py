"""``ewtune demo``: a real federation on one machine, loopback only.

It generates the coordinator's credentials, lets each holder generate its own keys in its own folder and
registers their public cards, starts a Flower SuperLink (TLS, SuperNode authentication), three agent daemons
with their SuperNodes, each holding its own partition of the Rotten Tomatoes polarity sentences (MR), and
runs a few rounds of LoRA fine-tuning of all-MiniLM-L6-v2 with DP-SGD at a certified target epsilon of 8
(delta 1e-5). At the end it verifies every ledger (the coordinator's and each holder's), cross-checks them,
and prints per holder: the certified epsilon (the guarantee), the Edgeworth estimate and RDP beside it, the
rounds, and the accuracy of the global model after each round on the holder's held-out split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOLDERS = ("hospital-a", "bank-b", "clinic-c")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end (progress goes to stderr)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--local-steps", type=int, default=8, help="DP-SGD steps per holder per round (default 8)")
    parser.add_argument("--batch-size", type=float, default=32, help="expected (Poisson) batch size (default 32)")
    parser.add_argument("--rows-per-holder", type=int, default=600, help="MR sentences per holder (default 600)")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="certified target epsilon (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=40, help="tokens per sentence (default 40)")
    parser.add_argument("--work-dir", help="where credentials, ledgers, logs and checkpoints go (default: a new temporary directory, kept)")


def run(args: argparse.Namespace) -> int:
    from accountant.errors import InvalidInputError

    for name in ("rounds", "local_steps", "rows_per_holder", "max_length"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1")
    progress = _printer(sys.stderr if args.json else sys.stdout)
    started = time.monotonic()
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="ewtune-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise InvalidInputError(f"--work-dir {work} is not empty")
    progress(f"ewtune demo: 3 holders, {args.rounds} rounds of LoRA DP-SGD on MiniLM + MR at certified epsilon {args.target_epsilon:g} "
             f"(delta {args.delta:g}); working in {work}")
    result = run_federation(work, args, progress)
    result["wall_seconds"] = time.monotonic() - started
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(report(result))
    return 0 if result["state"] in ("finished", "stopped") and result["ledger_verified"] else 1


def run_federation(work: Path, args: argparse.Namespace, progress) -> dict[str, Any]:
    from agent.assets import minilm_model_dir, write_mr_csv
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

    source = write_mr_csv(work / "data" / "mr.csv", max_rows=args.rows_per_holder * len(HOLDERS), seed=0)
    partitions = partition_csv(source, work / "data", len(HOLDERS), HOLDERS)
    model_dir = minilm_model_dir()
    training = {
        "model_dir": str(model_dir),
        "task": "classification",
        "max_length": args.max_length,
        "mode": "lora",
        "lora_rank": 8,
        "lora_alpha": 16.0,
        "lora_target_modules": ["query", "key", "value"],
        "physical_batch_size": 32,
        "eval_fraction": 0.2,
        "seed": 0,
    }
    holders = [HolderSetup(holder, path, args.target_epsilon, args.delta, training) for holder, path in zip(HOLDERS, partitions)]
    progress("writing the initial global weights (LoRA factors and classifier head)")
    weights = initial_weights(model_dir, work / "coordinator" / "initial.safetensors", training)
    job = FederationJob(
        federation={
            "name": "demo",
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "expected_batch_size": args.batch_size,
            "clip_norm": args.clip_norm,
            "learning_rate": args.learning_rate,
            "target_epsilon": args.target_epsilon,
            "delta": args.delta,
            "min_holders": 2,
            "expected_holders": len(HOLDERS),
        },
        model={"initial_weights": str(weights), "base_model_dir": str(model_dir), "mode": "lora", "task": "classification", "lora_alpha": 16.0},
        timeouts={"nodes": 300, "query": 120, "round": 1200, "evaluate": 600},
    )
    with LocalFederation(work, holders, log=progress) as federation:
        federation.start()
        progress("loading MiniLM and the data in each daemon")
        federation.wait_for_daemons()
        progress("submitting the federated run (flwr run)")
        status = federation.run(job, on_status=_progress_from_status(progress))
    progress("all processes stopped; verifying the ledgers")
    return _result(work, status, federation.credentials)


def _result(work: Path, status: dict[str, Any], credentials) -> dict[str, Any]:
    from accountant.verify import verify_ledger
    from coordinator.ledger_crosscheck import cross_check, read_entries

    coordinator_ledger = work / "coordinator" / "ledger.jsonl"
    reports = {"coordinator": verify_ledger(coordinator_ledger, credentials.coordinator_ledger_public_key)}
    holder_ledgers = {h: work / "holders" / h / "ledger.jsonl" for h in credentials.holders}
    for holder_id, path in holder_ledgers.items():
        reports[holder_id] = verify_ledger(path, credentials.holders[holder_id].ledger_public_key)
    check = cross_check(read_entries(coordinator_ledger), {h: read_entries(p) for h, p in holder_ledgers.items()})
    holders = []
    for holder_id, holder in sorted(status.get("holders", {}).items()):
        own = reports[holder_id].holders.get(holder_id)
        holders.append(
            {
                "holder_id": holder_id,
                "epsilon_certified": holder.get("epsilon_certified"),
                "epsilon_edgeworth_estimate": holder.get("epsilon_edgeworth_estimate"),
                "epsilon_rdp": holder.get("epsilon_rdp"),
                "holder_ledger_epsilon_certified": None if own is None else own.epsilon_certified,
                "budget_epsilon": holder.get("budget_epsilon"),
                "delta": holder.get("budget_delta"),
                "noise_multiplier": holder.get("noise_multiplier"),
                "sampling_rate": holder.get("sampling_rate"),
                "dataset_size": holder.get("dataset_size"),
                "rounds": holder.get("rounds_committed"),
                "accuracy": holder.get("accuracy", {}),
            }
        )
    return {
        "work_dir": str(work),
        "run_id": status.get("run_id"),
        "state": status.get("state"),
        "reason": status.get("reason"),
        "rounds_completed": status.get("rounds_completed"),
        "holders": holders,
        "skipped": status.get("skipped", {}),
        "rounds": [{k: r[k] for k in ("round", "seconds", "slowest_train_seconds", "overhead_seconds")} for r in status.get("rounds", [])],
        "ledgers": {name: {"ok": r.ok, "summary": r.summary()} for name, r in reports.items()},
        "cross_check": {"ok": check.ok, "matched_commits": check.matched, "mismatches": check.mismatches, "not_aggregated": check.not_aggregated},
        "ledger_verified": all(r.ok for r in reports.values()) and check.ok,
        "adapter": status.get("adapter"),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "",
        f"run {result['run_id']}: {result['state']}" + (f" ({result['reason']})" if result.get("reason") else "")
        + f", {result['rounds_completed']} round(s), {result['wall_seconds']:.0f} s wall",
        "",
        "| holder | records | sigma | certified eps (guarantee) | Edgeworth eps (estimate) | RDP eps | budget | rounds | accuracy after round 0 (initial), 1, 2, ... |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for holder in result["holders"]:
        accuracy = ", ".join(f"{a:.3f}" for _, a in sorted(holder["accuracy"].items(), key=lambda item: int(item[0])))
        lines.append(
            f"| {holder['holder_id']} | {holder['dataset_size']} | {_fmt(holder['noise_multiplier'])} | {_fmt(holder['epsilon_certified'])} | "
            f"{_fmt(holder['epsilon_edgeworth_estimate'])} | {_fmt(holder['epsilon_rdp'])} | {_fmt(holder['budget_epsilon'])} | "
            f"{holder['rounds']} | {accuracy or '-'} |"
        )
    lines.append(f"\ndelta {result['holders'][0]['delta']:g} per holder; the certified epsilon is the recorded and enforced bound, "
                 "the Edgeworth value is an estimate shown beside it." if result["holders"] else "")
    lines.append("")
    for name, ledger in result["ledgers"].items():
        lines.append(f"{'OK    ' if ledger['ok'] else 'FAILED'} {ledger['summary']}")
    check = result["cross_check"]
    lines.append(
        f"{'OK    ' if check['ok'] else 'FAILED'} cross-check: {check['matched_commits']} coordinator commit(s) match the holders' ledgers"
        + "".join(f"\n       mismatch: {m}" for m in check["mismatches"])
        + "".join(f"\n       spent by a holder but not aggregated: {m}" for m in check["not_aggregated"])
    )
    if result.get("adapter"):
        lines.append(f"PEFT adapter of the final global model: {result['adapter']}")
    lines.append(f"ledgers, logs and checkpoints: {result['work_dir']}")
    return "\n".join(lines)


def _progress_from_status(progress):
    seen: set[Any] = set()

    def on_status(status: dict[str, Any]) -> None:
        for holder_id, holder in sorted(status.get("holders", {}).items()):
            if ("plan", holder_id) not in seen:
                seen.add(("plan", holder_id))
                progress(f"  plan for {holder_id}: {holder['dataset_size']} records, q={holder['sampling_rate']:.4f}, sigma={holder['noise_multiplier']:.4f}, "
                         f"certified epsilon after the plan {holder['planned_epsilon_certified']:.3f}")
        for holder_id, reason in status.get("skipped", {}).items():
            if ("skip", holder_id) not in seen:
                seen.add(("skip", holder_id))
                progress(f"  skipped {holder_id}: {reason}")
        for record in status.get("rounds", []):
            if ("round", record["round"]) not in seen:
                seen.add(("round", record["round"]))
                epsilons = ", ".join(
                    f"{h} {status['holders'][h]['epsilon_certified']:.2f}" for h in sorted(status["holders"]) if status["holders"][h].get("epsilon_certified") is not None
                )
                committed = sum(1 for o in record["holders"].values() if o["status"] == "committed")
                progress(f"  round {record['round']}/{status['rounds_planned']}: {committed} verified update(s) aggregated in {record['seconds']:.0f} s; "
                         f"certified epsilon so far: {epsilons}")
        for holder_id, holder in sorted(status.get("holders", {}).items()):
            for round, accuracy in holder.get("accuracy", {}).items():
                if ("accuracy", holder_id, round) not in seen:
                    seen.add(("accuracy", holder_id, round))
                    progress(f"    {holder_id}: accuracy of the global model after round {round}: {accuracy:.3f}")

    return on_status


def _printer(stream):
    def progress(text: str) -> None:
        print(text, file=stream, flush=True)

    return progress


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
