"""The launcher the distributed tests kill a worker with: ``python -c KILLING_LAUNCHER <kill_at> <ewtune argv...>``
runs ``ewtune`` whose followers are SIGKILLed as their step ``kill_at`` begins (a replicated or a sharded run); and
the results of a group of worker processes spawned on this machine."""

import socket
from pathlib import Path

import torch
import torch.multiprocessing as multiprocessing

KILLING_LAUNCHER = """
import sys
from ewtune.agent.distributed import launch

FOLLOWER = '''
import os, signal, sys
from ewtune.agent.dpsgd.step import DPSGDStep
kill_at, original, calls = int(sys.argv[1]), DPSGDStep.step, []
def killing(self, batch):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies as its step kill_at begins
    return original(self, batch)
DPSGDStep.step = killing
from ewtune.agent.distributed.follower import main
sys.exit(main())
'''
launch.FOLLOWER_COMMAND = [sys.executable, "-c", FOLLOWER, sys.argv[1]]
from ewtune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def spawned_results(worker, out_dir: Path, world_size: int) -> list:
    """What each of ``world_size`` processes running ``worker(rank, port, out_dir)`` saved as ``out_dir/rank<r>.pt``,
    by rank (torch.multiprocessing; the gloo group meets on a free port of 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    multiprocessing.spawn(worker, args=(port, str(out_dir)), nprocs=world_size, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]
