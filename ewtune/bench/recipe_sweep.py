"""The sweeps that chose the defaults of :class:`ewtune.agent.recipe.Recipe`, on public data that is not the
evaluation data (the SMS Spam Collection), so that the defaults leak nothing about any holder's records.

``--phase probe`` (the default) sweeps the probe alone; ``--phase tune`` (:func:`tune_sweep`) sweeps the LP-FT
tune phase (top layers on cached states, :mod:`ewtune.agent.top_layers`) after the default probe.

For every setting (learning rate, expected batch, epochs) and target epsilon, a fresh head is trained with DP-SGD
on the cached all-MiniLM-L6-v2 embeddings (certified calibration, delta 1e-5) and scored by macro F1 on the
held-out 10% (accuracy and the majority-class baseline beside it), over several seeds of the seeded, insecure
randomness (a benchmark on public data: reproducible on purpose).

    python -m ewtune.bench.recipe_sweep [--data sms_spam] [--seeds 2] [--output benchmarks/results/recipe_sweep]
    python -m ewtune.bench.recipe_sweep --phase tune [--seeds 2] [--output benchmarks/results/tune_sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from ewtune.agent.evaluation import majority_baseline, metrics_from_confusion
from ewtune.bench.report import machine

LEARNING_RATES = (1.0, 2.0, 4.0, 8.0)
BATCHES = (256, 512, 1024)
EPOCHS = (5, 10, 20)
EPSILONS = (1.0, 8.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sms_spam")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--phase", choices=("probe", "tune"), default="probe")
    parser.add_argument("--output", default=None, help="default benchmarks/results/recipe_sweep (probe) or tune_sweep (tune)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "tune":
        return tune_sweep(args)
    args.output = args.output or "benchmarks/results/recipe_sweep"
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.accountant.phases import Phase, calibrate_phases
    from ewtune.accountant.sampling import executable_sampling_rate
    from ewtune.agent.heads import embed_examples
    from ewtune.agent.train_cli import resolve_data, resolve_model
    from ewtune.agent.training import LocalTrainer, TrainingConfig
    from ewtune.agent.dpsgd_run import StepPlan

    torch.set_num_threads(1)  # one thread: the machine is shared, and oversubscribed threads spin
    started = time.perf_counter()
    config = TrainingConfig(model_dir=resolve_model("minilm"), data_file=resolve_data(args.data), mode="head",
                            max_length=args.max_length, insecure_seeded_randomness=True, device="cpu")  # the CPU recipe's sweep
    trainer = LocalTrainer(config)
    size, labels = trainer.dataset_size, torch.tensor(trainer.data.eval.labels)
    eval_features = embed_examples(trainer.model, trainer.data.eval, trainer.pad_token_id)
    initial = trainer.trainable_state()
    majority = majority_baseline(labels)
    rows = []
    for rate_lr, batch, epochs, epsilon in itertools.product(LEARNING_RATES, BATCHES, EPOCHS, EPSILONS):
        rate = executable_sampling_rate(batch / size)
        steps = max(1, round(epochs / rate))
        (phase,) = calibrate_phases(epsilon, 1e-5, [Phase("probe", rate, steps)])
        scores = []
        for seed in range(args.seeds):
            trainer.load_trainable_state(initial)
            torch.manual_seed(seed)
            trainer.train(StepPlan(steps, rate, phase.event.noise_multiplier, 1.0, rate_lr, optimizer="sgd"))
            with torch.no_grad():
                predicted = trainer.model.classifier(eval_features).argmax(-1)
            scores.append(_metrics(labels, predicted))
        rows.append({
            "learning_rate": rate_lr, "expected_batch": batch, "epochs": epochs, "epsilon": epsilon, "steps": steps,
            "noise_multiplier": phase.event.noise_multiplier,
            "macro_f1": statistics.mean(s["f1"] for s in scores), "accuracy": statistics.mean(s["accuracy"] for s in scores),
        })
        print(json.dumps(rows[-1]), flush=True)
    best = max(
        {(r["learning_rate"], r["expected_batch"], r["epochs"]) for r in rows},
        key=lambda key: statistics.mean(r["macro_f1"] for r in rows if (r["learning_rate"], r["expected_batch"], r["epochs"]) == key),
    )
    document = {
        "command": "python -m ewtune.bench.recipe_sweep " + " ".join(sys.argv[1:]),
        "data": args.data, "training_records": size, "held_out": len(labels), "majority_baseline": majority,
        "seeds": args.seeds, "delta": 1e-5, "clip_norm": 1.0, "optimizer": "sgd (momentum 0.9)",
        "best": {"learning_rate": best[0], "expected_batch": best[1], "epochs": best[2],
                 "criterion": "mean macro F1 over the target epsilons"},
        "rows": rows, "seconds": time.perf_counter() - started, "load_average": machine()["load_average"],
    }
    _write(Path(args.output), document, _markdown(document))
    return 0


def _metrics(labels, predicted) -> dict:
    """Accuracy and macro F1 of binary predictions (:func:`ewtune.agent.evaluation.metrics_from_confusion`)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    ones = torch.ones(len(labels), dtype=torch.float64)
    return metrics_from_confusion(torch.zeros(2, 2, dtype=torch.float64).index_put_((labels, predicted), ones, accumulate=True))


def _write(output: Path, document: dict, markdown: str) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown)
    print(markdown)


def _markdown(document) -> str:
    lines = [
        f"# Probe recipe sweep on {document['data']} (public, not the evaluation data)",
        "",
        f"`{document['command']}`: {document['training_records']} training records, {document['held_out']} held out "
        f"(majority-class baseline {document['majority_baseline']:.3f}); DP-SGD on the cached all-MiniLM-L6-v2 embeddings, "
        f"certified calibration at delta {document['delta']:g}, clip norm {document['clip_norm']:g}, {document['optimizer']}, "
        f"mean of {document['seeds']} seeds; {document['seconds']:.0f} s, load average {', '.join(f'{x:.1f}' for x in document['load_average'])}.",
        "",
        f"Chosen (best mean macro F1 over epsilon {', '.join(f'{e:g}' for e in EPSILONS)}): learning rate {document['best']['learning_rate']:g}, "
        f"expected batch {document['best']['expected_batch']}, {document['best']['epochs']:g} epochs.",
        "",
        "| lr | expected batch | epochs | epsilon | steps | sigma | macro F1 | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in document["rows"]:
        lines.append(f"| {r['learning_rate']:g} | {r['expected_batch']} | {r['epochs']:g} | {r['epsilon']:g} | {r['steps']} | "
                     f"{r['noise_multiplier']:.3f} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


# The tune phase's grid: (mode, top layers) x (expected batch, epochs, learning rate) per mode x the probe's budget
# share. Full fine-tuning noises millions of coordinates per step (LoRA on two layers: 37 k), so its learning
# rates are lower.
TUNE_MODELS = (("lora", 1), ("lora", 2), ("full", 1))
TUNE_SETTINGS = {"lora": ((256, 1.0, 0.05), (256, 1.0, 0.5)), "full": ((256, 1.0, 0.002), (256, 1.0, 0.01))}
TUNE_SHARES = (0.8,)
TUNE_EPSILON = 8.0


def tune_sweep(args) -> int:
    """For each (mode, top layers), share and seed: the default probe on the cached embeddings, then each tune
    setting from the probed head, scored on the held-out split (also through the cached states: exact, see
    ``tests/test_top_layers.py``). Against the probe alone at the whole budget, same seeds."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.agent.recipe import Recipe
    from ewtune.agent.top_layers import TopLayers, hidden_states_below
    from ewtune.agent.train_cli import resolve_data, resolve_model
    from ewtune.agent.training import LocalTrainer, TrainingConfig, base_model
    from ewtune.agent.dpsgd_run import StepPlan

    torch.set_num_threads(1)
    started = time.perf_counter()
    output = Path(args.output or "benchmarks/results/tune_sweep")
    rows, probe_alone = [], {}
    for mode, layers in TUNE_MODELS:
        trainer = LocalTrainer(TrainingConfig(model_dir=resolve_model("minilm"), data_file=resolve_data(args.data), mode=mode,
                                              tune_layers=layers, max_length=args.max_length, insecure_seeded_randomness=True,
                                              device="cpu"))
        size, labels = trainer.dataset_size, torch.tensor(trainer.data.eval.labels)
        top = TopLayers(base_model(trainer.model), layers)
        held_out = hidden_states_below(top.model, layers, trainer.data.eval, trainer.pad_token_id)
        initial, features = trainer.trainable_state(), None

        def score() -> dict:
            with torch.no_grad():
                predicted = top.model.classifier(top.embed_cached(held_out)).argmax(-1)
            return _metrics(labels, predicted)

        def probe(recipe, seed, phase) -> dict:
            nonlocal features
            trainer.load_trainable_state(initial)
            trainer._features = features  # the probe's embeddings of the untrained encoder, computed once
            torch.manual_seed(seed)
            trainer.train(StepPlan(phase.event.steps, phase.event.sampling_rate, phase.event.noise_multiplier, recipe.clip_norm,
                                   recipe.probe_learning_rate, head_only=True, optimizer=recipe.probe_optimizer))
            features = trainer._features
            return trainer.trainable_state()

        for share in TUNE_SHARES:
            for batch, epochs, rate_lr in TUNE_SETTINGS[mode]:
                recipe = Recipe(mode=mode, tune_layers=layers, tune_epochs=epochs, tune_expected_batch=batch, tune_learning_rate=rate_lr,
                                probe_budget_share=share)
                probe_phase, tune_phase = recipe.calibrate(TUNE_EPSILON, 1e-5, size)
                scores, seconds = [], 0.0
                for seed in range(args.seeds):
                    trainer.load_trainable_state(probe(recipe, seed, probe_phase))
                    result = trainer.train(StepPlan(tune_phase.event.steps, tune_phase.event.sampling_rate, tune_phase.event.noise_multiplier,
                                                    recipe.clip_norm, rate_lr, optimizer=recipe.tune_optimizer))
                    seconds += result.metrics["seconds"]
                    scores.append(score())
                rows.append({"mode": mode, "tune_layers": layers, "probe_share": share, "expected_batch": batch, "epochs": epochs,
                             "learning_rate": rate_lr, "tune_steps": tune_phase.event.steps, "probe_sigma": probe_phase.event.noise_multiplier,
                             "tune_sigma": tune_phase.event.noise_multiplier, "tune_seconds_per_run": seconds / args.seeds,
                             "macro_f1": statistics.mean(s["f1"] for s in scores), "accuracy": statistics.mean(s["accuracy"] for s in scores)})
                print(json.dumps(rows[-1]), flush=True)
        if not probe_alone:
            (phase,) = Recipe().calibrate(TUNE_EPSILON, 1e-5, size)
            scores = []
            for seed in range(args.seeds):
                probe(Recipe(), seed, phase)
                scores.append(score())
            probe_alone = {"macro_f1": statistics.mean(s["f1"] for s in scores), "accuracy": statistics.mean(s["accuracy"] for s in scores)}
            majority = majority_baseline(labels)
    best = max(rows, key=lambda r: r["macro_f1"])
    document = {
        "command": "python -m ewtune.bench.recipe_sweep " + " ".join(sys.argv[1:]), "data": args.data, "training_records": size,
        "held_out": len(labels), "majority_baseline": majority, "seeds": args.seeds, "epsilon": TUNE_EPSILON, "delta": 1e-5,
        "clip_norm": 1.0, "optimizer": "sgd (momentum 0.9)", "probe_alone": probe_alone, "best": best, "rows": rows,
        "seconds": time.perf_counter() - started, "load_average": machine()["load_average"],
    }
    _write(output, document, _tune_markdown(document))
    return 0


def _tune_markdown(document) -> str:
    best, alone = document["best"], document["probe_alone"]
    lines = [
        f"# LP-FT tune-phase sweep on {document['data']} (public, not the evaluation data)",
        "",
        f"`{document['command']}`: {document['training_records']} training records, {document['held_out']} held out "
        f"(majority-class baseline {document['majority_baseline']:.3f}); all-MiniLM-L6-v2; the default probe (its share of the "
        f"budget below), then the top layers and the head on cached states; certified epsilon {document['epsilon']:g} for both "
        f"phases together at delta {document['delta']:g}, clip norm {document['clip_norm']:g}, {document['optimizer']}, mean of "
        f"{document['seeds']} seeds; {document['seconds']:.0f} s, load average {', '.join(f'{x:.1f}' for x in document['load_average'])}.",
        "",
        f"Probe alone at the whole budget (the head-mode default), same seeds: macro F1 {alone['macro_f1']:.3f}, accuracy {alone['accuracy']:.3f}.",
        f"Best LP-FT: {best['mode']} on the top {best['tune_layers']} layer(s), probe share {best['probe_share']:g}, expected batch "
        f"{best['expected_batch']}, {best['epochs']:g} epochs, lr {best['learning_rate']:g}: macro F1 {best['macro_f1']:.3f}, accuracy {best['accuracy']:.3f}.",
        "",
        "| mode | top layers | probe share | expected batch | epochs | lr | tune steps | probe sigma | tune sigma | tune s / run | macro F1 | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["rows"]:
        lines.append(f"| {r['mode']} | {r['tune_layers']} | {r['probe_share']:g} | {r['expected_batch']} | {r['epochs']:g} | {r['learning_rate']:g} | "
                     f"{r['tune_steps']} | {r['probe_sigma']:.3f} | {r['tune_sigma']:.3f} | {r['tune_seconds_per_run']:.0f} | "
                     f"{r['macro_f1']:.3f} | {r['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
