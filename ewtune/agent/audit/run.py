"""``run_audit``: one DP-SGD run of the real engine with Dirac canaries, and its one-run lower bound on epsilon.

Each holder (one for a local audit) trains a linear classifier on its own synthetic records (a linear head over
cached features: the canaries' mechanism is the engine's, so a small model suffices and the audit takes seconds
on a CPU), or with ``model = "transformer"`` a tiny random BERT whose feed-forward weight holds the canaries
(:mod:`ewtune.agent.audit.transformer`: the canaries then pass through a real transformer layer's rules), with the
agent's components, put together as :mod:`ewtune.agent.training` puts them: the Poisson sampler over
N + (included canaries) records, the per-example clipper, ``DPSGDStep`` (noise from the OS's secure source unless
a test seeds it, division by q N) and the trainer's step loop (:mod:`ewtune.agent.dpsgd_run`). Each holder's canaries own disjoint coordinates
of the audit block (:mod:`ewtune.agent.audit.canaries`), each included with probability 1/2.

A release is a holder's update after ``local_steps`` steps (a federated round; 1: every step, the white-box
view of a local run): the change of the holder's own audit coordinates, divided by -lr C / (q N) (SGD without
momentum, so a step moves a coordinate by exactly -lr times the engine's privatized gradient), is what the
coordinator sees of each canary, the sum of the round's x = B + sigma z. The scores use only those and the
claimed q and sigma (:mod:`ewtune.accountant.canary_scores`); the bound is Steinke et al.'s
(:mod:`ewtune.accountant.one_run_audit`), per holder and pooled over all canaries (each canary belongs to one holder,
so the whole federation is (epsilon, delta)-DP with respect to each). After the rounds the holders' states are
averaged, weighted by their record counts (FedAvg), into the next round's start.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ewtune.accountant.canary_scores import likelihood_ratio_scores
from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.edgeworth import edgeworth_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.fdp_one_run import DpsgdCurveTest, dpsgd_curve_test
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.accountant.one_run_audit import DEFAULT_CONFIDENCE, OneRunBound, check_audit_layout, one_run_bound
from ewtune.agent import models
from ewtune.agent.audit import checks
from ewtune.agent.audit.canaries import AuditedModel, CanaryCollator, audited_loss
from ewtune.agent.audit.transformer import TransformerCanaries, tiny_bert
from ewtune.agent.audit.transformer import synthetic_sequences
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.losses import classification_loss
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom, RandomSource, SecureRandom
from ewtune.agent.dpsgd_run import StepProgress, check_step_settings, plain_sgd_step, run_steps
from ewtune.agent.sampler import PoissonSampler

SENSITIVITY_BATCH = 24  # real records in the leave-one-out check, plus up to 8 canaries
MODELS = ("linear", "transformer")


@dataclass(frozen=True)
class AuditConfig:
    """The claimed mechanism (q, steps, sigma, C, delta) and the audit's design."""

    canaries: int = 1000
    sampling_rate: float = 0.1
    steps: int = 50  # per holder
    noise_multiplier: float = 2.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    raw_norm: float = 10.0  # a canary's gradient norm, in units of C: above 1, so clipping is exercised
    records: int = 1000  # synthetic records per holder
    features: int = 20
    learning_rate: float = 0.5
    holders: int = 1
    local_steps: int = 1  # steps per release (a federated round)
    confidence: float = DEFAULT_CONFIDENCE
    seed: int | None = None  # None: the OS's secure source; an integer: seeded, predictable (tests only)
    fdp: bool = False  # also the f-DP test of the DP-SGD hypothesis (ewtune.accountant.fdp_one_run; about 10 s for its curves)
    model: str = "linear"  # or "transformer": the canaries on a weight of a tiny BERT layer (ewtune.agent.audit.transformer)

    def __post_init__(self) -> None:
        check_audit_layout(self, ("canaries", "steps", "records", "features", "holders", "local_steps"))
        check_step_settings(self)
        if self.model not in MODELS:
            raise InvalidInputError(f"the audit's model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not self.raw_norm > 1.0:
            raise InvalidInputError(f"the canaries' raw norm must exceed 1 (in units of C), got {self.raw_norm!r}")
        if not 0.0 < self.delta < 1.0:
            raise InvalidInputError(f"delta must be in (0, 1), got {self.delta!r}")

    @property
    def rounds(self) -> int:
        return self.steps // self.local_steps


@dataclass(frozen=True)
class HolderAudit:
    """One holder's canaries: what the coordinator saw of them, their inclusion bits and the bound."""

    holder: int
    observations: np.ndarray  # [releases, canaries]
    scores: np.ndarray
    included: np.ndarray
    bound: OneRunBound
    event: PoissonGaussianEvent
    checks: tuple[checks.Check, ...]


@dataclass(frozen=True)
class AuditRun:
    config: AuditConfig
    epsilon_certified: float  # of the claimed mechanism, per holder (the guarantee)
    epsilon_edgeworth: float  # the Edgeworth estimate of the same, labelled as an estimate
    holders: tuple[HolderAudit, ...]
    pooled: OneRunBound
    randomness: str
    seconds: float = field(default=0.0)
    fdp: DpsgdCurveTest | None = None  # the f-DP test of the DP-SGD hypothesis over the pooled canaries, when asked for

    @property
    def passed(self) -> bool:
        """Nothing found: the lower bound, and the epsilon of the DP-SGD curve refuted when that test ran, at most
        the certified epsilon; every check passed."""
        bounds = [self.pooled.epsilon] + ([self.fdp.epsilon] if self.fdp is not None else [])
        return max(bounds) <= self.epsilon_certified and self.checks_ok

    @property
    def checks_ok(self) -> bool:
        return all(check.ok for holder in self.holders for check in holder.checks)

    def to_json(self) -> dict[str, Any]:
        config = vars(self.config).copy()
        return {
            "config": config,
            "epsilon_certified": self.epsilon_certified,
            "epsilon_edgeworth_estimate": self.epsilon_edgeworth,
            "audit": self.pooled.to_json(),
            "lower_bound_exceeds_certified": self.pooled.epsilon > self.epsilon_certified,
            "holders": [
                {"holder": h.holder, "audit": h.bound.to_json(), "checks": [c.to_json() for c in h.checks]}
                for h in self.holders
            ],
            "checks_ok": self.checks_ok,
            **({"dpsgd_curve_test": self.fdp.to_json()} if self.fdp is not None else {}),
            "randomness": self.randomness,
            "seconds": self.seconds,
        }


class FeatureClassifier(nn.Module):
    """A linear classifier on feature vectors (the head of :class:`ewtune.agent.heads.PooledClassifier` on cached
    embeddings)."""

    def __init__(self, features: int, labels: int = 2):
        super().__init__()
        self.classifier = nn.Linear(features, labels)

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.classifier(features))


def synthetic_records(count: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` records: standard normal features, the label a noisy linear rule (a fixed public recipe:
    these records stand in for a holder's data and are nobody's secret)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, features, generator=generator)
    direction = torch.randn(features, generator=generator)
    labels = ((x @ direction + 0.5 * torch.randn(count, generator=generator)) > 0).to(torch.int64)
    return x, labels


class _Holder:
    """One holder's engine over its records and its share of the canaries (coordinates ``offset`` onward)."""

    def __init__(self, index: int, model: AuditedModel, config: AuditConfig, offset: int, count: int, sources):
        self.index, self.offset, self.count, self.config = index, offset, count, config
        self.sampling_source, noise_source, secret_source = sources
        self.model = model
        bits = secret_source.uniform_bits(2 * count)
        self.included = (bits[:count] & 1).bool().numpy()
        self.tie_break = bits[count:].double().numpy()
        inputs, labels = _records(config, seed=1000 + index)
        own = torch.arange(offset, offset + count)
        self.collator = CanaryCollator(inputs, labels, own[torch.from_numpy(self.included)])
        self.clipper = PerExampleClipper(model, config.clip_norm, audited_loss(classification_loss, config.raw_norm * config.clip_norm))
        self.rate = executable_sampling_rate(config.sampling_rate)
        self.engine = plain_sgd_step(model, self.clipper, config.learning_rate, config.noise_multiplier, config.clip_norm,
                                     self.rate * self.collator.size, 256, noise_source)
        self.progress = StepProgress()
        self.sampled = 0
        self.observations: list[np.ndarray] = []

    def release(self, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Train ``local_steps`` steps from ``start``; record what the update shows of each own canary."""
        models.load_trainable_state(self.model, start)
        before = self.model.audit_coordinates()
        sampler = PoissonSampler(self.collator.size, self.config.sampling_rate, self.config.local_steps, self.sampling_source)
        run_steps(self.engine, sampler, self.collator, None, self._count, self.progress)
        change = (self.model.audit_coordinates() - before)[self.offset : self.offset + self.count].double()
        scale = -self.engine.expected_batch_size / (self.config.learning_rate * self.config.clip_norm)
        self.observations.append((change * scale).numpy())
        return models.trainable_state(self.model)

    def _count(self, _, stats) -> None:
        self.sampled += stats.examples

    def audit(self, run_config: AuditConfig, epsilon_claimed: float) -> HolderAudit:
        observations = np.stack(self.observations)
        scores = likelihood_ratio_scores(observations, run_config.sampling_rate, run_config.noise_multiplier, run_config.local_steps)
        bound = one_run_bound(scores, self.included, run_config.delta, self.tie_break, run_config.confidence)
        event = PoissonGaussianEvent(self.rate, run_config.noise_multiplier, self.progress.executed)
        found = (
            checks.sensitivity(self.clipper, self._sensitivity_batch(), run_config.clip_norm),
            checks.executed_accounting(self.rate, run_config.noise_multiplier, self.progress.executed, self.sampled,
                                       self.collator.size, run_config.delta, epsilon_claimed),
            checks.noise_scale(observations, self.included, run_config.noise_multiplier, run_config.local_steps),
            checks.dpsgd_hypothesis(scores, self.included, self.tie_break, run_config.sampling_rate, run_config.steps,
                                    run_config.noise_multiplier, run_config.confidence),
        )
        self.clipper.close()
        return HolderAudit(self.index, observations, scores, self.included, bound, event, found)

    def _sensitivity_batch(self) -> dict[str, torch.Tensor]:
        real = torch.arange(min(SENSITIVITY_BATCH, self.config.records))
        virtual = torch.arange(self.config.records, min(self.collator.size, self.config.records + 8))
        return self.collator(torch.cat([real, virtual]))


def run_audit(config: AuditConfig) -> AuditRun:
    """Train with canaries and audit (module docstring). Raises ``InvalidInputError`` for a bad config."""
    started = time.perf_counter()
    claimed = PoissonGaussianEvent(executable_sampling_rate(config.sampling_rate), config.noise_multiplier, config.steps)
    epsilon_certified = certified_epsilon(claimed, config.delta)
    template = _audited_model(config)
    shares = np.array_split(np.arange(config.canaries), config.holders)
    holders = [
        _Holder(h, copy.deepcopy(template), config, int(share[0]), len(share), _sources(config.seed, h))
        for h, share in enumerate(shares)
    ]
    state = models.trainable_state(template)
    weights = [holder.collator.size for holder in holders]
    for _ in range(config.rounds):
        states = [holder.release(state) for holder in holders]
        state = {name: sum(w * s[name] for w, s in zip(weights, states)) / sum(weights) for name in state}
    audits = tuple(holder.audit(config, epsilon_certified) for holder in holders)
    scores, included = np.concatenate([a.scores for a in audits]), np.concatenate([a.included for a in audits])
    tie_break = np.concatenate([holder.tie_break for holder in holders])
    pooled = one_run_bound(scores, included, config.delta, tie_break, config.confidence)
    fdp = dpsgd_curve_test(scores, included, tie_break, config.sampling_rate, config.steps, config.delta, config.confidence) if config.fdp else None
    return AuditRun(
        config=config,
        epsilon_certified=epsilon_certified,
        epsilon_edgeworth=_edgeworth(claimed, config.delta),
        holders=audits,
        pooled=pooled,
        randomness=holders[0].engine.noise_source.name,
        seconds=time.perf_counter() - started,
        fdp=fdp,
    )


def _audited_model(config: AuditConfig) -> nn.Module:
    """The model with its canaries' coordinates, initial weights public (seeded by the config's seed)."""
    seed = 0 if config.seed is None else config.seed
    if config.model == "transformer":
        return TransformerCanaries(tiny_bert(seed), config.canaries)
    torch.manual_seed(seed)
    return AuditedModel(FeatureClassifier(config.features), config.canaries)


def _records(config: AuditConfig, seed: int) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    if config.model == "transformer":
        return synthetic_sequences(config.records, seed)
    return synthetic_records(config.records, config.features, seed)


def _sources(seed: int | None, holder: int) -> tuple[RandomSource, RandomSource, RandomSource]:
    """Batches, noise and the canaries' secrets (inclusion bits, tie-breakers): separate streams."""
    if seed is None:
        return SecureRandom(), SecureRandom(), SecureRandom()
    return tuple(InsecureSeededRandom(seed * 1000 + 10 * holder + stream) for stream in range(3))


def _edgeworth(event: PoissonGaussianEvent, delta: float) -> float:
    try:
        return edgeworth_epsilon(event, delta)
    except (ArithmeticError, ValueError, IndexError):
        return math.nan
