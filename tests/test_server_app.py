"""The ServerApp's round logic in-process, against a fake Grid whose holders forge receipts (a receipt signed
by another key, an event altered after signing, an update altered after signing) or never answer. Each such
reply is aborted in the coordinator's ledger and never aggregated; the honest holder's update is the new global
model. A second run on the same ledger stops cleanly before a round that would exceed a holder's budget."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from accountant.events import PoissonGaussianEvent
from accountant.ledger import parse_line, split_lines
from accountant.receipts import Receipt, sign_receipt, update_digest
from accountant.signing import SigningKey
from accountant.verify import verify_ledger
from coordinator.checkpoints import load_weights, save_weights
from coordinator.config import load_federation_config
from coordinator.packing import weight_records, weights_of
from coordinator.server_app import Federation

INITIAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}


class Node:
    def __init__(self, node_id, holder_id, forgery=None):
        self.node_id, self.holder_id, self.forgery = node_id, holder_id, forgery
        self.status = "online"
        self.key = SigningKey.generate()

    def reply(self, message):
        if message.metadata.message_type == MessageType.QUERY:
            description = {"holder_id": self.holder_id, "dataset_size": 100, "budget_epsilon": 8.0, "budget_delta": 1e-5,
                           "spent_epsilon_certified": 0.0, "public_key": self.key.public_key_text, "model_id": "m"}
            return Message(RecordDict({"description": ConfigRecord(description)}), reply_to=message)
        if message.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num_examples": 10})}), reply_to=message)
        if self.forgery == "silent":
            return None  # a dead daemon: the train message is never answered
        plan = message.content["config"]
        update = {name: array + (1.0 + self.node_id) for name, array in weights_of(message.content).items()}
        event = PoissonGaussianEvent(plan["sampling_rate"], plan["noise_multiplier"], plan["steps"])
        key = SigningKey.generate() if self.forgery == "wrong key" else self.key
        document = sign_receipt(key, Receipt(plan["run_id"], plan["round"], self.holder_id, event, update_digest(update)))
        if self.forgery == "altered event":
            document["receipt"]["event"]["event"]["noise_multiplier"] *= 2
        if self.forgery == "altered update":
            update["w"] = update["w"] + 1e-3
        content = RecordDict({
            **weight_records(update, packed=True),
            "receipt": ConfigRecord({"document": json.dumps(document)}),
            "metrics": MetricRecord({"loss": 0.5, "examples": 10, "steps": plan["steps"], "seconds": 0.01}),
        })
        return Message(content, reply_to=message)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = {node.node_id: node for node in nodes}
        self.replies = {}

    def get_nodes(self):
        return list(self.nodes.values())

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            reply = self.nodes[message.metadata.dst_node_id].reply(message)
            if reply is not None:
                self.replies[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in list(message_ids) if message_id in self.replies]


def _federation(directory, nodes):
    return Federation(FakeGrid(nodes), load_federation_config(directory / "federation.toml"), flower_run_id=7)


@pytest.fixture()
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    key = SigningKey.generate()
    key.save(tmp_path / "coordinator.key")
    save_weights(tmp_path / "initial.safetensors", INITIAL)
    (tmp_path / "federation.toml").write_text(
        '[federation]\nname = "t"\nrounds = 2\nlocal_steps = 3\nexpected_batch_size = 10\nclip_norm = 1.0\nlearning_rate = 0.1\n'
        'target_epsilon = 8.0\ndelta = 1e-5\nmin_holders = 1\nexpected_holders = 5\n'
        '[coordinator]\nledger = "ledger.jsonl"\nsigning_key = "coordinator.key"\noutput_dir = "out"\n'
        '[model]\ninitial_weights = "initial.safetensors"\nmode = "full"\nevaluate = "every_round"\n'
        "[timeouts]\nnodes = 1\nquery = 5\nround = 1\nevaluate = 5\npoll_interval = 0.01\n"
    )
    nodes = [Node(1, "honest"), Node(2, "forger-key", "wrong key"), Node(3, "forger-event", "altered event"),
             Node(4, "forger-update", "altered update"), Node(5, "dead", "silent")]
    federation = _federation(tmp_path, nodes)
    federation.run()
    return tmp_path, federation.status, key, nodes


def test_forged_receipts_are_aborted_and_not_aggregated(run):
    directory, status, key, _ = run
    assert status["state"] == "finished" and status["rounds_completed"] == 2
    assert status["holders"]["honest"]["rounds_committed"] == 2
    reasons = {holder: status["holders"][holder]["reason"] for holder in ("forger-key", "forger-event", "forger-update")}
    assert "signature" in reasons["forger-key"]
    assert "signature" in reasons["forger-event"]
    assert "does not match its receipt" in reasons["forger-update"]
    reasons["dead"] = status["holders"]["dead"]["reason"]
    assert "no reply within 1 s" in reasons["dead"]
    for holder in reasons:
        assert status["holders"][holder]["rounds_committed"] == 0 and not status["holders"][holder]["active"]
    # Only the honest update (global + 2 each round) was aggregated.
    final = load_weights(directory / "out" / "final.safetensors")
    np.testing.assert_array_equal(final["w"], np.full((2, 2), 4.0, np.float32))


def test_the_coordinator_ledger_records_commits_and_aborts_and_verifies(run):
    directory, _, key, _ = run
    report = verify_ledger(directory / "ledger.jsonl", key.public_key_text)
    assert report.ok, report.summary()
    entries = [parse_line(line) for line in split_lines((directory / "ledger.jsonl").read_bytes()).lines]
    reservations = {e["seq"]: e["payload"]["holder"] for e in entries if e["kind"] == "reserve"}
    closed = [(e["kind"], reservations[e["payload"]["reservation"]]) for e in entries if e["kind"] in ("commit", "abort")]
    assert sorted(closed) == sorted(
        [("commit", "honest"), ("commit", "honest"), ("abort", "forger-key"), ("abort", "forger-event"), ("abort", "forger-update"), ("abort", "dead")]
    )
    assert report.holders["forger-key"].epsilon_certified == 0.0


def test_a_second_run_stops_before_a_round_that_would_exceed_a_budget(run):
    directory, _, key, nodes = run
    # The honest holder spent the whole plan (certified epsilon ~8 of 8) in the first run; its description
    # still claims nothing spent, but the coordinator's own ledger knows better and refuses round 1.
    federation = _federation(directory, nodes[:1])
    federation.run()
    assert federation.status["state"] == "stopped"
    assert federation.status["rounds_completed"] == 0
    assert "honest's round 1 would bring its certified epsilon" in federation.status["reason"]
    assert verify_ledger(directory / "ledger.jsonl", key.public_key_text).ok
