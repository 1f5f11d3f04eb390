"""``ewtune coordinator start|run|status|serve-status``: the coordinator operator's commands.

Imports no torch, transformers or flwr: the Flower processes it starts are subprocesses.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.coordinator import superlink
from ewtune.coordinator.config import load_federation_config
from ewtune.coordinator.config_check import check_federation_config
from ewtune.coordinator.run_progress import RunProgress, missing_evaluations
from ewtune.coordinator.run_status import FINAL_STATES
from ewtune.coordinator.status_server import StatusServer, status_token
from ewtune.federation.processes import flower_environment, stop_process_group
from ewtune.federation.progress import Progress, add_quiet_flag


def register(subparsers) -> None:
    coordinator = subparsers.add_parser("coordinator", help="coordinator commands: the Flower SuperLink, federated runs, status")
    commands = coordinator.add_subparsers(dest="coordinator_command", metavar="COORDINATOR_COMMAND", required=True)

    start = commands.add_parser(
        "start",
        help="run the Flower SuperLink (TLS, SuperNode authentication, a database) and register the holders' keys",
        description="Run the SuperLink until SIGTERM/SIGINT: TLS with the credentials of `ewtune keys init`, SuperNode "
        "authentication, a SQLite database, telemetry and runtime dependency installation off. The Control API shares "
        "the port and is unauthenticated in OSS Flower: keep --host 127.0.0.1 and expose only /v1/fleet/ to holders.",
    )
    start.add_argument("--credentials", required=True, help="the directory written by `ewtune keys init`")
    start.add_argument("--state-dir", required=True, help="directory for the database, logs and the flwr connection")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only; see --behind-fleet-proxy)")
    start.add_argument("--port", type=int, default=9092)
    start.add_argument(
        "--behind-fleet-proxy",
        action="store_true",
        help="allow a non-loopback --host: you state that a reverse proxy in front passes only the Fleet API "
        "(/v1/fleet/) to holders, since anyone reaching the unauthenticated Control API can run code here",
    )
    start.add_argument("--no-register", action="store_true", help="do not register the holders listed in the credentials")
    start.set_defaults(func=_start)

    run = commands.add_parser(
        "run",
        help="submit a federated run (federation.toml) and follow it",
        description="Submit the job with `flwr run` and show its progress on stderr until it ends (each holder's plan, "
        "each round: updates committed and aborted, its seconds, the certified epsilon spent), then the per-holder "
        "table on stdout.",
    )
    run.add_argument("--config", required=True, help="federation.toml")
    run.add_argument("--state-dir", required=True, help="the --state-dir of `ewtune coordinator start`")
    run.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up following after this many seconds")
    run.add_argument("--status-port", type=int, metavar="PORT",
                     help="also serve the read-only status page on 127.0.0.1:PORT while the run goes on")
    run.add_argument("--json", action="store_true", help="print the final status as one JSON document on stdout; progress as JSON lines on stderr")
    add_quiet_flag(run)
    run.set_defaults(func=_run)

    serve = commands.add_parser(
        "serve-status",
        help="serve a read-only status page and status.json of the run (loopback; TLS when exposed)",
        description="Serve the run's status page (holders, their state, certified epsilon spent and left, round, "
        "accuracy so far, recent events; it refreshes every 2 s) and GET /status.json until SIGTERM/SIGINT. "
        "Read-only: every method but GET and HEAD is answered 405. Binds to 127.0.0.1 unless --host; any other "
        "address needs TLS with the SuperLink certificate of --credentials, and every request the token of "
        "--token-file (HTTP Basic password, any user name, or 'Authorization: Bearer TOKEN'; 401 without it). "
        "At most 32 connections at a time, each closed 5 s after it opened.",
    )
    serve.add_argument("--config", required=True, help="federation.toml")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8480, help="port (default 8480)")
    serve.add_argument("--credentials", metavar="DIR",
                       help="serve over TLS with the SuperLink certificate and key of `ewtune keys init` DIR")
    serve.add_argument("--token-file", metavar="FILE",
                       help="the token required off loopback; made (0600) when missing (default: status-token beside status.json)")
    serve.set_defaults(func=_serve_status)

    status = commands.add_parser("status", help="rounds, holders, budgets and accuracy of a run", description="Show the status of the run of federation.toml.")
    status.add_argument("--config", required=True, help="federation.toml")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)


def _start(args: argparse.Namespace) -> int:
    from ewtune.coordinator.credentials import load_credentials  # cryptography: +78 ms on every `ewtune` command if at the top

    superlink.check_bind_address(args.host, args.behind_fleet_proxy)
    credentials = load_credentials(args.credentials)
    superlink.check_port_free(args.host, args.port)
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    flwr_home = state / "flwr-home"
    superlink.write_connection(flwr_home, f"{args.host}:{args.port}", credentials.ca_certificate)
    command = superlink.superlink_command(
        credentials.ca_certificate, credentials.server_certificate, credentials.server_key, state / "superlink.db", args.host, args.port
    )
    stopping = []
    previous_handlers = {signum: signal.signal(signum, lambda *_: stopping.append(True)) for signum in (signal.SIGTERM, signal.SIGINT)}
    with open(state / "superlink.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=flower_environment(flwr_home), cwd=state, start_new_session=True)
    try:
        try:
            superlink.wait_for_port(args.host, args.port, 60, process)
        except EwtuneError as failure:
            log_path = state / "superlink.log"
            raise EwtuneError(f"the SuperLink did not start: {failure}; its log {log_path} ends: {_last_line(log_path)}") from None
        print(f"ewtune coordinator: SuperLink on {args.host}:{args.port} (TLS, SuperNode authentication), log {state / 'superlink.log'}", flush=True)
        if not args.no_register:
            for holder_id, public_key in credentials.supernode_public_keys.items():
                try:
                    node_id = superlink.register_supernode(flwr_home, public_key, holder_id)
                    print(f"registered {holder_id}: node {node_id}", flush=True)
                except EwtuneError as failure:
                    print(f"not registered {holder_id}: {failure}", flush=True)
        while not stopping and process.poll() is None:
            time.sleep(0.5)
        if process.poll() is not None:
            raise EwtuneError(f"the SuperLink exited with code {process.returncode}; see {state / 'superlink.log'}")
    finally:
        stop_process_group(process)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return 0


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1].strip() if lines else "(empty)"


def _run(args: argparse.Namespace) -> int:
    check_federation_config(args.config).raise_if_any()  # every problem of federation.toml at once
    config = load_federation_config(args.config)
    flwr_home = Path(args.state_dir).resolve() / "flwr-home"
    if not (flwr_home / "config.toml").is_file():
        raise InvalidInputError(f"{flwr_home} has no connection: start the SuperLink with `ewtune coordinator start --state-dir {args.state_dir}`")
    superlink.check_superlink_reachable(flwr_home, args.state_dir)
    log_path = config.output_dir.parent / "flwr-run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for flower_run_id in superlink.stop_unfinished_runs(flwr_home, config.output_dir):
        print(f"stopped Flower run {flower_run_id}, an earlier start of this unfinished federation: it resumes", file=sys.stderr, flush=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(superlink.run_command(config.path), stdout=log, stderr=subprocess.STDOUT, env=flower_environment(flwr_home), start_new_session=True)
    page, progress = None, Progress.from_args(args)
    try:
        if args.status_port is not None:
            page = StatusServer(config.output_dir / "status.json", port=args.status_port).start()
            progress.event("status_page", f"status page: {page.url}", url=page.url)
        try:
            status = follow_run(process, config.output_dir / "status.json", RunProgress(progress), args.timeout)
        except EwtuneError as failure:
            raise EwtuneError(f"{failure}; its log {log_path} ends: {_last_line(log_path)}") from None
    finally:
        progress.close()
        stop_process_group(process)
        if page is not None:
            page.stop()
    print(json.dumps(status, indent=2) if args.json else status_table(status))
    return 0 if status.get("state") in ("finished", "stopped") else 1


def _status(args: argparse.Namespace) -> int:
    config = load_federation_config(args.config)
    path = config.output_dir / "status.json"
    if not path.is_file():
        raise InvalidInputError(f"no run has written {path} yet")
    try:
        status = json.loads(path.read_text())
    except ValueError as bad:
        raise InvalidInputError(f"{path} is not valid JSON: {bad}") from None
    print(json.dumps(status, indent=2) if args.json else status_table(status))
    return 1 if status.get("state") == "failed" else 0  # scripts can tell a failed run from one that ran


def _serve_status(args: argparse.Namespace) -> int:
    config = load_federation_config(args.config)
    token_file = Path(args.token_file) if args.token_file else config.output_dir / "status-token"
    token = None if superlink.is_loopback(args.host) and not args.token_file else status_token(token_file)
    tls = {}
    if args.credentials is not None:
        from ewtune.coordinator.credentials import load_credentials  # cryptography: +78 ms on every `ewtune` command if at the top

        credentials = load_credentials(args.credentials)
        tls = {"certificate": credentials.server_certificate, "key": credentials.server_key}
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with StatusServer(config.output_dir / "status.json", args.host, args.port, token=token, **tls) as page:
        access = f", token in {token_file}" if token else ""
        print(f"status page of {config.output_dir / 'status.json'}: {page.url} (read-only{access})", flush=True)
        stopping.wait()
    return 0


def follow_run(process: subprocess.Popen, status_path: Path, on_status: Callable[[dict], None] | None, timeout: float) -> dict[str, Any]:
    """Poll ``status.json`` (calling ``on_status`` on every change) until the ServerApp writes a final state
    or ``flwr run`` exits; a status written by an earlier run is ignored."""
    previous = status_path.stat().st_mtime_ns if status_path.exists() else None
    deadline = time.monotonic() + timeout
    last_text, status = None, {}
    while True:
        if status_path.exists() and status_path.stat().st_mtime_ns != previous:
            text = status_path.read_text()
            if text != last_text:
                last_text, status = text, json.loads(text)
                if on_status is not None:
                    on_status(status)
        if status.get("state") in FINAL_STATES:
            return status
        if process.poll() is not None:
            time.sleep(1.0)  # the final status is written before the ServerApp returns; allow the file to land
            if status_path.exists() and status_path.read_text() != last_text:
                status = json.loads(status_path.read_text())
            if status.get("state") not in FINAL_STATES:
                where = "before the ServerApp wrote any status" if not status else f"while the run was {status.get('state')!r}"
                raise EwtuneError(f"`flwr run` exited with code {process.returncode} {where}")
            return status
        if time.monotonic() > deadline:
            raise EwtuneError(f"the run did not finish within {timeout:g} s")
        time.sleep(0.5)


def _evaluation(round: str, holder: dict[str, Any]) -> str:
    """``round:accuracy/f1 (majority)`` from a holder's private evaluation of that round's global model, or
    ``round:ppl perplexity`` from a causal LM's."""
    metrics = holder.get("evaluation", {}).get(round, {})
    if round in holder.get("perplexity", {}):
        return f"{int(round)}:ppl {holder['perplexity'][round]:.1f}"
    text = f"{int(round)}:{holder['accuracy'][round]:.3f}"
    if "f1" in metrics:
        text += f"/{metrics['f1']:.3f}"
    if "majority_baseline" in metrics:
        text += f" ({metrics['majority_baseline']:.3f})"
    return text


COORDINATOR_SPEND_NOTE = (
    "certified eps here: every event this coordinator's ledger committed for the holder, in all its runs; the "
    "holder's own lifetime spend (its ledger: local training, evaluations, other federations) can be higher and "
    "is what its agent enforces: `ewtune agent status` on the holder's side"
)


def status_table(status: dict[str, Any]) -> str:
    """The per-holder table: certified epsilon (the guarantee), the Edgeworth estimate, RDP, rounds, accuracy.
    Its epsilons are those of the coordinator's ledger (see :data:`COORDINATOR_SPEND_NOTE`): a holder that spent
    its budget elsewhere shows only what this coordinator recorded."""
    lines = [
        f"run {status.get('run_id')}: {status.get('state')}"
        + (f" ({status['reason']})" if status.get("reason") else "")
        + f", {status.get('rounds_completed', 0)}/{status.get('rounds_planned')} rounds"
        + (f" (resumed after {', '.join(status['resumed']['from_runs'])})" if status.get("resumed") else ""),
        "",
        "| holder | budget eps | certified eps (this coordinator's ledger) | Edgeworth (estimate) | RDP eps | sigma | rounds | "
        "private evaluation per round (0 = initial): accuracy / macro F1 (majority-class baseline), or a causal LM's "
        "perplexity (ppl), noised by the holder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for holder_id, holder in sorted(status.get("holders", {}).items()):
        evaluated = {**holder.get("accuracy", {}), **holder.get("perplexity", {})}
        accuracy = " ".join([_evaluation(r, holder) for r in sorted(evaluated, key=int)] + [missing_evaluations(holder)]).strip()
        lines.append(
            f"| {holder_id} | {_fmt(holder.get('budget_epsilon'))} | {_fmt(holder.get('epsilon_certified'))} | "
            f"{_fmt(holder.get('epsilon_edgeworth_estimate'))} | {_fmt(holder.get('epsilon_rdp'))} | {_fmt(holder.get('noise_multiplier'))} | "
            f"{holder.get('rounds_committed', 0)} | {accuracy or '-'} |"
        )
    for holder_id, reason in sorted(status.get("skipped", {}).items()):
        lines.append(f"| {holder_id} | skipped: {reason} | | | | | | |")
    warnings = [f"WARNING: {holder['warning']}" for _, holder in sorted(status.get("holders", {}).items()) if holder.get("warning")]
    return "\n".join(lines + [""] + warnings + [COORDINATOR_SPEND_NOTE])


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
