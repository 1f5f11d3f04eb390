"""The Flower ClientApp (Message API) that every holder's SuperNode runs: a thin shim that forwards to the
holder's agent daemon.

It has no access to data and no signing key: query, train and evaluate messages (:mod:`ewtune.federation.messages`)
are passed to the daemon at the node config's :data:`~ewtune.federation.contract.DAEMON_ADDRESS_KEY` (set with ``flower-supernode
--node-config``), and its answers or refusals are passed back. Weights that arrive packed in one buffer
(:mod:`ewtune.federation.packing`) are unpacked before the daemon sees them, and the update is packed again; the
daemon, its checks and the receipt (whose digest covers the named arrays) never see a layout. The daemon
enforces the holder's policy whatever this shim (the coordinator's code, shipped in the FAB) asks. It
imports only flwr, numpy, grpc, accountant and federation, so that the fresh process Flower starts for every
message is ready in about a second (no torch, no transformers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.rpc import DaemonClient, DaemonError
from ewtune.federation.contract import (
    DAEMON_ADDRESS_KEY,
    DAEMON_TIMEOUT_KEY,
    EvaluationReply,
    EvaluationRequest,
    RevealRequest,
    RoundPlan,
    config_values,
)
from ewtune.federation.messages import (
    CANARIES,
    CONFIG,
    DESCRIPTION,
    FAILED,
    INVALID,
    METRICS,
    REFUSED,
    RESULT,
    REVEAL,
    UNAVAILABLE,
    unpack_in_place,
    weight_records,
    weights_of,
)

_STATUS_CODES = {
    "FAILED_PRECONDITION": REFUSED,
    "INVALID_ARGUMENT": INVALID,
    "UNAVAILABLE": UNAVAILABLE,
    "DEADLINE_EXCEEDED": UNAVAILABLE,
    "RESOURCE_EXHAUSTED": INVALID,  # a message over the daemon's size limit
}
COUNT_METRICS = frozenset({"examples", "steps", "num_examples"})  # metrics sent as ints in a MetricRecord

app = ClientApp()


def _forwarded(handler: Callable[[DaemonClient, Message, bool], RecordDict]):
    """Unpack the message's weights and run ``handler`` against the node's daemon (told whether the weights
    came packed); any failure becomes an ``Error`` reply with its reason (a malformed message: INVALID)."""

    @functools.wraps(handler)
    def reply(msg: Message, context: Context) -> Message:
        try:
            packed = msg.has_content() and unpack_in_place(msg.content)
            with _daemon(context.node_config) as daemon:
                content = handler(daemon, msg, packed)
        except InvalidInputError as bad:
            return Message(Error(code=INVALID, reason=str(bad)), reply_to=msg)
        except DaemonError as failure:
            return Message(Error(code=_STATUS_CODES.get(failure.status, FAILED), reason=failure.reason), reply_to=msg)
        except Exception as failure:  # noqa: BLE001 - a reply beats a crashed ClientApp; no data reaches here
            return Message(Error(code=FAILED, reason=f"{type(failure).__name__}: {failure}"), reply_to=msg)
        return Message(content, reply_to=msg)

    return reply


def _daemon(node_config: Mapping[str, Any]) -> DaemonClient:
    address = node_config.get(DAEMON_ADDRESS_KEY)
    if not isinstance(address, str) or not address:
        raise DaemonError("UNAVAILABLE", f"node_config lacks {DAEMON_ADDRESS_KEY!r} (the agent daemon's address)")
    timeout = node_config.get(DAEMON_TIMEOUT_KEY)
    return DaemonClient(address, timeout=float(timeout) if timeout else None)


def _record(content: RecordDict, name: str) -> dict[str, Any]:
    """The named ConfigRecord of a message, as the dict form its contract message decodes."""
    record = content.get(name) if content is not None else None
    if not isinstance(record, ConfigRecord):
        raise InvalidInputError(f"the message lacks the ConfigRecord {name!r}")
    return dict(record)


@app.query()
@_forwarded
def query(daemon: DaemonClient, msg: Message, packed: bool) -> RecordDict:
    """The holder's description or, for a query carrying :data:`REVEAL`, an audit daemon's canaries."""
    if msg.has_content() and REVEAL in msg.content:
        revealed = daemon.reveal_audit(RevealRequest.from_config(_record(msg.content, REVEAL)))
        return RecordDict({CANARIES: ConfigRecord(config_values(revealed))})
    return RecordDict({DESCRIPTION: ConfigRecord(config_values(daemon.describe().to_config()))})


@app.train()
@_forwarded
def train(daemon: DaemonClient, msg: Message, packed: bool) -> RecordDict:
    weights = weights_of(msg.content)
    plan = RoundPlan.from_config(_record(msg.content, CONFIG))
    request = plan.evaluation()
    evaluation = {} if request is None else _evaluate_first(daemon, weights, request).to_config()
    updated, reply = daemon.train(weights, plan.training())
    fields = config_values({**reply.to_config(), **evaluation})
    return RecordDict(weight_records(updated, packed, record=RESULT, fields=fields))


def _evaluate_first(daemon: DaemonClient, weights, request: EvaluationRequest) -> EvaluationReply:
    """The evaluation a train message asks for, of its own incoming weights (the global model after the
    plan's ``evaluate_round``): the daemon's metrics (released and charged only when the holder's policy opts
    in) or its refusal, which never stops the training."""
    try:
        return daemon.evaluate(weights, request)
    except DaemonError as refusal:
        return EvaluationReply.refused(refusal.reason)


@app.evaluate()
@_forwarded
def evaluate(daemon: DaemonClient, msg: Message, packed: bool) -> RecordDict:
    request = EvaluationRequest.from_config(_record(msg.content, CONFIG))
    reply = daemon.evaluate(weights_of(msg.content), request)
    return RecordDict({METRICS: MetricRecord(_metric_record(reply.evaluation or {}))})


def _metric_record(metrics: Mapping[str, float]) -> dict[str, int | float]:
    """Counts as ints, the rest as floats (every metric of an evaluation reply is a finite number)."""
    return {key: int(value) if key in COUNT_METRICS and float(value).is_integer() else float(value) for key, value in metrics.items()}
