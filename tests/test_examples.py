"""The shipped examples (deploy/agent.toml.example, ewtune/coordinator/federation.toml.example) as deploy/README.md
installs them: each passes `ewtune config check` once its paths point at real files, and they work together:
both use the recommended recipe (head mode: the probe), and the federation's plan and its evaluation requests
are what the example holder's policy accepts, its private evaluations included in its budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.events import PoissonGaussianEvent, compose
from ewtune.accountant.signing import SigningKey
from ewtune.agent.policy import RoundPlan, load_agent_config
from ewtune.coordinator.config import load_federation_config
from ewtune.coordinator.planner import HolderDescription, plan_federation
from ewtune.cli import main

REPO = Path(__file__).resolve().parents[1]
AGENT_EXAMPLE = REPO / "deploy" / "agent.toml.example"
FEDERATION_EXAMPLE = REPO / "ewtune" / "coordinator" / "federation.toml.example"


def _agent_toml(directory: Path, model_dir: Path, data_file: Path) -> Path:
    """The example with its absolute paths moved into ``directory`` (and the test's model and data)."""
    SigningKey.generate().save(directory / "ledger.key")
    (directory / "state").mkdir()
    text = AGENT_EXAMPLE.read_text()
    for installed, here in (("/srv/ewtune/models/all-MiniLM-L6-v2", model_dir), ("/srv/ewtune/data/train.csv", data_file),
                            ("/var/lib/ewtune-agent/ledger.jsonl", directory / "state" / "ledger.jsonl"),
                            ("/etc/ewtune/agent-keys/ledger.key", directory / "ledger.key"),
                            ("unix:///run/ewtune-agent/agent.sock", f"unix://{directory}/agent.sock")):  # fmt: skip
        assert installed in text, installed
        text = text.replace(installed, str(here))
    path = directory / "agent.toml"
    path.write_text(text)
    return path


def _federation_toml(directory: Path, model_dir: Path) -> Path:
    (directory / "keys" / "coordinator").mkdir(parents=True)
    SigningKey.generate().save(directory / "keys" / "coordinator" / "ledger.key")
    (directory / "keys" / "supernodes.json").write_text("[]")
    assert main(["weights", "init", str(directory / "initial.safetensors"), "--model-dir", str(model_dir), "--mode", "head"]) == 0
    text = FEDERATION_EXAMPLE.read_text()
    assert "/srv/models/all-MiniLM-L6-v2" in text
    path = directory / "federation.toml"
    path.write_text(text.replace("/srv/models/all-MiniLM-L6-v2", str(model_dir)))
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tiny_pooled_dir, mr_csv):
    directory = tmp_path_factory.mktemp("examples")
    (directory / "holder").mkdir()
    (directory / "coordinator").mkdir()
    return _agent_toml(directory / "holder", tiny_pooled_dir, mr_csv), _federation_toml(directory / "coordinator", tiny_pooled_dir)


def test_both_examples_pass_config_check(examples, capsys):
    agent_toml, federation_toml = examples
    assert main(["config", "check", str(agent_toml)]) == 0
    assert main(["config", "check", str(federation_toml)]) == 0
    out = capsys.readouterr().out
    assert "valid agent configuration" in out and "valid federation configuration" in out


def test_both_examples_use_the_recommended_probe(examples):
    agent, federation = load_agent_config(examples[0]), load_federation_config(examples[1])
    assert agent.training["mode"] == federation.model.mode == "head"
    assert agent.training["optimizer"] == "sgd"


def _evaluations_per_run(federation) -> int:
    """How many evaluations one run asks each holder: every round's model and the initial one, or the final one."""
    return {"every_round": federation.settings.rounds + 1, "final": 1, "never": 0}[federation.model.evaluate]


def check_accepted(agent, federation, records: int) -> float:
    """Raise (AssertionError or PlanRefused) unless a holder of ``records`` records with ``agent``'s policy,
    planned by the coordinator's own planner, accepts every round and every evaluation ``federation`` asks:
    the evaluation mode, its daily limit, the plan's limits and the whole run's events (training and private
    evaluations) within its budget, certified. Returns that certified epsilon."""
    policy, settings = agent.policy, federation.settings
    evaluations = _evaluations_per_run(federation)
    assert evaluations == 0 or policy.evaluation == "private", f"evaluation = {policy.evaluation!r} refuses every evaluation"
    assert evaluations <= policy.max_evaluations_per_day, f"{evaluations} evaluations a run, {policy.max_evaluations_per_day} a day"
    assert settings.delta == policy.budget_delta
    holder = HolderDescription(node_id=1, holder_id=agent.holder_id, dataset_size=records, budget_epsilon=policy.budget_epsilon,
                               budget_delta=policy.budget_delta, spent_epsilon_certified=0.0, public_key="k",
                               min_expected_batch=policy.min_expected_batch, min_noise_multiplier=policy.min_noise_multiplier)  # fmt: skip
    twins = [dataclasses.replace(holder, node_id=index + 1, holder_id=f"{agent.holder_id}-{index}") for index in range(settings.min_holders)]
    plan = plan_federation(settings, twins).by_holder()[twins[0].holder_id]
    round_plan = RoundPlan("run", 1, settings.local_steps, plan.sampling_rate, plan.noise_multiplier, settings.clip_norm,
                           settings.learning_rate, settings.delta)  # fmt: skip
    policy.check_plan(round_plan, model_id="m")
    policy.check_sampling(plan.sampling_rate, records)
    training = plan.round_event(settings.rounds * settings.local_steps)
    evaluated = PoissonGaussianEvent(1.0, policy.evaluation_noise_multiplier, evaluations)  # the daemon's event per evaluation
    total = certified_epsilon(compose(training, evaluated), policy.budget_delta)
    assert total <= policy.budget_epsilon, f"training and evaluations reach certified epsilon {total}"
    return total


@pytest.mark.parametrize("records", [4 * 1024, 20_000])
def test_the_federations_plan_and_evaluations_are_what_the_example_holder_accepts(examples, records):
    """A holder of the fewest records the example batch admits, and of many more."""
    total = check_accepted(load_agent_config(examples[0]), load_federation_config(examples[1]), records)
    assert 7.5 <= total <= 8.0  # the plan's target, plus the evaluations' share, within the budget


@pytest.mark.parametrize("change, refusal", [
    (('evaluation = "private"', 'evaluation = "none"'), "refuses every evaluation"),
    (("max_evaluations_per_day = 10", "max_evaluations_per_day = 3"), "4 evaluations a run, 3 a day"),
    (("evaluation_noise_multiplier = 20.0", "evaluation_noise_multiplier = 1.0"), "training and evaluations reach"),
])  # fmt: skip
def test_the_consistency_check_catches_a_holder_that_would_refuse(examples, change, refusal):
    """The check above can fail: the old example (evaluation = "none"), a daily limit below one run's
    evaluations, and evaluations too noisy-free for the budget left beside the plan's target."""
    path = examples[0].with_name("changed.toml")
    text = examples[0].read_text()
    assert change[0] in text
    path.write_text(text.replace(*change))
    with pytest.raises(AssertionError, match=refusal):
        check_accepted(load_agent_config(path), load_federation_config(examples[1]), 4 * 1024)


def test_the_readmes_evaluate_command_reads_head_weights(examples, tiny_pooled_dir, mr_csv, capsys):
    """deploy/README.md's `ewtune evaluate ... --weights final.safetensors --mode head`, on the weights `weights
    init --mode head` wrote (a federation's final.safetensors has the same names and shapes)."""
    weights = examples[1].parent / "initial.safetensors"
    assert main(["evaluate", "--model", str(tiny_pooled_dir), "--weights", str(weights), "--mode", "head", "--data", str(mr_csv)]) == 0
    assert "accuracy" in capsys.readouterr().out
