"""A Flower Grid of fake holders for the ServerApp's round logic in-process: each node describes itself, trains
(adds its step to the weights and signs a receipt) and evaluates, or forges, breaks or never answers as told; and a
coordinator folder (federation.toml, key, initial weights) to run a ``Federation`` over them."""

import json

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.receipts import Receipt, sign_receipt, update_digest
from ewtune.accountant.signing import SigningKey
from ewtune.coordinator.checkpoints import save_weights
from ewtune.coordinator.config import load_federation_config
from ewtune.coordinator.registry import new_registry
from ewtune.coordinator.server_app import Federation
from ewtune.federation.cards import HolderCard
from ewtune.federation.messages import RESULT, weight_records, weights_of

INITIAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}


class Node:
    """A holder's node: its SuperNode key (what the SuperLink reports as NodeInfo.public_key, PEM bytes),
    its ledger key and what it does with each message. ``claims`` overrides what its description says."""

    def __init__(self, node_id, holder_id, forgery=None, dataset_size=100, claims=None, registered=True, step=None):
        self.node_id, self.holder_id, self.forgery = node_id, holder_id, forgery
        self.dataset_size, self.claims, self.registered = dataset_size, dict(claims or {}), registered
        self.step = 1.0 + node_id if step is None else step
        self.status = "online"
        self.key = SigningKey.generate()
        self.supernode_key = ec.generate_private_key(ec.SECP384R1())
        self.public_key = self.supernode_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.evaluate_configs = []

    def card(self):
        line = self.supernode_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        return HolderCard(self.holder_id, line, self.key.public_key_text)

    def evaluation(self, request):
        """The metrics this node releases for an evaluation request, or None (a refusal)."""
        self.evaluate_configs.append(dict(request))
        if self.forgery == "no evaluation":  # the default of a holder: it releases no evaluation metrics
            return None
        if self.forgery == "list metrics":
            return {"accuracy": [0.5, 0.6], "loss": 0.25}
        return {"accuracy": 0.5, "num_examples": 10}

    def reply(self, message):
        if message.metadata.message_type == MessageType.QUERY:
            description = {"holder_id": self.holder_id, "dataset_size": self.dataset_size, "budget_epsilon": 8.0, "budget_delta": 1e-5,
                           "spent_epsilon_certified": 0.0, "public_key": self.key.public_key_text, "model_id": "m", **self.claims}
            return Message(RecordDict({"description": ConfigRecord(description)}), reply_to=message)
        if message.metadata.message_type == MessageType.EVALUATE:  # after the last round
            metrics = self.evaluation(message.content["config"])
            if metrics is None:
                return Message(Error(code=0, reason="evaluation metrics are not released"), reply_to=message)
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
        if self.forgery == "silent":
            return None  # a dead daemon: the train message is never answered
        plan = message.content["config"]
        update = {name: array + self.step for name, array in weights_of(message.content).items()}
        event = PoissonGaussianEvent(plan["sampling_rate"], plan["noise_multiplier"], plan["steps"])
        if self.forgery == "composed":  # a valid receipt whose event is a composition of one mechanism
            event = compose(PoissonGaussianEvent(plan["sampling_rate"], plan["noise_multiplier"], 1),
                            PoissonGaussianEvent(plan["sampling_rate"], plan["noise_multiplier"], plan["steps"] - 1))
        key = SigningKey.generate() if self.forgery == "wrong key" else self.key
        document = sign_receipt(key, Receipt(plan["run_id"], plan["round"], self.holder_id, event, update_digest(update)))
        if self.forgery == "altered event":
            document["receipt"]["event"]["event"]["noise_multiplier"] *= 2
        if self.forgery == "altered update":
            update["w"] = update["w"] + 1e-3
        result = {"receipt": json.dumps(document), "steps": [plan["steps"]] * 2 if self.forgery == "list metrics" else plan["steps"]}
        if "evaluate_round" in plan:  # the previous round's model, evaluated inside the train message
            evaluation = self.evaluation({"run_id": plan["run_id"], "round": plan["evaluate_round"]})
            if evaluation is None:
                result["evaluation_refused"] = "evaluation metrics are not released"
            else:
                result["evaluation"] = json.dumps(evaluation)
        content = RecordDict(weight_records(update, packed=True, record=RESULT, fields=result))
        if self.forgery in ("object layout", "negative shape"):
            # The layout is not covered by the receipt's digest of the arrays: rewrite it after signing.
            layout = json.loads(content[RESULT]["json"])
            if self.forgery == "object layout":
                layout[0][1] = "|O"
            else:
                layout[0][2] = [-2, -2]
            content[RESULT] = ConfigRecord({**dict(content[RESULT]), "json": json.dumps(layout)})  # the buffer stays
        return Message(content, reply_to=message)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = {node.node_id: node for node in nodes}
        self.replies = {}
        self.pushed = []  # (message type, destination node) of every message pushed, in order

    def get_nodes(self):
        return list(self.nodes.values())

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.pushed.append((message.metadata.message_type, message.metadata.dst_node_id))
            reply = self.nodes[message.metadata.dst_node_id].reply(message)
            if reply is not None:
                self.replies[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in list(message_ids) if message_id in self.replies]


def fake_task_identity(monkeypatch):
    """Messages can be built outside a Flower task (flwr reads the task's identity when a Message is made)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _federation(directory, nodes, absent=()):
    """A federation over ``nodes``; the ``absent`` ones are registered but never connect."""
    registry = new_registry(directory / "supernodes.json", ("127.0.0.1",))
    for node in (*nodes, *absent):
        if node.registered and node.holder_id not in {h.holder_id for h in registry.holders}:
            registry = registry.with_holder(node.card())
    registry.save()
    return Federation(FakeGrid(nodes), load_federation_config(directory / "federation.toml"), flower_run_id=7)


FEDERATION_TOML = (
    '[federation]\nname = "t"\nrounds = 2\nlocal_steps = 3\nexpected_batch_size = 10\nclip_norm = 1.0\nlearning_rate = 0.1\n'
    'target_epsilon = 8.0\ndelta = 1e-5\nmin_holders = 1\nexpected_holders = {expected}\n{extra}'
    '[coordinator]\nledger = "ledger.jsonl"\nsigning_key = "coordinator.key"\noutput_dir = "out"\nregistry = "supernodes.json"\n'
    '[model]\ninitial_weights = "initial.safetensors"\nmode = "full"\nevaluate = "every_round"\n'
    "[timeouts]\nnodes = 1\nquery = 5\nround = 1\nevaluate = 5\npoll_interval = 0.01\n"
)


def _directory(tmp_path, expected, extra=""):
    key = SigningKey.generate()
    key.save(tmp_path / "coordinator.key")
    save_weights(tmp_path / "initial.safetensors", INITIAL)
    (tmp_path / "federation.toml").write_text(FEDERATION_TOML.format(expected=expected, extra=extra))
    return key

