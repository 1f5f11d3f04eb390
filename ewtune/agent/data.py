"""A holder's local data set: read from a CSV, JSON Lines or Parquet file, checked, split into training and
held-out evaluation examples record by record, tokenised, and collated into batches.

The split is by record, not by file: a record is held out when a keyed hash of its own content (HMAC-SHA256
under the holder's split key, over its text, text pair and label) falls below ``eval_fraction``, so adding or
removing one record moves no other record between training and evaluation, and neighbouring files give
training sets that differ in that one record (or evaluation sets that do). Identical records land on the same
side. ``max_examples`` keeps the records of smallest keyed hash (under a second, independent key derivation):
an order fixed per record, but a cap on a count is not a per-record rule, so with a file larger than the cap
one added record can push one other out (a replacement, not an addition); leave it unset for the exact
add/remove neighbourhood. The daemon's split key is secret to the holder (:func:`split_key`), so nobody else can
tell on which side a record lands; without one (train-local, tests, benchmarks) the key is derived from
``seed`` and public. The guarantee rests on the split being per record, not on the key's secrecy.

A record is always padded to a length fixed by its own length (:func:`ewtune.agent.dpsgd.unpadded.padded_length`), and
everything that computes on records does so one group of one padded length at a time (:func:`length_batches`,
:mod:`ewtune.agent.dpsgd.unpadded`), so padding never carries one record's influence into another's result.

Files are read through Hugging Face ``datasets`` (:func:`read_table`): converted once into Arrow files in a cache
directory (by default ``.ewtune-cache`` beside the data file, one folder per content digest, so an edited file is
never served from a stale cache; where the data's directory is read-only, one of the process's own) and memory-mapped from there; tokenisation is cached beside them, keyed by the
data, the tokenizer's files and the settings (:func:`_tokenised`), so a daemon's next start tokenises nothing.

For causal language modelling the privacy unit is one example, a whole sequence: its labels are its input ids
with padding masked to -100, and the engine reduces the token losses within each sequence before clipping.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import hmac
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.dpsgd.unpadded import padded_length, same_padding_chunks

READERS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BUILDERS = {"csv": "csv", "jsonl": "json", "parquet": "parquet"}  # the datasets builder of each format
CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}  # only an empty field is missing ("NA" is a text)
CACHE_FOLDER = ".ewtune-cache"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")  # fmt: skip
IGNORE_INDEX = -100
SPLIT_KEY_BYTES = 32
HASH_SCALE = 2.0**-64  # a keyed hash's first 8 bytes, read as an integer, times this: uniform on [0, 1)


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
    split_key: bytes | None = None  # the holder's secret (see split_key); None: public, derived from seed
    cache_dir: str | None = None  # Arrow and tokenisation caches; None: .ewtune-cache beside the data file


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


def read_table(path, cache_dir: str | Path | None = None) -> "datasets.Dataset":
    """The rows of a CSV, JSON Lines (``.jsonl``/``.json``) or Parquet file as a memory-mapped ``datasets.Dataset``,
    converted to Arrow once per content (:func:`cache_directory`); a file it cannot read is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InvalidInputError(f"{path}: unsupported format {path.suffix!r} (use .csv, .jsonl or .parquet)")
    cache = cache_directory(path, cache_dir)
    try:
        with _quiet_datasets():
            return datasets.load_dataset(BUILDERS[kind], data_files=str(path), split="train", cache_dir=str(cache),
                                         **(CSV_OPTIONS if kind == "csv" else {}))  # fmt: skip
    except Exception as error:  # datasets wraps each reader's own error types
        raise InvalidInputError(f"cannot read {path} as {kind}: {_root_cause(error)}") from None


def cache_directory(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the Arrow copy and the tokenisations of the file ``path`` live: ``CACHE/<name>-<SHA-256 of its
    content, 16 hex digits>``, CACHE being ``cache_dir``, else ``.ewtune-cache`` beside the file, else (a
    read-only data directory, as the agent's unit mounts /srv/ewtune) a temporary directory of this process,
    removed at its exit. Keyed by content, not by name or modification time, so a file rewritten in place never
    reads an older copy."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror or error}") from None
    name = f"{path.name}-{digest.hexdigest()[:16]}"
    if cache_dir is None:
        try:
            return _made(path.parent / CACHE_FOLDER / name)
        except OSError:
            return _made(_process_cache() / name)
    try:
        return _made(Path(cache_dir) / name)
    except OSError as error:
        raise InvalidInputError(f"cannot write the data cache {cache_dir}: {error.strerror or error}") from None


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@functools.cache
def _process_cache() -> Path:
    """This process's own cache directory, removed when it exits."""
    directory = Path(tempfile.mkdtemp(prefix="ewtune-data-cache-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars and no log lines from datasets while ewtune reads: its own progress goes to stderr as
    lines, and a file datasets cannot read is ewtune's one-line error, not a log record beside it."""
    shown, verbosity = datasets.utils.logging.is_progress_bar_enabled(), datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if shown:
            datasets.utils.logging.enable_progress_bar()


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error a reader raised (datasets wraps it in its own)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_local_data(spec: DataSpec, tokenizer) -> LocalData:
    """Read, check, split (record by record, see the module docstring) and tokenise the examples of ``spec``."""
    records, labels, num_labels, (training, held_out) = _read_records(spec)
    tokenised = _tokenised(records.dataset, spec, tokenizer)
    split = lambda rows: _subset(tokenised, records.source_rows, labels, rows)  # noqa: E731
    return LocalData(train=split(training), eval=split(held_out), num_labels=num_labels)


def split_sizes(spec: DataSpec) -> tuple[int, int]:
    """(training records, held-out records) of ``spec``, as :func:`load_local_data` splits them, without a
    tokenizer: a recipe can be fitted to the data (and refused) before any model loads."""
    *_, (training, held_out) = _read_records(spec)
    return len(training), len(held_out)


@dataclass(frozen=True)
class _Records:
    """A file's rows (``dataset``) and its complete records: ``table`` holds the columns ``spec`` reads of the
    rows where none is missing, ``source_rows[i]`` the row of ``dataset`` that record i is."""

    dataset: "datasets.Dataset"
    table: "pandas.DataFrame"  # noqa: F821
    source_rows: np.ndarray


def _read_records(spec: DataSpec):
    """The checked records of ``spec``, their labels (None for causal LM), the number of labels and the split."""
    if not 0.0 <= spec.eval_fraction < 1.0:
        raise InvalidInputError(f"eval_fraction must be in [0, 1), got {spec.eval_fraction}")
    if spec.max_length < 2:
        raise InvalidInputError(f"max_length must be >= 2, got {spec.max_length}")
    if spec.max_examples is not None and spec.max_examples < 2:
        raise InvalidInputError(f"max_examples must be >= 2, got {spec.max_examples}")
    dataset = read_table(spec.path, spec.cache_dir)
    classification = spec.task == "classification"
    columns = [spec.text_column] + [c for c in (spec.text_pair_column,) if c]
    columns += [spec.label_column] if classification else []
    _require_columns(dataset.column_names, columns, spec.path)
    table = dataset.select_columns(columns).to_pandas().dropna(subset=columns)
    records = _Records(dataset, table.reset_index(drop=True), table.index.to_numpy())
    if len(records.table) == 0:
        raise InvalidInputError(f"{spec.path} holds no examples with all of the columns {columns}")
    labels, num_labels = None, None
    if classification:
        labels, num_labels = _checked_labels(records.table[spec.label_column], spec.num_labels)
    return records, labels, num_labels, _split_rows(_record_contents(records.table, spec, labels), spec)


def _split_rows(contents: list[bytes], spec: DataSpec) -> tuple[list[int], list[int]]:
    """The rows kept for training and held out, each decided from its own content (the module docstring)."""
    key = spec.split_key if spec.split_key is not None else f"ewtune public split, seed {spec.seed}".encode()
    kept = range(len(contents))
    if spec.max_examples is not None:
        kept = sorted(kept, key=lambda row: keyed_uniform(key, b"keep", contents[row]))[: spec.max_examples]
    held_out = [row for row in kept if keyed_uniform(key, b"side", contents[row]) < spec.eval_fraction]
    held = set(held_out)
    training = [row for row in kept if row not in held]
    if not training:
        raise InvalidInputError(f"{spec.path}: too few examples ({len(kept)}) to hold out {spec.eval_fraction:.0%} "
                                "and keep one for training")
    return training, held_out


def keyed_uniform(key: bytes, purpose: bytes, content: bytes) -> float:
    """A number in [0, 1) fixed by one record's ``content`` and the key: the first 8 bytes of
    HMAC-SHA256(key, purpose || 0 || content) (RFC 2104) as an integer, times 2^-64. ``purpose`` separates the
    side of the split from the order of ``max_examples``, which must not be correlated."""
    digest = hmac.new(key, purpose + b"\0" + content, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") * HASH_SCALE


def _record_contents(table, spec: DataSpec, labels: list[int] | None) -> list[bytes]:
    """Each record's canonical content: the JSON array of its text, its text pair (or null) and its label
    (or null), as UTF-8. Row order and other columns do not enter."""
    texts = table[spec.text_column].astype(str).tolist()
    pairs = table[spec.text_pair_column].astype(str).tolist() if spec.text_pair_column else [None] * len(texts)
    labels = labels if labels is not None else [None] * len(texts)
    return [json.dumps([text, pair, label], ensure_ascii=False).encode() for text, pair, label in zip(texts, pairs, labels)]


def split_key(path) -> bytes:
    """The holder's secret split key in the file ``path``, created once (32 bytes from ``os.urandom``, mode
    0600) when it does not exist. It never leaves the holder: whoever knows it can tell which records are
    held out. The guarantee does not rest on its secrecy (the split is per record either way)."""
    path = Path(path)
    try:
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(os.urandom(SPLIT_KEY_BYTES))
        key = path.read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot create or read the split key {path}: {error.strerror or error}") from None
    if len(key) != SPLIT_KEY_BYTES:
        raise InvalidInputError(f"the split key {path} holds {len(key)} bytes, not {SPLIT_KEY_BYTES}")
    return key


def _require_columns(available: list[str], columns: list[str], path) -> None:
    missing = [column for column in columns if column not in available]
    if missing:
        raise InvalidInputError(f"{path} has no column {missing[0]!r} (available: {', '.join(map(str, available)) or 'none'})")


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


def _tokenised(dataset: "datasets.Dataset", spec: DataSpec, tokenizer) -> "datasets.Dataset":
    """``input_ids`` (and ``token_type_ids``) of every row of ``dataset``, each record tokenised alone (truncated to
    ``max_length``, never padded), in the same order. Computed once: written beside the data's Arrow copy under a
    fingerprint of the data, the tokenizer and the settings (:func:`_tokenisation_fingerprint`) and read back,
    memory-mapped, at the next load; a tokenizer without files to fingerprint is not cached."""
    columns = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else [])

    def encode(batch):
        texts = [str(text) for text in batch[spec.text_column]]
        pairs = [str(pair) for pair in batch[spec.text_pair_column]] if spec.text_pair_column else None
        if spec.task == "causal_lm" and pairs is not None:
            texts, pairs = [f"{text}\n{pair}" for text, pair in zip(texts, pairs)], None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=spec.max_length)
        return {key: encoded[key] for key in ("input_ids", "token_type_ids") if key in encoded}

    fingerprint = _tokenisation_fingerprint(dataset, spec, tokenizer)
    cached = fingerprint is not None
    with _quiet_datasets():
        return dataset.select_columns(columns).map(
            encode, batched=True, remove_columns=columns, load_from_cache_file=cached, keep_in_memory=not cached,
            new_fingerprint=fingerprint if cached else f"uncached-{os.urandom(8).hex()}",
        )  # fmt: skip


def _tokenisation_fingerprint(dataset: "datasets.Dataset", spec: DataSpec, tokenizer) -> str | None:
    """SHA-256 of what decides the tokens: the data's Arrow files (content-keyed, :func:`cache_directory`), the
    tokenizer's class, files and truncation side, the transformers version, ``max_length``, the columns and the
    task. None when the tokenizer has no files in its ``name_or_path`` directory."""
    directory = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files or not dataset.cache_files:
        return None

    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    settings = [[f["filename"] for f in dataset.cache_files], type(tokenizer).__name__, getattr(tokenizer, "truncation_side", None),
                transformers.__version__, spec.max_length, spec.text_column, spec.text_pair_column, spec.task]  # fmt: skip
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:32]


def _subset(tokenised: "datasets.Dataset", source_rows: np.ndarray, labels: list[int] | None, rows: list[int]) -> Examples:
    """The examples of the records ``rows`` (positions among the complete records), in that order."""
    picked = tokenised.select([int(source_rows[row]) for row in rows]).to_dict()
    return Examples(
        input_ids=picked["input_ids"],
        token_type_ids=picked.get("token_type_ids"),
        labels=[labels[row] for row in rows] if labels is not None else None,
    )


def collate(examples: Examples, indices, pad_token_id: int, task: str = "classification") -> dict[str, torch.Tensor]:
    """Right-padded tensors for the examples at ``indices``, to the padded length of the longest (possibly none:
    then every tensor has batch size 0). The clipper adds ``position_ids`` as [B, T] for the models that take
    them, and computes the batch one group of one padded length at a time, each record with its own padding."""
    indices = [int(i) for i in indices]
    length = padded_length(max((len(examples.input_ids[i]) for i in indices), default=1))
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


def length_batches(examples: Examples, pad_token_id: int, batch_size: int, task: str = "classification"):
    """(indices, batch) for every chunk of at most ``batch_size`` examples of one padded length, so that each
    carries its own padding only, covering every example once (shortest first), for evaluation and for the
    feature caches."""
    lengths = [len(ids) for ids in examples.input_ids]
    for chunk in same_padding_chunks(lengths, range(len(examples)), batch_size):
        yield chunk, collate(examples, chunk, pad_token_id, task)
