"""The non-private half of a causal-LM comparison (``python -m ewtune.bench.train_local --non-private --task
causal_lm``): train-local's model, split and steps without clipping or noise, with the held-out perplexity before
and after, as train-local reports them."""

import json
import math

from ewtune.bench.train_local import main


def test_the_non_private_causal_lm_run_reports_perplexity_before_and_after(tiny_gpt2_dir, mr_csv, capsys):
    argv = ["--non-private", "--model", str(tiny_gpt2_dir), "--data", str(mr_csv), "--task", "causal_lm", "--mode", "lora",
            "--epsilon", "8", "--delta", "1e-5", "--max-examples", "80", "--max-length", "24", "--tune-epochs", "1",
            "--tune-batch", "16", "--tune-lr", "0.01", "--tune-optimizer", "adamw", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [phase["phase"] for phase in result["phases"]] == ["tune"] and result["phases"][0]["noise_multiplier"] == 0.0
    assert result["majority_baseline"] is None and result["accuracy"] is None
    assert math.isfinite(result["perplexity_before"]) and math.isfinite(result["perplexity"])
    assert result["perplexity"] < result["perplexity_before"]  # noiseless training on the text lowers it
    assert result["eval"]["perplexity"] == result["perplexity"]
