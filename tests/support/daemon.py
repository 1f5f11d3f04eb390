"""The agent daemon's test holder: its id, budget and round plan, the tiny-BERT trainer it serves (built once per
test module), a daemon over a fresh ledger, and the agent.toml that ``ewtune agent start`` reads."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import torch
from support.ledgers import read_entries

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey
from ewtune.agent.daemon import Daemon
from ewtune.agent.policy import HolderPolicy
from ewtune.agent.rpc import DaemonClient, DaemonError
from ewtune.agent.training import LocalTrainer, TrainingConfig

HOLDER = "holder0"
BUDGET = {"budget_epsilon": 8.0, "budget_delta": 1e-5}
PLAN = {
    "run_id": "run-1",
    "round": 1,
    "steps": 3,
    # an expected batch of ~18 of the ~180 training records; the floor of 8 refuses it only if the noised count (sd 20)
    # falls below 80, ~5 sd down: about 5e-7 per daemon that trains
    "sampling_rate": 0.1,
    "noise_multiplier": 1.0,
    "clip_norm": 1.0,
    "learning_rate": 0.01,
    "delta": 1e-5,
}
REPO = Path(__file__).resolve().parents[2]
# A daemon releases its noised training-set count once, at its first start: a reservation and its commit.
COUNT = ["reserve", "commit"]


def count_epsilon(noise=20.0, delta=BUDGET["budget_delta"]):
    """The certified epsilon of one count release (ewtune.agent.released_count): the Gaussian mechanism at q = 1."""
    return certified_epsilon(PoissonGaussianEvent(1.0, noise, 1), delta)


def _training_config(tiny_bert_dir, mr_csv):
    """The training section of the holder's agent.toml (_agent_toml), with its split key named, so that the
    test's trainer and a daemon started from the file split the records alike."""
    return dict(
        model_dir=str(tiny_bert_dir), data_file=str(mr_csv), max_length=32, physical_batch_size=16, max_examples=200,
        split_key_file=str(mr_csv) + ".split-key",
    )


@pytest.fixture(scope="module")
def trainer(tiny_bert_dir, mr_csv):
    torch.set_num_threads(1)
    return LocalTrainer(TrainingConfig(**_training_config(tiny_bert_dir, mr_csv)))


@pytest.fixture
def daemon_parts(tmp_path, trainer):
    key = SigningKey.generate()
    ledger_path = tmp_path / "ledger.jsonl"
    ledger = Ledger.create(ledger_path, key, HOLDER, BUDGET)
    return key, ledger, ledger_path


def _daemon(daemon_parts, trainer, **policy):
    key, ledger, _ = daemon_parts
    return Daemon(HOLDER, HolderPolicy(**BUDGET, **policy), trainer, ledger, key)


def _global_weights(trainer):
    return {name: tensor.detach().numpy().copy() for name, tensor in trainer.trainable_state().items()}


def _kinds(ledger_path):
    return [entry["kind"] for entry in read_entries(ledger_path)]


def _agent_toml(tmp_path, tiny_bert_dir, mr_csv, epsilon=8.0):
    key_path = tmp_path / "ledger.key"
    if not key_path.exists():
        SigningKey.generate().save(key_path)
    training = _training_config(tiny_bert_dir, mr_csv)
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [holder]
            id = "{HOLDER}"
            [budget]
            epsilon = {epsilon}
            delta = 1e-5
            [policy]
            max_clip_norm = 5.0
            max_steps_per_round = 100
            [ledger]
            path = "state/ledger.jsonl"
            signing_key = "ledger.key"
            [rpc]
            address = "unix:run/agent.sock"
            [training]
            model_dir = "{training['model_dir']}"
            data_file = "{training['data_file']}"
            max_length = 32
            physical_batch_size = 16
            max_examples = 200
            split_key_file = "{training['split_key_file']}"
            """
        )
    )
    return path


def _wait_for_daemon(address, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ewtune agent start exited early: {process.stderr.read()[-2000:]}")
        try:
            with DaemonClient(address, timeout=2) as client:
                return client.describe()
        except DaemonError:
            time.sleep(0.3)
    raise AssertionError("the daemon did not come up")

