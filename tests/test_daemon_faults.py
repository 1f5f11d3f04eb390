"""The agent daemon against a replayed or stale train request and against a disk that fills up or turns
read-only under its ledger: a replay is refused before anything is charged, and a ledger or head write that
fails stops the round without releasing the update (the reservation stays charged until the next start
reconciles it).

The disk faults are real: a 1 MiB tmpfs that the round fills, and a read-only bind mount of the head
file's directory. Both need root and mount(2); elsewhere they skip, saying so."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from support.daemon import BUDGET, COUNT, HOLDER, PLAN, _daemon, _global_weights, _kinds, daemon_parts, trainer  # noqa: F401

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import EwtuneError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.accountant.signing import SigningKey
from ewtune.agent.policy import HolderPolicy, PlanRefused


def test_a_replayed_or_stale_train_request_is_refused_and_charges_nothing(daemon_parts, trainer):
    _, _, ledger_path = daemon_parts
    daemon = _daemon(daemon_parts, trainer)
    daemon.train(_global_weights(trainer), PLAN)
    after_first = ledger_path.read_bytes()
    for replay in (PLAN, dict(PLAN, round=PLAN["round"] - 1)):
        with pytest.raises(PlanRefused, match="is a replay: this holder already released its update for round 1"):
            daemon.train(_global_weights(trainer), replay)
    assert ledger_path.read_bytes() == after_first and _kinds(ledger_path) == ["genesis", *COUNT, "reserve", "commit"]


def _mount(*arguments) -> None:
    done = subprocess.run(["mount", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs root and mount(2) for a real full or read-only filesystem: {done.stderr.strip()}")


def _unmount(directory: Path) -> None:
    subprocess.run(["umount", "--lazy", str(directory)], check=True)  # lazy: a leaked descriptor cannot keep it


@pytest.fixture
def small_tmpfs(tmp_path):
    directory = tmp_path / "small"
    directory.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(directory))
    yield directory
    _unmount(directory)


@pytest.fixture
def read_only_later(tmp_path):
    """A directory that the test can turn read-only (a bind mount of itself, remounted ro) by calling it."""
    directory = tmp_path / "anchors"
    directory.mkdir()
    _mount("--bind", str(directory), str(directory))

    def turn_read_only():
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)

    yield directory, turn_read_only
    _unmount(directory)


class _TrainerThen:
    """The real trainer; ``then`` runs after its last step (the disk fills up, or turns read-only, while the
    round trains), before the daemon commits."""

    def __init__(self, trainer, then):
        self._trainer, self._then = trainer, then

    def __getattr__(self, name):
        return getattr(self._trainer, name)

    def train(self, plan, should_stop=None):
        result = self._trainer.train(plan, should_stop=should_stop)
        self._then()
        return result


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as output:
        try:
            while True:
                output.write(b"\0" * 65536)
                output.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def _planned(trainer):
    return PoissonGaussianEvent(executable_sampling_rate(PLAN["sampling_rate"]), PLAN["noise_multiplier"], PLAN["steps"])


@pytest.mark.parametrize("fault", ["full disk under the ledger", "read-only head directory"])
def test_a_failed_ledger_write_stops_the_round_without_releasing_the_update(tmp_path, trainer, fault, request):
    from ewtune.agent.daemon import Daemon

    key = SigningKey.generate()
    if fault == "full disk under the ledger":
        directory = request.getfixturevalue("small_tmpfs")
        ledger_path, head_path = directory / "ledger.jsonl", None
        then = lambda: _fill(directory)  # noqa: E731
    else:
        anchors, turn_read_only = request.getfixturevalue("read_only_later")
        ledger_path, head_path = tmp_path / "ledger.jsonl", anchors / "ledger.head"
        then = turn_read_only
    ledger = Ledger.create(ledger_path, key, HOLDER, BUDGET, head_path=head_path)
    daemon = Daemon(HOLDER, HolderPolicy(**BUDGET), _TrainerThen(trainer, then), ledger, key)
    with pytest.raises(EwtuneError) as failure:
        daemon.train(_global_weights(trainer), PLAN)  # no update comes back: nothing is released
    assert "ledger" in str(failure.value) and "\n" not in str(failure.value)
    daemon.close()

    if fault == "full disk under the ledger":
        os.unlink(directory / "filler")
    else:
        subprocess.run(["mount", "-o", "remount,rw,bind", str(anchors)], check=True)
    with Ledger.open(ledger_path, key, head_path=head_path) as reopened:  # the restart finds it consistent
        spent = reopened.spend(HOLDER).epsilon_certified
    assert spent >= certified_epsilon(_planned(trainer), BUDGET["budget_delta"]) * (1 - 1e-12)
