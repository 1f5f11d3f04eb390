"""The agent daemon: policy and budget checks before any step, ledger reserve/commit/abort, signed receipts,
the gRPC API on a Unix socket, the ClientApp shim, and a clean shutdown of ``ewtune agent start``."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.daemon import (  # noqa: F401 - trainer and daemon_parts are fixtures
    BUDGET,
    COUNT,
    HOLDER,
    PLAN,
    REPO,
    _agent_toml,
    _daemon,
    _global_weights,
    _kinds,
    _training_config,
    _wait_for_daemon,
    count_epsilon,
    daemon_parts,
    trainer,
)
from support.ledgers import read_entries as _entries

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.receipts import update_digest, verify_receipt
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.agent.policy import HolderPolicy, PlanRefused, load_agent_config
from ewtune.agent.rpc import DaemonClient, DaemonError, DaemonUnavailable, RequestFailed, decode, encode, serve


def _assert_nothing_charged(daemon, ledger_path):
    _assert_nothing_charged_in(ledger_path)
    assert daemon.describe()["spent_epsilon_certified"] == pytest.approx(count_epsilon(), rel=1e-12)
    assert daemon.ledger.open_reservations() == {}


def _assert_nothing_charged_in(ledger_path):
    """Nothing beyond the count released at the daemon's start."""
    assert _kinds(ledger_path) == ["genesis", *COUNT]
    assert verify_ledger(ledger_path).ok


# --- one round --------------------------------------------------------------------------------------------


def test_train_commits_the_executed_event_and_returns_a_receipt_that_verifies(daemon_parts, trainer):
    key, _, ledger_path = daemon_parts
    daemon = _daemon(daemon_parts, trainer)
    weights = _global_weights(trainer)
    reply = daemon.train(weights, PLAN)

    receipt = verify_receipt(reply.receipt, key.public_key_text)
    executed = PoissonGaussianEvent(executable_sampling_rate(PLAN["sampling_rate"]), PLAN["noise_multiplier"], PLAN["steps"])
    assert (receipt.run_id, receipt.round, receipt.holder_id, receipt.event) == ("run-1", 1, HOLDER, executed)
    assert receipt.update_sha256 == update_digest(reply.arrays)
    assert set(reply.arrays) == set(weights)
    assert any(not np.array_equal(reply.arrays[name], weights[name]) for name in weights)
    # the un-noised loss, the sampled-record count and the time taken (it tracks the batch sizes) are
    # computed from the data without noise: they never leave the holder
    assert reply.metrics == {"steps": PLAN["steps"]}

    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]
    assert verify_ledger(ledger_path).ok
    commit = _entries(ledger_path)[-1]["payload"]
    assert commit["event"]["event"]["steps"] == PLAN["steps"]
    assert commit["extra"] == {"randomness": "os-secure", "public": {"dataset_size": daemon.released_dataset_size}}
    description = daemon.describe()
    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.events import compose

    assert description["spent_epsilon_certified"] == pytest.approx(
        certified_epsilon(compose(PoissonGaussianEvent(1.0, 20.0, 1), executed), 1e-5))
    assert description["public_key"] == key.public_key_text
    assert description["dataset_size"] == daemon.released_dataset_size
    assert daemon.ledger.open_reservations() == {}


def test_a_sigma_below_the_daemons_own_is_refused_and_nothing_is_charged(daemon_parts, trainer):
    from ewtune.accountant.calibration import calibrate_noise_multiplier

    daemon = _daemon(daemon_parts, trainer, max_epsilon_per_round=1.0)
    rate = executable_sampling_rate(PLAN["sampling_rate"])
    floor = calibrate_noise_multiplier(1.0, 1e-5, [(rate, PLAN["steps"])]).noise_multiplier
    with pytest.raises(PlanRefused, match="below this holder's own floor"):
        daemon.train(_global_weights(trainer), dict(PLAN, noise_multiplier=floor * 0.97))
    _assert_nothing_charged(daemon, daemon_parts[2])


def test_an_over_budget_plan_is_refused_and_nothing_more_is_charged(daemon_parts, trainer):
    _, ledger, ledger_path = daemon_parts
    past = PoissonGaussianEvent(0.05, 1.0, 400)  # an earlier run spent most of the budget
    ledger.commit(ledger.reserve(HOLDER, "run-0", 1, past), past)
    daemon = _daemon(daemon_parts, trainer, min_expected_batch=1.0)
    spent = daemon.describe()["spent_epsilon_certified"]
    assert spent < 8.0
    plan = dict(PLAN, sampling_rate=0.05, steps=400, noise_multiplier=1.0)
    with pytest.raises(PlanRefused, match="over its budget"):
        daemon.train(_global_weights(trainer), plan)
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]
    assert verify_ledger(ledger_path).ok
    assert daemon.describe()["spent_epsilon_certified"] == spent
    assert daemon.ledger.open_reservations() == {}


def test_a_vanishing_sampling_rate_is_refused_by_the_expected_batch_floor(daemon_parts, trainer):
    """The attack: q = 1e-12 made every sigma look affordable (the ledger would charge epsilon ~1e-10), while
    the old 24-bit sampler really ran q ~ 6e-8 at the smallest sigma. The floor refuses such a plan."""
    daemon = _daemon(daemon_parts, trainer)
    with pytest.raises(PlanRefused, match="expected batch q\\*N"):
        daemon.train(_global_weights(trainer), dict(PLAN, sampling_rate=1e-12, noise_multiplier=0.5, steps=2000))
    _assert_nothing_charged(daemon, daemon_parts[2])


def test_the_rate_accounted_is_the_rate_executed(daemon_parts, trainer):
    """A rate off the 2^-53 grid is charged, receipted and committed at the rate the sampler realises."""
    key, _, ledger_path = daemon_parts
    daemon = _daemon(daemon_parts, trainer, min_expected_batch=1.0)
    rate = 1 / 30  # not a dyadic fraction
    executed = executable_sampling_rate(rate)
    assert executed > rate
    reply = daemon.train(_global_weights(trainer), dict(PLAN, sampling_rate=rate))
    assert verify_receipt(reply.receipt, key.public_key_text).event.sampling_rate == executed
    reserve, commit = _entries(ledger_path)[3:]
    assert reserve["payload"]["event"]["event"]["sampling_rate"] == executed
    assert commit["payload"]["event"]["event"]["sampling_rate"] == executed


def test_a_sigma_below_the_policy_minimum_is_refused_whatever_the_budget(tmp_path, trainer):
    from ewtune.agent.daemon import Daemon

    key, budget = SigningKey.generate(), {"budget_epsilon": 1e6, "budget_delta": 1e-5}
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, HOLDER, budget)
    daemon = Daemon(HOLDER, HolderPolicy(**budget), trainer, ledger, key)
    with pytest.raises(PlanRefused, match="below this holder's minimum 0.5"):
        daemon.train(_global_weights(trainer), dict(PLAN, noise_multiplier=0.3))
    _assert_nothing_charged(daemon, tmp_path / "ledger.jsonl")


def test_a_delta_at_or_above_one_over_n_is_refused(daemon_parts, trainer, tmp_path):
    from ewtune.agent.daemon import Daemon

    daemon = _daemon(daemon_parts, trainer)
    with pytest.raises(PlanRefused, match=f"not below 1/N = 1/{daemon.released_dataset_size}:"):
        daemon.train(_global_weights(trainer), dict(PLAN, delta=0.5))
    _assert_nothing_charged(daemon, daemon_parts[2])
    key, budget = SigningKey.generate(), {"budget_epsilon": 8.0, "budget_delta": 0.01}
    ledger = Ledger.create(tmp_path / "wide.jsonl", key, HOLDER, budget)
    with pytest.raises(PlanRefused, match="not below 1/N"):
        Daemon(HOLDER, HolderPolicy(**budget), trainer, ledger, key)


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


@pytest.mark.parametrize("damage", ["missing", "unknown", "shape", "nan", "float64", "float64-overflow"])
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
    elif damage == "float64":
        weights[name] = weights[name].astype(np.float64)
    elif damage == "float64-overflow":  # finite as float64, inf once copied into a float32 parameter
        weights[name] = np.full(weights[name].shape, 1e300)
    else:
        weights[name] = np.full_like(weights[name], np.nan)
    with pytest.raises(InvalidInputError):
        daemon.train(weights, PLAN)
    _assert_nothing_charged(daemon, daemon_parts[2])


class _FailingTrainer:
    """The real trainer, whose training fails before its first step (crash), after two steps (late), or is
    stopped before its first step."""

    def __init__(self, trainer, failure):
        self._trainer, self._failure = trainer, failure
        self.daemon = None

    def __getattr__(self, name):
        return getattr(self._trainer, name)

    def train(self, plan, should_stop=None):
        if self._failure == "crash":
            raise RuntimeError("CUDA out of memory (simulated)")
        if self._failure == "late":
            def fail_at_two(step, stats):
                if step == 2:
                    raise RuntimeError("record 17 says 'secret' (simulated data-dependent error)")

            return self._trainer.train(plan, should_stop=should_stop, on_step=fail_at_two)
        self.daemon.request_stop()  # SIGTERM arrives just as training starts
        return self._trainer.train(plan, should_stop=should_stop)


@pytest.mark.parametrize("failure, error", [("crash", RequestFailed), ("stopped", DaemonUnavailable)])
def test_a_round_that_released_nothing_and_ran_no_step_is_aborted(daemon_parts, trainer, failure, error):
    from ewtune.agent.daemon import Daemon

    key, ledger, ledger_path = daemon_parts
    failing = _FailingTrainer(trainer, failure)
    daemon = failing.daemon = Daemon(HOLDER, HolderPolicy(**BUDGET), failing, ledger, key)
    with pytest.raises(error) as raised:
        daemon.train(_global_weights(trainer), PLAN)
    assert "CUDA" not in str(raised.value)
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "abort"]
    assert verify_ledger(ledger_path).ok
    assert daemon.describe()["spent_epsilon_certified"] == pytest.approx(count_epsilon(), rel=1e-12)


def test_a_failure_after_steps_ran_charges_them_and_says_nothing_of_the_data(daemon_parts, trainer):
    """The attack: a failure after steps ran used to abort the reservation (retries for free) and return the
    exception text (a data-dependent error leaked). Now the steps that ran are charged and the reason is generic."""
    from ewtune.agent.daemon import Daemon

    key, ledger, ledger_path = daemon_parts
    daemon = Daemon(HOLDER, HolderPolicy(**BUDGET), _FailingTrainer(trainer, "late"), ledger, key)
    with pytest.raises(RequestFailed) as raised:
        daemon.train(_global_weights(trainer), PLAN)
    assert "secret" not in str(raised.value) and "17" not in str(raised.value)
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]
    commit = _entries(ledger_path)[-1]["payload"]
    assert commit["event"]["event"]["steps"] == 2 and commit["extra"]["released"] is False
    assert verify_ledger(ledger_path).ok
    assert daemon.describe()["spent_epsilon_certified"] > 0


def test_a_step_that_fails_after_reading_records_is_charged_with_the_steps_before_it(daemon_parts, trainer):
    """The attack: a model whose forward raises inside step 3 (a data-dependent failure, e.g. on one record's
    value). The reservation used to be charged only for the 2 steps that ended (or aborted free when the first
    step failed), a free query. Charging follows data access: the 3 steps that began are committed, and the
    ledger's reason says what ran."""
    from ewtune.agent.daemon import Daemon

    key, ledger, ledger_path = daemon_parts
    daemon = Daemon(HOLDER, HolderPolicy(**BUDGET), trainer, ledger, key)
    steps_begun = []
    real_collate = trainer.collate

    def counting_collate(indices):
        steps_begun.append(len(indices))
        return real_collate(indices)

    def raise_in_step_three(module, inputs):
        if len(steps_begun) == 3:
            raise RuntimeError("forward failed on a record of step 3 (simulated data-dependent error)")

    trainer.collate = counting_collate
    hook = trainer.model.register_forward_pre_hook(raise_in_step_three)
    try:
        with pytest.raises(RequestFailed) as raised:
            daemon.train(_global_weights(trainer), dict(PLAN, steps=6))
    finally:
        hook.remove()
        del trainer.collate
    assert "step 3" not in str(raised.value)
    assert len(steps_begun) == 3
    commit = _entries(ledger_path)[-1]
    assert commit["kind"] == "commit" and commit["payload"]["event"]["event"]["steps"] == 3
    assert commit["payload"]["extra"]["released"] is False
    assert commit["payload"]["extra"]["reason"] == "failed in step 3 of 6 after 2 completed step(s); 3 step(s) charged"
    assert verify_ledger(ledger_path).ok
    from ewtune.accountant.certified import certified_epsilon

    three = PoissonGaussianEvent(executable_sampling_rate(PLAN["sampling_rate"]), PLAN["noise_multiplier"], 3)
    from ewtune.accountant.events import compose

    spent = certified_epsilon(compose(PoissonGaussianEvent(1.0, 20.0, 1), three), 1e-5)
    assert daemon.describe()["spent_epsilon_certified"] == pytest.approx(spent, rel=1e-9)


def test_an_evaluation_that_fails_after_reading_the_held_out_records_is_charged(daemon_parts, trainer):
    from ewtune.agent.daemon import Daemon

    key, ledger, ledger_path = daemon_parts
    daemon = Daemon(HOLDER, HolderPolicy(**BUDGET, evaluation="private"), trainer, ledger, key)
    hook = trainer.model.register_forward_pre_hook(lambda module, inputs: (_ for _ in ()).throw(RuntimeError("held-out record")))
    try:
        with pytest.raises(RequestFailed):
            daemon.evaluate(_global_weights(trainer), EVALUATION)
    finally:
        hook.remove()
    commit = _entries(ledger_path)[-1]
    assert commit["kind"] == "commit" and commit["payload"]["extra"]["released"] is False
    assert daemon.describe()["spent_epsilon_certified"] > 0


EVALUATION = {"run_id": "run-1", "round": 0}


def test_no_evaluation_metrics_leave_by_default(daemon_parts, trainer):
    """The attack: exact accuracy, F1, loss and count on the held-out split, for any weights the coordinator
    sends, unlimited and unrecorded (16 chosen queries recovered which tokens held-out records contain)."""
    daemon = _daemon(daemon_parts, trainer)
    with pytest.raises(PlanRefused, match="releases no evaluation metrics"):
        daemon.evaluate(_global_weights(trainer), EVALUATION)
    _assert_nothing_charged(daemon, daemon_parts[2])


def test_private_evaluation_is_noised_charged_and_limited_per_day(daemon_parts, trainer):
    from ewtune.accountant.certified import certified_epsilon

    daemon = _daemon(daemon_parts, trainer, evaluation="private", evaluation_noise_multiplier=5.0, max_evaluations_per_day=2)
    before = _global_weights(trainer)
    other = {name: array + np.float32(0.5) for name, array in before.items()}
    first, second = daemon.evaluate(other, EVALUATION), daemon.evaluate(other, dict(EVALUATION, round=1))
    assert {"accuracy", "f1", "num_examples", "noise_multiplier"} <= set(first) and "loss" not in first
    assert first["num_examples"] != second["num_examples"]  # noised counts: the same query, another answer
    after = _global_weights(trainer)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    kinds = _kinds(daemon_parts[2])
    assert kinds == ["genesis", *COUNT, "reserve", "commit", "reserve", "commit"]
    commit = _entries(daemon_parts[2])[-1]["payload"]
    assert commit["extra"]["purpose"] == "evaluation"
    spent = daemon.describe()["spent_epsilon_certified"]
    from ewtune.accountant.events import compose

    count = PoissonGaussianEvent(1.0, 20.0, 1)
    assert spent == pytest.approx(certified_epsilon(compose(count, PoissonGaussianEvent(1.0, 5.0, 2)), 1e-5), rel=1e-9)
    assert spent > certified_epsilon(compose(count, PoissonGaussianEvent(1.0, 5.0, 1)), 1e-5) > count_epsilon()
    with pytest.raises(PlanRefused, match="allows 2 per day"):
        daemon.evaluate(other, dict(EVALUATION, round=2))
    assert len(_kinds(daemon_parts[2])) == 7
    with pytest.raises(InvalidInputError, match="run_id"):
        daemon.evaluate(other, {})


def test_evaluations_under_fresh_run_ids_or_after_a_restart_stay_within_the_daily_limit(daemon_parts, trainer):
    """The attack: the limit counted per run id, which the coordinator chooses, so a fresh run id bought a fresh
    allowance. The limit is per holder and 24 hours, counted from the ledger's own evaluation commits."""
    from ewtune.agent.daemon import Daemon
    from ewtune.agent.ledger_history import evaluations_since

    key, ledger, ledger_path = daemon_parts
    policy = HolderPolicy(**BUDGET, evaluation="private", evaluation_noise_multiplier=5.0, max_evaluations_per_day=2)
    daemon = Daemon(HOLDER, policy, trainer, ledger, key)
    weights = _global_weights(trainer)
    daemon.evaluate(weights, dict(EVALUATION, run_id="run-a"))
    daemon.evaluate(weights, dict(EVALUATION, run_id="run-b"))
    with pytest.raises(PlanRefused, match="allows 2 per day"):
        daemon.evaluate(weights, dict(EVALUATION, run_id="run-c"))
    daemon.close()
    restarted = Daemon(HOLDER, policy, trainer, Ledger.open(ledger_path, key), key)
    try:
        with pytest.raises(PlanRefused, match="2 private evaluation"):
            restarted.evaluate(weights, dict(EVALUATION, run_id="run-d"))
        assert _kinds(ledger_path).count("commit") == 3  # the count and two evaluations
        from datetime import datetime, timedelta, timezone

        assert evaluations_since(restarted.ledger.entries, datetime.now(timezone.utc) + timedelta(seconds=1)) == 0
    finally:
        restarted.close()


def test_a_per_run_evaluation_limit_in_agent_toml_is_a_one_line_error(tmp_path, tiny_bert_dir, mr_csv):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    path.write_text(path.read_text().replace("[policy]", "[policy]\nmax_evaluations_per_run = 3", 1))
    with pytest.raises(InvalidInputError, match="max_evaluations_per_day"):
        load_agent_config(path)


def test_private_metrics_follow_the_noised_confusion_matrix():
    import torch

    from ewtune.agent.dpsgd.randomness import InsecureSeededRandom
    from ewtune.agent.evaluation import metrics_from_confusion, private_metrics

    counts = torch.tensor([[40.0, 10.0], [5.0, 45.0]])
    exact = metrics_from_confusion(counts)
    assert exact["accuracy"] == pytest.approx(0.85) and exact["num_examples"] == 100
    assert exact["majority_baseline"] == pytest.approx(0.5)
    assert exact["f1"] == pytest.approx((80 / 95 + 90 / 105) / 2)
    draws = [private_metrics(counts, 2.0, InsecureSeededRandom(seed))["num_examples"] for seed in range(400)]
    assert np.std(draws) == pytest.approx(4.0, rel=0.15)  # four cells of std 2: the total has std 4


def test_a_budget_that_differs_from_the_ledgers_genesis_is_refused(daemon_parts, trainer):
    from ewtune.agent.daemon import Daemon

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
        health = client.health()
        assert health["status"] == "ok" and (health["device"], health["precision"]) == (str(trainer.device), "fp32")
        description = client.describe()
        assert description.holder_id == HOLDER and description.public_key == key.public_key_text
        updated, reply = client.train(_global_weights(trainer), PLAN)
        receipt = verify_receipt(reply.receipt, key.public_key_text)
        assert receipt.update_sha256 == update_digest(updated)  # the arrays survived the wire bit for bit
        assert reply.steps == PLAN["steps"]
        with pytest.raises(DaemonError) as refusal:
            client.train(_global_weights(trainer), dict(PLAN, clip_norm=1e6))
        assert refusal.value.refused and "clip norm" in refusal.value.reason
        with pytest.raises(DaemonError) as invalid:
            client.train({"x": np.zeros(1, np.float32)}, PLAN)
        assert invalid.value.status == "INVALID_ARGUMENT"
        with pytest.raises(DaemonError) as withheld:
            client.evaluate(updated, EVALUATION)
        assert withheld.value.refused and "no evaluation metrics" in withheld.value.reason
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]


def test_the_grpc_api_refuses_messages_over_its_size_limit(daemon_parts, trainer, tmp_path):
    address = f"unix://{tmp_path}/small.sock"
    server = serve(_daemon(daemon_parts, trainer), address, max_message_bytes=64 * 1024)
    try:
        with DaemonClient(address, timeout=30) as client:
            assert client.describe().holder_id == HOLDER
            with pytest.raises(DaemonError) as refused:
                client.train({"x": np.zeros(100_000, np.float32)}, PLAN)
            assert refused.value.status == "RESOURCE_EXHAUSTED"
    finally:
        server.stop(grace=None).wait()
    _assert_nothing_charged_in(daemon_parts[2])


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

    from ewtune.agent.client_app import REFUSED, app

    daemon, address = served
    key = daemon_parts[0]
    context = Context(run_id=1, node_id=2, node_config={"daemon-address": address}, state=RecordDict(), run_config={})
    arrays = ArrayRecord({name: Array(value) for name, value in _global_weights(trainer).items()})

    description = app(_client_message("query", RecordDict({})), context).content["description"]
    assert description["holder_id"] == HOLDER and description["public_key"] == key.public_key_text

    reply = app(_client_message("train", RecordDict({"arrays": arrays, "config": ConfigRecord(PLAN)})), context)
    assert not reply.has_error()
    assert set(reply.content) == {"arrays", "result"}  # weights as they came (plain); all else in one record
    updated = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    receipt = verify_receipt(reply.content["result"]["receipt"], key.public_key_text)
    assert receipt.update_sha256 == update_digest(updated)
    assert reply.content["result"]["steps"] == PLAN["steps"] and "evaluation" not in reply.content["result"]

    refused = app(
        _client_message("train", RecordDict({"arrays": arrays, "config": ConfigRecord(dict(PLAN, steps=10**6))})),
        context,
    )
    assert refused.has_error() and refused.error.code == REFUSED and "maximum" in refused.error.reason

    evaluated = app(_client_message("evaluate", RecordDict({"arrays": arrays, "config": ConfigRecord(EVALUATION)})), context)
    assert evaluated.has_error() and evaluated.error.code == REFUSED

    # Packed, and asked to evaluate the incoming model first: the whole reply is one record, 3 Flower objects.
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from ewtune.federation.messages import weight_records, weights_of

    packed = RecordDict({**weight_records(_global_weights(trainer), packed=True),
                         "config": ConfigRecord(dict(PLAN, round=2, evaluate_round=1))})
    reply = app(_client_message("train", packed), context)
    assert not reply.has_error() and set(reply.content) == {"result"}
    assert len(get_all_nested_objects(reply)) == 3  # the message, its RecordDict, the one record
    result = reply.content["result"]
    assert verify_receipt(result["receipt"], key.public_key_text).update_sha256 == update_digest(weights_of(reply.content, "result"))
    assert result["steps"] == PLAN["steps"] and "evaluation" in result["evaluation_refused"]  # the default policy releases none

    lost = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    assert app(_client_message("query", RecordDict({})), lost).has_error()


def test_the_client_app_does_not_import_torch_or_transformers():
    code = "import sys, ewtune.agent.client_app; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


# --- the command: ewtune agent start ----------------------------------------------------------------------


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


def test_the_daemon_refuses_insecure_randomness(tmp_path, tiny_bert_dir, mr_csv, daemon_parts):
    """The attack: noise from a generator seeded with seed + 1 can be regenerated and subtracted exactly."""
    from ewtune.agent.daemon import Daemon
    from ewtune.agent.training import LocalTrainer, TrainingConfig

    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    for line, message in (("secure_noise = false", "secure_noise is gone"),
                          ("insecure_seeded_randomness = true", "refuses predictable noise")):
        path.write_text(path.read_text().replace("[training]\n", f"[training]\n{line}\n"))
        with pytest.raises(InvalidInputError, match=message):
            load_agent_config(path)
        path.write_text(path.read_text().replace(f"{line}\n", ""))
    seeded = LocalTrainer(TrainingConfig(**_training_config(tiny_bert_dir, mr_csv), insecure_seeded_randomness=True))
    key, ledger, _ = daemon_parts
    with pytest.raises(InvalidInputError, match="secure source"):
        Daemon(HOLDER, HolderPolicy(**BUDGET), seeded, ledger, key)


def test_a_missing_ledger_stops_the_start_and_init_creates_it_once(tmp_path, tiny_bert_dir, mr_csv, capsys):
    """The attack: deleting the ledger made the daemon start afresh with a full budget."""
    from ewtune.cli import main

    config_path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    assert main(["agent", "start", "--config", str(config_path)]) == 2
    assert "ewtune agent init" in capsys.readouterr().err
    assert not (tmp_path / "state/ledger.jsonl").exists()
    assert main(["agent", "init", "--config", str(config_path), "--json"]) == 0
    import json

    created = json.loads(capsys.readouterr().out)
    assert created["holder_id"] == HOLDER and created["budget_epsilon"] == 8.0
    assert _kinds(tmp_path / "state/ledger.jsonl") == ["genesis"]
    assert main(["agent", "init", "--config", str(config_path)]) == 2
    assert "refusing" in capsys.readouterr().err
    assert _kinds(tmp_path / "state/ledger.jsonl") == ["genesis"]


def test_ewtune_agent_start_serves_and_stops_cleanly_on_sigterm(tmp_path, tiny_bert_dir, mr_csv, trainer):
    from ewtune.cli import main

    config_path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    assert main(["agent", "init", "--config", str(config_path)]) == 0
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "ewtune", "agent", "start", "--config", str(config_path)]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = f"unix://{tmp_path}/run/agent.sock"
        description = _wait_for_daemon(address, process)
        assert description.holder_id == HOLDER
        with DaemonClient(address, timeout=120) as client:
            client.train(_global_weights(trainer), PLAN)  # the same recipe and seed: the same initial parameters
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    ledger_path = tmp_path / "state/ledger.jsonl"
    assert _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]
    assert verify_ledger(ledger_path).ok
    # the ledger is closed (its writer lock released): it opens again for writing
    Ledger.open(ledger_path, SigningKey.load(tmp_path / "ledger.key")).close()


# --- the SuperNode supervisor -----------------------------------------------------------------------------


def test_supernode_command_has_tls_auth_and_the_daemon_address(tmp_path):
    from ewtune.agent.policy import SuperNodeConfig
    from ewtune.agent.supernode import supernode_command

    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "node.key").write_text("x")
    config = SuperNodeConfig("127.0.0.1:9092", tmp_path / "ca.crt", tmp_path / "node.key", port=9101)
    command = supernode_command(config, "unix:///run/a.sock", HOLDER)
    assert command[:3] == [sys.executable, "-m", "ewtune.agent.warm_supernode"]  # the default: one warm task loop
    flower_default = supernode_command(dataclasses.replace(config, isolation="subprocess"), "unix:///run/a.sock", HOLDER)
    assert Path(flower_default[0]).name == "flower-supernode" and flower_default[1:] == command[3:]
    joined = " ".join(command)
    assert f"--root-certificates {tmp_path / 'ca.crt'}" in joined and "--insecure" not in joined
    assert f"--auth-supernode-private-key {tmp_path / 'node.key'}" in joined and "--port 9101" in joined
    assert command[-1] == 'daemon-address="unix:///run/a.sock" holder-id="holder0"'
    with pytest.raises(InvalidInputError, match="does not exist"):
        supernode_command(SuperNodeConfig("127.0.0.1:9092", tmp_path / "no.crt", tmp_path / "node.key"), "unix:a", HOLDER)


def test_the_supervisor_restarts_a_dead_supernode_and_stops_its_whole_process_group(tmp_path):
    from ewtune.agent.supernode import SuperNodeSupervisor

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
