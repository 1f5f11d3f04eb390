"""The coordinator's side of the exchange: the Flower messages it sends and what it reads from the replies,
each through the one encoder or decoder of :mod:`ewtune.federation.contract` that the holder's side uses too.

Every reader raises :class:`InvalidInputError` with a one-line reason on anything it cannot accept (no reply,
an error reply, a missing record, a malformed message): the round loop aborts that holder only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE
from ewtune.coordinator.planner import FederationSettings, HolderPlan
from ewtune.federation.contract import (
    EvaluationReply,
    EvaluationRequest,
    HolderDescription,
    RevealRequest,
    RoundPlan,
    TrainReply,
    config_values,
)
from ewtune.federation.messages import (
    BUFFER,
    CANARIES,
    CONFIG,
    DESCRIPTION,
    FAILED,
    INVALID,
    LAYOUT_JSON,
    METRICS,
    REFUSED,
    RESULT,
    REVEAL,
    UNAVAILABLE,
    weights_of,
)

# What the holder's Error codes (ewtune.federation.messages) say, in a reason.
ERROR_KINDS = {REFUSED: "refused", INVALID: "refused as malformed", UNAVAILABLE: "holder unavailable", FAILED: "failed"}
QUERY_TTL_MARGIN_S = 30.0  # a query lives this much longer than the coordinator waits for its reply


class EvaluationMissing(Exception):
    """A reply that carries no evaluation, and why (a refusal, an error, no reply): not a malformed one."""


# --- query -----------------------------------------------------------------------------------------------


def query_message(node_id: int, timeout: float) -> Message:
    return Message(RecordDict(), node_id, MessageType.QUERY, ttl=timeout + QUERY_TTL_MARGIN_S)


def description_of(node_id: int, reply: Message | None) -> HolderDescription:
    """The holder's description a query reply carries, naming the node it came from."""
    if reply is None:
        raise InvalidInputError("no description within the query timeout")
    if reply.has_error():
        raise InvalidInputError(f"query failed (code {reply.error.code}): {reply.error.reason}")
    return HolderDescription.from_config(_config(reply.content, DESCRIPTION, "query reply"), node_id=node_id)


# --- train -----------------------------------------------------------------------------------------------


def round_plan(run_id: str, round: int, holder: HolderPlan, settings: FederationSettings, audit: bool,
               evaluated_round: int | None) -> RoundPlan:
    """Holder ``holder``'s plan of round ``round``; with ``evaluated_round``, it also asks the holder to evaluate
    the incoming weights (the global model after that round) before training."""
    return RoundPlan(
        run_id=run_id,
        round=round,
        steps=settings.local_steps,
        sampling_rate=holder.sampling_rate,
        noise_multiplier=holder.noise_multiplier,
        clip_norm=float(settings.clip_norm),
        learning_rate=float(settings.learning_rate),
        delta=holder.delta,
        model_id=holder.holder.model_id or None,
        purpose=AUDIT_PURPOSE if audit else None,
        evaluate_round=evaluated_round,
    )


def train_message(plan: RoundPlan, node_id: int, weights: dict[str, Any], ttl: float) -> Message:
    """The train message of ``plan``; ``weights``: the records of the global weights (the same for every holder)."""
    content = RecordDict({**weights, CONFIG: ConfigRecord(config_values(plan.to_config()))})
    return Message(content, node_id, MessageType.TRAIN, ttl=ttl, group_id=str(plan.round))


def train_reply_of(reply: Message | None, timeout: float) -> tuple[TrainReply, dict[str, np.ndarray]]:
    """(the train reply, the noised weights) of a holder's answer to a train message."""
    if reply is None:
        raise InvalidInputError(f"no reply within {timeout:g} s")
    if reply.has_error():
        raise InvalidInputError(f"refused or failed (code {reply.error.code}): {reply.error.reason}")
    result = _config(reply.content, RESULT, "train reply")
    return TrainReply.from_config(result, allowed=(LAYOUT_JSON, BUFFER)), weights_of(reply.content, RESULT)


# --- evaluate --------------------------------------------------------------------------------------------


def evaluate_message(request: EvaluationRequest, node_id: int, weights: dict[str, Any], ttl: float) -> Message:
    content = RecordDict({**weights, CONFIG: ConfigRecord(request.to_config())})
    return Message(content, node_id, MessageType.EVALUATE, ttl=ttl, group_id=str(request.round))


def released_metrics(reply: Message | None, inside_train: bool) -> dict[str, float]:
    """The finite metrics a holder released: an evaluate reply's :data:`METRICS`, or the evaluation in a train
    reply's :data:`RESULT` (``inside_train``). :class:`EvaluationMissing` says why there are none."""
    if reply is None:
        raise EvaluationMissing("no reply within the timeout")
    if reply.has_error():
        kind = ERROR_KINDS.get(reply.error.code, f"failed (code {reply.error.code})")
        raise EvaluationMissing(f"{kind}: {reply.error.reason}")
    released = _evaluation_in_train_reply(reply.content) if inside_train else _evaluation_alone(reply.content)
    if released is None:
        raise EvaluationMissing("the reply carries no evaluation metrics")
    if released.evaluation_refused is not None:
        raise EvaluationMissing(f"refused: {released.evaluation_refused}")
    if not released.evaluation:
        raise EvaluationMissing("the reply carries no finite metric")
    return released.evaluation


def _evaluation_in_train_reply(content: RecordDict) -> EvaluationReply | None:
    return EvaluationReply.in_train_reply(_config(content, RESULT, "train reply"))


def _evaluation_alone(content: RecordDict) -> EvaluationReply | None:
    record = content.get(METRICS)
    return None if record is None else EvaluationReply.released(record)


# --- an audit run's reveal -------------------------------------------------------------------------------


def reveal_message(request: RevealRequest, node_id: int, timeout: float) -> Message:
    content = RecordDict({REVEAL: ConfigRecord(config_values(request.to_config()))})
    return Message(content, node_id, MessageType.QUERY, ttl=timeout + QUERY_TTL_MARGIN_S)


def revealed_canaries(reply: Message | None) -> dict[str, Any]:
    """The canaries an audit daemon revealed (read by :meth:`ewtune.coordinator.canary_audit.Canaries.from_reveal`)."""
    if reply is None:
        raise InvalidInputError("a holder did not reveal its canaries within the query timeout")
    if reply.has_error():
        raise InvalidInputError(f"a holder refused to reveal its canaries (code {reply.error.code}): {reply.error.reason}")
    return _config(reply.content, CANARIES, "reveal reply")


def _config(content: RecordDict, name: str, what: str) -> dict[str, Any]:
    record = content.get(name)
    if not isinstance(record, ConfigRecord):
        raise InvalidInputError(f"{what} lacks the ConfigRecord {name!r}")
    return dict(record)
