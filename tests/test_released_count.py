"""N never leaves a holder exactly: the daemon releases its training-set count once per data set as N + Gaussian
noise, charged to its ledger; the coordinator plans q = B / N_noisy and weights FedAvg with N_noisy
(ewtune.agent.released_count, SECURITY.md "What leaves a holder")."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.accountant.verify import verify_ledger
from ewtune.agent.policy import HolderPolicy
from support.daemon import BUDGET, COUNT, HOLDER, PLAN, _global_weights, _kinds, count_epsilon, daemon_parts, trainer  # noqa: F401
from support.ledgers import read_entries as _entries

NOISE_DRAW = 0.7  # the standard normal a test's count release draws: N_noisy = N + 0.7 * 20 = N + 14


class _FixedDraw:
    """The secure source's interface, with one known standard normal, so a test knows N_noisy != N for sure."""

    name = "os-secure"
    draw = NOISE_DRAW

    def standard_normal(self, count):
        return torch.full((count,), self.draw)


@pytest.fixture
def fixed_draw(monkeypatch):
    import ewtune.agent.daemon

    monkeypatch.setattr(ewtune.agent.daemon, "SecureRandom", _FixedDraw)


def _daemon(daemon_parts, trainer, **policy):
    from ewtune.agent.daemon import Daemon

    key, ledger, _ = daemon_parts
    return Daemon(HOLDER, HolderPolicy(**BUDGET, **policy), trainer, ledger, key)


def _numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [number for item in value.values() for number in _numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in _numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_describe_and_the_ledger_never_hold_the_exact_count(daemon_parts, trainer, fixed_draw, monkeypatch):
    """The attack: Describe and every commit published the exact N (``public.dataset_size``), and add/remove
    neighbours differ in N. Now every count that leaves, in Describe, the commits and the plan's q, is N_noisy."""
    exact = trainer.dataset_size  # depends on the split key, random per run
    offset = 14 if exact + 14 != trainer.record_count else 15  # so that N_noisy is neither count the test looks for
    monkeypatch.setattr(_FixedDraw, "draw", offset / 20.0)
    daemon = _daemon(daemon_parts, trainer)
    assert daemon.released_dataset_size == exact + offset
    reply = daemon.train(_global_weights(trainer), PLAN)
    description = daemon.describe()
    assert description["dataset_size"] == exact + offset and description["dataset_size_noise"] == 20.0
    left = _numbers(description) + _numbers(reply.receipt) + _numbers(reply.metrics) + _numbers(_entries(daemon_parts[2]))
    assert exact not in left and trainer.record_count not in left
    assert exact + offset in _numbers(_entries(daemon_parts[2])[2]["payload"]["extra"])


def test_the_count_is_charged_in_the_certified_total_from_the_secure_source(daemon_parts, trainer):
    daemon = _daemon(daemon_parts, trainer, dataset_size_noise=10.0)
    assert _kinds(daemon_parts[2]) == ["genesis", *COUNT]
    reserve, commit = _entries(daemon_parts[2])[1:]
    assert reserve["payload"]["run_id"] == "dataset-size"
    assert commit["payload"]["event"]["event"] == PoissonGaussianEvent(1.0, 10.0, 1).to_json()
    extra = commit["payload"]["extra"]
    assert extra["purpose"] == "dataset_size" and extra["randomness"] == "os-secure" and extra["dataset_size_noise"] == 10.0
    assert extra["public"]["dataset_size"] == daemon.released_dataset_size >= 1
    assert abs(daemon.released_dataset_size - trainer.dataset_size) < 10.0 * 8  # 8 standard deviations
    assert verify_ledger(daemon_parts[2]).ok
    assert daemon.describe()["spent_epsilon_certified"] == pytest.approx(count_epsilon(10.0), rel=1e-12)
    daemon.train(_global_weights(trainer), PLAN)
    executed = PoissonGaussianEvent(executable_sampling_rate(PLAN["sampling_rate"]), PLAN["noise_multiplier"], PLAN["steps"])
    total = certified_epsilon(compose(PoissonGaussianEvent(1.0, 10.0, 1), executed), BUDGET["budget_delta"])
    assert daemon.describe()["spent_epsilon_certified"] == pytest.approx(total, rel=1e-9)


class _OtherData:
    """The real trainer, with its config naming another data file (a new data set at the next start)."""

    def __init__(self, trainer, data_file):
        self._trainer = trainer
        self.config = dataclasses.replace(trainer.config, data_file=str(data_file))

    def __getattr__(self, name):
        return getattr(self._trainer, name)


def test_the_count_is_reused_across_starts_and_released_anew_for_a_new_data_file(daemon_parts, trainer, tmp_path):
    """Drawing again at every start would let anyone who restarts the daemon average the noise away."""
    from ewtune.agent.daemon import Daemon

    key, ledger, ledger_path = daemon_parts
    policy = HolderPolicy(**BUDGET)
    first = Daemon(HOLDER, policy, trainer, ledger, key)
    released = first.released_dataset_size
    first.close()
    for _ in range(2):
        again = Daemon(HOLDER, policy, trainer, Ledger.open(ledger_path, key), key)
        assert again.released_dataset_size == released
        again.close()
    assert _kinds(ledger_path) == ["genesis", *COUNT]
    changed = tmp_path / "changed.csv"
    changed.write_bytes(open(trainer.config.data_file, "rb").read() + b"\n")
    moved = Daemon(HOLDER, policy, _OtherData(trainer, changed), Ledger.open(ledger_path, key), key)
    try:
        assert _kinds(ledger_path) == ["genesis", *COUNT, *COUNT]
        assert moved.describe()["spent_epsilon_certified"] == pytest.approx(
            certified_epsilon(PoissonGaussianEvent(1.0, 20.0, 2), BUDGET["budget_delta"]), rel=1e-9)
        assert json.loads((tmp_path / "ledger.jsonl.count").read_text())["commit_seq"] == 4
        assert (tmp_path / "ledger.jsonl.count").stat().st_mode & 0o777 == 0o600
    finally:
        moved.close()


def test_a_holder_whose_budget_cannot_fund_the_count_describes_none_and_is_skipped(tmp_path, trainer):
    from ewtune.accountant.signing import SigningKey
    from ewtune.agent.daemon import Daemon
    from ewtune.agent.policy import PlanRefused
    from ewtune.coordinator.planner import FederationSettings, HolderDescription, plan_federation

    key, budget = SigningKey.generate(), {"budget_epsilon": 0.05, "budget_delta": 1e-5}
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, HOLDER, budget)
    daemon = Daemon(HOLDER, HolderPolicy(**budget), trainer, ledger, key)
    description = daemon.describe()
    assert description["dataset_size"] is None
    with pytest.raises(PlanRefused, match="noised count"):
        daemon.train(_global_weights(trainer), PLAN)
    settings = FederationSettings(rounds=1, local_steps=1, expected_batch_size=8.0, clip_norm=1.0, learning_rate=0.01,
                                  target_epsilon=1.0, delta=1e-5)
    for sent in (description, {name: value for name, value in description.items() if value is not None}):  # Flower drops nulls
        with pytest.raises(InvalidInputError, match=f"{HOLDER}: its budget cannot fund the release of its noised count"):
            plan_federation(settings, [HolderDescription.from_config(sent, node_id=1)])
    assert _kinds(tmp_path / "ledger.jsonl") == ["genesis"]
    daemon.close()


def test_the_planner_plans_q_and_sigma_for_the_noised_count_and_the_daemon_trains_it(daemon_parts, trainer, fixed_draw):
    """The holder's q is B / N_noisy, a function of released values: the ledger's q says nothing more about N."""
    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.coordinator.planner import FederationSettings, HolderDescription, plan_federation

    daemon = _daemon(daemon_parts, trainer)
    noisy = trainer.dataset_size + 14
    settings = FederationSettings(rounds=2, local_steps=3, expected_batch_size=20.0, clip_norm=1.0, learning_rate=0.01,
                                  target_epsilon=6.0, delta=1e-5)
    plan = plan_federation(settings, [HolderDescription.from_config(daemon.describe(), node_id=1)]).holders[0]
    assert plan.sampling_rate == executable_sampling_rate(20.0 / noisy)
    epsilon_left = min(6.0, BUDGET["budget_epsilon"] - count_epsilon())
    expected = calibrate_noise_multiplier(epsilon_left, 1e-5, [(plan.sampling_rate, 6)], policy="certified")
    assert plan.noise_multiplier == expected.noise_multiplier
    daemon.train(_global_weights(trainer), dict(PLAN, sampling_rate=plan.sampling_rate, noise_multiplier=plan.noise_multiplier))
    committed = _entries(daemon_parts[2])[-1]["payload"]["event"]["event"]
    assert committed["sampling_rate"] == plan.sampling_rate


def test_the_update_is_divided_by_the_noised_expected_batch(daemon_parts, trainer, fixed_draw, monkeypatch):
    """The noised sum is divided by q N_noisy, not q N: the update's scale would otherwise carry the exact N."""
    import ewtune.agent.dpsgd.step

    divisors = []
    real_init = ewtune.agent.dpsgd.step.DPSGDStep.__init__

    def recording_init(self, *args, **kwargs):
        divisors.append(kwargs["expected_batch_size"])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ewtune.agent.dpsgd.step.DPSGDStep, "__init__", recording_init)
    daemon = _daemon(daemon_parts, trainer)
    daemon.train(_global_weights(trainer), PLAN)
    assert divisors == [executable_sampling_rate(PLAN["sampling_rate"]) * (trainer.dataset_size + 14)]


def test_the_removed_granularity_setting_is_a_one_line_error(tmp_path, tiny_bert_dir, mr_csv):
    from ewtune.agent.policy import load_agent_config
    from support.daemon import _agent_toml

    path = _agent_toml(tmp_path, tiny_bert_dir, mr_csv)
    path.write_text(path.read_text().replace("[policy]", "[policy]\ndataset_size_granularity = 100", 1))
    with pytest.raises(InvalidInputError, match="dataset_size_noise"):
        load_agent_config(path)
