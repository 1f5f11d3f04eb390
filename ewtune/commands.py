"""``ewtune bench ...``: benchmark commands, one per part, each in a module of that part.

A benchmark module defines ``add_arguments(parser)`` and ``run(args) -> int`` and keeps its top-level
imports light (no torch/flwr at import time), so that registering it costs nothing.
"""

from __future__ import annotations

import importlib

# name -> (module, one-line help)
BENCHMARKS = {
    "accountant": ("ewtune.accountant_bench", "certified, Edgeworth, RDP and peer accountants: epsilon and time per case"),
    "dpsgd": ("agent.bench", "DP-SGD step time and memory against non-private training and Opacus"),
    "federation": ("ewtune.federation_bench", "coordination overhead per round with three holders on loopback"),
}


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: print a markdown table and write JSON")
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
