"""``ewtune config check`` and the check before ``ewtune agent start`` / ``coordinator run``: every problem of
an agent.toml or federation.toml (wrong key, type, range, path, key permission) is reported at once with the
file and the key, and nothing starts."""

from __future__ import annotations

import json

import pytest

from ewtune.accountant.config_check import InvalidConfiguration
from ewtune.agent.config_check import check_agent_config
from ewtune.coordinator.config_check import check_federation_config
from ewtune.cli import main
from support.daemon import _agent_toml

FEDERATION = """\
[federation]
name = "t"
rounds = 2
local_steps = 5
expected_batch_size = 16
clip_norm = 1.0
learning_rate = 0.01
target_epsilon = 8.0
delta = 1e-5
min_holders = 1
[coordinator]
ledger = "state/ledger.jsonl"
signing_key = "ledger.key"
registry = "supernodes.json"
output_dir = "runs/t"
[model]
initial_weights = "initial.safetensors"
[timeouts]
nodes = 30
"""


def _keys(problems):
    return sorted(problem.key for problem in problems.found)


def test_a_valid_agent_toml_passes(tmp_path, tiny_bert_dir, mr_csv, capsys):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    assert check_agent_config(path).found == []
    assert main(["config", "check", str(path)]) == 0
    assert "valid agent configuration" in capsys.readouterr().out


def test_every_problem_of_an_agent_toml_is_reported_at_once(tmp_path, tiny_bert_dir, mr_csv, capsys):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    text = path.read_text()
    for old, new in (("epsilon = 8.0", "epsilon = -1.0"), ("max_clip_norm = 5.0", "max_clip_norm = 0.0\ncolour = 1"),
                     ("max_steps_per_round = 100", "max_steps_per_round = \"many\""),
                     (f'model_dir = "{tiny_bert_dir}"', f'model_dir = "{tmp_path}"'),
                     (f'data_file = "{mr_csv}"', 'data_file = "missing.csv"'),
                     ("[rpc]", "[extra]\nx = 1\n[rpc]")):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    (tmp_path / "ledger.key").chmod(0o644)
    problems = check_agent_config(path)
    assert _keys(problems) == [
        "[budget] epsilon", "[extra]", "[ledger] signing_key", "[policy] colour", "[policy] max_clip_norm",
        "[policy] max_steps_per_round", "[training] data_file", "[training] model_dir",
    ]
    reasons = {problem.key: problem.reason for problem in problems.found}
    assert "finite number > 0" in reasons["[budget] epsilon"] and "mode 0644" in reasons["[ledger] signing_key"]
    assert "no config.json" in reasons["[training] model_dir"] and "must be an integer" in reasons["[policy] max_steps_per_round"]

    assert main(["config", "check", str(path), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["role"] == "agent" and not report["ok"] and len(report["problems"]) == 8

    # nothing starts: `ewtune agent init` refuses with one line naming every problem, and writes no ledger
    assert main(["agent", "init", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "8 problems, nothing started" in error and "[policy] colour" in error
    assert not (tmp_path / "state").exists()


def test_a_delta_at_or_above_one_over_the_records_is_refused(tmp_path, tiny_bert_dir, mr_csv):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    path.write_text(path.read_text().replace("delta = 1e-5", "delta = 0.01"))  # max_examples = 200: 1/N = 0.005
    problems = check_agent_config(path)
    assert _keys(problems) == ["[budget] delta"] and "1/N = 1/200" in problems.found[0].reason


def test_ewtune_agent_start_checks_the_file_before_anything_loads(tmp_path, tiny_bert_dir, mr_csv, capsys):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    path.write_text(path.read_text().replace("[training]", "[training]\nlora_rank = \"eight\""))
    assert main(["agent", "start", "--config", str(path)]) == 2
    assert "[training] lora_rank: must be an integer" in capsys.readouterr().err


@pytest.fixture
def federation_toml(tmp_path):
    from ewtune.accountant.signing import SigningKey

    SigningKey.generate().save(tmp_path / "ledger.key")
    (tmp_path / "supernodes.json").write_text("[]")
    (tmp_path / "initial.safetensors").write_bytes(b"weights")
    path = tmp_path / "federation.toml"
    path.write_text(FEDERATION)
    return path


def test_a_valid_federation_toml_passes(federation_toml, capsys):
    assert check_federation_config(federation_toml).found == []
    assert main(["config", "check", str(federation_toml)]) == 0
    assert "valid federation configuration" in capsys.readouterr().out


def test_every_problem_of_a_federation_toml_is_reported_at_once(federation_toml, capsys):
    text = FEDERATION.replace("target_epsilon = 8.0", "target_epsilon = 0.0").replace("delta = 1e-5", "delta = 1.5")
    text = text.replace("clip_norm = 1.0", "clip_norm = -1.0").replace("nodes = 30", "nodes = -5\nround = \"long\"")
    text = text.replace('initial_weights = "initial.safetensors"', 'initial_weights = "gone.safetensors"\ncolour = 1')
    federation_toml.write_text(text)
    problems = check_federation_config(federation_toml)
    assert _keys(problems) == [
        "[federation] clip_norm", "[federation] delta", "[federation] target_epsilon", "[model] colour",
        "[model] initial_weights", "[timeouts] nodes", "[timeouts] round",
    ]
    with pytest.raises(InvalidConfiguration, match="7 problems"):
        problems.raise_if_any()
    assert main(["coordinator", "run", "--config", str(federation_toml), "--state-dir", str(federation_toml.parent)]) == 2
    assert "[federation] delta" in capsys.readouterr().err


def test_a_federation_of_an_unknown_task_is_refused_before_it_runs(federation_toml, capsys):
    """The coordinator writes the final adapter for [model] task: an unknown task is refused, not exported as some model."""
    federation_toml.write_text(FEDERATION.replace('[model]', '[model]\ntask = "translation"'))
    assert [str(problem).removeprefix(f"{federation_toml}: ") for problem in check_federation_config(federation_toml).found] == [
        "[model] task: must be one of classification, causal_lm, got 'translation'"
    ]
    assert main(["coordinator", "run", "--config", str(federation_toml), "--state-dir", str(federation_toml.parent)]) == 2
    assert "[model] task" in capsys.readouterr().err


def test_a_file_of_neither_role_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x.toml").write_text("[something]\na = 1\n")
    assert main(["config", "check", str(tmp_path / "x.toml")]) == 2
    assert "pass --role" in capsys.readouterr().err


def test_a_misspelt_key_is_refused_naming_the_key_it_most_likely_meant(tmp_path, tiny_bert_dir, mr_csv):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)  # its [training] sets max_examples = 200
    path.write_text(path.read_text().replace("max_examples = 200", "max-examples = 200"))  # the CLI's spelling
    problems = check_agent_config(path)
    assert _keys(problems) == ["[training] max-examples"]
    assert problems.found[0].reason.startswith("unknown key; did you mean 'max_examples'? (known: ")
    path.write_text(path.read_text().replace("max-examples = 200", "colour = 1"))
    assert check_agent_config(path).found[0].reason.startswith("unknown key (known: ")  # nothing close: no guess


def test_a_bad_device_or_precision_is_reported_and_a_good_one_passes(tmp_path, tiny_bert_dir, mr_csv, capsys):
    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    text = path.read_text()
    path.write_text(text.replace("[training]", '[training]\ndevice = "gpu"\nprecision = "fp16"'))
    problems = check_agent_config(path)
    reasons = {problem.key: problem.reason for problem in problems.found}
    assert _keys(problems) == ["[training] device", "[training] precision"]
    assert "device must be auto (CUDA when present, else CPU), cpu, cuda or cuda:N, got 'gpu'" in reasons["[training] device"]
    assert "precision must be one of fp32, bf16, got 'fp16'" in reasons["[training] precision"]
    assert main(["agent", "start", "--config", str(path)]) == 2  # nothing starts
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "[training] device" in error
    # the names alone are checked here (torch is not asked whether this machine has the device)
    path.write_text(text.replace("[training]", '[training]\ndevice = "cuda:3"\nprecision = "bf16"'))
    assert check_agent_config(path).found == []


def test_the_agent_toml_loader_refuses_a_bad_device_in_one_line(tmp_path, tiny_bert_dir, mr_csv):
    from ewtune.accountant.errors import InvalidInputError
    from ewtune.agent.policy import load_agent_config

    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    path.write_text(path.read_text().replace("[training]", '[training]\ndevice = "cuda:x"'))
    with pytest.raises(InvalidInputError, match=r"agent.toml: \[training\] device must be auto") as error:
        load_agent_config(path)
    assert "\n" not in str(error.value)
    path.write_text(path.read_text().replace('device = "cuda:x"', 'device = "cpu"\nprecision = "bf16"'))
    assert load_agent_config(path).training["device"] == "cpu"  # bf16 on the CPU is refused when the daemon resolves it
