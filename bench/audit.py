"""The empirical audit's figures: the one-run lower bound on a correct engine and on engines broken in their
own code (noise off, clipping bypassed, every record in every step, noise 4x too small), over several seeds,
next to the certified epsilon claimed. ``python -m bench.audit [--seeds N] [--json]`` (RELIABILITY.md).

Each breakage patches one real part of the engine for the duration of a run (:func:`broken`), and the audit
runs unchanged (:func:`agent.audit.run.run_audit`); the tests use the same breakages.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from unittest import mock

import torch

import agent.dpsgd.step as step_module
from agent.audit.run import AuditConfig, run_audit
from agent.dpsgd.engine import PerExampleClipper
from agent.sampler import PoissonSampler

_add_noise = step_module.add_gaussian_noise_
_weighted_sums = PerExampleClipper._weighted_sums


def _no_noise(grads, std, source=None):
    return None


def _quarter_noise(grads, std, source=None):
    _add_noise(grads, std / 4, source)


def _unclipped(self, uses, instantiated, norms):
    """The engine's own weighted sum with every norm taken as 0, so every clip factor is 1."""
    return _weighted_sums(self, uses, instantiated, torch.zeros_like(norms))


def _every_record(self):
    return (torch.arange(self.num_examples) for _ in range(self.steps))


BREAKAGES = {
    "noise off": (step_module, "add_gaussian_noise_", _no_noise),
    "clipping bypassed": (PerExampleClipper, "_weighted_sums", _unclipped),
    "every record in every step": (PoissonSampler, "__iter__", _every_record),
    "noise 4x too small": (step_module, "add_gaussian_noise_", _quarter_noise),
}


@contextmanager
def broken(name: str | None):
    """Within the block, the engine part named by ``name`` (a key of BREAKAGES) is broken; None: intact."""
    if name is None:
        yield
        return
    target, attribute, replacement = BREAKAGES[name]
    with mock.patch.object(target, attribute, replacement):
        yield


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
