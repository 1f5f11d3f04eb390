"""``ewtune bench dpsgd --model``: the three models build, one step of every engine runs on each (the large
ones at ``--scale tiny``, the same code path), the full-size configs have the sizes issue 24 asks for, and
the report carries tokens per second and peak memory."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench import dpsgd as bench
from ewtune.bench.dpsgd_models import BUILT_FROM_CONFIG, MODELS, model_and_batch, model_config


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", bench.MODES)
def test_one_step_of_every_engine_runs_on_every_model(model, mode):
    scale = "tiny" if model in BUILT_FROM_CONFIG else "full"
    for engine in bench.ENGINES:
        config = {"model": model, "scale": scale, "mode": mode, "engine": engine, "steps": 1, "warmup": 0,
                  "device": "cpu", "bf16": False, "threads": 1, "batch_size": 2, "seq_len": 8}  # fmt: skip
        result = bench.worker(config)
        assert len(result["cpu_seconds"]) == 1 and result["peak_memory_mb"] > 0, engine
        assert 2 * 4 <= result["tokens_per_step"] <= 2 * 8  # lengths in [seq_len / 2, seq_len]
        if mode == "lora":
            assert 0 < result["trainable_parameters"] < result["parameters"] / 10, engine
        else:
            assert result["trainable_parameters"] == result["parameters"], engine


def test_the_full_size_configs_are_roberta_large_and_a_llama_style_1b():
    with torch.device("meta"):
        roberta = model_and_batch({"model": "roberta-large", "scale": "full", "mode": "full", "device": "meta",
                                   "batch_size": 2, "seq_len": 8})[0]  # fmt: skip
        llama = model_and_batch({"model": "llama-1b", "scale": "full", "mode": "full", "device": "meta",
                                 "batch_size": 2, "seq_len": 8})[0]  # fmt: skip
    assert 350e6 < sum(p.numel() for p in roberta.parameters()) < 360e6  # RoBERTa-large: 355M
    assert 1.0e9 < sum(p.numel() for p in llama.parameters()) < 1.1e9
    config = model_config("llama-1b", "full")
    sizes = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads)
    assert sizes == (16, 2048, 32, 8) and (config.intermediate_size, config.vocab_size) == (8192, 32000)
    tiny = model_config("llama-1b", "tiny")
    assert tiny.num_hidden_layers == 2 and tiny.num_attention_heads // tiny.num_key_value_heads == 4


def _parse(arguments: list[str]):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(arguments)


@pytest.mark.slow  # two worker processes, ~20 s here; scripts/gpu-run's smoke runs the same
def test_the_report_of_a_tiny_llama_run_has_tokens_per_second_and_peak_memory(tmp_path, capsys):
    arguments = ["--model", "llama-1b", "--scale", "tiny", "--mode", "lora", "--engines", "non-private,ewtune",
                 "--steps", "1", "--warmup", "0", "--repeats", "1", "--batch-size", "2", "--seq-len", "8",
                 "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]  # fmt: skip
    assert bench.run(_parse(arguments)) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    for row in report["summary"]:
        assert "error" not in row, row
        assert row["tokens_per_second"] == pytest.approx(report["runs"][0]["tokens_per_step"] / row["seconds_per_step"])
        assert row["peak_memory_mb"] > 0
    table = (tmp_path / "r.md").read_text()
    assert "Llama-style 1B (random init), tiny scale" in table and "| tokens/s |" in table
    assert "--model llama-1b --scale tiny" in table


def test_scale_tiny_is_refused_for_the_pretrained_minilm():
    with pytest.raises(InvalidInputError, match="--scale tiny applies to roberta-large and llama-1b"):
        bench.run(_parse(["--scale", "tiny"]))
