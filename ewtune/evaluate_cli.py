"""``ewtune evaluate``: the metrics of any weights on a local file, for the eyes of whoever runs it (what is
evaluated, on which records: :data:`DESCRIPTION`, the command's help). The figures are exact and released
nowhere: the noised evaluation a coordinator may see is :func:`ewtune.agent.evaluation.private_metrics`. Only argparse
is imported at module import time; the paths are checked before torch loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError

WEIGHT_MODES = ("lora", "full", "head")

DESCRIPTION = """\
Accuracy, macro F1 and the majority-class baseline (classification) or perplexity (causal_lm) of a model on a
local file. Nothing is released: the figures are exact (no noise), no ledger is opened or charged, and nothing
leaves the machine, so they are for the data's own holder only.

What is evaluated: a Hugging Face model directory (--model: what train-local --output saves in head and full
modes, or any base model); a LoRA adapter saved on top of the base model --model (--adapter: what
train-local --output saves in lora mode, or a federation's adapter directory); or a safetensors file of
trainable parameters (--weights: what `ewtune weights init` writes, a federation's final.safetensors and round
checkpoints), loaded into the model that --mode, --lora-rank, --lora-alpha, --lora-target-modules and
--tune-layers build (the settings of weights init and of federation.toml's [model]).

On which records: every record of the file by default. --held-out evaluates only the records train-local held
out of training. Its split is per record, by a keyed hash of each record's content, --eval-fraction, --seed and
--max-examples: give the values the run used (train-local's defaults are the defaults here), and --split-key
for a daemon's secret split key; the figures are then those train-local printed.
"""


@dataclass(frozen=True)
class EvaluationSpec:
    """What to evaluate, on which records, and how to read them (the options of ``ewtune evaluate``)."""

    model: str
    data: str
    adapter: str | None = None
    weights: str | None = None
    task: str = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    num_labels: int | None = None  # None: max label + 1 (at least 2), as train-local infers it
    max_length: int = 128
    held_out: bool = False
    eval_fraction: float = 0.1
    seed: int = 0
    max_examples: int | None = None
    split_key: str | None = None
    mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: tuple[str, ...] | None = None
    tune_layers: int = 0
    batch_size: int = 64
    device: str = "auto"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="accuracy, macro F1 and the majority-class baseline (or perplexity) of a model, adapter or weights "
        "on a local file; nothing is released",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = EvaluationSpec(model="", data="")
    parser.add_argument("--model", required=True, help="Hugging Face model directory, or 'minilm' (with --adapter "
                        "or --weights: the base model they were trained on)")
    loaded = parser.add_mutually_exclusive_group()
    loaded.add_argument("--adapter", help="a LoRA adapter directory saved on top of --model")
    loaded.add_argument("--weights", help="a safetensors file of trainable parameters for the model --mode builds")
    parser.add_argument("--data", required=True, help="CSV, JSON Lines or Parquet file")
    parser.add_argument("--task", choices=("classification", "causal_lm"), default=defaults.task)
    parser.add_argument("--text-column", default=defaults.text_column)
    parser.add_argument("--text-pair-column", default=None)
    parser.add_argument("--label-column", default=defaults.label_column)
    parser.add_argument("--num-labels", type=int, default=None, help="default: max label + 1")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example (default 128)")
    split = parser.add_argument_group("held-out records (default: every record of the file)")
    split.add_argument("--held-out", action="store_true", help="only the records train-local held out of training")
    split.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction, help="as train-local's (default 0.1)")
    split.add_argument("--seed", type=int, default=defaults.seed, help="as train-local's (default 0)")
    split.add_argument("--max-examples", type=int, default=None, help="as train-local's")
    split.add_argument("--split-key", default=None, help="a daemon's secret split key file (default: train-local's "
                       "public key derived from --seed)")
    built = parser.add_argument_group("the model --weights are loaded into (as `ewtune weights init` built it)")
    built.add_argument("--mode", choices=WEIGHT_MODES, default=defaults.mode, help="(default lora)")
    built.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    built.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    built.add_argument("--lora-target-modules", nargs="+", default=None, help="default: the model type's default")
    built.add_argument("--tune-layers", type=int, default=defaults.tune_layers, metavar="K")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="evaluation batch (default 64)")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document")
    parser.set_defaults(func=run)


def run(args) -> int:
    names = {field.name for field in fields(EvaluationSpec)}
    options = {name: value for name, value in vars(args).items() if name in names}
    if options["lora_target_modules"] is not None:
        options["lora_target_modules"] = tuple(options["lora_target_modules"])
    result = evaluate(EvaluationSpec(**options))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def evaluate(spec: EvaluationSpec) -> dict:
    """The metrics of ``spec``'s model on its records (the module docstring): accuracy, macro F1 (the unweighted
    mean of the per-class F1), loss and the majority-class baseline (classification), or loss and perplexity
    (causal LM), with what was evaluated."""
    check(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    import torch

    from ewtune.agent.device import resolve_device
    from ewtune.agent.evaluation import evaluate_model, majority_baseline
    from ewtune.agent.models import load_tokenizer

    device = resolve_device(spec.device)
    model_dir = _model_dir(spec.model)
    tokenizer = load_tokenizer(model_dir)
    examples, num_labels = _records(spec, tokenizer)
    model = _load(spec, model_dir, num_labels, tokenizer.pad_token_id).to(device)
    with torch.no_grad():
        metrics = evaluate_model(model, examples, tokenizer.pad_token_id, spec.task, spec.batch_size)
    if spec.task == "classification":
        metrics["majority_baseline"] = majority_baseline(examples.labels)
    return {
        "model": spec.model,
        "adapter": spec.adapter,
        "weights": spec.weights,
        "data": spec.data,
        "records": "held-out" if spec.held_out else "every",
        "task": spec.task,
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("f1"),
        **{name: metrics.get(name) for name in ("majority_baseline", "loss", "perplexity")},
        "num_examples": metrics["num_examples"],
        "device": str(device),
        "released": False,
    }


def check(spec: EvaluationSpec) -> None:
    """Bad paths and settings, before torch loads (one-line errors)."""
    if spec.model != "minilm":
        _check_model_dir(Path(spec.model), "--model")
    if spec.adapter is not None and spec.weights is not None:
        raise InvalidInputError("give --adapter or --weights, not both")
    if spec.adapter is not None and not (Path(spec.adapter) / "adapter_config.json").is_file():
        raise InvalidInputError(f"--adapter {spec.adapter} is not a LoRA adapter directory (no adapter_config.json)")
    if spec.weights is not None and not Path(spec.weights).is_file():
        raise InvalidInputError(f"--weights {spec.weights}: no such file")
    _check_file(spec.data, "--data")
    _check_goes_with(spec, ("mode", "lora_rank", "lora_alpha", "lora_target_modules", "tune_layers"), spec.weights is not None, "--weights")
    _check_goes_with(spec, ("eval_fraction", "seed", "split_key"), spec.held_out, "--held-out")
    if spec.split_key is not None:
        _check_file(spec.split_key, "--split-key")  # never created here: a new key would split differently
    if spec.mode not in WEIGHT_MODES:
        raise InvalidInputError(f"--mode must be one of {', '.join(WEIGHT_MODES)}, got {spec.mode!r}")
    for name in ("max_length", "batch_size", "lora_rank"):
        if getattr(spec, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.tune_layers < 0:
        raise InvalidInputError(f"--tune-layers must be >= 0, got {spec.tune_layers}")
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.device import check_device_name

    check_device_name(spec.device)


def _check_goes_with(spec: EvaluationSpec, names: tuple[str, ...], given: bool, option: str) -> None:
    """Refuse settings that only ``option`` uses, set without it (they would be ignored)."""
    defaults = EvaluationSpec(model="", data="")
    changed = [name for name in names if getattr(spec, name) != getattr(defaults, name)]
    if changed and not given:
        raise InvalidInputError(f"--{changed[0].replace('_', '-')} goes with {option}")


def _check_model_dir(path: Path, option: str) -> None:
    if not path.is_dir():
        raise InvalidInputError(f"{option} {path}: no such model directory")
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{option} {path} is not a Hugging Face model directory (no config.json)")


def _check_file(path: str, option: str) -> None:
    if Path(path).is_dir():
        raise InvalidInputError(f"{option} {path} is a directory, not a file")
    if not Path(path).is_file():
        raise InvalidInputError(f"{option} {path}: no such file")


def _model_dir(name: str) -> str:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.train_cli import resolve_model

    return resolve_model(name)


def _records(spec: EvaluationSpec, tokenizer):
    """The tokenised records to evaluate (every record, or the held-out split) and the number of labels."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.data import DataSpec, load_local_data, split_key

    data = load_local_data(
        DataSpec(
            path=spec.data, task=spec.task, text_column=spec.text_column, text_pair_column=spec.text_pair_column,
            label_column=spec.label_column, num_labels=spec.num_labels, max_length=spec.max_length,
            eval_fraction=spec.eval_fraction if spec.held_out else 0.0, seed=spec.seed, max_examples=spec.max_examples,
            split_key=split_key(spec.split_key) if spec.split_key else None,
        ),
        tokenizer,
    )  # fmt: skip
    examples = data.eval if spec.held_out else data.train  # with no record held out, every record is in train
    if len(examples) == 0:
        raise InvalidInputError(f"{spec.data}: no held-out record at --eval-fraction {spec.eval_fraction:g}")
    return examples, data.num_labels or 2


def _load(spec: EvaluationSpec, model_dir: str, num_labels: int, pad_token_id: int):
    """The model to evaluate: the adapter on the base model, the weights loaded into the model ``spec.mode``
    builds, or the model directory as saved."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent import models
    from ewtune.agent.training import check_padded_length_fits

    if spec.adapter is not None:
        model = models.load_adapter(model_dir, spec.adapter, num_labels, spec.task)
        model.config.pad_token_id = pad_token_id
    else:
        mode = spec.mode if spec.weights is not None else "full"
        model = models.load_model(
            model_dir, task=spec.task, num_labels=num_labels, mode=mode, lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha, lora_target_modules=spec.lora_target_modules, pad_token_id=pad_token_id,
            tune_layers=spec.tune_layers if spec.weights is not None else 0,
        )  # fmt: skip
        if spec.weights is not None:
            _load_weights(model, spec.weights)
    check_padded_length_fits(spec.max_length, model)
    return model


def _load_weights(model, path: str) -> None:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.models import load_trainable_state
    from ewtune.coordinator.checkpoints import load_weights

    try:
        load_trainable_state(model, load_weights(path))
    except InvalidInputError as mismatch:
        raise InvalidInputError(f"--weights {path} do not fit the model --mode, --lora-rank, --lora-target-modules and "
                                f"--tune-layers build: {mismatch}") from None


def report(result: dict) -> str:
    """The result in a few lines."""
    loaded = f" with adapter {result['adapter']}" if result["adapter"] else f" with weights {result['weights']}" if result["weights"] else ""
    records = "the records train-local held out" if result["records"] == "held-out" else "every record"
    lines = [f"{'evaluated':<12}{result['model']}{loaded} on {records} of {result['data']} ({result['num_examples']} examples)"]
    if result["task"] == "classification":
        lines.append(f"{'accuracy':<12}{_figure(result['accuracy'])}, macro F1 {_figure(result['macro_f1'])}, majority-class "
                     f"baseline {_figure(result['majority_baseline'])}")
    else:
        lines.append(f"{'perplexity':<12}{_figure(result['perplexity'])}, loss {_figure(result['loss'])}")
    lines.append(f"{'released':<12}nothing: exact figures for this machine only, no ledger entry")
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"
