"""The book-keeping engine against a brute-force per-example loop (batch of one, plain autograd).

Tiny random BERT (classification) and GPT-2 (causal LM, tied embeddings) models in float32, LoRA and full
fine-tuning, right padding, and a clip norm between the per-example norms so that some examples are
clipped and some are not. Dropout is 0 so that the loop and the engine see the same function.
"""

from __future__ import annotations

import pytest
import torch
from support.dpsgd import BATCH, LENGTH, VOCAB, _batch, _check_against_reference, _perturb_lora
from torch import nn

from ewtune.agent.dpsgd import DPSGDStep, PerExampleClipper, PerExampleGradientError, causal_lm_loss, classification_loss
from ewtune.agent.dpsgd.ghost import Dense, Direct, OneHot, Outer, squared_norms, weighted_sum
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom
from ewtune.agent.dpsgd.unpadded import own_padding_parts


def _bert(mode: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    return model


def _gpt2(mode: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
        )
    return model


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bert_classification_matches_per_example_loop(mode):
    torch.manual_seed(0)
    model = _bert(mode)
    _perturb_lora(model)
    model.train()
    batch = _batch("classification", torch.Generator().manual_seed(1))
    batch["token_type_ids"] = (torch.arange(LENGTH) >= 5).long().expand(BATCH, LENGTH).clone()
    _check_against_reference(model, classification_loss, batch)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gpt2_causal_lm_matches_per_example_loop(mode):
    torch.manual_seed(0)
    model = _gpt2(mode)
    _perturb_lora(model)
    model.train()
    if mode == "full":  # the tied input/output embedding is one parameter used twice
        assert model.lm_head.weight is model.transformer.wte.weight
    _check_against_reference(model, causal_lm_loss, _batch("causal_lm", torch.Generator().manual_seed(2)))


class _Scale(nn.Module):
    """A layer with no dedicated rule: the engine must fall back to torch.func."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.weight / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()


class _TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.scale = _Scale(16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask, positions=None):
        hidden = self.norm(torch.tanh(self.proj(self.scale(self.embed(input_ids)))))
        if positions is not None:
            hidden = hidden + self.embed(positions)
        pooled = (hidden * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        return type("Out", (), {"logits": self.head(pooled)})()


def test_layers_without_rule_fall_back_to_torch_func():
    torch.manual_seed(3)
    model = _TinyClassifier()
    _check_against_reference(model, classification_loss, _batch("classification", torch.Generator().manual_seed(4)))


def test_broadcast_inputs_are_refused():
    torch.manual_seed(3)
    model = _TinyClassifier()
    batch = _batch("classification", torch.Generator().manual_seed(4))
    batch["positions"] = torch.arange(LENGTH).unsqueeze(0)  # one row broadcast over the batch
    with pytest.raises(PerExampleGradientError, match="broadcast"):
        PerExampleClipper(model, 1.0, classification_loss).clipped_grad_sum(batch)


def test_empty_micro_batch_gives_zero_gradients():
    model = _TinyClassifier()
    batch = {key: value[:0] for key, value in _batch("classification", torch.Generator().manual_seed(5)).items()}
    result = PerExampleClipper(model, 1.0, classification_loss).clipped_grad_sum(batch)
    assert result.count == 0 and result.loss_sum == 0.0 and result.per_example_norms.numel() == 0
    assert set(result.grads) == {name for name, _ in model.named_parameters()}
    assert all(not grad.any() for grad in result.grads.values())


def _sgd_step(model, noise_multiplier, expected_batch_size, physical_batch_size, batch, clip_norm=0.5, seed=7):
    clipper = PerExampleClipper(model, clip_norm, classification_loss)
    optimizer = torch.optim.SGD(clipper.params.values(), lr=1.0)
    step = DPSGDStep(
        model, clipper, optimizer, noise_multiplier, clip_norm, expected_batch_size, physical_batch_size,
        noise_source=InsecureSeededRandom(seed),
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in clipper.params.items()}
    stats = step.step(batch)
    update = torch.cat([(before[name] - p.detach()).reshape(-1) for name, p in clipper.params.items()])
    return clipper, stats, update


def test_step_divides_the_clipped_sum_by_the_expected_batch_size():
    torch.manual_seed(6)
    model = _TinyClassifier()
    batch = _batch("classification", torch.Generator().manual_seed(6))
    clipped = PerExampleClipper(model, 0.5, classification_loss).clipped_grad_sum(batch)
    expected_update = torch.cat([g.reshape(-1) for g in clipped.grads.values()]) / 10.0
    _, stats, update = _sgd_step(model, 0.0, expected_batch_size=10.0, physical_batch_size=4, batch=batch)
    assert stats.examples == BATCH and stats.micro_batches == 2  # padded lengths 16 (10, 10, 9) and 8 (7, 4, 2)
    # before - after rounds at the scale of the parameters, hence a relative L2 comparison
    assert (update - expected_update).norm() / expected_update.norm() < 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_noise_is_added_once_per_logical_step():
    """Six micro-batches of one still get noise of std sigma*C/(qN) in total, not sqrt(6) times more."""
    torch.manual_seed(6)
    model = _TinyClassifier()
    batch = _batch("classification", torch.Generator().manual_seed(6))
    clean = PerExampleClipper(model, 0.5, classification_loss).clipped_grad_sum(batch)
    clean_update = torch.cat([g.reshape(-1) for g in clean.grads.values()]) / 4.0
    _, stats, update = _sgd_step(model, 2.0, expected_batch_size=4.0, physical_batch_size=1, batch=batch)
    assert stats.micro_batches == BATCH
    noise = update - clean_update
    assert noise.numel() > 1500  # enough draws for a 5% tolerance on the std (3 standard errors)
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.05)


def test_empty_logical_batch_takes_a_noise_only_step():
    model = _TinyClassifier()
    batch = {key: value[:0] for key, value in _batch("classification", torch.Generator().manual_seed(8)).items()}
    _, stats, update = _sgd_step(model, 1.5, expected_batch_size=8.0, physical_batch_size=4, batch=batch)
    assert stats.examples == 0 and stats.micro_batches == 0 and stats.loss_sum == 0.0
    assert update.std().item() == pytest.approx(1.5 * 0.5 / 8.0, rel=0.05)
    assert update.mean().abs().item() < 4 * (1.5 * 0.5 / 8.0) / update.numel() ** 0.5


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        hidden.mul_(2.0)  # changes the embedding's output after its hook saw it
        return type("Out", (), {"logits": self.head(hidden.mean(1))})()


def test_outputs_changed_in_place_are_refused():
    batch = _batch("classification", torch.Generator().manual_seed(9))
    with pytest.raises(PerExampleGradientError, match="in place"):
        PerExampleClipper(_InPlace(), 1.0, classification_loss).clipped_grad_sum(batch)


def test_causal_lm_loss_is_a_per_sequence_mean_over_real_tokens():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(10))
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 0, 0], [6, 1, 0, 0, 0]]) % 7
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    outputs = type("Out", (), {"logits": logits})()
    losses = causal_lm_loss(outputs, {"input_ids": ids, "attention_mask": mask})
    for row in range(3):
        real = int(mask[row].sum())
        expected = torch.nn.functional.cross_entropy(logits[row, : real - 1], ids[row, 1:real])
        assert losses[row].item() == pytest.approx(expected.item(), rel=1e-6)


def test_classification_loss_is_per_example_cross_entropy():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(11))
    labels = torch.tensor([0, 2, 1, 2])
    losses = classification_loss(type("Out", (), {"logits": logits})(), {"labels": labels})
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[i : i + 1], labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(losses, expected)


def _dense_rows(factor, batch):
    from ewtune.agent.dpsgd.ghost import OneHot

    if isinstance(factor, OneHot):
        return torch.nn.functional.one_hot(factor.ids, factor.size).double()
    return factor.values.double()


def _explicit(use, batch):
    from ewtune.agent.dpsgd.ghost import Direct

    if isinstance(use, Direct):
        return use.values.double()
    grads = torch.einsum("btl,btr->blr", _dense_rows(use.left, batch), _dense_rows(use.right, batch))
    return grads.reshape(batch, *use.shape)


@pytest.mark.parametrize(
    "case", ["instantiated", "instantiated-wide-left", "ghost", "embedding", "tied", "mixed", "one-hot-right"]
)
def test_factored_norms_and_sums_match_explicit_per_example_gradients(case):
    """Every norm route of ``ghost`` (Gram, instantiation, one-hot, several uses) against explicit G_i."""
    from ewtune.agent.dpsgd.ghost import Dense, Direct, OneHot, Outer, squared_norms, weighted_sum

    generator = torch.Generator().manual_seed(12)
    batch, length, vocab = 3, 4, 7

    def dense(width, rows=length):
        return Dense(torch.randn(batch, rows, width, generator=generator))

    def ids(rows=length):
        return OneHot(torch.randint(0, vocab, (batch, rows), generator=generator), vocab)

    uses = {
        "instantiated": [Outer(dense(3), dense(5), torch.Size((3, 5)))],
        "instantiated-wide-left": [Outer(dense(5), dense(3), torch.Size((15,)))],
        "ghost": [Outer(dense(20), dense(30), torch.Size((20, 30)))],
        "embedding": [Outer(ids(), dense(6), torch.Size((vocab, 6)))],
        "tied": [Outer(ids(), dense(6), torch.Size((vocab, 6))), Outer(dense(vocab, 5), dense(6, 5), torch.Size((vocab, 6)))],
        "mixed": [Outer(ids(), dense(6), torch.Size((vocab, 6))), Direct(torch.randn(batch, vocab, 6, generator=generator))],
        "one-hot-right": [Outer(dense(6), ids(), torch.Size((6, vocab))), Direct(torch.randn(batch, 6, vocab, generator=generator))],
    }[case]
    explicit = sum(_explicit(use, batch) for use in uses)
    weights = torch.tensor([0.3, 1.0, 0.7])
    squares, instantiated = squared_norms(uses, batch)
    torch.testing.assert_close(squares.double(), explicit.reshape(batch, -1).pow(2).sum(1), rtol=1e-5, atol=1e-6)
    expected_sum = torch.einsum("b,b...->...", weights.double(), explicit)
    for reuse in (instantiated, None):
        got = weighted_sum(uses, weights, torch.float32, reuse)
        torch.testing.assert_close(got.double(), expected_sum, rtol=1e-5, atol=1e-6)


def test_bench_summary_takes_medians_and_ratios_to_non_private_and_best_opacus():
    import argparse

    from ewtune.accountant.errors import InvalidInputError
    from ewtune.bench import dpsgd as bench

    def run(engine, seconds, memory):
        return {"mode": "full", "engine": engine, "batch_size": 32, "wall_seconds": [seconds + 1], "cpu_seconds": [seconds, seconds, 99.0],
                "peak_memory_mb": memory, "memory_over_loaded_mb": memory - 1000, "load_average": [2.0, 2.0, 2.0]}  # fmt: skip

    runs = [run("non-private", 2.0, 1400), run("non-private", 2.2, 1400), run("ewtune", 2.3, 1500),
            run("opacus-hooks", 6.0, 5000), run("opacus-ghost", 4.0, 1600), {"mode": "full", "engine": "ewtune", "error": "x"}]  # fmt: skip
    rows = {row["engine"]: row for row in bench.summarise(runs, ["full"], bench.ENGINES, "cpu")}
    assert rows["non-private"]["seconds_per_step"] == pytest.approx(2.1)
    assert rows["ewtune"]["ratio_to_non_private"] == pytest.approx(2.3 / 2.1)
    assert rows["ewtune"]["best_opacus"] == "opacus-ghost"
    assert rows["ewtune"]["ratio_to_best_opacus"] == pytest.approx(2.3 / 4.0)
    assert rows["ewtune"]["failed_runs"] == 1
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(InvalidInputError, match="unknown engine"):
        bench.run(parser.parse_args(["--engines", "ewtune,deepspeed"]))


def _poisoned(model, batch, token=VOCAB - 1):
    """The attack: weights chosen so that one record alone (the only one holding ``token``) gets a non-finite
    gradient, which made the whole noised sum NaN and so revealed whether that record was in the batch."""
    batch = {key: value.clone() for key, value in batch.items()}
    batch["input_ids"][batch["input_ids"] == token] = 1
    batch["input_ids"][0, 0] = token
    with torch.no_grad():
        model.embed.weight[token] = 3e38  # finite in float32; its square is not
    return batch


def test_a_record_with_a_non_finite_gradient_contributes_nothing():
    torch.manual_seed(12)
    model = _TinyClassifier()
    batch = _poisoned(model, _batch("classification", torch.Generator().manual_seed(12)))
    clipper = PerExampleClipper(model, 0.5, classification_loss)
    result = clipper.clipped_grad_sum(batch)
    assert not torch.isfinite(result.per_example_norms[0]), "the attack must produce a non-finite gradient"
    assert torch.isfinite(result.per_example_norms[1:]).all()
    others = clipper.clipped_grad_sum({key: value[1:] for key, value in batch.items()})
    for name, grad in result.grads.items():
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, others.grads[name], rtol=1e-5, atol=1e-7)
    assert result.count == BATCH


def test_the_noised_step_stays_finite_under_the_attack():
    torch.manual_seed(13)
    model = _TinyClassifier()
    batch = _poisoned(model, _batch("classification", torch.Generator().manual_seed(13)))
    clipper = PerExampleClipper(model, 0.5, classification_loss)
    step = DPSGDStep(model, clipper, torch.optim.SGD(clipper.params.values(), lr=0.1), 1.0, 0.5, 6.0, 2)
    grads, _ = step.noisy_gradient(batch)
    assert all(torch.isfinite(grad).all() for grad in grads.values())


class _BatchNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))

    def forward(self, inputs):
        return type("Out", (), {"logits": self.layers(inputs)})()


def test_batch_statistics_are_refused():
    """Batch normalisation in training mode makes each record's output depend on the others in its batch."""
    model = _BatchNormed()
    clipper = PerExampleClipper(model, 1.0, classification_loss)
    batch = {"inputs": torch.randn(5, 4), "labels": torch.zeros(5, dtype=torch.long)}
    with pytest.raises(PerExampleGradientError, match="batch normalisation"):
        clipper.clipped_grad_sum(batch)
    model.eval()  # running statistics: a function of the weights alone
    assert torch.isfinite(clipper.clipped_grad_sum(batch).per_example_norms).all()


_SUM_BATCH, _SUM_LENGTH, _SUM_VOCAB = 3, 4, 7


def _uses(case: str, generator: torch.Generator):
    def dense(width):
        return Dense(torch.randn(_SUM_BATCH, _SUM_LENGTH, width, generator=generator))

    ids = OneHot(torch.randint(0, _SUM_VOCAB, (_SUM_BATCH, _SUM_LENGTH), generator=generator), _SUM_VOCAB)
    return {
        "ghost": [Outer(dense(20), dense(30), torch.Size((20, 30)))],
        "narrow-left": [Outer(dense(3), dense(5), torch.Size((3, 5)))],
        "reshaped": [Outer(dense(5), dense(3), torch.Size((15,)))],
        "embedding": [Outer(ids, dense(6), torch.Size((_SUM_VOCAB, 6)))],
        "tied": [Outer(ids, dense(6), torch.Size((_SUM_VOCAB, 6))), Outer(dense(_SUM_VOCAB), dense(6), torch.Size((_SUM_VOCAB, 6)))],
        "direct": [Direct(torch.randn(_SUM_BATCH, 4, 6, generator=generator))],
    }[case]


@pytest.mark.parametrize("case", ["ghost", "narrow-left", "reshaped", "embedding", "tied", "direct"])
@pytest.mark.parametrize("instantiate", [False, True], ids=["factored", "instantiated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sum_added_in_place_equals_the_running_sum_plus_the_fresh_sum(case, instantiate, dtype):
    """float32: the products go straight into the running sum; another dtype: the float32 sum is added once."""
    uses = _uses(case, torch.Generator().manual_seed(21))
    explicit = sum(_explicit(use, _SUM_BATCH) for use in uses)
    weights = torch.tensor([0.3, 1.0, 0.7])
    instantiated = squared_norms(uses, _SUM_BATCH)[1] if instantiate else None
    running = torch.randn(explicit.shape[1:], generator=torch.Generator().manual_seed(22), dtype=torch.float64).to(dtype)
    out = running.clone()
    got = weighted_sum(uses, weights, dtype, instantiated, None, out)
    assert got is out and got.dtype == dtype
    expected = running.double() + torch.einsum("b,b...->...", weights.double(), explicit)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_micro_batches_added_into_one_running_sum_equal_every_records_clipped_gradient():
    """A BERT batch in 4 micro-batches of records of one padded length (physical size 2): the step's running sum
    (no noise) against every record's clipped gradient formed on its own and added up in float64."""
    torch.manual_seed(23)
    model = _bert("full")
    model.train()
    batch = _batch("classification", torch.Generator().manual_seed(24))
    clipper = PerExampleClipper(model, 0.5, classification_loss)
    step = DPSGDStep(model, clipper, torch.optim.SGD(clipper.params.values(), lr=1.0), 0.0, 0.5, 1.0, 2,
                     noise_source=InsecureSeededRandom(0))  # fmt: skip
    grads, stats = step.noisy_gradient(batch)
    assert stats.micro_batches == 4
    expected = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in clipper.params.items()}
    for _, record in own_padding_parts(batch, 1):
        for name, grad in clipper.clipped_grad_sum(record).grads.items():
            expected[name] += grad.double()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), expected[name], rtol=1e-5, atol=1e-6)
