"""The federation benchmark's own arithmetic: the SuperLink's CPU seconds per round, the overhead split, the
requests counted inside the SuperLink, each holder's resident memory, and the check that nothing was lost."""

import os
import time

from ewtune.accountant.signing import canonical_json
from ewtune.bench.federation import SuperLinkCpu, committed_rounds, ledger_breakdown, nothing_lost, round_overheads
from ewtune.bench.holder_memory import HolderMemory
from ewtune.bench.superlink_requests import (
    RequestRecorder,
    per_round,
    phase_of_push,
    read_records,
    request_record,
    requests_by_phase,
    steady_rates,
)


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_superlink_cpu_per_round_counts_only_rounds_after_the_first():
    meter = SuperLinkCpu(os.getpid())  # this process stands in for the SuperLink
    meter.on_status({"rounds": []})
    _burn(0.3)  # start-up and round 1: left out
    meter.on_status({"rounds": [{"round": 1}]})
    assert meter.per_round_after_first() is None  # one round is not a rate
    _burn(0.2)
    meter.on_status({"rounds": [{"round": 1}]})  # a status update within round 2 keeps the first reading
    _burn(0.2)
    meter.on_status({"rounds": [{"round": 1}, {"round": 2}]})
    _burn(0.4)
    meter.on_status({"rounds": [{"round": 1}, {"round": 2}, {"round": 3}]})
    per_round = meter.per_round_after_first()
    assert 0.4 * 0.98 <= per_round <= 0.4 * 1.3  # (0.2 + 0.2 + 0.4) s over rounds 2 and 3, plus what else this process did


def test_overhead_is_round_time_minus_the_slowest_holder_and_none_without_a_ledger_row():
    rounds = [{"round": 1, "seconds": 5.0, "exchange_seconds": 4.5}, {"round": 2, "seconds": 3.0, "exchange_seconds": 2.9}]
    breakdown = [{"round": 1, "train_seconds": 1.0}, {"round": 1, "train_seconds": 2.0}]
    first, second = round_overheads(rounds, breakdown)
    assert first["overhead_seconds"] == 3.0 and first["slowest_train_seconds"] == 2.0
    assert abs(first["aggregate_seconds"] - 0.5) < 1e-12
    assert second["overhead_seconds"] is None and second["slowest_train_seconds"] is None


# -- what each holder costs: requests counted inside the SuperLink, resident memory, nothing lost ----------


def _flower_app_with_recorder(log_path):
    """Flower 1.42's own Fleet router, error translation and protobuf translation behind the recorder, as in its
    SuperLink app, its LinkState replaced by an empty queue (every pull finds nothing, as a SuperNode's idle pull)."""
    from fastapi import FastAPI
    from flwr.supercore.error import http_error_translator
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware
    from flwr.superlink.dependencies.linkstate import get_linkstate
    from flwr.superlink.routers.fleet.router import router
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    class EmptyQueue:
        object_store = None

        def get_message_ins(self, node_id, limit):
            return []

    app = FastAPI(middleware=[
        Middleware(RequestRecorder, log_path=log_path),
        Middleware(BaseHTTPMiddleware, dispatch=http_error_translator),
        Middleware(ProtobufTranslationMiddleware),
    ])
    app.include_router(router)
    app.dependency_overrides[get_linkstate] = EmptyQueue
    return app


def test_recorder_counts_every_request_through_flowers_own_fleet_router(tmp_path):
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from starlette.testclient import TestClient

    log = tmp_path / "requests.jsonl"
    client = TestClient(_flower_app_with_recorder(log))
    headers = {"content-type": "application/protobuf"}
    for node in (42, 42, 7):
        answer = client.post("/v1/fleet/pull-messages", content=PullMessagesRequest(node=Node(node_id=node)).SerializeToString(), headers=headers)
        assert answer.status_code == 200
    refused = client.post("/v1/fleet/pull-messages", content=b"\xff not protobuf", headers=headers)
    assert refused.status_code >= 400
    records = read_records(log)
    assert [(r["seq"], r["node"], r.get("empty")) for r in records[:3]] == [(0, 42, True), (1, 42, True), (2, 7, True)]
    assert records[3]["seq"] == 3 and records[3]["status"] == refused.status_code and records[3]["node"] is None
    assert "empty" not in records[3]  # an error is no pull result
    phases = requests_by_phase(records, {42: "holder-a", 7: "holder-b"})
    assert phases["before"]["holder-a"] == {"requests": 2, "empty_pulls": 2}
    assert phases["before"]["node None"] == {"requests": 1, "empty_pulls": 0}


def test_record_reads_found_and_empty_pulls_and_the_pushed_round():
    from flwr.proto.fleet_pb2 import PullMessagesResponse
    from flwr.proto.message_pb2 import Message, Metadata, PullObjectResponse
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest

    found = PullMessagesResponse(messages_list=[Message(metadata=Metadata(message_type="train", group_id="3"))]).SerializeToString()
    assert request_record(5, "/v1/fleet/pull-messages", 200, None, found) == {"seq": 5, "path": "/v1/fleet/pull-messages", "status": 200, "node": None, "empty": False}
    lagging = PullObjectResponse(object_found=True, object_available=False).SerializeToString()
    assert request_record(6, "/v1/runtime/pull-object", 200, None, lagging)["empty"] is True
    assert request_record(7, "/v1/runtime/pull-object", 200, None, PullObjectResponse(object_available=True, object_content=b"x").SerializeToString())["empty"] is False
    push = PushAppMessagesRequest(messages_list=[Message(metadata=Metadata(message_type="train", group_id="3", dst_node_id=9))])
    record = request_record(8, "/v1/runtime/push-messages", 200, push, b"")
    assert record["pushed"] == [["train", "3"]] and "node" not in record and phase_of_push(record) == "train 3"
    assert phase_of_push({**record, "status": 500}) is None  # a push that failed opens no phase


def _record(seq, path, node=None, empty=None, pushed=None, status=200):
    record = {"seq": seq, "path": path, "status": status}
    if path.startswith("/v1/fleet/"):
        record["node"] = node
    if empty is not None:
        record["empty"] = empty
    if pushed is not None:
        record["pushed"] = pushed
    return record


def test_requests_split_at_the_serverapps_pushes_and_per_holder_rates():
    pull, obj, push = "/v1/fleet/pull-messages", "/v1/fleet/pull-object", "/v1/runtime/push-messages"
    stream = [
        _record(0, pull, 1, empty=True),  # before the run's first push
        _record(1, push, pushed=[["query", ""]]),
        _record(2, pull, 1, empty=False), _record(3, pull, 2, empty=True),
        _record(4, push, pushed=[["train", "1"]]),
        _record(5, pull, 1, empty=False), _record(6, obj, 1, empty=False), _record(7, obj, 1, empty=True),
        _record(8, pull, 2, empty=False), _record(9, "/v1/fleet/push-messages", 2),
        _record(10, push, pushed=[["train", "2"]]),
        _record(11, push, pushed=[["train", "2"]]),  # the same round's second message: still round 2
        _record(13, pull, 1, empty=False), _record(14, pull, 1, empty=True), _record(15, pull, 1, empty=True),
        _record(16, pull, 2, empty=False), _record(17, pull, 99, empty=True),  # node 99 is no holder
        _record(18, "/v1/runtime/pull-messages", empty=True),
        _record(19, push, pushed=[["evaluate", "2"]]),
        _record(20, pull, 1, empty=True),
    ]
    stream.append(_record(12, pull, 2, empty=True))  # finished late, arrived within round 2: sorted by arrival
    stream = sorted(stream, key=lambda r: r["seq"])
    phases = requests_by_phase(stream, {1: "a", 2: "b"})
    assert set(phases) == {"before", "query", "train 1", "train 2", "evaluate 2"}
    rounds = per_round(phases, ["a", "b"], 2)
    assert rounds[0]["holders"] == {"a": {"requests": 3, "empty_pulls": 1}, "b": {"requests": 2, "empty_pulls": 0}}
    assert rounds[0]["coordinator"] == {"requests": 1, "empty_pulls": 0}  # its own push
    assert rounds[1]["holders"] == {"a": {"requests": 3, "empty_pulls": 2}, "b": {"requests": 2, "empty_pulls": 1}}
    assert rounds[1]["coordinator"] == {"requests": 3, "empty_pulls": 1} and rounds[1]["unknown_nodes"] == 1
    rates = steady_rates(rounds)  # round 2 only
    assert rates["holder_requests"] == 1.0 and rates["holder_empty_pulls"] == 1.5
    assert rates["coordinator_requests"] == 3 and rates["coordinator_requests_per_holder"] == 1.5
    assert (rates["holder_requests_min"], rates["holder_requests_max"]) == (2, 3)
    assert steady_rates(rounds[:1])["holder_requests"] is None  # round 1 alone is start-up, not a rate


def test_holder_memory_reads_daemon_and_supernode_and_keeps_each_rounds_first_reading():
    import subprocess
    import sys

    import psutil

    # The test process stands in for a daemon; its child, holding 64 MiB, for its SuperNode.
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = b'1' * (64 << 20); print(1, flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"1"
        memory = HolderMemory({"h": os.getpid()})
        memory.on_status({"rounds": [{"round": 1}]})
        assert memory.first_and_last() is None
        memory.on_status({"rounds": [{"round": 1}, {"round": 2}]})
        # The "daemon" grows by 48 MiB after round 2's reading (written, so resident: a zeroed bytearray of this size
        # comes from calloc's untouched pages and may not count in the RSS at all) ...
        ballast = b"1" * (48 << 20)
        memory.on_status({"rounds": [{"round": 1}, {"round": 2}]})  # ... which a second update of round 2 does not replace
        memory.on_status({"rounds": [{"round": 1}, {"round": 2}, {"round": 3}]})
        summary = memory.first_and_last()
        daemon, supernode = summary["holders"]["h"]["daemon"], summary["holders"]["h"]["supernode"]
        assert (summary["first_round"], summary["last_round"]) == (1, 3)
        assert supernode[0] >= 64 and supernode[1] >= 64
        assert 46 <= daemon[1] - daemon[0] <= 60 and summary["daemon"]["growth_max_mib"] == daemon[1] - daemon[0]
        assert abs(daemon[1] - psutil.Process().memory_info().rss / 2**20) < 8
        del ballast
    finally:
        child.kill()
        child.wait()


def test_nothing_lost_needs_every_round_every_reply_and_every_ledger_commit():
    holders = {"a": ({1: 0, 2: 0}, {1: 0, 2: 0}), "b": ({1: 0, 2: 0}, {1: 0, 2: 0})}
    status = {"rounds_completed": 2, "rounds": [{"holders": {"a": {"status": "committed"}, "b": {"status": "committed"}}}] * 2}
    assert nothing_lost(status, holders, 2)["complete"] is True
    dropped = {**status, "rounds": status["rounds"][:1] + [{"holders": {"a": {"status": "committed"}, "b": {"status": "aborted"}}}]}
    assert nothing_lost(dropped, holders, 2)["replies_accepted"] == 3 and not nothing_lost(dropped, holders, 2)["complete"]
    unrecorded = {**holders, "b": ({1: 0, 2: 0}, {1: 0})}  # its own ledger lacks round 2's commit
    check = nothing_lost(status, unrecorded, 2)
    assert not check["complete"] and check["ledger_commits"]["b"] == [2, 1]
    assert not nothing_lost({**status, "rounds_completed": 1}, holders, 2)["complete"]


def _entry(seq, kind, second, **payload):
    """An entry as the timing reads it (the breakdown reads verified ledgers; the signature is not its concern)."""
    return {"seq": seq, "prev": "", "time": f"2026-12-05T03:00:{second:02d}.000000Z", "writer": "w", "kind": kind,
            "payload": payload, "signature": ""}


def _write_ledger(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(canonical_json(entry).decode() + "\n" for entry in entries))


def test_the_breakdown_times_each_training_round_from_both_ledgers_and_leaves_evaluations_and_other_runs_out(tmp_path):
    _write_ledger(tmp_path / "coordinator" / "ledger.jsonl", [
        _entry(1, "reserve", 0, holder="h0", run_id="r", round=1),
        _entry(2, "reserve", 1, holder="h0", run_id="other", round=1),  # another run
        _entry(3, "reserve", 1, holder="h1", run_id="r", round=1),  # another holder
        _entry(4, "commit", 9, reservation=1, extra={}),
        _entry(5, "commit", 9, reservation=2, extra={}),
        _entry(6, "reserve", 10, holder="h0", run_id="r", round=2),
        _entry(7, "commit", 11, reservation=6, extra={"purpose": "evaluation"}),  # an evaluation, not a round
    ])
    _write_ledger(tmp_path / "holders" / "h0" / "ledger.jsonl", [
        _entry(1, "reserve", 2, run_id="r", round=1),  # a holder's own ledger names no holder: it is the writer
        _entry(2, "commit", 7, reservation=1, extra={"receipt_sha256": "ab"}),
    ])
    committed = committed_rounds(tmp_path, "r", ["h0"])
    assert {holder: (sorted(ours), sorted(own)) for holder, (ours, own) in committed.items()} == {"h0": ([1], [1])}
    assert ledger_breakdown(committed) == [
        {"round": 1, "holder": "h0", "deliver_seconds": 2.0, "train_seconds": 5.0, "return_seconds": 2.0}
    ]
