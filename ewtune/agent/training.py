"""The local trainer of a data holder: a model and its data loaded once, then DP-SGD runs (Abadi et al. 2016;
EW-Tune, arXiv 2210.15042, Alg. 1) that report the DP event they actually executed.

Per step: Poisson-sample a logical batch (:mod:`ewtune.agent.sampler`), collate it, and hand it to the engine's
:class:`ewtune.agent.dpsgd.step.DPSGDStep`, which clips per example, sums over physical micro-batches, adds
N(0, sigma^2 C^2) once, divides by the expected batch size qN and steps the optimizer.

A head-only run (``mode = "head"``, or phase 1 of linear-probe-then-fine-tune, ``StepPlan.head_only``) on a
pooled-embedding classifier (:mod:`ewtune.agent.heads`) trains on each record's embedding, computed once with the
frozen encoder in eval mode and reused at every step: a deterministic function of that record alone, so the
cache costs no privacy, and a step costs a linear layer instead of the encoder (Kumar et al. 2022, LP-FT).
Likewise a run with ``tune_layers = k`` trains the top k encoder layers and the head on the cached hidden states
entering layer L-k (:mod:`ewtune.agent.top_layers`).

Device and precision (``device``, ``precision``; :mod:`ewtune.agent.device`): the model, every batch, the engine's
work, the noise (drawn on the gradients' device, :mod:`ewtune.agent.dpsgd.noise`), the evaluation's forward passes and
the embedding and hidden-state caches live on the configured device; the Poisson sampler chooses indices on the
CPU and each batch is built there and copied over. With ``bf16`` the forward passes run under bfloat16 autocast;
per-example norms, clipping, the clipped sums and the noise stay float32 (:mod:`ewtune.agent.dpsgd.engine`). A private
evaluation's confusion matrix and its noise stay on the CPU.

Several processes (``group``, :mod:`ewtune.agent.distributed`): each worker builds the same trainer, samples its own
shard of the records and computes its shard's clipped sums; rank 0 draws the noise once, the sums are all-reduced
and every worker takes the same step. Rank 0 announces each run to the others (:meth:`LocalTrainer.train`), counts
its steps and returns the event; the others follow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.agent import models
from ewtune.agent.data import collate, load_local_data
from ewtune.agent.device import autocast, batch_to, resolve_device
from ewtune.agent.distributed.group import SINGLE_PROCESS
from ewtune.agent.dpsgd.engine import PerExampleClipper
from ewtune.agent.dpsgd.losses import causal_lm_loss, classification_loss
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom, RandomSource, SecureRandom
from ewtune.agent.dpsgd.unpadded import PAD_MULTIPLE, padded_length
from ewtune.agent.dpsgd_run import (
    StepPlan,
    TrainingFailed,
    TrainingInterrupted,
    TrainResult,
    make_optimizer,
    run_charged,
)
from ewtune.agent.evaluation import clipped_loss_sums, confusion_matrix, evaluate_model, loss_bound
from ewtune.agent.heads import PooledClassifier, embed_examples
from ewtune.agent.top_layers import TopLayers, hidden_batch, hidden_states_below
from ewtune.agent.training_config import TrainingConfig


class LocalTrainer:
    """Loads the model and the data of ``config`` once; :meth:`train` runs DP-SGD on the training split, alone or
    as one worker of ``group`` (:class:`ewtune.agent.distributed.group.WorkerGroup`)."""

    def __init__(self, config: TrainingConfig, group=SINGLE_PROCESS):
        self.config = config
        self.group = group
        self.device = resolve_device(config.device, config.precision)  # before anything loads: a missing GPU fails fast
        torch.manual_seed(config.seed)  # a fresh classifier head and LoRA factors are initialised from it
        self.tokenizer = models.load_tokenizer(config.model_dir)
        self.data = load_local_data(config.data_spec(), self.tokenizer)
        if config.physical_batch_size < 1:
            raise InvalidInputError(f"physical batch size must be >= 1, got {config.physical_batch_size}")
        self.model = models.load_model(
            config.model_dir,
            task=config.task,
            num_labels=self.data.num_labels or 2,
            mode=config.mode,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_target_modules=config.lora_target_modules,
            pad_token_id=self.tokenizer.pad_token_id,
            tune_layers=config.tune_layers,
        ).to(self.device)
        check_padded_length_fits(config.max_length, self.model)
        self.model_id = models.model_id(config.model_dir)
        # Batches and noise come from the operating system's secure source: amplification by subsampling assumes
        # nobody knows who was sampled, and noise that can be predicted can be subtracted. The seeded streams of
        # the insecure test mode are separate, so that the batches do not depend on how much noise was drawn.
        self._sampling_source = _random_source(config, stream=0, rank=group.rank)
        self._noise_source = _random_source(config, stream=1, rank=group.rank)
        self._dropout_source = _random_source(config, stream=2, rank=group.rank)
        self._features: torch.Tensor | None = None  # the training records' embeddings, for head-only runs
        self._hidden: list[torch.Tensor] | None = None  # their states below the tuned layers (never trained)

    @property
    def randomness(self) -> str:
        """The name of the source of batches and noise: ``os-secure`` or ``insecure-seeded``."""
        return self._noise_source.name

    @property
    def dataset_size(self) -> int:
        """Number of training examples N (the held-out split excluded): q = expected batch / N."""
        return len(self.data.train)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return models.trainable_state(self.model)

    def load_trainable_state(self, state) -> None:
        models.load_trainable_state(self.model, state)
        if any(not _is_head(name) for name in state):
            self._features = None  # the encoder may have changed: its embeddings are computed again when needed

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16`` (bfloat16 autocast for the forward passes)."""
        return self.config.precision

    def collate(self, indices) -> dict[str, torch.Tensor]:
        """The padded batch of the training examples at ``indices``, on the trainer's device."""
        return batch_to(collate(self.data.train, indices, self.pad_token_id, self.config.task), self.device)

    def autocast(self):
        """The context of every forward pass: bfloat16 autocast with ``precision = "bf16"``."""
        return autocast(self.device, self.precision)

    def loss_fn(self):
        return classification_loss if self.config.task == "classification" else causal_lm_loss

    def train(
        self,
        plan: StepPlan,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, object], None] | None = None,
    ) -> TrainResult:
        """Run up to ``plan.steps`` DP-SGD steps; ``should_stop()`` is asked before each step and ends the run
        early. ``on_step(step_number, stats)`` is called after each step (progress bars). The returned event
        counts exactly the steps executed, at the rate the sampler realised (:mod:`ewtune.agent.sampler`: the
        requested rate rounded up to the 2^-53 grid). A failure after a step ran raises
        :class:`TrainingFailed` carrying the event executed so far."""
        started = time.perf_counter()
        head_only = plan.head_only or self.config.mode == "head"
        if head_only and self.config.task != "classification":
            raise InvalidInputError("a head-only run needs a classification task")
        self.group.announce(plan, features_current=self._features is not None)  # the other workers follow it
        self.group.sync_parameters(self.model)
        try:
            module, collate_fn = self.phase_inputs(head_only)
            self.group.barrier()  # every worker has read its caches: one that died doing so is charged as here
        except (Exception, KeyboardInterrupt) as failure:  # the caches read every training record: charged as the first step
            first = PoissonGaussianEvent(executable_sampling_rate(plan.sampling_rate), plan.noise_multiplier, 1)
            if isinstance(failure, KeyboardInterrupt):
                raise TrainingInterrupted(first, "interrupted after 1 step(s): while caching the records' features, "
                                          "before step 1 ran; charged as 1 step") from None
            raise TrainingFailed(first, failure, "failed while caching the records' features, before step 1 ran; "
                                 "charged as 1 step") from failure
        try:
            with only_head_trainable(self.model, head_only):
                event, metrics = self._train(plan, module, collate_fn, should_stop, on_step)
        finally:
            if not head_only:
                self._features = None  # the encoder trained: its embeddings changed
        metrics["seconds"] = time.perf_counter() - started
        return TrainResult(event, self.trainable_state(), metrics, self.randomness)

    def follow(self, plan: StepPlan, features_current: bool) -> TrainResult:
        """A worker of rank > 0 runs ``plan`` as rank 0 announced it; ``features_current``: whether rank 0 kept its
        cached embeddings (:meth:`load_trainable_state` on rank 0 drops them when the encoder changes)."""
        if not features_current:
            self._features = None
        return self.train(plan)

    def phase_inputs(self, head_only: bool):
        """(the module a run's batches enter, the function that makes a batch from indices): the cached embeddings
        and the head for a head-only run on a pooled classifier, the cached states below the tuned layers and
        :class:`TopLayers` when ``tune_layers`` is set, else the model on tokenised batches; the batches are on the
        trainer's device. The caches are filled on first use, on that device."""
        if head_only and self._embeds_sentences:
            if self._features is None:
                self._features = self._train_features()
            return self.model, self._feature_batch
        if self.config.tune_layers and not head_only:
            return self._top_layers(), self._hidden_batch
        return self.model, self.collate

    def _top_layers(self) -> TopLayers:
        """The tuned top layers and the head, with the states entering them cached."""
        module = TopLayers(base_model(self.model), self.config.tune_layers)
        if self._hidden is None:
            with self.autocast():
                self._hidden = hidden_states_below(module.model, self.config.tune_layers, self.data.train,
                                                   self.pad_token_id, self._cache_batch, self.device)
        return module

    def _train(self, plan: StepPlan, module, collate_fn, should_stop, on_step):
        """``module``: the model, or the part of it that ``collate_fn``'s batches enter (:class:`TopLayers`)."""
        module.train()
        sampler = self.group.sampler(self.dataset_size, plan.sampling_rate, plan.steps, self._sampling_source)
        trainable = [param for param in module.parameters() if param.requires_grad]
        optimizer = make_optimizer(plan.optimizer or self.config.optimizer, trainable, plan.learning_rate)
        clipper = PerExampleClipper(module, plan.clip_norm, self.loss_fn(),
                                    autocast_dtype=torch.bfloat16 if self.precision == "bf16" else None)
        engine = self.group.engine(
            model=module,
            clipper=clipper,
            optimizer=optimizer,
            noise_multiplier=plan.noise_multiplier,
            clip_norm=plan.clip_norm,
            expected_batch_size=sampler.executed_rate * self.dataset_size if plan.expected_batch_size is None
            else plan.expected_batch_size,
            physical_batch_size=self.config.physical_batch_size,
            noise_source=self._noise_source,
        )
        dropout_seed = int(self._dropout_source.uniform_bits(1)[0])
        try:
            progress = run_charged(plan, engine, sampler, collate_fn, self.group.stop_signal(should_stop), on_step,
                                   around=self._own_dropout_stream(dropout_seed, module))
        finally:
            clipper.close()
        metrics = {
            "loss": progress.loss_sum / progress.examples if progress.examples else math.nan,
            "examples": progress.examples,
            "steps": progress.executed,
            "workers": self.group.memory_report(engine),  # each worker's peak memory and its parameter and optimizer bytes
        }
        return progress.event(sampler, plan), metrics

    @contextmanager
    def _own_dropout_stream(self, seed: int, module):
        """Dropout masks from the trainer's own stream, not the global one; on leaving, the workers' copies of
        ``module`` checked equal (a failure there is the run's, charged)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
        self.group.check_in_sync(module)

    @property
    def _embeds_sentences(self) -> bool:
        return isinstance(base_model(self.model), PooledClassifier)

    @property
    def _cache_batch(self) -> int:
        return max(self.config.physical_batch_size, 64)

    def _train_features(self) -> torch.Tensor:
        """Every training record's pooled embedding, from the encoder in eval mode (no dropout); from the cached
        states below the tuned layers when a tune phase will need them anyway (one encoder pass, not two)."""
        if self.config.tune_layers:
            top = self._top_layers()
            with self.autocast():
                return top.embed_cached(self._hidden, self._cache_batch).float()
        with self.autocast():
            features = embed_examples(base_model(self.model), self.data.train, self.pad_token_id, self._cache_batch, self.device)
        return features.float().to(self.device)

    def _feature_batch(self, indices) -> dict[str, torch.Tensor]:
        """The cached embeddings and the labels of the training records at ``indices``."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        labels = torch.as_tensor(self.data.train.labels, dtype=torch.int64)
        return batch_to({"features": self._features[indices.to(self.device)], "labels": labels[indices]}, self.device)

    def _hidden_batch(self, indices) -> dict[str, torch.Tensor]:
        """The cached states below the tuned layers, the attention mask and the labels of the records at ``indices``."""
        labels = torch.as_tensor(self.data.train.labels, dtype=torch.int64)
        return batch_to(hidden_batch(self._hidden, labels, indices), self.device)

    def confusion_matrix(self, batch_size: int | None = None) -> torch.Tensor:
        """The held-out split's confusion matrix (classification only; see :mod:`ewtune.agent.evaluation`)."""
        if self.config.task != "classification":
            raise InvalidInputError("a confusion matrix needs a classification task")
        size = batch_size or max(self.config.physical_batch_size, 32)
        with self.autocast():
            return confusion_matrix(self.model, self.data.eval, self.pad_token_id, self.data.num_labels or 2, size)

    @property
    def loss_bound(self) -> float:
        """The per-record loss bound B of a private perplexity (:func:`ewtune.agent.evaluation.loss_bound`)."""
        return loss_bound(base_model(self.model).config.vocab_size)

    def clipped_loss_sums(self, batch_size: int | None = None) -> torch.Tensor:
        """The held-out split's clipped loss sums (causal LM only; see :mod:`ewtune.agent.evaluation`)."""
        if self.config.task != "causal_lm":
            raise InvalidInputError("clipped loss sums need a causal_lm task")
        size = batch_size or max(self.config.physical_batch_size, 32)
        with self.autocast():
            return clipped_loss_sums(self.model, self.data.eval, self.pad_token_id, self.loss_bound, size)

    @property
    def record_count(self) -> int:
        """Every record the holder's guarantee covers: the training and the held-out split."""
        return len(self.data.train) + len(self.data.eval)

    def evaluate(self, batch_size: int | None = None) -> dict[str, float]:
        """Metrics on the held-out split (see :func:`ewtune.agent.evaluation.evaluate_model`)."""
        size = batch_size or max(self.config.physical_batch_size, 32)
        with self.autocast():
            return evaluate_model(self.model, self.data.eval, self.pad_token_id, self.config.task, size)


def base_model(model):
    """The model under a peft wrapper (``get_base_model``), or the model itself when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_head(name: str) -> bool:
    """Whether a parameter name belongs to the classification head (plain, or saved whole under peft)."""
    return any(part in models.CLASSIFIER_HEAD_NAMES for part in name.split("."))


@contextmanager
def only_head_trainable(model, head_only: bool):
    """Within the block, only the head's parameters require gradients (when ``head_only``)."""
    if not head_only:
        yield
        return
    frozen = [param for name, param in model.named_parameters() if param.requires_grad and not _is_head(name)]
    if not any(param.requires_grad for name, param in model.named_parameters() if _is_head(name)):
        raise InvalidInputError("this model has no trainable classification head for a head-only run")
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


def check_padded_length_fits(max_length: int, model) -> None:
    """A record is padded to a length fixed by its own (:func:`ewtune.agent.dpsgd.unpadded.padded_length`), up to that of
    ``max_length``; it must stay within the model's positions, or the longest records would fail in a forward pass."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and padded_length(max_length) > positions:
        raise InvalidInputError(
            f"max_length {max_length} pads to {padded_length(max_length)} tokens (a multiple of {PAD_MULTIPLE}), beyond "
            f"the model's {positions} positions: use a max_length of at most {positions // PAD_MULTIPLE * PAD_MULTIPLE}"
        )


def _random_source(config: TrainingConfig, stream: int, rank: int) -> RandomSource:
    """The secure source; in the insecure test mode, a generator seeded per stream (0 batches, 1 noise, 2
    dropout) and per worker (rank 0 as a process alone)."""
    if config.insecure_seeded_randomness:
        return InsecureSeededRandom(config.seed + stream + 3 * rank)
    return SecureRandom()
