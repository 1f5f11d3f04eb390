"""Decoder-only causal LMs in the Llama/Mistral/Qwen/Gemma style (RMSNorm, rotary embeddings, grouped-query
attention, tied or scaled token embeddings) train on the engine's per-layer rules, never its ``torch.func``
fallback, and their per-example norms and clipped sums equal a loop of plain autograd over single examples,
in LoRA and full fine-tuning; with activation checkpointing too. Tiny random configs built here."""

from __future__ import annotations

import pytest
import torch
from support.dpsgd import BATCH, VOCAB, _batch, _check_against_reference, _perturb_lora
from torch import nn

from ewtune.agent.dpsgd import PerExampleClipper, PerExampleGradientError, causal_lm_loss, classification_loss
from ewtune.agent.models import with_lora

SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
# family -> (config class, its extra settings); every RMSNorm class the rules name is built by one of them
FAMILIES = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # biased q, k and v projections
    "qwen3": ("Qwen3Config", {"head_dim": 8}),  # RMSNorm on queries and keys
    "smollm3": ("SmolLM3Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),  # scaled token embeddings, (1 + w) RMSNorm
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4}),
}


def _decoder(family: str, mode: str) -> nn.Module:
    import transformers

    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**SIZES, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if mode == "lora":  # the adapters train-local adds: every attention projection
        model = with_lora(model, "causal_lm", 4, 8.0, None)
        _perturb_lora(model)
    model.train()
    return model


def _fallback_modules(model: nn.Module) -> list[str]:
    clipper = PerExampleClipper(model, 1.0, causal_lm_loss)
    try:
        return clipper.modules_without_layer_rule()
    finally:
        clipper.close()


# LoRA adapts linear layers alone, so the LoRA cases are the three families issue 23 names
CASES = [(family, "full") for family in FAMILIES] + [(family, "lora") for family in ("llama", "qwen2", "gemma3")]


@pytest.mark.parametrize("family, mode", CASES)
def test_decoders_use_layer_rules_and_match_the_per_example_loop(family, mode):
    model = _decoder(family, mode)
    assert _fallback_modules(model) == []
    _check_against_reference(model, causal_lm_loss, _batch("causal_lm", torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tied_embeddings_are_one_parameter_with_two_uses(family):
    model = _decoder(family, "full")
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding
    clipper = PerExampleClipper(model, 1.0, causal_lm_loss)
    assert [name for name, p in clipper.params.items() if p is embedding] == ["model.embed_tokens.weight"]
    clipper.close()
    _check_against_reference(model, causal_lm_loss, _batch("causal_lm", torch.Generator().manual_seed(3)))


class _OtherRMSNorm(nn.Module):
    """An RMSNorm that is not one of transformers' classes: the rules cannot know its forward."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _NormedClassifier(nn.Module):
    """Embedding -> RMSNorm -> mean over real tokens -> linear head."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = norm
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.norm(self.embed(input_ids) * 3.0)
        mask = attention_mask.unsqueeze(-1)
        return type("Out", (), {"logits": self.head((hidden * mask).sum(1) / mask.sum(1))})()


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_torch_rms_norm_has_an_exact_rule(eps):
    torch.manual_seed(4)
    norm = nn.RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = _NormedClassifier(norm)
    assert _fallback_modules(model) == []
    _check_against_reference(model, classification_loss, _batch("classification", torch.Generator().manual_seed(5)))


def test_an_unknown_norm_is_named_as_served_by_the_fallback_and_stays_exact():
    torch.manual_seed(4)
    model = _NormedClassifier(_OtherRMSNorm(16))
    assert _fallback_modules(model) == ["norm"]
    _check_against_reference(model, classification_loss, _batch("classification", torch.Generator().manual_seed(5)))


def _layer_calls(model: nn.Module, run) -> int:
    """How many times the first decoder layer's MLP ran during ``run()``."""
    layer = model.get_base_model() if hasattr(model, "get_base_model") else model
    calls = []
    handle = layer.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.filterwarnings("ignore:`(gradient|is_gradient)_checkpointing.*is deprecated:FutureWarning")  # new names: not in 5.0
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_activation_checkpointing_gives_the_same_clipped_sums(family, mode):
    batch = _batch("causal_lm", torch.Generator().manual_seed(6))
    plain, checkpointed = _decoder(family, mode), _decoder(family, mode)
    checkpointed.gradient_checkpointing_enable()  # transformers' default: use_reentrant=False
    sums = {}

    def clipped_sum(model, key):
        clipper = PerExampleClipper(model, 0.05, causal_lm_loss)
        sums[key] = clipper.clipped_grad_sum(batch)
        clipper.close()

    forward_only = _layer_calls(plain, lambda: clipped_sum(plain, "plain"))
    assert _layer_calls(checkpointed, lambda: clipped_sum(checkpointed, "checkpointed")) == 2 * forward_only
    torch.testing.assert_close(sums["checkpointed"].per_example_norms, sums["plain"].per_example_norms, rtol=1e-6, atol=0)
    for name, grad in sums["plain"].grads.items():
        torch.testing.assert_close(sums["checkpointed"].grads[name], grad, rtol=1e-5, atol=1e-7)
    assert int((sums["plain"].per_example_norms > 0.05).sum()) == BATCH  # every example was clipped
    _check_against_reference(checkpointed, causal_lm_loss, batch)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_reentrant_checkpointing_is_refused_in_one_line():
    model = _decoder("llama", "full")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    clipper = PerExampleClipper(model, 1.0, causal_lm_loss)
    with pytest.raises(PerExampleGradientError, match="ran without autograd.*use_reentrant=False"):
        clipper.clipped_grad_sum(_batch("causal_lm", torch.Generator().manual_seed(7)))
    clipper.close()
