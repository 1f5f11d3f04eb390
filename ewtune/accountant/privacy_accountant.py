"""The interface every accountant here implements, after dp_accounting's ``PrivacyAccountant``.

An accountant is told which events ran (:meth:`PrivacyAccountant.compose`) and answers queries about their
composition (:meth:`PrivacyAccountant.get_epsilon`, :meth:`PrivacyAccountant.get_delta`). Unlike
dp_accounting's accountants it keeps no privacy state beyond the composed event, so that every answer is
a function of the events alone (the ledger's verifiers recompute it from the events). Each accountant
says whether its answer is a guarantee (:attr:`PrivacyAccountant.kind`): a bound, never below the true
epsilon, or an estimate, which can be.

Caches belong to the accountant object that fills them (:class:`ewtune.accountant.memo.Memo`): its answers per
(event, delta) or (event, epsilon), and whatever per-mechanism pieces it builds them from. A caller that
asks about many events (a ledger's spend after every entry, a calibration, the daemon's per-round check)
keeps one object and asks it :meth:`PrivacyAccountant.epsilon_of` for each; a new object starts cold.
"""

from __future__ import annotations

import abc
import math
from enum import Enum
from typing import Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import ComposedEvent, DpEvent
from ewtune.accountant.memo import Memo


class Kind(str, Enum):
    BOUND = "bound"  # never below the true epsilon
    ESTIMATE = "estimate"  # can fall below the true epsilon


def check_delta(delta: Any) -> float:
    """``delta`` as a float in (0, 1), or a one-line error."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise InvalidInputError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


MEANINGFUL_DELTA_LIMIT = 0.1  # the commands and the Python API refuse a target delta at or above it


def check_meaningful_delta(delta: Any) -> float:
    """``delta`` as a float in (0, :data:`MEANINGFUL_DELTA_LIMIT`), or a one-line error saying why. (epsilon,
    delta)-DP with a large delta holds for a mechanism that publishes each record outright with probability
    delta (Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy", sec. 2.3), so the epsilon
    at such a delta (often 0) guarantees nothing; the accountants still answer any delta in (0, 1)."""
    delta = check_delta(delta)
    if delta >= MEANINGFUL_DELTA_LIMIT:
        raise InvalidInputError(
            f"delta {delta:g} is not below {MEANINGFUL_DELTA_LIMIT:g}: (epsilon, delta)-DP then allows publishing each "
            "record outright with probability delta, so its epsilon guarantees nothing; use a delta below 1/N (N records), e.g. 1e-5"
        )
    return delta


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` as a finite float >= 0, or a one-line error."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (epsilon >= 0 and math.isfinite(epsilon)):
        raise InvalidInputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return float(epsilon)


def delta_too_large(delta: float, records: int) -> str | None:
    """Why ``delta`` is meaningless for a guarantee over ``records`` records, or None: (epsilon, delta)-DP with
    delta >= 1/N permits publishing a record outright (each with probability delta). Callers raise their own
    error type with this reason."""
    if delta >= 1.0 / records:
        return f"delta {delta:g} is not below 1/N = 1/{records}: a guarantee with delta >= 1/N permits publishing a record outright"
    return None


class PrivacyAccountant(abc.ABC):
    """Composes events; answers epsilon(delta) and delta(epsilon) for their composition."""

    name: str  # short key: "certified", "edgeworth_order2", "rdp"...
    label: str  # one line for tables
    kind: Kind

    def __init__(self) -> None:
        self._events: list[DpEvent] = []
        self._answers = Memo(maxsize=4096)

    def supports(self, event: DpEvent) -> bool:
        """Whether this accountant can account ``event`` (composed with what it holds already)."""
        return self.refusal(event) is None

    def refusal(self, event: DpEvent) -> str | None:
        """Why ``event`` cannot be accounted here, or None; accountants that refuse some events override it."""
        return None

    def compose(self, event: DpEvent, count: int = 1) -> "PrivacyAccountant":
        """Add ``count`` runs of ``event``; returns self, so that calls chain."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"count must be an integer >= 1, got {count!r}")
        self._accepted(ComposedEvent((*self._events, event)))
        self._events.extend([event] * count)
        return self

    @property
    def event(self) -> DpEvent:
        """The composition of every event composed so far."""
        if not self._events:
            raise InvalidInputError("nothing has been composed yet")
        return self._events[0] if len(self._events) == 1 else ComposedEvent(tuple(self._events))

    def get_epsilon(self, delta: float) -> float | None:
        """Epsilon at ``delta`` of the composition; None when this accountant certifies nothing there."""
        return self.epsilon_of(self.event, delta)

    def get_delta(self, epsilon: float) -> float:
        """Delta at ``epsilon`` of the composition."""
        return self.delta_of(self.event, epsilon)

    def epsilon_of(self, event: DpEvent, delta: float) -> float | None:
        """Epsilon at ``delta`` of ``event`` alone (nothing is composed), kept in this object's caches."""
        delta = check_delta(delta)
        return self._answers.get(("epsilon", event, delta), lambda: self._epsilon(self._accepted(event), delta))

    def delta_of(self, event: DpEvent, epsilon: float) -> float:
        """Delta at ``epsilon`` of ``event`` alone (nothing is composed), kept in this object's caches."""
        epsilon = check_epsilon(epsilon)
        return self._answers.get(("delta", event, epsilon), lambda: self._delta(self._accepted(event), epsilon))

    def _accepted(self, event: DpEvent) -> DpEvent:
        reason = self.refusal(event)
        if reason is not None:
            raise InvalidInputError(f"{self.label}: {reason}")
        return event

    @abc.abstractmethod
    def _epsilon(self, event: DpEvent, delta: float) -> float | None: ...

    @abc.abstractmethod
    def _delta(self, event: DpEvent, epsilon: float) -> float: ...
