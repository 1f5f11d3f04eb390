"""The empirical audit's figures: the one-run lower bound on a correct engine and on engines broken in their
own code (ewtune.agent.audit.breakages: noise off, clipping bypassed, every record in every step, noise 4x or 2x too
small, noise std sigma instead of sigma C), over several seeds, next to the certified epsilon claimed, and how
often each check beside it fails. ``python -m ewtune.bench.audit [--seeds N] [--clip-norm C] [--canaries M]
[--model linear|transformer] [--variants ...] [--json]`` (RELIABILITY.md).

``--federated --runs N``: the same through real Flower processes and audit daemons on loopback
(:mod:`ewtune.federated_audit`): per variant, N federations of ``--holders`` holders whose first holder runs the
variant's engine (the others correct), each scored by the coordinator from the updates it receives; the
randomness is the OS's secure source (no seeds), so runs differ.

Each breakage patches one real part of the engine for the duration of a run (:func:`ewtune.agent.audit.breakages.broken`), and the audit
runs unchanged (:func:`ewtune.agent.audit.run.run_audit`); the tests use the same breakages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ewtune.agent.audit.breakages import BREAKAGES, broken
from ewtune.agent.audit.run import AuditConfig, run_audit


def measure(seeds: int, config: AuditConfig = AuditConfig(), variants: list[str | None] | None = None) -> list[dict]:
    """Per variant (default: the correct engine, then every breakage): the certified epsilon claimed, the bounds
    of ``seeds`` seeded runs (and the epsilons of the DP-SGD curves refuted, with ``config.fdp``), how many runs
    each check failed (on the correct engine: its false alarms), and how many runs raised any alarm."""
    rows = []
    for name in (None, *BREAKAGES) if variants is None else variants:
        bounds, curves, failures, alarms, certified = [], [], {}, 0, None
        for seed in range(1, seeds + 1):
            with broken(name):
                result = run_audit(AuditConfig(**{**vars(config), "seed": seed}))
            bounds.append(result.pooled.epsilon)
            if result.fdp is not None:
                curves.append(result.fdp.epsilon)
            for check in (c for h in result.holders for c in h.checks if not c.ok):
                failures[check.name] = failures.get(check.name, 0) + 1
            alarms += not result.passed
            certified = result.epsilon_certified
        rows.append({
            "variant": name or "correct engine",
            "epsilon_certified": certified,
            "lower_bounds": bounds,
            "exceeds_certified": sum(bound > certified for bound in bounds),
            "refuted_dpsgd_curve_epsilons": curves,
            "refuted_curve_exceeds_certified": sum(bound > certified for bound in curves),
            "check_failures": failures,
            "runs_with_an_alarm": alarms,
        })
    return rows


def randomized_response(epsilon: float, canaries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, inclusion bits, tie-breakers) of randomized response (Warner 1965) on each canary's bit: reported
    truthfully with probability e^eps / (1 + e^eps), so (epsilon, 0)-DP with respect to each canary, with a
    trade-off curve of another shape than DP-SGD's."""
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    truthful = rng.random(canaries) < np.exp(epsilon) / (1.0 + np.exp(epsilon))
    return np.where(truthful, included, ~included).astype(float), included, rng.random(canaries)


def measure_randomized_response(seeds: int, epsilon: float = 2.0, canaries: int = 1000, delta: float = 1e-5) -> list[dict]:
    """Randomized response at ``epsilon``: Steinke et al.'s bound (valid for every mechanism) and the epsilon of the
    DP-SGD curve the f-DP test refutes (a test of the DP-SGD hypothesis, not a bound), against DP-SGD curves of
    q = 0.1 over 50 steps and of one Gaussian step (q = 1, T = 1)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.fdp_one_run import dpsgd_curve_test
    from ewtune.accountant.one_run_audit import one_run_bound

    rows = []
    for rate, steps in ((0.1, 50), (1.0, 1)):
        draws = [randomized_response(epsilon, canaries, seed) for seed in range(seeds)]
        bounds = [one_run_bound(s, i, delta, t).epsilon for s, i, t in draws]
        curves = [dpsgd_curve_test(s, i, t, rate, steps, delta).epsilon for s, i, t in draws]
        rows.append({"true_epsilon": epsilon, "curves": f"DP-SGD(q {rate:g}, T {steps})", "steinke_bounds": bounds,
                     "refuted_curve_epsilons": curves, "refuted_curve_above_truth": sum(c > epsilon for c in curves)})
    return rows


def measure_federated(runs: int, variants: list[str | None], holders: int, canaries: int, local_steps: int,
                      work_dir: Path) -> list[dict]:
    """Per variant: ``runs`` real federations (the first holder's engine broken as the variant says), each
    holder's bound and the pooled one beside the certified epsilon, and each run's wall time."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.federated_audit import FederatedAuditConfig, run_federated_audit

    rows = []
    for variant in variants:
        row = {"variant": variant or "correct engine", "first_holder": [], "other_holders": [], "pooled": [],
               "epsilon_certified": None, "alarms": 0, "seconds": []}
        for run in range(runs):
            started = time.perf_counter()
            config = FederatedAuditConfig(holders=holders, canaries=canaries, local_steps=local_steps, broken_engine=variant)
            status = run_federated_audit(config, work_dir / f"{(variant or 'correct').replace(' ', '-')}-{run}")
            audit = status["audit"]
            bounds = {h: b["epsilon_lower_bound"] for h, b in audit["holders"].items()}
            row["first_holder"].append(bounds.pop("audit-0"))
            row["other_holders"].extend(bounds.values())
            row["pooled"].append(audit["pooled"]["epsilon_lower_bound"])
            row["epsilon_certified"] = audit["pooled"]["epsilon_certified_run"]
            row["alarms"] += not audit["passed"]
            row["seconds"].append(time.perf_counter() - started)
        rows.append(row)
    return rows


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]" if values else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ewtune.bench.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--holders", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--fdp", "--dpsgd-test", dest="fdp", action="store_true", help="also the f-DP test of the DP-SGD "
                        "hypothesis of each run (the epsilon of the refuted DP-SGD curve; not a lower bound on epsilon)")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="C (default 1; 2 shows the sigma vs sigma C mix-up)")
    parser.add_argument("--model", choices=("linear", "transformer"), default="linear")
    parser.add_argument("--records", type=int, default=1000, help="synthetic records per holder")
    parser.add_argument("--federated", action="store_true", help="real Flower processes and audit daemons on loopback")
    parser.add_argument("--runs", type=int, default=3, help="with --federated: federations per variant")
    parser.add_argument("--canaries", type=int, default=None, help="canaries over all holders (default 1000; 1200 "
                        "with --federated)")
    parser.add_argument("--variants", nargs="+", default=None, help="engines ('correct' or one of "
                        f"{', '.join(BREAKAGES)}; default: all, and 'correct' and 'noise off' with --federated; with "
                        "--federated the first holder's)")
    parser.add_argument("--work-dir", default=None, help="with --federated: where the federations run (default: a temporary folder)")
    parser.add_argument("--randomized-response", action="store_true", help="no training: randomized response at "
                        "epsilon 2 on 1000 canaries, Steinke's bound against the epsilon of the refuted DP-SGD curve")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.federated:
        _federated(args)
        return
    if args.randomized_response:
        rows = measure_randomized_response(args.seeds)
        print(json.dumps(rows, indent=2) if args.json else "\n".join(
            f"randomized response, true epsilon {r['true_epsilon']:g}, {args.seeds} draws: Steinke bound "
            f"{_spread(r['steinke_bounds'])}; refuted {r['curves']} curve's epsilon {_spread(r['refuted_curve_epsilons'])}, "
            f"above the truth {r['refuted_curve_above_truth']}/{args.seeds}" for r in rows))
        return
    config = AuditConfig(holders=args.holders, local_steps=args.local_steps, fdp=args.fdp, clip_norm=args.clip_norm,
                         model=args.model, records=args.records, canaries=args.canaries or 1000)
    rows = measure(args.seeds, config, _variants(args.variants))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'variant':<28} {'certified':>9}  lower bound median [min-max]  above certified  alarms  checks failed (runs)")
    for row in rows:
        bounds = row["lower_bounds"]
        failures = ", ".join(f"{name} {count}/{len(bounds)}" for name, count in sorted(row["check_failures"].items()))
        print(f"{row['variant']:<28} {row['epsilon_certified']:>9.3f}  {_spread(bounds):<28} {row['exceeds_certified']}/{len(bounds)}"
              f"{'':<12} {row['runs_with_an_alarm']}/{len(bounds)}    {failures or '-'}"
              + (f"  refuted DP-SGD curve {_spread(row['refuted_dpsgd_curve_epsilons'])}, above "
                 f"{row['refuted_curve_exceeds_certified']}/{len(bounds)}" if row["refuted_dpsgd_curve_epsilons"] else ""))


def _variants(names: list[str] | None) -> list[str | None] | None:
    return None if names is None else [None if name == "correct" else name for name in names]


def _federated(args) -> None:
    load_before = os.getloadavg()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="ewtune-bench-audit-"))
    variants = _variants(args.variants or ["correct", "noise off"])
    rows = measure_federated(args.runs, variants, args.holders, args.canaries or 1200, args.local_steps, work_dir)
    load = {"before": load_before, "after": os.getloadavg()}
    if args.json:
        print(json.dumps({"rows": rows, "load_average": load, "work_dir": str(work_dir)}, indent=2))
        return
    print(f"{args.holders} holders x {(args.canaries or 1200) // args.holders} canaries, {50 // args.local_steps} rounds x "
          f"{args.local_steps} local steps, the first holder's engine as named; load average (1, 5, 15 min) before "
          f"{load_before[0]:.1f}, {load_before[1]:.1f}, {load_before[2]:.1f}, after {load['after'][0]:.1f}, {load['after'][1]:.1f}, {load['after'][2]:.1f}")
    print(f"{'first holder engine':<28} {'certified':>9}  {'first holder, median [min-max]':<18} {'other holders':<18} {'pooled':<18} alarms  wall s (median)")
    for row in rows:
        print(f"{row['variant']:<28} {row['epsilon_certified']:>9.3f}  {_spread(row['first_holder']):<18} "
              f"{_spread(row['other_holders']):<18} {_spread(row['pooled']):<18} {row['alarms']}/{len(row['pooled'])}   "
              f"{statistics.median(row['seconds']):.0f}")


if __name__ == "__main__":
    main()
