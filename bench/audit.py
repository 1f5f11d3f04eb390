"""The empirical audit's figures: the one-run lower bound on a correct engine and on engines broken in their
own code (noise off, clipping bypassed, every record in every step, noise 4x too small), over several seeds,
next to the certified epsilon claimed. ``python -m bench.audit [--seeds N] [--json]`` (RELIABILITY.md).

Each breakage patches one real part of the engine for the duration of a run (:func:`agent.audit.breakages.broken`), and the audit
runs unchanged (:func:`agent.audit.run.run_audit`); the tests use the same breakages.
"""

from __future__ import annotations

import argparse
import json
import statistics

from agent.audit.breakages import BREAKAGES, broken
from agent.audit.run import AuditConfig, run_audit


def measure(seeds: int, config: AuditConfig = AuditConfig()) -> list[dict]:
    """Per variant (the correct engine first): the certified epsilon claimed, the bounds of ``seeds`` seeded runs,
    and the checks that failed."""
    rows = []
    for name in (None, *BREAKAGES):
        bounds, failed, certified = [], set(), None
        for seed in range(1, seeds + 1):
            with broken(name):
                result = run_audit(AuditConfig(**{**vars(config), "seed": seed}))
            bounds.append(result.pooled.epsilon)
            failed |= {c.name for h in result.holders for c in h.checks if not c.ok}
            certified = result.epsilon_certified
        rows.append({
            "variant": name or "correct engine",
            "epsilon_certified": certified,
            "lower_bounds": bounds,
            "exceeds_certified": sum(bound > certified for bound in bounds),
            "checks_failed": sorted(failed),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--holders", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = measure(args.seeds, AuditConfig(holders=args.holders, local_steps=args.local_steps))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'variant':<28} {'certified':>9}  lower bound mean [min-max]  above certified  checks failed")
    for row in rows:
        bounds = row["lower_bounds"]
        print(f"{row['variant']:<28} {row['epsilon_certified']:>9.3f}  {statistics.mean(bounds):.2f} "
              f"[{min(bounds):.2f}-{max(bounds):.2f}]{'':<11} {row['exceeds_certified']}/{len(bounds)}{'':<12} "
              f"{', '.join(row['checks_failed']) or '-'}")


if __name__ == "__main__":
    main()
