"""`ewtune keys init|add-holder`, `ewtune coordinator start|status|run` argument handling: files written,
tables printed, one-line errors with exit code 2 for bad input, no Control API exposed by accident."""

import json

from ewtune.cli import main
from tiny_federation import MINIMAL_FEDERATION_TOML



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
    from ewtune.coordinator.superlink import is_loopback

    assert all(is_loopback(host) for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "coordinator.example.org", ""))


def test_status_prints_the_holder_table(tmp_path, capsys):
    (tmp_path / "federation.toml").write_text(MINIMAL_FEDERATION_TOML)
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
    assert "certified eps (this coordinator's ledger)" in out and "majority-class baseline" in out
    assert "lifetime certified eps" not in out  # what it showed: a holder's spend elsewhere is not in this ledger
    assert "can be higher and is what its agent enforces: `ewtune agent status` on the holder's side" in out
    assert "skipped: its budget is spent" in out
    (tmp_path / "out" / "status.json").write_text(json.dumps(dict(status, state="failed", reason="no holder answered")))
    assert main(["coordinator", "status", "--config", str(tmp_path / "federation.toml")]) == 1
    assert "failed (no holder answered)" in capsys.readouterr().out


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["coordinator", "status", "--config", str(tmp_path / "missing.toml")]) == 2
    (tmp_path / "federation.toml").write_text(MINIMAL_FEDERATION_TOML.replace("rounds = 2", "rounds = 0"))
    assert main(["coordinator", "run", "--config", str(tmp_path / "federation.toml"), "--state-dir", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("ewtune: error: ") for line in errors)
    assert "rounds must be an integer >= 1" in errors[1]


def test_weights_init_writes_the_lora_factors_and_the_head(tiny_bert_dir, tmp_path):
    from ewtune.coordinator.checkpoints import load_weights, lora_layout

    output = tmp_path / "initial.safetensors"
    assert main(["weights", "init", str(output), "--model-dir", str(tiny_bert_dir), "--lora-rank", "4", "--lora-target-modules", "query", "value"]) == 0
    weights = load_weights(output)
    assert lora_layout(weights) == (["query", "value"], 4)
    assert any(".classifier." in name for name in weights)


def test_weights_init_head_writes_the_head_alone_as_the_holders_build_it(tiny_pooled_dir, tmp_path):
    """--mode head (the recommended probe): only the classifier head's parameters, exactly those a holder's
    head-mode model trains and with the same shapes, so the ServerApp's first round is accepted."""
    from ewtune.agent import models
    from ewtune.coordinator.checkpoints import load_weights

    output = tmp_path / "initial.safetensors"
    assert main(["weights", "init", str(output), "--model-dir", str(tiny_pooled_dir), "--mode", "head"]) == 0
    weights = load_weights(output)
    holder_model = models.load_model(tiny_pooled_dir, task="classification", num_labels=2, mode="head")
    trainable = models.trainable_state(holder_model)
    assert {name: weights[name].shape for name in weights} == {name: tuple(t.shape) for name, t in trainable.items()}
    assert weights and all(".classifier." in name or name.startswith("classifier") for name in weights)


def test_superlink_credentials_list_the_registered_holders_public_keys(tmp_path):
    from ewtune.coordinator.credentials import load_credentials

    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    assert main(["agent", "keys", "init", str(tmp_path / "a"), "--holder-id", "a"]) == 0
    assert main(["keys", "add-holder", str(tmp_path / "keys"), str(tmp_path / "a" / "holder.json")]) == 0
    credentials = load_credentials(tmp_path / "keys")
    assert credentials.server_key.is_file() and credentials.ca_certificate.is_file()
    assert list(credentials.supernode_public_keys) == ["a"] and credentials.supernode_public_keys["a"].is_file()


def test_a_second_start_on_a_busy_port_says_so_and_starts_nothing(tmp_path, capsys):
    """What a second `ewtune coordinator start` met: the port already answered (by the first SuperLink), so it
    printed "SuperLink on ..." and then blamed a holder's key. Now: one line naming the port, exit 1, no
    SuperLink started, nothing written to the state directory."""
    import socket

    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code = main(["coordinator", "start", "--credentials", str(tmp_path / "keys"), "--state-dir", str(tmp_path / "state"), "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.strip() == (f"ewtune: error: 127.0.0.1:{port} is already in use (another `ewtune coordinator start`?): "
                                    "stop what listens there or pass another --port")
    assert not (tmp_path / "state").exists()


def test_a_superlink_that_exits_at_start_is_named_with_its_last_log_line(tmp_path, capsys):
    """The SuperLink child exits before it listens (here: a server key that is not a key): one line naming the
    address, the log and its last line, exit 1; never "SuperLink on ..."."""
    import socket

    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    (tmp_path / "keys" / "superlink" / "server.key").write_text("not a key\n")
    capsys.readouterr()
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    code = main(["coordinator", "start", "--credentials", str(tmp_path / "keys"), "--state-dir", str(tmp_path / "state"), "--port", str(port)])
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert code == 1 and "SuperLink on" not in captured.out, captured.out
    assert len(error.splitlines()) == 1
    assert error.startswith(f"ewtune: error: the SuperLink did not start: the process meant to listen on 127.0.0.1:{port} exited")
    assert f"its log {tmp_path / 'state' / 'superlink.log'} ends: " in error and "SSL" in error


def _runnable_federation(tmp_path):
    """A federation.toml that passes `config check` (its files present), and a state directory whose connection
    points at a loopback port where nothing listens."""
    import socket

    from ewtune.accountant.signing import SigningKey
    from ewtune.coordinator.superlink import write_connection

    SigningKey.generate().save(tmp_path / "coordinator.key")
    (tmp_path / "supernodes.json").write_text("[]")
    (tmp_path / "initial.safetensors").write_bytes(b"weights")
    (tmp_path / "federation.toml").write_text(MINIMAL_FEDERATION_TOML)
    (tmp_path / "ca.crt").write_text("certificate")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    write_connection(tmp_path / "state" / "flwr-home", f"127.0.0.1:{port}", tmp_path / "ca.crt")
    return tmp_path / "federation.toml", port


def test_run_with_the_superlink_down_names_the_address_and_what_to_start(tmp_path, capsys):
    """`ewtune coordinator run` with no SuperLink said "`flwr run` exited (1) before the run finished; state None".
    Now: one line naming the address it could not reach and the command that starts it, exit 1, before any
    `flwr run` (no run log written)."""
    config, port = _runnable_federation(tmp_path)
    code = main(["coordinator", "run", "--config", str(config), "--state-dir", str(tmp_path / "state")])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1, error
    assert error.startswith(f"ewtune: error: no SuperLink answers at 127.0.0.1:{port} (")
    assert f"start it with `ewtune coordinator start --credentials DIR --state-dir {tmp_path / 'state'}`" in error
    assert "None" not in error
    assert not (tmp_path / "flwr-run.log").exists()


def test_a_flwr_run_that_exits_before_any_status_says_so(tmp_path):
    """`flwr run` gone before the ServerApp wrote status.json: the message says no status was written (never
    "state None")."""
    import subprocess
    import sys

    import pytest

    from ewtune.accountant.errors import EwtuneError
    from ewtune.coordinator.cli import follow_run

    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(EwtuneError, match=r"^`flwr run` exited with code 3 before the ServerApp wrote any status$"):
        follow_run(process, tmp_path / "status.json", None, timeout=30)
