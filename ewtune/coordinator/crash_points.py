"""Named points of a round where the ServerApp can be made to die by SIGKILL, to test crash recovery with real
processes at a chosen moment (a kill from outside cannot hit "after the first commit, before the second").

Off unless the environment variable ``EWTUNE_COORDINATOR_CRASH_FILE`` names a file (never set by ewtune
itself). When the ServerApp reaches the point whose name that file holds, it deletes the file (one shot: the
restarted ServerApp goes on) and sends itself SIGKILL: no handler, no ``finally``, no flush runs, as when an
operator or the kernel kills it. Points: ``reserved:R`` (round R's reservations are in the ledger),
``committed:R:K`` (the K-th commit of round R), ``checkpointed:R`` (round R's checkpoint is written).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENVIRONMENT = "EWTUNE_COORDINATOR_CRASH_FILE"


def reach(point: str) -> None:
    """Die here when the crash file names ``point``."""
    path = os.environ.get(ENVIRONMENT)
    if not path:
        return
    try:
        wanted = Path(path).read_text().strip()
    except OSError:
        return
    if wanted == point:
        os.unlink(path)
        os.kill(os.getpid(), signal.SIGKILL)
