"""``ewtune keys init|add-holder``, ``ewtune weights init`` and ``ewtune demo``. Imports only the standard library and ewtune.accountant.errors at import time."""

from __future__ import annotations

import argparse
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="coordinator credentials: CA, SuperLink certificate, ledger key, holder registry")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    init = key_commands.add_parser(
        "init",
        help="create the coordinator's credentials and an empty holder registry in a new directory",
        description="Write a P-384 CA, the SuperLink certificate (SANs for --address), the coordinator's Ed25519 ledger "
        "key and an empty holder registry (supernodes.json). Holders generate their own keys "
        "(`ewtune agent keys init DIR --holder-id ID` on their machines); add each holder's public card with "
        "`ewtune keys add-holder`.",
    )
    init.add_argument("directory", help="a new or empty directory")
    init.add_argument("--holders", nargs="+", help=argparse.SUPPRESS)  # the old flow: refused with a pointer
    init.add_argument("--address", nargs="+", default=["127.0.0.1", "localhost"], help="addresses holders dial (certificate SANs)")
    init.set_defaults(func=_keys_init)
    add = key_commands.add_parser(
        "add-holder",
        help="register a holder's public card (holder.json from `ewtune agent keys init`)",
        description="Append the holder's card {holder_id, supernode_public_key, ledger_public_key} to the registry of "
        "DIR (supernodes.json): it pins the holder's SuperNode key to its id and its ledger key. A holder id, SuperNode "
        "key or ledger key already registered is refused. `ewtune coordinator start` registers the SuperNode keys with "
        "the SuperLink; the ServerApp reads the registry ([coordinator] registry of federation.toml).",
    )
    add.add_argument("directory", help="the directory of `ewtune keys init`")
    add.add_argument("card", help="the holder's holder.json")
    add.set_defaults(func=_keys_add_holder)

    weights = subparsers.add_parser("weights", help="the global model's initial trainable weights for `ewtune coordinator run`")
    weight_commands = weights.add_subparsers(dest="weights_command", metavar="WEIGHTS_COMMAND", required=True)
    init_weights = weight_commands.add_parser(
        "init",
        help="write the initial trainable parameters ([model] initial_weights of federation.toml)",
        description="Build the holders' model recipe (the same as agent.toml's [training]) and save its trainable "
        "parameters in safetensors: LoRA factors and the classifier head, every parameter with --mode full, or the "
        "classifier head alone with --mode head (the recommended probe: a linear head on the frozen encoder); with "
        "--tune-layers K only the top K encoder layers' (as the holders' [training] tune_layers).",
    )
    init_weights.add_argument("output", help="the .safetensors file to write")
    init_weights.add_argument("--model-dir", required=True, help="the base model directory the holders use")
    init_weights.add_argument("--task", default="classification", choices=["classification", "causal_lm"])
    init_weights.add_argument("--num-labels", type=int, default=2)
    init_weights.add_argument("--mode", default="lora", choices=["lora", "full", "head"])
    init_weights.add_argument("--lora-rank", type=int, default=8)
    init_weights.add_argument("--lora-alpha", type=float, default=16.0)
    init_weights.add_argument("--lora-target-modules", nargs="+", help="default: the holders' default for the model type")
    init_weights.add_argument("--tune-layers", type=int, default=0, metavar="K",
                              help="the holders tune only the top K encoder layers and the head (default 0: the whole model)")
    init_weights.add_argument("--seed", type=int, default=0)
    init_weights.set_defaults(func=_weights_init)

    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune import demo

    parser = subparsers.add_parser(
        "demo",
        help="a real three-holder federation on loopback: LoRA DP-SGD on MiniLM + MR at certified epsilon 8",
        description=(demo.__doc__ or "").strip().splitlines()[0],
    )
    demo.add_arguments(parser)
    parser.set_defaults(func=demo.run)


def _keys_init(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.coordinator.credentials import init_credentials

    if args.holders:
        raise InvalidInputError(
            "--holders is gone: holders generate their own keys (`ewtune agent keys init DIR --holder-id ID` on their "
            "machines) and you register each card with `ewtune keys add-holder DIR holder.json`"
        )
    credentials = init_credentials(args.directory, args.address)
    print(f"credentials in {credentials.directory}:")
    print(f"  CA                {credentials.ca_certificate}")
    print(f"  SuperLink         {credentials.server_certificate} (SANs: {', '.join(credentials.addresses)})")
    print(f"  coordinator key   {credentials.coordinator_ledger_key}")
    print(f"  registry          {credentials.registry} (empty: add holders with `ewtune keys add-holder {credentials.directory} holder.json`)")
    return 0


def _keys_add_holder(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.coordinator.credentials import add_holder, load_credentials

    holder = add_holder(args.directory, args.card)
    registry = load_credentials(args.directory).registry
    print(f"registered holder {holder.holder_id} in {registry}: SuperNode key {holder.supernode_public_key}, ledger key {holder.ledger_public_key}")
    return 0


def _weights_init(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.local_federation import initial_weights

    training = {
        "task": args.task, "mode": args.mode, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
        "lora_target_modules": args.lora_target_modules, "seed": args.seed, "tune_layers": args.tune_layers,
    }
    path = initial_weights(Path(args.model_dir), Path(args.output), training, num_labels=args.num_labels)
    print(f"initial trainable weights written to {path}")
    return 0
