"""``ewtune audit --federated``: the one-run audit (Steinke, Nasr, Jagielski 2023) of a real federation on
loopback: a SuperLink, one audit daemon with its SuperNode per holder (:mod:`ewtune.agent.audit.holder`: synthetic
records, Dirac canaries on the holder's own disjoint coordinates of the audit block, inclusion bits from the
operating system's secure source), the coordinator's ServerApp observing each update as received and scoring
it (:mod:`ewtune.coordinator.canary_audit`). The planner calibrates each holder's sigma to the target epsilon as in any
run; the bounds, per holder and pooled, land in the coordinator's ledger, verified here with its pinned key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.one_run_audit import check_audit_layout
from ewtune.accountant.verify import verify_ledger
from ewtune.agent import models
from ewtune.agent.audit.holder import audit_model
from ewtune.coordinator.checkpoints import save_weights
from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation

AUDIT_PARAMETER = "audit.weight"
# Audit updates are SGD steps on noise by design; the AdamW-derived default of the update-norm check does not apply.
MAX_UPDATE_NORM = 100.0


@dataclass(frozen=True)
class FederatedAuditConfig:
    holders: int = 3
    canaries: int = 1500  # over all holders, split into disjoint ranges
    steps: int = 50  # per holder: rounds x local steps
    local_steps: int = 10
    sampling_rate: float = 0.1
    epsilon: float = 1.6525  # the target the planner calibrates sigma to (about 2 at the defaults)
    delta: float = 1e-5
    clip_norm: float = 1.0
    learning_rate: float = 0.5
    records: int = 1000  # synthetic records per holder
    features: int = 20
    broken_engine: str | None = None  # tests and benchmarks: the first holder's engine broken on purpose

    def __post_init__(self) -> None:
        check_audit_layout(self, ("holders", "canaries", "steps", "local_steps", "records", "features"))
        if not 0.0 < self.sampling_rate <= 1.0:
            raise InvalidInputError(f"sampling rate must be in (0, 1], got {self.sampling_rate!r}")
        for name in ("epsilon", "clip_norm", "learning_rate"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < math.inf):
                raise InvalidInputError(f"{name.replace('_', ' ')} must be a finite number > 0")

    def holder_setups(self) -> list[HolderSetup]:
        """One audit daemon per holder, its canaries on its own range of the block."""
        shares = np.array_split(np.arange(self.canaries), self.holders)
        return [
            HolderSetup(
                f"audit-{index}", None, budget_epsilon=max(10.0, 2 * self.epsilon), budget_delta=self.delta,
                policy={"audit_runs": True},
                audit={
                    "block": self.canaries, "first": int(share[0]), "count": len(share), "records": self.records,
                    "features": self.features, **({"breakage": self.broken_engine} if index == 0 and self.broken_engine else {}),
                },
            )
            for index, share in enumerate(shares)
        ]

    def job(self, initial_weights: Path) -> FederationJob:
        return FederationJob(
            federation={
                "name": "audit", "rounds": self.steps // self.local_steps, "local_steps": self.local_steps,
                "expected_batch_size": self.sampling_rate * self.records, "clip_norm": self.clip_norm,
                "learning_rate": self.learning_rate, "target_epsilon": self.epsilon, "delta": self.delta,
                "min_holders": self.holders, "expected_holders": self.holders, "max_update_norm": MAX_UPDATE_NORM,
                "max_weight_share": 1.0,
            },
            model={"initial_weights": str(initial_weights), "mode": "full", "evaluate": "never"},
            timeouts={"nodes": 240, "query": 120, "round": 300},
            audit={"parameter": AUDIT_PARAMETER},
        )


def run_federated_audit(config: FederatedAuditConfig, work_dir: Path, log: Callable[[str], None] | None = None,
                        timeout: float = 1800) -> dict[str, Any]:
    """Run the audit federation in ``work_dir``; returns the run's status (its ``audit`` record: the bounds
    per holder and pooled) with ``ledger_audits``: the coordinator ledger's audit entry as verified."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = audit_model(config.canaries, config.features)
    initial = save_weights(work_dir / "initial.safetensors", {n: t.numpy() for n, t in models.trainable_state(model).items()})
    with LocalFederation(work_dir, config.holder_setups(), log=log) as federation:
        federation.start()
        federation.wait_for_daemons()
        status = federation.run(config.job(initial), timeout=timeout)
    report = verify_ledger(work_dir / "coordinator" / "ledger.jsonl", federation.credentials.coordinator_ledger_public_key)
    if not report.ok:
        raise InvalidInputError(f"the coordinator's ledger does not verify: {report.summary()}")
    return {**status, "ledger_audits": report.audits}
