"""The data path through Hugging Face ``datasets``: CSV, JSON Lines and Parquet become memory-mapped Arrow files
in a content-keyed cache, tokenised once (the next load reads the tokens back), and a file no reader can parse
is one line, naming the file and the reader's reason."""

from __future__ import annotations

import json
import os
import tempfile

import datasets
import pandas as pd
import pytest

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.data import CACHE_FOLDER, DataSpec, load_local_data, read_table
from ewtune.cli import main

ROWS = [{"text": f"review {i}: " + "a rather good film " * (1 + i % 4), "label": i % 2} for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    from ewtune.agent.models import load_tokenizer

    return load_tokenizer(tiny_bert_dir)


def write(path, rows=ROWS):
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_format_is_read_through_datasets_into_memory_mapped_arrow_beside_the_file(tmp_path, tokenizer, suffix):
    path = write(tmp_path / f"data{suffix}")
    table = read_table(path)
    assert isinstance(table, datasets.Dataset) and table.column_names == ["text", "label"] and len(table) == len(ROWS)
    assert table.cache_files and all(f["filename"].startswith(str(tmp_path / CACHE_FOLDER)) for f in table.cache_files)
    data = load_local_data(DataSpec(path=str(path), eval_fraction=0.0, max_length=12), tokenizer)
    expected = tokenizer([row["text"] for row in ROWS], truncation=True, max_length=12)
    assert data.train.input_ids == expected["input_ids"] and data.train.token_type_ids == expected["token_type_ids"]
    assert data.train.labels == [row["label"] for row in ROWS]


def test_tokenisation_runs_once_and_settings_that_change_the_tokens_run_it_again(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "data.csv")
    spec = DataSpec(path=str(path), eval_fraction=0.2, max_length=12)
    first = load_local_data(spec, tokenizer)

    def tokenised_again(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(type(tokenizer), "__call__", tokenised_again)
    assert load_local_data(spec, tokenizer) == first  # read back from the cache: the tokenizer is never called
    with pytest.raises(AssertionError, match="tokenised again"):
        load_local_data(DataSpec(path=str(path), eval_fraction=0.2, max_length=10), tokenizer)
    with pytest.raises(AssertionError, match="tokenised again"):  # another content under the same name and time
        stat = path.stat()
        write(path, [dict(row, text=row["text"].upper()) for row in ROWS])
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        load_local_data(spec, tokenizer)


def test_a_file_rewritten_in_place_is_never_read_from_the_older_copy(tmp_path, tokenizer):
    path = write(tmp_path / "data.csv")
    load_local_data(DataSpec(path=str(path), eval_fraction=0.0), tokenizer)
    stat = path.stat()
    swapped = [dict(row, label=1 - row["label"]) for row in ROWS]  # same size, same modification time
    write(path, swapped)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert load_local_data(DataSpec(path=str(path), eval_fraction=0.0), tokenizer).train.labels == [row["label"] for row in swapped]


def test_a_given_cache_directory_holds_every_cache_file_and_the_data_directory_none(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    path = write(tmp_path / "data" / "data.parquet")
    load_local_data(DataSpec(path=str(path), eval_fraction=0.1, cache_dir=str(tmp_path / "cache")), tokenizer)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["data.parquet"]
    assert list((tmp_path / "cache").rglob("*.arrow"))


def test_a_data_directory_where_no_cache_can_be_made_is_read_with_a_cache_of_the_process(tmp_path, tokenizer):
    """As under the agent's unit, which mounts /srv/ewtune read-only: here .ewtune-cache is a file, not a folder."""
    path = write(tmp_path / "data.jsonl")
    (tmp_path / CACHE_FOLDER).write_text("not a directory")
    data = load_local_data(DataSpec(path=str(path), eval_fraction=0.0, max_length=12), tokenizer)
    assert data.train.input_ids == tokenizer([row["text"] for row in ROWS], truncation=True, max_length=12)["input_ids"]
    assert read_table(path).cache_files[0]["filename"].startswith(tempfile.gettempdir() + "/ewtune-data-cache-")
    assert (tmp_path / CACHE_FOLDER).read_text() == "not a directory"


@pytest.mark.parametrize("name, content, reason", [
    ("bad.parquet", b"PAR1 this is not parquet", "cannot read {path} as parquet: "),
    ("bad.jsonl", b'{"text": "fine", "label": 1}\n{"text": oops}\n', "cannot read {path} as jsonl: "),
    ("bad.csv", b'text,label\n"an unterminated quote,1\n', "cannot read {path} as csv: "),
    ("empty.csv", b"", "cannot read {path} as csv: "),
])  # fmt: skip
def test_a_file_no_reader_parses_is_one_line_before_any_model_loads(tmp_path, tokenizer, tiny_bert_dir, capsys, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="^" + reason.format(path=path).replace(".", r"\.")):
        load_local_data(DataSpec(path=str(path)), tokenizer)
    code = main(["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(path), "--epsilon", "8",
                 "--delta", "1e-5"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and reason.format(path=path) in err, err
