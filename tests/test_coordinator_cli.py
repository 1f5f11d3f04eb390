"""`ewtune keys init|add-holder`, `ewtune coordinator start|status|run` argument handling: files written,
tables printed, one-line errors with exit code 2 for bad input, no Control API exposed by accident."""

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
registry = "supernodes.json"
[model]
initial_weights = "initial.safetensors"
"""


def test_keys_init_writes_the_credentials_and_add_holder_registers_cards(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    for path in ("ca/ca.crt", "superlink/server.pem", "coordinator/ledger.key", "supernodes.json"):
        assert (tmp_path / "keys" / path).is_file()
    assert "registry" in capsys.readouterr().out
    assert main(["keys", "init", str(tmp_path / "keys")]) == 2  # never overwrites
    for holder in ("a", "b"):
        assert main(["agent", "keys", "init", str(tmp_path / holder), "--holder-id", holder]) == 0
        assert main(["keys", "add-holder", str(tmp_path / "keys"), str(tmp_path / holder / "holder.json")]) == 0
    registry = json.loads((tmp_path / "keys" / "supernodes.json").read_text())
    assert [entry["holder_id"] for entry in registry["holders"]] == ["a", "b"]
    assert (tmp_path / "keys" / "holders" / "a.pub").is_file()
    capsys.readouterr()
    assert main(["keys", "add-holder", str(tmp_path / "keys"), str(tmp_path / "a" / "holder.json")]) == 2
    assert "already registered" in capsys.readouterr().err


def test_keys_init_with_holders_names_the_new_flow(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "keys"), "--holders", "a", "b"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "ewtune agent keys init" in error and "ewtune keys add-holder" in error
    assert not (tmp_path / "keys").exists()


def test_coordinator_start_refuses_a_public_bind_address(tmp_path, capsys):
    """The attack surface: flower-superlink on 0.0.0.0 would serve the unauthenticated Control API (submit a
    run = run code here) to the network. Refused before any credential is read or process started."""
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        assert main(["coordinator", "start", "--credentials", str(tmp_path / "none"), "--state-dir", str(tmp_path / "state"), "--host", host]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "Control API" in error and "--behind-fleet-proxy" in error
    assert not (tmp_path / "state").exists()
    # With the operator's statement, the address passes this check (and fails later: no credentials here).
    assert main(["coordinator", "start", "--credentials", str(tmp_path / "none"), "--state-dir", str(tmp_path / "state"), "--host", "0.0.0.0", "--behind-fleet-proxy"]) == 2
    assert "holds no credentials" in capsys.readouterr().err


def test_only_loopback_addresses_count_as_loopback():
    from coordinator.superlink import is_loopback

    assert all(is_loopback(host) for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "coordinator.example.org", ""))


def test_status_prints_the_holder_table(tmp_path, capsys):
    (tmp_path / "federation.toml").write_text(FEDERATION)
    (tmp_path / "out").mkdir()
    status = {
        "run_id": "t-1", "state": "finished", "reason": None, "rounds_completed": 2, "rounds_planned": 2,
        "holders": {"a": {"budget_epsilon": 8.0, "epsilon_certified": 7.9, "epsilon_edgeworth_estimate": 6.1, "epsilon_rdp": 9.5,
                          "noise_multiplier": 0.7, "rounds_committed": 2, "accuracy": {"0": 0.5, "1": 0.61, "2": 0.7},
                          "evaluation": {"2": {"accuracy": 0.7, "f1": 0.66, "majority_baseline": 0.58}}}},
        "skipped": {"b": "its budget is spent"},
    }
    (tmp_path / "out" / "status.json").write_text(json.dumps(status))
    assert main(["coordinator", "status", "--config", str(tmp_path / "federation.toml")]) == 0
    out = capsys.readouterr().out
    assert "| a | 8.000 | 7.900 | 6.100 | 9.500 | 0.700 | 2 | 0:0.500 1:0.610 2:0.700/0.660 (0.580) |" in out
    assert "lifetime certified eps" in out and "majority-class baseline" in out
    assert "skipped: its budget is spent" in out
    (tmp_path / "out" / "status.json").write_text(json.dumps(dict(status, state="failed", reason="no holder answered")))
    assert main(["coordinator", "status", "--config", str(tmp_path / "federation.toml")]) == 1
    assert "failed (no holder answered)" in capsys.readouterr().out


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


def test_superlink_credentials_list_the_registered_holders_public_keys(tmp_path):
    from coordinator.credentials import load_credentials

    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    assert main(["agent", "keys", "init", str(tmp_path / "a"), "--holder-id", "a"]) == 0
    assert main(["keys", "add-holder", str(tmp_path / "keys"), str(tmp_path / "a" / "holder.json")]) == 0
    credentials = load_credentials(tmp_path / "keys")
    assert credentials.server_key.is_file() and credentials.ca_certificate.is_file()
    assert list(credentials.supernode_public_keys) == ["a"] and credentials.supernode_public_keys["a"].is_file()
