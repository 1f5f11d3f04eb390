"""Hostile train replies through the real ServerApp round (``ewtune.coordinator.server_app.Federation``) against the
fake Grid of ``tests/test_server_app.py``: each reply below carries a receipt that is validly signed by the
sender (unless the attack is the signature itself) and is refused with a logged reason, its reservation is
aborted in the coordinator's ledger, nothing of it is aggregated, and the round goes on with the others.

Attacks: an update holding NaN or an infinity, a wrong shape, a missing or an extra tensor, a packed layout
claiming a 4 GB tensor over a few bytes, a receipt replayed from the holder's earlier round or from another
run, a receipt signed with another registered holder's key, and a holder answering after the round's
deadline (its late reply is never pulled into a later round)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from support.fake_grid import FakeGrid, Node, _directory, _federation

from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger_lines import parse_line, split_lines
from ewtune.accountant.receipts import Receipt, sign_receipt, update_digest
from ewtune.accountant.verify import verify_ledger
from ewtune.coordinator.checkpoints import load_weights
from ewtune.federation.messages import RESULT, weight_records, weights_of

LATE_SECONDS = 1.5  # the round's deadline in the federation.toml of test_server_app is 1 s


class HostileNode(Node):
    """A registered holder whose train replies carry ``attack`` (its query replies are honest)."""

    def __init__(self, node_id, holder_id, attack, **kwargs):
        super().__init__(node_id, holder_id, step=1.0, **kwargs)
        self.attack, self.earlier, self.signer = attack, None, self.key

    def reply(self, message):
        if message.metadata.message_type != MessageType.TRAIN:
            return super().reply(message)
        plan = message.content["config"]
        update = {name: array + 1.0 for name, array in weights_of(message.content).items()}
        if self.attack == "nan":
            update["w"][0, 0] = np.nan
        elif self.attack == "infinity":
            update["b"][1] = np.inf
        elif self.attack == "wrong shape":
            update["w"] = update["w"].reshape(4)
        elif self.attack == "missing tensor":
            del update["b"]
        elif self.attack == "extra tensor":
            update["extra"] = np.zeros(3, np.float32)
        run_id = "an-earlier-run" if self.attack == "other run" else plan["run_id"]
        event = PoissonGaussianEvent(plan["sampling_rate"], plan["noise_multiplier"], plan["steps"])
        document = sign_receipt(self.signer, Receipt(run_id, plan["round"], self.holder_id, event, update_digest(update)))
        if self.attack == "replay" and self.earlier is not None:
            update, document = self.earlier  # round 1's update and its genuine receipt, sent again
        self.earlier = (update, document)
        result = {"receipt": json.dumps(document), "steps": plan["steps"]}
        content = RecordDict(weight_records(update, packed=True, record=RESULT, fields=result))
        if self.attack == "huge layout":  # a layout that claims 4 GB over the real few bytes
            layout = json.loads(content[RESULT]["json"])
            layout[0][2] = [2**30]
            content[RESULT] = ConfigRecord({**dict(content[RESULT]), "json": json.dumps(layout)})  # the buffer stays
        return Message(content, reply_to=message)


class SlowGrid(FakeGrid):
    """Replies of the nodes in ``late`` become available only ``LATE_SECONDS`` after they were pushed."""

    def __init__(self, nodes, late):
        super().__init__(nodes)
        self.late, self.ready_at = set(late), {}

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for message, message_id in zip(messages, ids):
            if message.metadata.dst_node_id in self.late:
                self.ready_at[message_id] = time.monotonic() + LATE_SECONDS
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        ready = [message_id for message_id in message_ids if self.ready_at.get(message_id, 0.0) <= now]
        return super().pull_messages(ready)


ATTACKS = {  # holder id -> (attack, what the logged reason says)
    "nan": ("nan", "finite"),
    "infinity": ("infinity", "finite"),
    "shape": ("wrong shape", "shape"),
    "missing": ("missing tensor", "missing ['b']"),
    "extra": ("extra tensor", "unknown ['extra']"),
    "huge": ("huge layout", "too short"),
    "replay": ("replay", "round is 1, expected 2"),
    "otherrun": ("other run", "run_id is 'an-earlier-run'"),
    "borrowed": ("borrowed key", "signature"),
}


@pytest.fixture(scope="module")
def hostile_round(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(TaskIdentity, "_run_id", 1)
        monkeypatch.setattr(TaskIdentity, "_node_id", 0)
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        directory = tmp_path_factory.mktemp("hostile-replies")
        key = _directory(directory, expected=len(ATTACKS) + 2)
        honest = Node(1, "honest", step=1.0)
        late = Node(2, "late", step=1.0)
        hostile = [HostileNode(3 + index, holder, attack) for index, (holder, (attack, _)) in enumerate(ATTACKS.items())]
        borrowed = next(node for node in hostile if node.holder_id == "borrowed")
        borrowed.signer = honest.key  # signs with another registered holder's ledger key
        nodes = [honest, late, *hostile]
        federation = _federation(directory, nodes)
        federation.grid = SlowGrid(nodes, late=[late.node_id])
        federation.run()
        yield directory, federation.status, key


def _closed_reservations(directory):
    entries = [parse_line(line) for line in split_lines((directory / "ledger.jsonl").read_bytes()).lines]
    reserved = {e["seq"]: (e["payload"]["holder"], e["payload"]["round"]) for e in entries if e["kind"] == "reserve"}
    closed = {}
    for entry in entries:
        if entry["kind"] in ("commit", "abort"):
            closed.setdefault(entry["kind"], []).append(reserved[entry["payload"]["reservation"]])
    return closed


@pytest.mark.parametrize("holder", sorted(ATTACKS))
def test_each_hostile_reply_is_refused_with_its_reason_and_aborted(hostile_round, holder):
    directory, status, _ = hostile_round
    outcome = status["holders"][holder]
    assert ATTACKS[holder][1] in outcome["reason"], outcome["reason"]
    assert not outcome["active"]
    first_bad_round = 2 if holder == "replay" else 1  # the replay is of a genuine round-1 reply
    assert outcome["rounds_committed"] == first_bad_round - 1
    assert (holder, first_bad_round) in _closed_reservations(directory)["abort"]


def test_the_round_goes_on_and_only_honest_updates_are_aggregated(hostile_round):
    directory, status, key = hostile_round
    assert status["state"] == "finished" and status["rounds_completed"] == 2, status["reason"]
    assert status["holders"]["honest"]["rounds_committed"] == 2
    closed = _closed_reservations(directory)
    assert sorted(closed["commit"]) == [("honest", 1), ("honest", 2), ("replay", 1)]
    report = verify_ledger(directory / "ledger.jsonl", key.public_key_text)
    assert report.ok, report.summary()
    assert [row for row in report.reservations if row["status"] == "open"] == []  # nothing left charged for nothing
    # Round 1 averages honest (+1) and replay's genuine round-1 update (+1); round 2 has honest (+1) alone, at the
    # default cap of 0.5 per holder (ewtune.coordinator.aggregation.capped_fedavg: the global weights keep the other half).
    np.testing.assert_array_equal(load_weights(directory / "out" / "final.safetensors")["w"], np.full((2, 2), 1.5, np.float32))
    assert [round_["global_weights_share"] for round_ in status["rounds"]] == [0.0, 0.5]


def test_a_holder_answering_after_the_deadline_is_aborted_and_its_late_reply_is_never_used(hostile_round):
    directory, status, _ = hostile_round
    late = status["holders"]["late"]
    assert "no reply within 1 s" in late["reason"] and not late["active"] and late["rounds_committed"] == 0
    assert _closed_reservations(directory)["abort"].count(("late", 1)) == 1
    assert all("late" not in round_["holders"] or round_["holders"]["late"]["status"] != "committed" for round_ in status["rounds"])
