"""White-box Dirac canaries inside the real DP-SGD engine (Nasr et al. 2023; Steinke, Nasr, Jagielski 2023).

A canary is a virtual record. The model gets an *audit block*, ``AuditedModel.audit``: an ``nn.Embedding`` of
one zero-initialised weight per canary that the classifier never reads. A batch carries a ``canary`` column:
-1 for a real record, the canary's number for a canary. A canary's loss is ``raw_norm * audit[i]``, so its
per-example gradient is ``raw_norm * e_i`` on the audit block and zero elsewhere; a real record's loss is the
model's own, so its gradient on the audit block is zero. Both pass through the engine unchanged: the Poisson
sampler (a canary is one more index), the per-example rules and clipping (``raw_norm`` > C, so every canary is
clipped to exactly C), the noise on every coordinate, the division by the expected batch size and the optimizer.
Nothing of the mechanism is re-implemented here: a broken engine shows in the canaries' coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

REAL_RECORD = -1


@dataclass
class AuditedOutput:
    """The wrapped model's own output and each example's read of the audit block ([B])."""

    base: object
    canary_marks: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        return self.base.logits


class AuditedModel(nn.Module):
    """``model`` plus the audit block; ``forward(canary, **inputs)`` runs ``model(**inputs)`` on every row."""

    def __init__(self, model: nn.Module, canaries: int):
        super().__init__()
        self.model = model
        self.audit = nn.Embedding(canaries, 1)
        nn.init.zeros_(self.audit.weight)

    def forward(self, canary: torch.Tensor, **inputs) -> AuditedOutput:
        marks = self.audit(canary.clamp(min=0)).squeeze(-1)
        return AuditedOutput(self.model(**inputs), marks)

    def audit_coordinates(self) -> torch.Tensor:
        """The audit block as a vector (a copy), one coordinate per canary."""
        return self.audit.weight.detach()[:, 0].clone()


def audited_loss(base_loss: Callable, raw_norm: float) -> Callable:
    """Per-example losses: the base loss for real records, ``raw_norm * audit[i]`` for canary i."""

    def loss(outputs: AuditedOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        is_canary = batch["canary"] != REAL_RECORD
        return torch.where(is_canary, raw_norm * outputs.canary_marks.float(), base_loss(outputs.base, batch))

    return loss


class CanaryCollator:
    """Batches over the virtual data set of the records (``inputs``: a features tensor, or a mapping of input
    tensors such as ``input_ids`` and ``attention_mask``; and ``labels``) followed by the included canaries: an
    index below N is a real record, index N + j is canary ``included[j]``. A canary row carries record 0's
    inputs and label 0, which its loss ignores (its model forward still runs, as a real record's does)."""

    def __init__(self, inputs: torch.Tensor | Mapping[str, torch.Tensor], labels: torch.Tensor, included: torch.Tensor):
        self.inputs = {"features": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
        self.labels = labels
        self.included = included.to(torch.int64)

    @property
    def records(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        """N plus the included canaries: what the sampler draws from and what q N' is scaled by."""
        return self.records + len(self.included)

    def __call__(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        real, virtual = indices[indices < self.records], indices[indices >= self.records]
        canary_ids = self.included[virtual - self.records]
        filler = torch.zeros(len(canary_ids), dtype=torch.int64)  # record 0, for every canary row
        batch = {name: torch.cat([tensor[real], tensor[filler]]) for name, tensor in self.inputs.items()}
        batch["labels"] = torch.cat([self.labels[real], torch.zeros(len(canary_ids), dtype=torch.int64)])
        batch["canary"] = torch.cat([torch.full((len(real),), REAL_RECORD, dtype=torch.int64), canary_ids])
        return batch
