"""``ewtune config check agent.toml`` answers at once: checking a valid agent.toml (a data holder's, or an audit
daemon's) through the real command loads neither torch, transformers, pandas, datasets nor flwr; the records of
the data file are counted without them (:mod:`ewtune.agent.record_count`), as the loader counts them, and a file
that count cannot vouch for is read by the loader itself, whose message the check reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import _agent_toml

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import SigningKey
from ewtune.agent.config_check import check_agent_config
from ewtune.agent.data import read_table
from ewtune.agent.record_count import count_records

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pandas", "datasets", "flwr")
# `python -m ewtune ARGS...`, then (at exit, after its SystemExit) the heavy packages it loaded, on stderr
PROBE = (
    "import atexit, runpy, sys; "
    f"atexit.register(lambda: print('loaded:', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), file=sys.stderr)); "
    "sys.argv = ['ewtune', *sys.argv[1:]]; runpy.run_module('ewtune', run_name='__main__')"
)

AUDIT_AGENT_TOML = """\
[holder]
id = "auditor"
[budget]
epsilon = 8.0
delta = 1e-5
[policy]
audit_runs = true
[ledger]
path = "state/ledger.jsonl"
signing_key = "ledger.key"
[rpc]
address = "unix:run/agent.sock"
[audit]
block = 40
first = 0
count = 20
breakage = "noise halved"
"""

# Data files as (name, text): the loader reads each; the light count gives its count or gives up (None)
COUNTED = {
    "plain.csv": "text,label\na,1\nb,0\n",
    "blank-lines.csv": "\ntext,label\n\na,1\n\n\nb,0",
    "quoted-newlines.csv": 'text,label\n"a\n\nb",1\n"",0\n,\n"x ""y""",1\n',
    "short-row-crlf.csv": "text,label\r\na\r\n\r\nb,0\r\n",
    "plain.jsonl": '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n',
    "int-then-float.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n',
}
GIVES_UP = {
    "whitespace-line.csv": "text,label\na,1\n   \nb,0\n",
    "longer-row.csv": "text,label\na,1\nb,0,3\n",
    "index-column.csv": "text,label\na,1,2\nb,0,3\n",
    "unclosed-quote.csv": 'text,label\n"abc,1\nd,0\n',
    "quote-then-text.csv": 'text,label\n"ab"c,1\n',
    "empty.csv": "",
    "header-only.csv": "text,label\n",
    "latin-1.csv": "text,label\ncaf\xe9,1\n",
    "array.json": '[{"text": "a", "label": 1}, {"text": "b", "label": 0}]',
    "type-change.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n',
    "scalar-line.jsonl": '{"text": "a", "label": 1}\n3\n',
    "not-parquet.parquet": "text,label\na,1\n",
    "tab-separated.tsv": "text\tlabel\na\t1\n",
}


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1" if path.name.startswith("latin-1") else "utf-8"))
    return path


def _loader_count(path: Path) -> int | str:
    """The loader's record count, or its one-line error."""
    try:
        return len(read_table(path))
    except InvalidInputError as error:
        return str(error)


def _run_ewtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_checking_a_valid_agent_toml_loads_neither_torch_transformers_pandas_nor_flwr(tmp_path, tiny_bert_dir, mr_csv):
    (tmp_path / "holder").mkdir(), (tmp_path / "audit").mkdir()
    holder = _agent_toml(tmp_path / "holder", tiny_bert_dir, mr_csv)
    SigningKey.generate().save(tmp_path / "audit" / "ledger.key")
    audit = _write(tmp_path / "audit" / "agent.toml", AUDIT_AGENT_TOML)
    for path, role in ((holder, "holder"), (audit, "audit daemon")):
        result = _run_ewtune("config", "check", str(path))
        assert result.returncode == 0, (role, result.stderr)
        assert result.stdout == f"{path}: valid agent configuration\n"
        assert result.stderr == "loaded: []\n", (role, result.stderr)
    # the probe sees them: a command that does load torch is reported
    loads_torch = subprocess.run([sys.executable, "-c", PROBE.replace("runpy.run_module('ewtune', run_name='__main__')", "import torch")],
                                 capture_output=True, text=True, timeout=300)
    assert loads_torch.stderr == "loaded: ['torch']\n"


def test_a_data_file_the_count_gives_up_on_is_read_by_the_loader_in_the_same_command(tmp_path, tiny_bert_dir, mr_csv):
    """A row longer than the header: the real command reports the loader's own message (pandas' error) and exits 2."""
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    bad = _write(tmp_path / "bad.csv", GIVES_UP["longer-row.csv"])
    path.write_text(path.read_text().replace(f'data_file = "{mr_csv}"', f'data_file = "{bad}"'))
    result = _run_ewtune("config", "check", "--json", str(path))
    assert result.returncode == 2, result.stderr
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem == {"key": "[training] data_file",
                       "reason": f"cannot read the examples of {bad}: {_loader_count(bad)}"}
    assert "cannot read" in _loader_count(bad) and "'pandas'" in result.stderr  # the loader read it


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_the_count_is_the_loaders(tmp_path, name):
    path = _write(tmp_path / name, COUNTED[name])
    assert count_records(path) == _loader_count(path)


def test_the_count_of_the_mr_data_is_the_loaders(mr_csv):
    """400 sentences of movie reviews, some quoted across lines."""
    assert count_records(mr_csv) == _loader_count(Path(mr_csv)) == 400


@pytest.mark.parametrize("name", sorted(GIVES_UP))
def test_the_count_gives_up_where_the_loader_may_read_otherwise_or_refuse(tmp_path, name):
    assert count_records(_write(tmp_path / name, GIVES_UP[name])) is None


def test_a_parquet_file_is_counted_from_its_footer(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path, empty = tmp_path / "data.parquet", tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a", "b", "c"], "label": [1, 0, 1]}), path)
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), empty)
    assert count_records(path) == _loader_count(path) == 3
    assert count_records(empty) is None and _loader_count(empty).startswith(f"cannot read {empty} as parquet")


def test_a_whitespace_line_is_no_record_in_the_delta_rule(tmp_path, tiny_bert_dir, mr_csv):
    """199 records and a line of spaces: delta = 0.00501 is below 1/199 (valid) but not below 1/200 (refused), so
    a count that took the blank line for a record would refuse this file."""
    rows = [f"record {number},{number % 2}" for number in range(199)]
    data = _write(tmp_path / "spaces.csv", "\n".join(["text,label", *rows[:100], "   ", *rows[100:]]) + "\n")
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    text = path.read_text().replace(f'data_file = "{mr_csv}"', f'data_file = "{data}"')
    path.write_text(text.replace("delta = 1e-5", "delta = 0.00501"))
    assert _loader_count(data) == 199
    assert check_agent_config(path).found == []
    path.write_text(path.read_text().replace("delta = 0.00501", "delta = 0.00503"))
    assert [problem.reason for problem in check_agent_config(path).found] == [
        f"delta 0.00503 is not below 1/N = 1/199: a guarantee with delta >= 1/N permits publishing a record outright "
        f"(N: the 199 records of {data})"
    ]
