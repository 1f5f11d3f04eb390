"""A holder's ledger built the same way every time, and the forger's tools the tamper, head, cross-check, fuzz
and CLI tests share: rewrite entries, re-sign them with a key, anchor the head back. They are not part of the
package: a real writer never rewrites a ledger, nor moves its head back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_head import Head, default_head_path, head_document, write_head
from ewtune.accountant.ledger_lines import GENESIS_PREV, entry_hash, signed_bytes
from ewtune.accountant.signing import SigningKey, canonical_json

WRITER = "hospital-a"
BUDGET = {"budget_epsilon": 3.0, "budget_delta": 1e-5}
ROUND = PoissonGaussianEvent(0.01, 1.0, 200)
DIGEST = "ab" * 32


def build_ledger(path: Path, key: SigningKey | None = None) -> SigningKey:
    """A holder's ledger: 0 genesis, 1 reserve r0, 2 commit r0 (stopped early), 3 reserve r1, 4 abort r1,
    5 reserve r2 (left open)."""
    key = key or SigningKey.generate()
    with Ledger.create(path, key, WRITER, BUDGET) as ledger:
        first = ledger.reserve(WRITER, "run-1", 0, ROUND)
        ledger.commit(first, PoissonGaussianEvent(0.01, 1.0, 150), extra={"receipt_sha256": DIGEST})
        second = ledger.reserve(WRITER, "run-1", 1, ROUND)
        ledger.abort(second, "holder went offline")
        ledger.reserve(WRITER, "run-1", 2, ROUND)
    return key


def read_entries(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_bytes().splitlines()]


def write_entries(path: Path, entries: list[dict]) -> None:
    path.write_bytes(b"".join(canonical_json(entry) + b"\n" for entry in entries))


def resign(entries: list[dict], key: SigningKey, start: int = 0) -> list[dict]:
    """Re-chain and re-sign ``entries[start:]`` with ``key``, as a forger holding that key would."""
    for index in range(start, len(entries)):
        entry = entries[index]
        entry["prev"] = GENESIS_PREV if index == 0 else entry_hash(entries[index - 1])
        entry.pop("signature", None)
        entry["signature"] = key.sign(signed_bytes(entry))
    return entries


def anchor_head_at(path: Path, key: SigningKey, seq: int, head_path: Path | None = None) -> Head:
    """Sign and write the head as it stood when entry ``seq`` was the last: what a crash between an fsynced
    append and its head update leaves behind."""
    entries = read_entries(path)
    head = Head(seq, entry_hash(entries[seq]))
    write_head(head_path or default_head_path(path), head_document(path.name, entries[0]["writer"], head, key))
    return head


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One ledger built once (entries: genesis, reserve, commit, reserve, abort, reserve) and its key."""
    path = tmp_path_factory.mktemp("pristine") / "ledger.jsonl"
    return path, build_ledger(path)


@pytest.fixture()
def ledger(pristine, tmp_path):
    """A copy of the pristine ledger, with its head file."""
    path = tmp_path / "ledger.jsonl"
    shutil.copy(pristine[0], path)
    shutil.copy(default_head_path(pristine[0]), default_head_path(path))
    return path, pristine[1]


def lines_of(path):
    return path.read_bytes().split(b"\n")[:-1]

