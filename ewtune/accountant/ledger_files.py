"""The ledger's file primitives: the writer lock, whole-file reads, complete writes, directory fsyncs.

Durability (:class:`ewtune.accountant.ledger.Ledger`): a line is written with O_APPEND and fsynced before the call
returns; the directory is fsynced when the file is created; ``fcntl.flock`` keeps a second writer out. Nothing
written is ever rewritten: a torn tail that is a complete, valid entry (only its newline was lost) is completed
with its newline; any other torn tail is saved to ``PATH.torn-<time>`` before it is cut off, and the cut is
recorded as an entry. Files are created with mode 0600: a ledger says which data sets were trained on, and when.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError

FILE_MODE = 0o600


def lock_writer(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InvalidInputError(f"ledger {path} is open for writing by another process") from None


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_directory(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
