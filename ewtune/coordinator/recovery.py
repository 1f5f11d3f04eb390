"""Crash recovery of the coordinator: a federation killed at any point of a round resumes from its last
committed round when ``ewtune coordinator run`` is started again with the same federation.toml.

A Flower run id changes with every ``flwr run``; the federation's identity does not. The ServerApp keeps two
things in ``output_dir`` beside the checkpoints:

- the **run record** (``federation-run.json``, written atomically and fsynced): the federation's name, its
  ``[federation]`` settings, the plan (each holder's q and sigma, fixed for the whole federation) and the
  ledger run ids of every start (``segments``: ``"{name}-{flower_run_id}"``), with its state. A record whose
  state is not final (``finished`` or ``stopped``: a crash, or a failure) is resumed by the next start;
- the **inbox** (``inbox/<run id>/round-NNN/<holder>.safetensors``): each verified update with its signed
  receipt, fsynced *before* its commit is appended to the ledger, and removed once the round's checkpoint is
  written. "The coordinator received the update" means: it is in the inbox.

At a resumed start, before any new reservation:

1. :func:`reconcile` closes every open reservation of the federation's earlier run ids: an update in the inbox
   whose receipt still verifies (pinned key, run, round, holder, the reserved event, the update's SHA-256)
   is committed, exactly as the round would have committed it; anything else is aborted ("not received").
   The holder's own ledger keeps what the holder spent (its daemon recovers on its own, ``ewtune/agent/recovery.py``);
   the coordinator's records what it aggregated, and ``ewtune ledger crosscheck`` lists the difference.
2. :func:`resume_point` finds the last checkpoint of the federation (round k) and the commits of round k+1:
   when there are any, round k+1 is rebuilt from their inbox updates (the same FedAvg over the same updates)
   and checkpointed; otherwise round k+1 is trained again.
3. The run goes on under the new run id (a holder's daemon refuses a replayed round of the same run id, never
   a round of another), with the recorded plan, until the planned number of rounds is aggregated.

No reservation is committed twice (the ledger refuses it), no commit lacks the update it aggregated, and a
holder's update that reached the coordinator is never trained again. A round whose replies had not been
persisted is trained again: its holders spent that round's privacy at home without it being aggregated, so a
resumed federation may stop early on a holder's budget.

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ewtune.accountant.entries import reservations_and_commits
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.receipts import Receipt, receipt_digest
from ewtune.accountant.signing import canonical_json
from ewtune.accountant.spend import Reservation, check_within
from ewtune.coordinator.checkpoints import CHECKPOINTS, load_weights, read_metadata, save_weights, write_durably
from ewtune.coordinator.planner import FederationSettings, HolderDescription, HolderPlan
from ewtune.coordinator.receipts_check import check_receipt

RUN_RECORD = "federation-run.json"
INBOX = "inbox"
FINAL_STATES = ("finished", "stopped")  # of a run record: a failed or interrupted run is resumed
_RECEIPT_METADATA = "receipt"


@dataclass
class RunRecord:
    """The federation across restarts (module docstring)."""

    name: str
    settings: dict[str, Any]
    plans: list[HolderPlan]
    segments: list[str] = field(default_factory=list)
    state: str = "running"

    @property
    def resumable(self) -> bool:
        return self.state not in FINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "settings": self.settings,
            "plans": [dataclasses.asdict(plan) for plan in self.plans],
            "segments": list(self.segments),
            "state": self.state,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "RunRecord":
        plans = [HolderPlan(**{**plan, "holder": HolderDescription(**plan["holder"])}) for plan in document["plans"]]
        return cls(str(document["name"]), dict(document["settings"]), plans, [str(s) for s in document["segments"]], str(document["state"]))


def settings_record(settings: FederationSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def load_run_record(output_dir: str | os.PathLike) -> RunRecord | None:
    path = Path(output_dir) / RUN_RECORD
    if not path.exists():
        return None
    try:
        return RunRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as bad:
        raise InvalidInputError(f"{path} is not a federation run record ({type(bad).__name__}: {bad}); move it away to start afresh") from None


def save_run_record(output_dir: str | os.PathLike, record: RunRecord) -> Path:
    path = Path(output_dir) / RUN_RECORD
    write_durably(path, json.dumps(record.to_json(), indent=2, sort_keys=True).encode())
    return path


def earlier_flower_run_ids(output_dir: str | os.PathLike) -> list[int]:
    """The Flower run ids of an unfinished federation's earlier starts (none when there is nothing to resume)."""
    record = load_run_record(output_dir)
    if record is None or not record.resumable:
        return []
    return [int(segment.rsplit("-", 1)[1]) for segment in record.segments if segment.rsplit("-", 1)[-1].isdigit()]


def check_resumable(record: RunRecord, name: str, settings: FederationSettings) -> None:
    """A run is resumed only under the name and settings it was planned with."""
    if record.name != name or record.settings != settings_record(settings):
        raise InvalidInputError(
            f"the output directory holds the unfinished federation {record.name!r} (runs {', '.join(record.segments)}) "
            "planned with other [federation] settings: restore them to resume it, or use another output_dir"
        )


class Inbox:
    """Received, verified updates with their signed receipts, persisted before their commits."""

    def __init__(self, output_dir: str | os.PathLike):
        self.directory = Path(output_dir) / INBOX

    def path(self, run_id: str, round: int, holder_id: str) -> Path:
        return self.directory / run_id / f"round-{round:03d}" / f"{holder_id}.safetensors"

    def keep(self, run_id: str, round: int, holder_id: str, update: Mapping[str, np.ndarray], receipt_document: Mapping[str, Any]) -> Path:
        path = self.path(run_id, round, holder_id)
        return save_weights(path, update, {_RECEIPT_METADATA: canonical_json(receipt_document).decode()})

    def received(self, run_id: str, round: int, holder_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(update, receipt document) when the update of that round is in the inbox."""
        path = self.path(run_id, round, holder_id)
        if not path.is_file():
            return None
        return load_weights(path), json.loads(read_metadata(path)[_RECEIPT_METADATA])

    def discard_round(self, run_ids: Iterable[str], round: int) -> None:
        """Forget a round's updates once its checkpoint is written (the checkpoint holds their average)."""
        for run_id in run_ids:
            shutil.rmtree(self.directory / run_id / f"round-{round:03d}", ignore_errors=True)


def commit_extra(receipt_document: Mapping[str, Any], receipt: Receipt, node_id: int) -> dict[str, Any]:
    """What a coordinator commit records beside the executed event (the same live and after recovery)."""
    return {
        "receipt_sha256": receipt_digest(receipt_document),
        "update_sha256": receipt.update_sha256,
        "node_id": str(node_id),
    }


@dataclass(frozen=True)
class Outcome:
    """How one open reservation was closed at a resumed start."""

    reservation: int
    holder_id: str
    run_id: str
    round: int
    action: str  # "commit" or "abort"
    reason: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reconcile(ledger: Ledger, run_ids: Iterable[str], inbox: Inbox, public_keys: Mapping[str, str], node_ids: Mapping[str, int]) -> list[Outcome]:
    """Close every open reservation of ``run_ids``: commit what the inbox proves was received, abort the rest.
    ``public_keys`` are the holders' pinned ledger keys (the registry's)."""
    run_ids = set(run_ids)
    outcomes = []
    for seq, reservation in sorted(ledger.open_reservations().items()):
        if reservation.run_id not in run_ids:
            continue  # another federation's (it resumes its own)
        received = _verified_received(reservation, inbox, public_keys.get(reservation.holder_id))
        if isinstance(received, str):
            ledger.abort(seq, f"coordinator restarted: {received}"[:500])
            outcomes.append(Outcome(seq, reservation.holder_id, reservation.run_id, reservation.round, "abort", received))
            continue
        document, receipt = received
        extra = {**commit_extra(document, receipt, node_ids.get(reservation.holder_id, 0)), "recovered": "received before the coordinator stopped"}
        ledger.commit(seq, receipt.event, extra=extra)
        outcomes.append(Outcome(seq, reservation.holder_id, reservation.run_id, reservation.round, "commit", "its update was received and verified"))
    return outcomes


def _verified_received(reservation: Reservation, inbox: Inbox, public_key: str | None) -> tuple[dict[str, Any], Receipt] | str:
    """(receipt document, receipt) of the reservation's update in the inbox, or the reason it cannot be committed."""
    if public_key is None:
        return f"holder {reservation.holder_id} is no longer registered"
    try:
        received = inbox.received(reservation.run_id, reservation.round, reservation.holder_id)
        if received is None:
            return "its update was not received"
        update, document = received
        receipt = check_receipt(
            document, update, public_key=public_key, run_id=reservation.run_id, round=reservation.round,
            holder_id=reservation.holder_id, planned=reservation.event,
        )
        check_within(receipt.event, reservation.event)
    except (InvalidInputError, ValueError, KeyError) as bad:
        return f"the update kept in the inbox does not verify: {bad}"
    return document, receipt


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed federation stands: ``completed`` rounds aggregated, their model in ``weights`` (None: the
    initial weights), and ``interrupted``: the committed updates of round ``completed + 1`` (holder id -> update),
    which the caller aggregates and checkpoints before going on (empty: that round is trained again)."""

    completed: int
    weights: dict[str, np.ndarray] | None
    interrupted: dict[str, dict[str, np.ndarray]]


def resume_point(ledger: Ledger, record: RunRecord, output_dir: str | os.PathLike, inbox: Inbox) -> ResumePoint:
    """Call after :func:`reconcile` (no reservation of the record's runs is open)."""
    completed, weights = _last_checkpoint(Path(output_dir), set(record.segments))
    next_round = completed + 1
    commits = _commits_of_round(ledger.entries, set(record.segments), next_round)
    interrupted = {}
    for holder_id, run_id in commits.items():
        received = inbox.received(run_id, next_round, holder_id)
        if received is None:
            raise InvalidInputError(
                f"round {next_round} of run {run_id} committed {holder_id}'s update, but {inbox.path(run_id, next_round, holder_id)} "
                "is gone: the round cannot be rebuilt (restore the inbox, or start the federation afresh in another output_dir)"
            )
        interrupted[holder_id] = received[0]
    return ResumePoint(completed, weights, interrupted)


def _last_checkpoint(output_dir: Path, run_ids: set[str]) -> tuple[int, dict[str, np.ndarray] | None]:
    best, path = 0, None
    for candidate in sorted((output_dir / CHECKPOINTS).glob("round-*.safetensors")):
        metadata = read_metadata(candidate)
        if metadata.get("run_id") in run_ids and int(metadata.get("round", 0)) > best:
            best, path = int(metadata["round"]), candidate
    return best, (load_weights(path) if path is not None else None)


def _commits_of_round(entries: Iterable[Mapping[str, Any]], run_ids: set[str], round: int) -> dict[str, str]:
    """holder id -> run id of the commits of ``round`` in ``run_ids`` (only the latest run that reserved it)."""
    reservations, commits = reservations_and_commits(entries)
    of_round = {
        seq: reserved for seq, reserved in reservations.items() if reserved.run_id in run_ids and reserved.round == round
    }
    latest_run = list(of_round.values())[-1].run_id if of_round else None
    committed = {}
    for commit in commits:
        reserved = of_round.get(commit.reservation)
        if reserved is not None and reserved.run_id == latest_run:
            committed[reserved.holder] = reserved.run_id
    return committed


def committed_rounds(entries: Iterable[Mapping[str, Any]], run_ids: Iterable[str]) -> dict[str, int]:
    """holder id -> how many of its reservations in ``run_ids`` were committed."""
    run_ids = set(run_ids)
    reservations, commits = reservations_and_commits(entries)
    holders = {seq: reserved.holder for seq, reserved in reservations.items() if reserved.run_id in run_ids}
    counts: dict[str, int] = {}
    for commit in commits:
        if commit.reservation in holders:
            holder_id = holders[commit.reservation]
            counts[holder_id] = counts.get(holder_id, 0) + 1
    return counts
