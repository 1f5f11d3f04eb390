"""Private against non-private fine-tuning on the same model, data and recipe.

    python -m ewtune.bench.train_local --non-private --model minilm --data mr ... [the train-local options]

runs the non-private baseline of ``ewtune agent train-local``: the same trainer, data split, recipe phases
(probe on the cached embeddings, then tune), Poisson sampler, steps = round(epochs / q), optimizers and
learning rates, but the mean loss of each sampled batch is minimised directly (no clipping, no noise,
sigma = 0). It prints one JSON object. Without ``--non-private`` it runs the private command itself, so both
halves of a comparison come from one argument list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ewtune.accountant.errors import EwtuneError
from ewtune.agent import train_cli
from ewtune.bench.report import machine


def non_private_run(args) -> dict:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.agent.dpsgd.randomness import InsecureSeededRandom
    from ewtune.agent.evaluation import majority_baseline
    from ewtune.agent.sampler import PoissonSampler
    from ewtune.agent.training import LocalTrainer, only_head_trainable
    from ewtune.agent.dpsgd_run import make_optimizer

    started = time.perf_counter()
    recipe = train_cli.recipe_from_args(args)
    trainer = LocalTrainer(train_cli.training_config_from_args(args, recipe))
    before = trainer.evaluate() if args.task == "causal_lm" else None  # the perplexity train-local reports before
    size = trainer.dataset_size
    phases = []
    for phase in recipe.phases(size):
        head_only = phase.name == "probe"
        with only_head_trainable(trainer.model, head_only):
            module, collate = trainer.phase_inputs(head_only)
            sampler = PoissonSampler(size, phase.sampling_rate, phase.steps, InsecureSeededRandom(args.seed))
            optimizer = make_optimizer(recipe.optimizer(phase.name), _trainable(trainer), recipe.learning_rate(phase.name))
            loss = minimise(module, trainer.loss_fn(), sampler, collate, optimizer, args.physical_batch_size, trainer.autocast)
        phases.append({"phase": phase.name, "steps": phase.steps, "sampling_rate": phase.sampling_rate, "noise_multiplier": 0.0,
                       "learning_rate": recipe.learning_rate(phase.name), "train_loss": loss})
    evaluation = trainer.evaluate()
    if before is None:
        evaluation["majority_baseline"] = majority_baseline(trainer.data.eval.labels)
    else:
        evaluation["perplexity_before"] = before["perplexity"]
    return {
        "mode": args.mode,
        "tune_layers": recipe.trained_layers,
        "training_examples": size,
        "phases": phases,
        "accuracy": evaluation.get("accuracy"),
        "macro_f1": evaluation.get("f1"),
        "majority_baseline": evaluation.get("majority_baseline"),
        "perplexity_before": evaluation.get("perplexity_before"),
        "perplexity": evaluation.get("perplexity"),
        "eval": evaluation,
        "device": str(trainer.device),
        "precision": trainer.precision,
        "seconds": time.perf_counter() - started,
        "load_average": machine()["load_average"],
    }


def _trainable(trainer):
    return [p for p in trainer.model.parameters() if p.requires_grad]


def minimise(model, loss_fn, sampler, collate, optimizer, physical_batch_size, autocast) -> float:
    """Plain minibatch training of ``model`` over the sampler's batches (each forward pass in the context
    ``autocast()`` returns, as the private run's); the mean training loss."""
    model.train()
    loss_sum, examples = 0.0, 0
    for indices in sampler:
        if len(indices) == 0:
            continue
        for start in range(0, len(indices), physical_batch_size):
            batch = collate(indices[start : start + physical_batch_size])
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            with autocast():
                losses = loss_fn(model(**inputs), batch)
            (losses.sum() / len(indices)).backward()
            loss_sum += float(losses.detach().sum())
        examples += len(indices)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum / max(examples, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    train_cli.register(commands)
    local = commands.choices["train-local"]
    local.add_argument("--non-private", action="store_true", help="sigma = 0, no clipping")
    local.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(["train-local", *(sys.argv[1:] if argv is None else argv)])
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if not args.non_private:
            return train_cli.run(args)
        print(json.dumps(non_private_run(args), indent=2))
    except EwtuneError as error:  # bad input (a missing GPU among them): one line, as ewtune's own commands
        print(f"ewtune.bench.train_local: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
