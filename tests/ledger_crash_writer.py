"""A ledger writer that kills itself (SIGKILL) at a named point of its N-th append: the subprocess driven by
``tests/test_ledger_crash.py``. It is test-side only: the ledger code runs unchanged, and the crash is placed by
wrapping the system calls and the head writer it calls.

Usage: ``python tests/ledger_crash_writer.py LEDGER KEY POINT N``. It opens the ledger, then reserves, commits,
reserves, aborts and reserves (appends 1 to 5), printing one ``ACK`` line (JSON) after each call returns: an
acknowledged entry, on which a caller (the daemon) may act, e.g. release an update after its commit.

Points of an append (``ewtune.accountant.ledger.Ledger._append``, then the head update):
- ``before-write``: before the line's ``write``;
- ``mid-line``: after the first half of the line is written;
- ``before-fsync``: the whole line written, before its ``fsync``;
- ``before-head``: the line fsynced, before the head file is touched;
- ``mid-head``: the new head's temporary file written and fsynced, before its rename over the head;
- ``after-head``: the head renamed, before the call returns (nothing acknowledged yet).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import ewtune.accountant.ledger as ledger_module
from ewtune.accountant.events import PoissonGaussianEvent, event_to_json
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_lines import entry_hash
from ewtune.accountant.signing import SigningKey

WRITER = "hospital-a"
ROUND = PoissonGaussianEvent(0.01, 1.0, 200)
POINTS = ("before-write", "mid-line", "before-fsync", "before-head", "mid-head", "after-head")
APPENDS = 5


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, crash_at: int, ledger_path: str) -> None:
    """Wrap the calls of ``point`` so that the ``crash_at``-th append to ``ledger_path`` dies there."""
    appends = {"count": 0}  # ledger lines started so far by this process
    real_write_all, real_fsync = ledger_module.write_all, os.fsync
    real_write_head, real_replace = ledger_module.write_head, os.replace

    def on_ledger(fd: int) -> bool:
        return os.path.realpath(f"/proc/self/fd/{fd}") == ledger_path

    def write_all(fd: int, data: bytes) -> None:
        if on_ledger(fd):
            appends["count"] += 1
            if appends["count"] == crash_at and point == "before-write":
                die()
            if appends["count"] == crash_at and point == "mid-line":
                real_write_all(fd, data[: len(data) // 2])
                die()
        real_write_all(fd, data)

    def fsync(fd: int) -> None:
        if point == "before-fsync" and appends["count"] == crash_at and on_ledger(fd):
            die()
        real_fsync(fd)

    def write_head(path, document, replace=True):
        if point == "before-head" and appends["count"] == crash_at:
            die()
        real_write_head(path, document, replace)
        if point == "after-head" and appends["count"] == crash_at:
            die()

    def rename(source, target):
        if point == "mid-head" and appends["count"] == crash_at:
            die()
        real_replace(source, target)

    ledger_module.write_all, os.fsync, ledger_module.write_head, os.replace = write_all, fsync, write_head, rename


def acknowledge(ledger: Ledger, operation: str, seq: int, event=None) -> None:
    entry = ledger.entries[seq]
    record = {"operation": operation, "seq": seq, "hash": entry_hash(entry), "kind": entry["kind"]}
    if event is not None:
        record["event"] = event_to_json(event)
    print("ACK " + json.dumps(record), flush=True)


def main(ledger_path: str, key_path: str, point: str, crash_at: int) -> None:
    if point not in POINTS:
        raise SystemExit(f"unknown crash point {point!r}")
    key = SigningKey.load(key_path)
    with Ledger.open(ledger_path, key) as ledger:
        install(point, crash_at, os.path.realpath(ledger_path))
        first = ledger.reserve(WRITER, "run", 0, ROUND)
        acknowledge(ledger, "reserve", first, ROUND)
        executed = PoissonGaussianEvent(0.01, 1.0, 150)  # stopped early: fewer steps than reserved
        acknowledge(ledger, "commit", ledger.commit(first, executed), executed)
        second = ledger.reserve(WRITER, "run", 1, ROUND)
        acknowledge(ledger, "reserve", second, ROUND)
        acknowledge(ledger, "abort", ledger.abort(second, "nothing released"))
        third = ledger.reserve(WRITER, "run", 2, ROUND)
        acknowledge(ledger, "reserve", third, ROUND)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
