"""``python -m ewtune.coordinator.superlink_main [flower-superlink arguments]``: flwr's own SuperLink, its database
patient with locks (:func:`ewtune.federation.flower_internals.patient_superlink_database`), its SuperExec polling
every :data:`ewtune.federation.processes.SUPERLINK_TASK_POLL_S`, started by
``ewtune coordinator start`` and the one-machine federation. Any flwr other than the pinned one is refused."""

from __future__ import annotations

import os
import sys

from ewtune.federation.flower_internals import patient_superlink_database
from ewtune.federation.processes import SUPERLINK_TASK_POLL_S


def main() -> None:
    patient_superlink_database()
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = SUPERLINK_TASK_POLL_S  # inherited by the SuperExec it starts
    from flwr.superlink.cli import flower_superlink  # only once patient_superlink_database() checked the flwr pinned

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
