"""DP events: frozen descriptions of what a mechanism executed, in the style of dp_accounting's ``dp_event``.

An event says *what ran* (sampling rate, noise multiplier, steps actually executed, neighbouring relation);
accountants turn events into epsilons. The JSON form is a contract that outlives releases: a kind is never
removed and its meaning never changes; a reader that meets an unknown kind or schema version raises
:class:`UnknownEventKindError` instead of guessing.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from ewtune.accountant.errors import InvalidInputError, UnknownEventKindError

SCHEMA_VERSION = 1


class Neighbouring(str, Enum):
    """The neighbouring relation the guarantee is stated for."""

    ADD_REMOVE = "add_remove"
    REPLACE_ONE = "replace_one"


@dataclass(frozen=True)
class PoissonGaussianEvent:
    """``steps`` DP-SGD steps: Poisson sampling at rate ``sampling_rate`` (every record joins a step
    independently), then the Gaussian mechanism with standard deviation ``noise_multiplier * C`` on the sum
    of per-record gradients clipped to norm ``C`` (arXiv 2210.15042, Alg. 1; Abadi et al. 2016)."""

    sampling_rate: float
    noise_multiplier: float
    steps: int
    neighbouring: Neighbouring = Neighbouring.ADD_REMOVE

    kind = "poisson_gaussian"

    def __post_init__(self) -> None:
        q, sigma, steps = self.sampling_rate, self.noise_multiplier, self.steps
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < q <= 1.0):
            raise InvalidInputError(f"sampling rate must be in (0, 1], got {q!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma > 0 and math.isfinite(sigma)):
            raise InvalidInputError(f"noise multiplier must be a finite number > 0, got {sigma!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidInputError(f"steps must be an integer >= 1, got {steps!r}")
        object.__setattr__(self, "sampling_rate", float(q))
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "neighbouring", Neighbouring(self.neighbouring))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
            "neighbouring": self.neighbouring.value,
        }


@dataclass(frozen=True)
class ComposedEvent:
    """Sequential composition of events, possibly heterogeneous (different q, sigma, steps per round)."""

    events: tuple["DpEvent", ...]

    kind = "composed"

    def __post_init__(self) -> None:
        events = tuple(self.events)
        for event in events:
            if not isinstance(event, (PoissonGaussianEvent, ComposedEvent)):
                raise InvalidInputError(f"cannot compose {type(event).__name__}")
        object.__setattr__(self, "events", events)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "events": [event.to_json() for event in self.events]}


DpEvent = Union[PoissonGaussianEvent, ComposedEvent]


def compose(*events: DpEvent) -> ComposedEvent:
    """The sequential composition of ``events``."""
    return ComposedEvent(tuple(events))


def mechanisms(event: DpEvent) -> dict[tuple[float, float, Neighbouring], int]:
    """Steps per distinct (q, sigma, relation), the sufficient statistic of every accountant here:
    composition is commutative, so order does not matter, only how many steps of each mechanism ran."""
    counts: Counter[tuple[float, float, Neighbouring]] = Counter()
    if isinstance(event, PoissonGaussianEvent):
        counts[(event.sampling_rate, event.noise_multiplier, event.neighbouring)] += event.steps
    else:
        for inner in event.events:
            counts.update(mechanisms(inner))
    return dict(counts)


def neighbouring_of(event: DpEvent) -> Neighbouring:
    """The single neighbouring relation of ``event``; mixing relations in one composition is refused."""
    relations = {relation for (_, _, relation) in mechanisms(event)}
    if not relations:
        raise InvalidInputError("an empty composition has no neighbouring relation")
    if len(relations) > 1:
        raise InvalidInputError("cannot account a composition that mixes neighbouring relations")
    return relations.pop()


def total_steps(event: DpEvent) -> int:
    return sum(mechanisms(event).values())


def event_to_json(event: DpEvent) -> dict[str, Any]:
    """The versioned JSON form: ``{"schema": 1, "event": {...}}``."""
    return {"schema": SCHEMA_VERSION, "event": event.to_json()}


def event_from_json(document: dict[str, Any]) -> DpEvent:
    """Inverse of :func:`event_to_json`; exact round trip (floats are kept as JSON doubles)."""
    if not isinstance(document, dict) or "event" not in document:
        raise InvalidInputError("an event document needs the keys 'schema' and 'event'")
    schema = document.get("schema")
    if schema != SCHEMA_VERSION:
        raise UnknownEventKindError(f"unknown event schema version {schema!r} (this release reads {SCHEMA_VERSION})")
    return _event_from_body(document["event"])


def _event_from_body(body: Any) -> DpEvent:
    if not isinstance(body, dict):
        raise InvalidInputError(f"an event must be a JSON object, got {type(body).__name__}")
    kind = body.get("kind")
    if kind == PoissonGaussianEvent.kind:
        try:
            return PoissonGaussianEvent(
                sampling_rate=body["sampling_rate"],
                noise_multiplier=body["noise_multiplier"],
                steps=body["steps"],
                neighbouring=Neighbouring(body.get("neighbouring", Neighbouring.ADD_REMOVE.value)),
            )
        except KeyError as missing:
            raise InvalidInputError(f"poisson_gaussian event lacks the field {missing}") from None
        except ValueError as bad:
            if isinstance(bad, InvalidInputError):
                raise
            raise InvalidInputError(f"invalid poisson_gaussian event: {bad}") from None
    if kind == ComposedEvent.kind:
        inner = body.get("events")
        if not isinstance(inner, list):
            raise InvalidInputError("composed event lacks the list 'events'")
        return ComposedEvent(tuple(_event_from_body(item) for item in inner))
    raise UnknownEventKindError(f"unknown event kind {kind!r}: this release cannot account it")


def to_dp_accounting(event: DpEvent):
    """``(dp_event, neighboring_relation)``: the equivalent ``dp_accounting.DpEvent`` and the
    ``dp_accounting.NeighboringRelation`` it must be accounted under (imported lazily: only cross-checks
    need dp_accounting).

    dp_accounting's events carry no neighbouring relation; its accountants take it in their constructor
    (``PLDAccountant(neighboring_relation, ...)``, ``RdpAccountant(orders, neighboring_relation)``). Returning
    the event alone silently accounted a replace-one event as add/remove-one: q 0.01, sigma 1, 1000 steps,
    delta 1e-5 gives 1.83 that way where the replace-one epsilon is 2.84. The caller must pass the relation
    on; a composition that mixes relations is refused (:func:`neighbouring_of`)."""
    # dp_accounting: +0.4 s (1.6 s cold); `ewtune accountant epsilon` without RDP never loads it
    import dp_accounting

    relation = {
        Neighbouring.ADD_REMOVE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        Neighbouring.REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
    }[neighbouring_of(event)]
    return _dp_accounting_event(event), relation


def _dp_accounting_event(event: DpEvent):
    # dp_accounting: +0.4 s (1.6 s cold); `ewtune accountant epsilon` without RDP never loads it
    import dp_accounting

    if isinstance(event, PoissonGaussianEvent):
        step = dp_accounting.PoissonSampledDpEvent(
            event.sampling_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, event.steps)
    return dp_accounting.ComposedDpEvent([_dp_accounting_event(inner) for inner in event.events])
