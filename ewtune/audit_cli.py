"""``ewtune audit --federated``: the audit of ``ewtune.agent.audit_cli`` through a real federation on loopback
(:mod:`ewtune.federated_audit`). This module adds its options to the ``audit`` command that ``ewtune.agent.audit_cli``
registers, since only the CLI package may start both the holders' daemons and the coordinator. Imports only
argparse until the command runs."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ewtune.accountant.errors import InvalidInputError


def register(subparsers) -> None:
    parser = subparsers.choices["audit"]
    group = parser.add_argument_group("federated audit (real SuperLink, SuperNodes and agent daemons on 127.0.0.1)")
    group.add_argument("--federated", action="store_true", help="audit a real federation of --holders audit daemons: each "
                       "decides its own canaries on disjoint coordinates, the coordinator scores the updates it "
                       "receives (before aggregation) and records the bounds, per holder and pooled, in its ledger; "
                       "sigma is calibrated by the coordinator's planner to --epsilon (default 1.6525)")
    group.add_argument("--work-dir", help="with --federated: the federation's folder (keys, ledgers, logs; default: a new "
                       "temporary folder, printed)")
    group.add_argument("--broken-engine", metavar="NAME", help="tests and benchmarks, with --federated: the first holder's "
                       "daemon runs this engine broken on purpose ('noise off', 'clipping bypassed', 'every record in every "
                       "step', 'noise 4x too small', 'noise halved', 'noise std sigma, not sigma C'; its commits say so)")
    local = parser.get_default("func")

    def dispatch(args: argparse.Namespace) -> int:
        if args.federated:
            return _federated(args)
        if args.work_dir is not None or args.broken_engine is not None:
            raise InvalidInputError("--work-dir and --broken-engine apply to --federated only")
        return local(args)

    parser.set_defaults(func=dispatch)


def _federated(args: argparse.Namespace) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.audit.breakages import check_breakage
    from ewtune.federated_audit import FederatedAuditConfig, run_federated_audit

    if args.model != "linear" or args.fdp:
        raise InvalidInputError("--model and --dpsgd-test apply to the local audit only")
    for flag, value in (("--seed", args.seed), ("--ledger", args.ledger), ("--noise-multiplier", args.noise_multiplier)):
        if value is not None:
            raise InvalidInputError(f"{flag} does not apply to --federated (daemons draw from the OS's secure source, the "
                                    "coordinator's ledger records the bounds, its planner calibrates sigma to --epsilon)")
    check_breakage(args.broken_engine)
    config = FederatedAuditConfig(
        holders=args.holders, canaries=args.canaries, steps=args.steps, local_steps=args.local_steps,
        sampling_rate=args.sampling_rate, epsilon=1.6525 if args.epsilon is None else args.epsilon, delta=args.delta,
        clip_norm=args.clip_norm, records=args.records, broken_engine=args.broken_engine,
    )
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ewtune-audit-"))
    status = run_federated_audit(config, work_dir, log=None if args.json else print)
    audit = status.get("audit") or {}
    if args.json:
        print(json.dumps({"work_dir": str(work_dir), "state": status.get("state"), "audit": audit,
                          "ledger_audits": status["ledger_audits"]}, indent=2, sort_keys=True))
    else:
        print(_report(work_dir, status, audit))
    return 0 if audit.get("passed") else 1


def _report(work_dir, status, audit) -> str:
    if audit.get("state") != "scored":
        return f"AUDIT NOT SCORED: {audit.get('reason') or status.get('reason') or status.get('state')} (logs in {work_dir})"
    pooled = audit["pooled"]
    lines = [f"federated audit in {work_dir}: {audit['view']}"]
    for holder_id, bound in sorted(audit["holders"].items()) + [("pooled", pooled)]:
        broken = f"  (engine broken on purpose: {bound['engine_broken_on_purpose']})" if bound.get("engine_broken_on_purpose") else ""
        lines.append(f"{holder_id:<10} certified epsilon {bound['epsilon_certified_run']:.4f}  empirical lower bound "
                     f"{bound['epsilon_lower_bound']:.4f} ({bound['confidence']:.0%}, {bound['canaries']} canaries, "
                     f"ceiling {bound['ceiling']:.2f}){broken}")
    lines.append(f"recorded in the coordinator's ledger at seq {audit['ledger_seq']} (`ewtune ledger verify` shows it)")
    lines.append("audit passed: every lower bound is at most its certified epsilon" if audit["passed"]
                 else "AUDIT FAILED: a lower bound exceeds the certified epsilon: an engine leaks more than accounted")
    return "\n".join(lines)
