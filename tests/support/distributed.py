"""The launcher the distributed tests kill a worker with: ``python -c KILLING_LAUNCHER <kill_at> <ewtune argv...>``
runs ``ewtune`` whose followers are SIGKILLed as their step ``kill_at`` begins (a replicated or a sharded run)."""

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
