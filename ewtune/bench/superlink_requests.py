"""Every request the SuperLink serves, counted inside the SuperLink, for ``ewtune bench federation``.

flwr 1.42 serves the Fleet API (SuperNodes), the Runtime API (the ServerApp and the SuperExec) and the Control
API (``flwr`` commands) over HTTP on one port, from one FastAPI app. It keeps no request counters of its own
(its Fleet event log needs the Enterprise package ``flwr.ee``), and its uvicorn access log names neither the
node nor whether a pull found anything. So ``python -m ewtune.bench.superlink_requests --request-log PATH
[flower-superlink arguments]`` runs ewtune's SuperLink (:mod:`ewtune.coordinator.superlink_main`) with one more
ASGI middleware, :class:`RequestRecorder`, put first (outermost) in the app's middleware list. It writes one
JSON line per HTTP request when the response has been sent:

- ``seq``: the request's arrival order (one event loop: no two requests share a number);
- ``path`` and ``status`` (the HTTP status sent);
- ``node``: for a Fleet request, the node id in its protobuf request, the one Flower's own SuperNode
  authentication checks against the request's signature (``request.state.protobuf_request``, parsed by
  Flower's translation middleware inside this one; the request's state dict is shared down the stack);
- ``empty``: for a pull, whether it found nothing: a message pull (Fleet or Runtime) whose response lists no
  message, an object pull whose response says the object is not available yet;
- ``pushed``: for the ServerApp's message push, each message's (type, group id); ewtune's ServerApp sets the
  group id to the round (:mod:`ewtune.coordinator.server_app`).

The count is exact because every HTTP request passes through the outermost middleware exactly once, whatever
happens inside (a rejected request is recorded with its error status), and the emptiness is read from the
bytes the client received. :func:`requests_by_phase` then splits the stream at the ServerApp's pushes: a
round's requests are those that arrived from its first train push up to the next push of anything else (the
next round's, or the final evaluation's), so every request belongs to exactly one phase. Recording costs a few
microseconds and one short line of file output per request, against 15-18 ms of the SuperLink's CPU each.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=no-name-in-module

from ewtune.coordinator import superlink_main
from ewtune.federation.flower_internals import PINNED_FLWR_VERSION, FlowerInternalsError

FLEET_PREFIX = "/v1/fleet/"
SERVERAPP_PUSH = "/v1/runtime/push-messages"
TRAIN = "train"  # flwr.common.MessageType.TRAIN


# path of a pull -> (its response's protobuf type, the field that is empty or false when the pull found nothing)
PULL_RESPONSES: dict[str, tuple[type, str]] = {
    "/v1/fleet/pull-messages": (PullMessagesResponse, "messages_list"),
    "/v1/fleet/pull-object": (PullObjectResponse, "object_available"),
    "/v1/runtime/pull-messages": (PullAppMessagesResponse, "messages_list"),
    "/v1/runtime/pull-object": (PullObjectResponse, "object_available"),
}


class RequestRecorder:
    """ASGI middleware: one JSON line per HTTP request into ``log_path`` (see the module's docstring)."""

    def __init__(self, app, log_path: str | Path):
        self.app = app
        self.output = open(log_path, "a", buffering=1, encoding="utf-8")  # line-buffered: complete lines only
        self.arrivals = itertools.count()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seq = next(self.arrivals)
        state = scope.setdefault("state", {})  # the dict behind every inner layer's request.state
        sent: dict[str, Any] = {"status": None, "body": []}
        keep_body = scope["path"] in PULL_RESPONSES

        async def recording_send(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body" and keep_body:
                sent["body"].append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            record = request_record(seq, scope["path"], sent["status"], state.get("protobuf_request"), b"".join(sent["body"]))
            self.output.write(json.dumps(record) + "\n")


def request_record(seq: int, path: str, status: int | None, request, body: bytes) -> dict[str, Any]:
    """The line :class:`RequestRecorder` writes for one request (``request``: its parsed protobuf, or None)."""
    record: dict[str, Any] = {"seq": seq, "path": path, "status": status}
    if path.startswith(FLEET_PREFIX):
        node = None if request is None else request.node.node_id if hasattr(request, "node") else getattr(request, "node_id", None)
        record["node"] = int(node) if node else None  # None: a registration or activation (by public key), or unparsed
    if path in PULL_RESPONSES and status == 200:
        response_type, field = PULL_RESPONSES[path]
        found = getattr(response_type.FromString(body), field)
        record["empty"] = not found
    if path == SERVERAPP_PUSH and request is not None:
        record["pushed"] = [[m.metadata.message_type, m.metadata.group_id] for m in request.messages_list]
    return record


def read_records(path: Path) -> list[dict[str, Any]]:
    """The recorder's lines, in arrival order (a last line cut short by a stop is left out)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return sorted(records, key=lambda record: record["seq"])


def phase_of_push(record: dict[str, Any]) -> str | None:
    """The phase a successful ServerApp push opens: ``train 3`` for round 3's train messages, ``evaluate 5``,
    ``query``; None for any other request."""
    if record["path"] != SERVERAPP_PUSH or record.get("status") != 200 or not record.get("pushed"):
        return None
    message_type, group = record["pushed"][0]
    return f"{message_type} {group}".strip()


def requests_by_phase(records: Iterable[dict[str, Any]], holders: Mapping[int, str]) -> dict[str, dict[str, Counter]]:
    """phase -> party -> Counter(requests, empty_pulls): each request in the phase current at its arrival
    (``before`` until the ServerApp's first push). A party is a holder (its Fleet requests, by node id through
    ``holders``), ``node <id>`` for a node no holder has (``node None``: a Fleet request naming no node), or
    ``coordinator`` (every request outside the Fleet API: the ServerApp's and the SuperExec's Runtime API,
    ``flwr`` commands)."""
    phases: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    phase = "before"
    for record in records:
        phase = phase_of_push(record) or phase
        party = holders.get(record["node"], f"node {record['node']}") if "node" in record else "coordinator"
        phases[phase][party]["requests"] += 1
        phases[phase][party]["empty_pulls"] += int(bool(record.get("empty")))
    return phases


def per_round(phases: Mapping[str, Mapping[str, Counter]], holder_names: Iterable[str], rounds: int) -> list[dict[str, Any]]:
    """Per training round 1..``rounds``: each holder's requests and empty pulls, and the coordinator side's."""
    names = list(holder_names)
    table = []
    for round in range(1, rounds + 1):
        parties = phases.get(f"{TRAIN} {round}", {})
        table.append({
            "round": round,
            "holders": {name: _counts(parties.get(name)) for name in names},
            "coordinator": _counts(parties.get("coordinator")),
            "unknown_nodes": sum(c["requests"] for party, c in parties.items() if party.startswith("node ")),
        })
    return table


def _counts(counter: Counter | None) -> dict[str, int]:
    counter = counter or Counter()
    return {"requests": counter["requests"], "empty_pulls": counter["empty_pulls"]}


def steady_rates(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """Means over rounds 2 and later (round 1 pays start-up): per holder and round, its requests other than
    empty pulls and its empty pulls; the coordinator side's per round, and per round divided by the holders
    (what each holder costs the SuperLink on the ServerApp's side); the min and max of a holder's requests in one round."""
    steady = [r for r in rounds if r["round"] > 1]
    cells = [counts for r in steady for counts in r["holders"].values()]
    if not steady or not cells:
        return {key: None for key in ("holder_requests", "holder_empty_pulls", "coordinator_requests", "coordinator_empty_pulls",
                                      "coordinator_requests_per_holder", "holder_requests_min", "holder_requests_max")}
    holders = len(steady[0]["holders"])
    coordinator = sum(r["coordinator"]["requests"] for r in steady) / len(steady)
    return {
        "holder_requests": sum(c["requests"] - c["empty_pulls"] for c in cells) / len(cells),
        "holder_empty_pulls": sum(c["empty_pulls"] for c in cells) / len(cells),
        "coordinator_requests": coordinator,
        "coordinator_empty_pulls": sum(r["coordinator"]["empty_pulls"] for r in steady) / len(steady),
        "coordinator_requests_per_holder": coordinator / holders,
        "holder_requests_min": min(c["requests"] for c in cells),
        "holder_requests_max": max(c["requests"] for c in cells),
    }


def install(log_path: Path) -> None:
    """Put :class:`RequestRecorder` first in the middleware of the SuperLink app this process will build
    (``flwr.superlink.main._get_middleware``, read when ``create_app`` runs); refuses a flwr other than the pinned one."""
    # Here, not at the top: the SuperLink app's module loads FastAPI and the whole SuperLink (about 1 s of CPU),
    # which only the SuperLink process needs; the bench reads the records without it.
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    import flwr.superlink.main as superlink_app
    from starlette.middleware import Middleware

    installed = importlib.metadata.version("flwr")
    if installed != PINNED_FLWR_VERSION or not callable(getattr(superlink_app, "_get_middleware", None)):
        raise FlowerInternalsError(f"the request recorder is written for flwr {PINNED_FLWR_VERSION}'s SuperLink app; flwr {installed} is installed")
    flower_middleware = superlink_app._get_middleware
    superlink_app._get_middleware = lambda: [Middleware(RequestRecorder, log_path=log_path), *flower_middleware()]


def main(argv: list[str] | None = None) -> None:
    """``python -m ewtune.bench.superlink_requests --request-log PATH [flower-superlink arguments]``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) < 2 or arguments[0] != "--request-log":
        sys.exit("ewtune: error: usage: python -m ewtune.bench.superlink_requests --request-log PATH [flower-superlink arguments]")
    install(Path(arguments[1]).resolve())
    sys.argv = [sys.argv[0], *arguments[2:]]
    superlink_main.main()


if __name__ == "__main__":
    main()
