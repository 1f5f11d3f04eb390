"""Coordinator crash recovery, in-process against the fake Grid of test_server_app (deterministic holders: an
update is the incoming weights plus the holder's step). The ServerApp runs in a forked child that SIGKILLs itself
at a named point of a round (ewtune/coordinator/crash_points.py); the parent starts it again with a new Flower run id,
as a second ``ewtune coordinator run`` would. Whatever the kill point, the resumed federation ends with the same
final model and the same certified spend as an uninterrupted run of the same holders, every reservation is
closed once, and the coordinator's ledger verifies.

The same with real Flower processes on loopback: tests/test_coordinator_crash.py."""

import io
import json
import os
import signal

import numpy as np
import pytest
from support.fake_grid import FakeGrid, Node, _directory, _federation, fake_task_identity

from ewtune.accountant.crosscheck import read_entries
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.verify import verify_ledger
from ewtune.coordinator import crash_points
from ewtune.coordinator.checkpoints import load_weights
from ewtune.coordinator.cli import status_table
from ewtune.coordinator.config import load_federation_config
from ewtune.coordinator.recovery import INBOX, RUN_RECORD, earlier_flower_run_ids, load_run_record
from ewtune.coordinator.run_progress import RunProgress
from ewtune.coordinator.server_app import Federation
from ewtune.federation.progress import Progress

HOLDERS = (("a", 1.0, 100), ("b", 2.0, 300))


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    fake_task_identity(monkeypatch)


def _nodes():
    return [Node(index + 1, holder_id, step=step, dataset_size=size) for index, (holder_id, step, size) in enumerate(HOLDERS)]


def _run_killed_at(directory, nodes, point):
    """Run the federation in a forked child that dies by SIGKILL at ``point``; returns the child's wait status."""
    crash_file = directory / "crash-point"
    crash_file.write_text(point)
    os.environ[crash_points.ENVIRONMENT] = str(crash_file)
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - the child leaves by SIGKILL (or exits 3 if the point was never reached)
            try:
                _federation(directory, nodes).run()
            finally:
                os._exit(3)
        _, status = os.waitpid(child, 0)
    finally:
        del os.environ[crash_points.ENVIRONMENT]
    assert not crash_file.exists(), f"the ServerApp never reached {point}"
    return status


def _restart(directory, nodes, flower_run_id=8):
    federation = Federation(FakeGrid(nodes), load_federation_config(directory / "federation.toml"), flower_run_id=flower_run_id)
    federation.run()
    return federation.status


def _holder_epsilons(directory, key):
    report = verify_ledger(directory / "ledger.jsonl", key.public_key_text)
    assert report.ok, report.summary()
    return {holder_id: spend.epsilon_certified for holder_id, spend in report.holders.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        fake_task_identity(patch)
        directory = tmp_path_factory.mktemp("uninterrupted")
        key = _directory(directory, expected=2)
        federation = _federation(directory, _nodes())
        federation.run()
    assert federation.status["state"] == "finished"
    return load_weights(directory / "out" / "final.safetensors"), _holder_epsilons(directory, key)


# kill point -> (how each open reservation was closed at restart, (run, round) of every reservation, round rebuilt)
KILL_POINTS = {
    # before any reply: both reservations aborted as not received, round 1 trained again under the new run id
    "reserved:1": ([("a", 1, "abort"), ("b", 1, "abort")], [("t-7", 1)] * 2 + [("t-8", 1)] * 2 + [("t-8", 2)] * 2, None),
    # a's update committed, b's received but not yet committed: b's committed from the inbox, round 1 rebuilt
    "committed:1:1": ([("b", 1, "commit")], [("t-7", 1)] * 2 + [("t-8", 2)] * 2, 1),
    "committed:1:2": ([], [("t-7", 1)] * 2 + [("t-8", 2)] * 2, 1),
    "checkpointed:1": ([], [("t-7", 1)] * 2 + [("t-8", 2)] * 2, None),
    "committed:2:1": ([("b", 2, "commit")], [("t-7", 1)] * 2 + [("t-7", 2)] * 2, 2),
    # after the last checkpoint: nothing is trained again, the final model is written
    "checkpointed:2": ([], [("t-7", 1)] * 2 + [("t-7", 2)] * 2, None),
}
SLOW = pytest.mark.slow


@pytest.mark.parametrize("point", [
    "reserved:1", "committed:1:1", "checkpointed:2",
    pytest.param("committed:1:2", marks=SLOW), pytest.param("checkpointed:1", marks=SLOW), pytest.param("committed:2:1", marks=SLOW),
])
def test_a_federation_killed_at_any_point_ends_as_if_the_crash_had_only_cost_time(tmp_path, uninterrupted, point):
    final, epsilons = uninterrupted
    reconciled, reservations, rebuilt = KILL_POINTS[point]
    key = _directory(tmp_path, expected=2)
    nodes = _nodes()
    status = _run_killed_at(tmp_path, nodes, point)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert load_run_record(tmp_path / "out").state == "running"  # the kill left the record as it was

    resumed = _restart(tmp_path, nodes)
    assert resumed["state"] == "finished", resumed.get("reason")
    assert resumed["run_id"] == "t-8" and resumed["resumed"]["from_runs"] == ["t-7"]
    assert [(o["holder_id"], o["round"], o["action"]) for o in resumed["resumed"]["reconciled"]] == reconciled
    assert resumed["rounds_completed"] == 2
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert [r["round"] for r in resumed["rounds"] if r.get("rebuilt_after_restart")] == ([rebuilt] if rebuilt else [])
    restored = load_weights(tmp_path / "out" / "final.safetensors")
    for name, array in final.items():
        np.testing.assert_array_equal(restored[name], array)
    assert _holder_epsilons(tmp_path, key) == pytest.approx(epsilons)
    entries = read_entries(tmp_path / "ledger.jsonl")
    reserved = {e["seq"]: (e["payload"]["holder"], e["payload"]["round"]) for e in entries if e["kind"] == "reserve"}
    assert sorted((e["payload"]["run_id"], e["payload"]["round"]) for e in entries if e["kind"] == "reserve") == reservations
    closed = [e["payload"]["reservation"] for e in entries if e["kind"] in ("commit", "abort")]
    assert sorted(closed) == sorted(reserved)  # every reservation closed, none twice
    committed = sorted(reserved[e["payload"]["reservation"]] for e in entries if e["kind"] == "commit")
    assert committed == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]  # one commit per holder and round
    recovered = [e for e in entries if e["kind"] == "commit" and "recovered" in e["payload"].get("extra", {})]
    assert all(e["payload"]["receipt_sha256"] and e["payload"]["extra"]["update_sha256"] for e in recovered)
    assert len(recovered) == sum(1 for *_, action in reconciled if action == "commit")
    assert resumed["holders"]["a"]["rounds_committed"] == resumed["holders"]["b"]["rounds_committed"] == 2
    assert not any((tmp_path / "out" / INBOX).rglob("*.safetensors"))  # every received update is in a checkpoint
    assert load_run_record(tmp_path / "out").state == "finished"
    _reported_as_by_the_cli(resumed)


def _reported_as_by_the_cli(status):
    """`ewtune coordinator run` and `status` print a resumed status as any other (a rebuilt round included)."""
    stream = io.StringIO()
    RunProgress(Progress(stream, "lines"))(status)
    rounds = [line for line in stream.getvalue().splitlines() if "round " in line and "aggregated" in line]
    assert len(rounds) == 2 and all("2 update(s) verified and aggregated" in line for line in rounds), stream.getvalue()
    assert f"{status['run_id']}: finished, 2/2 rounds (resumed after t-7)" in status_table(status)


def test_a_tampered_update_in_the_inbox_is_aborted_not_committed(tmp_path):
    _directory(tmp_path, expected=2)
    nodes = _nodes()
    _run_killed_at(tmp_path, nodes, "committed:1:1")
    (kept,) = (tmp_path / "out" / INBOX).rglob("b.safetensors")
    from ewtune.coordinator.checkpoints import read_metadata, save_weights

    update = load_weights(kept)
    save_weights(kept, {name: array + 1 for name, array in update.items()}, read_metadata(kept))
    resumed = _restart(tmp_path, nodes)
    (outcome,) = resumed["resumed"]["reconciled"]
    assert outcome["action"] == "abort" and "does not match its receipt" in outcome["reason"]
    assert resumed["state"] == "finished" and resumed["rounds"][0]["holders"] == {"a": {"status": "committed", "weight_share": 0.5}}
    assert resumed["rounds"][0]["global_weights_share"] == 0.5  # the cap 0.5 holds for a rebuilt round too


def test_a_finished_federation_is_not_resumed_and_other_settings_are_refused(tmp_path):
    _directory(tmp_path, expected=2)
    nodes = _nodes()
    _run_killed_at(tmp_path, nodes, "committed:2:1")
    assert earlier_flower_run_ids(tmp_path / "out") == [7]  # what `ewtune coordinator run` asks the SuperLink to stop
    toml = tmp_path / "federation.toml"
    toml.write_text(toml.read_text().replace("learning_rate = 0.1", "learning_rate = 0.2"))
    with pytest.raises(InvalidInputError, match="unfinished federation 't'.*other \\[federation\\] settings"):
        _restart(tmp_path, nodes)
    toml.write_text(toml.read_text().replace("learning_rate = 0.2", "learning_rate = 0.1"))
    assert _restart(tmp_path, nodes, flower_run_id=9)["resumed"]["from_runs"] == ["t-7"]  # the refused start left no trace
    assert earlier_flower_run_ids(tmp_path / "out") == []  # finished: nothing to stop or resume
    fresh = _restart(tmp_path, nodes, flower_run_id=10)
    assert "resumed" not in fresh and fresh["run_id"] == "t-10"
    assert json.loads((tmp_path / "out" / RUN_RECORD).read_text())["segments"] == ["t-10"]


class _Dropping(Node):
    """A holder whose daemon stops during round ``drops_in`` (its train message is never answered), then comes back."""

    drops_in: int | None = None

    def reply(self, message):
        if self.drops_in is not None and "round" in message.content.get("config", {}) and message.content["config"]["round"] == self.drops_in:
            return None
        return super().reply(message)


def test_a_holder_that_drops_leaves_the_run_interrupted_and_a_second_start_resumes_it(tmp_path):
    """min_holders = 2 and b's daemon stops in round 1: the run stops before round 2 as ``interrupted`` (the run record
    stays open, no final model is written), and `coordinator run` again, b back, resumes at round 2 with both."""
    key = _directory(tmp_path, expected=2)
    toml = tmp_path / "federation.toml"
    toml.write_text(toml.read_text().replace("min_holders = 1", "min_holders = 2"))
    nodes = [Node(1, "a", step=1.0, dataset_size=100), _Dropping(2, "b", step=2.0, dataset_size=300)]
    nodes[1].drops_in = 1
    federation = _federation(tmp_path, nodes)
    federation.run()
    status = federation.status
    assert status["state"] == "interrupted" and status["rounds_completed"] == 1
    assert "dropped: b" in status["reason"] and "resumes at round 2" in status["reason"]
    assert load_run_record(tmp_path / "out").resumable and not (tmp_path / "out" / "final.safetensors").exists()
    assert earlier_flower_run_ids(tmp_path / "out") == [7]
    nodes[1].drops_in = None  # the holder's daemon is back
    resumed = _restart(tmp_path, nodes)
    assert resumed["state"] == "finished" and resumed["rounds_completed"] == 2 and resumed["resumed"]["from_runs"] == ["t-7"]
    assert (tmp_path / "out" / "final.safetensors").exists()
    entries = read_entries(tmp_path / "ledger.jsonl")
    reserved = {e["seq"]: (e["payload"]["holder"], e["payload"]["run_id"], e["payload"]["round"]) for e in entries if e["kind"] == "reserve"}
    closed = [(*reserved[e["payload"]["reservation"]], e["kind"]) for e in entries if e["kind"] in ("commit", "abort")]
    assert len(closed) == len(reserved) and set(closed) == {("a", "t-7", 1, "commit"), ("b", "t-7", 1, "abort"), ("a", "t-8", 2, "commit"), ("b", "t-8", 2, "commit")}
    assert {"a", "b"} <= set(_holder_epsilons(tmp_path, key))  # the ledger verifies, both holders charged
