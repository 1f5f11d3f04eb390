"""One DP-SGD run's contract and its step loop, shared by the holder's trainer (:mod:`ewtune.agent.training`) and the
audits (:mod:`ewtune.agent.audit.run`, :mod:`ewtune.agent.audit.holder`): what a run is asked to do
(:class:`StepPlan`), what it reports (:class:`TrainResult`), how a failure after records were touched is charged
(:class:`TrainingFailed`, :class:`TrainingInterrupted`), and the loop itself (:func:`run_steps`,
:func:`run_charged`): one engine step (:class:`ewtune.agent.dpsgd.step.DPSGDStep`: per-example clipping, one
N(0, sigma^2 C^2) draw from the noise source, division by the expected batch size qN; Abadi et al. 2016) per
Poisson-sampled batch (:mod:`ewtune.agent.sampler`), each step counted as it begins, so that the event charged is
the mechanism that ran (EW-Tune, arXiv 2210.15042, Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.agent.dpsgd.randomness import RandomSource, SecureRandom
from ewtune.agent.dpsgd.step import DPSGDStep
from ewtune.agent.recipe import OPTIMIZERS
from ewtune.agent.sampler import PoissonSampler


@dataclass(frozen=True)
class StepPlan:
    """One DP-SGD run: ``steps`` Poisson steps at rate ``sampling_rate`` with noise multiplier sigma."""

    steps: int
    sampling_rate: float
    noise_multiplier: float
    clip_norm: float
    learning_rate: float
    head_only: bool = False  # only the classification head trains (linear probing; phase 1 of LP-FT)
    optimizer: str | None = None  # None: the trainer's (TrainingConfig.optimizer)
    # The noised sum is divided by it; None: q N with the exact N. The daemon passes q N_noisy (the released
    # count, ewtune.agent.released_count), so the update is a function of the noised sum and released values only.
    expected_batch_size: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidInputError(f"steps must be an integer >= 1, got {self.steps!r}")
        check_step_settings(self)
        batch = self.expected_batch_size
        if batch is not None and not (isinstance(batch, (int, float)) and math.isfinite(batch) and batch > 0):
            raise InvalidInputError(f"expected batch size must be a finite number > 0, got {batch!r}")


def check_step_settings(plan) -> None:
    """A DP-SGD run's rate in (0, 1] and its noise multiplier, clip norm and learning rate finite and > 0."""
    if not 0.0 < plan.sampling_rate <= 1.0:
        raise InvalidInputError(f"sampling rate must be in (0, 1], got {plan.sampling_rate!r}")
    for name in ("noise_multiplier", "clip_norm", "learning_rate"):
        value = getattr(plan, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InvalidInputError(f"{name.replace('_', ' ')} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class TrainResult:
    """``event``: the mechanism executed, at the sampling rate actually realised (``None`` only when stopped
    before the first step); ``trainable_state``: the updated trainable parameters; ``metrics``: loss (mean
    training loss of the sampled examples), examples, steps, seconds; ``randomness``: the source of batches and
    noise (``os-secure`` or ``insecure-seeded``)."""

    event: PoissonGaussianEvent | None
    trainable_state: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    randomness: str = SecureRandom.name


class TrainingFailed(EwtuneError):
    """A run failed after it touched records: ``event`` counts every step that *began* (its Poisson sample was
    drawn, or, for ``steps = 1`` with ``what_ran`` saying so, the feature cache read the records), the failing
    step included. Charging follows data access, not success: a data-dependent failure is an answer about
    the data, so the caller must account ``event`` (a failure before any record is touched is no
    TrainingFailed). ``what_ran`` says it in words, for the ledger."""

    def __init__(self, event: PoissonGaussianEvent, cause: BaseException, what_ran: str):
        super().__init__(f"training failed ({what_ran}): {type(cause).__name__}: {cause}")
        self.event = event
        self.cause = cause
        self.what_ran = what_ran


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) after the run touched records: ``event`` counts every step that began, as for
    :class:`TrainingFailed` (the interrupted step included), and ``what_ran`` says so for the ledger. It stays a
    KeyboardInterrupt, so that the command still ends as interrupted (exit 130) once the caller has charged it."""

    def __init__(self, event: PoissonGaussianEvent, what_ran: str):
        super().__init__(what_ran)
        self.event = event
        self.what_ran = what_ran


def make_optimizer(name: str, params, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW (no weight decay) or SGD with momentum 0.9. On noisy DP gradients AdamW's per-coordinate scaling
    moves coordinates that carry almost no signal (a zero-initialised LoRA B) by about the learning rate at every
    step, a random walk; SGD moves them by the noise itself, which is small."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    raise InvalidInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def plain_sgd_step(model, clipper, learning_rate: float, noise_multiplier: float, clip_norm: float,
                   expected_batch_size: float, physical_batch_size: int, noise_source: RandomSource) -> DPSGDStep:
    """The audits' engine: :class:`DPSGDStep` over ``model``'s trainable parameters with SGD without momentum, so
    that a step moves a coordinate by exactly -lr times the privatized gradient and an update can be read back
    as the sum of its steps' x = B + sigma z (Steinke, Nasr, Jagielski 2023)."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    return DPSGDStep(model, clipper, torch.optim.SGD(trainable, lr=learning_rate), noise_multiplier=noise_multiplier,
                     clip_norm=clip_norm, expected_batch_size=expected_batch_size,
                     physical_batch_size=physical_batch_size, noise_source=noise_source)


@dataclass
class StepProgress:
    """A run's steps as they happen: the ones begun are what is charged."""

    begun: int = 0  # steps whose sample was drawn and handed to the engine: charged, whether they ended or not
    executed: int = 0  # steps that ended
    examples: int = 0
    loss_sum: float = 0.0

    def event(self, sampler: PoissonSampler, plan: StepPlan) -> PoissonGaussianEvent | None:
        """The mechanism to charge: every step that began, at the rate the sampler realised."""
        if not self.begun:
            return None
        return PoissonGaussianEvent(sampler.executed_rate, plan.noise_multiplier, self.begun)

    def what_ran(self, plan: StepPlan) -> str:
        return (f"failed in step {self.begun} of {plan.steps} after {self.executed} completed step(s); "
                f"{self.begun} step(s) charged")

    def what_ran_until_interrupted(self, plan: StepPlan) -> str:
        return (f"interrupted after {self.begun} step(s) of {plan.steps} began ({self.executed} completed); "
                f"{self.begun} step(s) charged")


def run_steps(engine, sampler, collate_fn, should_stop, on_step, progress: StepProgress) -> None:
    """One engine step per sampled batch until done or stopped, counted in ``progress`` as it begins (its
    sample drawn, before any record is read) and as it ends."""
    for indices in sampler:
        if should_stop is not None and should_stop():
            break
        progress.begun += 1
        stats = engine.step(collate_fn(indices))
        progress.executed += 1
        progress.examples += stats.examples
        progress.loss_sum += stats.loss_sum
        if on_step is not None:
            on_step(progress.executed, stats)


def run_charged(
    plan: StepPlan,
    engine,
    sampler: PoissonSampler,
    collate_fn,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, object], None] | None = None,
    around: AbstractContextManager | None = None,
) -> StepProgress:
    """:func:`run_steps` within ``around`` (entered and left inside the charged part: a failure on leaving is
    the run's), then the steps' progress. Once a step has begun, a failure raises :class:`TrainingFailed` and
    Ctrl-C :class:`TrainingInterrupted`, each carrying the event of every step begun; before that, the
    original exception (no record was read)."""
    progress = StepProgress()
    try:
        with around if around is not None else nullcontext():
            run_steps(engine, sampler, collate_fn, should_stop, on_step, progress)
    except KeyboardInterrupt:
        if not progress.begun:
            raise
        raise TrainingInterrupted(progress.event(sampler, plan), progress.what_ran_until_interrupted(plan)) from None
    except Exception as failure:
        if not progress.begun:  # no sample drawn, no record read
            raise
        raise TrainingFailed(progress.event(sampler, plan), failure, progress.what_ran(plan)) from failure
    return progress
