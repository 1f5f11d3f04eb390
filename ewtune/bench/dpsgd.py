"""``ewtune bench dpsgd``: the cost of a DP-SGD step against non-private training and Opacus 1.6.

Same model (``--model``: all-MiniLM-L6-v2 by default, or a random-init RoBERTa-large-size or Llama-style 1B
classifier built on the device, see ``dpsgd_models``; 2 labels, eager attention), same batch (32 sequences of 64
tokens, lengths 32..64 with right padding), same optimizer (AdamW) for every engine; a step is forward,
backward, clipping, noise (sigma = 1, C = 1) and the optimizer step:

- ``non-private``: plain autograd, the physical floor;
- ``ewtune``: this project's book-keeping engine (``ewtune.agent.dpsgd``);
- ``opacus-hooks``: Opacus ``GradSampleModule`` + ``DPOptimizer`` (per-sample gradients instantiated);
- ``opacus-ghost``: Opacus fast gradient / ghost clipping (two backward passes).

Every (mode, engine) configuration runs in a fresh subprocess, so that peak memories are separate, with
``torch.set_num_threads`` fixed; configurations are interleaved across repetitions because the machine is
shared, and the table reports medians. On CPU the primary time is the process CPU time per step, which
time-sharing with other jobs does not inflate (at one thread it equals the wall time on an idle core);
wall time is reported beside it. Peak memory is the peak resident set size during the timed steps
(``VmHWM``, reset after loading) on CPU and ``torch.cuda.max_memory_allocated`` on GPU. Tokens per second count
the non-padding tokens of the batch.

``ewtune.cli`` imports this module for every command (``ewtune.bench.cli`` registers each benchmark), so torch
(+0.9 s measured), opacus and the engines load inside the functions that run a configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.agent.device import DEVICE_HELP, PRECISIONS, resolve_device
from ewtune.bench.dpsgd_models import BUILT_FROM_CONFIG, MODELS, SCALES, model_and_batch, title
from ewtune.bench.report import machine, write

ENGINES = ("non-private", "ewtune", "opacus-hooks", "opacus-ghost")
MODES = ("lora", "full")
OPACUS = ("opacus-hooks", "opacus-ghost")
GOALS = {"lora": 1.05, "full": 1.2}
MEMORY_GOAL = 1.2


def add_arguments(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="minilm", help="minilm (pretrained, default) or a random-init "
                        "RoBERTa-large-size / Llama-style 1B classifier built on the device")
    parser.add_argument("--scale", choices=SCALES, default="full", help="tiny: a 2-layer, hidden-64 version of "
                        "roberta-large / llama-1b (CPU tests)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both", help="LoRA, full fine-tuning, or both")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all configurations")
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_HELP} (default cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: bfloat16 autocast for the forward pass (CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write all runs and the summary here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")


def _validate(args) -> list[str]:
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        raise InvalidInputError(f"unknown engine(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENGINES)}")
    for name in ("steps", "repeats", "threads", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise InvalidInputError("--warmup must be non-negative")
    if args.scale != "full" and args.model not in BUILT_FROM_CONFIG:
        raise InvalidInputError(f"--scale {args.scale} applies to {' and '.join(BUILT_FROM_CONFIG)}, not the pretrained {args.model}")
    args.device = str(resolve_device(args.device, args.precision))  # auto: cuda or cpu; a missing GPU: one line
    return engines


def _run_worker(config: dict) -> dict:
    command = [sys.executable, "-c", "import ewtune.bench.dpsgd as b; b.worker_main()"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(command, input=json.dumps(config), capture_output=True, text=True, env=env)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        return {**config, "error": f"exit {completed.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


def run(args) -> int:
    engines = _validate(args)
    modes = MODES if args.mode == "both" else (args.mode,)
    started = time.time()
    load_start = machine()["load_average"]
    runs = []
    for repeat in range(args.repeats):
        for mode in modes:
            order = engines[repeat % len(engines) :] + engines[: repeat % len(engines)]
            for engine in order:
                config = {
                    "model": args.model, "scale": args.scale, "mode": mode, "engine": engine, "steps": args.steps, "warmup": args.warmup,
                    "device": args.device, "bf16": args.precision == "bf16", "threads": args.threads,
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "repeat": repeat,
                }  # fmt: skip
                result = _run_worker(config)
                runs.append(result)
                status = result.get("error") or f"{statistics.median(result['cpu_seconds']):.3f} CPU s/step"
                print(f"[{repeat + 1}/{args.repeats}] {mode:4s} {engine:13s} {status}", file=sys.stderr, flush=True)
    summary = summarise(runs, modes, engines, args.device)
    report = {
        "benchmark": "dpsgd",
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key != "func"},
        "environment": _environment(args.device),
        "load_average_start": load_start,
        "load_average_end": machine()["load_average"],
        "seconds": round(time.time() - started, 1),
        "summary": summary,
        "runs": runs,
    }
    write(report, markdown(report), args.json, args.markdown)
    return 0


def _on_cuda(device: str) -> bool:
    """Whether a resolved device name (``cpu``, ``cuda``, ``cuda:N``) is a CUDA device."""
    return device.startswith("cuda")


def _environment(device: str) -> dict:
    import torch  # deferred: see the module docstring

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": device}
    try:
        import opacus  # deferred: +1.9 s over torch; optional (the [bench] extra)

        env["opacus"] = opacus.__version__
    except ImportError:
        env["opacus"] = None
    if _on_cuda(device):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def summarise(runs: list[dict], modes, engines, device: str) -> list[dict]:
    """Median per (mode, engine) over its runs, with ratios to non-private and to the best Opacus mode."""
    rows = []
    for mode in modes:
        for engine in engines:
            done = [r for r in runs if r["mode"] == mode and r["engine"] == engine and "error" not in r]
            errors = [r["error"] for r in runs if r["mode"] == mode and r["engine"] == engine and "error" in r]
            if not done:
                rows.append({"mode": mode, "engine": engine, "runs": 0, "error": errors[0] if errors else "not run"})
                continue
            wall = statistics.median(statistics.median(r["wall_seconds"]) for r in done)
            cpu = statistics.median(statistics.median(r["cpu_seconds"]) for r in done)
            primary = wall if _on_cuda(device) else cpu
            rows.append({
                "mode": mode, "engine": engine, "runs": len(done),
                "seconds_per_step": primary,
                "wall_seconds_per_step": wall, "cpu_seconds_per_step": cpu,
                "examples_per_second": done[0]["batch_size"] / primary,
                "tokens_per_second": done[0]["tokens_per_step"] / primary if "tokens_per_step" in done[0] else None,
                "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in done),
                "memory_over_loaded_mb": statistics.median(r["memory_over_loaded_mb"] for r in done),
                "load_average": statistics.median(r["load_average"][0] for r in done),
                "failed_runs": len(errors),
            })  # fmt: skip
    for mode in modes:
        by_engine = {row["engine"]: row for row in rows if row["mode"] == mode and "error" not in row}
        base = by_engine.get("non-private")
        opacus = [by_engine[name] for name in OPACUS if name in by_engine]
        best = min(opacus, key=lambda row: row["seconds_per_step"]) if opacus else None
        for row in by_engine.values():
            if base:
                row["ratio_to_non_private"] = row["seconds_per_step"] / base["seconds_per_step"]
                row["memory_ratio_to_non_private"] = row["peak_memory_mb"] / base["peak_memory_mb"]
            if best:
                row["best_opacus"] = best["engine"]
                row["ratio_to_best_opacus"] = row["seconds_per_step"] / best["seconds_per_step"]
    return rows


def command_line(config: dict) -> str:
    """The command that reproduces a report with this configuration."""
    words = ["ewtune bench dpsgd", f"--mode {config['mode']}", f"--engines {config['engines']}"]
    if config.get("model", "minilm") != "minilm":  # reports from before --model existed measured minilm
        words += [f"--model {config['model']}"] + ([f"--scale {config['scale']}"] if config["scale"] != "full" else [])
    words += [f"--{name.replace('_', '-')} {config[name]}" for name in ("steps", "warmup", "repeats", "threads")]
    words += [f"--batch-size {config['batch_size']}", f"--seq-len {config['seq_len']}", f"--device {config['device']}"]
    return " ".join(words + [f"--precision {config['precision']}"])


def _format(value, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def markdown(report: dict) -> str:
    config, env = report["config"], report["environment"]
    time_kind = "wall s/step" if _on_cuda(config["device"]) else "CPU s/step"
    memory_kind = "max_memory_allocated" if _on_cuda(config["device"]) else "peak RSS"
    lines = [
        f"### ewtune bench dpsgd: {title(config.get('model', 'minilm'), config.get('scale', 'full'))}, batch {config['batch_size']} x {config['seq_len']} tokens, AdamW, "
        f"sigma=1, C=1, device {config['device']}{' (bf16 autocast)' if config['precision'] == 'bf16' else ''}, "
        f"{config['threads']} thread(s), torch {env['torch']}, opacus {env['opacus']}",
        "",
        f"Command: `{command_line(config)}`",
        "",
        f"Medians over {config['repeats']} interleaved runs (fresh process each) of the median of {config['steps']} steps "
        f"after {config['warmup']} warm-up steps. Load average at start {report['load_average_start'][0]:.2f}, "
        f"at end {report['load_average_end'][0]:.2f} ({env['cpu_count']} CPUs).",
        "",
        f"| mode | engine | runs | {time_kind} | wall s/step | examples/s | tokens/s | x non-private | x best Opacus "
        f"| {memory_kind} MB | over loaded MB | memory x non-private | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        if "error" in row:
            lines.append(f"| {row['mode']} | {row['engine']} | 0 | failed: {row['error']} ||||||||||")
            continue
        lines.append(
            f"| {row['mode']} | {row['engine']} | {row['runs']} | {row['seconds_per_step']:.3f} "
            f"| {row['wall_seconds_per_step']:.3f} | {row['examples_per_second']:.1f} "
            f"| {_format(row.get('tokens_per_second'), '{:.0f}')} "
            f"| {_format(row.get('ratio_to_non_private'), '{:.2f}x')} "
            f"| {_format(row.get('ratio_to_best_opacus'), '{:.2f}x')} "
            f"| {row['peak_memory_mb']:.0f} | {row['memory_over_loaded_mb']:.0f} "
            f"| {_format(row.get('memory_ratio_to_non_private'), '{:.2f}x')} | {row['load_average']:.1f} |"
        )
    lines += ["", *_goal_lines(report["summary"])]
    return "\n".join(lines) + "\n"


def _goal_lines(summary: list[dict]) -> list[str]:
    lines = []
    for row in summary:
        if row["engine"] != "ewtune" or "ratio_to_non_private" not in row:
            continue
        goal = GOALS[row["mode"]]
        checks = [
            f"time {row['ratio_to_non_private']:.2f}x non-private (goal <= {goal}x: {'met' if row['ratio_to_non_private'] <= goal else 'NOT met'})",
            f"peak memory {row['memory_ratio_to_non_private']:.2f}x (goal <= {MEMORY_GOAL}x: "
            f"{'met' if row['memory_ratio_to_non_private'] <= MEMORY_GOAL else 'NOT met'})",
        ]
        if "ratio_to_best_opacus" in row:
            verdict = "met" if row["ratio_to_best_opacus"] <= 1.0 else "NOT met"
            checks.append(f"{row['ratio_to_best_opacus']:.2f}x the best Opacus mode, {row['best_opacus']} (goal <= 1x: {verdict})")
        lines.append(f"- {row['mode']}: ewtune " + "; ".join(checks))
    return lines


# ----------------------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process.


def _resident_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise EwtuneError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _step_function(engine: str, model, batch: dict, config: dict):
    # deferred: see the module docstring
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch["labels"]
    size = config["batch_size"]
    if engine == "non-private":

        def step():
            F.cross_entropy(model(**inputs).logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    if engine == "ewtune":
        # deferred: +0.7 s over torch; +7 MB resident, which would count in the other engines' peak memory
        from ewtune.agent.dpsgd import DPSGDStep, PerExampleClipper, classification_loss

        clipper = PerExampleClipper(model, 1.0, classification_loss)
        dp_step = DPSGDStep(model, clipper, optimizer, 1.0, 1.0, size, size)  # noise from the secure source, as shipped
        return lambda: dp_step.step(batch)
    if engine == "opacus-hooks":
        # deferred: opacus +1.9 s and +114 MB resident, which would count in the other engines' peak memory
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        wrapped = GradSampleModule(model, loss_reduction="mean")
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=size)

        def step():
            F.cross_entropy(wrapped(**inputs).logits.float(), labels).backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

        return step
    if engine == "opacus-ghost":
        # deferred: opacus +1.9 s and +114 MB resident, which would count in the other engines' peak memory
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        dp_optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=size
        )
        criterion = DPLossFastGradientClipping(wrapped, dp_optimizer, torch.nn.CrossEntropyLoss())

        def step():
            criterion(wrapped(**inputs).logits.float(), labels).backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

        return step
    raise InvalidInputError(f"unknown engine {engine}")


def worker(config: dict) -> dict:
    """Time one configuration: warm-up steps, then timed steps; peak memory over the timed steps."""
    import torch  # deferred: see the module docstring

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    cuda = _on_cuda(config["device"])
    if cuda:  # cuda:N: synchronize and the memory counters below then mean that device
        torch.cuda.set_device(torch.device(config["device"]).index or 0)
    model, batch = model_and_batch(config)
    step = _step_function(config["engine"], model, batch, config)
    autocast = (
        (lambda: torch.autocast(torch.device(config["device"]).type, dtype=torch.bfloat16)) if config["bf16"] else contextlib.nullcontext
    )
    wall, cpu = [], []
    for index in range(config["warmup"] + config["steps"]):
        if index == config["warmup"]:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()
            loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _resident_mb("VmRSS")
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        with autocast():
            step()
        if cuda:
            torch.cuda.synchronize()
        if index >= config["warmup"]:
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _resident_mb("VmHWM")
    return {
        **config,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_memory_mb": peak_mb,
        "memory_over_loaded_mb": peak_mb - loaded_mb,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": int(batch["attention_mask"].sum()),
        "load_average": os.getloadavg(),
    }


def worker_main() -> None:
    """Entry point of the subprocess: a JSON config on stdin, a JSON result as the last line of stdout."""
    config = json.loads(sys.stdin.read())
    try:
        result = worker(config)
    except Exception as error:  # reported in the table, the other configurations still run
        result = {**config, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    print(json.dumps(result))
