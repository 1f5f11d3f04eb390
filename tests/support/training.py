"""``ewtune agent train-local``'s arguments for a fast tiny-model run, a holder ledger to charge it to, and the
marker of a test that needs a GPU."""

import pytest
import torch

from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey

# A test that needs a GPU: marked ``gpu`` (``pytest -m gpu`` runs these alone on a lent device), skipped without CUDA.
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _argv(model_dir, data_file, *extra):
    return [
        "agent", "train-local", "--model", str(model_dir), "--data", str(data_file),
        "--epsilon", "8", "--delta", "1e-5", "--probe-epochs", "1", "--probe-batch", "16", "--probe-lr", "0.5",
        "--mode", "lora", "--tune-epochs", "1", "--tune-batch", "16", "--tune-layers", "0",
        "--max-examples", "80", "--max-length", "24", "--physical-batch-size", "16", *extra,
    ]  # fmt: skip


def _holder_ledger(tmp_path, epsilon):
    """A fresh holder ledger with ``epsilon`` to spend, as the ``--ledger``/``--signing-key`` arguments."""
    key = SigningKey.generate()
    key.save(tmp_path / "ledger.key")
    Ledger.create(tmp_path / "ledger.jsonl", key, "holder", {"budget_epsilon": epsilon, "budget_delta": 1e-5}).close()
    return ["--ledger", str(tmp_path / "ledger.jsonl"), "--signing-key", str(tmp_path / "ledger.key")]


# ``python -c INTERRUPTING_LAUNCHER <K> <ewtune argv...>``: ewtune sends itself SIGINT as its DP-SGD step K begins
# (after the step's Poisson sample was drawn and its batch built; in a run of workers, rank 0, whose workers run in
# sessions of their own). SIGINT is first given a terminal's disposition, unblocked and raising KeyboardInterrupt: a
# blocked or ignored SIGINT is inherited across exec, and a test runner's process once passed one down in CI, so that
# the Ctrl-C never arrived.
INTERRUPTING_LAUNCHER = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
signal.signal(signal.SIGINT, signal.default_int_handler)
from ewtune.agent.dpsgd.step import DPSGDStep

interrupt_at, original, calls = int(sys.argv[1]), DPSGDStep.step, []

def interrupting(self, batch):
    calls.append(1)
    if len(calls) == interrupt_at:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step interrupt_at runs
    return original(self, batch)

DPSGDStep.step = interrupting
from ewtune.cli import main
sys.exit(main(sys.argv[2:]))
"""
