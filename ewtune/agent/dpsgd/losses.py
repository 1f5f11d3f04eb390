"""Per-example losses: one sequence is one example, the unit of privacy (a token-level loss would clip and
account tokens, not records).

Each function maps a model output and its batch to a ``Tensor[B]`` in float32, so that the engine can
differentiate every example's loss separately.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def classification_loss(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each example's logits against ``batch["labels"]``."""
    return F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")


def causal_lm_loss(outputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, padding ignored.

    Targets are ``batch["labels"]`` when present, else ``input_ids``; a target equal to -100 or at a
    position where ``attention_mask`` is 0 does not count. A sequence with no target scores 0.
    """
    logits = outputs.logits[:, :-1].float()
    targets = batch.get("labels", batch["input_ids"])[:, 1:].clone()
    if "attention_mask" in batch:
        targets[batch["attention_mask"][:, 1:] == 0] = IGNORE_INDEX
    token_losses = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return token_losses.sum(dim=1) / counts.clamp(min=1)
