"""Out of memory in a DP-SGD step (issue 24, bad input): the micro-batch is computed again in halves down to one
record, through the real step, and the released sum is the unsplit one; a record that does not fit alone is a
one-line error before any noise is drawn or any parameter moves. The step's running sum: every micro-batch's clipped
sum is added into it in place, a sum once added has no gradients of its own, an addition that fails part-way starts
the sum again, and the buffers a step hands back are the next step's, zeroed."""

from __future__ import annotations

import pytest
import torch

from ewtune.accountant.errors import EwtuneError
from ewtune.agent.dpsgd import DPSGDStep, PerExampleClipper, classification_loss
from ewtune.agent.dpsgd.engine import ClippedSum, batch_size_of
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom
from ewtune.agent.dpsgd.step import OutOfMemoryStepError

VOCAB, LENGTHS = 101, [10, 7, 4, 10, 2, 9, 16, 5, 12, 3, 16, 8]
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: not enough memory: you tried to allocate 81920000 bytes."


class _Classifier(torch.nn.Module):
    """Embedding, a linear layer, layer norm and a head over the mean of the real tokens: small enough for the
    default suite, and every per-example rule the step's sums go through (embedding, linear, layer norm)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16, padding_idx=0)
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.norm(torch.tanh(self.proj(self.embed(input_ids))))
        pooled = (hidden * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        return type("Out", (), {"logits": self.head(pooled)})()


def _model() -> torch.nn.Module:
    torch.manual_seed(11)
    return _Classifier()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(12)
    width = max(LENGTHS)
    mask = (torch.arange(width) < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(1, VOCAB, (len(LENGTHS), width), generator=generator) * mask
    labels = torch.randint(0, 3, (len(LENGTHS),), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _engine(model: torch.nn.Module, physical: int, seed: int = 5) -> DPSGDStep:
    clipper = PerExampleClipper(model, 0.5, classification_loss)
    optimizer = torch.optim.SGD(clipper.params.values(), lr=1.0)
    return DPSGDStep(model, clipper, optimizer, 1.0, 0.5, 8.0, physical, noise_source=InsecureSeededRandom(seed))


class _MemoryLimit:
    """Wraps the real per-micro-batch computation: a micro-batch of more than ``fits`` records raises ``error``
    as an allocator would; the others run, and every record they cover is tallied."""

    def __init__(self, clipper: PerExampleClipper, fits: int, error: Exception):
        self.real, self.fits, self.error = clipper.clipped_grad_sum, fits, error
        self.failed_sizes: list[int] = []
        self.records_summed = 0

    def __call__(self, micro_batch):
        size = batch_size_of(micro_batch)
        if size > self.fits:
            self.failed_sizes.append(size)
            raise self.error
        clipped = self.real(micro_batch)
        self.records_summed += size
        return clipped


@pytest.mark.parametrize(
    "fits, error",
    [(1, torch.OutOfMemoryError("CUDA out of memory.")), (3, RuntimeError(CPU_OUT_OF_MEMORY))],
    ids=["cuda-down-to-one-record", "cpu-down-to-three"],
)
def test_out_of_memory_splits_the_micro_batch_to_the_same_released_sum(monkeypatch, error, fits):
    model = _model()
    unsplit_grads, unsplit = _engine(model, physical=8).noisy_gradient(_batch())
    engine = _engine(model, physical=8)  # the same seeded noise
    limit = _MemoryLimit(engine.clipper, fits, error)
    monkeypatch.setattr(engine.clipper, "clipped_grad_sum", limit)
    grads, stats = engine.noisy_gradient(_batch())
    assert limit.failed_sizes and limit.records_summed == len(LENGTHS)  # every record once: none twice, none lost
    assert stats.examples == unsplit.examples and stats.micro_batches > unsplit.micro_batches
    assert stats.loss_sum == pytest.approx(unsplit.loss_sum, rel=1e-5)
    torch.testing.assert_close(stats.per_example_norms, unsplit.per_example_norms, rtol=1e-5, atol=1e-7)
    for name, grad in unsplit_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
    # the later steps start from the size that fitted: no failed attempt again
    assert engine.physical_batch_size <= fits
    limit.failed_sizes.clear()
    engine.noisy_gradient(_batch())
    assert limit.failed_sizes == []


def test_the_split_test_can_fail_when_a_part_is_counted_twice(monkeypatch):
    """The tally and the comparison see a record summed twice (a retry that kept a failed part's records)."""
    model = _model()
    unsplit_grads, _ = _engine(model, physical=8).noisy_gradient(_batch())
    engine = _engine(model, physical=8)
    real = engine.clipper.clipped_grad_sum

    def twice(micro_batch):
        clipped = real(micro_batch)
        for name, grad in clipped.grads.items():
            grad.mul_(2.0)
        return clipped

    monkeypatch.setattr(engine.clipper, "clipped_grad_sum", twice)
    grads, _ = engine.noisy_gradient(_batch())
    with pytest.raises(AssertionError):
        for name, grad in unsplit_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_a_record_that_does_not_fit_alone_ends_the_step_in_one_line_before_noise(monkeypatch):
    model = _model()
    engine = _engine(model, physical=4)
    limit = _MemoryLimit(engine.clipper, 0, RuntimeError(CPU_OUT_OF_MEMORY))
    monkeypatch.setattr(engine.clipper, "clipped_grad_sum", limit)
    before = {name: p.detach().clone() for name, p in engine.clipper.params.items()}
    noise_state = engine.noise_source.generator.get_state()
    with pytest.raises(OutOfMemoryStepError) as raised:
        engine.step(_batch())
    message = str(raised.value)
    assert "\n" not in message and "does not fit in memory" in message and "not taken" in message
    assert limit.failed_sizes[-1] == 1 and limit.records_summed == 0
    assert torch.equal(engine.noise_source.generator.get_state(), noise_state)  # no noise drawn
    assert all(torch.equal(p, before[name]) for name, p in engine.clipper.params.items())
    assert all(p.grad is None for p in engine.clipper.params.values())


def test_other_runtime_errors_are_not_taken_for_out_of_memory(monkeypatch):
    engine = _engine(_model(), physical=8)
    limit = _MemoryLimit(engine.clipper, 2, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    monkeypatch.setattr(engine.clipper, "clipped_grad_sum", limit)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        engine.noisy_gradient(_batch())
    assert len(limit.failed_sizes) == 1 and engine.physical_batch_size == 8


def test_a_sum_added_into_a_running_sum_has_no_gradients_of_its_own():
    model = _model()
    clipper = PerExampleClipper(model, 0.5, classification_loss)
    batch = {key: value[[0, 3, 5]] for key, value in _batch().items()}  # lengths 10, 10, 9: one padded length
    running = clipper.clipped_grad_sum(batch).grads
    added = clipper.clipped_grad_sum(batch)
    added.add_to(running)
    with pytest.raises(EwtuneError, match="added into a running sum"):
        added.grads


def test_running_out_of_memory_part_way_through_an_addition_starts_the_sum_again(monkeypatch):
    """The attack on the release: an addition that fails half-way leaves part of a micro-batch in the running
    sum; retrying that micro-batch alone would count those records' partial sums twice."""
    model = _model()
    unsplit_grads, unsplit = _engine(model, physical=8).noisy_gradient(_batch())
    engine = _engine(model, physical=8)  # the same seeded noise
    real_add_to = ClippedSum.add_to
    attempts = []

    def fails_half_way_once(self, sums):
        attempts.append(len(attempts))
        if len(attempts) == 1:
            next(iter(sums.values())).add_(1.0)  # part of the sum went in
            raise RuntimeError(CPU_OUT_OF_MEMORY)
        return real_add_to(self, sums)

    monkeypatch.setattr(ClippedSum, "add_to", fails_half_way_once)
    grads, stats = engine.noisy_gradient(_batch())
    assert len(attempts) > 1 and engine.physical_batch_size < 8
    assert stats.examples == unsplit.examples and stats.micro_batches > unsplit.micro_batches
    assert stats.loss_sum == pytest.approx(unsplit.loss_sum, rel=1e-5)
    torch.testing.assert_close(stats.per_example_norms, unsplit.per_example_norms, rtol=1e-5, atol=1e-7)
    for name, grad in unsplit_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_a_step_reuses_the_last_steps_buffers_zeroed():
    """The running sums a step handed to the optimizer (released by zero_grad) are the next sums' buffers; what
    they held must not leak into the next release."""
    model = _model()
    engine = _engine(model, physical=8)
    engine.noise_multiplier = 0.0
    handed_over = {}
    real_optimizer_step = engine.optimizer.step

    def record_then_step():
        handed_over.update({name: p.grad for name, p in engine.clipper.params.items()})
        real_optimizer_step()

    engine.optimizer.step = record_then_step
    engine.step(_batch())
    later = {key: value[:5] for key, value in _batch().items()}
    reused, _ = engine.noisy_gradient(later)
    fresh_engine = _engine(model, physical=8)
    fresh_engine.noise_multiplier = 0.0
    fresh, _ = fresh_engine.noisy_gradient(later)
    for name, grad in reused.items():
        assert grad is handed_over[name]
        torch.testing.assert_close(grad, fresh[name], rtol=1e-6, atol=1e-7)
