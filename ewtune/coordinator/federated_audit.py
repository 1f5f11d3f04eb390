"""The coordinator's protocol of an audit run, after its last round (:mod:`ewtune.coordinator.canary_audit` holds
the statistics): score every observed holder's canaries with its claimed q and sigma, fix the scores (saved, and
their SHA-256 sent in the reveal request and recorded), draw the tie-breakers from the operating system's secure
source, and only then ask each holder to reveal its canaries; record the lower bounds per holder and pooled in
the coordinator's ledger (an ``audit`` entry) beside each holder's certified epsilon for the rounds observed.

A failure is stated in the status and changes nothing else: the run's training is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.ledger import Ledger
from ewtune.coordinator.canary_audit import VIEW, Canaries, CanaryObserver, audit_bounds, scores_digest, secure_tie_break
from ewtune.coordinator.config import FederationConfig
from ewtune.coordinator.exchange import exchange
from ewtune.coordinator.planner import HolderPlan
from ewtune.coordinator.round_messages import reveal_message, revealed_canaries
from ewtune.coordinator.run_log import log, reason
from ewtune.federation.contract import RevealRequest


@dataclass(frozen=True)
class AuditRun:
    """What the audit needs of the run: its exchange, its settings, its ledger and what it observed."""

    grid: Grid
    config: FederationConfig
    run_id: str
    ledger: Ledger
    canaries: CanaryObserver
    plans: dict[str, HolderPlan]  # every planned holder, by holder id


def audit(run: AuditRun, resumed: bool) -> dict[str, Any]:
    """The audit's status record (status.json's ``audit``): the bounds, or why there are none."""
    record: dict[str, Any] = {"view": VIEW, "parameter": run.canaries.parameter}
    try:
        if resumed:
            raise InvalidInputError("a resumed audit run is not scored (its canaries' rounds span several runs)")
        record.update(_score_and_reveal(run))
    except Exception as failure:  # noqa: BLE001 - the run's training is done; the audit says why it has no bound
        record.update(state="failed", reason=reason(failure))
        log(f"audit not scored: {reason(failure)}")
    return record


def _score_and_reveal(run: AuditRun) -> dict[str, Any]:
    settings, observed = run.config.settings, run.canaries.observations
    plans = {holder_id: run.plans[holder_id] for holder_id in observed}
    scores = {h: run.canaries.scores(h, p.sampling_rate, p.noise_multiplier, settings.local_steps) for h, p in plans.items()}
    digest = scores_digest(scores)
    tie_break = secure_tie_break(len(next(iter(scores.values()))))
    output = Path(run.config.output_dir)
    np.savez(output / "audit-scores.npz", **{f"scores:{h}": s for h, s in scores.items()},
             **{f"observations:{h}": np.stack(o) for h, o in observed.items()})
    log(f"audit: {len(scores)} holder(s) scored, scores SHA-256 {digest}; asking for the reveals")
    revealed = _reveals(run, plans, digest, len(tie_break))
    holders, pooled = audit_bounds(scores, revealed, settings.delta, tie_break)
    np.savez(output / "audit-canaries.npz", tie_break=tie_break,
             **{f"included:{h}": c.included for h, c in revealed.items()}, **{f"first:{h}": c.first for h, c in revealed.items()})
    seq = run.ledger.record_audit(
        run.run_id, {h: b.to_json() for h, b in holders.items()}, pooled.to_json(),
        facts={"view": VIEW, "parameter": run.canaries.parameter, "scores_sha256": digest},
    )
    certified = {
        holder_id: certified_epsilon(plans[holder_id].round_event(settings.local_steps * len(observed[holder_id])), settings.delta)
        for holder_id in holders
    }
    passed = pooled.epsilon <= max(certified.values()) and all(holders[h].epsilon <= certified[h] for h in holders)
    log("audit: lower bound " + ", ".join(f"{h} {b.epsilon:.3f} (certified {certified[h]:.3f})" for h, b in holders.items())
        + f"; pooled {pooled.epsilon:.3f}" + ("" if passed else "  AUDIT ALARM: above the certified epsilon"))
    return dict(
        state="scored", ledger_seq=seq, scores_sha256=digest, passed=passed,
        holders={h: {**holders[h].to_json(), "epsilon_certified_run": certified[h], "rounds_observed": len(observed[h]),
                     "engine_broken_on_purpose": revealed[h].breakage or None} for h in holders},
        pooled={**pooled.to_json(), "epsilon_certified_run": max(certified.values())},
    )


def _reveals(run: AuditRun, plans: dict[str, HolderPlan], digest: str, block: int) -> dict[str, Canaries]:
    """Each scored holder's canaries, asked for once the scores are fixed."""
    timeouts = run.config.timeouts
    messages = {holder_id: reveal_message(RevealRequest(run.run_id, digest), plan.holder.node_id, timeouts.query)
                for holder_id, plan in plans.items()}
    replies = exchange(run.grid, list(messages.values()), timeouts.query, timeouts.poll_interval)
    return {holder_id: Canaries.from_reveal(holder_id, revealed_canaries(replies.get(m.metadata.message_id)), block)
            for holder_id, m in messages.items()}
