"""Tuning the top encoder layers on cached hidden states: the cached forward equals the full model's, the clipped
per-example gradients equal those computed through the full model, only the top layers and the head train, and
the tuned model saves and loads back."""

from __future__ import annotations

import pytest
import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent import models
from ewtune.agent.top_layers import TopLayers, hidden_batch, hidden_states_below
from ewtune.agent.training import base_model

TEXTS = ("a good film", "a dull and tired film with nothing in it", "fine", "not bad at all, really")


def _examples(tokenizer, labels=(1, 0, 1, 0)):
    from ewtune.agent.data import Examples

    encoded = tokenizer(list(TEXTS))
    return Examples(input_ids=encoded["input_ids"], token_type_ids=encoded["token_type_ids"], labels=list(labels))


def _perturbed(model):
    """The trainable parameters moved away from their initial values (LoRA's B starts at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.mark.parametrize(("mode", "count"), [("full", 1), ("full", 2), ("lora", 2)])
def test_the_cached_forward_equals_the_full_models(tiny_pooled_3layer_dir, mode, count):
    from ewtune.agent.data import collate

    model = _perturbed(models.load_model(tiny_pooled_3layer_dir, mode=mode, tune_layers=count, lora_rank=2)).eval()
    tokenizer = models.load_tokenizer(tiny_pooled_3layer_dir)
    examples = _examples(tokenizer)
    base = base_model(model)
    records = hidden_states_below(base, count, examples, tokenizer.pad_token_id, batch_size=3)
    assert [len(r) for r in records] == [len(ids) for ids in examples.input_ids]  # trimmed to the real tokens
    order = [3, 0, 2, 1]
    batch = collate(examples, order, tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        cached = hidden_batch(records, torch.tensor(examples.labels), order)
        top = TopLayers(base, count)(cached["hidden_states"], cached["attention_mask"]).logits
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    assert torch.equal(cached["labels"], batch["labels"])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cached_states_give_the_same_clipped_gradients_as_the_full_model(tiny_pooled_3layer_dir, mode):
    from ewtune.agent.dpsgd import PerExampleClipper, classification_loss
    from ewtune.agent.data import collate

    model = _perturbed(models.load_model(tiny_pooled_3layer_dir, mode=mode, tune_layers=2, lora_rank=2)).eval()
    tokenizer = models.load_tokenizer(tiny_pooled_3layer_dir)
    examples = _examples(tokenizer)
    base = base_model(model)
    records = hidden_states_below(base, 2, examples, tokenizer.pad_token_id)
    indices = [0, 1, 2, 3]
    clip = 0.05
    through_model = PerExampleClipper(model, clip, classification_loss)
    full = through_model.clipped_grad_sum(collate(examples, indices, tokenizer.pad_token_id))
    through_model.close()
    top = TopLayers(base, 2)
    from_cache = PerExampleClipper(top, clip, classification_loss).clipped_grad_sum(
        hidden_batch(records, torch.tensor(examples.labels), indices))
    assert int((full.per_example_norms > clip).sum()) > 0  # clipping is exercised
    torch.testing.assert_close(from_cache.per_example_norms, full.per_example_norms, rtol=1e-5, atol=1e-7)
    by_param = {id(p): name for name, p in top.named_parameters()}
    assert len(full.grads) == len(from_cache.grads) > 2  # the top layers' parameters, not the head alone
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(from_cache.grads[by_param[id(param)]], full.grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_only_the_top_layers_and_the_head_are_trainable(tiny_pooled_3layer_dir, mode):
    model = models.load_model(tiny_pooled_3layer_dir, mode=mode, tune_layers=1, lora_rank=2)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in name for name in names)
    layers = {name.split("layer.")[1].split(".")[0] for name in names if "layer." in name}
    assert layers == {"2"}
    everything = models.load_model(tiny_pooled_3layer_dir, mode=mode, lora_rank=2)
    assert len([p for p in everything.parameters() if p.requires_grad]) > len(names)


@pytest.mark.parametrize("count", [0, 4, True])
def test_a_layer_count_outside_the_encoder_is_refused(tiny_pooled_3layer_dir, count):
    if count == 0:  # 0 means the whole model, which is always allowed
        assert models.load_model(tiny_pooled_3layer_dir, mode="full", tune_layers=0) is not None
        return
    with pytest.raises(InvalidInputError, match="tune_layers must be an integer from 1 to the encoder's 3 layers"):
        models.load_model(tiny_pooled_3layer_dir, mode="full", tune_layers=count)


def test_a_checkpoint_without_pooling_cannot_tune_top_layers(tiny_bert_dir):
    with pytest.raises(InvalidInputError, match="pooled"):
        models.load_model(tiny_bert_dir, mode="lora", tune_layers=1)


def test_a_tuned_lora_adapter_and_a_tuned_model_load_back(tiny_pooled_3layer_dir, tmp_path):
    from ewtune.agent.data import collate

    tokenizer = models.load_tokenizer(tiny_pooled_3layer_dir)
    batch = collate(_examples(tokenizer), range(4), tokenizer.pad_token_id)
    del batch["labels"]
    lora = _perturbed(models.load_model(tiny_pooled_3layer_dir, mode="lora", tune_layers=2, lora_rank=2)).eval()
    models.save_model(lora, tokenizer, tmp_path / "adapter")
    full = _perturbed(models.load_model(tiny_pooled_3layer_dir, mode="full", tune_layers=2)).eval()
    models.save_model(full, tokenizer, tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(models.load_adapter(tiny_pooled_3layer_dir, tmp_path / "adapter").eval()(**batch).logits,
                                   lora(**batch).logits)
        reloaded = models.load_model(tmp_path / "model", mode="full", tune_layers=2).eval()
        torch.testing.assert_close(reloaded(**batch).logits, full(**batch).logits)
    assert set(models.trainable_state(reloaded)) == set(models.trainable_state(full))


def test_a_private_run_trains_the_top_layers_from_the_cache_and_leaves_the_rest(tiny_pooled_3layer_dir, mr_csv):
    from ewtune.agent.training import LocalTrainer, TrainingConfig
    from ewtune.agent.dpsgd_run import StepPlan

    trainer = LocalTrainer(TrainingConfig(model_dir=str(tiny_pooled_3layer_dir), data_file=str(mr_csv), mode="full",
                                          tune_layers=1, max_length=32, max_examples=120, insecure_seeded_randomness=True))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    result = trainer.train(StepPlan(3, 0.2, 1.0, 1.0, 0.1, optimizer="sgd"))
    assert result.event.steps == 3 and result.event.noise_multiplier == 1.0
    assert result.event.sampling_rate == pytest.approx(0.2)
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(result.trainable_state)
    assert any(name.startswith("encoder.encoder.layer.2.") for name in changed)
    assert len(trainer._hidden) == trainer.dataset_size


def test_probe_features_from_the_cache_equal_the_encoders(tiny_pooled_3layer_dir):
    from ewtune.agent.heads import embed_examples

    model = models.load_model(tiny_pooled_3layer_dir, mode="lora", tune_layers=2, lora_rank=2)
    tokenizer = models.load_tokenizer(tiny_pooled_3layer_dir)
    examples = _examples(tokenizer)
    base = base_model(model)
    records = hidden_states_below(base, 2, examples, tokenizer.pad_token_id)
    model.train()
    from_cache = TopLayers(base, 2).embed_cached(records, batch_size=3)
    assert model.training  # the mode is restored
    torch.testing.assert_close(from_cache, embed_examples(base, examples, tokenizer.pad_token_id), rtol=1e-5, atol=1e-6)


def test_the_daemon_releases_only_the_top_layers_and_keeps_its_policy_checks(tiny_pooled_3layer_dir, mr_csv, tmp_path):
    """A holder whose [training] tunes the top layer: a round trains it and the head from the cache, the update
    released (and committed to its ledger) is those parameters, and the policy's checks (model id, names and
    shapes, sigma floor, steps) still refuse a bad plan before anything is charged."""
    import numpy as np

    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.receipts import update_digest, verify_receipt
    from ewtune.accountant.signing import SigningKey
    from ewtune.agent.daemon import Daemon
    from ewtune.agent.policy import HolderPolicy, PlanRefused
    from ewtune.agent.training import LocalTrainer, TrainingConfig

    trainer = LocalTrainer(TrainingConfig(model_dir=str(tiny_pooled_3layer_dir), data_file=str(mr_csv), mode="lora", lora_rank=2,
                                          tune_layers=1, max_length=32, max_examples=200))
    key = SigningKey.generate()
    ledger = Ledger.create(tmp_path / "ledger.jsonl", key, "holder0", {"budget_epsilon": 8.0, "budget_delta": 1e-5})
    daemon = Daemon("holder0", HolderPolicy(8.0, 1e-5, max_steps_per_round=5), trainer, ledger, key)
    weights = {name: t.numpy().copy() for name, t in trainer.trainable_state().items()}
    assert {name.split("layer.")[1].split(".")[0] for name in weights if "layer." in name} == {"2"}
    plan = {"run_id": "run-1", "round": 1, "steps": 3, "sampling_rate": 0.1, "noise_multiplier": 1.0, "clip_norm": 1.0,
            "learning_rate": 0.5, "delta": 1e-5}
    refusals = [
        ({**weights, "encoder.encoder.layer.0.attention.self.query.lora_A.weight": np.zeros((2, 32), np.float32)}, plan, "unknown"),
        ({name: a[..., :1] if a.ndim == 2 else a for name, a in weights.items()}, plan, "shape"),
        (weights, {**plan, "noise_multiplier": 0.3}, "noise"),
        (weights, {**plan, "steps": 6}, "steps"),
        (weights, {**plan, "model_id": "another-model"}, "model"),
    ]
    for arrays, bad_plan, message in refusals:
        with pytest.raises((InvalidInputError, PlanRefused), match=message):
            daemon.train(arrays, bad_plan)
    count = ["reserve", "commit"]  # the noised count released at the daemon's start (ewtune.agent.released_count)
    assert [e["kind"] for e in ledger.entries] == ["genesis", *count]
    reply = daemon.train(weights, plan)
    assert set(reply.arrays) == set(weights)
    assert verify_receipt(reply.receipt, key.public_key_text).update_sha256 == update_digest(reply.arrays)
    assert all(not np.array_equal(reply.arrays[name], weights[name]) for name in weights if "lora_A" in name or "classifier" in name)
    assert [e["kind"] for e in ledger.entries] == ["genesis", *count, "reserve", "commit"]
    assert len(trainer._hidden) == trainer.dataset_size  # the round ran on the cached states


def test_the_coordinators_initial_weights_are_the_holders_tuned_parameters(tiny_pooled_3layer_dir, tmp_path):
    from ewtune.coordinator.checkpoints import load_weights
    from ewtune.cli import main

    output = tmp_path / "initial.safetensors"
    assert main(["weights", "init", str(output), "--model-dir", str(tiny_pooled_3layer_dir), "--mode", "full", "--tune-layers", "1"]) == 0
    holders = models.load_model(tiny_pooled_3layer_dir, mode="full", tune_layers=1)
    shapes = {name: tuple(t.shape) for name, t in models.trainable_state(holders).items()}
    assert {name: tuple(a.shape) for name, a in load_weights(output).items()} == shapes
