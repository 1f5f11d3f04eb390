"""`ewtune keys init`, `ewtune coordinator status|run` argument handling: files written, tables printed,
one-line errors with exit code 2 for bad input."""

import json

from ewtune.cli import main

FEDERATION = """
[federation]
name = "t"
rounds = 2
local_steps = 3
expected_batch_size = 10
clip_norm = 1.0
learning_rate = 0.1
target_epsilon = 8.0
delta = 1e-5
[coordinator]
ledger = "ledger.jsonl"
signing_key = "coordinator.key"
output_dir = "out"
[model]
initial_weights = "initial.safetensors"
"""


def test_keys_init_writes_the_credentials(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "keys"), "--holders", "a", "b"]) == 0
    for path in ("ca/ca.crt", "superlink/server.pem", "holders/a/supernode.key", "holders/b/ledger.key", "coordinator/ledger.key"):
        assert (tmp_path / "keys" / path).is_file()
    assert "registry" in capsys.readouterr().out
    assert main(["keys", "init", str(tmp_path / "keys"), "--holders", "a"]) == 2  # never overwrites


def test_status_prints_the_holder_table(tmp_path, capsys):
    (tmp_path / "federation.toml").write_text(FEDERATION)
    (tmp_path / "out").mkdir()
    status = {
        "run_id": "t-1", "state": "finished", "reason": None, "rounds_completed": 2, "rounds_planned": 2,
        "holders": {"a": {"budget_epsilon": 8.0, "epsilon_certified": 7.9, "epsilon_edgeworth_estimate": 6.1, "epsilon_rdp": 9.5,
                          "noise_multiplier": 0.7, "rounds_committed": 2, "accuracy": {"0": 0.5, "1": 0.61, "2": 0.7}}},
        "skipped": {"b": "its budget is spent"},
    }
    (tmp_path / "out" / "status.json").write_text(json.dumps(status))
    assert main(["coordinator", "status", "--config", str(tmp_path / "federation.toml")]) == 0
    out = capsys.readouterr().out
    assert "| a | 8.000 | 7.900 | 6.100 | 9.500 | 0.700 | 2 | 0:0.500 1:0.610 2:0.700 |" in out
    assert "skipped: its budget is spent" in out


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["coordinator", "status", "--config", str(tmp_path / "missing.toml")]) == 2
    (tmp_path / "federation.toml").write_text(FEDERATION.replace("rounds = 2", "rounds = 0"))
    assert main(["coordinator", "run", "--config", str(tmp_path / "federation.toml"), "--state-dir", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("ewtune: error: ") for line in errors)
    assert "rounds must be an integer >= 1" in errors[1]


def test_weights_init_writes_the_lora_factors_and_the_head(tiny_bert_dir, tmp_path):
    from coordinator.checkpoints import load_weights, lora_layout

    output = tmp_path / "initial.safetensors"
    assert main(["weights", "init", str(output), "--model-dir", str(tiny_bert_dir), "--lora-rank", "4", "--lora-target-modules", "query", "value"]) == 0
    weights = load_weights(output)
    assert lora_layout(weights) == (["query", "value"], 4)
    assert any(".classifier." in name for name in weights)
