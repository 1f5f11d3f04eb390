"""``ewtune bench cli``: how fast the command line answers, as whole processes (start to exit).

Three commands run interleaved, ``--repeats`` times each, and the medians are compared in the same run:

- ``ewtune accountant epsilon`` at q = 0.01, sigma = 1, 1e5 steps, delta = 1e-5 (certified, Edgeworth
  orders 1-3 and bound);
- the same epsilon from a whole Python process running dp_accounting's PLD accountant at its default
  discretisation 1e-4 (the baseline; goal: ``ewtune`` >= 3x faster);
- ``ewtune --help`` (goal: under 0.5 s).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench.report import machine, median, process_seconds, write

CASE = {"sampling_rate": 0.01, "noise_multiplier": 1.0, "steps": 100_000, "delta": 1e-5}
DP_ACCOUNTING_PLD = (
    "from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent\n"
    "from dp_accounting.pld.pld_privacy_accountant import PLDAccountant\n"
    "event = SelfComposedDpEvent(PoissonSampledDpEvent({sampling_rate}, GaussianDpEvent({noise_multiplier})), {steps})\n"
    "print(PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon({delta}))\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", default="7", metavar="N", help="runs of each command (default 7)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown table to PATH")


def commands() -> dict[str, list[str]]:
    ewtune = str(Path(sys.executable).parent / "ewtune")
    epsilon = [
        ewtune, "accountant", "epsilon", "--sampling-rate", str(CASE["sampling_rate"]),
        "--noise-multiplier", str(CASE["noise_multiplier"]), "--steps", str(CASE["steps"]), "--delta", str(CASE["delta"]),
    ]
    return {
        "ewtune accountant epsilon": epsilon,
        "dp_accounting PLD 1e-4": [sys.executable, "-c", DP_ACCOUNTING_PLD.format(**CASE)],
        "ewtune --help": [ewtune, "--help"],
    }


def run(args: argparse.Namespace) -> int:
    try:
        repeats = int(args.repeats)
    except ValueError:
        raise InvalidInputError(f"--repeats must be an integer, got {args.repeats!r}") from None
    if repeats < 1:
        raise InvalidInputError(f"--repeats must be >= 1, got {repeats}")
    runs = commands()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = machine()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, command in runs.items():
            seconds[name].append(process_seconds(command, env))
    medians = {name: median(values) for name, values in seconds.items()}
    report: dict[str, Any] = {
        "command": f"ewtune bench cli --repeats {repeats}",
        "case": CASE,
        "machine_before": before,
        "machine_after": machine(),
        "seconds": seconds,
        "median_seconds": medians,
        "speedup_vs_dp_accounting_pld": medians["dp_accounting PLD 1e-4"] / medians["ewtune accountant epsilon"],
    }
    write(report, render_markdown(report), args.json, args.markdown)
    return 0


def render_markdown(report: dict[str, Any]) -> str:
    case, medians = report["case"], report["median_seconds"]
    loads = f"{report['machine_before']['load_average'][0]:.2f} -> {report['machine_after']['load_average'][0]:.2f}"
    lines = [
        f"`{report['command']}`: whole processes, start to exit, interleaved; q={case['sampling_rate']:g}, "
        f"sigma={case['noise_multiplier']:g}, {case['steps']:g} steps, delta={case['delta']:g}. "
        f"Load average (1 min) {loads} on {report['machine_before']['cpus']} CPUs.",
        "",
        "| command | median s | runs (s) |",
        "|---|---:|---|",
    ]
    for name, values in report["seconds"].items():
        lines.append(f"| `{name}` | {medians[name]:.3f} | {', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", f"`ewtune accountant epsilon` is {report['speedup_vs_dp_accounting_pld']:.2f}x faster than dp_accounting PLD at 1e-4 (medians, same run)."]
    return "\n".join(lines) + "\n"
