"""An audit daemon's trainer: a holder's side of the federated one-run audit (Steinke, Nasr, Jagielski 2023)
through the real federation.

A holder whose agent.toml has an ``[audit]`` table (and whose policy sets ``audit_runs = true``) serves no data
set: its daemon trains :class:`AuditTrainer`, the audit's model (a linear classifier plus the audit block of
``block`` coordinates, :class:`ewtune.agent.audit.canaries.AuditedModel`) on ``records`` synthetic records, with its
own Dirac canaries on its own coordinates ``first .. first + count - 1`` of the block. The holders of one audit
are configured with disjoint ranges. The daemon decides its canaries: each is included with probability 1/2,
the bits drawn from the operating system's secure source when the trainer is built, held in memory only and
revealed once (:meth:`AuditTrainer.reveal`), after which the trainer trains no more (a new audit is a new
start of the daemon).

Every step runs the agent's engine as :class:`ewtune.agent.training.LocalTrainer` does (the Poisson sampler, the
per-example clipper, ``DPSGDStep`` with noise from the secure source), over the records and the included
canaries. Two choices make a round's update readable by the coordinator's scorer: plain SGD (no momentum), so
a round moves a canary's coordinate by -lr C / (q N) times the sum of its steps' x = B + sigma z, and the
division by q N with N the synthetic records only (the Describe N), so the number of included canaries never
leaves the holder before the reveal. ``breakage`` (tests and benchmarks) runs a broken engine
(:mod:`ewtune.agent.audit.breakages`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent import models
from ewtune.agent.audit.breakages import broken
from ewtune.agent.audit.canaries import AuditedModel, CanaryCollator, audited_loss
from ewtune.agent.audit.holder_config import AuditHolderConfig
from ewtune.agent.audit.run import FeatureClassifier
from ewtune.agent.audit.run import synthetic_records
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.losses import classification_loss
from ewtune.agent.dpsgd.randomness import SecureRandom
from ewtune.agent.dpsgd_run import StepPlan, TrainResult, plain_sgd_step, run_charged
from ewtune.agent.policy import PlanRefused
from ewtune.agent.sampler import PoissonSampler

MODEL_ID = "ewtune-audit-linear"
PHYSICAL_BATCH = 256


def audit_model(block: int, features: int) -> AuditedModel:
    """The audit's model with its public initial weights (the coordinator's initial global weights are these)."""
    torch.manual_seed(0)
    return AuditedModel(FeatureClassifier(features), block)


class AuditTrainer:
    """The trainer interface of :class:`ewtune.agent.daemon.Daemon` over synthetic records and this holder's canaries."""

    randomness = SecureRandom.name
    model_id = MODEL_ID
    device, precision = torch.device("cpu"), "fp32"  # the audited model is a few weights: a GPU would not pay

    def __init__(self, config: AuditHolderConfig):
        self.config = config
        self.model = audit_model(config.block, config.features)
        self._sampling_source, self._noise_source, secrets = SecureRandom(), SecureRandom(), SecureRandom()
        self._included = (secrets.uniform_bits(config.count) & 1).bool()
        features, labels = synthetic_records(config.records, config.features, seed=config.data_seed)
        own = torch.arange(config.first, config.first + config.count)
        self.collator = CanaryCollator(features, labels, own[self._included])
        self.revealed = False

    @property
    def dataset_size(self) -> int:
        """N: the synthetic records (the canaries are virtual records and are not counted)."""
        return self.config.records

    @property
    def record_count(self) -> int:
        return self.config.records

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return models.trainable_state(self.model)

    def load_trainable_state(self, state) -> None:
        models.load_trainable_state(self.model, state)

    def train(self, plan: StepPlan, should_stop=None, on_step=None) -> TrainResult:
        """``plan.steps`` steps of the engine with plain SGD (module docstring); the executed event as
        :meth:`ewtune.agent.training.LocalTrainer.train` reports it."""
        if self.revealed:
            raise PlanRefused("this audit's canaries were revealed: the daemon trains no more (start it again for a new audit)")
        started = time.perf_counter()
        sampler = PoissonSampler(self.collator.size, plan.sampling_rate, plan.steps, self._sampling_source)
        loss = audited_loss(classification_loss, self.config.raw_norm * plan.clip_norm)
        clipper = PerExampleClipper(self.model, plan.clip_norm, loss)
        engine = plain_sgd_step(self.model, clipper, plan.learning_rate, plan.noise_multiplier, plan.clip_norm,
                                sampler.executed_rate * self.dataset_size, PHYSICAL_BATCH, self._noise_source)
        try:
            progress = run_charged(plan, engine, sampler, self.collator, should_stop, on_step,
                                   around=broken(self.config.breakage))
        finally:
            clipper.close()
        metrics = {"steps": progress.executed, "examples": progress.examples, "seconds": time.perf_counter() - started}
        return TrainResult(progress.event(sampler, plan), self.trainable_state(), metrics, self.randomness)

    def confusion_matrix(self, batch_size: int | None = None) -> torch.Tensor:
        raise InvalidInputError("an audit daemon evaluates nothing")

    def reveal(self) -> dict[str, Any]:
        """This holder's canaries and their inclusion bits ("0"/"1" per coordinate from ``first``), once; the
        trainer refuses every later round."""
        if self.revealed:
            raise PlanRefused("this audit's canaries were revealed already")
        self.revealed = True
        return {
            "first": self.config.first,
            "count": self.config.count,
            "included": "".join("1" if bit else "0" for bit in self._included.tolist()),
            "breakage": self.config.breakage or "",
        }
