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
