"""The Flower ClientApp (Message API): a thin shim that forwards to the holder's agent daemon.

It has no access to data and no signing key: query, train and evaluate messages are passed to the daemon at
``context.node_config["daemon-address"]`` (set with ``flower-supernode --node-config``), and its answers or
refusals are passed back. The daemon enforces the holder's policy whatever this shim (shipped by the
coordinator in the FAB) asks. It imports only flwr, numpy, grpc and accountant, so that the fresh process
Flower starts for every message is ready in about a second (no torch, no transformers).

Replies (the federation contract):
- query: ``ConfigRecord`` "description" (holder_id, dataset_size, budget, spent certified epsilon, public key, model id...);
- train: ``ArrayRecord`` "arrays", ``ConfigRecord`` "receipt" {"document": signed receipt as JSON text},
  ``MetricRecord`` "metrics" (steps: the steps executed);
- evaluate (the message carries ``ConfigRecord`` "config" {run_id, round}): ``MetricRecord`` "metrics"
  (accuracy, f1, num_examples, noise_multiplier), computed from a noised confusion matrix and charged to the
  holder's ledger, only when the holder's policy opts in to private evaluation; otherwise a refusal;
- a refusal or failure: a Flower ``Error`` whose reason is the daemon's (generic for failures after work on
  the data began).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from agent.rpc import DaemonClient, DaemonError

DAEMON_ADDRESS_KEY = "daemon-address"
DAEMON_TIMEOUT_KEY = "daemon-timeout-s"

# Flower Error codes of this app's replies.
REFUSED = 4001  # the holder's policy or budget refuses the plan; nothing was charged
INVALID = 4002  # the message was malformed (weights or plan)
UNAVAILABLE = 4003  # the daemon is down, stopping or timed out
FAILED = 4000  # anything else (the reason says what)

_STATUS_CODES = {
    "FAILED_PRECONDITION": REFUSED,
    "INVALID_ARGUMENT": INVALID,
    "UNAVAILABLE": UNAVAILABLE,
    "DEADLINE_EXCEEDED": UNAVAILABLE,
    "RESOURCE_EXHAUSTED": INVALID,  # a message over the daemon's size limit
}

app = ClientApp()


def _forwarded(handler: Callable[[DaemonClient, Message], RecordDict]):
    """Run ``handler`` against the node's daemon; any failure becomes an ``Error`` reply with its reason."""

    @functools.wraps(handler)
    def reply(msg: Message, context: Context) -> Message:
        try:
            with _daemon(context.node_config) as daemon:
                content = handler(daemon, msg)
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
def query(daemon: DaemonClient, msg: Message) -> RecordDict:
    return RecordDict({"description": ConfigRecord(_config_values(daemon.describe()))})


@app.train()
@_forwarded
def train(daemon: DaemonClient, msg: Message) -> RecordDict:
    arrays = _numpy_arrays(msg.content["arrays"])
    plan = dict(msg.content["config"])
    updated, receipt, metrics = daemon.train(arrays, plan)
    return RecordDict(
        {
            "arrays": ArrayRecord({name: Array(array) for name, array in updated.items()}),
            "receipt": ConfigRecord({"document": json.dumps(receipt, sort_keys=True)}),
            "metrics": MetricRecord(_metric_values(metrics)),
        }
    )


@app.evaluate()
@_forwarded
def evaluate(daemon: DaemonClient, msg: Message) -> RecordDict:
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    metrics = daemon.evaluate(_numpy_arrays(msg.content["arrays"]), config)
    return RecordDict({"metrics": MetricRecord(_metric_values(metrics))})


def _numpy_arrays(record: ArrayRecord) -> dict[str, Any]:
    return {name: array.numpy() for name, array in record.items()}


def _config_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """A ConfigRecord holds no None: absent values are left out."""
    return {key: value for key, value in values.items() if value is not None}


def _metric_values(values: Mapping[str, Any]) -> dict[str, int | float]:
    """Counts as ints, the rest as floats; a metric that is not a finite number (a loss over zero examples)
    is left out rather than sent as NaN."""
    metrics: dict[str, int | float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        metrics[key] = int(value) if float(value).is_integer() and key in {"examples", "steps", "num_examples"} else float(value)
    return metrics
