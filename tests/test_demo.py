"""The demo measures the global model itself, on a share of MR no holder sees, with macro F1 and the
majority-class baseline beside the accuracy (holders release no evaluation metrics by default)."""

import csv

import numpy as np
import pytest

from ewtune.coordinator.checkpoints import load_weights, save_weights
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

    from ewtune.agent import models
    from ewtune.agent.data import DataSpec, load_local_data
    from ewtune.agent.evaluation import evaluate_model

    tokenizer = models.load_tokenizer(tiny_pooled_dir)
    data = load_local_data(DataSpec(path=str(mr_csv), max_length=24, eval_fraction=0.0), tokenizer)
    model = models.load_model(tiny_pooled_dir, mode="head")
    for by_cache, path in zip(cached, [first, second]):
        models.load_trainable_state(model, {name: torch.from_numpy(a) for name, a in load_weights(path).items()})
        by_forward = evaluate_model(model, data.train, tokenizer.pad_token_id, "classification", 64)
        assert by_cache["accuracy"] == pytest.approx(by_forward["accuracy"])
        assert by_cache["macro_f1"] == pytest.approx(by_forward["f1"])
    assert cached[0]["accuracy"] != cached[1]["accuracy"] or cached[0]["macro_f1"] != cached[1]["macro_f1"]


def test_the_demo_report_has_one_heading_per_section_all_alike_and_states_the_run_once():
    from ewtune.demo import report

    holder = {"holder_id": "h0", "dataset_size": 100, "noise_multiplier": 1.0, "epsilon_certified": 2.0, "epsilon_edgeworth_estimate": 1.9,
              "epsilon_rdp": 2.5, "budget_epsilon": 8.0, "rounds": 2, "delta": 1e-5}  # fmt: skip
    accuracy = [{"round": r, "accuracy": 0.5, "macro_f1": 0.4, "majority_baseline": 0.5, "num_examples": 100} for r in (0, 1, 2)]
    result = {
        "run_id": "42", "state": "finished", "reason": None, "rounds_completed": 2, "wall_seconds": 100.0, "work_dir": "/w",
        "holders": [holder], "accuracy_by_round": accuracy, "adapter": None,
        "ledgers": {"coordinator": {"ok": True, "summary": "ledger c.jsonl verified"}, "h0": {"ok": True, "summary": "ledger h0.jsonl verified"}},
        "cross_check": {"ok": True, "matched_commits": 2, "mismatches": [], "not_aggregated": []},
    }  # fmt: skip
    lines = report(result).splitlines()
    headings = [line for line in lines if line.startswith("#")]
    assert headings == [
        "## Run 42: finished, 2 round(s), 100 s wall",
        "### Privacy spent per holder",
        "### The global model on the demo's held-out sentences",
        "### Verification of the ledgers",
    ]
    for heading in headings:  # each heading stands apart: a blank line before and after
        index = lines.index(heading)
        assert lines[index - 1] == "" and lines[index + 1] == ""
    assert sum("round(s)" in line for line in lines) == 1
    assert [line.split(" |")[0] for line in lines if line.startswith("| ") and line[2].isdigit()] == ["| 0 (initial)", "| 1", "| 2"]


def test_the_demo_takes_the_probe_recipes_epochs_over_its_rounds_by_default():
    from ewtune.agent.recipe import Recipe
    from ewtune.demo import recipe_local_steps

    epochs = Recipe().probe_epochs
    for rounds, records, batch in [(5, 3188, 1024), (2, 3188, 1024), (5, 120, 8), (3, 10, 1024)]:
        steps = recipe_local_steps(rounds, records, batch)
        assert steps * rounds * batch / records >= epochs or steps == 1  # at least the recipe's epochs ...
        assert steps == 1 or (steps - 1) * rounds * batch / records < epochs  # ... and not a round's worth more
    assert recipe_local_steps(5, 3188, 1024) == 13


def test_bad_demo_sizes_are_one_line_errors(capsys):
    from ewtune.cli import main

    for arguments, message in [(["--batch-size", "0"], "--batch-size must be > 0"), (["--local-steps", "0"], "--local-steps must be >= 1")]:
        assert main(["demo", *arguments]) != 0
        assert message in capsys.readouterr().err
