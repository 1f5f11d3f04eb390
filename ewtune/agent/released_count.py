"""The holder's training-set size, released once as a private count.

The guarantee is record-level DP under add/remove-one neighbours, and add/remove neighbours differ in N: an
exact N would tell the coordinator whether a record is in the data set. So N never leaves exactly. The daemon
releases N_noisy = round(N + Z) with Z ~ N(0, s^2), s = the policy's ``dataset_size_noise`` (a count has
sensitivity 1, so this is the Gaussian mechanism with noise multiplier s; Dwork & Roth 2014, Thm A.1 for the
mechanism, accounted here with the certified PLD accountant like every event), drawn from the operating
system's secure source and charged to the ledger as one event, ``PoissonGaussianEvent(1.0, s, 1)``, composed
into the same certified total as every other release. Rounding to an integer >= 1 is post-processing.

Everything that depends on N outside the holder is computed from N_noisy: the coordinator's q = B / N_noisy and
the sigma it calibrates for that q, the FedAvg weight, the expected batch q N_noisy the update is divided by,
the floor on the expected batch and the delta < 1/N check. So the q recorded in the ledger reveals nothing
beyond N_noisy.

The value is reused while the data set is the same: drawing again would be a new release (and a new charge),
and averaging fresh draws would reveal N. The ledger's latest count commit holds the value; a private file
beside the ledger (``<ledger>.count``, mode 0600, never sent) ties it to a fingerprint of the data file and
its split, so a new data file releases (and charges) a new count. A crash between the commit and that file
only costs a second, charged, release.

This module imports neither flwr nor the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ewtune.accountant.entries import commit_entries
from ewtune.accountant.errors import EwtuneError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_files import FILE_MODE
from ewtune.accountant.ledger_payloads import DATASET_SIZE_PURPOSE
from ewtune.agent.recovery import ProgressJournal

COUNT_RUN_ID = "dataset-size"  # the run id of a count release's reservation (no training run's)


@dataclass(frozen=True)
class ReleasedCount:
    """A released count: its value and the seq of the ledger commit that charged it."""

    value: int
    commit_seq: int


def count_event(noise: float) -> PoissonGaussianEvent:
    """The Gaussian mechanism on a count (sensitivity 1 under add/remove-one), every record in (q = 1), one
    release: noise std ``noise`` is noise multiplier ``noise / 1``."""
    return PoissonGaussianEvent(1.0, noise, 1)


def noisy_count(exact: int, noise: float, standard_normal: float) -> int:
    """round(exact + noise * z), at least 1 (post-processing of the Gaussian mechanism's output)."""
    value = exact + noise * standard_normal
    if not math.isfinite(value):
        raise ValueError(f"a noised count must be finite, got {value!r}")
    return max(1, int(round(value)))


def count_facts(value: int, noise: float) -> dict[str, Any]:
    """The commit ``extra`` of a count release: its purpose, the released value and the noise it had."""
    return {"purpose": DATASET_SIZE_PURPOSE, "public": {"dataset_size": value}, "dataset_size_noise": noise}


def latest_count(entries: Iterable[Mapping[str, Any]]) -> ReleasedCount | None:
    """The last count the ledger's entries released (a commit whose purpose is the data set size), or None."""
    found = None
    for commit in commit_entries(entries):
        if commit.released_count is not None:
            found = ReleasedCount(commit.released_count, commit.seq)
    return found


def count_file(ledger_path: str | os.PathLike) -> Path:
    """``<ledger path>.count``: which data set the ledger's latest count belongs to (private to the holder)."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ".count")


def data_fingerprint(data_file: str | os.PathLike, training_records: int, held_out_records: int) -> str:
    """SHA-256 of the data file's bytes and the split's sizes: a new file, or a new split, is a new data set.
    It stays in the holder's private count file: a hash of the data is no DP release."""
    digest = hashlib.sha256()
    with open(data_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"|{training_records}|{held_out_records}".encode())
    return digest.hexdigest()


def reusable(path: Path, latest: ReleasedCount | None, fingerprint: str) -> bool:
    """Whether ``latest`` was released for the data set of ``fingerprint`` (the count file says so)."""
    if latest is None:
        return False
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("fingerprint") == fingerprint and recorded.get("commit_seq") == latest.commit_seq


def current_count(ledger: Ledger, holder_id: str, data: tuple[str, int, int], noise: float, source,
                  journal: ProgressJournal | None = None) -> int | None:
    """The count that leaves for the data set ``data`` = (data file, training records N, held-out records):
    the ledger's latest while the count file ties it to this data set, else a new one, released and charged
    now (its reservation journaled as a one-step release when ``journal`` is given, :mod:`ewtune.agent.recovery`);
    None when the budget left cannot fund that release. ``source`` draws the noise (the OS's secure source)."""
    data_file, exact, held_out = data
    latest = latest_count(ledger.entries)
    fingerprint = data_fingerprint(data_file, exact, held_out)
    path = count_file(ledger.path)
    if reusable(path, latest, fingerprint):
        return latest.value
    event = count_event(noise)
    if not ledger.spend_with(holder_id, event).within_budget:
        return None
    expected = ledger.head.seq + 1
    if journal is not None:
        journal.begin(expected)
    reservation = ledger.reserve(holder_id, COUNT_RUN_ID, 0, event)
    if reservation != expected:
        raise EwtuneError(f"the ledger reserved seq {reservation}, where the journal expected {expected}")
    if journal is not None:
        journal.step(reservation, 1)
    value = noisy_count(exact, noise, float(source.standard_normal(1).double()[0]))
    seq = ledger.commit(reservation, event, extra={**count_facts(value, noise), "randomness": source.name})
    if journal is not None:
        journal.finish(ledger)
    remember(path, ReleasedCount(value, seq), fingerprint)
    return value


def remember(path: Path, released: ReleasedCount, fingerprint: str) -> None:
    """Write the count file (mode 0600) tying ``released`` to the data set of ``fingerprint``."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"fingerprint": fingerprint, "commit_seq": released.commit_seq}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
