"""A federation of a causal language model: holders fine-tune a decoder (a tiny random Llama built here: RMSNorm,
rotary embeddings, grouped-query attention, tied embeddings) with DP-SGD and LoRA on their own MR sentences, the
coordinator aggregates, a holder that allows private evaluation releases a noised perplexity (never an accuracy),
and the final PEFT adapter loads as a causal LM.

The pieces run in-process in the default suite (the private perplexity's sensitivity and its value without noise,
the daemon's causal-LM round and evaluation, the adapter export, the status table, the offline report); the whole
federation with real Flower processes on 127.0.0.1 (two holders, two rounds of two steps) takes about 30 s on 2 quiet
cores and 50 to 110 s on busy ones, so it is marked slow, as is the same federation with full fine-tuning (one round,
20 to 45 s)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from tiny_federation import verified_ledgers

from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.verify import verify_ledger
from ewtune.agent import models
from ewtune.agent.daemon import Daemon
from ewtune.agent.data import collate
from ewtune.agent.dpsgd.losses import causal_lm_loss
from ewtune.agent.evaluation import clipped_loss_sums, private_perplexity
from ewtune.agent.policy import HolderPolicy
from ewtune.agent.training import LocalTrainer, TrainingConfig
from ewtune.coordinator.checkpoints import load_weights, save_peft_adapter
from ewtune.coordinator.cli import status_table
from ewtune.coordinator.ledger_crosscheck import cross_check, read_entries
from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LORA = {"task": "causal_lm", "mode": "lora", "lora_rank": 4, "lora_alpha": 16.0}
# an expected batch of 24 of the 160 training records: above the policy's floor of 8 whatever the noised count (std 20)
PLAN = {"run_id": "run-1", "round": 1, "steps": 2, "sampling_rate": 0.15, "noise_multiplier": 1.0, "clip_norm": 1.0,
        "learning_rate": 0.01, "delta": 1e-5}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A randomly initialised 1-layer Llama (hidden 32, 4 query heads sharing 2 key-value heads, tied embeddings)
    over the MiniLM vocabulary, with the MiniLM tokenizer (pad id 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ewtune.agent.assets import minilm_model_dir

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        tie_word_embeddings=True,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_model_dir() / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def causal_trainer(tiny_llama_dir, mr_csv):
    torch.set_num_threads(1)
    return LocalTrainer(TrainingConfig(model_dir=str(tiny_llama_dir), data_file=str(mr_csv), max_length=32, max_examples=200,
                                       eval_fraction=0.2, physical_batch_size=16, **LORA))  # fmt: skip


class _NoNoise:
    """A stand-in randomness source whose every normal draw is 0: the release's value without its noise."""

    name, secure = "zero", False

    def standard_normal(self, count, device=None):
        return torch.zeros(count)


def _record_losses(trainer) -> list[float]:
    """Each held-out record's mean next-token loss, from a forward pass of that record alone."""
    examples, losses = trainer.data.eval, []
    with torch.no_grad():
        for index in range(len(examples)):
            batch = collate(examples, [index], trainer.pad_token_id, "causal_lm")
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            losses.append(float(causal_lm_loss(trainer.model(**inputs), batch)[0]))
    return losses


# --- the pieces, in-process -------------------------------------------------------------------------------


def test_private_perplexity_adds_at_most_one_per_record_and_without_noise_is_the_clipped_mean(causal_trainer):
    """Removing any one record moves the two released cells by at most 1 in L2 (the Gaussian mechanism's
    sensitivity the ledger charges), also when the bound clips; without noise the release is exp of the mean of
    the clipped per-record losses, each record computed alone."""
    trainer = causal_trainer
    losses = _record_losses(trainer)
    bound = float(np.median(losses))  # half the records are clipped: the bound, not the losses, limits them
    assert sum(loss > bound for loss in losses) >= len(losses) // 2 > 0
    sums = clipped_loss_sums(trainer.model, trainer.data.eval, trainer.pad_token_id, bound, batch_size=16)
    ranked = sorted(range(len(losses)), key=losses.__getitem__)
    for index in ranked[:3] + ranked[-3:]:  # the records with the lowest losses, and the highest (clipped)
        kept = [i for i in range(len(trainer.data.eval)) if i != index]
        subset = type(trainer.data.eval)([trainer.data.eval.input_ids[i] for i in kept], None, None)
        without = clipped_loss_sums(trainer.model, subset, trainer.pad_token_id, bound, batch_size=16)
        assert float(torch.linalg.vector_norm(sums - without)) <= 1.0 + 1e-12
    released = private_perplexity(sums, bound, 3.0, source=_NoNoise())
    expected = sum(min(loss, bound) for loss in losses) / len(losses)
    assert released["loss"] == pytest.approx(expected, rel=1e-9)
    assert released["perplexity"] == pytest.approx(math.exp(expected), rel=1e-9)
    assert released["num_examples"] == pytest.approx(len(losses))
    noised = private_perplexity(sums, bound, 3.0)
    assert noised["num_examples"] != pytest.approx(len(losses)) and 0 <= noised["loss"] <= bound


def test_a_causal_lm_daemon_trains_a_round_and_releases_a_charged_perplexity(causal_trainer, tmp_path):
    trainer = causal_trainer
    key = SigningKey.generate()
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, "h0", {"budget_epsilon": 8.0, "budget_delta": 1e-5})
    policy = HolderPolicy(budget_epsilon=8.0, budget_delta=1e-5, evaluation="private", evaluation_noise_multiplier=5.0)
    daemon = Daemon("h0", policy, trainer, ledger, key)
    weights = {name: tensor.numpy().copy() for name, tensor in trainer.trainable_state().items()}
    reply = daemon.train(weights, PLAN)
    assert any(not np.array_equal(reply.arrays[name], weights[name]) for name in weights)
    metrics = daemon.evaluate(reply.arrays, {"run_id": "run-1", "round": 1})
    assert set(metrics) == {"perplexity", "loss", "num_examples", "noise_multiplier"}
    assert 1.0 <= metrics["perplexity"] <= math.exp(trainer.loss_bound) and metrics["noise_multiplier"] == 5.0
    commit = read_entries(tmp_path / "ledger.jsonl")[-1]
    assert commit["kind"] == "commit" and commit["payload"]["extra"]["purpose"] == "evaluation"
    assert commit["payload"]["event"]["event"]["noise_multiplier"] == 5.0
    assert verify_ledger(tmp_path / "ledger.jsonl").ok
    daemon.close()


def test_the_exported_adapter_is_the_holders_causal_lm(causal_trainer, tiny_llama_dir, tmp_path):
    """The coordinator's PEFT export of a causal LM's LoRA weights loads as a causal LM whose logits are those of
    the holders' model with the same weights."""
    trainer = causal_trainer
    moved = {name: tensor.numpy() + np.float32(0.01) for name, tensor in trainer.trainable_state().items()}
    adapter = save_peft_adapter(moved, tiny_llama_dir, tmp_path / "adapter", "causal_lm", LORA["lora_alpha"])
    loaded = models.load_adapter(tiny_llama_dir, adapter, task="causal_lm").eval()
    saved = trainer.trainable_state()
    models.load_trainable_state(trainer.model, {name: torch.from_numpy(array) for name, array in moved.items()})
    try:
        batch = collate(trainer.data.eval, [0, 1], trainer.pad_token_id, "causal_lm")
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with torch.no_grad():
            assert torch.allclose(loaded(**inputs).logits, trainer.model.eval()(**inputs).logits, atol=1e-5)
    finally:
        models.load_trainable_state(trainer.model, saved)


def test_the_status_table_shows_a_causal_lms_perplexity():
    holder = {"budget_epsilon": 8.0, "epsilon_certified": 5.0, "rounds_committed": 1, "accuracy": {},
              "perplexity": {"0": 1520.25, "1": 1490.5}, "evaluation": {}, "evaluation_missing": {}}  # fmt: skip
    table = status_table({"run_id": "r", "state": "finished", "rounds_completed": 1, "rounds_planned": 1, "holders": {"h0": holder}})
    assert "| 0:ppl 1520.2 1:ppl 1490.5 |" in table


def test_the_runs_progress_reports_a_causal_lms_released_perplexity_once():
    import io

    from ewtune.coordinator.run_progress import RunProgress
    from ewtune.federation.progress import Progress

    stream = io.StringIO()
    follow = RunProgress(Progress(stream, "json"))
    holder = {"dataset_size": 100, "sampling_rate": 0.16, "noise_multiplier": 1.1, "planned_epsilon_certified": 7.9,
              "epsilon_certified": 0.5, "accuracy": {}, "perplexity": {"0": 148.04}, "evaluation": {"0": {"perplexity": 148.04}}}  # fmt: skip
    status = {"state": "running", "reason": None, "rounds_planned": 2, "holders": {"h0": holder}, "skipped": {}, "rounds": []}
    follow(status)
    follow(status)  # the same status again: nothing new
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    (released,) = [r for r in records if r["event"] == "perplexity"]
    assert (released["holder"], released["round"], released["perplexity"]) == ("h0", 0, 148.04)
    assert "released a private (noised) perplexity of the global model after round 0: 148.04" in released["message"]
    assert not [r for r in records if r["event"] == "accuracy"]


def test_the_offline_report_draws_a_causal_lms_released_perplexity(tmp_path, capsys):
    """``ewtune ledger report --accuracy status.json`` of a causal LM's run: each holder's released perplexity is a
    series of metric "perplexity" (drawn on a log scale), a refusing holder keeps its reason."""
    from ewtune.cli import main
    from ewtune.coordinator.run_status import HolderStatus, RunStatus

    ledger = tmp_path / "holder.jsonl"
    Ledger.create(ledger, SigningKey.generate(), "h0", {"budget_epsilon": 8.0, "budget_delta": 1e-5}).close()
    status = RunStatus(state="finished", holders={
        "h0": HolderStatus(perplexity={"0": 1520.25, "1": 1490.5}, evaluation={"0": {"perplexity": 1520.25}, "1": {"perplexity": 1490.5}}),
        "h1": HolderStatus(evaluation_missing={"0": "refused: policy"}),
    }).to_json()  # fmt: skip
    (tmp_path / "status.json").write_text(json.dumps(status))
    code = main(["ledger", "report", str(ledger), "--out", str(tmp_path / "out"), "--accuracy", str(tmp_path / "status.json"), "--json"])
    assert code in (0, 1)  # an unpinned key: intact, not verified
    released, refused = json.loads(capsys.readouterr().out)["accuracy"]
    assert (released["metric"], released["rounds"], released["values"]) == ("perplexity", [0, 1], [1520.25, 1490.5])
    assert refused["values"] == [] and refused["missing"] == "rounds 0: refused: policy"
    assert (tmp_path / "out" / "accuracy.png").is_file()


def test_a_job_that_federation_toml_refuses_is_a_one_line_error_before_anything_is_submitted(tmp_path):
    from ewtune.accountant.errors import InvalidInputError
    from ewtune.coordinator.credentials import init_credentials

    federation = LocalFederation(tmp_path, [])
    federation.credentials = init_credentials(tmp_path / "keys")
    (tmp_path / "coordinator").mkdir()  # as start() leaves it
    job = FederationJob(federation={"name": "bad", "rounds": 1, "local_steps": 1, "expected_batch_size": 8, "clip_norm": 1.0,
                                    "learning_rate": 0.01, "target_epsilon": 8.0, "delta": 1e-5},
                        model={"initial_weights": "initial.safetensors", "task": "causal_lm", "lora_rank": 4})  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"\[model\].*lora_rank"):
        federation.run(job)
    assert federation.processes == {}


# --- the whole federation, real Flower processes ----------------------------------------------------------


@pytest.fixture(scope="module")
def causal_federation(tiny_llama_dir, mr_csv, tmp_path_factory):
    """Two holders on disjoint halves of the MR sentences; h0 allows private evaluation (its budget leaves room
    for it beyond the federation's target), h1 keeps the default of releasing none."""
    work = tmp_path_factory.mktemp("causal_federation")
    partitions = partition_csv(mr_csv, work / "data", 2, ["h0", "h1"])
    training = {"model_dir": str(tiny_llama_dir), "max_length": 32, "physical_batch_size": 32, "eval_fraction": 0.2, **LORA}
    holders = [
        HolderSetup("h0", partitions[0], budget_epsilon=9.0, training=training, policy={"evaluation": "private"}),
        HolderSetup("h1", partitions[1], training=training),
    ]
    initial = initial_weights(tiny_llama_dir, work / "initial.safetensors", training)
    job = FederationJob(
        federation={"name": "causal", "rounds": 2, "local_steps": 2, "expected_batch_size": 16, "clip_norm": 1.0,
                    "learning_rate": 0.01, "target_epsilon": 8.0, "delta": 1e-5, "min_holders": 2, "expected_holders": 2},
        model={"initial_weights": str(initial), "base_model_dir": str(tiny_llama_dir), "task": "causal_lm", "mode": "lora",
               "lora_alpha": LORA["lora_alpha"]},
        timeouts={"nodes": 240, "query": 120, "round": 300, "evaluate": 120},
    )  # fmt: skip
    with LocalFederation(work, holders) as federation:
        federation.start()
        federation.wait_for_daemons()
        status = federation.run(job, timeout=900)
    return work, federation.credentials, status, initial


@pytest.mark.slow
def test_a_causal_lm_federation_finishes_verifies_reports_perplexity_and_exports_its_adapter(causal_federation, tiny_llama_dir):
    work, credentials, status, initial = causal_federation
    assert status["state"] == "finished", status.get("reason")
    assert status["rounds_completed"] == 2
    for holder_id in ("h0", "h1"):
        assert status["holders"][holder_id]["rounds_committed"] == 2
        assert status["holders"][holder_id]["accuracy"] == {}  # a causal LM has no accuracy
    released = status["holders"]["h0"]["perplexity"]
    assert set(released) == {"0", "1", "2"}  # each global model: the initial one and the one after each round
    # noised with sigma 20 on about 40 held-out sentences: any value, but within [1, exp(B)] = [1, V^2]
    assert all(1.0 <= value <= 30522.0**2 * (1 + 1e-9) for value in released.values())
    assert {"perplexity", "loss", "num_examples", "noise_multiplier"} == set(status["holders"]["h0"]["evaluation"]["0"])
    assert set(status["holders"]["h1"]["evaluation_missing"]) == {"0", "1", "2"} and status["holders"]["h1"]["perplexity"] == {}
    assert "0:ppl " in status_table(status)

    _, _, holder_entries = verified_ledgers(work, credentials)
    check = cross_check(read_entries(work / "coordinator" / "ledger.jsonl"), holder_entries)
    assert check.ok and check.matched == 4, check.mismatches

    before, after = load_weights(initial), load_weights(work / "coordinator" / "run" / "final.safetensors")
    assert set(before) == set(after) and any(not np.array_equal(before[name], after[name]) for name in before)
    model = models.load_adapter(tiny_llama_dir, status["adapter"], task="causal_lm")
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    assert lora and all(torch.equal(param.detach(), torch.from_numpy(after[name])) for name, param in lora.items())


@pytest.mark.slow
def test_a_full_fine_tuning_federation_of_a_causal_lm_moves_every_weight(tiny_llama_dir, mr_csv, tmp_path):
    """``mode = "full"``: every weight of the decoder travels and is averaged; the final weights load into the
    decoder (no adapter: there are no LoRA factors to export)."""
    partitions = partition_csv(mr_csv, tmp_path / "data", 2, ["h0", "h1"])
    training = {"model_dir": str(tiny_llama_dir), "task": "causal_lm", "mode": "full", "max_length": 32, "eval_fraction": 0.2}
    holders = [HolderSetup(name, path, training=training) for name, path in zip(["h0", "h1"], partitions)]
    initial = initial_weights(tiny_llama_dir, tmp_path / "initial.safetensors", training)
    job = FederationJob(
        federation={"name": "full", "rounds": 1, "local_steps": 2, "expected_batch_size": 16, "clip_norm": 1.0, "learning_rate": 0.01,
                    "target_epsilon": 8.0, "delta": 1e-5, "min_holders": 2, "expected_holders": 2},
        model={"initial_weights": str(initial), "base_model_dir": str(tiny_llama_dir), "task": "causal_lm", "mode": "full",
               "evaluate": "never"},
        timeouts={"nodes": 240, "query": 120, "round": 300},
    )  # fmt: skip
    with LocalFederation(tmp_path, holders) as federation:
        federation.start()
        federation.wait_for_daemons()
        status = federation.run(job, timeout=900)
    assert status["state"] == "finished" and status["rounds_completed"] == 1, status.get("reason")
    assert status["adapter"] is None
    before, after = load_weights(initial), load_weights(tmp_path / "coordinator" / "run" / "final.safetensors")
    model = models.load_model(tiny_llama_dir, task="causal_lm", mode="full")
    assert set(after) == set(models.trainable_state(model)) == set(before)
    assert all(not np.array_equal(before[name], after[name]) for name in before)
    models.load_trainable_state(model, {name: torch.from_numpy(array) for name, array in after.items()})


@pytest.mark.slow
def test_the_federated_causal_lm_benchmark_runs_and_writes_its_results(tiny_llama_dir, tmp_path, capsys):
    """``ewtune bench federation-causal-lm`` end to end on the tiny Llama (one round of one step; 26 s on quiet cores)."""
    from ewtune.cli import main

    json_path, markdown = tmp_path / "result.json", tmp_path / "result.md"
    code = main(["bench", "federation-causal-lm", "--model", str(tiny_llama_dir), "--rows-per-holder", "60", "--held-out-rows", "20",
                 "--rounds", "1", "--local-steps", "1", "--json", str(json_path), "--markdown", str(markdown)])  # fmt: skip
    assert code == 0
    report = json.loads(json_path.read_text())
    federated = report["federated"]
    assert federated["ledger_verified"] and federated["adapter_is_the_final_model"] and federated["rounds_completed"] == 1
    assert all(0 < holder["holder_ledger_epsilon_certified"] <= 8.0 for holder in federated["holders"])
    assert [row["round"] for row in federated["perplexity_by_round"]] == [0, 1]
    assert all(row["num_examples"] == 20 and math.isfinite(row["perplexity"]) for row in federated["perplexity_by_round"])
    assert math.isfinite(report["non_private"]["perplexity_after"]) and report["non_private"]["training_sentences"] == 120
    assert "| 1 | " in markdown.read_text() and "Ledgers verified and cross-checked: True" in capsys.readouterr().out
