"""The demo measures the global model itself, on a share of MR no holder sees, with macro F1 and the
majority-class baseline beside the accuracy (holders release no evaluation metrics by default)."""

import csv

import numpy as np
import pytest

from coordinator.checkpoints import load_weights, save_weights
from ewtune.demo import global_accuracy
from ewtune.local_federation import initial_weights


def test_global_accuracy_per_round_with_f1_and_the_majority_baseline(tiny_bert_dir, mr_csv, tmp_path):
    training = {"max_length": 24, "mode": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_target_modules": ["query", "value"]}
    first = initial_weights(tiny_bert_dir, tmp_path / "round-0.safetensors", training)
    weights = load_weights(first)
    head = next(name for name in weights if "classifier" in name and name.endswith("bias"))
    weights[head] = np.array([0.0, 1e4], dtype=weights[head].dtype)  # predicts class 1 for every sentence
    second = save_weights(tmp_path / "round-1.safetensors", weights)

    rows = global_accuracy(tiny_bert_dir, training, mr_csv, [first, second])
    with open(mr_csv, encoding="utf-8") as handle:
        labels = [int(row["label"]) for row in csv.DictReader(handle)]
    ones = sum(labels) / len(labels)
    assert [row["round"] for row in rows] == [0, 1]
    assert all(row["num_examples"] == len(labels) for row in rows)
    assert rows[0]["majority_baseline"] == pytest.approx(max(ones, 1 - ones))
    # the constant predictor: accuracy is the share of class 1, macro F1 is that of the constant classifier
    assert rows[1]["accuracy"] == pytest.approx(ones)
    assert rows[1]["macro_f1"] == pytest.approx((2 * ones / (1 + ones)) / 2)


def test_head_mode_embeds_once_and_scores_like_the_full_forward(tiny_pooled_dir, mr_csv, tmp_path):
    training = {"max_length": 24, "mode": "head"}
    first = initial_weights(tiny_pooled_dir, tmp_path / "round-0.safetensors", training)
    weights = load_weights(first)
    weights["classifier.bias"] = np.array([0.0, 1e4], dtype=np.float32)  # a different head (always class 1)
    second = save_weights(tmp_path / "round-1.safetensors", weights)
    cached = global_accuracy(tiny_pooled_dir, training, mr_csv, [first, second])

    import torch

    from agent import models
    from agent.data import DataSpec, load_local_data
    from agent.evaluation import evaluate_model

    tokenizer = models.load_tokenizer(tiny_pooled_dir)
    data = load_local_data(DataSpec(path=str(mr_csv), max_length=24, eval_fraction=0.0), tokenizer)
    model = models.load_model(tiny_pooled_dir, mode="head")
    for by_cache, path in zip(cached, [first, second]):
        models.load_trainable_state(model, {name: torch.from_numpy(a) for name, a in load_weights(path).items()})
        by_forward = evaluate_model(model, data.train, tokenizer.pad_token_id, "classification", 64)
        assert by_cache["accuracy"] == pytest.approx(by_forward["accuracy"])
        assert by_cache["macro_f1"] == pytest.approx(by_forward["f1"])
    assert cached[0]["accuracy"] != cached[1]["accuracy"] or cached[0]["macro_f1"] != cached[1]["macro_f1"]
