"""A holder's local data set: read from a CSV, JSON Lines or Parquet file, checked, split into training and
held-out evaluation examples by a seed, tokenised, and collated into padded batches.

For causal language modelling the privacy unit is one example, a whole sequence: its labels are its input ids
with padding masked to -100, and the engine reduces the token losses within each sequence before clipping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from accountant.errors import InvalidInputError

READERS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DataSpec:
    """Where the examples are and how to read them."""

    path: str
    task: str = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    num_labels: int | None = None
    max_length: int = 128
    eval_fraction: float = 0.1
    seed: int = 0
    max_examples: int | None = None


@dataclass(frozen=True)
class Examples:
    """Tokenised examples: one list of token ids per example, and one label each (classification only)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class LocalData:
    train: Examples
    eval: Examples
    num_labels: int | None


def read_table(path) -> "pandas.DataFrame":  # noqa: F821
    """The rows of a CSV, JSON Lines (``.jsonl``/``.json``) or Parquet file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InvalidInputError(f"{path}: unsupported format {path.suffix!r} (use .csv, .jsonl or .parquet)")
    try:
        if kind == "csv":
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        if kind == "jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except Exception as error:  # pandas raises many parser-specific types
        raise InvalidInputError(f"cannot read {path} as {kind}: {str(error).splitlines()[0]}") from None


def load_local_data(spec: DataSpec, tokenizer) -> LocalData:
    """Read, check, split (seeded) and tokenise the examples named by ``spec``."""
    if not 0.0 <= spec.eval_fraction < 1.0:
        raise InvalidInputError(f"eval_fraction must be in [0, 1), got {spec.eval_fraction}")
    if spec.max_length < 2:
        raise InvalidInputError(f"max_length must be >= 2, got {spec.max_length}")
    table = read_table(spec.path)
    classification = spec.task == "classification"
    columns = [spec.text_column] + [c for c in (spec.text_pair_column,) if c]
    columns += [spec.label_column] if classification else []
    _require_columns(table, columns, spec.path)
    table = table.dropna(subset=columns)
    if len(table) == 0:
        raise InvalidInputError(f"{spec.path} holds no examples with all of the columns {columns}")
    order = np.random.default_rng(spec.seed).permutation(len(table))
    if spec.max_examples is not None:
        if spec.max_examples < 2:
            raise InvalidInputError(f"max_examples must be >= 2, got {spec.max_examples}")
        order = order[: spec.max_examples]
    table = table.iloc[order].reset_index(drop=True)
    labels, num_labels = None, None
    if classification:
        labels, num_labels = _checked_labels(table[spec.label_column], spec.num_labels)
    num_eval = int(round(len(table) * spec.eval_fraction))
    if len(table) - num_eval < 1:
        raise InvalidInputError(f"{spec.path}: too few examples ({len(table)}) to hold out {num_eval}")
    encoded = _tokenise(table, spec, tokenizer)
    split = lambda part: _subset(encoded, labels, part)  # noqa: E731
    return LocalData(train=split(slice(num_eval, None)), eval=split(slice(0, num_eval)), num_labels=num_labels)


def _require_columns(table, columns, path) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        available = ", ".join(map(str, table.columns)) or "none"
        raise InvalidInputError(f"{path} has no column {missing[0]!r} (available: {available})")


def _checked_labels(column, num_labels: int | None) -> tuple[list[int], int]:
    values = column.to_numpy()
    if values.dtype == bool:
        values = values.astype(int)
    try:
        as_float = values.astype(float)
    except (TypeError, ValueError):
        raise InvalidInputError(f"labels must be integers 0..num_labels-1, found {values[0]!r}") from None
    if not np.all(as_float == np.round(as_float)):
        raise InvalidInputError("labels must be integers 0..num_labels-1, found a fractional label")
    labels = as_float.astype(np.int64)
    num_labels = int(num_labels) if num_labels is not None else max(2, int(labels.max()) + 1)
    outside = labels[(labels < 0) | (labels >= num_labels)]
    if outside.size:
        raise InvalidInputError(f"label {int(outside[0])} is outside [0, {num_labels}) ({outside.size} such rows)")
    return labels.tolist(), num_labels


def _tokenise(table, spec: DataSpec, tokenizer) -> dict[str, list[list[int]]]:
    texts = table[spec.text_column].astype(str).tolist()
    pairs = table[spec.text_pair_column].astype(str).tolist() if spec.text_pair_column else None
    if spec.task == "causal_lm" and pairs is not None:
        texts, pairs = [f"{text}\n{pair}" for text, pair in zip(texts, pairs)], None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=spec.max_length)
    return {key: encoded[key] for key in ("input_ids", "token_type_ids") if key in encoded}


def _subset(encoded, labels, part: slice) -> Examples:
    return Examples(
        input_ids=encoded["input_ids"][part],
        token_type_ids=encoded["token_type_ids"][part] if "token_type_ids" in encoded else None,
        labels=labels[part] if labels is not None else None,
    )


def collate(examples: Examples, indices, pad_token_id: int, task: str = "classification") -> dict[str, torch.Tensor]:
    """Right-padded tensors for the examples at ``indices`` (possibly none: then every tensor has batch size 0
    and length 1). The clipper adds ``position_ids`` as [B, T] for the models that take them."""
    indices = [int(i) for i in indices]
    length = max((len(examples.input_ids[i]) for i in indices), default=1)
    input_ids = torch.full((len(indices), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, index in enumerate(indices):
        ids = examples.input_ids[index]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if examples.token_type_ids is not None:
        token_type_ids = torch.zeros_like(input_ids)
        for row, index in enumerate(indices):
            types = examples.token_type_ids[index]
            token_type_ids[row, : len(types)] = torch.tensor(types, dtype=torch.long)
        batch["token_type_ids"] = token_type_ids
    if task == "causal_lm":
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    else:
        batch["labels"] = torch.tensor([examples.labels[i] for i in indices], dtype=torch.long)
    return batch
