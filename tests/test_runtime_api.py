"""The warm SuperNode's Runtime API is closed to other local processes (SECURITY.md, "The SuperNode's Runtime
API"): a process that is not the holder's task loop asks it for a task, as ``flower-superexec`` does, and is
refused; flwr's own SuperNode without the secret would have served it; the holder's loop, signing with the secret,
still serves a real federated round while the intruder keeps asking."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from ewtune.agent.policy import SuperNodeConfig
from ewtune.agent.supernode import SuperNodeSupervisor, supernode_command
from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, free_port, initial_weights, partition_csv
from ewtune.federation.processes import flower_environment, stop_process_group


def ask_for_a_task(runtime_address: str, secret: bytes | None = None) -> int | str:
    """As ``flower-superexec`` asks a SuperNode for a ClientApp task: the HTTP status of a refusal, or
    ``"task"`` when a task was handed over, ``"none"`` when the API answered that none is waiting."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=["/flwr.proto.Runtime/AcquireTask"]))
    client = RuntimeHttpClient.from_server_address(server_address=runtime_address, insecure=True, root_certificates=None, interceptors=interceptors)
    try:
        answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
    except httpx.HTTPStatusError as refused:
        return refused.response.status_code
    finally:
        client.close()
    return "task" if answer.HasField("task") and answer.token else "none"


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def test_a_local_process_without_the_secret_is_refused_by_the_warm_supernode(tmp_path):
    port = free_port()
    config = SuperNodeConfig(superlink=f"127.0.0.1:{free_port()}", root_certificates=None, auth_private_key=None, insecure=True, port=port)
    command = supernode_command(config, f"unix://{tmp_path / 'agent.sock'}", "h0")  # exactly as the agent starts it
    supervisor = SuperNodeSupervisor(command, tmp_path / "supernode.log").start()
    try:
        wait_for_port(port)
        assert ask_for_a_task(f"127.0.0.1:{port}") == 401
        assert ask_for_a_task(f"127.0.0.1:{port}", secret=b"a guess at the holder's secret") == 401
    finally:
        supervisor.stop()
    assert "SuperExec authentication failed" in (tmp_path / "supernode.log").read_text(errors="replace")


def test_flwrs_own_supernode_in_process_isolation_would_answer_the_same_process(tmp_path):
    """The control: the same request is not refused by a SuperNode started without the secret (flwr's default),
    so the refusal above is the secret's doing."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
               "--port", str(port), "--isolation", "process"]
    with open(tmp_path / "plain.log", "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=flower_environment(), start_new_session=True)
    try:
        wait_for_port(port)
        assert ask_for_a_task(f"127.0.0.1:{port}") == "none"  # served: it would hand over a waiting task
    finally:
        stop_process_group(process)


def test_the_holders_loop_serves_a_round_while_another_process_asks_for_its_tasks(tiny_pooled_dir, mr_csv, tmp_path):
    runtime_port = free_port()
    partition = partition_csv(mr_csv, tmp_path / "data", 1, ["h0"])[0]
    training = {"model_dir": str(tiny_pooled_dir), "max_length": 24, "mode": "head", "physical_batch_size": 32, "eval_fraction": 0.2}
    holder = HolderSetup("h0", partition, budget_epsilon=8.0, training=training, supernode={"port": runtime_port})
    job = FederationJob(
        federation={
            "name": "intruded", "rounds": 1, "local_steps": 2, "expected_batch_size": 16, "clip_norm": 1.0, "learning_rate": 0.1,
            "target_epsilon": 8.0, "delta": 1e-5, "min_holders": 1, "expected_holders": 1, "max_noise_multiplier": 10.0,
        },
        model={"initial_weights": str(initial_weights(tiny_pooled_dir, tmp_path / "initial.safetensors", training)),
               "base_model_dir": str(tiny_pooled_dir), "mode": "head", "evaluate": "never"},
        timeouts={"nodes": 240, "query": 120, "round": 300},
    )  # fmt: skip
    answers: list[int | str] = []
    stop = threading.Event()

    def intrude() -> None:
        while not stop.is_set():
            try:
                answers.append(ask_for_a_task(f"127.0.0.1:{runtime_port}"))
            except httpx.TransportError:  # the SuperNode is not up yet
                pass
            stop.wait(0.05)

    with LocalFederation(tmp_path / "work", [holder]) as federation:
        federation.start()
        intruder = threading.Thread(target=intrude, daemon=True)
        intruder.start()
        try:
            federation.wait_for_daemons()
            result = federation.run(job, timeout=600)
        finally:
            stop.set()
            intruder.join(timeout=10)
    assert result["state"] == "finished", result.get("reason")
    assert result["holders"]["h0"]["rounds_committed"] == 1  # the loop, with the secret, took and served the tasks
    assert len(answers) > 20 and set(answers) == {401}, sorted(set(map(str, answers)))


def test_the_caller_cannot_replace_the_secret_or_move_the_runtime_api(capsys):
    from ewtune.agent import warm_supernode

    for flag in ("--superexec-auth-secret-file=/tmp/known", "--host", "--isolation"):
        assert warm_supernode.main([flag, "x"]) == 2
        assert flag.split("=")[0] in capsys.readouterr().err
