"""Dirac canaries inside a real transformer layer: the audit of :mod:`ewtune.agent.audit.run` with the canaries'
coordinates in a weight matrix of a BERT encoder layer instead of a block the model never reads.

The model is a randomly initialised BERT for sequence classification (Devlin et al. 2019) of a tiny, public
configuration (:func:`tiny_bert`), every parameter trainable, trained on synthetic token sequences. Canary i
owns one coordinate (k_i, j_i) of the weight W of a real ``nn.Linear`` of the encoder (default: the feed-forward
``intermediate.dense`` of the top layer), which the real records train as well. The wrapper calls that same
module a second time per forward pass, on a probe of shape [B, 1, d_in] that is READ_SCALE e_{j_i} on canary
i's row and zero on a real record's row, and canary i's mark is output[k_i] / READ_SCALE. Its loss, raw_norm C
times the mark (:func:`ewtune.agent.audit.canaries.audited_loss`), then has the per-example gradient raw_norm C on
W[k_i, j_i] and raw_norm C / READ_SCALE on the bias b_{k_i}, nothing else. The engine sees two calls of a
hooked linear layer over 3-d inputs, sums their uses per example, clips each example over *all* the model's
parameters (the canary to C / sqrt(1 + READ_SCALE^-2), i.e. C to 9 digits) and noises every coordinate: the
layer rules, the multi-use sums, the clip and the noise of a real transformer layer carry the canaries.

What a canary's coordinate shows is x = B + sigma z plus the real records' gradients on that coordinate
(interference, Keinan et al. 2025): it weakens the bound, never voids it (the records are fixed; the bound holds
for any score), and with few real records per step it is small next to sigma (the tests measure it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.audit.canaries import AuditedOutput

READ_SCALE = 1e4  # the probe's magnitude: the canary's bias gradient is 1/READ_SCALE of its weight gradient
TARGET = "bert.encoder.layer.1.intermediate.dense"
VOCAB = 64
SEQUENCE = 12
MAX_POSITIONS = 64  # room for the engine to pad a record to a length fixed by its own (ewtune.agent.dpsgd.unpadded)


def tiny_bert(seed: int = 0) -> nn.Module:
    """A randomly initialised 2-layer BERT classifier (hidden 32, 2 heads, feed-forward 64), eager attention,
    no dropout (public weights: the audit's, no one's data)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_POSITIONS, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config)


def synthetic_sequences(count: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``count`` token sequences (ids 1..VOCAB-1, no padding), labelled by whether more than half their tokens
    are below VOCAB / 2 (a public recipe: these records stand in for a holder's data)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, SEQUENCE), generator=generator)
    labels = ((ids < VOCAB // 2).sum(dim=1) * 2 > SEQUENCE).to(torch.int64)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


class TransformerCanaries(nn.Module):
    """``model`` (a Hugging Face sequence classifier) with ``canaries`` Dirac canaries on coordinates of the
    weight of its linear layer ``target`` (module docstring); the interface of
    :class:`ewtune.agent.audit.canaries.AuditedModel`."""

    def __init__(self, model: nn.Module, canaries: int, target: str = TARGET):
        super().__init__()
        self.model = model
        self.target = model.get_submodule(target)
        rows, columns = self.target.weight.shape
        if canaries > rows * columns:
            raise InvalidInputError(f"the transformer audit's {target} has {rows * columns} coordinates, fewer than "
                                    f"{canaries} canaries")
        coordinates = torch.arange(canaries)
        self.register_buffer("rows", coordinates // columns, persistent=False)
        self.register_buffer("columns", coordinates % columns, persistent=False)

    def forward(self, canary: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> AuditedOutput:
        base = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        own = canary.clamp(min=0)
        probe = torch.zeros(len(canary), 1, self.target.in_features, dtype=self.target.weight.dtype)
        probe[torch.arange(len(canary)), 0, self.columns[own]] = READ_SCALE * (canary >= 0).to(probe.dtype)
        marks = self.target(probe)[torch.arange(len(canary)), 0, self.rows[own]] / READ_SCALE
        return AuditedOutput(base, marks)

    def audit_coordinates(self) -> torch.Tensor:
        """The canaries' coordinates of the target weight as a vector (a copy), one per canary."""
        return self.target.weight.detach()[self.rows, self.columns].clone()
