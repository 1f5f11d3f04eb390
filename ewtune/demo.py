"""``ewtune demo``: a real federation on one machine, loopback only.

It generates the coordinator's credentials, lets each holder generate its own keys in its own folder and
registers their public cards, starts a Flower SuperLink (TLS, SuperNode authentication), three agent daemons
with their SuperNodes, each holding its own quarter of the Rotten Tomatoes polarity sentences (MR), and runs
federated linear probing of all-MiniLM-L6-v2 with DP-SGD at a certified target epsilon of 8 (delta 1e-5): a
linear head on the mean-pooled sentence embedding, trained on embeddings each daemon computes once, with the
probe recipe of ewtune/agent/recipe.py (expected batch 1024, SGD at learning rate 4, 20 epochs over the rounds: 13 local
steps a round). At the end it verifies every ledger (the coordinator's and each holder's), cross-checks them,
and prints per holder: the certified epsilon (the guarantee), the Edgeworth estimate and RDP beside it, and the
rounds. Holders release no evaluation metrics (their default policy), so the demo measures the global model
itself: after each round, on a fourth share of MR that it keeps and no holder sees, with macro F1 and the
majority-class baseline beside the accuracy, so that nobody mistakes the class prior for learning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.recipe import Recipe

HOLDERS = ("hospital-a", "bank-b", "clinic-c")
TEST_SPLIT = "demo-held-out"  # the demo's own share of MR: no holder sees it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.federation.progress import add_quiet_flag

    parser.add_argument("--json", action="store_true", help="print one JSON object at the end on stdout; progress as JSON lines on stderr")
    add_quiet_flag(parser)
    recipe = Recipe()
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--local-steps", type=int,
                        help=f"DP-SGD steps per holder per round (default: the probe recipe's {recipe.probe_epochs:g} epochs over the rounds)")
    parser.add_argument("--batch-size", type=float, default=recipe.probe_expected_batch,
                        help=f"expected (Poisson) batch size (default {recipe.probe_expected_batch}, the probe recipe's)")
    parser.add_argument("--rows-per-holder", type=int, default=3188,
                        help="MR sentences per holder and for the demo's own held-out share (default 3188: all of MR in quarters)")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="certified target epsilon (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--learning-rate", type=float, default=recipe.probe_learning_rate,
                        help=f"SGD learning rate (default {recipe.probe_learning_rate:g}, the probe recipe's)")
    parser.add_argument("--clip-norm", type=float, default=recipe.clip_norm)
    parser.add_argument("--max-length", type=int, default=40, help="tokens per sentence (default 40)")
    parser.add_argument("--status-port", type=int, metavar="PORT",
                        help="serve the read-only status page on 127.0.0.1:PORT while the run goes on")
    parser.add_argument("--work-dir", help="where credentials, ledgers, logs and checkpoints go (default: a new temporary directory, kept)")


def run(args: argparse.Namespace) -> int:
    for name in ("rounds", "local_steps", "rows_per_holder", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.batch_size > 0:
        raise InvalidInputError("--batch-size must be > 0")
    if args.local_steps is None:
        args.local_steps = recipe_local_steps(args.rounds, args.rows_per_holder, args.batch_size)
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.federation.progress import Progress

    reporter = Progress.from_args(args)
    progress = reporter.printer("demo")
    started = time.monotonic()
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="ewtune-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise InvalidInputError(f"--work-dir {work} is not empty")
    progress(f"ewtune demo: 3 holders, {args.rounds} rounds of DP-SGD linear probing of MiniLM on MR at certified epsilon {args.target_epsilon:g} "
             f"(delta {args.delta:g}); working in {work}")
    with reporter:
        result = run_federation(work, args, reporter)
    result["wall_seconds"] = time.monotonic() - started
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(report(result))
    return 0 if result["state"] in ("finished", "stopped") and result["ledger_verified"] else 1


def recipe_local_steps(rounds: int, records: int, expected_batch: float) -> int:
    """Local steps per round that make the probe recipe's epochs over the run: an epoch is records / expected
    batch Poisson steps, so the run takes ceil(epochs * records / (batch * rounds)) steps a round."""
    return math.ceil(Recipe().probe_epochs * records / (expected_batch * rounds))


def run_federation(work: Path, args: argparse.Namespace, reporter) -> dict[str, Any]:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.assets import minilm_model_dir, write_mr_csv
    from ewtune.coordinator.run_progress import RunProgress
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

    progress = reporter.printer("demo")  # the demo's phases, and LocalFederation's log
    source = write_mr_csv(work / "data" / "mr.csv", max_rows=args.rows_per_holder * (len(HOLDERS) + 1), seed=0)
    *partitions, test_csv = partition_csv(source, work / "data", len(HOLDERS) + 1, (*HOLDERS, TEST_SPLIT))
    model_dir = minilm_model_dir()
    training = {
        "model_dir": str(model_dir),
        "task": "classification",
        "max_length": args.max_length,
        "mode": "head",
        "optimizer": "sgd",
        "physical_batch_size": 32,
        "eval_fraction": 0.0,  # holders release no evaluation (their default policy): every sentence trains
        "seed": 0,
    }
    holders = [HolderSetup(holder, path, args.target_epsilon, args.delta, training) for holder, path in zip(HOLDERS, partitions)]
    progress("writing the initial global weights (the classification head)")
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
        model={"initial_weights": str(weights), "base_model_dir": str(model_dir), "mode": "head", "task": "classification"},
        timeouts={"nodes": 300, "query": 120, "round": 1200, "evaluate": 600},
    )
    with LocalFederation(work, holders, log=progress) as federation:
        federation.start()
        progress("loading MiniLM and the data in each daemon")
        federation.wait_for_daemons()
        progress("submitting the federated run (flwr run)")
        with _status_page(work, args.status_port, progress):
            status = federation.run(job, on_status=RunProgress(reporter))
    progress("all processes stopped; verifying the ledgers")
    result = federation_result(work, status, federation.credentials)
    progress(f"evaluating the global model after each round on the demo's own held-out sentences ({test_csv.name})")
    result["accuracy_by_round"] = global_accuracy(model_dir, training, test_csv, [weights, *status.get("checkpoints", [])])
    return result


def global_accuracy(model_dir: Path, training: dict[str, Any], test_csv: Path, weight_files: list) -> list[dict[str, Any]]:
    """Accuracy and macro F1 of each global model (the initial weights, then one checkpoint per round) on
    ``test_csv``, and the majority-class baseline of that split."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    import numpy as np
    import torch

    from ewtune.agent import models
    from ewtune.agent.data import DataSpec, load_local_data
    from ewtune.agent.evaluation import accuracy_and_macro_f1, evaluate_model, majority_baseline
    from ewtune.agent.heads import embed_examples
    from ewtune.coordinator.checkpoints import load_weights

    tokenizer = models.load_tokenizer(model_dir)
    data = load_local_data(DataSpec(path=str(test_csv), max_length=training["max_length"], eval_fraction=0.0), tokenizer)
    model = models.load_model(
        model_dir, num_labels=data.num_labels or 2, mode=training["mode"], lora_rank=training.get("lora_rank", 8),
        lora_alpha=training.get("lora_alpha", 16.0), lora_target_modules=training.get("lora_target_modules"),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    majority = majority_baseline(data.train.labels)
    embedded = embed_examples(model, data.train, tokenizer.pad_token_id) if training["mode"] == "head" and hasattr(model, "embed") else None
    rows = []
    for round, path in enumerate(weight_files):
        models.load_trainable_state(model, {name: torch.from_numpy(array) for name, array in load_weights(path).items()})
        if embedded is None:
            metrics = evaluate_model(model, data.train, tokenizer.pad_token_id, "classification", 64)
            accuracy, f1 = metrics["accuracy"], metrics["f1"]
        else:  # only the head changes between rounds: the sentences are embedded once
            with torch.no_grad():
                accuracy, f1 = accuracy_and_macro_f1(model(features=embedded).logits.argmax(-1), data.train.labels)
        rows.append({"round": round, "accuracy": accuracy, "macro_f1": f1, "majority_baseline": majority,
                     "num_examples": len(data.train)})
    return rows


def federation_result(work: Path, status: dict[str, Any], credentials) -> dict[str, Any]:
    """A finished run's summary: each holder's epsilons (the coordinator's ledger and its own), plan and rounds,
    every ledger verified against its pinned key and the coordinator's cross-checked against the holders'."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.verify import verify_ledger
    from ewtune.coordinator.ledger_crosscheck import cross_check, read_entries

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
        f"## Run {result['run_id']}: {result['state']}" + (f" ({result['reason']})" if result.get("reason") else "")
        + f", {result['rounds_completed']} round(s), {result['wall_seconds']:.0f} s wall",
        "",
        "### Privacy spent per holder",
        "",
        "| holder | records (noised count) | sigma | certified eps (guarantee) | Edgeworth eps (estimate) | RDP eps | budget | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for holder in result["holders"]:
        lines.append(
            f"| {holder['holder_id']} | {holder['dataset_size']} | {_fmt(holder['noise_multiplier'])} | {_fmt(holder['epsilon_certified'])} | "
            f"{_fmt(holder['epsilon_edgeworth_estimate'])} | {_fmt(holder['epsilon_rdp'])} | {_fmt(holder['budget_epsilon'])} | "
            f"{holder['rounds']} |"
        )
    lines.append(f"\ndelta {result['holders'][0]['delta']:g} per holder; the certified epsilon is the recorded and enforced bound, "
                 "the Edgeworth value is an estimate shown beside it." if result["holders"] else "")
    if result.get("accuracy_by_round"):
        lines += ["", "### The global model on the demo's held-out sentences", "",
                  "| global model after round | accuracy | macro F1 | majority-class baseline | held-out sentences |", "|---|---|---|---|---|"]
        lines += [f"| {row['round']}{' (initial)' if row['round'] == 0 else ''} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | "
                  f"{row['majority_baseline']:.3f} | {row['num_examples']} |" for row in result["accuracy_by_round"]]
    lines += ["", "### Verification of the ledgers", ""]
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


def _status_page(work: Path, port: int | None, progress):
    """The status page of the run on 127.0.0.1:``port`` while it goes on (nothing without a port)."""
    if port is None:
        return contextlib.nullcontext()
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.coordinator.status_server import StatusServer

    page = StatusServer(work / "coordinator" / "run" / "status.json", port=port)
    progress(f"status page: {page.url}")
    return page


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
