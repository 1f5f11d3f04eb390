"""The SuperLink that `ewtune coordinator start` / the demo runs refuses a SuperNode whose key was never
registered and a plaintext (non-TLS) SuperNode; a registered SuperNode with the CA connects. Real Flower
processes on 127.0.0.1."""

import subprocess
import time

import pytest

from ewtune.coordinator.superlink import executable
from ewtune.federation.processes import flower_environment, stop_process_group
from ewtune.local_federation import HolderSetup, LocalFederation, free_port

REFUSED = "ref-exit-codes/305"  # flwr's exit code 305: the SuperNode cannot connect


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    work = tmp_path_factory.mktemp("security")
    holders = [HolderSetup("known", work / "unused.csv"), HolderSetup("stranger", work / "unused.csv")]
    with LocalFederation(work, holders) as federation:
        federation.start(register=["known"], daemons=False)
        yield federation


def _supernode(federation, log_path, *credentials):
    command = [
        executable("flower-supernode"), "--superlink", f"127.0.0.1:{federation.port}", "--port", str(free_port()),
        "--max-retries", "1", "--max-wait-time", "5", *credentials,
    ]
    with open(log_path, "wb") as output:
        return subprocess.Popen(command, env=flower_environment(federation.flwr_home), stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path, marker, timeout):
    """The process's output once ``marker`` appears in it (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if marker in text:
            return text
        time.sleep(0.5)
    return path.read_text(errors="replace")


def test_unregistered_key_and_plaintext_are_refused_registered_node_connects(superlink, tmp_path):
    credentials, keys = superlink.credentials, superlink.holder_keys  # the holders' own keys, in their folders
    ca = ["--root-certificates", str(credentials.ca_certificate)]
    logs = {name: tmp_path / f"{name}.log" for name in ("stranger", "plaintext", "known")}
    processes = {
        "stranger": _supernode(superlink, logs["stranger"], *ca, "--auth-supernode-private-key", str(keys["stranger"].supernode_private_key)),
        "plaintext": _supernode(superlink, logs["plaintext"], "--insecure"),
        "known": _supernode(superlink, logs["known"], *ca, "--auth-supernode-private-key", str(keys["known"].supernode_private_key)),
    }
    try:
        stranger = _wait_for(logs["stranger"], REFUSED, 120)
        plaintext = _wait_for(logs["plaintext"], REFUSED, 120)
        known = _wait_for(logs["known"], "SuperNode ID:", 120)
        superlink_log = (superlink.work_dir / "coordinator" / "superlink.log").read_text()
    finally:
        for process in processes.values():
            stop_process_group(process, timeout=30)
    assert REFUSED in stranger and "Failed to activate SuperNode" in stranger, stranger[-2000:]
    assert "ApiError:2004" in superlink_log  # "Attempted to register SuperNode with public key ..." (unknown key)
    assert REFUSED in plaintext, plaintext[-2000:]
    assert "SuperNode ID:" in known and REFUSED not in known, known[-2000:]
