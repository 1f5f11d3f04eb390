"""Regenerates tests/data/pld_reference.json: dp_accounting PLD epsilons at two fine discretisations.

dp_accounting's connect-the-dots PLD is a pessimistic bound at every interval h, and it decreases to the
true epsilon as the grid is refined (a grid of h/2 contains the grid of h, and connect-the-dots on more
dots lies below the chord through fewer: Doroshenko et al. 2022). So, for each case and delta:

* ``epsilon_fine`` (interval h) is an upper bracket of the truth;
* ``2 * epsilon_fine - epsilon_coarse`` (coarse interval 2h) is a lower bracket provided the error at
  least halves when h halves (connect-the-dots converges like h^2, so it falls by about 4).

The interval is chosen per case from a first estimate at 1e-3 so that the bracket is narrow; it is
recorded with the case. Run from the repository root (takes tens of minutes on two cores):

    .venv/bin/python tests/data/make_pld_reference.py
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

DELTAS = (1e-8, 1e-6, 1e-5)
OUTPUT = Path(__file__).with_name("pld_reference.json")

# name, relation, phases [(q, sigma, steps), ...]
CASES = [
    ("ewtune_sst2", "add_remove", [(0.029696060817532555, 0.7865, 660)]),
    ("ewtune_mnli", "add_remove", [(2000 / 392702, 0.557, 3920)]),
    ("q1e-4_s1_T1e5", "add_remove", [(1e-4, 1.0, 100000)]),
    ("q1e-4_s0.5_T1e5", "add_remove", [(1e-4, 0.5, 100000)]),
    ("q1e-4_s2_T1e4", "add_remove", [(1e-4, 2.0, 10000)]),
    ("q1e-3_s0.8_T1e4", "add_remove", [(1e-3, 0.8, 10000)]),
    ("q1e-3_s5_T1e5", "add_remove", [(1e-3, 5.0, 100000)]),
    ("q1e-3_s10_T1e4", "add_remove", [(1e-3, 10.0, 10000)]),
    ("q0.005_s0.9_T1e5", "add_remove", [(0.005, 0.9, 100000)]),
    ("q0.01_s1_T1e3", "add_remove", [(0.01, 1.0, 1000)]),
    ("q0.01_s0.5_T100", "add_remove", [(0.01, 0.5, 100)]),
    ("q0.01_s2_T1e4", "add_remove", [(0.01, 2.0, 10000)]),
    ("q0.02_s8_T10", "add_remove", [(0.02, 8.0, 10)]),
    ("q0.05_s1.5_T1e3", "add_remove", [(0.05, 1.5, 1000)]),
    ("q0.1_s0.7_T100", "add_remove", [(0.1, 0.7, 100)]),
    ("q0.1_s3_T1e4", "add_remove", [(0.1, 3.0, 10000)]),
    ("q0.1_s10_T1e5", "add_remove", [(0.1, 10.0, 100000)]),
    ("q0.2_s0.6_T10", "add_remove", [(0.2, 0.6, 10)]),
    ("q0.5_s0.5_T10", "add_remove", [(0.5, 0.5, 10)]),
    ("q0.5_s1_T100", "add_remove", [(0.5, 1.0, 100)]),
    ("q0.5_s5_T1e3", "add_remove", [(0.5, 5.0, 1000)]),
    ("q0.5_s10_T1e5", "add_remove", [(0.5, 10.0, 100000)]),
    ("hetero_three_phases", "add_remove", [(0.01, 1.0, 500), (0.02, 1.2, 300), (0.005, 0.8, 1000)]),
    ("hetero_sst2_annealed", "add_remove", [(0.029696060817532555, 0.9, 330), (0.029696060817532555, 0.75, 330)]),
    ("hetero_long_then_short", "add_remove", [(1e-3, 1.0, 50000), (0.05, 2.0, 100)]),
    ("replace_q0.01_s1_T1e3", "replace_one", [(0.01, 1.0, 1000)]),
    ("replace_q0.1_s2_T100", "replace_one", [(0.1, 2.0, 100)]),
    ("replace_q1e-3_s0.8_T1e4", "replace_one", [(1e-3, 0.8, 10000)]),
]

_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


def epsilons(relation: str, phases, interval: float) -> dict[str, float]:
    accountant = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=_RELATIONS[relation], value_discretization_interval=interval
    )
    for q, sigma, steps in phases:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return {repr(delta): accountant.get_epsilon(delta) for delta in DELTAS}


def fine_interval(first_estimate: float) -> float:
    """About 3e-5 of epsilon, within [4e-6, 1e-4]: the bracket is then far narrower than 0.5%."""
    return min(1e-4, max(4e-6, 3e-5 * first_estimate))


def main() -> int:
    names = set(sys.argv[1:])
    previous = json.loads(OUTPUT.read_text())["cases"] if OUTPUT.exists() else []
    kept = [case for case in previous if names and case["name"] not in names]
    cases = []
    for name, relation, phases in CASES:
        if names and name not in names:
            continue
        started = time.perf_counter()
        first = epsilons(relation, phases, 1e-3)
        fine = fine_interval(min(first.values()))
        cases.append(
            {
                "name": name,
                "relation": relation,
                "phases": [list(phase) for phase in phases],
                "fine_interval": fine,
                "coarse_interval": 2 * fine,
                "epsilon_fine": epsilons(relation, phases, fine),
                "epsilon_coarse": epsilons(relation, phases, 2 * fine),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(cases[-1]), flush=True)
    document = {
        "generator": "tests/data/make_pld_reference.py",
        "dp_accounting_version": metadata.version("dp-accounting"),
        "method": "PLDAccountant, connect-the-dots, pessimistic; fine and coarse (2x) intervals",
        "deltas": list(DELTAS),
        "cases": kept + cases,
    }
    OUTPUT.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
