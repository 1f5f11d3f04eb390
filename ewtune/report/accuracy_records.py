"""The accuracy figures ``ewtune ledger report --accuracy FILE`` draws, read from the JSON documents ewtune
itself writes:

- ``ewtune demo --json``: ``accuracy_by_round``, the global model on the demo's own held-out share;
- a coordinator's ``status.json`` (``ewtune coordinator run --json`` prints the same document): each holder's
  private, noised evaluation of every global model, ``holders.<id>.accuracy`` by round, with the majority-class
  baseline of its ``evaluation`` metrics where released; a causal LM's holders release a perplexity instead
  (``holders.<id>.perplexity``), drawn as a series whose ``"metric"`` is ``"perplexity"``; a holder that released
  none keeps the reasons the coordinator recorded (``evaluation_missing``);
- ``ewtune evaluate --json`` and ``ewtune agent train-local --json``: one exact figure of one model on the
  caller's own records (top-level ``accuracy`` and ``majority_baseline``).

A series is ``{"name", "rounds", "values", "baseline"}``; a single figure has ``"rounds": None`` and its one
value; a holder with no figure has empty ``values`` and its ``missing`` reason. Anything else is a one-line
:class:`~ewtune.accountant.errors.InvalidInputError` saying what the file holds instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError

KNOWN_FORMATS = ("accuracy_by_round (ewtune demo --json), holders (a coordinator's status.json) or a top-level "
                 "accuracy (ewtune evaluate --json, train-local --json)")  # fmt: skip


def read_accuracy(path: str | Path) -> list[dict[str, Any]]:
    """The accuracy series of the file ``path`` (the module docstring), or a one-line error."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidInputError(f"{path} holds a JSON {type(document).__name__}, not an object with {KNOWN_FORMATS}")
    try:
        if "accuracy_by_round" in document:
            return [_demo_series(document["accuracy_by_round"])]
        if "holders" in document:
            return _status_series(document["holders"], path)
        if "accuracy" in document:
            return [_single_figure(document, path)]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InvalidInputError(f"{path}: unexpected accuracy records ({type(error).__name__}: {error})") from None
    keys = ", ".join(sorted(map(str, document))[:8]) or "no keys"
    raise InvalidInputError(f"{path} holds none of {KNOWN_FORMATS}; its keys: {keys}")


def _demo_series(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "global model on held-out data",
        "rounds": [int(row["round"]) for row in rows],
        "values": [_fraction(row["accuracy"], f"round {row['round']}") for row in rows],
        "baseline": float(rows[0]["majority_baseline"]) if rows else None,
    }


def _status_series(holders: dict[str, Any], path: str | Path) -> list[dict[str, Any]]:
    """One series per holder of a coordinator status: its released accuracy by round, or why there is none.
    A status in which no holder released any is an error naming each holder's reason."""
    series = []
    for holder_id, holder in sorted(holders.items()):
        metric = "perplexity" if holder.get("perplexity") and not holder.get("accuracy") else "accuracy"
        by_round = sorted((int(r), _fraction(a, f"{holder_id} round {r}")) for r, a in holder.get(metric, {}).items())
        baselines = [m.get("majority_baseline") for m in holder.get("evaluation", {}).values() if isinstance(m, dict)]
        series.append({
            "name": f"{holder_id} (private, noised by the holder)",
            "rounds": [r for r, _ in by_round],
            "values": [a for _, a in by_round],
            "baseline": next((float(b) for b in baselines if b is not None), None),
            "missing": None if by_round else _missing_reason(holder),
            **({"metric": metric} if metric != "accuracy" else {}),
        })  # fmt: skip
    if not any(line["values"] for line in series):
        reasons = "; ".join(f"{holder_id}: {_missing_reason(holder)}" for holder_id, holder in sorted(holders.items()))
        raise InvalidInputError(f"{path} is a coordinator status in which no holder released an accuracy ({reasons or 'no holders'})")
    return series


def _missing_reason(holder: dict[str, Any]) -> str:
    """Why a holder of a status released no accuracy: the coordinator's reasons, each once, after its rounds."""
    rounds_by_reason: dict[str, list[str]] = {}
    for round, reason in sorted(holder.get("evaluation_missing", {}).items(), key=lambda item: int(item[0])):
        rounds_by_reason.setdefault(str(reason), []).append(str(round))
    if not rounds_by_reason:
        return "no evaluation recorded (the run asked none, or none had ended)"
    return "; ".join(f"rounds {', '.join(rounds)}: {reason}" for reason, rounds in rounds_by_reason.items())


def _single_figure(document: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """One exact figure (ewtune evaluate, train-local): what was evaluated on which data."""
    if document["accuracy"] is None:
        raise InvalidInputError(f"{path} holds no accuracy (a {document.get('task', 'causal_lm')} evaluation: perplexity only)")
    evaluated = document.get("weights") or document.get("adapter") or document.get("model") or document.get("model_id") or "the model"
    data = document.get("data")
    baseline = document.get("majority_baseline")
    return {
        "name": f"{evaluated}" + (f" on {data}" if data else "") + " (exact, never released)",
        "rounds": None,
        "values": [_fraction(document["accuracy"], "accuracy")],
        "baseline": float(baseline) if baseline is not None else None,
    }


def _fraction(value: Any, what: str) -> float:
    number = float(value)  # a holder's noised accuracy may fall outside [0, 1]; it is drawn as released
    if not math.isfinite(number):
        raise ValueError(f"{what}: accuracy {value!r} is not a finite number")
    return number
