"""``ewtune agent keys init DIR --holder-id ID``: a holder generates its own SuperNode and ledger keys.

Imports only argparse at import time.
"""

from __future__ import annotations

import argparse


def register(commands) -> None:
    keys = commands.add_parser("keys", help="the holder's own keys: SuperNode authentication and ledger signing")
    key_commands = keys.add_subparsers(dest="agent_keys_command", metavar="KEYS_COMMAND", required=True)
    init = key_commands.add_parser(
        "init",
        help="generate this holder's key pairs and its public card (holder.json) for the coordinator",
        description="Write the SuperNode authentication key pair (EC P-384, OpenSSH formats) and the Ed25519 ledger "
        "key pair into DIR (private keys mode 0600, never overwritten) and the public card DIR/holder.json "
        "{holder_id, supernode_public_key, ledger_public_key}. Hand only holder.json to the coordinator operator "
        "(`ewtune keys add-holder`); the private keys never leave this machine.",
    )
    init.add_argument("directory", help="the holder's key folder (created if missing)")
    init.add_argument("--holder-id", required=True, help="this holder's id, e.g. hospital-a")
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.keys import init_holder_keys

    keys = init_holder_keys(args.directory, args.holder_id)
    print(f"keys of holder {keys.holder_id} in {keys.directory}:")
    print(f"  SuperNode key   {keys.supernode_private_key} (private, 0600), {keys.supernode_public_key}")
    print(f"  ledger key      {keys.ledger_key} (private, 0600), public {keys.ledger_public_key}")
    print(f"  card            {keys.card}: give this file, and only this file, to the coordinator operator")
    return 0
