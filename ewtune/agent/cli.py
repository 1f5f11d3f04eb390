"""``ewtune agent ...``: commands a data holder runs. Each module below adds its own subcommands."""

from __future__ import annotations

import importlib

_COMMAND_MODULES = (
    "ewtune.agent.train_cli",  # ewtune agent train-local
    "ewtune.agent.daemon_cli",  # ewtune agent start
    "ewtune.agent.status_cli",  # ewtune agent status
    "ewtune.agent.keys_cli",  # ewtune agent keys init
)


def register(subparsers) -> None:
    agent = subparsers.add_parser("agent", help="data-holder commands: private local training, the agent daemon")
    commands = agent.add_subparsers(dest="agent_command", metavar="AGENT_COMMAND", required=True)
    for module_name in _COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(commands)
