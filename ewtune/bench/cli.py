"""``ewtune bench ...``: one subcommand per benchmark of :data:`ewtune.bench.BENCHMARKS` (the package docstring
says how to add one)."""

from __future__ import annotations

import importlib

from ewtune.bench import BENCHMARKS


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: print a markdown table and write JSON")
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
