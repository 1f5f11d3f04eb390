"""Private evaluation through real processes (agent daemons, SuperNodes, SuperLink, ServerApp on 127.0.0.1):
a holder whose policy has evaluation = "private" (as deploy/agent.toml.example) releases a noised accuracy of
every global model, and one with evaluation = "none" is shown with its daemon's reason, per round, in the run's
status. About 60 to 90 s on 2 cores."""

from __future__ import annotations

import pytest

from ewtune.coordinator.cli import status_table

pytestmark = pytest.mark.slow


def test_a_private_holder_evaluates_every_round_and_a_refusing_one_says_why(tiny_pooled_dir, mr_csv, tmp_path):
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

    names = ["private", "refusing"]
    partitions = partition_csv(mr_csv, tmp_path / "data", len(names), names)
    training = {"model_dir": str(tiny_pooled_dir), "max_length": 24, "mode": "head", "optimizer": "sgd",
                "physical_batch_size": 32, "eval_fraction": 0.2}  # fmt: skip
    policies = {"private": {"evaluation": "private", "evaluation_noise_multiplier": 20.0, "max_evaluations_per_day": 10},
                "refusing": {"evaluation": "none"}}  # fmt: skip
    holders = [HolderSetup(name, path, budget_epsilon=8.0, training=training, policy=policies[name]) for name, path in zip(names, partitions)]
    job = FederationJob(
        federation={
            "name": "evaluated", "rounds": 2, "local_steps": 2, "expected_batch_size": 16, "clip_norm": 1.0, "learning_rate": 1.0,
            "target_epsilon": 7.5, "delta": 1e-5, "min_holders": 2, "expected_holders": 2, "max_noise_multiplier": 10.0,
        },
        model={"initial_weights": str(initial_weights(tiny_pooled_dir, tmp_path / "initial.safetensors", training)),
               "base_model_dir": str(tiny_pooled_dir), "mode": "head", "evaluate": "every_round"},
        timeouts={"nodes": 240, "query": 120, "round": 300, "evaluate": 120},
    )  # fmt: skip
    with LocalFederation(tmp_path / "work", holders) as federation:
        federation.start()
        federation.wait_for_daemons()
        status = federation.run(job, timeout=600)
    assert status["state"] == "finished", status.get("reason")
    private, refusing = status["holders"]["private"], status["holders"]["refusing"]
    assert set(private["accuracy"]) == {"0", "1", "2"} and private["evaluation_missing"] == {}
    assert all(0.0 <= accuracy <= 1.0 for accuracy in private["accuracy"].values())
    assert refusing["accuracy"] == {} and set(refusing["evaluation_missing"]) == {"0", "1", "2"}
    assert all(reason.startswith("refused: ") and 'evaluation = "none"' in reason for reason in refusing["evaluation_missing"].values())
    assert 'no evaluation of rounds 0, 1, 2: refused: ' in status_table(status)
