"""The typed contract of ewtune.federation.contract: each message's one encoder and decoder round-trip, refuse a
missing, an unknown or a mistyped key with a one-line error, and are what both sides use: the coordinator's
messages (ewtune.coordinator.round_messages) go through the real ClientApp shim (ewtune.agent.client_app) and
the daemon's gRPC API (ewtune.agent.rpc) and come back readable by the coordinator."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE
from ewtune.agent import client_app
from ewtune.agent.rpc import DaemonClient, serve
from ewtune.coordinator import round_messages
from ewtune.coordinator.planner import FederationSettings, HolderPlan
from ewtune.federation.contract import (
    EvaluationReply,
    EvaluationRequest,
    HolderDescription,
    RevealRequest,
    RoundPlan,
    TrainReply,
    config_values,
)
from ewtune.federation.messages import INVALID, weight_records

PLAN = RoundPlan("run-7", 2, 5, 0.125, 1.5, 1.0, 0.01, delta=1e-5, model_id="m", purpose=AUDIT_PURPOSE, evaluate_round=1)
DESCRIPTION = HolderDescription(
    holder_id="hospital-a", budget_epsilon=8.0, budget_delta=1e-5, spent_epsilon_certified=0.5, public_key="key",
    dataset_size=120, dataset_size_noise=20.0, spent_epsilon_edgeworth_estimate=0.4,
    spent_mechanisms=json.dumps([{"sampling_rate": 1.0, "noise_multiplier": 20.0, "neighbouring": "add_remove", "steps": 1}]),
    open_reservations=0, model_id="m", min_clip_norm=0.1, max_clip_norm=10.0, max_steps_per_round=100,
    min_expected_batch=8.0, min_noise_multiplier=0.5, evaluation="private",
)  # fmt: skip
MESSAGES = [
    PLAN,
    RoundPlan("run-7", 0, 1, 1.0, 0.5, 2.0, 0.1),
    DESCRIPTION,
    HolderDescription("hospital-b", 1.0, 1e-6, 0.0, "key-b"),
    TrainReply('{"receipt": {}, "signature": "s"}', 5),
    EvaluationRequest("run-7", 0),
    EvaluationReply.released({"accuracy": 0.75, "num_examples": 40}),
    EvaluationReply.refused('this holder releases no evaluation metrics (its policy has evaluation = "none")'),
    RevealRequest("audit-1", "ab" * 32),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_each_message_round_trips_through_its_dict_form_and_a_config_record(message):
    kind = type(message)
    assert kind.from_config(message.to_config()) == message
    assert kind.from_config(config_values(message.to_config())) == message  # a ConfigRecord holds no null
    assert kind.from_config(json.loads(json.dumps(message.to_config()))) == message  # the daemon's gRPC header


REQUIRED = {RoundPlan: "noise_multiplier", HolderDescription: "public_key", TrainReply: "receipt", EvaluationRequest: "round",
            RevealRequest: "run_id"}  # fmt: skip
MISTYPED = {RoundPlan: ("round", "2"), HolderDescription: ("dataset_size", 1.5), TrainReply: ("receipt", 7),
            EvaluationRequest: ("run_id", ""), RevealRequest: ("scores_sha256", 5), EvaluationReply: ("evaluation", "[1, 2]")}  # fmt: skip


@pytest.mark.parametrize("kind, key", REQUIRED.items(), ids=lambda v: getattr(v, "__name__", v))
def test_a_missing_key_is_refused_naming_it(kind, key):
    values = next(m for m in MESSAGES if type(m) is kind).to_config()
    del values[key]
    with pytest.raises(InvalidInputError, match=f"lacks {key}") as refused:
        kind.from_config(values)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_an_unknown_key_is_refused_naming_it(message):
    with pytest.raises(InvalidInputError, match="unknown key.*budget_left_epsilon"):
        type(message).from_config({**message.to_config(), "budget_left_epsilon": 3.0})


@pytest.mark.parametrize("kind, change", MISTYPED.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_mistyped_value_is_refused(kind, change):
    key, value = change
    values = next(m for m in MESSAGES if type(m) is kind).to_config()
    with pytest.raises(InvalidInputError, match=key) as refused:
        kind.from_config({**values, key: value})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("values", [None, [1, 2], "plan"])
def test_a_message_that_is_not_a_record_is_refused(values):
    with pytest.raises(InvalidInputError, match="must be a record"):
        RoundPlan.from_config(values)


def test_a_plan_outside_its_ranges_is_refused():
    for change in ({"sampling_rate": 1.5}, {"steps": 0}, {"noise_multiplier": float("nan")}, {"clip_norm": True}):
        with pytest.raises(InvalidInputError):
            RoundPlan.from_config({**PLAN.to_config(), **change})


def test_metrics_that_are_not_finite_numbers_are_left_out_not_refused():
    """A holder's metrics are informational: one malformed metric must not cost the others."""
    reply = EvaluationReply.from_config({"evaluation": json.dumps({"accuracy": [0.5], "loss": 0.25, "f1": "high"})})
    assert reply.evaluation == {"loss": 0.25}
    assert TrainReply.from_config({"receipt": "{}", "steps": [5, 5]}).steps is None  # the receipt says what ran


def test_a_description_names_the_node_it_came_from_in_its_refusals():
    values = {**DESCRIPTION.to_config(), "spent_mechanisms": "not json"}
    with pytest.raises(InvalidInputError, match="node 4's spent_mechanisms is malformed"):
        HolderDescription.from_config(values, node_id=4)
    assert HolderDescription.from_config(DESCRIPTION.to_config(), node_id=4).node_id == 4
    assert "node_id" not in DESCRIPTION.to_config()  # it never travels


# --- both sides: the coordinator's messages through the real ClientApp, and back -------------------------


class FakeDaemon:
    """Stands in for the holder's daemon behind the ClientApp: records what it was asked, answers as the
    daemon's gRPC client does (typed replies)."""

    def __init__(self, refuse_evaluation=False):
        self.trained, self.evaluated, self.refuse_evaluation = [], [], refuse_evaluation

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def describe(self):
        return DESCRIPTION

    def train(self, weights, plan):
        self.trained.append(plan)
        return {name: array + 1 for name, array in weights.items()}, TrainReply(json.dumps({"receipt": "r"}), plan.steps)

    def evaluate(self, weights, request):
        from ewtune.agent.rpc import DaemonError

        self.evaluated.append(request)
        if self.refuse_evaluation:
            raise DaemonError("FAILED_PRECONDITION", "no evaluation metrics leave this holder")
        return EvaluationReply.released({"accuracy": 0.5, "num_examples": 40})


@pytest.fixture
def shim(monkeypatch):
    """The ClientApp with a fake daemon; messages can be built outside a Flower task."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    daemon = FakeDaemon()
    monkeypatch.setattr(client_app, "_daemon", lambda node_config: daemon)
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})

    def send(message):
        message.metadata.__dict__["_message_id"] = message.object_id
        return client_app.app(message, context)

    return daemon, send


WEIGHTS = {"w": np.zeros((2, 2), np.float32)}
SETTINGS = FederationSettings(rounds=3, local_steps=5, expected_batch_size=15, clip_norm=1.0, learning_rate=0.01,
                              target_epsilon=4.0, delta=1e-5)  # fmt: skip


def _holder_plan():
    return HolderPlan(holder=dataclasses.replace(DESCRIPTION, node_id=3), sampling_rate=0.125, noise_multiplier=1.5,
                      epsilon_target=4.0, delta=1e-5, epsilon_certified=3.9, epsilon_edgeworth=3.5)  # fmt: skip


@pytest.mark.parametrize("packed", [True, False])
def test_the_coordinators_train_message_is_what_the_client_app_decodes_and_its_reply_reads_back(shim, packed):
    daemon, send = shim
    plan = round_messages.round_plan("run-7", 2, _holder_plan(), SETTINGS, audit=True, evaluated_round=1)
    message = round_messages.train_message(plan, 3, weight_records(WEIGHTS, packed), ttl=60)
    reply = send(message)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    assert daemon.trained == [dataclasses.replace(plan, evaluate_round=None)]  # the daemon trains the plan, as sent
    assert daemon.evaluated == [EvaluationRequest("run-7", 1)]  # the incoming weights, as the model after round 1
    train, update = round_messages.train_reply_of(reply, timeout=60)
    assert train == TrainReply(json.dumps({"receipt": "r"}), 5) and train.receipt_document() == {"receipt": "r"}
    np.testing.assert_array_equal(update["w"], np.ones((2, 2), np.float32))
    assert round_messages.released_metrics(reply, inside_train=True) == {"accuracy": 0.5, "num_examples": 40.0}


def test_a_refused_evaluation_inside_a_train_message_reads_back_as_its_reason(shim):
    daemon, send = shim
    daemon.refuse_evaluation = True
    plan = round_messages.round_plan("run-7", 1, _holder_plan(), SETTINGS, audit=False, evaluated_round=0)
    reply = send(round_messages.train_message(plan, 3, weight_records(WEIGHTS, True), ttl=60))
    assert round_messages.train_reply_of(reply, timeout=60)[0].steps == 5
    with pytest.raises(round_messages.EvaluationMissing, match="refused: no evaluation metrics leave this holder"):
        round_messages.released_metrics(reply, inside_train=True)


def test_the_description_and_an_evaluation_read_back_through_the_client_app(shim):
    _, send = shim
    reply = send(round_messages.query_message(3, timeout=10))
    assert round_messages.description_of(3, reply) == dataclasses.replace(DESCRIPTION, node_id=3)
    evaluation = send(round_messages.evaluate_message(EvaluationRequest("run-7", 3), 3, weight_records(WEIGHTS, False), ttl=60))
    assert round_messages.released_metrics(evaluation, inside_train=False) == {"accuracy": 0.5, "num_examples": 40.0}


def test_a_plan_with_an_unknown_key_is_refused_by_the_client_app_as_malformed(shim):
    """The attack: a coordinator slips a field past the contract; the holder's side refuses the message."""
    daemon, send = shim
    plan = round_messages.round_plan("run-7", 1, _holder_plan(), SETTINGS, audit=False, evaluated_round=None)
    message = round_messages.train_message(plan, 3, weight_records(WEIGHTS, True), ttl=60)
    message.content["config"]["max_grad_norm"] = 1e6
    reply = send(message)
    assert reply.has_error() and reply.error.code == INVALID and "unknown key(s) max_grad_norm" in reply.error.reason
    assert daemon.trained == []


# --- the daemon's gRPC API speaks the same types ------------------------------------------------------------


class _Served:
    """What ``ewtune.agent.rpc.serve`` needs of a daemon; it decodes the plan as the real one does."""

    def __init__(self):
        self.plans = []

    def describe(self):
        return DESCRIPTION.to_config()

    def health(self):
        return {"status": "ok"}

    def train(self, arrays, config):
        self.plans.append(RoundPlan.from_config(config))
        return _TrainReply({name: array * 2 for name, array in arrays.items()}, {"receipt": {}, "signature": "s"}, {"steps": 5})

    def evaluate(self, arrays, config):
        EvaluationRequest.from_config(config)
        return {"accuracy": 0.5, "f1": float("nan")}

    def reveal_audit(self, config):
        return {"holder_id": "hospital-a", "request": RevealRequest.from_config(config).to_config()}


@dataclasses.dataclass(frozen=True)
class _TrainReply:
    arrays: dict
    receipt: dict
    metrics: dict


def test_the_daemons_grpc_messages_are_the_contracts(tmp_path):
    served = _Served()
    address = f"unix://{tmp_path}/agent.sock"
    server = serve(served, address)
    try:
        with DaemonClient(address, timeout=30) as client:
            assert client.describe() == DESCRIPTION
            updated, reply = client.train({"w": np.ones(3, np.float32)}, PLAN.training())
            assert served.plans == [PLAN.training()]
            assert reply == TrainReply(json.dumps({"receipt": {}, "signature": "s"}, sort_keys=True), 5)
            np.testing.assert_array_equal(updated["w"], np.full(3, 2, np.float32))
            evaluation = client.evaluate({"w": np.ones(3, np.float32)}, EvaluationRequest("run-7", 2))
            assert evaluation == EvaluationReply.released({"accuracy": 0.5})  # NaN is never sent
            revealed = client.reveal_audit(RevealRequest("audit-1"))
            assert revealed["request"] == {"run_id": "audit-1", "scores_sha256": None}
    finally:
        server.stop(grace=None).wait()
