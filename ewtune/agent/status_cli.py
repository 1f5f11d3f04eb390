"""``ewtune agent status --config agent.toml``: the holder's budget, spend, open reservations and ledger head.

Reads the ledger file (verified against the holder's own key and its anchored head) and the daemon's
progress journal, so it works whether the daemon runs or not. Imports only the standard library until it runs.
"""

from __future__ import annotations

import argparse
import json


def register(commands) -> None:
    status = commands.add_parser(
        "status",
        help="budget, certified spend (Edgeworth estimate beside it), open reservations, ledger head",
        description="Verify the holder's ledger (chain, signatures, every epsilon, its anchored head, the key "
        "of agent.toml pinned) and show the lifetime budget, the certified epsilon spent (the guarantee) with "
        "the Edgeworth estimate beside it, the budget left, each open reservation with what the daemon's "
        "progress journal recorded for it (what its next start will commit or abort), and the ledger head. "
        "Exit 0 when the ledger verifies, 1 when it does not (figures withheld), 2 on unreadable input.",
    )
    status.add_argument("--config", required=True, help="the holder's agent.toml")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)


def holder_status(config) -> dict:
    """The status of the holder of ``config`` (an :class:`ewtune.agent.policy.AgentConfig`) as a JSON object."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.ledger_head import default_head_path
    from ewtune.accountant.ledger_lines import entry_hash, parse_line, split_lines
    from ewtune.accountant.signing import SigningKey
    from ewtune.accountant.verify import verify_ledger
    from ewtune.agent.recovery import journal_path, read_progress

    public_key = SigningKey.load(config.signing_key).public_key_text
    head_file = config.ledger_head or default_head_path(config.ledger_path)
    report = verify_ledger(config.ledger_path, public_key, head_path=head_file)
    status = {"holder_id": config.holder_id, "ledger": str(config.ledger_path), "ok": report.ok,
              "verification": report.summary()}
    if not report.ok:
        return status
    lines = split_lines(config.ledger_path.read_bytes()).lines
    last = parse_line(lines[-1])
    spend = report.holders[config.holder_id]
    progress = read_progress(journal_path(config.ledger_path))
    open_rows = [row for row in report.reservations if row["status"] == "open"]
    for row in open_rows:
        row["journal"] = _journal_note(progress, row["seq"])
    status.update({
        "budget_epsilon": spend.budget_epsilon,
        "budget_delta": spend.budget_delta,
        "spent_epsilon_certified": spend.epsilon_certified,
        "spent_epsilon_edgeworth_estimate": spend.epsilon_edgeworth,
        "budget_left_epsilon": spend.budget_left_epsilon,
        "committed_releases": len(spend.committed_events),
        "open_reservations": open_rows,
        "head": f"{last['seq']}:{entry_hash(last)}",
        "head_file": str(head_file),
    })
    return status


def _journal_note(progress, seq: int) -> str:
    """What the next start of the daemon will do with open reservation ``seq`` (see ewtune.agent.recovery)."""
    if progress is None or progress.reservation != seq:
        return "no progress record: the next start charges it in full"
    if progress.receipt is not None:
        return "receipt signed: the next start commits it"
    if progress.steps:
        return f"{progress.steps} step(s) recorded: the next start commits them (nothing was released)"
    return "no step ran: the next start aborts it"


def _status(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.policy import load_agent_config

    status = holder_status(load_agent_config(args.config))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    elif not status["ok"]:
        print(status["verification"])
        print("INVALID LEDGER, figures withheld")
    else:
        print("\n".join(_lines(status)))
    return 0 if status["ok"] else 1


def _lines(status: dict) -> list[str]:
    estimate = status["spent_epsilon_edgeworth_estimate"]
    lines = [
        f"holder {status['holder_id']}: ledger {status['ledger']} verified",
        f"  budget                                epsilon {status['budget_epsilon']:g} at delta {status['budget_delta']:g}",
        f"  certified epsilon spent (guarantee)   {status['spent_epsilon_certified']:.6f}",
        f"  Edgeworth estimate (not a guarantee)  {'n/a' if estimate is None else f'{estimate:.6f}'}",
        f"  budget left                           epsilon {status['budget_left_epsilon']:.6f}",
        f"  committed releases                    {status['committed_releases']}",
        f"  ledger head                           {status['head']} (anchored in {status['head_file']})",
        f"  open reservations (counted as spent)  {len(status['open_reservations']) or 'none'}",
    ]
    for row in status["open_reservations"]:
        steps = sum(mechanism["steps"] for mechanism in row["planned"])
        lines.append(f"    seq {row['seq']}: run {row['run_id']} round {row['round']}, {steps} step(s) reserved; "
                     f"{row['journal']}")
    return lines
