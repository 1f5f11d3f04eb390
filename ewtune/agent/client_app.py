"""The Flower ClientApp (Message API) that every holder's SuperNode runs: a thin shim that forwards to the
holder's agent daemon.

It has no access to data and no signing key: query, train and evaluate messages (:mod:`ewtune.federation.messages`)
are passed to the daemon at ``context.node_config["daemon-address"]`` (set with ``flower-supernode
--node-config``), and its answers or refusals are passed back. Weights that arrive packed in one buffer
(:mod:`ewtune.federation.packing`) are unpacked before the daemon sees them, and the update is packed again; the
daemon, its checks and the receipt (whose digest covers the named arrays) never see a layout. The daemon
enforces the holder's policy whatever this shim (the coordinator's code, shipped in the FAB) asks. It
imports only flwr, numpy, grpc, accountant and federation, so that the fresh process Flower starts for every
message is ready in about a second (no torch, no transformers).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.rpc import DaemonClient, DaemonError
from ewtune.federation.messages import (
    CANARIES,
    CONFIG,
    DAEMON_ADDRESS_KEY,
    DAEMON_TIMEOUT_KEY,
    DESCRIPTION,
    EVALUATE_ROUND,
    EVALUATION,
    EVALUATION_REFUSED,
    FAILED,
    INVALID,
    METRICS,
    RECEIPT_DOCUMENT,
    REFUSED,
    RESULT,
    REVEAL,
    STEPS,
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

app = ClientApp()


def _forwarded(handler: Callable[[DaemonClient, Message, bool], RecordDict]):
    """Unpack the message's weights and run ``handler`` against the node's daemon (told whether the weights
    came packed); any failure becomes an ``Error`` reply with its reason."""

    @functools.wraps(handler)
    def reply(msg: Message, context: Context) -> Message:
        try:
            packed = msg.has_content() and unpack_in_place(msg.content)
        except InvalidInputError as bad:
            return Message(Error(code=INVALID, reason=str(bad)), reply_to=msg)
        try:
            with _daemon(context.node_config) as daemon:
                content = handler(daemon, msg, packed)
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


@app.query()
@_forwarded
def query(daemon: DaemonClient, msg: Message, packed: bool) -> RecordDict:
    """The holder's description or, for a query carrying :data:`REVEAL`, an audit daemon's canaries."""
    if msg.has_content() and REVEAL in msg.content:
        return RecordDict({CANARIES: ConfigRecord(_config_values(daemon.reveal_audit(dict(msg.content[REVEAL]))))})
    return RecordDict({DESCRIPTION: ConfigRecord(_config_values(daemon.describe()))})


@app.train()
@_forwarded
def train(daemon: DaemonClient, msg: Message, packed: bool) -> RecordDict:
    weights = weights_of(msg.content)
    plan = dict(msg.content[CONFIG])
    evaluation = _evaluate_first(daemon, weights, plan) if EVALUATE_ROUND in plan else {}
    updated, receipt, metrics = daemon.train(weights, {key: value for key, value in plan.items() if key != EVALUATE_ROUND})
    result = {RECEIPT_DOCUMENT: json.dumps(receipt, sort_keys=True), STEPS: int(metrics["steps"]), **evaluation}
    return RecordDict(weight_records(updated, packed, record=RESULT, fields=result))


def _evaluate_first(daemon: DaemonClient, weights, plan: Mapping[str, Any]) -> dict:
    """The evaluation a train message asks for, of its own incoming weights (the global model after round
    ``plan[EVALUATE_ROUND]``): the daemon's metrics (released and charged only when the holder's policy opts
    in) or its refusal, which never stops the training."""
    try:
        metrics = daemon.evaluate(weights, {"run_id": plan.get("run_id"), "round": plan[EVALUATE_ROUND]})
    except DaemonError as refusal:
        return {EVALUATION_REFUSED: refusal.reason[:500]}
    return {EVALUATION: json.dumps(_metric_values(metrics), sort_keys=True)}


@app.evaluate()
@_forwarded
def evaluate(daemon: DaemonClient, msg: Message, packed: bool) -> RecordDict:
    config = dict(msg.content[CONFIG]) if CONFIG in msg.content else {}
    metrics = daemon.evaluate(weights_of(msg.content), config)
    return RecordDict({METRICS: MetricRecord(_metric_values(metrics))})


def _config_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """A ConfigRecord holds no None: absent values are left out."""
    return {key: value for key, value in values.items() if value is not None}


def _metric_values(values: Mapping[str, Any]) -> dict[str, int | float]:
    """Counts as ints, the rest as floats; a metric that is not a finite number is left out rather than sent
    as NaN."""
    metrics: dict[str, int | float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        metrics[key] = int(value) if float(value).is_integer() and key in {"examples", "steps", "num_examples"} else float(value)
    return metrics
