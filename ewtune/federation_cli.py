"""``ewtune keys init DIR`` and ``ewtune demo``. Imports only argparse at import time."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="federation credentials: CA, SuperLink certificate, SuperNode and ledger keys")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    init = key_commands.add_parser(
        "init",
        help="create every credential of a federation in a new directory",
        description="Write a P-384 CA, the SuperLink certificate (SANs for --address), per-holder SuperNode keys "
        "(OpenSSH EC P-384, for `flwr supernode register`) and Ed25519 ledger keys for the holders and the coordinator. "
        "`ewtune coordinator start --credentials DIR` registers the holders' SuperNode keys with the SuperLink.",
    )
    init.add_argument("directory", help="a new or empty directory")
    init.add_argument("--holders", nargs="+", required=True, help="holder ids, e.g. hospital-a bank-b")
    init.add_argument("--address", nargs="+", default=["127.0.0.1", "localhost"], help="addresses holders dial (certificate SANs)")
    init.set_defaults(func=_keys_init)

    from ewtune import demo

    parser = subparsers.add_parser(
        "demo",
        help="a real three-holder federation on loopback: LoRA DP-SGD on MiniLM + MR at certified epsilon 8",
        description=(demo.__doc__ or "").strip().splitlines()[0],
    )
    demo.add_arguments(parser)
    parser.set_defaults(func=demo.run)


def _keys_init(args: argparse.Namespace) -> int:
    from ewtune.keys import init_credentials

    credentials = init_credentials(args.directory, args.holders, args.address)
    print(f"credentials in {credentials.directory}:")
    print(f"  CA                {credentials.ca_certificate}")
    print(f"  SuperLink         {credentials.server_certificate} (SANs: {', '.join(credentials.addresses)})")
    print(f"  coordinator key   {credentials.coordinator_ledger_key}")
    for holder_id, holder in credentials.holders.items():
        print(f"  {holder_id:<17} SuperNode key {holder.supernode_private_key}, ledger key {holder.ledger_key}")
    print(f"  registry          {credentials.registry}")
    return 0
