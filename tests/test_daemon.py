"""The agent daemon: policy and budget checks before any step, ledger reserve/commit/abort, signed receipts,
the gRPC API on a Unix socket, the ClientApp shim, and a clean shutdown of ``ewtune agent start``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from accountant.errors import InvalidInputError
from accountant.events import PoissonGaussianEvent
from accountant.ledger import Ledger
from accountant.receipts import update_digest, verify_receipt
from accountant.signing import SigningKey
from accountant.verify import verify_ledger
from agent.policy import HolderPolicy, PlanRefused, load_agent_config
from agent.rpc import DaemonClient, DaemonError, DaemonUnavailable, decode, encode, serve

HOLDER = "holder0"
BUDGET = {"budget_epsilon": 8.0, "budget_delta": 1e-5}
PLAN = {
    "run_id": "run-1",
    "round": 1,
    "steps": 3,
    "sampling_rate": 0.05,
    "noise_multiplier": 1.0,
    "clip_norm": 1.0,
    "learning_rate": 0.01,
    "delta": 1e-5,
}
REPO = Path(__file__).resolve().parents[1]


def _training_config(tiny_bert_dir, mr_csv):
    return dict(
        model_dir=str(tiny_bert_dir), data_file=str(mr_csv), max_length=32, physical_batch_size=16, max_examples=200
    )


@pytest.fixture(scope="module")
def trainer(tiny_bert_dir, mr_csv):
    import torch

    from agent.training import LocalTrainer, TrainingConfig

    torch.set_num_threads(1)
    return LocalTrainer(TrainingConfig(**_training_config(tiny_bert_dir, mr_csv)))


@pytest.fixture
def daemon_parts(tmp_path, trainer):
    key = SigningKey.generate()
    ledger_path = tmp_path / "ledger.jsonl"
    ledger = Ledger.create(ledger_path, key, HOLDER, BUDGET)
    return key, ledger, ledger_path


def _daemon(daemon_parts, trainer, **policy):
    from agent.daemon import Daemon

    key, ledger, _ = daemon_parts
    return Daemon(HOLDER, HolderPolicy(**BUDGET, **policy), trainer, ledger, key)


def _global_weights(trainer):
    return {name: tensor.detach().numpy().copy() for name, tensor in trainer.trainable_state().items()}


def _kinds(ledger_path):
    return [entry["kind"] for entry in _entries(ledger_path)]


def _entries(ledger_path):
    import json

    return [json.loads(line) for line in Path(ledger_path).read_text().splitlines()]


def _assert_nothing_charged(daemon, ledger_path):
    assert _kinds(ledger_path) == ["genesis"]
    assert verify_ledger(ledger_path).ok
    assert daemon.describe()["spent_epsilon_certified"] == 0.0
    assert daemon.ledger.open_reservations() == {}


# --- one round --------------------------------------------------------------------------------------------


def test_train_commits_the_executed_event_and_returns_a_receipt_that_verifies(daemon_parts, trainer):
    key, _, ledger_path = daemon_parts
    daemon = _daemon(daemon_parts, trainer)
    weights = _global_weights(trainer)
    reply = daemon.train(weights, PLAN)

    receipt = verify_receipt(reply.receipt, key.public_key_text)
    executed = PoissonGaussianEvent(PLAN["sampling_rate"], PLAN["noise_multiplier"], PLAN["steps"])
    assert (receipt.run_id, receipt.round, receipt.holder_id, receipt.event) == ("run-1", 1, HOLDER, executed)
    assert receipt.update_sha256 == update_digest(reply.arrays)
    assert set(reply.arrays) == set(weights)
    assert any(not np.array_equal(reply.arrays[name], weights[name]) for name in weights)
    assert reply.metrics["steps"] == PLAN["steps"]
    # the un-noised loss and sampled-record count are computed from the data: they never leave the holder
    assert not {"loss", "examples"} & set(reply.metrics)

    assert _kinds(ledger_path) == ["genesis", "reserve", "commit"]
    assert verify_ledger(ledger_path).ok
    commit = _entries(ledger_path)[-1]["payload"]
    assert commit["event"]["event"]["steps"] == PLAN["steps"]
    description = daemon.describe()
    from accountant.certified import certified_epsilon

    assert description["spent_epsilon_certified"] == pytest.approx(certified_epsilon(executed, 1e-5))
    assert description["public_key"] == key.public_key_text
    assert description["dataset_size"] == trainer.dataset_size
    assert daemon.ledger.open_reservations() == {}


def test_a_sigma_below_the_daemons_own_is_refused_and_nothing_is_charged(daemon_parts, trainer):
    daemon = _daemon(daemon_parts, trainer, max_epsilon_per_round=1.0)
    floor = daemon.noise_floor(PLAN["sampling_rate"], PLAN["steps"])
    with pytest.raises(PlanRefused, match="below this holder's own"):
        daemon.train(_global_weights(trainer), dict(PLAN, noise_multiplier=floor * 0.9))
    _assert_nothing_charged(daemon, daemon_parts[2])


def test_an_over_budget_plan_is_refused_and_nothing_more_is_charged(daemon_parts, trainer):
    _, ledger, ledger_path = daemon_parts
    past = PoissonGaussianEvent(0.05, 1.0, 400)  # an earlier run spent most of the budget
    ledger.commit(ledger.reserve(HOLDER, "run-0", 1, past), past)
    daemon = _daemon(daemon_parts, trainer)
    spent = daemon.describe()["spent_epsilon_certified"]
    assert spent < 8.0
    plan = dict(PLAN, steps=400, noise_multiplier=1.0)
    assert plan["noise_multiplier"] >= daemon.noise_floor(plan["sampling_rate"], plan["steps"])
    with pytest.raises(PlanRefused, match="over its budget"):
        daemon.train(_global_weights(trainer), plan)
    assert _kinds(ledger_path) == ["genesis", "reserve", "commit"]
    assert verify_ledger(ledger_path).ok
    assert daemon.describe()["spent_epsilon_certified"] == spent
    assert daemon.ledger.open_reservations() == {}


def test_the_noise_floor_stays_within_the_calibrations_sane_range(tmp_path, trainer):
    from accountant.calibration import MIN_SIGMA
    from agent.daemon import Daemon

    key, budget = SigningKey.generate(), {"budget_epsilon": 1e6, "budget_delta": 1e-5}
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, HOLDER, budget)
    daemon = Daemon(HOLDER, HolderPolicy(**budget), trainer, ledger, key)
    assert daemon.noise_floor(0.02, 1) == MIN_SIGMA
    with pytest.raises(PlanRefused, match="below this holder's own"):
        daemon.train(_global_weights(trainer), dict(PLAN, noise_multiplier=MIN_SIGMA / 2))


@pytest.mark.parametrize(
    "change, policy, reason",
    [
        ({"clip_norm": 50.0}, {"max_clip_norm": 10.0}, "clip norm"),
        ({"clip_norm": 0.01}, {"min_clip_norm": 0.1}, "clip norm"),
        ({"steps": 30}, {"max_steps_per_round": 20}, "maximum of 20"),
        ({"model_id": "some/other-model"}, {}, "is for model"),
    ],
)
def test_plans_outside_the_policy_are_refused_before_anything_is_charged(daemon_parts, trainer, change, policy, reason):
    daemon = _daemon(daemon_parts, trainer, **policy)
    with pytest.raises(PlanRefused, match=reason):
        daemon.train(_global_weights(trainer), dict(PLAN, **change))
    _assert_nothing_charged(daemon, daemon_parts[2])


def test_a_model_outside_the_allowed_list_is_refused_at_start(daemon_parts, trainer):
    with pytest.raises(PlanRefused, match="not allowed"):
        _daemon(daemon_parts, trainer, allowed_models=("org/allowed-model",))


@pytest.mark.parametrize("damage", ["missing", "unknown", "shape", "nan"])
def test_weights_that_do_not_fit_the_model_are_rejected_before_anything_is_charged(daemon_parts, trainer, damage):
    daemon = _daemon(daemon_parts, trainer)
    weights = _global_weights(trainer)
    name = sorted(weights)[0]
    if damage == "missing":
        del weights[name]
    elif damage == "unknown":
        weights["not.a.parameter"] = np.zeros(2, np.float32)
    elif damage == "shape":
        weights[name] = np.zeros((1, 1, 1), np.float32)
    else:
        weights[name] = np.full_like(weights[name], np.nan)
    with pytest.raises(InvalidInputError):
        daemon.train(weights, PLAN)
    _assert_nothing_charged(daemon, daemon_parts[2])


class _FailingTrainer:
    """The real trainer, whose training fails (crash) or is stopped before its first step."""

    def __init__(self, trainer, failure):
        self._trainer, self._failure = trainer, failure
        self.daemon = None

    def __getattr__(self, name):
        return getattr(self._trainer, name)

    def train(self, plan, should_stop=None):
        if self._failure == "crash":
            raise RuntimeError("CUDA out of memory (simulated)")
        self.daemon.request_stop()  # SIGTERM arrives just as training starts
        return self._trainer.train(plan, should_stop=should_stop)


@pytest.mark.parametrize("failure, error", [("crash", RuntimeError), ("stopped", DaemonUnavailable)])
def test_a_round_that_released_nothing_is_aborted(daemon_parts, trainer, failure, error):
    from agent.daemon import Daemon

    key, ledger, ledger_path = daemon_parts
    failing = _FailingTrainer(trainer, failure)
    daemon = failing.daemon = Daemon(HOLDER, HolderPolicy(**BUDGET), failing, ledger, key)
    with pytest.raises(error):
        daemon.train(_global_weights(trainer), PLAN)
    assert _kinds(ledger_path) == ["genesis", "reserve", "abort"]
    assert verify_ledger(ledger_path).ok
    assert daemon.describe()["spent_epsilon_certified"] == 0.0


def test_evaluate_returns_metrics_and_leaves_the_training_state_alone(daemon_parts, trainer):
    daemon = _daemon(daemon_parts, trainer)
    before = _global_weights(trainer)
    other = {name: array + np.float32(0.5) for name, array in before.items()}
    metrics = daemon.evaluate(other)
    assert {"accuracy", "loss", "num_examples"} <= set(metrics)
    after = _global_weights(trainer)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert _kinds(daemon_parts[2]) == ["genesis"]


def test_evaluation_metrics_can_be_withheld_by_policy(daemon_parts, trainer):
    daemon = _daemon(daemon_parts, trainer, release_evaluation_metrics=False)
    with pytest.raises(PlanRefused, match="does not release evaluation"):
        daemon.evaluate(_global_weights(trainer))


def test_a_budget_that_differs_from_the_ledgers_genesis_is_refused(daemon_parts, trainer):
    from agent.daemon import Daemon

    key, ledger, _ = daemon_parts
    with pytest.raises(InvalidInputError, match="cannot change"):
        Daemon(HOLDER, HolderPolicy(budget_epsilon=16.0, budget_delta=1e-5), trainer, ledger, key)


# --- over gRPC, and through the ClientApp shim ------------------------------------------------------------


@pytest.fixture
def served(daemon_parts, trainer, tmp_path):
    daemon = _daemon(daemon_parts, trainer)
    address = f"unix://{tmp_path}/agent.sock"
    server = serve(daemon, address)
    try:
        yield daemon, address
    finally:
        server.stop(grace=None).wait()


def test_the_grpc_api_on_a_unix_socket(served, trainer, daemon_parts):
    daemon, address = served
    key, _, ledger_path = daemon_parts
    with DaemonClient(address, timeout=60) as client:
        assert client.health()["status"] == "ok"
        description = client.describe()
        assert description["holder_id"] == HOLDER and description["public_key"] == key.public_key_text
        updated, receipt_document, metrics = client.train(_global_weights(trainer), PLAN)
        receipt = verify_receipt(receipt_document, key.public_key_text)
        assert receipt.update_sha256 == update_digest(updated)  # the arrays survived the wire bit for bit
        assert metrics["steps"] == PLAN["steps"]
        with pytest.raises(DaemonError) as refusal:
            client.train(_global_weights(trainer), dict(PLAN, clip_norm=1e6))
        assert refusal.value.refused and "clip norm" in refusal.value.reason
        with pytest.raises(DaemonError) as invalid:
            client.train({"x": np.zeros(1, np.float32)}, PLAN)
        assert invalid.value.status == "INVALID_ARGUMENT"
        assert "accuracy" in client.evaluate(updated)
    assert _kinds(ledger_path) == ["genesis", "reserve", "commit"]


def test_the_daemon_listens_only_on_a_unix_socket_or_loopback(daemon_parts, trainer):
    with pytest.raises(InvalidInputError, match="loopback"):
        serve(_daemon(daemon_parts, trainer), "0.0.0.0:50999")


def test_wire_messages_round_trip_and_garbage_is_rejected():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, dtype=np.float64)}
    header, decoded = decode(encode({"k": [1, "x"]}, arrays))
    assert header == {"k": [1, "x"]}
    assert update_digest(decoded) == update_digest(arrays)
    assert decode(encode({}))[1] is None
    with pytest.raises(InvalidInputError):
        decode(b"garbage")
    with pytest.raises(InvalidInputError):
        decode(encode({}) + b"not safetensors")


def _client_message(message_type, content):
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 2, 3
    return Message(content, dst_node_id=2, message_type=message_type)


def test_the_client_app_forwards_query_train_evaluate_and_refusals(served, trainer, daemon_parts):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from agent.client_app import REFUSED, app

    daemon, address = served
    key = daemon_parts[0]
    context = Context(run_id=1, node_id=2, node_config={"daemon-address": address}, state=RecordDict(), run_config={})
    arrays = ArrayRecord({name: Array(value) for name, value in _global_weights(trainer).items()})

    description = app(_client_message("query", RecordDict({})), context).content["description"]
    assert description["holder_id"] == HOLDER and description["public_key"] == key.public_key_text

    reply = app(_client_message("train", RecordDict({"arrays": arrays, "config": ConfigRecord(PLAN)})), context)
    assert not reply.has_error()
    updated = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    receipt = verify_receipt(reply.content["receipt"]["document"], key.public_key_text)
    assert receipt.update_sha256 == update_digest(updated)
    assert reply.content["metrics"]["steps"] == PLAN["steps"]

    refused = app(
        _client_message("train", RecordDict({"arrays": arrays, "config": ConfigRecord(dict(PLAN, steps=10**6))})),
        context,
    )
    assert refused.has_error() and refused.error.code == REFUSED and "maximum" in refused.error.reason

    evaluated = app(_client_message("evaluate", RecordDict({"arrays": arrays})), context)
    assert "accuracy" in evaluated.content["metrics"]

    lost = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    assert app(_client_message("query", RecordDict({})), lost).has_error()


def test_the_client_app_does_not_import_torch_or_transformers():
    code = "import sys, agent.client_app; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


# --- the command: ewtune agent start ----------------------------------------------------------------------


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
            """
        )
    )
    return path


def test_agent_toml_is_loaded_with_paths_resolved(tmp_path, tiny_bert_dir, mr_csv):
    config = load_agent_config(_agent_toml(tmp_path, tiny_bert_dir, mr_csv))
    assert config.holder_id == HOLDER and config.policy.max_steps_per_round == 100
    assert config.ledger_path == tmp_path / "state/ledger.jsonl"
    assert config.rpc_address == f"unix://{tmp_path}/run/agent.sock"
    assert config.supernode is None
    (tmp_path / "bad.toml").write_text("[holder]\nid = 'h'\n[budget]\nepsilon = -1\ndelta = 1e-5\n")
    with pytest.raises(InvalidInputError, match="budget epsilon"):
        load_agent_config(tmp_path / "bad.toml")


def test_the_example_agent_toml_is_valid():
    config = load_agent_config(REPO / "deploy/agent.toml.example")
    assert config.policy.budget_epsilon == 8.0 and config.rpc_address == "unix:///run/ewtune-agent/agent.sock"
    assert config.supernode is None


def test_ewtune_agent_start_serves_and_stops_cleanly_on_sigterm(tmp_path, tiny_bert_dir, mr_csv, trainer):
    config_path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "ewtune", "agent", "start", "--config", str(config_path)]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = f"unix://{tmp_path}/run/agent.sock"
        description = _wait_for_daemon(address, process)
        assert description["holder_id"] == HOLDER
        with DaemonClient(address, timeout=120) as client:
            client.train(_global_weights(trainer), PLAN)  # the same recipe and seed: the same parameters
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    ledger_path = tmp_path / "state/ledger.jsonl"
    assert _kinds(ledger_path) == ["genesis", "reserve", "commit"]
    assert verify_ledger(ledger_path).ok
    # the ledger is closed (its writer lock released): it opens again for writing
    Ledger.open(ledger_path, SigningKey.load(tmp_path / "ledger.key")).close()


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


# --- the SuperNode supervisor -----------------------------------------------------------------------------


def test_supernode_command_has_tls_auth_and_the_daemon_address(tmp_path):
    from agent.policy import SuperNodeConfig
    from agent.supernode import supernode_command

    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "node.key").write_text("x")
    config = SuperNodeConfig("127.0.0.1:9092", tmp_path / "ca.crt", tmp_path / "node.key", port=9101)
    command = supernode_command(config, "unix:///run/a.sock", HOLDER)
    assert Path(command[0]).name == "flower-supernode"
    joined = " ".join(command)
    assert f"--root-certificates {tmp_path / 'ca.crt'}" in joined and "--insecure" not in joined
    assert f"--auth-supernode-private-key {tmp_path / 'node.key'}" in joined and "--port 9101" in joined
    assert command[-1] == 'daemon-address="unix:///run/a.sock" holder-id="holder0"'
    with pytest.raises(InvalidInputError, match="does not exist"):
        supernode_command(SuperNodeConfig("127.0.0.1:9092", tmp_path / "no.crt", tmp_path / "node.key"), "unix:a", HOLDER)


def test_the_supervisor_restarts_a_dead_supernode_and_stops_its_whole_process_group(tmp_path):
    from agent.supernode import SuperNodeSupervisor

    pids = tmp_path / "pids"
    # A stand-in SuperNode that leaves a child behind (as flower-superexec is) and dies on its first run.
    script = (
        "import os, subprocess, sys, time\n"
        f"pids = open({str(pids)!r}, 'a')\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "pids.write(f'{os.getpid()} {child.pid}\\n'); pids.flush()\n"
        "if sum(1 for _ in open(pids.name)) == 1: sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    supervisor = SuperNodeSupervisor([sys.executable, "-c", script]).start()
    try:
        deadline = time.monotonic() + 30
        while (not pids.exists() or len(pids.read_text().splitlines()) < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert supervisor.restarts == 1
    finally:
        supervisor.stop(timeout=10)
    leader, child = (int(pid) for pid in pids.read_text().splitlines()[-1].split())
    time.sleep(0.5)
    for pid in (leader, child):
        assert not _alive(pid), pid


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; only its parent has not reaped it yet
        return stat.read().split(")")[-1].split()[0] != "Z"
