"""The typed contract of the messages a holder and the coordinator exchange: one frozen dataclass per message,
each with the one encoder (:meth:`to_config`) and decoder (``from_config``) that both sides use.

- :class:`RoundPlan`: the plan of a train message (the ``config`` record), which the daemon checks against
  the holder's policy before any step runs; it reaches the daemon over its gRPC API in the same form;
- :class:`HolderDescription`: the reply to a query (``ewtune.agent.daemon.Daemon.describe``), which the
  coordinator's planner plans with;
- :class:`TrainReply`: the signed receipt and the steps executed, in a train reply's ``result`` record
  (beside the packed weights, :mod:`ewtune.federation.messages`);
- :class:`EvaluationRequest` and :class:`EvaluationReply`: which global model to evaluate (run and round), and
  the metrics released or the reason none were; an evaluation rides in a train message (the plan's
  ``evaluate_round``, the reply's ``evaluation`` or ``evaluation_refused``) or in an evaluate message;
- :class:`RevealRequest`: an audit run's request for a holder's canaries.

The dict form is what JSON and a Flower ``ConfigRecord`` carry: one key per field, named as the field, so that
every key is defined once, here. A ``ConfigRecord`` holds no null: an absent optional field and a null one
decode alike (:func:`config_values` leaves nulls out). Every decoder refuses a missing required key, an
unknown key and a value of the wrong type or range with a one-line :class:`InvalidInputError`.

This module imports neither torch nor flwr: the daemon's gRPC client and the ClientApp shim load it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent

# The SuperNode's node config (``flower-supernode --node-config``): written by ewtune.agent.supernode, read by
# the ClientApp.
DAEMON_ADDRESS_KEY = "daemon-address"  # the agent daemon's gRPC address
DAEMON_TIMEOUT_KEY = "daemon-timeout-s"  # how long the ClientApp waits for the daemon (optional)
HOLDER_ID_KEY = "holder-id"

# What a federation trains: the coordinator's [model] task (how the final adapter is written) and each holder's
# [training] task name the same set.
TASKS = ("classification", "causal_lm")

MAX_SPENT_MECHANISMS = 256  # distinct (q, sigma) a description may list: each costs the planner's accountant time
MAX_REASON_CHARACTERS = 500  # the longest refusal reason an evaluation reply carries

_Message = TypeVar("_Message")
Check = Callable[[str, Any], Any]  # (what and key, value) -> the decoded value, or InvalidInputError


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive(what: str, value: Any) -> float:
    """A finite number > 0, as a float."""
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def non_negative(what: str, value: Any) -> float:
    if not _number(value) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


def real(what: str, value: Any) -> float:
    """Any number (an estimate may be infinite)."""
    if not _number(value):
        raise InvalidInputError(f"{what} must be a number, got {value!r}")
    return float(value)


def integer(minimum: int) -> Check:
    """An integer >= ``minimum`` (an integral float, as JSON may carry it, is accepted)."""

    def check(what: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidInputError(f"{what} must be an integer >= {minimum}, got {value!r}")
        return value

    return check


def text(what: str, value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{what} must be a non-empty string, got {str(value)[:80]!r}")
    return value


def any_text(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _optional_text(what: str, value: Any) -> str | None:
    """A string; the empty one means absent."""
    return any_text(what, value) or None


def _sampling_rate(what: str, value: Any) -> float:
    rate = positive(what, value)
    if rate > 1:
        raise InvalidInputError(f"sampling rate must be in (0, 1], got {rate}")
    return rate


def metric_values(what: str, values: Any) -> dict[str, float]:
    """The finite numbers of a holder's metrics, as floats. A metric that is anything else (a list, a string,
    NaN) is left out, never refused: metrics are what a holder chose to release, and one malformed metric must
    not cost the others (nor the update they ride with). Not a record of metrics at all is refused."""
    try:
        items = list(values.items())
    except (AttributeError, TypeError):
        raise InvalidInputError(f"{what} must be a record of metrics, got {type(values).__name__}") from None
    return {name: float(value) for name, value in items if isinstance(name, str) and _number(value) and math.isfinite(value)}


def _metrics_text(what: str, value: Any) -> dict[str, float]:
    try:
        document = json.loads(any_text(what, value))
    except (ValueError, RecursionError) as bad:
        raise InvalidInputError(f"{what} is not JSON: {str(bad)[:120]}") from None
    return metric_values(what, document)


def _stated_number(what: str, value: Any) -> float | None:
    """A metric a reply states beside what its receipt certifies: a finite number, or left out (None)."""
    return float(value) if _number(value) and math.isfinite(value) else None


def _reason(what: str, value: Any) -> str:
    return any_text(what, value)[:MAX_REASON_CHARACTERS]


def _wire(check: Check, required: bool = True, default: Any = None) -> Any:
    """A dataclass field that travels under its own name, decoded by ``check``."""
    if required:
        return field(metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _local(default: Any = None) -> Any:
    """A field that never travels (set by the side that decodes the message)."""
    return field(default=default, metadata={"local": True})


def _wire_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("local")]


def keys(cls: type) -> tuple[str, ...]:
    """The keys of a message's dict form."""
    return tuple(f.name for f in _wire_fields(cls))


def encode(message: Any) -> dict[str, Any]:
    """The dict form of ``message``: every field that travels, None for an absent optional one."""
    return {f.name: getattr(message, f.name) for f in _wire_fields(type(message))}


def decode(cls: type[_Message], values: Any, what: str, owner: str = "", allowed: tuple[str, ...] = (),
           **local: Any) -> _Message:
    """The ``cls`` message of a dict form ``values`` (a null is an absent value). ``what`` names the message and
    ``owner`` prefixes a field's name in a refusal; keys in ``allowed`` belong to another message sharing the
    record and are left to its decoder; ``local`` sets the fields that never travel."""
    if not isinstance(values, Mapping):
        raise InvalidInputError(f"{what} must be a record of named values, got {type(values).__name__}")
    fields = _wire_fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(str(key)[:40] for key in values if key not in known and key not in allowed)
    if unknown:
        raise InvalidInputError(f"{what} has unknown key(s) {', '.join(unknown)}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    missing = [name for name in required if values.get(name) is None]
    if missing:
        raise InvalidInputError(f"{what} lacks {', '.join(missing)}")
    decoded = {
        f.name: f.metadata["check"](f"{owner}{f.name}", values[f.name])
        for f in fields
        if values.get(f.name) is not None
    }
    return cls(**decoded, **local)


def config_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The dict form as a ``ConfigRecord`` holds it: no nulls (an absent value is left out)."""
    return {key: value for key, value in values.items() if value is not None}


# --- the round plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundPlan:
    """One round as the coordinator asks for it (the ``config`` of a train message); the daemon checks it
    against the holder's policy (``ewtune.agent.policy.HolderPolicy.check_plan``) before any step runs."""

    run_id: str = _wire(text)
    round: int = _wire(integer(0))
    steps: int = _wire(integer(1))  # DP-SGD steps of the round
    sampling_rate: float = _wire(_sampling_rate)  # Poisson q, on the sampler's grid (ewtune.accountant.sampling)
    noise_multiplier: float = _wire(positive)  # sigma
    clip_norm: float = _wire(positive)  # C
    learning_rate: float = _wire(positive)
    delta: float | None = _wire(positive, required=False)  # the delta the plan's epsilon is stated at
    model_id: str | None = _wire(_optional_text, required=False)  # the model the plan is for; None: any
    purpose: str | None = _wire(_optional_text, required=False)  # AUDIT_PURPOSE for an audit run's round
    # Evaluate the incoming weights (the global model after this round) before training; None: no evaluation.
    evaluate_round: int | None = _wire(integer(0), required=False)

    def to_config(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_config(cls, values: Any) -> "RoundPlan":
        return decode(cls, values, "the round plan")

    def training(self) -> "RoundPlan":
        """The plan without its evaluation request: what the daemon trains."""
        return dataclasses.replace(self, evaluate_round=None)

    def evaluation(self) -> "EvaluationRequest | None":
        """The evaluation the plan asks for first, or None."""
        return None if self.evaluate_round is None else EvaluationRequest(self.run_id, self.evaluate_round)


# --- the holder's description ----------------------------------------------------------------------------


def _spent_mechanisms(what: str, value: Any) -> str:
    """The JSON rows of :func:`ewtune.accountant.spend.mechanism_rows`, checked here (and kept as text)."""
    _spent_events(what, value)
    return value


def _spent_events(what: str, value: Any) -> tuple[PoissonGaussianEvent, ...]:
    """The events of a description's ``spent_mechanisms`` (JSON rows {sampling_rate, noise_multiplier,
    neighbouring, steps}), or a one-line refusal."""
    try:
        rows = json.loads(value) if isinstance(value, str) else None
        if not isinstance(rows, list) or len(rows) > MAX_SPENT_MECHANISMS:
            raise ValueError(f"a JSON list of at most {MAX_SPENT_MECHANISMS} rows is expected")
        return tuple(
            PoissonGaussianEvent(row["sampling_rate"], row["noise_multiplier"], row["steps"], Neighbouring(row["neighbouring"]))
            for row in rows
        )
    except (ValueError, TypeError, KeyError, InvalidInputError) as bad:
        raise InvalidInputError(f"{what} is malformed: {str(bad)[:160]}") from None


@dataclass(frozen=True)
class HolderDescription:
    """What a holder's daemon says about itself in reply to a query: its public metadata (SECURITY.md, "What
    leaves a holder"). The coordinator plans with it (:mod:`ewtune.coordinator.planner`)."""

    holder_id: str = _wire(text)
    budget_epsilon: float = _wire(positive)  # the holder's lifetime budget
    budget_delta: float = _wire(positive)
    spent_epsilon_certified: float = _wire(non_negative)  # its ledger's events composed, certified
    public_key: str = _wire(text)  # its ledger key (base64 Ed25519), which signs its receipts
    # The released noised count N_noisy (never the exact N); None: its budget could not fund the release.
    dataset_size: int | None = _wire(integer(1), required=False)
    dataset_size_noise: float | None = _wire(positive, required=False)  # the count's noise std; None: an audit daemon
    spent_epsilon_edgeworth_estimate: float | None = _wire(real, required=False)  # beside the certified one
    # The events its ledger holds (committed and reserved) as JSON rows of ewtune.accountant.spend.mechanism_rows;
    # None: not stated (the planner then subtracts epsilons).
    spent_mechanisms: str | None = _wire(_spent_mechanisms, required=False)
    open_reservations: int | None = _wire(integer(0), required=False)
    model_id: str | None = _wire(_optional_text, required=False)
    # The policy's limits, as its daemon states them (a plan outside them is refused there).
    min_clip_norm: float | None = _wire(positive, required=False)
    max_clip_norm: float | None = _wire(positive, required=False)
    max_steps_per_round: int | None = _wire(integer(1), required=False)
    min_expected_batch: float = _wire(non_negative, required=False, default=0.0)  # 0: none stated
    min_noise_multiplier: float = _wire(non_negative, required=False, default=0.0)
    evaluation: str | None = _wire(_optional_text, required=False)  # "none" or "private" (HolderPolicy.evaluation)
    node_id: int | None = _local()  # the Flower node the coordinator received it from; never on the wire

    def to_config(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_config(cls, values: Any, node_id: int | None = None) -> "HolderDescription":
        owner = "the holder's " if node_id is None else f"node {node_id}'s "
        return decode(cls, values, f"{owner}description", owner, node_id=None if node_id is None else int(node_id))

    @property
    def budget_left_epsilon(self) -> float:
        return max(0.0, self.budget_epsilon - self.spent_epsilon_certified)

    @property
    def spent_events(self) -> tuple[PoissonGaussianEvent, ...] | None:
        """The events its ledger holds, or None when its description did not state them."""
        if self.spent_mechanisms is None:
            return None
        return _spent_events(f"node {self.node_id}'s spent_mechanisms", self.spent_mechanisms)


# --- the train reply -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReply:
    """A train reply's signed receipt and the steps executed (the ``result`` record, beside the noised weights
    and the evaluation it carries when one was asked for)."""

    receipt: str = _wire(text)  # the signed receipt as JSON text (ewtune.accountant.receipts)
    # The DP-SGD steps executed (the plan's unless the daemon was stopping), as the holder states them: the
    # receipt's event is what counts, so a value that is not a finite number is left out (None), not refused.
    steps: float | None = _wire(_stated_number, required=False)

    def to_config(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_config(cls, values: Any, allowed: tuple[str, ...] = ()) -> "TrainReply":
        """``allowed``: the keys of the packed weights sharing the record; the evaluation's are always allowed."""
        return decode(cls, values, "the train reply", "the train reply's ", allowed=keys(EvaluationReply) + tuple(allowed))

    def receipt_document(self) -> dict[str, Any]:
        try:
            document = json.loads(self.receipt)
        except (ValueError, RecursionError) as bad:
            raise InvalidInputError(f"the train reply's receipt is not JSON: {str(bad)[:120]}") from None
        if not isinstance(document, dict):
            raise InvalidInputError("the train reply's receipt must be a JSON object")
        return document


# --- evaluation ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationRequest:
    """Which global model to evaluate: the one after ``round`` (0: the initial model) of run ``run_id``, so that
    the holder's daemon can decide (and record) what it releases."""

    run_id: str = _wire(text)
    round: int = _wire(integer(0))

    def to_config(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_config(cls, values: Any) -> "EvaluationRequest":
        return decode(cls, values, "the evaluation request", "the evaluation's ")


@dataclass(frozen=True)
class EvaluationReply:
    """What a holder released of an evaluation asked for: the metrics (a noised confusion matrix's, when its
    policy opts in to private evaluation) or the reason it released none. In a train reply's ``result``: the
    metrics as a JSON object's text (``evaluation``) or the reason (``evaluation_refused``); an evaluate
    message's reply carries the metrics (``evaluation``) in a MetricRecord, a refusal as a Flower Error."""

    evaluation: dict[str, float] | None = _wire(_metrics_text, required=False)
    evaluation_refused: str | None = _wire(_reason, required=False)  # the reason; it wins over metrics beside it

    def __post_init__(self) -> None:
        if self.evaluation is None and self.evaluation_refused is None:
            raise InvalidInputError("an evaluation reply carries the metrics or the reason none were released")

    @classmethod
    def released(cls, metrics: Any) -> "EvaluationReply":
        """The metrics an evaluation released (those that are finite numbers: NaN is never sent)."""
        return cls(evaluation=metric_values("the evaluation's metrics", metrics))

    @classmethod
    def refused(cls, reason: str) -> "EvaluationReply":
        return cls(evaluation_refused=reason[:MAX_REASON_CHARACTERS])

    def to_config(self) -> dict[str, Any]:
        values = encode(self)
        if self.evaluation is not None:
            values["evaluation"] = json.dumps(self.evaluation, sort_keys=True)
        return values

    @classmethod
    def from_config(cls, values: Any) -> "EvaluationReply":
        return decode(cls, values, "the evaluation reply", "the evaluation reply's ")

    @classmethod
    def in_train_reply(cls, values: Mapping[str, Any]) -> "EvaluationReply | None":
        """The evaluation a train reply's ``result`` carries, or None when it carries none."""
        own = {key: values[key] for key in keys(cls) if key in values}
        return cls.from_config(own) if own else None


# --- an audit run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevealRequest:
    """An audit run's request for a holder's canaries, after the coordinator fixed its scores."""

    run_id: str = _wire(text)
    scores_sha256: str | None = _wire(any_text, required=False)  # the digest of the fixed scores, for the holder's log

    def to_config(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_config(cls, values: Any) -> "RevealRequest":
        return decode(cls, values, "the reveal request", "the reveal request's ")
