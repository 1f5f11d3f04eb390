"""``ewtune bench federation-causal-lm``: a federated private LoRA fine-tuning of a causal language model (by
default the packaged SmolLM2-135M-Instruct) on MR sentences, with real Flower processes on 127.0.0.1
(:mod:`ewtune.local_federation`: a TLS SuperLink, one agent daemon with its SuperNode per holder, the
coordinator's ServerApp), against a non-private single-process run of the same schedule.

The sentences (``write_mr_csv``, seed 0) are split round-robin into the two holders' shares and a held-out share
that no holder sees. Each holder trains with DP-SGD on all of its share (Poisson sampling, per-record clipping of
the mean next-token loss's gradient, Gaussian noise; each record is one sequence) at the planner's noise for the
certified target epsilon; holders keep their default policy of releasing no evaluation. The benchmark itself
measures the exact perplexity (:func:`ewtune.agent.evaluation.evaluate_model`) of every global model, the initial
weights and the checkpoint after each round, on the held-out share: its own data, so nothing about the holders'
records is released by it. Every ledger is verified and cross-checked, and the final adapter is loaded as a
causal LM.

The non-private half: one process, both holders' shares pooled, the same rounds of the same local steps (a fresh
AdamW at each round, as each holder's round starts one), Poisson batches of twice the expected batch (what both
holders sample in a step together), the same learning rate and maximum length, no clipping and no noise; its
perplexity after the last round on the same held-out share (it starts from the same initial weights).

The defaults fit the 2-core shared machine (about 15 minutes at load 5; each held-out evaluation of SmolLM2 takes
about a minute there): 600 sentences per holder, 4 rounds of 5 steps at an expected batch of 16, sentences cut to
32 tokens, 100 held-out sentences.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench.report import machine, write

HOLDERS = ("h0", "h1")
HELD_OUT = "held-out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the packaged SmolLM2-135M-Instruct) or a causal LM directory")
    parser.add_argument("--rows-per-holder", type=int, default=600, help="MR sentences per holder (default 600)")
    parser.add_argument("--held-out-rows", type=int, default=100, help="held-out sentences no holder sees (default 100)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5, help="DP-SGD steps per holder per round (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="expected batch per holder and step (default 16)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sentence at most (default 32)")
    parser.add_argument("--learning-rate", type=float, default=0.002, help="AdamW's learning rate (default 0.002)")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=8.0, help="each holder's certified target and budget (default 8)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private single-process run")
    parser.add_argument("--json", default="benchmarks/results/federation_causal_lm.json")
    parser.add_argument("--markdown", default="benchmarks/results/federation_causal_lm.md")
    parser.add_argument("--work-dir", help="keep credentials, ledgers, checkpoints and logs here (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    if min(args.rows_per_holder, args.held_out_rows, args.rounds, args.local_steps, args.batch_size, args.max_length, args.lora_rank) < 1:
        raise InvalidInputError("--rows-per-holder, --held-out-rows, --rounds, --local-steps, --batch-size, --max-length and --lora-rank must be >= 1")
    before, started = machine(), time.monotonic()
    if args.work_dir:
        report = _measure(Path(args.work_dir).resolve(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="ewtune-bench-federation-causal-lm-") as work:
            report = _measure(Path(work), args)
    report.update(machine_before=before, machine_after=machine(), wall_seconds=time.monotonic() - started)
    write(report, _markdown(report), args.json, args.markdown)
    return 0


def _measure(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.agent.assets import smollm2_model_dir, write_mr_csv

    model_dir = smollm2_model_dir() if args.model == "smollm2" else Path(args.model).resolve()
    source = write_mr_csv(work / "data" / "mr.csv", max_rows=args.rows_per_holder * len(HOLDERS) + args.held_out_rows, seed=0)
    *shares, held_out = _split(source, work / "data", args)
    training = {
        "model_dir": str(model_dir), "task": "causal_lm", "mode": "lora", "lora_rank": args.lora_rank, "lora_alpha": 2.0 * args.lora_rank,
        "max_length": args.max_length, "physical_batch_size": 16, "optimizer": "adamw",
        "eval_fraction": 0.0,  # holders release no evaluation (their default policy): every sentence trains
    }  # fmt: skip
    federated = _federated(work, args, training, shares)
    print("measuring the perplexity of each global model on the held-out sentences", flush=True)
    initial = federated.pop("initial_weights")
    federated["perplexity_by_round"] = perplexity_by_round(training, held_out, [initial, *federated["checkpoints"]])
    report = {
        "benchmark": "federation-causal-lm",
        "command": _command(args),
        "model": str(model_dir),
        "held_out_sentences": args.held_out_rows,
        "federated": federated,
    }
    if not args.no_baseline:
        print("the non-private single-process run", flush=True)
        report["non_private"] = non_private_run(training, shares, held_out, initial, args, work)
    return report


def _split(source: Path, directory: Path, args: argparse.Namespace) -> list[Path]:
    """The holders' shares of ``rows_per_holder`` sentences each (consecutive rows of the shuffled CSV), then the
    held-out share (the rest)."""
    with open(source, encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    bounds = [args.rows_per_holder * index for index in range(len(HOLDERS) + 1)] + [len(rows)]
    paths = []
    for name, start, end in zip((*HOLDERS, HELD_OUT), bounds, bounds[1:]):
        path = directory / f"{name}.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows[start:end])
        paths.append(path)
    return paths


def _federated(work: Path, args: argparse.Namespace, training: dict[str, Any], shares: list[Path]) -> dict[str, Any]:
    """The federation's run, its verified ledgers and epsilons, and where its weights are."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.demo import federation_result
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights

    holders = [HolderSetup(name, path, args.epsilon, args.delta, training) for name, path in zip(HOLDERS, shares)]
    initial = initial_weights(Path(training["model_dir"]), work / "coordinator" / "initial.safetensors", training)
    job = FederationJob(
        federation={"name": "causal-lm", "rounds": args.rounds, "local_steps": args.local_steps, "expected_batch_size": args.batch_size,
                    "clip_norm": args.clip_norm, "learning_rate": args.learning_rate, "target_epsilon": args.epsilon,
                    "delta": args.delta, "min_holders": len(HOLDERS), "expected_holders": len(HOLDERS)},
        model={"initial_weights": str(initial), "base_model_dir": training["model_dir"], "task": "causal_lm", "mode": "lora",
               "lora_alpha": training["lora_alpha"], "evaluate": "never"},
        timeouts={"nodes": 900, "query": 300, "round": 3600, "evaluate": 600},
    )  # fmt: skip
    started = time.monotonic()
    with LocalFederation(work, holders, log=lambda text: print(text, flush=True)) as federation:
        federation.start()
        federation.wait_for_daemons(timeout=1200)
        ready = time.monotonic()
        print("daemons serving; submitting the run (flwr run)", flush=True)
        status = federation.run(job, timeout=6 * 3600)
        finished = time.monotonic()
    if status.get("state") != "finished":
        raise InvalidInputError(f"the federated run ended {status.get('state')}: {status.get('reason')}")
    result = federation_result(work, status, federation.credentials)
    result.update(
        plan=status.get("plan"), initial_weights=initial, checkpoints=status.get("checkpoints", []),
        daemons_ready_seconds=ready - started, run_seconds=finished - ready,
        adapter_is_the_final_model=adapter_is_final_model(training, status),
    )  # fmt: skip
    return result


def adapter_is_final_model(training: dict[str, Any], status: dict[str, Any]) -> bool:
    """Whether the exported adapter loads as a causal LM whose LoRA factors are the final global weights."""
    # deferred: torch and peft load only when the benchmark runs
    import torch

    from ewtune.agent import models
    from ewtune.coordinator.checkpoints import load_weights

    final = load_weights(Path(status["checkpoints"][-1]))
    model = models.load_adapter(training["model_dir"], status["adapter"], task="causal_lm")
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    return bool(lora) and set(lora) == set(final) and all(torch.equal(p.detach(), torch.from_numpy(final[n])) for n, p in lora.items())


def _held_out_model(training: dict[str, Any], held_out: Path):
    """(the LoRA model of ``training``, the tokenised held-out sentences, the pad id)."""
    # deferred: torch and transformers load only when the benchmark runs
    from ewtune.agent import models
    from ewtune.agent.data import DataSpec, load_local_data

    tokenizer = models.load_tokenizer(training["model_dir"])
    spec = DataSpec(path=str(held_out), task="causal_lm", max_length=training["max_length"], eval_fraction=0.0)
    data = load_local_data(spec, tokenizer)
    model = models.load_model(training["model_dir"], task="causal_lm", mode="lora", lora_rank=training["lora_rank"],
                              lora_alpha=training["lora_alpha"], pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return model, data.train, tokenizer.pad_token_id


def perplexity_by_round(training: dict[str, Any], held_out: Path, weight_files: list) -> list[dict[str, Any]]:
    """The exact held-out perplexity of each global model (``weight_files``: the initial weights, then one checkpoint
    per round)."""
    # deferred: torch loads only when the benchmark runs
    import torch

    from ewtune.coordinator.checkpoints import load_weights

    model, examples, pad_token_id = _held_out_model(training, held_out)
    states = ({name: torch.from_numpy(array) for name, array in load_weights(Path(path)).items()} for path in weight_files)
    return _perplexities(model, examples, pad_token_id, states)


def _perplexities(model, examples, pad_token_id: int, states) -> list[dict[str, Any]]:
    """Round by round, the exact perplexity of ``model`` with each trainable state of ``states`` on ``examples``."""
    # deferred: torch loads only when the benchmark runs
    from ewtune.agent import models
    from ewtune.agent.evaluation import evaluate_model

    rows = []
    for round, state in enumerate(states):
        models.load_trainable_state(model, state)
        metrics = evaluate_model(model, examples, pad_token_id, "causal_lm", 64)
        rows.append({"round": round, "perplexity": metrics["perplexity"], "loss": metrics["loss"], "num_examples": metrics["num_examples"]})
    return rows


def non_private_run(training: dict[str, Any], shares: list[Path], held_out: Path, initial: Path, args: argparse.Namespace,
                    work: Path) -> dict[str, Any]:
    """The non-private half (module docstring): the same initial LoRA weights, rounds and local steps on the pooled
    shares, with the exact held-out perplexity after the last round."""
    # deferred: torch loads only when the benchmark runs
    import torch

    from ewtune.agent import models
    from ewtune.agent.dpsgd.randomness import InsecureSeededRandom
    from ewtune.agent.dpsgd_run import make_optimizer
    from ewtune.agent.sampler import PoissonSampler
    from ewtune.agent.training import LocalTrainer, TrainingConfig
    from ewtune.bench.train_local import minimise
    from ewtune.coordinator.checkpoints import load_weights

    started = time.perf_counter()
    pooled = _pooled(shares, work / "data" / "pooled.csv")
    trainer = LocalTrainer(TrainingConfig(**training, data_file=str(pooled), insecure_seeded_randomness=True))
    models.load_trainable_state(trainer.model, {name: torch.from_numpy(array) for name, array in load_weights(initial).items()})
    size = trainer.dataset_size
    rate = min(1.0, len(shares) * args.batch_size / size)
    losses = []
    for round in range(args.rounds):
        sampler = PoissonSampler(size, rate, args.local_steps, InsecureSeededRandom(round))
        optimizer = make_optimizer("adamw", [p for p in trainer.model.parameters() if p.requires_grad], args.learning_rate)
        losses.append(minimise(trainer.model, trainer.loss_fn(), sampler, trainer.collate, optimizer,
                               training["physical_batch_size"], trainer.autocast))  # fmt: skip
    trained = time.perf_counter() - started
    model, examples, pad_token_id = _held_out_model(training, held_out)
    return {
        "training_sentences": size, "sampling_rate": rate, "steps": args.rounds * args.local_steps, "train_loss_by_round": losses,
        "perplexity_after": _perplexities(model, examples, pad_token_id, [trainer.trainable_state()])[0]["perplexity"],
        "training_seconds": trained,
    }  # fmt: skip


def _pooled(shares: list[Path], path: Path) -> Path:
    """One CSV of every share's rows (one header)."""
    with open(path, "w", encoding="utf-8", newline="") as output:
        writer = csv.writer(output)
        for index, share in enumerate(shares):
            with open(share, encoding="utf-8", newline="") as handle:
                header, *rows = list(csv.reader(handle))
            writer.writerows(([header] if index == 0 else []) + rows)
    return path


def _command(args: argparse.Namespace) -> str:
    return (f"ewtune bench federation-causal-lm --model {args.model} --rows-per-holder {args.rows_per_holder} --held-out-rows "
            f"{args.held_out_rows} --rounds {args.rounds} --local-steps {args.local_steps} --batch-size {args.batch_size} "
            f"--max-length {args.max_length} --learning-rate {args.learning_rate:g} --clip-norm {args.clip_norm:g} --lora-rank "
            f"{args.lora_rank} --epsilon {args.epsilon:g} --delta {args.delta:g}" + (" --no-baseline" if args.no_baseline else ""))


def _markdown(report: dict[str, Any]) -> str:
    federated, baseline = report["federated"], report.get("non_private")
    lines = [
        f"Federated private LoRA fine-tuning of {Path(report['model']).name} on MR sentences, two holders, real Flower processes "
        f"on 127.0.0.1: `{report['command']}`",
        "",
        "| holder | sentences (noised count) | q | sigma | rounds | certified eps (holder's ledger) | Edgeworth (estimate) | RDP eps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for holder in federated["holders"]:
        lines.append(f"| {holder['holder_id']} | {holder['dataset_size']} | {_fmt(holder['sampling_rate'], 4)} | "
                     f"{_fmt(holder['noise_multiplier'], 3)} | {holder['rounds']} | {_fmt(holder['holder_ledger_epsilon_certified'], 3)} | "
                     f"{_fmt(holder['epsilon_edgeworth_estimate'], 3)} | {_fmt(holder['epsilon_rdp'], 3)} |")  # fmt: skip
    lines += ["", f"Held-out perplexity ({report['held_out_sentences']} sentences no holder sees; exact, measured by the benchmark):", "",
              "| after round | federated, private | non-private, one process |", "|---|---|---|"]
    private = federated["perplexity_by_round"]
    for row in private:
        # the non-private run starts from the same initial weights (round 0) and is evaluated after its last round
        other = row["perplexity"] if row["round"] == 0 else baseline["perplexity_after"] if baseline and row is private[-1] else None
        lines.append(f"| {row['round']} | {row['perplexity']:.1f} | {'-' if other is None else _fmt(other, 1)} |")
    lines += ["", f"Ledgers verified and cross-checked: {federated['ledger_verified']}; the adapter loads as a causal LM with the final "
              f"weights: {federated['adapter_is_the_final_model']}. Daemons ready after {federated['daemons_ready_seconds']:.0f} s, "
              f"the run took {federated['run_seconds']:.0f} s; all of it {report['wall_seconds']:.0f} s at load "
              f"{_fmt(report['machine_before']['load_average'][0], 1)} to {_fmt(report['machine_after']['load_average'][0], 1)} "
              f"on {report['machine_before']['cpus']} CPUs."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
