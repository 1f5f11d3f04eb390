"""``python -m ewtune.agent.warm_supernode [flower-supernode arguments]``: the holder's SuperNode, kept warm.

It runs flwr's own ``flower-supernode`` in ``--isolation process`` with the holder's ClientApp
(:mod:`ewtune.agent.client_app`) served in this same process by one long-lived task loop
(:class:`ewtune.federation.flower_internals.WarmTaskLoop`), and with the SuperNode's idle and reply waits shortened
while a run is active (:func:`ewtune.federation.flower_internals.shorten_supernode_waits`). So no message pays a
process start or flwr's imports, and none waits out a 3 s idle poll. The loop serves only this installed
ClientApp, never code from the coordinator's app bundle; the ClientApp holds no data and no key and asks the
agent daemon, over its socket, for everything. Any flwr other than the pinned one is refused at start.

The Runtime API is closed to every other local process and user with Flower's own SuperExec authentication
(``--superexec-auth-secret-file``): each start draws a fresh 256-bit secret from the OS's secure source, hands
it to flwr through a pipe (it is never written to a file) and keeps it for the task loop alone, which signs its
AcquireTask requests with it (HMAC-SHA256 over the request, a timestamp and a nonce). A process without the
secret is answered 401 and so never obtains a task token, which every other Runtime call requires.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

from ewtune.accountant.errors import EwtuneError

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


_SECRET_BYTES = 32
_SET_HERE = ("--isolation", "--host", "--superexec-auth-secret-file")


def runtime_secret_argument(secret: bytes) -> list[str]:
    """``--superexec-auth-secret-file /dev/fd/N``: ``secret`` in a pipe that this process alone holds open,
    written and closed for writing, so that flwr reads exactly ``secret`` and no file ever holds it."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secret)
    finally:
        os.close(write_end)
    return ["--superexec-auth-secret-file", f"/dev/fd/{read_end}"]


def _log_task_loop() -> None:
    """The task loop's own lines to stderr (flwr logs through its own handler; the root logger stays as it is,
    so that httpx does not log every poll)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s ewtune task loop %(levelname)s %(message)s"))
    logger = logging.getLogger("ewtune.federation.flower_internals")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(arguments: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if arguments is None else arguments)
    given = [flag for flag in _SET_HERE if any(a == flag or a.startswith(flag + "=") for a in arguments)]
    if given:
        print(f"ewtune: error: ewtune.agent.warm_supernode sets {', '.join(given)} itself (process isolation, the Runtime API "
              "on 127.0.0.1, a fresh secret that closes it); leave them out", file=sys.stderr)
        return 2
    _log_task_loop()
    try:
        # deferred: flower_internals refuses an unpinned flwr and shortens its waits before flwr's SuperNode modules load
        from ewtune.federation.flower_internals import WarmTaskLoop, shorten_supernode_waits

        polling = shorten_supernode_waits()
        from ewtune.agent.client_app import app  # deferred: after the waits are shortened (it loads flwr)

        secret = secrets.token_bytes(_SECRET_BYTES)
        WarmTaskLoop(f"{_RUNTIME_HOST}:{runtime_port(arguments)}", app, wake=polling.arrived, secret=secret).start()
    except EwtuneError as error:
        print(f"ewtune: error: {error}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode  # deferred: only once the task loop has started

    sys.argv = ["flower-supernode", *arguments, "--isolation", "process", *runtime_secret_argument(secret)]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
