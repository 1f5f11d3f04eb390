"""``ewtune bench certified-sweep``: the certified bound against independent truths on random configurations.

q = 1: the composition is the Gaussian mechanism with mu = s sqrt(T) / sigma (s = 1 add/remove-one, 2
replace-one) and its exact epsilon(delta) is the root of Balle & Wang 2018, Thm. 8; here it is found by a
130-step bisection in 40-digit mpmath (independent of ewtune.accountant.gaussian_closed_form, which answers the
certified bound at q = 1). q < 1: dp_accounting's optimistic PLD (privacy buckets, pessimistic_estimate=False)
is a lower bracket on the true privacy curve and its connect-the-dots pessimistic PLD (interval 1e-4) an upper
one; a certified epsilon is below the truth only if the optimistic delta at it exceeds delta ("below"), and
it is compared with the pessimistic epsilon. Cases with q in {0.9, 0.99, 0.999} at small
delta exercise the FFT's round-off far in the tails. Every case is appended to a JSON-lines file as it
finishes (the sweep can run for a long time in the background); a summary goes to a JSON file and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

RELATIONS = ("add_remove", "replace_one")
NEAR_ONE = (0.9, 0.99, 0.999)


def exact_gaussian_epsilon(steps: int, sigma: float, relation: str, delta: float):
    """The exact epsilon(delta) of T Gaussian steps, by bisection in 40 digits (the lower end of the bracket)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import mpmath

    with mpmath.workdps(40):
        mu = (2 if relation == "replace_one" else 1) * mpmath.sqrt(mpmath.mpf(steps)) / mpmath.mpf(sigma)
        curve = lambda e: mpmath.ncdf(-e / mu + mu / 2) - mpmath.exp(e) * mpmath.ncdf(-e / mu - mu / 2)  # noqa: E731
        if curve(mpmath.mpf(0)) <= delta:
            return mpmath.mpf(0)
        low, high = mpmath.mpf(0), mpmath.mpf(1)
        while curve(high) > delta:
            low, high = high, 2 * high
        for _ in range(130):  # from [high / 2, high]: 2^-130 relative
            middle = (low + high) / 2
            low, high = (middle, high) if curve(middle) > delta else (low, middle)
        return low  # the largest point known to be at or below the exact value


def full_batch_case(rng: random.Random) -> dict:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import mpmath

    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.events import PoissonGaussianEvent

    steps = int(10 ** rng.uniform(0, 7))
    sigma = 10 ** rng.uniform(-1, 3.5)
    delta = 10 ** rng.uniform(-12, -5)
    relation = rng.choice(RELATIONS)
    exact = exact_gaussian_epsilon(steps, sigma, relation, delta)
    bound = certified_epsilon(PoissonGaussianEvent(1.0, sigma, steps, relation), delta)
    gap = float((mpmath.mpf(bound) - exact) / exact) if exact > 0 else float(bound)
    return {"q": 1.0, "steps": steps, "sigma": sigma, "delta": delta, "relation": relation,
            "certified": bound, "exact": float(exact), "relative_gap": gap, "below": bool(mpmath.mpf(bound) < exact)}


def dp_accounting_epsilon(q, sigma, steps, relation, delta, interval, pessimistic) -> float:
    """dp_accounting's privacy-loss-distribution epsilon at ``delta`` for ``steps`` Poisson-subsampled Gaussian steps,
    discretised at ``interval``: its pessimistic estimate (an upper bound) when ``pessimistic``, else its optimistic one."""
    return float(_dp_accounting_pld(q, sigma, steps, relation, interval, pessimistic).get_epsilon_for_delta(delta))


def _dp_accounting_pld(q, sigma, steps, relation, interval, pessimistic):
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution

    neighbouring = {
        "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    }[getattr(relation, "value", relation)]
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, pessimistic_estimate=pessimistic, value_discretization_interval=interval, sampling_prob=q,
        neighboring_relation=neighbouring, use_connect_dots=pessimistic, log_mass_truncation_bound=-60,
    )
    return pld.self_compose(steps)


def subsampled_case(rng: random.Random) -> dict:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.events import PoissonGaussianEvent

    q = rng.choice(NEAR_ONE) if rng.random() < 0.4 else 10 ** rng.uniform(-3, -0.3)
    sigma = 10 ** rng.uniform(math.log10(0.6), 1.3)
    steps = int(10 ** rng.uniform(0, 3))
    delta = 10 ** rng.uniform(-12, -5)
    relation = rng.choice(RELATIONS)
    started = time.perf_counter()
    bound = certified_epsilon(PoissonGaussianEvent(q, sigma, steps, relation), delta)
    seconds = time.perf_counter() - started
    # dp_accounting's intervals: the pessimistic one fine (error ~ h^2), the optimistic one (error ~ T h, it
    # rounds every step's loss down) as fine as its grid allows.
    pessimistic = dp_accounting_epsilon(q, sigma, steps, relation, delta, 1e-4, True)
    optimistic_interval = max(2e-5, min(1e-3, 0.002 * max(pessimistic, 0.05) / steps))
    optimistic_pld = _dp_accounting_pld(q, sigma, steps, relation, optimistic_interval, False)
    optimistic = float(optimistic_pld.get_epsilon_for_delta(delta))
    # The soundness check proper: the optimistic delta (below the true one) at the certified epsilon must not
    # exceed delta. (dp_accounting's epsilon solver is unreliable beyond epsilon ~ 700, where e^eps
    # overflows; its delta at a given epsilon is not.)
    optimistic_delta = float(optimistic_pld.get_delta_for_epsilon(bound))
    return {"q": q, "steps": steps, "sigma": sigma, "delta": delta, "relation": relation,
            "certified": bound, "seconds": seconds, "optimistic": optimistic, "optimistic_interval": optimistic_interval,
            "pessimistic_1e-4": pessimistic, "relative_to_pessimistic": bound / pessimistic - 1 if pessimistic else None,
            "optimistic_delta_at_certified": optimistic_delta, "below": optimistic_delta > delta,
            "below_optimistic_epsilon": bound < optimistic}


def sweep(kind: str, count: int, seed: int, out: Path) -> dict:
    rng = random.Random(seed)
    make = full_batch_case if kind == "q1" else subsampled_case
    cases_path = out.with_suffix(".jsonl")
    started = time.time()
    with cases_path.open("w") as cases:
        rows = []
        for _ in range(count):
            row = make(rng)
            rows.append(row)
            cases.write(json.dumps(row) + "\n")
            cases.flush()
    summary = {"kind": kind, "cases": count, "seed": seed, "below": sum(row["below"] for row in rows),
               "seconds": round(time.time() - started, 1)}
    if kind == "q1":
        summary["largest_relative_gap"] = max(row["relative_gap"] for row in rows if row["exact"] > 0)
        summary["smallest_relative_gap"] = min(row["relative_gap"] for row in rows if row["exact"] > 0)
    else:
        gaps = [row["relative_to_pessimistic"] for row in rows if row["relative_to_pessimistic"] is not None]
        summary["largest_relative_to_pessimistic"] = max(gaps)
        summary["smallest_relative_to_pessimistic"] = min(gaps)
        summary["beyond_half_percent"] = sum(abs(gap) > 0.005 for gap in gaps)
        summary["above_pessimistic_by_more_than_half_percent"] = sum(gap > 0.005 for gap in gaps)
        summary["below_optimistic_epsilon"] = sum(row["below_optimistic_epsilon"] for row in rows)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=("q1", "subsampled"), help="q = 1 against mpmath, or q < 1 against dp_accounting")
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="summary JSON; the cases go beside it as .jsonl")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(sweep(args.kind, args.cases, args.seed, args.out), indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
