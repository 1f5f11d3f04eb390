"""A batch of token ids with right padding and the per-example check the engine tests share: the clipped gradient sum
of ewtune's engine against a brute-force loop over batches of one (plain autograd, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ewtune.agent.dpsgd import PerExampleClipper
from ewtune.agent.dpsgd.engine import CLIP_EPSILON

VOCAB, BATCH, LENGTH = 101, 6, 10
LENGTHS = [10, 7, 4, 10, 2, 9]


def _perturb_lora(model: nn.Module) -> None:
    """LoRA's B starts at zero, which would leave A without gradient; move it away."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)


def _batch(task: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    ids[mask == 0] = 0  # padding token
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        batch["labels"] = torch.randint(0, 3, (BATCH,), generator=generator)
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
        batch["labels"] = labels
    return batch


def _reference(model, loss_fn, batch, params):
    """Per-example gradients by a loop over batches of one: [B, P] in float64."""
    rows = []
    for i in range(BATCH):
        single = {key: value[i : i + 1] for key, value in batch.items()}
        outputs = model(**{key: value for key, value in single.items() if key != "labels"})
        loss = loss_fn(outputs, single)[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows).double()


def _check_against_reference(model, loss_fn, batch):
    clipper_params = [p for p in model.parameters() if p.requires_grad]
    per_example = _reference(model, loss_fn, batch, clipper_params)
    norms = per_example.pow(2).sum(dim=1).sqrt()
    clip_norm = float(norms.median())
    factors = (clip_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
    expected = (factors[:, None] * per_example).sum(dim=0)

    clipper = PerExampleClipper(model, clip_norm, loss_fn)
    result = clipper.clipped_grad_sum(batch)
    got = torch.cat([result.grads[name].reshape(-1) for name in clipper.params]).double()

    assert list(clipper.params.values()) == clipper_params
    assert 0 < int((norms > clip_norm).sum()) < BATCH, "the test needs clipped and unclipped examples"
    assert result.count == BATCH
    torch.testing.assert_close(result.per_example_norms.double(), norms, rtol=1e-5, atol=0)
    relative = (got - expected).norm() / expected.norm()
    assert relative < 1e-5, f"clipped sum differs from the per-example loop by {relative:.2e} (relative L2)"
    losses = loss_fn(model(**{k: v for k, v in batch.items() if k != "labels"}), batch)
    assert result.loss_sum == pytest.approx(float(losses.detach().sum()), rel=1e-5)
    clipper.close()

