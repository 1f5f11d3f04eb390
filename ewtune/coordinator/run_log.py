"""The ServerApp's log lines (its stdout, which ``flwr log`` and the coordinator's command show) and the one-line
reasons it keeps for a holder's failure."""

from __future__ import annotations

import math

from ewtune.accountant.errors import InvalidInputError

REASON_CHARACTERS = 500  # the longest reason a ledger abort or a status line keeps


def log(text: str) -> None:
    print(f"[ewtune coordinator] {text}", flush=True)


def reason(failure: BaseException) -> str:
    """A one-line reason: the message of an InvalidInputError, the type and message of anything else."""
    if isinstance(failure, InvalidInputError):
        return str(failure)
    return f"{type(failure).__name__}: {failure}".splitlines()[0][:REASON_CHARACTERS] if str(failure) else type(failure).__name__


def number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
