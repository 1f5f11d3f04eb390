"""One DP-SGD step on a Poisson-sampled logical batch (Abadi et al. 2016, Algorithm 1).

    g = (sum_{i in batch} clip_C(g_i) + N(0, sigma^2 C^2 I)) / (q N)

The logical batch may have any size, including 0, and is processed in physical micro-batches of records of
one padded length, each padded by its own length alone (:mod:`ewtune.agent.dpsgd.unpadded`), whose clipped sums are
added up: every micro-batch's sum is added in place into one zeroed running sum
(:class:`ewtune.agent.dpsgd.engine.ClippedSum`), so a step holds one gradient-sized buffer, not one per micro-batch;
``step`` hands that buffer, once the optimizer has used it, to the next step, which zeroes it in place rather than
allocating (and page-faulting) a fresh one.
The noise is drawn once per logical step, and the sum is divided by the
*expected* batch size q N, never by the realised one, whose scale would then depend on the data and
leak the batch size (Opacus' ``expected_batch_size`` does the same). An empty batch still takes
a step: a noise-only update, which the accountant counts like any other.

A micro-batch that runs out of memory (``torch.OutOfMemoryError`` on a GPU, the CPU allocator's RuntimeError
"not enough memory") is computed again in halves, and halves of those, down to one record: each record's
clipped gradient depends on that record and the weights alone (:mod:`ewtune.agent.dpsgd.unpadded`), so the
parts add up to the same clipped sum, up to the order of float32 additions. A part's sum is added only once its
forward pass, backward pass and norms have finished; an addition that runs out of memory part-way has left part of
that micro-batch in the running sum, so the running sum is zeroed and the step's sum computed again from nothing
in micro-batches of at most half that size. No record is counted twice or half; a record that does not fit even alone ends the
step before any noise is drawn or any parameter moves, with a one-line :class:`OutOfMemoryStepError`. The
largest size that fitted then bounds the micro-batches of the later steps, which would run out of memory again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.agent.dpsgd.engine import ClippedSum, PerExampleClipper, batch_size_of, in_batch_order
from ewtune.agent.dpsgd.noise import add_gaussian_noise_
from ewtune.agent.dpsgd.randomness import RandomSource, SecureRandom
from ewtune.agent.dpsgd.unpadded import own_padding_parts


class OutOfMemoryStepError(EwtuneError):
    """One record's clipped gradient does not fit in memory even alone: the step was not taken."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA's (and other accelerators') ``torch.OutOfMemoryError``
    or the CPU allocator's RuntimeError ("DefaultCPUAllocator: not enough memory")."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "not enough memory" in str(error)
    )


def _release_cached_device_memory() -> None:
    """Give a failed attempt's blocks, cached by the GPU allocator, back to the device."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class StepStats:
    """What one logical step did: its realised batch size, summed loss and per-example norms."""

    examples: int
    micro_batches: int
    loss_sum: float
    clipped: int
    per_example_norms: torch.Tensor


class DPSGDStep:
    """Clip, sum, noise once, scale by 1/(expected batch size), then ``optimizer.step()``. The noise comes from
    ``noise_source``: the operating system's secure source unless a test passes a seeded one."""

    def __init__(
        self,
        model: torch.nn.Module,
        clipper: PerExampleClipper,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        clip_norm: float,
        expected_batch_size: float,
        physical_batch_size: int,
        noise_source: RandomSource | None = None,
    ):
        if not noise_multiplier >= 0:
            raise InvalidInputError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
        if clip_norm != clipper.clip_norm:
            raise InvalidInputError(f"clip_norm {clip_norm} differs from the clipper's {clipper.clip_norm}")
        if not expected_batch_size > 0:
            raise InvalidInputError(f"expected_batch_size must be positive, got {expected_batch_size}")
        if physical_batch_size < 1:
            raise InvalidInputError(f"physical_batch_size must be at least 1, got {physical_batch_size}")
        self.model = model
        self.clipper = clipper
        self.optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.physical_batch_size = int(physical_batch_size)
        self.noise_source = noise_source or SecureRandom()
        self._lent = None  # the running sums the last noisy_gradient returned
        self._spare = None  # the running sums a finished step handed back, reused by the next (zeroed)

    def noisy_gradient(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], StepStats]:
        """(sum of clipped gradients + noise) / expected batch size, and the step's statistics.

        Sums, noise and scaling happen in place, so the step holds one gradient-sized buffer at a time.
        """
        sums = self._lent = self._zeroed_sums()
        rows, norms, loss_sum = self._clipped_sums(batch, sums)
        std = self.noise_multiplier * self.clip_norm
        add_gaussian_noise_(sums, std, self.noise_source)
        for grad in sums.values():
            grad.div_(self.expected_batch_size)
        norms_in_order = in_batch_order(rows, norms) if norms else torch.zeros(0)
        stats = StepStats(
            examples=batch_size_of(batch),
            micro_batches=len(rows),
            loss_sum=loss_sum,
            clipped=int((norms_in_order > self.clip_norm).sum()),
            per_example_norms=norms_in_order,
        )
        return sums, stats

    def _zeroed_sums(self) -> dict[str, torch.Tensor]:
        """Zeroed running sums, one per parameter: the buffers the previous ``step`` handed back, zeroed in place
        (a fresh gradient-sized allocation costs its page faults again at every step), else new ones."""
        spare, self._spare = self._spare, None
        if spare is None:
            return self.clipper.zero_grads()
        for grad in spare.values():
            grad.zero_()
        return spare

    def _clipped_sums(self, batch: Mapping[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> tuple[list, list, float]:
        """Adds the clipped sum over the logical batch into the zeroed ``sums``, micro-batch by micro-batch, in place
        (``ClippedSum.add_to``); returns each micro-batch's rows and norms and the summed loss. Running out of
        memory while a micro-batch is computed splits it; running out part-way through adding it leaves part of it
        in ``sums``, so ``sums`` is zeroed and the whole sum computed again, in micro-batches no larger than half
        that one's."""
        rows, norms, loss_sum = [], [], 0.0
        pending = own_padding_parts(batch, self.physical_batch_size)
        while pending:
            micro_rows, micro_batch = pending.pop(0)
            clipped = self._clipped_sum_or_none(micro_batch)
            if clipped is None:  # out of memory: its halves go first, in order; nothing of it was added
                pending[:0] = self._halves(micro_rows, micro_batch)
                continue
            if not self._added(clipped, sums):
                self._halves(micro_rows, micro_batch)  # the later micro-batches' bound (a single record: the error)
                for grad in sums.values():
                    grad.zero_()
                return self._clipped_sums(batch, sums)
            rows.append(micro_rows)
            norms.append(clipped.per_example_norms)
            loss_sum += clipped.loss_sum
        return rows, norms, loss_sum

    def _clipped_sum_or_none(self, micro_batch: Mapping[str, torch.Tensor]) -> ClippedSum | None:
        """The micro-batch's clipped sum (not formed yet), or None when computing it ran out of memory (the error,
        and with it every tensor its frames held, is dropped before the caller retries)."""
        try:
            return self.clipper.clipped_grad_sum(micro_batch)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
        _release_cached_device_memory()
        return None

    @staticmethod
    def _added(clipped: ClippedSum, sums: dict[str, torch.Tensor]) -> bool:
        """Whether ``clipped`` was added into ``sums``; False when that ran out of memory part-way."""
        try:
            clipped.add_to(sums)
            return True
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
        _release_cached_device_memory()
        return False

    def _halves(self, micro_rows: torch.Tensor, micro_batch: Mapping[str, torch.Tensor]) -> list[tuple]:
        """The micro-batch that ran out of memory as two parts (rows of the logical batch, sub-batch), and the
        later steps' physical size bounded by the larger part; a single record is a one-line error."""
        count = micro_rows.numel()
        if count == 1:
            device = next(iter(micro_batch.values())).device
            raise OutOfMemoryStepError(
                f"one record does not fit in memory on {device} even alone (physical micro-batch 1); the step was "
                "not taken: use shorter records (a lower maximum length), a smaller model or a larger device"
            )
        half = (count + 1) // 2
        self.physical_batch_size = min(self.physical_batch_size, half)
        return [(micro_rows[part_rows], part) for part_rows, part in own_padding_parts(micro_batch, half)]

    def step(self, batch: Mapping[str, torch.Tensor]) -> StepStats:
        """One private optimizer step on a (possibly empty) logical batch."""
        grads, stats = self.noisy_gradient(batch)
        for name, param in self.clipper.params.items():
            param.grad = grads[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if grads is self._lent:  # this step's own running sums, which no parameter holds now: the next step's
            self._spare = grads
        self._lent = None
        return stats
