"""``ewtune evaluate``: what train-local saved, evaluated on train-local's held-out records, gives the held-out
figures train-local printed (its adapter in lora mode, its whole model in head mode); every record by default;
weights written by ``ewtune weights init`` load into the model their settings build and no other; bad input is
one line and exit 2, a bad path before torch is imported."""

import json
import subprocess
import sys

import pytest

from ewtune.cli import main

TRAIN = ["--epsilon", "8", "--delta", "1e-5", "--probe-epochs", "1", "--probe-batch", "16", "--probe-lr", "0.5",
         "--tune-epochs", "1", "--tune-batch", "16", "--tune-layers", "0", "--physical-batch-size", "16",
         "--insecure-seeded-randomness", "--json"]  # fmt: skip
SPLIT = ["--max-examples", "80", "--max-length", "24"]  # the same records, split alike, in both commands


def _evaluate(capsys, *argv) -> dict:
    assert main(["evaluate", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["lora", "head"])
def test_what_train_local_saved_gives_its_held_out_figures(tiny_bert_dir, mr_csv, tmp_path, capsys, mode):
    output = tmp_path / "run"
    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(mr_csv), "--mode", mode, *TRAIN, *SPLIT]
    assert main([*argv, "--output", str(output), "--device", "cpu"]) == 0
    trained = json.loads(capsys.readouterr().out)
    saved = ["--model", str(tiny_bert_dir), "--adapter", str(output)] if mode == "lora" else ["--model", str(output)]
    held_out = _evaluate(capsys, *saved, "--data", str(mr_csv), "--held-out", *SPLIT)
    assert held_out["num_examples"] == trained["eval"]["num_examples"] == 12
    assert held_out["accuracy"] == trained["accuracy"] and held_out["macro_f1"] == trained["macro_f1"]
    assert held_out["loss"] == pytest.approx(trained["eval"]["loss"], rel=1e-6)
    assert held_out["majority_baseline"] == trained["majority_baseline"] and held_out["released"] is False
    every = _evaluate(capsys, *saved, "--data", str(mr_csv))
    assert every["records"] == "every" and every["num_examples"] == 400  # the fixture's 400 MR sentences


def test_initial_weights_load_only_into_the_model_their_settings_build(tiny_bert_dir, mr_csv, tmp_path, capsys):
    weights = tmp_path / "init.safetensors"
    assert main(["weights", "init", str(weights), "--model-dir", str(tiny_bert_dir), "--lora-rank", "4", "--lora-target-modules", "query"]) == 0
    capsys.readouterr()
    result = _evaluate(capsys, "--model", str(tiny_bert_dir), "--weights", str(weights), "--data", str(mr_csv), "--lora-rank", "4",
                       "--lora-target-modules", "query", "--max-length", "24")  # fmt: skip
    assert result["num_examples"] == 400 and 0 <= result["accuracy"] <= 1 and result["majority_baseline"] >= 0.5
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--weights", str(weights), "--data", str(mr_csv), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "do not fit the model --mode" in error and "missing" in error


def test_the_perplexity_of_a_causal_lm(tiny_gpt2_dir, mr_csv, capsys):
    result = _evaluate(capsys, "--model", str(tiny_gpt2_dir), "--data", str(mr_csv), "--task", "causal_lm", "--max-length", "24")
    assert result["accuracy"] is None and result["num_examples"] == 400 and result["perplexity"] > 1


def _bad_inputs(tmp_path, model, data):
    (tmp_path / "folder").mkdir(exist_ok=True)
    no_labels = tmp_path / "no_labels.csv"
    no_labels.write_text("text,y\nhello,1\nworld,0\n")
    return {
        "no model": (["--model", str(tmp_path / "none"), "--data", data], "no such model directory"),
        "no data": (["--model", model, "--data", str(tmp_path / "none.csv")], "no such file"),
        "data is a folder": (["--model", model, "--data", str(tmp_path / "folder")], "is a directory"),
        "not an adapter": (["--model", model, "--adapter", str(tmp_path / "folder"), "--data", data], "no adapter_config.json"),
        "no weights": (["--model", model, "--weights", str(tmp_path / "w.safetensors"), "--data", data], "no such file"),
        "adapter and weights": (["--model", model, "--adapter", "a", "--weights", "w", "--data", data], "not allowed with"),
        "split key alone": (["--model", model, "--data", data, "--split-key", data], "--split-key goes with --held-out"),
        "seed alone": (["--model", model, "--data", data, "--seed", "3"], "--seed goes with --held-out"),
        "rank alone": (["--model", model, "--data", data, "--lora-rank", "4"], "--lora-rank goes with --weights"),
        "no label column": (["--model", model, "--data", str(no_labels)], "no column 'label'"),
        "bad device": (["--model", model, "--data", data, "--device", "gpu"], "device"),
    }


BAD_CASES = ("no model", "no data", "data is a folder", "not an adapter", "no weights", "adapter and weights",
             "split key alone", "seed alone", "rank alone", "no label column", "bad device")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_exit_2(tiny_bert_dir, mr_csv, tmp_path, capsys, case):
    cases = _bad_inputs(tmp_path, str(tiny_bert_dir), str(mr_csv))
    assert set(cases) == set(BAD_CASES)
    argv, message = cases[case]
    try:
        code = main(["evaluate", *argv])
    except SystemExit as refused:  # argparse's own refusals (ewtune.cli.OneLineParser): one line too
        code = refused.code
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error


def test_a_missing_data_file_is_refused_before_torch_loads(tiny_bert_dir, tmp_path):
    code = ("import sys; from ewtune.cli import main; code = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(code)")  # fmt: skip
    argv = ["evaluate", "--model", str(tiny_bert_dir), "--data", str(tmp_path / "none.csv")]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (2, "False") and "no such file" in done.stderr
