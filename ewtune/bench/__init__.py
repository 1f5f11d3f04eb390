"""Benchmarks: each prints a markdown table and writes JSON (and markdown) for ``benchmarks/results``, from
which ``scripts/benchmarks-md`` rebuilds BENCHMARKS.md. ``ewtune bench NAME`` runs one. (The package is
not called ``benchmarks``: Opacus installs a top-level package of that name.)

Adding a benchmark takes one module and one line:

1. a module here (``ewtune/bench/NAME.py``) defining ``add_arguments(parser)`` and ``run(args) -> int``, with
   light top-level imports (no torch or flwr: registering it must cost nothing), that times with
   :func:`ewtune.bench.report.timed`, records :func:`ewtune.bench.report.machine` and writes its results with
   :func:`ewtune.bench.report.write`;
2. its line in :data:`BENCHMARKS` below.
"""

from __future__ import annotations

# name -> (module, one-line help)
BENCHMARKS = {
    "accountant": ("ewtune.bench.accountant", "certified, Edgeworth, RDP and peer accountants: epsilon and time per case"),
    "certified-sweep": ("ewtune.bench.certified_sweep", "the certified bound on random cases: q = 1 against 40-digit mpmath, q < 1 against dp_accounting's brackets"),
    "cli": ("ewtune.bench.cli_speed", "whole-process time of `ewtune accountant epsilon` against dp_accounting PLD, and `ewtune --help`"),
    "dpsgd": ("ewtune.bench.dpsgd", "DP-SGD step time and memory against non-private training and Opacus"),
    "fsdp-memory": ("ewtune.bench.fsdp_memory", "memory per worker of full DP fine-tuning, replicated workers against FSDP2-sharded ones (train-local --nproc 2 --sharding none|fsdp)"),
    "noise": ("ewtune.bench.noise", "secure normals per second: the AES-CTR CPU source, ChaCha20 on each device, torch.randn (not secure)"),
    "federation": ("ewtune.bench.federation", "coordination overhead per round on loopback, ewtune against Flower's defaults; per holder: Flower requests, SuperLink CPU, memory, nothing lost; 3, 10 and 20 holders"),
    "federation-causal-lm": ("ewtune.bench.federation_causal_lm", "federated private LoRA fine-tuning of the packaged SmolLM2 on MR sentences, two holders, real Flower processes: held-out perplexity by round against a non-private single process"),
    "utility": ("ewtune.bench.utility", "accuracy of private linear probing of MiniLM on MR: non-private, certified epsilon 1/3/8, EW-Tune's policy, central and federated; LP-FT with --modes head lpft"),
}
