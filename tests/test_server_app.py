"""The ServerApp's round logic in-process, against a fake Grid whose holders forge receipts (a receipt signed
by another key, an event altered after signing, an update altered after signing) or never answer. Each such
reply is aborted in the coordinator's ledger and never aggregated; the honest holder's update is the new global
model. A second run on the same ledger stops cleanly before a round that would exceed a holder's budget.

Hostile or broken holders (crafted layouts, list-valued metrics, oversized updates, impersonation of another
holder at query time) are each aborted or left out while the run goes on with the others."""

import json

import numpy as np
import pytest
from flwr.app import MessageType
from support.fake_grid import Node, _directory, _federation, fake_task_identity

from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger_lines import parse_line, split_lines
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.coordinator.checkpoints import load_weights


@pytest.fixture()
def run(tmp_path, monkeypatch):
    fake_task_identity(monkeypatch)
    key = _directory(tmp_path, expected=5)
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
    # Only the honest update (global + 2 each round) was aggregated, alone, at the cap 0.5: global + 1 a round.
    final = load_weights(directory / "out" / "final.safetensors")
    np.testing.assert_array_equal(final["w"], np.full((2, 2), 2.0, np.float32))


def test_a_round_with_one_reply_applies_the_cap_and_says_so(run):
    """The attack: every other holder's reply is lost, so the one that arrives would be the new global model.
    The cap 0.5 still holds: its share is 0.5, the global weights keep 0.5, and the status and the run's
    progress line say the update was scaled."""
    import io

    from ewtune.coordinator.run_progress import RunProgress
    from ewtune.federation.progress import Progress

    _, status, _, _ = run
    for record in status["rounds"]:
        assert record["holders"]["honest"]["weight_share"] == 0.5 and record["global_weights_share"] == 0.5
    stream = io.StringIO()
    RunProgress(Progress(stream, "lines"))(status)
    assert "max_weight_share caps each holder: the update was scaled by 0.5" in stream.getvalue()


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


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One run with honest holders beside broken and hostile ones, each through the real ServerApp path."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_task_identity(monkeypatch)
        yield _hostile_run(tmp_path_factory.mktemp("hostile"))


def _hostile_run(tmp_path):
    key = _directory(tmp_path, expected=11)
    other_ledger_key = SigningKey.generate().public_key_text
    nodes = [
        Node(1, "honest", step=1.0),
        Node(2, "composed", "composed", step=1.0),
        Node(3, "lists", "list metrics", step=1.0),
        Node(4, "object", "object layout", step=1.0),
        Node(5, "negative", "negative shape", step=1.0),
        Node(6, "giant", step=1000.0),
        Node(7, "mute", "no evaluation", step=1.0),
        Node(8, "impostor", claims={"holder_id": "honest"}, step=1.0),
        Node(9, "rekeyed", claims={"public_key": other_ledger_key}, step=1.0),
        Node(10, "stranger", registered=False, step=1.0),
        Node(11, "big", dataset_size=1000, step=2.0),
    ]
    federation = _federation(tmp_path, nodes)
    federation.run()
    return tmp_path, federation.status, key, {node.holder_id: node for node in nodes}, federation.grid.pushed


def test_hostile_replies_abort_only_their_holder_and_the_round_goes_on(hostile):
    directory, status, key, _, _ = hostile
    assert status["state"] == "finished" and status["rounds_completed"] == 2, status["reason"]
    holders = status["holders"]
    for holder in ("honest", "composed", "lists", "mute", "big"):
        assert holders[holder]["rounds_committed"] == 2 and holders[holder]["active"], holders[holder]
    assert "dtype" in holders["object"]["reason"]  # a layout claiming dtype object
    assert "integers >= 0" in holders["negative"]["reason"]  # a layout with a negative shape
    assert "more than the bound" in holders["giant"]["reason"]  # a model-replacement-sized update
    for holder in ("object", "negative", "giant"):
        assert holders[holder]["rounds_committed"] == 0 and not holders[holder]["active"]
    report = verify_ledger(directory / "ledger.jsonl", key.public_key_text)
    assert report.ok, report.summary()
    assert report.holders["giant"].epsilon_certified == 0.0  # its reservation was aborted


def test_a_composed_event_and_list_metrics_are_accepted_without_the_lists(hostile):
    _, status, _, _, _ = hostile
    first = status["rounds"][0]["holders"]
    assert first["composed"]["status"] == "committed" and first["composed"]["steps"] == 3
    assert first["honest"]["metrics"] == {"steps": 3.0}  # the one training figure a holder releases
    assert first["lists"]["metrics"] == {} and first["lists"]["steps"] == 3  # a list for "steps" left out; the receipt says 3
    assert status["holders"]["lists"]["evaluation"]["1"] == {"loss": 0.25}  # the list-valued accuracy left out
    assert all(r["slowest_train_seconds"] is None and r["overhead_seconds"] is None for r in status["rounds"])


def test_nodes_impersonating_a_holder_or_unregistered_are_left_out(hostile):
    """The attack: a registered node claims another holder's id (impostor -> honest), or its own id with a
    ledger key other than the registered one; an unregistered SuperNode key describes itself. None of them
    is planned, reserved or sent anything."""
    directory, status, key, _, _ = hostile
    skipped = status["skipped"]
    assert "claims holder id 'honest' but its SuperNode key is registered to 'impostor'" in skipped["node-8"]
    assert "ledger key other than the registered one" in skipped["node-9"]
    assert "not in the holder registry" in skipped["node-10"]
    assert not {"impostor", "rekeyed", "stranger"} & set(status["holders"])
    assert status["holders"]["honest"]["rounds_committed"] == 2
    report = verify_ledger(directory / "ledger.jsonl", key.public_key_text)
    assert not {"impostor", "rekeyed", "stranger"} & set(report.holders)


def test_a_holder_claiming_a_large_dataset_gets_at_most_half_the_average(hostile):
    directory, status, _, _, _ = hostile
    shares = {holder: outcome["weight_share"] for holder, outcome in status["rounds"][0]["holders"].items() if "weight_share" in outcome}
    assert shares == pytest.approx({"honest": 0.125, "composed": 0.125, "lists": 0.125, "mute": 0.125, "big": 0.5})
    final = load_weights(directory / "out" / "final.safetensors")
    np.testing.assert_allclose(final["w"], np.full((2, 2), 3.0))  # 2 rounds of 0.5 * 2 + 0.5 * 1 (uncapped: 1.71 a round)


def test_evaluations_name_the_run_and_round_and_an_error_reply_drops_nobody(hostile):
    _, status, _, nodes, _ = hostile
    assert nodes["mute"].evaluate_configs == [{"run_id": "t-7", "round": r} for r in (0, 1, 2)]
    mute = status["holders"]["mute"]
    assert mute["active"] and mute["reason"] is None and mute["evaluation"] == {}
    assert status["holders"]["honest"]["accuracy"] == {"0": 0.5, "1": 0.5, "2": 0.5}


def test_each_round_sends_one_message_per_holder_with_the_evaluation_inside(hostile):
    """Evaluation of round r-1's model rides inside round r's train message: no evaluate message until the
    model after the last round, and never two messages to a holder in one round."""
    _, status, _, _, pushed = hostile
    types = [kind for kind, _ in pushed]
    first_train, last_train = types.index(MessageType.TRAIN), len(types) - 1 - types[::-1].index(MessageType.TRAIN)
    assert set(types[:first_train]) == {MessageType.QUERY}
    assert set(types[first_train:last_train + 1]) == {MessageType.TRAIN}
    assert set(types[last_train + 1:]) == {MessageType.EVALUATE}
    trains = [node for kind, node in pushed if kind == MessageType.TRAIN]
    round_1 = [node for node in trains[: len(status["rounds"][0]["holders"])]]
    assert len(round_1) == len(set(round_1))  # one train message per holder in round 1


def test_a_configured_update_norm_bound_is_applied(tmp_path, monkeypatch):
    fake_task_identity(monkeypatch)
    _directory(tmp_path, expected=2, extra="max_update_norm = 1.0\n")
    nodes = [Node(1, "small", step=0.1), Node(2, "large", step=1.0)]
    federation = _federation(tmp_path, nodes)
    federation.run()
    status = federation.status
    assert status["plan"]["max_update_norm"] == 1.0
    assert status["holders"]["small"]["rounds_committed"] == 2
    assert "more than the bound 1" in status["holders"]["large"]["reason"]


def test_a_registered_holder_whose_node_never_connects_is_named(tmp_path, monkeypatch):
    fake_task_identity(monkeypatch)
    _directory(tmp_path, expected=2)
    federation = _federation(tmp_path, [Node(1, "present")], absent=[Node(2, "absent")])
    federation.run()
    assert "no node of absent connected" in federation.status["skipped"]["absent"]
    assert federation.status["holders"]["present"]["rounds_committed"] == 2


def test_a_holder_whose_budget_left_makes_its_updates_noise_is_warned_about_before_the_run(tmp_path, monkeypatch, capsys):
    """A holder that states (spent_mechanisms) a ledger holding 7.993 of its 8: the plan that fits what is left
    needs several times a fresh budget's noise. The coordinator prints a warning naming it and its budget left
    before the first round, and the status (table and page) carries it; a fresh holder gets none."""
    import json

    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.events import PoissonGaussianEvent
    from ewtune.accountant.spend import mechanism_rows
    from ewtune.coordinator.cli import status_table

    fake_task_identity(monkeypatch)
    _directory(tmp_path, expected=2)
    spent = PoissonGaussianEvent(0.1, 1.547, 500)
    claims = {"spent_epsilon_certified": certified_epsilon(spent, 1e-5), "spent_mechanisms": json.dumps(mechanism_rows(spent))}
    federation = _federation(tmp_path, [Node(1, "fresh"), Node(2, "exhausted", claims=claims)])
    federation.run()
    status = federation.status
    warning = status["holders"]["exhausted"]["warning"]
    left = 8 - claims["spent_epsilon_certified"]  # about 0.0067: the holder's certified spend of 7.993
    assert 0.006 < left < 0.0075
    assert warning.startswith(f"holder exhausted has epsilon {left:.4g} of 8 left") and "mostly noise" in warning
    assert status["holders"]["fresh"]["warning"] is None
    printed = capsys.readouterr().out
    assert f"WARNING: {warning}" in printed and printed.index("WARNING") < printed.index("round 1")
    assert f"WARNING: {warning}" in status_table(status).splitlines()
    import io

    from ewtune.coordinator.run_progress import RunProgress
    from ewtune.federation.progress import Progress

    stream = io.StringIO()
    RunProgress(Progress(stream, "lines"))(status)  # what `ewtune coordinator run` prints as it follows the run
    assert f"WARNING: {warning}" in stream.getvalue()
