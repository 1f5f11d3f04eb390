"""Batches without padding: every record is computed only beside records of its own length.

A batch padded to its longest record is a channel between records. Weights chosen by a coordinator can make
the states at padded positions non-finite (an attention score that overflows only between two pad positions,
a huge pad embedding); through the attention over those positions the non-finite value reaches the padded
record's loss, and the record then contributes nothing. Whether one long record is present would decide
whether all the others count. Grouping the records by their real length and trimming each group to that
length leaves no padding anywhere, so a record's forward pass, loss, gradient and features are a function of
that record and the weights alone, whichever records share its batch. Sums of per-example terms simply add
across the groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from accountant.errors import InvalidInputError


def equal_length_chunks(lengths: Sequence[int], indices, size: int | None = None) -> list[list[int]]:
    """``indices`` grouped by ``lengths[index]`` (shortest first, each group in the order given), every
    group cut into consecutive chunks of at most ``size`` indices (``None``: no limit)."""
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(int(lengths[int(index)]), []).append(int(index))
    step = size or max(1, len(indices))
    return [group[start : start + step] for _, group in sorted(groups.items()) for start in range(0, len(group), step)]


def equal_length_parts(batch: Mapping[str, torch.Tensor], size: int | None = None) -> list[tuple[torch.Tensor, dict]]:
    """The right-padded ``batch`` as (rows, sub-batch) pairs, one per chunk of :func:`equal_length_chunks` by
    real length (the ``attention_mask`` row sums); ``rows`` index the batch. Every tensor whose second
    dimension is the batch's sequence length is trimmed to the chunk's length, so no sub-batch holds padding
    (a tensor that is not one row per record keeps all its rows).
    A batch without ``attention_mask`` has no padding and is only cut into chunks of ``size``; an empty
    batch has no parts. A batch that is one chunk already is returned as it is."""
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
    chunks = equal_length_chunks(lengths, range(count), size)
    if len(chunks) == 1 and (width is None or lengths[0] == width):
        return [(torch.arange(count), dict(batch))]
    parts = []
    for chunk in chunks:
        rows = torch.tensor(chunk, dtype=torch.int64)
        length = lengths[chunk[0]]
        parts.append((rows, {key: _take(value, rows, count, width, length) for key, value in batch.items()}))
    return parts


def _count(batch: Mapping[str, torch.Tensor]) -> int:
    if not batch:
        return 0
    return (batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))).shape[0]


def _take(value: torch.Tensor, rows: torch.Tensor, count: int, width: int | None, length: int) -> torch.Tensor:
    """The ``rows`` of a per-record tensor (a tensor with another first dimension, broadcast across the batch,
    is kept whole for the engine to refuse), trimmed to ``length`` along a sequence dimension."""
    picked = value[rows.to(value.device)] if value.dim() and value.shape[0] == count else value
    if width is not None and picked.dim() >= 2 and picked.shape[1] == width:
        return picked[:, :length]
    return picked
