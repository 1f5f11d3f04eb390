"""``[audit]`` of an audit daemon's agent.toml (:class:`AuditHolderConfig`) and the names of the engines broken on
purpose it may ask for, without the engine itself: ``ewtune config check`` validates the table against this
dataclass, and must answer without loading torch (:mod:`ewtune.agent.audit.holder` trains with it,
:mod:`ewtune.agent.audit.breakages` holds the breakages).

Imports neither torch nor flwr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ewtune.accountant.errors import InvalidInputError

# The engine breakages, in the order the audit's power benchmark runs them (ewtune.agent.audit.breakages.BREAKAGES
# pairs each with the part of the engine it patches).
BREAKAGE_NAMES = (
    "noise off",
    "clipping bypassed",
    "every record in every step",
    "noise 4x too small",
    "noise halved",
    "noise std sigma, not sigma C",
)


def check_breakage(name: str | None) -> None:
    if name is not None and name not in BREAKAGE_NAMES:
        raise InvalidInputError(f"unknown engine breakage {name!r}: one of {', '.join(BREAKAGE_NAMES)}")


@dataclass(frozen=True)
class AuditHolderConfig:
    """``[audit]`` of an audit daemon's agent.toml."""

    block: int  # the audit block's coordinates, over all holders of the audit
    first: int  # this holder's first canary coordinate
    count: int  # this holder's canaries
    records: int = 1000  # synthetic records
    features: int = 20
    raw_norm: float = 10.0  # a canary's gradient norm in units of C: above 1, so clipping is exercised
    data_seed: int = 0  # the synthetic records' public recipe (nobody's secret)
    breakage: str | None = None  # tests and benchmarks: an engine broken on purpose (ewtune.agent.audit.breakages)

    def __post_init__(self) -> None:
        for name, minimum in (("block", 2), ("first", 0), ("count", 2), ("records", 1), ("features", 1), ("data_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InvalidInputError(f"[audit] {name} must be an integer >= {minimum}, got {value!r}")
        if self.first + self.count > self.block:
            raise InvalidInputError(f"[audit] canaries {self.first}..{self.first + self.count - 1} lie outside the block of {self.block}")
        if isinstance(self.raw_norm, bool) or not isinstance(self.raw_norm, (int, float)) or not 1.0 < self.raw_norm < math.inf:
            raise InvalidInputError(f"[audit] raw_norm must be a finite number above 1, got {self.raw_norm!r}")
        check_breakage(self.breakage)
