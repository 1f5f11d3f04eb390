"""Fine-tuning only the top k encoder layers (and the head) on cached hidden states of the frozen layers below.

Phase 2 of LP-FT (Kumar et al. 2022) over the whole encoder costs a full forward and per-example backward per
record and step, too slow for a CPU over a data set like MR. With only the top k of L layers trainable, the
hidden states entering layer L-k are a deterministic function of one record alone (the frozen embeddings and
lower layers, in eval mode: no dropout), so they are computed once per run and reused at every DP-SGD step:
like the probe's embedding cache (:mod:`ewtune.agent.heads`), the cache costs no privacy. Each step then runs only k
layers forward and backward. What is released and accounted is unchanged: per-example clipping and noise by
:mod:`ewtune.agent.dpsgd`, on the gradients of the trainable parameters (the top layers' LoRA factors or weights, and
the head), at the Poisson rate :mod:`ewtune.agent.sampler` executed.

Each record's states are computed with its own padding only (batches of one padded length), so that no
record's states depend on another's (padding is a channel between records when weights make padded positions
non-finite: :mod:`ewtune.agent.dpsgd.unpadded`), and kept trimmed to its real tokens; a batch of them is padded again,
each record to the length its own length fixes, and the attention mask makes that padding invisible to the real
tokens, so the cached forward equals the full one.

Supported encoders are those whose layers take (hidden states, additive attention mask) and nothing else
(:data:`MODEL_TYPES`; MPNet, for one, adds a relative position bias computed outside its layers).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.dpsgd.unpadded import padded_length, same_padding_chunks
from ewtune.agent.heads import PooledClassifier, eval_mode, in_order, input_batches, pool

MODEL_TYPES = ("bert", "roberta")
LAYER_PATTERN = "layer"  # the ModuleList of encoder layers, as peft's ``layers_pattern`` names it


def encoder_layers(model: PooledClassifier) -> nn.ModuleList:
    """The encoder layers of a pooled classifier whose layers can run on cached hidden states."""
    if not isinstance(model, PooledClassifier):
        raise InvalidInputError("tuning the top layers on cached hidden states needs a sentence-embedding (pooled) "
                                "checkpoint; use --tune-layers 0 to tune the whole model")
    model_type = model.config.model_type
    if model_type not in MODEL_TYPES:
        raise InvalidInputError(f"tuning the top layers on cached hidden states supports {', '.join(MODEL_TYPES)} "
                                f"encoders, not {model_type!r}; use --tune-layers 0 to tune the whole model")
    return model.encoder.encoder.layer


def top_layer_indices(model: PooledClassifier, count: int) -> list[int]:
    """The indices of the top ``count`` encoder layers (1 <= count <= L)."""
    total = len(encoder_layers(model))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise InvalidInputError(f"tune_layers must be an integer from 1 to the encoder's {total} layers, got {count!r}")
    return list(range(total - count, total))


class TopLayers(nn.Module):
    """``classifier(pool(top k layers(hidden_states)))``: the pooled classifier from layer L-k up, on the hidden
    states entering that layer. Shares its parameters with ``model`` (LoRA adapters included)."""

    def __init__(self, model: PooledClassifier, count: int):
        super().__init__()
        self.model = model
        self.layers = [encoder_layers(model)[index] for index in top_layer_indices(model, count)]

    def embed(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled sentence embedding [B, H]."""
        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        return pool(hidden_states, attention_mask, self.model.pooling)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.model.classifier(self.embed(hidden_states, attention_mask)))

    @torch.no_grad()
    def embed_cached(self, records: list[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
        """The pooled embedding of every cached record, in order, in eval mode (as
        :func:`ewtune.agent.heads.embed_examples` computes it through the whole encoder); the mode is restored."""
        with eval_mode(self.model):
            chunks = same_padding_chunks([len(record) for record in records], range(len(records)), batch_size)
            return in_order([(chunk, self.embed(**hidden_batch(records, None, chunk))) for chunk in chunks])


@torch.no_grad()
def hidden_states_below(model: PooledClassifier, count: int, examples, pad_token_id: int, batch_size: int = 64,
                        device: str | None = None) -> list[torch.Tensor]:
    """Each example's hidden states [its tokens, H] entering the top ``count`` layers, in order, computed in eval
    mode on ``device`` (the model's) and kept there, each record with its own padding only; the model's train/eval
    mode is restored."""
    first = top_layer_indices(model, count)[0]
    records: list[torch.Tensor | None] = [None] * len(examples)
    with eval_mode(model):
        for indices, inputs in input_batches(examples, pad_token_id, batch_size, device):
            states = model.encoder(**inputs, output_hidden_states=True).hidden_states[first]
            for index, row, mask in zip(indices, states, inputs["attention_mask"]):
                records[index] = row[mask.bool()]
    return records


def hidden_batch(records: list[torch.Tensor], labels: torch.Tensor | None, indices) -> dict[str, torch.Tensor]:
    """The cached states of the records at ``indices``, right-padded to the padded length of the longest
    (:func:`ewtune.agent.dpsgd.unpadded.padded_length`), with their attention mask (and their labels when ``labels`` is
    given); the states and the mask on the records' device, the labels where ``labels`` are."""
    indices = [int(i) for i in indices]
    rows = [records[i] for i in indices]
    if rows:
        length, device = padded_length(max(len(row) for row in rows)), rows[0].device
        lengths = torch.tensor([len(row) for row in rows], device=device)
        batch = {"hidden_states": nn.functional.pad(nn.utils.rnn.pad_sequence(rows, batch_first=True),
                                                    (0, 0, 0, length - max(len(row) for row in rows))),
                 "attention_mask": (torch.arange(length, device=device)[None, :] < lengths[:, None]).long()}
    else:
        batch = {"hidden_states": records[0].new_zeros((0, 1, records[0].shape[-1])), "attention_mask": torch.zeros((0, 1), dtype=torch.long)}
    if labels is not None:
        batch["labels"] = labels[torch.as_tensor(indices, dtype=torch.int64)]
    return batch
