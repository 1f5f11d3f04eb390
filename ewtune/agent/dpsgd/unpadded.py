"""Padding that depends on the record alone: every record is padded to a length fixed by its own length.

A batch padded to its longest record is a channel between records. Weights chosen by a coordinator can make
the states at padded positions non-finite (an attention score that overflows only between two pad positions,
a huge pad embedding); through the attention over those positions the non-finite value reaches the padded
record's loss, and the record then contributes nothing. Whether one long record is present would decide
whether all the others count. Here a record of n tokens is always padded to ``padded_length(n)``, the next
multiple of :data:`PAD_MULTIPLE`, whatever else is in its batch, and records are computed in groups of one
padded length. A record's forward pass, loss, gradient and features are then a function of that record and the
weights alone (hostile weights can zero a record through its own padding, never through another's), and
sums of per-example terms simply add across the groups. A multiple of 8 wastes at most 7 tokens per record
and keeps the groups few (5 for lengths 32 to 64), which a group per exact length would not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ewtune.accountant.errors import InvalidInputError

PAD_MULTIPLE = 8
PAD_FILL = {"labels": -100}  # what a tensor is extended with up to its padded length; 0 for every other key


def padded_length(length: int) -> int:
    """The length a record of ``length`` tokens is padded to: the next multiple of :data:`PAD_MULTIPLE`."""
    return -(-int(length) // PAD_MULTIPLE) * PAD_MULTIPLE


def same_padding_chunks(lengths: Sequence[int], indices, size: int | None = None) -> list[list[int]]:
    """``indices`` grouped by ``padded_length(lengths[index])`` (shortest first, each group in the order given),
    every group cut into consecutive chunks of at most ``size`` indices (``None``: no limit)."""
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(padded_length(lengths[int(index)]), []).append(int(index))
    step = size or max(1, len(indices))
    return [group[start : start + step] for _, group in sorted(groups.items()) for start in range(0, len(group), step)]


def own_padding_parts(batch: Mapping[str, torch.Tensor], size: int | None = None) -> list[tuple[torch.Tensor, dict]]:
    """The right-padded ``batch`` as (rows, sub-batch) pairs, one per chunk of :func:`same_padding_chunks` by
    real length (the ``attention_mask`` row sums); ``rows`` index the batch. Every tensor whose second
    dimension is the batch's sequence length is cut or extended (with :data:`PAD_FILL`) to the chunk's padded
    length, so each record carries its own padding and no other (a tensor that is not one row per record keeps
    all its rows). A batch without ``attention_mask`` has no padding and is only cut into chunks of ``size``;
    an empty batch has no parts. A batch that is one chunk already is returned as it is."""
    count = _count(batch)
    if count == 0:
        return []
    if "attention_mask" not in batch:
        lengths, width = [0] * count, None
    else:
        mask = batch["attention_mask"]
        width = mask.shape[1]
        lengths = mask.sum(dim=1)
        if not torch.equal(mask.bool(), torch.arange(width, device=mask.device) < lengths[:, None]):
            raise InvalidInputError("a batch's attention mask must be right padding (ones, then zeros)")
        lengths = lengths.tolist()
    chunks = same_padding_chunks(lengths, range(count), size)
    if len(chunks) == 1 and (width is None or padded_length(lengths[0]) == width):
        return [(torch.arange(count), dict(batch))]
    parts = []
    for chunk in chunks:
        rows = torch.tensor(chunk, dtype=torch.int64)
        length = padded_length(lengths[chunk[0]])
        parts.append((rows, {key: _take(key, value, rows, count, width, length) for key, value in batch.items()}))
    return parts


def _count(batch: Mapping[str, torch.Tensor]) -> int:
    if not batch:
        return 0
    return (batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))).shape[0]


def _take(key: str, value: torch.Tensor, rows: torch.Tensor, count: int, width: int | None, length: int) -> torch.Tensor:
    """The ``rows`` of a per-record tensor (a tensor with another first dimension, broadcast across the batch,
    is kept whole for the engine to refuse), cut or extended to ``length`` along a sequence dimension."""
    picked = value[rows.to(value.device)] if value.dim() and value.shape[0] == count else value
    if width is None or picked.dim() < 2 or picked.shape[1] != width:
        return picked
    if length <= width:
        return picked[:, :length]
    extension = picked.new_full((picked.shape[0], length - width, *picked.shape[2:]), PAD_FILL.get(key, 0))
    return torch.cat([picked, extension], dim=1)
