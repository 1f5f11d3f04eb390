"""``ewtune agent start --config agent.toml``: run the holder's agent daemon until SIGTERM or SIGINT.

Imports only argparse at import time (``ewtune --help`` must not load torch); the handler loads the rest.
"""

from __future__ import annotations

import argparse


def register(commands) -> None:
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


def _start(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from pathlib import Path

    from agent.daemon import Daemon
    from agent.policy import load_agent_config
    from agent.rpc import serve
    from agent.supernode import SuperNodeSupervisor, supernode_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_agent_config(args.config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon = Daemon.from_config(config)
    supervisor = None
    try:
        server = serve(daemon, config.rpc_address)
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
