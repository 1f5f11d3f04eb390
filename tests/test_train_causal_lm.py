"""``ewtune agent train-local --task causal_lm``: the recipe tunes the language model itself (no probe phase, the
whole model) and the run ends with its held-out perplexity before and after training; settings that only make
sense for a classifier (mode head, a probe phase, cached top layers, no tune phase) are refused in one line
before torch loads, not after the model, the data and the training (which once ended in a traceback)."""

import json
import math
import subprocess
import sys

import pytest

from ewtune.cli import main


def _argv(model_dir, data_file, *extra):
    return ["agent", "train-local", "--model", str(model_dir), "--data", str(data_file), "--task", "causal_lm",
            "--epsilon", "8", "--delta", "1e-5", "--max-examples", "80", "--max-length", "24", "--device", "cpu", *extra]  # fmt: skip


def test_a_causal_lm_run_finishes_with_its_perplexity_before_and_after(tiny_gpt2_dir, mr_csv, tmp_path, capsys):
    output = tmp_path / "gpt2"
    argv = _argv(tiny_gpt2_dir, mr_csv, "--mode", "lora", "--tune-epochs", "1", "--tune-batch", "16", "--output", str(output), "--json")
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [phase["phase"] for phase in summary["phases"]] == ["tune"] and summary["tune_layers"] == 0
    assert summary["eval"]["perplexity"] == summary["perplexity"] and summary["perplexity_before"] == summary["eval"]["perplexity_before"]
    for figure in ("perplexity", "perplexity_before"):
        assert math.isfinite(summary[figure]) and summary[figure] > 1
    assert summary["perplexity"] != summary["perplexity_before"]  # the tuned adapter changed the model
    assert summary["majority_baseline"] is None and summary["accuracy"] is None
    assert 7.9 < summary["epsilon_certified"] <= 8.0 * (1 + 1e-9)
    assert json.loads((output / "run.json").read_text())["perplexity"] == summary["perplexity"]
    assert main(_argv(tiny_gpt2_dir, mr_csv, "--mode", "lora", "--tune-epochs", "1", "--tune-batch", "16")) == 0
    assert "(before training " in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ((), "mode 'head' trains a classification head alone: give --mode lora (or full) and --tune-epochs > 0"),
    (("--mode", "lora"), "--task causal_lm trains in the tune phase alone: give --tune-epochs > 0"),
    (("--mode", "lora", "--tune-epochs", "1", "--probe-epochs", "3"), "no classification head to probe: --probe-epochs must be 0"),
    (("--mode", "full", "--tune-epochs", "1", "--tune-layers", "2"), "--tune-layers 2 needs a sentence-embedding classifier"),
], ids=["default-head-mode", "no-tune-phase", "probe", "top-layers"])  # fmt: skip
def test_classifier_settings_are_refused_in_one_line_before_torch_loads(tiny_gpt2_dir, mr_csv, extra, message):
    probe = (
        "import sys; from ewtune.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *_argv(tiny_gpt2_dir, mr_csv, *extra)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ewtune: error: ") and message in result.stderr
