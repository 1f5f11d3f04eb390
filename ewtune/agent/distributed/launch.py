"""Starting and supervising a holder's N training workers on one machine, with torchrun's conventions (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in each worker's environment; one thread per CPU core share,
OMP_NUM_THREADS, unless it is set; rank r on GPU r) but without torchrun's elastic agent: the process that runs
the command is rank 0, so that the ledger, the outputs and the count of steps stay in the one process that a user
interrupts and that ends the command.

Rank 0 hosts the rendezvous (a TCPStore on 127.0.0.1 at a port the system chooses), starts ranks 1..N-1 as
``python -m ewtune.agent.distributed.follower`` in sessions of their own (a Ctrl-C reaches rank 0 alone, which
charges what ran and then stops them), with their stderr in a temporary file, and sends them the training
configuration. A worker that ends early fails rank 0's next collective operation; rank 0 then names it, its exit
status and its last line of stderr (:class:`Followers`), and the run fails as a failure of one process does, with
the steps begun charged (:class:`ewtune.agent.dpsgd_run.TrainingFailed`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.distributed.group import WorkerFailed, WorkerGroup
from ewtune.agent.distributed.sharded import ShardedWorkerGroup
from ewtune.agent.training import LocalTrainer

RENDEZVOUS_HOST = "127.0.0.1"
FOLLOWER_COMMAND = [sys.executable, "-m", "ewtune.agent.distributed.follower"]
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # torch's default: rank 0 evaluates while the others wait for a message
JOIN_TIMEOUT_S = 600.0
BACKEND_VARIABLE = "EWTUNE_DISTRIBUTED_BACKEND"


class Followers:
    """The worker processes of ranks 1..N-1 that rank 0 started, and the files holding their stderr."""

    def __init__(self, processes: list[subprocess.Popen], logs: list):
        self.processes = processes
        self.logs = logs
        self.leader_threads = torch.get_num_threads()  # rank 0's own, restored once the workers have stopped
        torch.set_num_threads(_threads_per_worker(self.world_size))

    @property
    def world_size(self) -> int:
        return len(self.processes) + 1

    def running(self) -> bool:
        return all(process.poll() is None for process in self.processes)

    def exit_reason(self, wait_s: float = 0.0) -> str | None:
        """How the first worker that ended did, waiting up to ``wait_s`` for one to end; None if none did."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    return f"worker {rank} of {self.world_size} {_how_it_ended(process.returncode)}{self._last_line(rank)}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def stop(self, grace_s: float = 10.0) -> None:
        """Wait up to ``grace_s`` for every worker to end, then kill those left; close their logs."""
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            if not log.closed:
                log.close()
        torch.set_num_threads(self.leader_threads)

    def _last_line(self, rank: int) -> str:
        log = self.logs[rank - 1]
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
        return f": {lines[-1]}" if lines else ""


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by signal {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def rank_device(device: str, rank: int, world_size: int) -> str:
    """Rank ``rank``'s device for the trainer's ``device`` setting: the CPU, or GPU ``rank`` (one GPU per worker)."""
    if world_size == 1 or device == "cpu":
        return device
    if device.startswith("cuda:"):
        raise InvalidInputError(f"--device {device} names one GPU for {world_size} workers: give --device cuda (worker r uses GPU r)")
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if torch.cuda.device_count() < world_size:
        raise InvalidInputError(f"{world_size} workers on GPUs need {world_size} GPUs, this machine has {torch.cuda.device_count()}")
    return f"cuda:{rank}"


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@contextmanager
def worker_group(config):
    """:func:`start_workers` for the length of a block: on exit the workers are told to end (after an exception,
    when they may be inside a step, stopped) and the group is left."""
    trainer = start_workers(config)
    try:
        yield trainer
    except BaseException:
        trainer.group.close(finished=False)
        raise
    else:
        trainer.group.close(finished=True)


def start_workers(config) -> LocalTrainer:
    """Rank 0's trainer for ``config``, with ranks 1..N-1 (N = ``config.processes``) started and following it
    (``trainer.group.close()`` ends them); N = 1: the plain single-process trainer."""
    world_size = config.processes
    if world_size == 1:
        return LocalTrainer(config)
    device = rank_device(config.device, 0, world_size)
    group = with_sharding(_start(world_size, _backend(device)), config.sharding)
    try:
        group.send(config)  # the followers build the same trainer from it
        return LocalTrainer(replace(config, device=device), group)
    except BaseException:
        group.close(finished=False)
        raise


def with_sharding(group: WorkerGroup, sharding: str) -> WorkerGroup:
    """``group`` as the workers of ``sharding``: replicated (``none``) or FSDP2-sharded (``fsdp``,
    :mod:`ewtune.agent.distributed.sharded`)."""
    return ShardedWorkerGroup.of(group) if sharding == "fsdp" else group


def _threads_per_worker(world_size: int) -> int:
    """OMP_NUM_THREADS when set (torchrun's convention), else the CPU cores shared out, at least one."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // world_size)


def _start(world_size: int, backend: str) -> WorkerGroup:
    store = dist.TCPStore(RENDEZVOUS_HOST, 0, world_size, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    environment = {**os.environ, "MASTER_ADDR": RENDEZVOUS_HOST, "MASTER_PORT": str(store.port), "WORLD_SIZE": str(world_size),
                   "OMP_NUM_THREADS": str(_threads_per_worker(world_size)), BACKEND_VARIABLE: backend}  # fmt: skip
    if backend == "gloo":
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the workers talk over the loopback interface only
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    processes, logs = [], []
    for rank in range(1, world_size):
        logs.append(tempfile.TemporaryFile())
        processes.append(subprocess.Popen(FOLLOWER_COMMAND, env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logs[-1],
                                          start_new_session=True))  # fmt: skip
    followers = Followers(processes, logs)
    try:
        _wait_until_joined(store, followers)
        dist.init_process_group(backend, store=store, rank=0, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    except BaseException:
        followers.stop(grace_s=0.0)
        raise
    return WorkerGroup(0, world_size, _communication_device(backend, 0), followers)


def _wait_until_joined(store, followers: Followers) -> None:
    """Return once every follower has reached the rendezvous; fail in one line if one ends first or none comes."""
    keys = [f"joined/{rank}" for rank in range(1, followers.world_size)]
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not store.check(keys):
        reason = followers.exit_reason()
        if reason is not None:
            raise WorkerFailed(f"{reason}, before the workers had joined")
        if time.monotonic() > deadline:
            raise WorkerFailed(f"the {followers.world_size - 1} other worker(s) did not join within {JOIN_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _communication_device(backend: str, local_rank: int) -> torch.device:
    """Where collective operations' tensors must be: the worker's GPU for NCCL, the CPU for gloo."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join_from_environment() -> WorkerGroup:
    """A follower's place in the group, from the environment rank 0 gave it (torchrun's variables)."""
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    backend = os.environ[BACKEND_VARIABLE]
    device = _communication_device(backend, local_rank)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=COLLECTIVE_TIMEOUT)  # fmt: skip
    store.set(f"joined/{rank}", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(_threads_per_worker(world_size))
    return WorkerGroup(rank, world_size, device)
