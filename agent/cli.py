"""``ewtune agent ...``: commands a data holder runs. Each module below adds its own subcommands."""

from __future__ import annotations

import importlib

_COMMAND_MODULES = (
    "agent.train_cli",  # ewtune agent train-local
    "agent.daemon_cli",  # ewtune agent start
    "agent.status_cli",  # ewtune agent status
    "agent.keys_cli",  # ewtune agent keys init
)


def register(subparsers) -> None:
    agent = subparsers.add_parser("agent", help="data-holder commands: private local training, the agent daemon")
    commands = agent.add_subparsers(dest="agent_command", metavar="AGENT_COMMAND", required=True)
    for module_name in _COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(commands)
