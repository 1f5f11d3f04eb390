"""``ewtune config check FILE``: validate an agent.toml or a federation.toml alone, reporting every problem
(file, key, reason) at once; exit 0 when it is valid, 2 otherwise. The same check runs before ``ewtune agent
init``/``start`` and ``ewtune coordinator run``, so nothing starts on a file it refuses.

Imports only the standard library and ewtune.accountant.errors until it runs."""

from __future__ import annotations

import argparse
import json

from ewtune.accountant.errors import InvalidInputError

ROLES = {"agent": "holder", "federation": "federation"}  # role -> the table that identifies its file


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="validate configuration files")
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="validate an agent.toml or federation.toml: every wrong key, type, range, path or key permission",
        description="Check a configuration file as the daemon or the coordinator would before starting: unknown "
        "tables and keys, types, ranges (epsilon > 0, 0 < delta < 1/N for the holder's N records, clip norms > "
        "0...), the model directory, the data file, the private keys' permissions (0600) and the writable "
        "directories. Every problem is printed with the file and the key. Exit 0 when valid, 2 otherwise. "
        "Example files: deploy/agent.toml.example, ewtune/coordinator/federation.toml.example.",
    )
    check.add_argument("file", help="the TOML file")
    check.add_argument("--role", choices=sorted(ROLES), help="which file it is (default: from its tables)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.tomlfiles import read_toml

    document, path = read_toml(args.file)
    role = args.role or next((role for role, table in ROLES.items() if table in document), None)
    if role is None:
        raise InvalidInputError(f"{path} has neither a [holder] table (agent.toml) nor a [federation] table "
                                "(federation.toml); pass --role")
    if role == "agent":
        from ewtune.agent.config_check import check_agent_config as check  # deferred: 35 ms, every command
    else:
        from ewtune.coordinator.config_check import check_federation_config as check  # deferred: 25 ms, every command
    problems = check(path)
    if args.json:
        print(json.dumps({"role": role, **problems.to_json()}, indent=2))
    elif problems.found:
        for problem in problems.found:
            print(problem)
        print(f"{path}: {len(problems.found)} problem(s): nothing would start")
    else:
        print(f"{path}: valid {role} configuration")
    return 2 if problems.found else 0
