"""The classifier sits on the embedding the checkpoint was trained for (mean pooling, normalised, for
sentence-transformers models), saves and loads back with the same head, and a head-only run on cached
embeddings computes the same clipped gradients as one that runs the encoder."""

from __future__ import annotations

import pytest
import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent import models
from ewtune.agent.heads import Pooling, PooledClassifier, pool, read_pooling


def test_mean_pooling_is_the_masked_mean_then_unit_length():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = pool(hidden, mask, Pooling("mean", normalize=False, files=()))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [0.0, 5.0]]))  # padding excluded
    unit = pool(hidden, mask, Pooling("mean", normalize=True, files=()))
    torch.testing.assert_close(unit, torch.tensor([[2.0, 3.0], [0.0, 5.0]]) / torch.tensor([[13**0.5], [5.0]]))
    torch.testing.assert_close(pool(hidden, mask, Pooling("cls", False, ())), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, Pooling("max", False, ())), torch.tensor([[3.0, 4.0], [0.0, 5.0]]))


def test_the_packaged_minilm_is_read_as_mean_pooled_and_normalised():
    from ewtune.agent.assets import minilm_model_dir

    pooling = read_pooling(minilm_model_dir())
    assert (pooling.mode, pooling.normalize) == ("mean", True)


def test_a_checkpoint_without_pooling_files_keeps_transformers_head(tiny_bert_dir, tmp_path):
    assert read_pooling(tiny_bert_dir) is None
    assert not isinstance(models.load_model(tiny_bert_dir, mode="head"), PooledClassifier)
    (tmp_path / "modules.json").write_text("not json")
    with pytest.raises(InvalidInputError, match="unreadable"):
        read_pooling(tmp_path)


def _batch(tokenizer, texts=("a good film", "a dull and tired film", "fine")):
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    return {key: value for key, value in encoded.items()}


def test_the_head_sits_on_the_pooled_embedding(tiny_pooled_dir):
    model = models.load_model(tiny_pooled_dir, mode="head").eval()
    tokenizer = models.load_tokenizer(tiny_pooled_dir)
    batch = _batch(tokenizer)
    assert isinstance(model, PooledClassifier)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        hidden = model.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        by_hand = (hidden * mask).sum(1) / mask.sum(1)
        by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
        logits = model(**batch).logits
    torch.testing.assert_close(logits, by_hand @ model.classifier.weight.T + model.classifier.bias)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_a_saved_model_loads_back_with_the_same_head(tiny_pooled_dir, tmp_path, mode):
    model = models.load_model(tiny_pooled_dir, mode=mode).eval()
    with torch.no_grad():
        model.classifier.weight.normal_()
    tokenizer = models.load_tokenizer(tiny_pooled_dir)
    models.save_model(model, tokenizer, tmp_path / "saved")
    loaded = models.load_model(tmp_path / "saved", mode=mode).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_a_saved_lora_adapter_loads_back_with_the_same_head(tiny_pooled_dir, tmp_path):
    model = models.load_model(tiny_pooled_dir, mode="lora", lora_rank=2, lora_target_modules=["query", "value"]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.3)
    tokenizer = models.load_tokenizer(tiny_pooled_dir)
    models.save_model(model, tokenizer, tmp_path / "adapter")
    loaded = models.load_adapter(tiny_pooled_dir, tmp_path / "adapter").eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_cached_embeddings_give_the_same_clipped_gradients_as_the_encoder(tiny_pooled_dir):
    from ewtune.agent.dpsgd import PerExampleClipper, classification_loss

    model = models.load_model(tiny_pooled_dir, mode="head").eval()
    tokenizer = models.load_tokenizer(tiny_pooled_dir)
    batch = dict(_batch(tokenizer), labels=torch.tensor([1, 0, 1]))
    with torch.no_grad():
        features = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    clipper = PerExampleClipper(model, 0.05, classification_loss)
    through_encoder = clipper.clipped_grad_sum(batch)
    from_cache = clipper.clipped_grad_sum({"features": features, "labels": batch["labels"]})
    assert int((through_encoder.per_example_norms > 0.05).sum()) > 0  # clipping is exercised
    for name, grad in through_encoder.grads.items():
        torch.testing.assert_close(from_cache.grads[name], grad, rtol=1e-5, atol=1e-7)


def _probe_accuracy(model_dir, data_file):
    """Held-out accuracy and macro F1 of a DP linear probe (certified epsilon 8, the recipe's probe settings),
    and the majority-class baseline; seeded so that the figures are the same on every run."""
    from collections import Counter

    from ewtune.accountant.phases import Phase, calibrate_phases
    from ewtune.accountant.sampling import executable_sampling_rate
    from ewtune.agent.training import LocalTrainer, TrainingConfig
    from ewtune.agent.dpsgd_run import StepPlan

    trainer = LocalTrainer(TrainingConfig(model_dir=str(model_dir), data_file=str(data_file), mode="head", max_length=32,
                                          eval_fraction=0.2, insecure_seeded_randomness=True))
    rate = executable_sampling_rate(256 / trainer.dataset_size)
    (phase,) = calibrate_phases(8.0, 1e-5, [Phase("probe", rate, round(10 / rate))])
    trainer.train(StepPlan(phase.event.steps, rate, phase.event.noise_multiplier, 1.0, 4.0, optimizer="sgd"))
    metrics = trainer.evaluate()
    labels = trainer.data.eval.labels
    return metrics["accuracy"], metrics["f1"], max(Counter(labels).values()) / len(labels)


def test_a_private_probe_on_mr_learns_on_mean_pooling_and_not_on_cls(tmp_path):
    """The real MiniLM on 1,200 MR sentences: the pooling the checkpoint was trained for beats the class prior
    by a margin that [CLS] pooling, which it was not trained for, does not reach."""
    import json
    import os

    from ewtune.agent.assets import minilm_model_dir, write_mr_csv

    torch.set_num_threads(2)
    data = write_mr_csv(tmp_path / "mr.csv", max_rows=1500, seed=0)
    source, cls = minilm_model_dir(), tmp_path / "minilm-cls"
    cls.mkdir()
    for item in source.iterdir():
        if item.name != "1_Pooling":
            os.symlink(item, cls / item.name)
    (cls / "1_Pooling").mkdir()
    (cls / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    accuracy, f1, majority = _probe_accuracy(source, data)
    assert accuracy >= majority + 0.08 and f1 >= 0.65
    broken_accuracy, _, _ = _probe_accuracy(cls, data)
    assert broken_accuracy < majority + 0.08 <= accuracy
