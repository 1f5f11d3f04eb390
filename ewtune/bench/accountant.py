"""``ewtune bench accountant``: epsilon and time of every accountant on a grid of DP-SGD cases.

Per case: the certified accountant, the Edgeworth estimate (orders 1-3) and bound, RDP, dp_accounting's
PLD at discretisation 1e-4 (the speed baseline), and, where installed, prv_accountant (eps_error 0.01)
and Opacus (RDP, PRV). Errors are relative to a fine reference, dp_accounting PLD at 1e-5 (pessimistic,
both directions). Every accountant is timed once, cold: each case asks a new accountant object, whose
caches start empty, and each case has its own (q, sigma); with --repeats N the certified bound and PLD 1e-4
(the speed ratio's pair) are timed N times each, every call cold, and the median kept. Calibration: the certified calibration against a
plain geometric bisection of sigma on dp_accounting PLD 1e-4 down to 0.2%. Prints markdown, writes JSON
with the medians and the load average (the machine is shared; times are wall-clock).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import statistics
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ewtune.bench.report import machine, timed, write

REFERENCE_INTERVAL = 1e-5
BASELINE_INTERVAL = 1e-4
PRV_EPS_ERROR = 0.01
BISECTION_BRACKET = (0.25, 16.0)
BISECTION_RELATIVE_WIDTH = 0.002
EQUAL_ACCURACY_SLACK = 1e-4  # "equal accuracy": |relative error| at most 0.01 percentage points above the baseline's
PRV_MAX_STEPS = 20000  # PRV's mesh shrinks like eps_error / sqrt(T): minutes per call beyond this on 2 cores

# (name, [(q, sigma, steps), ...], delta): q 1e-4..0.5, sigma 0.5..10, steps 10..1e5, delta 1e-8..1e-5.
CASES: tuple[tuple[str, tuple[tuple[float, float, int], ...], float], ...] = (
    ("ew-tune-sst2", ((0.029696060817532555, 0.7865, 660),), 1e-5),
    ("ew-tune-mnli", ((2000 / 392702, 0.557, 3920),), 1e-5),
    ("q0.01-s1-T1e3", ((0.01, 1.0, 1000),), 1e-5),
    ("q0.5-s10-T10", ((0.5, 10.0, 10),), 1e-6),
    ("q0.05-s0.5-T100", ((0.05, 0.5, 100),), 1e-5),
    ("q1e-4-s0.5-T1e4", ((1e-4, 0.5, 10000),), 1e-8),
    ("q0.1-s5-T1e5", ((0.1, 5.0, 100000),), 1e-5),
    ("q1e-3-s2-T1e5", ((1e-3, 2.0, 100000),), 1e-6),
    ("q1e-4-s1-T1e5", ((1e-4, 1.0, 100000),), 1e-8),
    ("hetero-3-phases", ((0.01, 1.0, 500), (0.02, 1.2, 300), (0.005, 0.8, 1000)), 1e-5),
)
QUICK_CASES = ("ew-tune-sst2", "q0.1-s5-T1e5", "hetero-3-phases")
SPEED_PAIR = ("certified", "pld_1e-4")  # the speed ratio's accountants: timed --repeats times

# (name, q, steps, target epsilon, delta)
CALIBRATIONS = (
    ("ew-tune-sst2 eps=8", 0.029696060817532555, 660, 8.0, 1e-5),
    ("q0.01-T1e3 eps=1", 0.01, 1000, 1.0, 1e-5),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (and reuse its cached references)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown tables to PATH")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)} and one calibration")
    parser.add_argument("--repeats", type=positive_int_argument, default=1, metavar="N",
                        help="time the certified bound and PLD 1e-4 (the speed ratio's pair) N times cold, keep the median")


def run(args: argparse.Namespace) -> int:
    cached = cached_references(Path(args.json)) if args.json else {}
    cases = [case for case in CASES if not args.quick or case[0] in QUICK_CASES]
    calibrations = CALIBRATIONS[:1] if args.quick else CALIBRATIONS
    _import_everything()
    before = machine()
    results = [_run_case(name, phases, delta, cached, args.repeats) for name, phases, delta in cases]
    calibration_results = [_run_calibration(*spec) for spec in calibrations]
    after = machine()
    report = {
        "command": "ewtune bench accountant" + (" --quick" if args.quick else "") + (f" --repeats {args.repeats}" if args.repeats > 1 else ""),
        "repeats": args.repeats,
        "load_average_before": before.pop("load_average"),
        "load_average_after": after["load_average"],
        "machine": before,
        "versions": _versions(),
        "reference": f"dp_accounting PLD, value_discretization_interval={REFERENCE_INTERVAL:g}, max(add, remove)",
        "cases": results,
        "calibration": calibration_results,
        "summary": _summary(results, calibration_results),
    }
    write(report, render_markdown(report), args.json, args.markdown)
    return 0


# --- one case ---------------------------------------------------------------------------------------


def _run_case(name: str, phases, delta: float, cached: dict[str, float], repeats: int = 1) -> dict[str, Any]:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.events import PoissonGaussianEvent, compose

    event = compose(*(PoissonGaussianEvent(q, sigma, steps) for q, sigma, steps in phases))
    accountants = _accountants(event, phases, delta)
    entries = {label: measure(compute, repeats if label in SPEED_PAIR else 1) for label, compute in accountants}
    key = reference_key(phases, delta)
    if key in cached:
        reference = {"epsilon": cached[key], "seconds": None, "cached": True}
    else:
        reference = measure(lambda: _dp_accounting_pld(event, delta, REFERENCE_INTERVAL))
        reference["cached"] = False
    for entry in entries.values():
        entry["relative_error"] = _relative_error(entry.get("epsilon"), reference.get("epsilon"))
    return {
        "name": name,
        "phases": [list(phase) for phase in phases],
        "steps": sum(steps for _, _, steps in phases),
        "delta": delta,
        "reference_key": key,
        "reference": reference,
        "accountants": entries,
        "speed_ratio_vs_pld_1e-4": _ratio(entries["pld_1e-4"].get("seconds"), entries["certified"].get("seconds")),
    }


def _accountants(event, phases, delta: float) -> list[tuple[str, Callable[[], float | None]]]:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.certified import CertifiedAccountant
    from ewtune.accountant.edgeworth import EdgeworthAccountant, EdgeworthBoundAccountant
    from ewtune.accountant.rdp import RdpAccountant

    # Each lambda makes its accountant when called, so that it starts with empty caches: timed cold.
    accountants: list[tuple[str, Callable[[], float | None]]] = [
        ("certified", lambda: CertifiedAccountant().epsilon_of(event, delta)),
        ("edgeworth_1", lambda: EdgeworthAccountant(1).epsilon_of(event, delta)),
        ("edgeworth_2", lambda: EdgeworthAccountant(2).epsilon_of(event, delta)),
        ("edgeworth_3", lambda: EdgeworthAccountant(3).epsilon_of(event, delta)),
        ("edgeworth_bound", lambda: EdgeworthBoundAccountant().epsilon_of(event, delta)),
        ("rdp", lambda: RdpAccountant().epsilon_of(event, delta)),
        ("pld_1e-4", lambda: _dp_accounting_pld(event, delta, BASELINE_INTERVAL)),
    ]
    prv_feasible = sum(steps for _, _, steps in phases) <= PRV_MAX_STEPS
    if _installed("prv_accountant") and prv_feasible:
        accountants.append(("prv_0.01", lambda: _prv_accountant(phases, delta)))
    if _installed("opacus"):
        accountants.append(("opacus_rdp", lambda: _opacus(phases, delta, "rdp")))
        if prv_feasible:
            accountants.append(("opacus_prv", lambda: _opacus(phases, delta, "prv")))
    return accountants


def _import_everything() -> None:
    """Import every accountant before the first timed call, so that no call is charged an import."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting's RDP warns per skipped fractional order
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # Opacus, expected
    for module in ("ewtune.accountant.certified", "ewtune.accountant.edgeworth", "ewtune.accountant.rdp", "dp_accounting.pld.pld_privacy_accountant",
                   "prv_accountant", "opacus.accountants"):
        if _installed(module.split(".")[0]):
            importlib.import_module(module)


def measure(compute: Callable[[], float | None], repeats: int = 1) -> dict[str, Any]:
    """epsilon and seconds of ``compute`` (each call cold: it makes its own accountant); with repeats, the
    median seconds of that many calls, which are all listed."""
    failures: list[str] = []

    def attempt() -> float | None:
        try:
            return compute()
        except Exception as failure:  # a peer accountant's failure is a result to report, not a crash
            failures.append(f"{type(failure).__name__}: {failure}")
            return None

    runs = [timed(attempt) for _ in range(repeats)]
    value, seconds = runs[-1][0], statistics.median(seconds for _, seconds in runs)
    if failures:
        return {"epsilon": None, "seconds": seconds, "error": failures[0]}
    entry = {"epsilon": None if value is None else float(value), "seconds": seconds}
    if repeats > 1:
        entry["seconds_each"] = [seconds for _, seconds in runs]
    return entry


def positive_int_argument(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


# --- peer accountants ---------------------------------------------------------------------------------


def _dp_accounting_pld(event, delta: float, interval: float) -> float:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from dp_accounting.pld import pld_privacy_accountant

    from ewtune.accountant.events import to_dp_accounting

    dp_event, relation = to_dp_accounting(event)
    accountant = pld_privacy_accountant.PLDAccountant(relation, value_discretization_interval=interval)
    accountant.compose(dp_event)
    return float(accountant.get_epsilon(delta))


def _prv_accountant(phases, delta: float) -> float:
    """prv_accountant's upper bound (Gopi, Lee, Wutschitz 2021), eps_error 0.01, delta_error delta/1000."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for q, s, _ in phases]
    steps = [n for _, _, n in phases]
    accountant = PRVAccountant(
        prvs=prvs, max_self_compositions=steps, eps_error=PRV_EPS_ERROR, delta_error=delta / 1000
    )
    return float(accountant.compute_epsilon(delta=delta, num_self_compositions=steps)[2])


def _opacus(phases, delta: float, kind: str) -> float:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import torch
    from opacus.accountants import PRVAccountant, RDPAccountant

    torch.set_num_threads(1)
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    accountant.history = [(sigma, q, steps) for q, sigma, steps in phases]
    return float(accountant.get_epsilon(delta))


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- calibration ----------------------------------------------------------------------------------------


def _run_calibration(name: str, q: float, steps: int, target: float, delta: float) -> dict[str, Any]:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.events import PoissonGaussianEvent

    from ewtune.accountant.calibration import calibrate_noise_multiplier

    result: dict[str, Any] = {"name": name, "sampling_rate": q, "steps": steps, "target_epsilon": target, "delta": delta}
    # The calibration makes its own accountants: it starts cold.
    calibration, seconds = timed(lambda: calibrate_noise_multiplier(target, delta, [(q, steps)]))
    result["certified"] = {
        "noise_multiplier": calibration.noise_multiplier,
        "epsilon_certified": calibration.epsilon_certified,
        "evaluations": calibration.certified_evaluations,
        "seconds": seconds,
    }
    epsilon_at = lambda s: _dp_accounting_pld(PoissonGaussianEvent(q, s, steps), delta, BASELINE_INTERVAL)  # noqa: E731
    (sigma, evaluations), seconds = timed(lambda: bisection(epsilon_at, target))
    result["bisection_pld_1e-4"] = {"noise_multiplier": sigma, "evaluations": evaluations, "seconds": seconds}
    result["speed_ratio"] = _ratio(result["bisection_pld_1e-4"]["seconds"], result["certified"].get("seconds"))
    return result


def bisection(epsilon_of: Callable[[float], float], target: float) -> tuple[float, int]:
    """Plain geometric bisection on a fixed bracket: the smallest sigma (to 0.2%) with epsilon <= target."""
    low, high = BISECTION_BRACKET
    evaluations = 0
    while high / low > 1.0 + BISECTION_RELATIVE_WIDTH:
        middle = math.sqrt(low * high)
        evaluations += 1
        if epsilon_of(middle) <= target:
            high = middle
        else:
            low = middle
    return high, evaluations


# --- summary and rendering ------------------------------------------------------------------------------


def _summary(results: list[dict[str, Any]], calibrations: list[dict[str, Any]]) -> dict[str, Any]:
    def column(label: str, field: str) -> list[float]:
        return [r["accountants"][label][field] for r in results if r["accountants"].get(label, {}).get(field) is not None]

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    labels = sorted({label for r in results for label in r["accountants"]})
    ratios = [r["speed_ratio_vs_pld_1e-4"] for r in results if r["speed_ratio_vs_pld_1e-4"] is not None]
    long_runs = [r["accountants"]["certified"]["seconds"] for r in results if r["steps"] >= 100000]
    equal_or_better = [
        abs(r["accountants"]["certified"]["relative_error"]) <= abs(r["accountants"]["pld_1e-4"]["relative_error"]) + EQUAL_ACCURACY_SLACK
        for r in results
        if r["accountants"]["certified"].get("relative_error") is not None
        and r["accountants"]["pld_1e-4"].get("relative_error") is not None
    ]
    within_half_percent = [
        abs(r["accountants"]["certified"]["relative_error"]) <= 0.005
        for r in results
        if r["accountants"]["certified"].get("relative_error") is not None
    ]
    calibration_ratios = [c["speed_ratio"] for c in calibrations if c.get("speed_ratio") is not None]
    return {
        "median_seconds": {label: median(column(label, "seconds")) for label in labels},
        "median_abs_relative_error": {label: median([abs(e) for e in column(label, "relative_error")]) for label in labels},
        "max_relative_error": {label: max(column(label, "relative_error"), default=None) for label in labels},
        "min_relative_error": {label: min(column(label, "relative_error"), default=None) for label in labels},
        "speed_ratio_certified_vs_pld_1e-4": {"median": median(ratios), "min": min(ratios, default=None)},
        "certified_accuracy_equal_or_better_than_pld_1e-4": f"{sum(equal_or_better)}/{len(equal_or_better)}",
        "certified_within_0.5%_of_reference": f"{sum(within_half_percent)}/{len(within_half_percent)}",
        "certified_max_seconds_at_1e5_steps": max(long_runs, default=None),
        "calibration_speed_ratio": {"median": median(calibration_ratios), "min": min(calibration_ratios, default=None)},
    }


_COLUMNS = (
    ("certified", "certified"),
    ("pld_1e-4", "PLD 1e-4"),
    ("edgeworth_1", "EW-1"),
    ("edgeworth_2", "EW-2"),
    ("edgeworth_3", "EW-3"),
    ("edgeworth_bound", "EW bound"),
    ("rdp", "RDP"),
    ("prv_0.01", "PRV 0.01"),
    ("opacus_rdp", "Opacus RDP"),
    ("opacus_prv", "Opacus PRV"),
)


def render_markdown(report: dict[str, Any]) -> str:
    cases = report["cases"]
    columns = [(key, title) for key, title in _COLUMNS if any(key in r["accountants"] for r in cases)]
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items() if version)
    lines = [
        f"`{report['command']}` ({versions})",
        "",
        "### Epsilon (relative error vs the reference: dp_accounting PLD 1e-5)",
        "",
        "| case | steps | delta | reference | " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * (4 + len(columns)),
    ]
    for r in cases:
        cells = [_epsilon_cell(r["accountants"].get(key)) for key, _ in columns]
        lines.append(f"| {r['name']} | {r['steps']} | {r['delta']:g} | {_fmt(r['reference']['epsilon'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Seconds per call (cold"
        + (f"; certified and PLD 1e-4: median of {report['repeats']}" if report.get("repeats", 1) > 1 else "")
        + ") and speed ratio certified vs dp_accounting PLD 1e-4",
        "",
        "| case | ratio | " + " | ".join(title for _, title in columns) + " | reference |",
        "|" + "---|" * (3 + len(columns)),
    ]
    for r in cases:
        cells = [_seconds_cell(r["accountants"].get(key)) for key, _ in columns]
        reference = "cached" if r["reference"].get("cached") else _seconds_cell(r["reference"])
        ratio = r["speed_ratio_vs_pld_1e-4"]
        lines.append(f"| {r['name']} | {_times(ratio)} | " + " | ".join(cells) + f" | {reference} |")
    lines += ["", "### Calibration (sigma for a target epsilon)", "",
              "| case | certified sigma | evals | seconds | bisection on PLD 1e-4 sigma | evals | seconds | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for c in report["calibration"]:
        cert, bisect = c["certified"], c["bisection_pld_1e-4"]
        lines.append(
            f"| {c['name']} | {_fmt(cert.get('noise_multiplier'), '.5f')} | {cert.get('evaluations', 'n/a')} | "
            f"{_fmt(cert.get('seconds'), '.2f')} | {_fmt(bisect['noise_multiplier'], '.5f')} | {bisect['evaluations']} | "
            f"{_fmt(bisect['seconds'], '.2f')} | {_times(c.get('speed_ratio'))} |"
        )
    s = report["summary"]
    lines += [
        "",
        f"Median speed ratio certified vs PLD 1e-4: {_times(s['speed_ratio_certified_vs_pld_1e-4']['median'])} "
        f"(min {_times(s['speed_ratio_certified_vs_pld_1e-4']['min'])}); certified accuracy equal (|error| within "
        f"{100 * EQUAL_ACCURACY_SLACK:g} percentage points) or better than PLD 1e-4 in "
        f"{s['certified_accuracy_equal_or_better_than_pld_1e-4']} cases and within 0.5% of the reference in "
        f"{s['certified_within_0.5%_of_reference']}; slowest certified call at 1e5 steps: "
        f"{_fmt(s['certified_max_seconds_at_1e5_steps'], '.3f')} s; calibration speed ratio (median): "
        f"{_times(s['calibration_speed_ratio']['median'])}.",
        "Median |relative error| per accountant: "
        + ", ".join(f"{title} {_fmt(_percent(s['median_abs_relative_error'].get(key)), '.2f')}%" for key, title in columns
                    if s["median_abs_relative_error"].get(key) is not None)
        + ".",
        f"Load average before/after: {_loads(report['load_average_before'])} / {_loads(report['load_average_after'])} "
        f"on {report['machine']['cpus']} CPUs. Edgeworth values are estimates (no guarantee); 'vacuous' = the "
        "rigorous Edgeworth bound certifies nothing at this delta; n/a for PRV = skipped above "
        f"{PRV_MAX_STEPS} steps (minutes per call here).",
    ]
    return "\n".join(lines)


def _epsilon_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    if entry.get("error"):
        return "failed"
    if entry["epsilon"] is None:
        return "vacuous"
    error = entry.get("relative_error")
    return f"{_fmt(entry['epsilon'])} ({'' if error is None else f'{100 * error:+.2f}%'})"


def _seconds_cell(entry: dict[str, Any] | None) -> str:
    return "n/a" if entry is None or entry.get("seconds") is None else f"{entry['seconds']:.3f}"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _loads(loads) -> str:
    return "/".join(f"{x:.1f}" for x in loads)


def _relative_error(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not math.isfinite(value) or reference == 0:
        return None
    return (value - reference) / reference


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return None if not slow or not fast else slow / fast


# --- reference cache ----------------------------------------------------------------------------------


def reference_key(phases, delta: float) -> str:
    """Everything the reference value depends on: recomputed whenever any of it changes."""
    return json.dumps(
        {
            "phases": [[float(q), float(s), int(n)] for q, s, n in phases],
            "delta": delta,
            "relation": "add_remove",
            "interval": REFERENCE_INTERVAL,
            "dp_accounting": _version("dp-accounting"),
        },
        sort_keys=True,
    )


def cached_references(path: Path) -> dict[str, float]:
    """The reference epsilons of an earlier report at ``path``, by :func:`reference_key`; empty when there is none."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {
        case["reference_key"]: case["reference"]["epsilon"]
        for case in previous.get("cases", [])
        if case.get("reference_key") and case.get("reference", {}).get("epsilon") is not None
    }


def _versions() -> dict[str, str | None]:
    return {name: _version(name) for name in ("ewtune", "dp-accounting", "prv-accountant", "opacus", "numpy", "scipy")}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
