"""LP-FT's tune phase in a real federation (slow: Flower processes on 127.0.0.1, 73 s on 2 cores at load 1.5 to 4):
two holders whose [training] tunes LoRA on the top encoder layer of a 3-layer pooled encoder, from cached states.
The coordinator ships and aggregates exactly those parameters (the top layer's LoRA factors and the head), the
global model moves, and every ledger verifies with the coordinator's commits matching the holders'. The daemon's
own checks on such a plan (names, shapes, sigma floor, steps, model id) are tested without processes in
tests/test_top_layers.py."""

import numpy as np
import pytest
from tiny_federation import verified_ledgers

from ewtune.coordinator.checkpoints import load_weights
from ewtune.coordinator.ledger_crosscheck import cross_check, read_entries
from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv


@pytest.mark.slow
def test_a_federation_tunes_the_top_layer_from_cached_states(tiny_pooled_3layer_dir, mr_csv, tmp_path):
    training = {"model_dir": str(tiny_pooled_3layer_dir), "max_length": 32, "mode": "lora", "lora_rank": 2, "tune_layers": 1,
                "physical_batch_size": 32, "eval_fraction": 0.2}
    names = ["h0", "h1"]
    holders = [HolderSetup(name, path, budget_epsilon=8.0, training=training)
               for name, path in zip(names, partition_csv(mr_csv, tmp_path / "data", 2, names))]
    initial = initial_weights(tiny_pooled_3layer_dir, tmp_path / "initial.safetensors", training)
    job = FederationJob(
        federation={
            "name": "lpft", "rounds": 2, "local_steps": 3, "expected_batch_size": 16, "clip_norm": 1.0, "learning_rate": 0.05,
            "target_epsilon": 8.0, "delta": 1e-5, "min_holders": 2, "expected_holders": 2, "max_noise_multiplier": 10.0,
        },
        model={"initial_weights": str(initial), "base_model_dir": str(tiny_pooled_3layer_dir), "mode": "lora", "lora_alpha": 16.0},
        timeouts={"nodes": 240, "query": 120, "round": 300, "evaluate": 120},
    )
    with LocalFederation(tmp_path, holders) as federation:
        federation.start()
        federation.wait_for_daemons()
        status = federation.run(job, timeout=900)
    assert status["state"] == "finished", status.get("reason")
    assert all(status["holders"][name]["rounds_committed"] == 2 for name in names)
    start, final = load_weights(initial), load_weights(tmp_path / "coordinator" / "run" / "final.safetensors")
    assert set(final) == set(start)
    assert {name.split("layer.")[1].split(".")[0] for name in final if "layer." in name} == {"2"}  # the top layer only
    assert any(not np.array_equal(final[name], start[name]) for name in final)
    report, _, holder_entries = verified_ledgers(tmp_path, federation.credentials)
    check = cross_check(read_entries(tmp_path / "coordinator" / "ledger.jsonl"), holder_entries)
    assert check.ok and check.matched == 4, check.mismatches
    for name in names:
        assert 0 < report.holders[name].epsilon_certified <= 8.0
