"""``ewtune``: one command, a subcommand group per part.

Each part exposes ``register(subparsers)`` in a module that imports only argparse at import time, so that
``ewtune accountant ...`` and ``ewtune ledger ...`` start without importing torch, transformers or flwr.
A handler is the callable stored as ``func`` in the parsed namespace; it returns the exit code.

When stdout is closed before a command has written all of it (``ewtune coordinator status | head``), the command
stops quietly with exit code 141 (128 + SIGPIPE), what a shell reports for ``cat`` or ``git`` cut off the same
way, so that a ``set -o pipefail`` script still sees that the output was cut.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from ewtune.accountant.errors import EwtuneError

# (module, what it adds): each module defines ``register(subparsers)``.
_PARTS = (
    "ewtune.accountant_cli",  # ewtune accountant
    "ewtune.ledger_cli",  # ewtune ledger
    "ewtune.agent.cli",  # ewtune agent
    "ewtune.agent.audit_cli",  # ewtune audit
    "ewtune.audit_cli",  # ewtune audit --federated (after ewtune.agent.audit_cli, whose parser it extends)
    "ewtune.coordinator.cli",  # ewtune coordinator
    "ewtune.federation_cli",  # ewtune keys, ewtune demo
    "ewtune.bench.cli",  # ewtune bench
    "ewtune.config_cli",  # ewtune config check
    "ewtune.evaluate_cli",  # ewtune evaluate
)


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line naming the option and exit code 2, as every other input error does
    (argparse's default prints the whole usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ewtune",
        description="Federated on-premise fine-tuning with differential privacy, accounted with a "
        "certified (PLD) bound and the Edgeworth estimate beside it.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _PARTS:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


STDOUT_CLOSED_EXIT_CODE = 128 + signal.SIGPIPE  # 141, as a shell reports a process cut off by its reader


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (see the module docstring for a reader that closes stdout early)."""
    try:
        try:
            return _run_command(argv)
        finally:  # also after --help: a reader gone after the last line is noticed here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return STDOUT_CLOSED_EXIT_CODE


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so that the interpreter's own flush at exit (of what is
    still buffered for the closed pipe) fails no more and prints nothing."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (tests capturing stdout)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def _run_command(argv: list[str] | None) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.federation.processes import QUIET_FLOWER_ENVIRONMENT

    for name, value in QUIET_FLOWER_ENVIRONMENT.items():  # what this process starts is quiet and offline too
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EwtuneError as error:
        if args.debug:
            raise
        print(f"ewtune: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interrupt:  # a TrainingInterrupted says what ran and was charged
        print("ewtune: interrupted" + (f": {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
