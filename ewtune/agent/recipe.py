"""The private fine-tuning recipe: linear probe, then fine-tune (LP-FT), under one budget.

Phase 1 ("probe") trains only the classification head, on embeddings cached once per run; phase 2 ("tune")
continues from the trained head with LoRA (or full fine-tuning) of the top ``tune_layers`` encoder layers, on
their cached inputs (:mod:`ewtune.agent.top_layers`; 0: of the whole model). Each phase has its own expected batch,
epochs, learning rate and optimizer; the probe takes ``probe_budget_share`` of the epsilon budget and the
tune phase the rest, both calibrated together (:mod:`ewtune.accountant.phases`). Head mode (the default) is the probe
alone with the whole budget; ``tune_epochs = 0`` likewise. LP-FT: ``mode = "lora"`` with ``tune_epochs > 0``.

The defaults were chosen by a sweep on public data that is not the evaluation data (the SMS Spam
Collection; ``python -m ewtune.bench.recipe_sweep``, results in ``benchmarks/results/recipe_sweep.md``), so that they
leak nothing about any holder's records. Why these values:

- the probe: unit-norm embeddings give per-record head gradients of norm at most 2, so clip norm 1 clips
  little and loses little signal; SGD with momentum and a large learning rate moves the 770 head weights
  far enough in the few hundred steps the budget affords; large expected batches (about a thousand) lower the
  noise per step (its std over the batch is sigma C / (q N)) at the same epsilon, and many epochs at that batch
  average it out. The sweep's landscape is flat near the top (mean macro F1 0.89 to 0.90 for a dozen settings),
  so these values are a robust choice rather than a sharp optimum;
- the tune phase: LoRA's factors carry little signal per coordinate, so it gets a smaller share and SGD
  (AdamW turns noise on signal-free coordinates into learning-rate-sized random steps). It tunes the top
  layer only, on cached states, so that an epoch of MR fits a CPU: the tune sweep on SMS spam
  (``python -m ewtune.bench.recipe_sweep --phase tune``, ``benchmarks/results/tune_sweep.md``; one seed) ranked LoRA on
  the top layer at learning rate 0.05, expected batch 256, one epoch first (macro F1 0.924, the probe alone
  0.918), ahead of LoRA on two layers (0.910) and full fine-tuning of the top layer (0.918 at lr 0.002; full
  fine-tuning noises 1.8 M coordinates per step against LoRA's 18 k). The margin over the probe is within one
  seed's noise: :data:`LPFT` turns the tune phase on, it is not the default;
- small budgets (:func:`default_recipe`): below epsilon :data:`LOW_EPSILON` the probe takes the sweep's best
  setting at epsilon 1 (expected batch 512, 10 epochs, learning rate 1): with a small budget each extra epoch
  costs noise (sigma grows with the steps), so fewer, smaller-batch epochs win, as in Tramer and Boneh (2021).
  The setting is the sweep's on SMS spam; splitting the defaults by budget at all was decided after both the
  mean-best and the per-epsilon-best rules were tried on MR (stated in BENCHMARKS.md).
- small data sets (:func:`fit_to_data`): an expected batch the user did not set is at most
  :data:`MAX_DEFAULT_SAMPLING_RATE` = 1/4 of the N training records, the recipe's epochs kept (so more, smaller
  steps). At q = 1/4 an epoch is still 4 steps, and the noise relative to an epoch's signal, sigma / (B sqrt(1/q))
  per record of signal, is within 10% of what q = 1/2 gives (epsilon 8, delta 1e-5, N 2000, 20 epochs: 0.00157
  against 0.00145, sigma from :func:`ewtune.accountant.calibration.calibrate_noise_multiplier`), while the
  amplification by subsampling that q > 1/2 loses is kept. Below :data:`MIN_DEFAULT_BATCH` records per expected
  batch (fewer than 64 training records) no default is chosen: the run is refused with what would fit. A
  batch the user set is never changed; one larger than N is refused with the largest that fits.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.sampling import executable_sampling_rate

RECIPE_MODES = ("lora", "full", "head")
LOW_EPSILON = math.sqrt(8.0)  # the geometric midpoint of the sweep's budgets, 1 and 8
LOW_EPSILON_PROBE = {"probe_epochs": 10.0, "probe_expected_batch": 512, "probe_learning_rate": 1.0}
OPTIMIZERS = ("adamw", "sgd")  # see ewtune.agent.dpsgd_run.make_optimizer
# LP-FT: the settings that add the tune phase (the top layers on cached states) to the default probe.
LPFT = {"mode": "lora", "tune_epochs": 1.0}
MAX_DEFAULT_SAMPLING_RATE = 0.25  # a default expected batch is at most this share of the training records
MIN_DEFAULT_BATCH = 16  # and at least this many records (below: refused, see fit_to_data)
BATCH_FIELDS = {"probe": "probe_expected_batch", "tune": "tune_expected_batch"}


@dataclass(frozen=True)
class Recipe:
    mode: str = "head"
    probe_epochs: float = 20.0
    probe_expected_batch: int = 1024
    probe_learning_rate: float = 4.0
    probe_optimizer: str = "sgd"
    probe_budget_share: float = 0.8
    tune_epochs: float = 0.0
    tune_expected_batch: int = 256
    tune_learning_rate: float = 0.05
    tune_optimizer: str = "sgd"
    tune_layers: int = 1
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in RECIPE_MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(RECIPE_MODES)}, got {self.mode!r}")
        for name in ("probe_epochs", "tune_epochs"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidInputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        for name in ("probe_expected_batch", "tune_expected_batch"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("probe_learning_rate", "tune_learning_rate", "clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidInputError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        for name in ("probe_optimizer", "tune_optimizer"):
            if getattr(self, name) not in OPTIMIZERS:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.tune_layers, bool) or not isinstance(self.tune_layers, int) or self.tune_layers < 0:
            raise InvalidInputError(f"--tune-layers must be an integer >= 0, got {self.tune_layers!r}")
        if not 0 < self.probe_budget_share < 1:
            raise InvalidInputError(f"--probe-share must be in (0, 1), got {self.probe_budget_share}")
        if not self.phase_names:
            raise InvalidInputError("the recipe runs no phase: give --probe-epochs or --tune-epochs > 0")

    @property
    def trained_layers(self) -> int:
        """The model's ``tune_layers`` (:class:`ewtune.agent.training.TrainingConfig`): 0 when no tune phase runs."""
        return self.tune_layers if "tune" in self.phase_names else 0

    @property
    def phase_names(self) -> tuple[str, ...]:
        probe = self.probe_epochs > 0
        tune = self.tune_epochs > 0 and self.mode != "head"
        return ("probe",) * probe + ("tune",) * tune

    def phases(self, dataset_size: int) -> list["Phase"]:
        """The phases for ``dataset_size`` training records: rates rounded up to what the sampler executes,
        steps = round(epochs / q); the probe's budget share only when a tune phase follows."""
        # deferred: ewtune.accountant.phases loads scipy and mpmath (2.3 s measured, alone); train-local builds its recipe before
        from ewtune.accountant.phases import Phase

        names = self.phase_names
        phases = []
        for name in names:
            batch, epochs = (self.probe_expected_batch, self.probe_epochs) if name == "probe" else (self.tune_expected_batch, self.tune_epochs)
            _check_batch_fits(name, batch, dataset_size)
            rate = executable_sampling_rate(batch / dataset_size)
            share = self.probe_budget_share if name == "probe" and len(names) > 1 else None
            phases.append(Phase(name, rate, max(1, round(epochs / rate)), share))
        return phases

    def calibrate(self, epsilon: float, delta: float, dataset_size: int):
        """Every phase's event, calibrated under one budget (:func:`ewtune.accountant.phases.calibrate_phases`)."""
        # deferred: ewtune.accountant.phases loads scipy and mpmath (2.3 s measured, alone); train-local builds its recipe before
        from ewtune.accountant.phases import calibrate_phases

        return calibrate_phases(epsilon, delta, self.phases(dataset_size))

    def learning_rate(self, phase: str) -> float:
        return self.probe_learning_rate if phase == "probe" else self.tune_learning_rate

    def optimizer(self, phase: str) -> str:
        return self.probe_optimizer if phase == "probe" else self.tune_optimizer


def default_recipe(epsilon: float | None = None, **settings) -> Recipe:
    """The recipe for a target epsilon: :class:`Recipe`'s defaults, with the probe's :data:`LOW_EPSILON_PROBE`
    below :data:`LOW_EPSILON`; ``settings`` (given explicitly) override either."""
    if epsilon is not None and epsilon < LOW_EPSILON:
        settings = {**LOW_EPSILON_PROBE, **settings}
    return Recipe(**settings)


@dataclass(frozen=True)
class FittedRecipe:
    """A recipe fitted to ``dataset_size`` training records, and one line per default it changed, saying why."""

    recipe: Recipe
    dataset_size: int
    choices: tuple[str, ...]


def fit_to_data(recipe: Recipe, dataset_size: int, given: Collection[str] = ()) -> FittedRecipe:
    """``recipe`` with each running phase's expected batch fitted to ``dataset_size`` training records (the
    module docstring's rule): a default above :data:`MAX_DEFAULT_SAMPLING_RATE` of N is lowered to it, epochs
    kept; a batch named in ``given`` (field names the user set) is kept, and refused when above N. Raises
    :class:`InvalidInputError`, one line saying what would fit, when no batch fits."""
    changes, choices = {}, []
    for phase in recipe.phase_names:
        field = BATCH_FIELDS[phase]
        batch = getattr(recipe, field)
        if field in given:
            _check_batch_fits(phase, batch, dataset_size)
            continue
        largest = math.floor(MAX_DEFAULT_SAMPLING_RATE * dataset_size)
        if batch <= largest:
            continue
        if largest < MIN_DEFAULT_BATCH:
            fewest = math.ceil(MIN_DEFAULT_BATCH / MAX_DEFAULT_SAMPLING_RATE)
            raise InvalidInputError(
                f"{dataset_size} training records are too few for a default {phase} phase (an expected batch of at "
                f"least {MIN_DEFAULT_BATCH} at q <= {MAX_DEFAULT_SAMPLING_RATE:g} needs {fewest}): give --{phase}-batch "
                f"(at most {dataset_size}) and --{phase}-epochs yourself, or more data"
            )
        epochs = getattr(recipe, f"{phase}_epochs")
        changes[field] = largest
        choices.append(
            f"{phase} expected batch {largest} (the default {batch} is over {MAX_DEFAULT_SAMPLING_RATE:g} of the "
            f"{dataset_size} training records; {epochs:g} epochs kept: about {round(epochs * dataset_size / largest)} steps)"
        )
    return FittedRecipe(replace(recipe, **changes), dataset_size, tuple(choices))


def _check_batch_fits(phase: str, batch: int, dataset_size: int) -> None:
    if batch > dataset_size:
        raise InvalidInputError(f"the {phase} phase's expected batch {batch} exceeds the {dataset_size} training "
                                f"records: give --{phase}-batch {dataset_size} or less")
