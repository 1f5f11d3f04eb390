"""``python -m agent.warm_supernode [flower-supernode arguments]``: the holder's SuperNode, kept warm.

It runs flwr's own ``flower-supernode`` in ``--isolation process`` with the holder's ClientApp
(:mod:`agent.client_app`) served in this same process by one long-lived task loop
(:class:`federation.flower_internals.WarmTaskLoop`), and with the SuperNode's idle and reply waits shortened
while a run is active (:func:`federation.flower_internals.shorten_supernode_waits`). So no message pays a
process start or flwr's imports, and none waits out a 3 s idle poll. The loop serves only this installed
ClientApp, never code from the coordinator's app bundle; the ClientApp holds no data and no key and asks the
agent daemon, over its socket, for everything. Any flwr other than the pinned one is refused at start.
"""

from __future__ import annotations

import logging
import sys

_RUNTIME_HOST = "127.0.0.1"  # flower-supernode's default --host for its Runtime API
_DEFAULT_RUNTIME_PORT = 9094


def runtime_port(arguments: list[str]) -> int:
    """The Runtime API port that ``flower-supernode`` will bind, from its ``--port`` argument."""
    for index, argument in enumerate(arguments):
        if argument == "--port" and index + 1 < len(arguments):
            return int(arguments[index + 1])
        if argument.startswith("--port="):
            return int(argument.split("=", 1)[1])
    return _DEFAULT_RUNTIME_PORT


def _log_task_loop() -> None:
    """The task loop's own lines to stderr (flwr logs through its own handler; the root logger stays as it is,
    so that httpx does not log every poll)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s ewtune task loop %(levelname)s %(message)s"))
    logger = logging.getLogger("federation.flower_internals")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(arguments: list[str] | None = None) -> int:
    from accountant.errors import EwtuneError

    arguments = list(sys.argv[1:] if arguments is None else arguments)
    if "--isolation" in arguments or "--host" in arguments:
        print("ewtune: error: agent.warm_supernode sets --isolation process and keeps the Runtime API on 127.0.0.1; "
              "leave both out", file=sys.stderr)
        return 2
    _log_task_loop()
    try:
        from federation.flower_internals import WarmTaskLoop, shorten_supernode_waits

        polling = shorten_supernode_waits()
        from agent.client_app import app

        WarmTaskLoop(f"{_RUNTIME_HOST}:{runtime_port(arguments)}", app, wake=polling.arrived).start()
    except EwtuneError as error:
        print(f"ewtune: error: {error}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *arguments, "--isolation", "process"]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
