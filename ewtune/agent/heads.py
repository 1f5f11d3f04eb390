"""A classification head on the sentence embedding a checkpoint was trained to produce.

Sentence-transformers checkpoints (all-MiniLM-L6-v2, all-mpnet-base-v2) were trained to embed a sentence as a
pooling of the encoder's token states, here the mean over the real tokens, then normalised to unit length; their
BERT [CLS] pooler was never trained. A classification head on that pooler starts from features that carry little
of the sentence's meaning, and under DP noise it learns nothing (a private LoRA run on MR ended at the majority
class). So when the model directory describes its pooling (``modules.json`` naming a
``sentence_transformers.models.Pooling`` module and its ``config.json``), the classifier is a freshly initialised
linear layer on exactly that embedding; [CLS] pooling is used only where the checkpoint says it was trained so.

The embedding is a deterministic function of one record (in eval mode), so a frozen encoder's embeddings can be
computed once and reused for every DP step (``features=``): linear probing under DP then costs a linear layer per
step (Tramer & Boneh 2021, "Differentially private learning needs better features").

A saved :class:`PooledClassifier` is its encoder in Hugging Face format, the checkpoint's pooling files, and the
head (``classifier.safetensors``), from which :func:`ewtune.agent.models.load_model` rebuilds the same model.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.data import length_batches

POOLING_MODULE = "sentence_transformers.models.Pooling"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
HEAD_FILE = "classifier.safetensors"
MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class Pooling:
    """How a checkpoint embeds a sentence: ``mode`` (mean, cls or max over the token states), then an optional
    unit-length normalisation; ``files`` are the sentence-transformers files that describe it."""

    mode: str
    normalize: bool
    files: tuple[str, ...]


def read_pooling(model_dir: Path) -> Pooling | None:
    """The pooling described by ``model_dir/modules.json``, or None when the directory has none."""
    modules_path = Path(model_dir) / "modules.json"
    if not modules_path.is_file():
        return None
    try:
        modules = json.loads(modules_path.read_text())
        pooling_entry = next((m for m in modules if m.get("type") == POOLING_MODULE), None)
        if pooling_entry is None:
            return None
        config = json.loads((Path(model_dir) / pooling_entry["path"] / "config.json").read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as bad:
        raise InvalidInputError(f"{modules_path}: the sentence-transformers pooling description is unreadable ({bad})") from None
    chosen = [mode for key, mode in MODES.items() if config.get(key)]
    if len(chosen) != 1:
        raise InvalidInputError(f"{modules_path}: expected one pooling mode among {sorted(MODES)}, got {chosen or 'none'}")
    normalize = any(m.get("type") == NORMALIZE_MODULE for m in modules)
    files = ("modules.json", *(m["path"] for m in modules if m.get("path")))
    return Pooling(chosen[0], normalize, files)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """The sentence embedding [B, H] of token states [B, T, H] (padding excluded by ``attention_mask``)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "mean":
        embedded = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    elif pooling.mode == "cls":
        embedded = hidden[:, 0]
    else:
        embedded = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    return nn.functional.normalize(embedded, dim=-1) if pooling.normalize else embedded


class PooledClassifier(nn.Module):
    """``classifier(pool(encoder(text)))``, or ``classifier(features)`` on precomputed embeddings."""

    def __init__(self, encoder: nn.Module, pooling: Pooling, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids, attention_mask, token_type_ids=None, position_ids=None) -> torch.Tensor:
        outputs = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids
        )
        return pool(outputs.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, features=None):
        if features is None:
            features = self.embed(input_ids, attention_mask, token_type_ids, position_ids)
        return SequenceClassifierOutput(logits=self.classifier(features))

    def save(self, directory: Path, source_dir: Path) -> None:
        """The encoder (Hugging Face format), the pooling files copied from ``source_dir``, the head."""
        self.encoder.save_pretrained(directory, safe_serialization=True)
        copy_pooling_files(source_dir, directory, self.pooling)
        head = {name: tensor.detach().contiguous() for name, tensor in self.classifier.state_dict().items()}
        save_file(head, str(Path(directory) / HEAD_FILE))

    def load_head(self, directory: Path) -> None:
        """The head saved by :meth:`save` in ``directory``, when there is one."""
        path = Path(directory) / HEAD_FILE
        if path.is_file():
            state = load_file(str(path))
            if {name: tuple(t.shape) for name, t in state.items()} != {n: tuple(p.shape) for n, p in self.classifier.state_dict().items()}:
                raise InvalidInputError(f"{path} does not fit this model's classification head")
            self.classifier.load_state_dict(state)


@torch.no_grad()
def embed_examples(model: PooledClassifier, examples, pad_token_id: int, batch_size: int = 64, device: str | None = None) -> torch.Tensor:
    """The pooled embedding of every example, in order (on the CPU), computed in eval mode (no dropout) with each
    record padded by its own length alone: a deterministic function of each record alone. The model's train/eval mode is
    restored afterwards."""
    with eval_mode(model):
        return in_order([(indices, model.embed(**inputs).cpu())
                         for indices, inputs in input_batches(examples, pad_token_id, batch_size, device)])


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode (no dropout) within the block; its train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def input_batches(examples, pad_token_id: int, batch_size: int, device: str | None = None):
    """(indices, model inputs with the labels left out) of batches of ``examples`` of one padded length, each
    record with its own padding only (:func:`ewtune.agent.data.length_batches`), covering every example once."""
    for indices, batch in length_batches(examples, pad_token_id, batch_size):
        yield indices, {key: value.to(device) if device else value for key, value in batch.items() if key != "labels"}


def in_order(parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """The rows of ``parts`` ((indices, rows) pairs covering 0..n-1 once) stacked in index order."""
    order = torch.tensor([index for indices, _ in parts for index in indices], dtype=torch.int64)
    rows = torch.cat([values for _, values in parts])
    ordered = torch.empty_like(rows)
    ordered[order] = rows
    return ordered


def copy_pooling_files(source_dir: Path, target_dir: Path, pooling: Pooling) -> None:
    for name in pooling.files:
        source, target = Path(source_dir) / name, Path(target_dir) / name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy(source, target)
