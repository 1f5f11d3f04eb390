"""``ewtune agent start --config agent.toml``: run the holder's agent daemon until SIGTERM or SIGINT.

Imports only the standard library at import time (``ewtune --help`` must not load torch); the handler loads the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path


def register(commands) -> None:
    init = commands.add_parser(
        "init",
        help="create the holder's ledger once (genesis with the lifetime budget) before the first start",
        description="Create the ledger named in agent.toml: a genesis entry signed with the holder's key that "
        "records the lifetime budget, and its anchored head file. Run once per holder; it refuses to touch an "
        "existing ledger. `ewtune agent start` never creates one: a missing ledger stops it, since a new ledger "
        "would restore a full budget.",
    )
    init.add_argument("--config", required=True, help="the holder's agent.toml")
    init.add_argument("--json", action="store_true", help="print the result as JSON")
    init.set_defaults(func=_init)
    parser = commands.add_parser(
        "start",
        help="run the agent daemon: model and data loaded once, policy and ledger enforced, local gRPC API",
        description="Run the data holder's agent daemon until SIGTERM/SIGINT. It serves Describe, Train, "
        "Evaluate and Health on the address of [rpc] in agent.toml and, when agent.toml has a [supernode] table, "
        "starts and supervises the holder's Flower SuperNode.",
    )
    parser.add_argument("--config", required=True, help="the holder's agent.toml")
    parser.add_argument("--no-supernode", action="store_true", help="do not start the [supernode] of agent.toml")
    parser.add_argument("--supernode-log", help="append the SuperNode's output to this file (default: discard)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds a running request may take to finish on shutdown")
    parser.set_defaults(func=_start)


def _init(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.signing import SigningKey
    from ewtune.agent.config_check import check_agent_config
    from ewtune.agent.policy import load_agent_config

    check_agent_config(args.config).raise_if_any()
    config = load_agent_config(args.config)
    key = SigningKey.load(config.signing_key)
    config.ledger_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    budget = {"budget_epsilon": config.policy.budget_epsilon, "budget_delta": config.policy.budget_delta}
    with Ledger.create(config.ledger_path, key, config.holder_id, budget, head_path=config.ledger_head) as ledger:
        head, head_path = ledger.head, ledger.head_path
    result = {
        "holder_id": config.holder_id,
        "ledger": str(config.ledger_path),
        "head_file": str(head_path),
        "head": str(head),
        "public_key": key.public_key_text,
        **budget,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"ledger {config.ledger_path} created for {config.holder_id}: budget epsilon "
              f"{config.policy.budget_epsilon:g}, delta {config.policy.budget_delta:g}; head {head} anchored in {head_path}")
    return 0


def _start(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.config_check import check_agent_config
    from ewtune.agent.daemon import Daemon
    from ewtune.agent.policy import load_agent_config
    from ewtune.agent.rpc import serve
    from ewtune.agent.supernode import SuperNodeSupervisor, supernode_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_agent_config(args.config).raise_if_any()  # every problem of agent.toml at once; nothing starts
    config = load_agent_config(args.config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon = Daemon.from_config(config)
    supervisor = None
    try:
        server = serve(daemon, config.rpc_address, max_message_bytes=config.rpc_max_message_bytes)
        try:
            if config.supernode is not None and not args.no_supernode:
                command = supernode_command(config.supernode, config.rpc_address, config.holder_id)
                log_path = Path(args.supernode_log) if args.supernode_log else None
                supervisor = SuperNodeSupervisor(command, log_path).start()
            print(f"ewtune agent {config.holder_id}: serving on {config.rpc_address}", flush=True)
            while not stop.wait(1.0):
                pass
            print(f"ewtune agent {config.holder_id}: stopping", flush=True)
        finally:
            daemon.request_stop()  # a running training ends at its next step; its steps are committed
            if supervisor is not None:
                supervisor.stop()
            server.stop(grace=args.grace).wait()
    finally:
        daemon.close()
    return 0
