"""What ``ewtune agent train-local`` shows and writes (:mod:`ewtune.agent.train_cli`): each step's progress, the
result document with the certified epsilon of the steps executed composed over the phases (the guarantee) and
the Edgeworth estimate (arXiv 2206.04236) beside it, its text form, and the saved run. Imports nothing heavy
until a function runs."""

from __future__ import annotations

import json
import math
import time


def train_with_progress(trainer, plan, name: str, progress):
    """Trains one phase, reporting each step (its batch's mean training loss, local to the holder, and the
    examples per second since the first step ended, so that the probe's one-off embedding is left out) and the
    phase's end."""
    rate = _ExampleRate()

    def on_step(step: int, stats) -> None:
        per_second = rate.add(stats.examples)
        loss = stats.loss_sum / stats.examples if stats.examples else None
        progress.update(
            "step", f"DP-SGD {name}: step {step}/{plan.steps}, loss {_figure(loss, '.3f')}, {_figure(per_second, '.0f')} examples/s",
            phase=name, step=step, steps=plan.steps, batch=stats.examples, loss=loss, examples_per_second=per_second,
        )  # fmt: skip

    result = trainer.train(plan, on_step=on_step)
    metrics = result.metrics
    progress.event(
        "phase_end", f"{name}: {metrics['steps']} of {plan.steps} steps in {metrics['seconds']:.1f} s, mean training loss "
        f"{_figure(metrics['loss'], '.4f')}, {_figure(rate.per_second, '.0f')} examples/s",
        phase=name, steps=metrics["steps"], planned_steps=plan.steps, loss=metrics["loss"], examples=metrics["examples"],
        examples_per_second=rate.per_second, seconds=metrics["seconds"],
    )  # fmt: skip
    return result


class _ExampleRate:
    """Examples per second over the steps after the first (the first may include one-off work such as the
    probe's embedding pass); ``None`` until two steps have ended."""

    def __init__(self):
        self._first: float | None = None
        self._examples = 0
        self.per_second: float | None = None

    def add(self, examples: int) -> float | None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        else:
            self._examples += examples
            self.per_second = self._examples / (now - self._first) if now > self._first else None
        return self.per_second


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def summary_document(args, trainer, fitted, results, evaluation, seconds) -> dict:
    """The result document train-local prints (``--json``) and saves as run.json: the executed events, the
    certified epsilon composed over the phases (the guarantee) and the Edgeworth estimate beside it, the held-out
    metrics, and what ran (device, precision, processes, randomness)."""
    # deferred: train_cli imports this module at start-up: torch and scipy load only once a run is reported
    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.edgeworth import edgeworth_epsilon
    from ewtune.accountant.events import compose, event_to_json
    from ewtune.agent.models import count_parameters

    recipe = fitted.recipe
    executed = [result.event for _, result in results]
    event = executed[0] if len(executed) == 1 else compose(*executed)
    trainable, total = count_parameters(trainer.model)
    phases = [
        {
            "phase": done.phase.name,
            "planned_steps": done.event.steps,
            "event": event_to_json(result.event),
            "learning_rate": recipe.learning_rate(done.phase.name),
            "optimizer": recipe.optimizer(done.phase.name),
            "planned_epsilon_certified_after": done.epsilon_certified_so_far,
            "train": result.metrics,
        }
        for done, result in results
    ]
    return {
        "model_id": trainer.model_id,
        "mode": args.mode,
        "tune_layers": recipe.trained_layers,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "training_examples": trainer.dataset_size,
        "clip_norm": recipe.clip_norm,
        "recipe_fitted_to": fitted.dataset_size,  # N, or with --ledger the released noised count
        "recipe_choices": list(fitted.choices),
        "phases": phases,
        "event": event_to_json(event),
        "delta": args.delta,
        "target_epsilon": args.epsilon,
        "epsilon_certified": certified_epsilon(event, args.delta),
        "epsilon_edgeworth_estimate": edgeworth_epsilon(event, args.delta),
        "accuracy": evaluation.get("accuracy"),
        "macro_f1": evaluation.get("f1"),
        "majority_baseline": evaluation.get("majority_baseline"),  # None for a causal LM
        "perplexity": evaluation.get("perplexity"),
        "perplexity_before": evaluation.get("perplexity_before"),
        "eval": evaluation,
        "randomness": results[-1][1].randomness,
        "device": str(trainer.device),
        "processes": args.nproc,
        "sharding": args.sharding,
        "precision": trainer.precision,
        "output": str(args.output) if args.output else None,
        "seconds": seconds,
    }


def save_run(trainer, output, summary) -> None:
    """The model (the adapter; in full and head modes the whole model) and run.json under ``output``."""
    # deferred: train_cli imports this module at start-up: torch and scipy load only once a run is reported
    from ewtune.agent.models import save_model

    directory = save_model(trainer.model, trainer.tokenizer, output)
    (directory / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


def report_text(summary: dict) -> str:
    """The summary as the lines train-local prints without ``--json``."""
    evaluation = summary["eval"]
    lines = [f"{'recipe':<20}{choice}" for choice in summary["recipe_choices"]]
    if summary["tune_layers"]:
        lines.append(f"{'tuned':<20}the top {summary['tune_layers']} encoder layers and the head, on cached inputs "
                     f"({summary['trainable_parameters']:,} trainable parameters)")
    for phase in summary["phases"]:
        event = phase["event"]["event"]
        lines.append(
            f"{phase['phase']:<20}{event['steps']} of {phase['planned_steps']} steps (q {event['sampling_rate']:.5f}, "
            f"sigma {event['noise_multiplier']:.4f}, C {summary['clip_norm']:g}, lr {phase['learning_rate']:g} {phase['optimizer']})"
        )
    lines += [
        f"epsilon (certified) {summary['epsilon_certified']:.4f}  at delta {summary['delta']:g}  "
        f"(target {summary['target_epsilon']:g}): the guarantee, composed over the phases",
        f"epsilon (Edgeworth) {summary['epsilon_edgeworth_estimate']:.4f}  estimate only, not a guarantee",
    ]
    if "accuracy" in evaluation:
        lines.append(
            f"held-out            accuracy {evaluation['accuracy']:.4f}, macro F1 {evaluation['f1']:.4f}, majority-class "
            f"baseline {evaluation['majority_baseline']:.4f}, on {evaluation['num_examples']} examples"
        )
    else:
        lines.append(f"held-out            perplexity {evaluation['perplexity']:.4f} (before training "
                     f"{evaluation['perplexity_before']:.4f}), loss {evaluation['loss']:.4f} on {evaluation['num_examples']} examples")
    lines += [
        f"device              {summary['device']}, {summary['precision']}"
        + (f", {summary['processes']} worker processes" if summary["processes"] > 1 else ""),
        f"saved               {summary['output'] or 'not saved (use --output DIR)'}",
        f"wall time           {summary['seconds']:.1f} s",
    ]
    if summary["randomness"] != "os-secure":
        lines.append(f"randomness          {summary['randomness']}: INSECURE, reproducible from the seed (tests only)")
    return "\n".join(lines)

