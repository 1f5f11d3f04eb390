"""``ewtune bench fsdp-memory``: memory per worker of full DP fine-tuning as N replicated workers (``--sharding
none``: each holds the whole model, its clipped sums and its optimizer state) against N FSDP2-sharded workers
(``--sharding fsdp``, :mod:`ewtune.agent.distributed.sharded`), for a random-init BERT-base-size classifier
(109M parameters; ``--scale tiny``: 2 layers, hidden 32, for tests) with the MiniLM tokenizer, on MR sentences.

Each sharding runs as its own ``ewtune agent train-local --nproc N --mode full --json`` process, so that each
worker's process peak resident set size is that run's alone; the figures are the tune phase's ``train.workers`` of
train-local's JSON (:mod:`ewtune.agent.distributed.memory`): the peak RSS since the run began (the model loaded,
before its training state exists) and over the process's life (the loading included), CUDA's
``max_memory_allocated``, and the bytes of trainable parameters and optimizer state (SGD with momentum: one buffer;
AdamW: two moments) each worker holds."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench.report import machine, timed, write

SCALES = {  # BERT-base's shape (Devlin et al. 2019: 12 layers, hidden 768, 12 heads, 3072) and a tiny one for tests
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}
MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=sorted(SCALES), default="base", help="base: 109M parameters (default); tiny: for tests")
    parser.add_argument("--nproc", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per worker) (default cpu)")
    parser.add_argument("--examples", type=int, default=80, help="MR sentences (default 80)")
    parser.add_argument("--tune-epochs", type=float, default=0.2, help="expected passes over the data (default 0.2)")
    parser.add_argument("--batch", type=int, default=8, help="expected batch per step, over all the workers (default 8)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sentence at most (default 32)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw",
                        help="the tune phase's optimizer: adamw (two moments per parameter, default) or sgd (momentum)")
    parser.add_argument("--json", default="benchmarks/results/fsdp-memory.json")
    parser.add_argument("--markdown", default="benchmarks/results/fsdp-memory.md")


def run(args: argparse.Namespace) -> int:
    if min(args.nproc - 1, args.examples, args.batch, args.max_length) < 1:
        raise InvalidInputError("--nproc must be >= 2 and --examples, --batch, --max-length >= 1")
    before = machine()
    with tempfile.TemporaryDirectory(prefix="ewtune-fsdp-memory-") as work:
        model_dir, data_file = _model_and_data(Path(work), args)
        runs = {sharding: _train_local(model_dir, data_file, sharding, args) for sharding in ("none", "fsdp")}
    report = {"settings": vars(args) | {"func": None}, "machine_before": before, "machine_after": machine(), "runs": runs}
    write(report, _markdown(report), args.json, args.markdown)
    return 0


def _model_and_data(work: Path, args) -> tuple[Path, Path]:
    """A random-init BERT classifier of ``args.scale`` with the MiniLM tokenizer, and ``args.examples`` MR rows."""
    # deferred: registering a benchmark must not load torch or transformers (ewtune/bench/__init__.py)
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ewtune.agent.assets import minilm_model_dir, write_mr_csv

    tokenizer = AutoTokenizer.from_pretrained(minilm_model_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, num_labels=2, **SCALES[args.scale])
    model_dir = work / f"bert-{args.scale}-random"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, write_mr_csv(work / "mr.csv", max_rows=args.examples, seed=0)


def _train_local(model_dir: Path, data_file: Path, sharding: str, args) -> dict:
    """One ``train-local`` process's run: its wall time, trainable parameters and the tune phase's workers."""
    command = [sys.executable, "-m", "ewtune", "agent", "train-local", "--model", str(model_dir), "--data", str(data_file),
               "--epsilon", "8", "--delta", "1e-5", "--mode", "full", "--tune-layers", "0", "--probe-epochs", "0",
               "--tune-epochs", str(args.tune_epochs), "--tune-batch", str(args.batch), "--max-length", str(args.max_length),
               "--physical-batch-size", str(args.batch), "--tune-optimizer", args.optimizer, "--device", args.device,
               "--nproc", str(args.nproc), "--sharding", sharding, "--json", "--quiet"]  # fmt: skip
    done, seconds = timed(lambda: subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}))
    if done.returncode != 0:
        raise InvalidInputError(f"train-local --sharding {sharding} failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    summary = json.loads(done.stdout)
    tune = summary["phases"][-1]
    return {"seconds": seconds, "trainable_parameters": summary["trainable_parameters"], "optimizer": tune["optimizer"],
            "steps": tune["train"]["steps"],
            "examples": tune["train"]["examples"], "workers": tune["train"]["workers"]}  # fmt: skip


def _markdown(report: dict) -> str:
    settings, runs = report["settings"], report["runs"]
    load = report["machine_before"]["load_average"][0], report["machine_after"]["load_average"][0]
    lines = [
        f"### ewtune bench fsdp-memory: random-init BERT-{settings['scale']} classifier "
        f"({runs['none']['trainable_parameters'] / 1e6:.1f}M parameters, float32), full DP fine-tuning, "
        f"{runs['none']['optimizer']}, "
        f"--nproc {settings['nproc']}, {settings['device']}, batch {settings['batch']} x {settings['max_length']} tokens; "
        f"load {load[0]:.2f} -> {load[1]:.2f}",
        "",
        "| sharding | steps | worker | run's peak RSS MiB | process's peak RSS MiB | max allocated MiB | parameters MiB | "
        "optimizer state MiB | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sharding, done in runs.items():
        for worker in done["workers"]:
            lines.append(
                f"| {sharding} | {done['steps']} | {worker['rank']} | {_mib(worker['run_peak_rss_bytes'])} | "
                f"{_mib(worker['peak_rss_bytes'])} | {_mib(worker['max_memory_allocated_bytes'])} | "
                f"{worker['parameter_bytes'] / MIB:.1f} | {worker['optimizer_state_bytes'] / MIB:.1f} | {done['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / MIB:.0f}"
