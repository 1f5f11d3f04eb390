"""``ewtune audit``: train the real DP-SGD engine with white-box canaries and show, beside the certified epsilon
and the Edgeworth estimate, the empirical lower bound of the one-run audit (Steinke, Nasr, Jagielski 2023) and
the checks the bound cannot make (``ewtune/agent/audit``). Exit 0 when the bound stays at or below the certified epsilon
and every check passes, 1 otherwise. Imports only the standard library and ewtune.accountant.errors until the command runs."""

from __future__ import annotations

import argparse
import json
import time

from ewtune.accountant.errors import InvalidInputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="empirical privacy audit: a measured lower bound on epsilon next to the certified one",
        description="Run DP-SGD (the agent's sampler, clipper, noise and step) on synthetic records with N white-box "
        "Dirac canaries, half of them included at random, and bound epsilon from below by how well each canary's "
        "coordinate in the released updates tells whether it was included: Steinke, Nasr and Jagielski's one-run "
        "audit at 95%% confidence, Bonferroni-corrected over a fixed grid of guess counts. A lower bound above the "
        "certified epsilon means the engine does not do what the accountant assumes. The bound cannot exceed a "
        "ceiling set by N (about 5.2 at 1000 canaries), so it can refute small claims only (epsilon about 1.6: "
        "the defaults). Exit 0 when the bound is at most the certified epsilon and every check passes, 1 otherwise.",
    )
    parser.add_argument("--canaries", type=int, default=1000, help="canaries in all, split over the holders (default 1000)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--epsilon", type=float, help="calibrate sigma to this certified epsilon")
    noise.add_argument("--noise-multiplier", type=float, help="sigma (default 2: certified epsilon 1.65 at the defaults)")
    parser.add_argument("--steps", type=int, default=50, help="DP-SGD steps per holder (default 50)")
    parser.add_argument("--sampling-rate", type=float, default=0.1, help="Poisson rate q (default 0.1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="per-example clip norm C (default 1)")
    parser.add_argument("--records", type=int, default=1000, help="synthetic records per holder (default 1000)")
    parser.add_argument("--holders", type=int, default=1, help="holders of a simulated federation, each with its own "
                        "canaries on disjoint coordinates, scored from their round updates (default 1)")
    parser.add_argument("--local-steps", type=int, default=1, help="steps per round; the audit sees one update per "
                        "round (default 1: every step)")
    parser.add_argument("--seed", type=int, default=None, help="tests only: seeded, predictable batches, noise and "
                        "canaries (default: the operating system's secure source)")
    parser.add_argument("--ledger", default=None, help="charge the run to this holder ledger and record the lower bound "
                        "in its commit (one holder only)")
    parser.add_argument("--signing-key", default=None, help="the ledger's Ed25519 key (with --ledger)")
    parser.add_argument("--dpsgd-test", "--fdp", dest="fdp", action="store_true", help="also the f-DP one-run test of "
                        "the DP-SGD hypothesis (Mahloujifar, Melis, Chaudhuri 2025): the epsilon of the least private "
                        "DP-SGD(q, T, sigma') curve the same canaries refute. Not a lower bound on epsilon: it tests "
                        "whether the engine is the DP-SGD it claims to be (randomized response at epsilon 2 refutes "
                        "DP-SGD curves of epsilon above 2); about 10 s more")
    parser.add_argument("--model", choices=("linear", "transformer"), default="linear", help="where the canaries sit: "
                        "an audit block beside a linear classifier (default), or coordinates of a feed-forward weight "
                        "of a tiny random BERT that the real records train too (slower: about 30 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args) -> int:
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.agent.train_cli import open_ledger

    if args.ledger is not None and args.holders != 1:
        raise InvalidInputError("--ledger records one holder's run: use it with --holders 1")
    config = _config(args)
    ledger = open_ledger(args)
    try:
        result = _run(config, ledger)
    finally:
        if ledger is not None:
            ledger.close()
    print(json.dumps(result.to_json(), indent=2, sort_keys=True) if args.json else _report(result))
    return 0 if result.passed else 1


def ledger_record(result) -> dict:
    """What an audit commit's ``extra.audit`` holds: the bound, its confidence and design, the run's own
    certified epsilon (the commit's ``epsilon_certified`` is the holder's lifetime spend), the checks."""
    bound = result.pooled.to_json()
    return {
        "epsilon_lower_bound": bound["epsilon_lower_bound"],
        "confidence": bound["confidence"],
        "canaries": bound["canaries"],
        "ceiling": bound["ceiling"],
        "epsilon_certified_run": result.epsilon_certified,
        "checks_ok": result.checks_ok,
        "method": bound["method"],
    }


def _config(args):
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.accountant.sampling import executable_sampling_rate
    from ewtune.agent.audit.run import AuditConfig

    if args.epsilon is not None:
        if not 0.0 < args.sampling_rate <= 1.0:
            raise InvalidInputError(f"--sampling-rate must be in (0, 1], got {args.sampling_rate!r}")
        if args.steps < 1:
            raise InvalidInputError(f"--steps must be at least 1, got {args.steps}")
        phases = [(executable_sampling_rate(args.sampling_rate), args.steps)]
        sigma = calibrate_noise_multiplier(args.epsilon, args.delta, phases).noise_multiplier
    else:
        sigma = 2.0 if args.noise_multiplier is None else args.noise_multiplier
    return AuditConfig(
        canaries=args.canaries,
        sampling_rate=args.sampling_rate,
        steps=args.steps,
        noise_multiplier=sigma,
        clip_norm=args.clip_norm,
        delta=args.delta,
        records=args.records,
        holders=args.holders,
        local_steps=args.local_steps,
        seed=args.seed,
        fdp=args.fdp,
        model=args.model,
    )


def _run(config, ledger):
    """The audit; with a ledger, its event reserved first and committed with the bound (aborted if no step ran)."""
    # deferred: ewtune/cli.py imports this module for every command; only the command run loads its parts
    from ewtune.accountant.events import PoissonGaussianEvent
    from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE
    from ewtune.accountant.sampling import executable_sampling_rate
    from ewtune.agent.audit.run import run_audit

    if ledger is None:
        return run_audit(config)
    planned = PoissonGaussianEvent(executable_sampling_rate(config.sampling_rate), config.noise_multiplier, config.steps)
    reservation = ledger.reserve(ledger.writer_id, f"audit-{time.strftime('%Y%m%dT%H%M%S')}", 0, planned)
    try:
        result = run_audit(config)
    except BaseException:
        ledger.abort(reservation, "the audit failed before releasing its figures")
        raise
    extra = {"purpose": AUDIT_PURPOSE, "randomness": result.randomness, "audit": ledger_record(result)}
    ledger.commit(reservation, result.holders[0].event, extra=extra)
    return result


def _report(result) -> str:
    config, bound = result.config, result.pooled
    lines = [
        f"certified epsilon      {result.epsilon_certified:.4f}  the guarantee (delta {config.delta:g}; q {config.sampling_rate:g}, "
        f"sigma {config.noise_multiplier:.4g}, {config.steps} steps, C {config.clip_norm:g})",
        f"Edgeworth estimate     {result.epsilon_edgeworth:.4f}  an estimate, not a guarantee",
        f"empirical lower bound  {bound.epsilon:.4f}  epsilon >= this with {bound.confidence:.0%} confidence "
        f"({bound.canaries} white-box canaries, {bound.included} included; the largest this audit can show is {bound.ceiling:.2f})",
    ]
    if result.fdp is not None:
        fdp = result.fdp
        versus = f"less private than DP-SGD(q, T, sigma' {fdp.noise_multiplier:.4g})" if fdp.noise_multiplier else "no curve of the grid refuted"
        lines.append(f"DP-SGD curve refuted   {fdp.epsilon:.4f}  {versus} with {fdp.confidence:.0%} confidence (f-DP test of "
                     f"the DP-SGD hypothesis, Mahloujifar et al. 2025; not a lower bound on epsilon; at most {fdp.ceiling:.2f})")
    if len(result.holders) > 1:
        lines.append(f"  per holder ({config.local_steps} local steps per round, scored from each round's update): "
                     + ", ".join(f"{h.holder}: {h.bound.epsilon:.4f}" for h in result.holders))
    for holder in result.holders:
        for check in holder.checks:
            lines.append(f"check {check.name:<20} {'OK' if check.ok else 'FAILED'}  " + _figures(check)
                         + (f"  (holder {holder.holder})" if len(result.holders) > 1 else ""))
    if max(bound.epsilon, result.fdp.epsilon if result.fdp is not None else 0.0) > result.epsilon_certified:
        lines.append("AUDIT FAILED: the lower bound or the refuted DP-SGD curve exceeds the certified epsilon: the engine "
                     "is not the DP-SGD accounted")
    elif not result.checks_ok:
        lines.append("AUDIT FAILED: a check failed (above)")
    else:
        lines.append("audit passed: the lower bound is at most the certified epsilon and every check holds")
    if result.randomness != "os-secure":
        lines.append(f"randomness: {result.randomness} (seeded, predictable: for tests only)")
    return "\n".join(lines)


def _figures(check) -> str:
    return ", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}" for name, value in check.figures.items())
