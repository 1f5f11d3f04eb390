"""A step's clipped sum is formed once, in place: every micro-batch after the first is added into the running sum
(``ClippedSum.add_to``, ``weighted_sum(..., out=)``) instead of into buffers of its own. These tests check that the
in-place sums equal the fresh ones, that a sum added once cannot be read again, and that running out of memory
part-way through an addition starts the step's sum again rather than releasing a sum that holds part of a
micro-batch."""

from __future__ import annotations

import pytest
import torch
from test_dpsgd_engine import _bert, _explicit
from test_dpsgd_oom import CPU_OUT_OF_MEMORY, _batch, _engine, _model

from ewtune.accountant.errors import EwtuneError
from ewtune.agent.dpsgd import PerExampleClipper, classification_loss
from ewtune.agent.dpsgd.engine import ClippedSum
from ewtune.agent.dpsgd.ghost import Dense, Direct, OneHot, Outer, squared_norms, weighted_sum
from ewtune.agent.dpsgd.unpadded import own_padding_parts

BATCH, LENGTH, VOCAB = 3, 4, 7


def _uses(case: str, generator: torch.Generator):
    def dense(width):
        return Dense(torch.randn(BATCH, LENGTH, width, generator=generator))

    ids = OneHot(torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator), VOCAB)
    return {
        "ghost": [Outer(dense(20), dense(30), torch.Size((20, 30)))],
        "narrow-left": [Outer(dense(3), dense(5), torch.Size((3, 5)))],
        "reshaped": [Outer(dense(5), dense(3), torch.Size((15,)))],
        "embedding": [Outer(ids, dense(6), torch.Size((VOCAB, 6)))],
        "tied": [Outer(ids, dense(6), torch.Size((VOCAB, 6))), Outer(dense(VOCAB), dense(6), torch.Size((VOCAB, 6)))],
        "direct": [Direct(torch.randn(BATCH, 4, 6, generator=generator))],
    }[case]


@pytest.mark.parametrize("case", ["ghost", "narrow-left", "reshaped", "embedding", "tied", "direct"])
@pytest.mark.parametrize("instantiate", [False, True], ids=["factored", "instantiated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sum_added_in_place_equals_the_running_sum_plus_the_fresh_sum(case, instantiate, dtype):
    """float32: the products go straight into the running sum; another dtype: the float32 sum is added once."""
    uses = _uses(case, torch.Generator().manual_seed(21))
    explicit = sum(_explicit(use, BATCH) for use in uses)
    weights = torch.tensor([0.3, 1.0, 0.7])
    instantiated = squared_norms(uses, BATCH)[1] if instantiate else None
    running = torch.randn(explicit.shape[1:], generator=torch.Generator().manual_seed(22), dtype=torch.float64).to(dtype)
    out = running.clone()
    got = weighted_sum(uses, weights, dtype, instantiated, None, out)
    assert got is out and got.dtype == dtype
    expected = running.double() + torch.einsum("b,b...->...", weights.double(), explicit)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_micro_batches_added_into_the_first_equal_their_fresh_sums():
    """A BERT batch in several micro-batches of records of one padded length: the step's running sum (no noise)
    against every record's clipped gradient formed on its own and added up in float64."""
    torch.manual_seed(23)
    model = _bert("full")
    model.train()
    engine = _engine(model, physical=3)
    engine.noise_multiplier = 0.0
    batch = _batch()
    grads, stats = engine.noisy_gradient(batch)
    assert stats.micro_batches >= 4
    expected = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in engine.clipper.params.items()}
    for _, record in own_padding_parts(batch, 1):
        for name, grad in engine.clipper.clipped_grad_sum(record).grads.items():
            expected[name] += grad.double()
    for name, grad in grads.items():
        torch.testing.assert_close((grad * engine.expected_batch_size).double(), expected[name], rtol=1e-5, atol=1e-6)


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
