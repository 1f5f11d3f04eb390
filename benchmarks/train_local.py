"""Private against non-private fine-tuning on the same model, data and settings.

    python benchmarks/train_local.py --non-private --model minilm --data mr ... [the train-local options]

runs the non-private baseline of ``ewtune agent train-local``: the same trainer, data split, Poisson sampler,
steps = round(epochs / q), optimizer and learning rate, but the mean loss of each sampled batch is minimised
directly (no clipping, no noise, sigma = 0). It prints one JSON object. Without ``--non-private`` it runs the
private command itself, so both halves of a comparison come from one argument list.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent import train_cli


def non_private_run(args) -> dict:
    import torch

    from agent.dpsgd.randomness import InsecureSeededRandom
    from agent.sampler import PoissonSampler
    from agent.training import LocalTrainer, make_optimizer

    started = time.perf_counter()
    trainer = LocalTrainer(train_cli._training_config(args))
    size = trainer.dataset_size
    rate = args.expected_batch / size
    steps = max(1, round(args.epochs / rate))
    model, loss_fn = trainer.model, trainer.loss_fn()
    optimizer = make_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad], args.lr)
    sampler = PoissonSampler(size, rate, steps, InsecureSeededRandom(args.seed))  # non-private baseline
    model.train()
    loss_sum, examples = 0.0, 0
    for indices in sampler:
        if len(indices) == 0:
            continue
        for start in range(0, len(indices), args.physical_batch_size):
            batch = trainer.collate(indices[start : start + args.physical_batch_size])
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            losses = loss_fn(model(**inputs), batch)
            (losses.sum() / len(indices)).backward()
            loss_sum += float(losses.detach().sum())
        examples += len(indices)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "mode": args.mode,
        "training_examples": size,
        "plan": {"steps": steps, "sampling_rate": rate, "noise_multiplier": 0.0, "learning_rate": args.lr},
        "train": {"loss": loss_sum / max(examples, 1), "examples": examples, "steps": steps},
        "eval": trainer.evaluate(),
        "seconds": time.perf_counter() - started,
        "load_average": os.getloadavg(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    train_cli.register(commands)
    local = commands.choices["train-local"]
    local.add_argument("--non-private", action="store_true", help="sigma = 0, no clipping")
    local.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(["train-local", *(sys.argv[1:] if argv is None else argv)])
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.non_private:
        return train_cli.run(args)
    print(json.dumps(non_private_run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
