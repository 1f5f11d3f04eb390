"""The Python API (ewtune/api.py): README's example runs as a doctest; ``import ewtune`` stays light; the
accountant calls give the commands' figures; train_private runs train-local's code on a file or a DataFrame,
returns the trained model and charges a ledger as train-local does; verify_ledger catches a tampered ledger."""

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ewtune
from ewtune.accountant.errors import InvalidInputError
from ewtune.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = {"probe_epochs": 1, "probe_batch": 16, "probe_lr": 0.5, "max_examples": 80, "max_length": 24,
            "physical_batch_size": 16, "insecure_seeded_randomness": True}


def test_the_readme_python_example_runs_as_a_doctest(monkeypatch, tmp_path):
    monkeypatch.setenv("EWTUNE_DATA_DIR", str(tmp_path))
    failed, attempted = doctest.testfile(str(ROOT / "README.md"), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert attempted >= 10 and failed == 0


def test_import_ewtune_loads_neither_torch_nor_the_accountant():
    code = "import sys, ewtune; ewtune.__version__; print('torch' in sys.modules, 'ewtune.accountant.certified' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


def test_the_accountant_calls_give_the_commands_figures(capsys):
    assert main(["accountant", "epsilon", "--sampling-rate", "0.02", "--noise-multiplier", "0.9", "--steps", "300",
                 "--delta", "1e-6", "--neighbouring", "replace_one", "--json"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert ewtune.certified_epsilon(0.02, 0.9, 300, 1e-6, relation="replace_one") == printed["epsilon_certified"]
    assert main(["accountant", "sigma", "--epsilon", "3", "--delta", "1e-6", "--sampling-rate", "0.02", "--steps", "300", "--json"]) == 0
    assert ewtune.noise_multiplier_for(3.0, 1e-6, 0.02, 300) == json.loads(capsys.readouterr().out)["noise_multiplier"]


@pytest.mark.parametrize("call", [
    lambda: ewtune.certified_epsilon(0.01, 1.0, 100, 1.0),
    lambda: ewtune.certified_epsilon(0.01, 1.0, 100, 0.5),
    lambda: ewtune.noise_multiplier_for(1.0, 0.1, 0.01, 100),
    lambda: ewtune.certified_epsilon(1.5, 1.0, 100, 1e-5),
    lambda: ewtune.noise_multiplier_for(-1.0, 1e-5, 0.01, 100),
    lambda: ewtune.noise_multiplier_for(1.0, 1e-5, 0.01, 0),
], ids=["delta-one", "delta-half", "delta-tenth", "rate-above-one", "negative-epsilon", "zero-steps"])  # fmt: skip
def test_bad_accountant_input_raises_the_commands_error(call):
    with pytest.raises(InvalidInputError):
        call()


def _ledger(tmp_path):
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.signing import SigningKey

    key = SigningKey.generate()
    key.save(tmp_path / "ledger.key")
    Ledger.create(tmp_path / "ledger.jsonl", key, "holder", {"budget_epsilon": 9.0, "budget_delta": 1e-5}).close()
    return tmp_path / "ledger.jsonl", tmp_path / "ledger.key", key.public_key_text


def test_train_private_on_a_dataframe_charges_the_ledger_and_returns_the_trained_model(tiny_bert_dir, mr_csv, tmp_path):
    import pandas as pd
    import torch

    from ewtune.agent.models import load_model

    ledger, key, public_key = _ledger(tmp_path)
    result = ewtune.train_private(tiny_bert_dir, pd.read_csv(mr_csv), epsilon=8, delta=1e-5, mode="head", device="cpu",
                                  ledger=ledger, signing_key=key, **TINY_RUN)  # fmt: skip
    assert result.epsilon_certified == result.summary["epsilon_certified"] and 7.5 < result.epsilon_certified <= 8.0 * (1 + 1e-9)
    assert result.summary["eval"]["num_examples"] == 12 and result.accuracy == result.summary["eval"]["accuracy"]
    assert [entry["kind"] for entry in result.ledger_entries] == ["reserve", "commit", "reserve", "commit"]
    count, probe = [entry["payload"]["extra"] for entry in result.ledger_entries if entry["kind"] == "commit"]
    assert count["purpose"] == "dataset_size" and probe["phase"] == "probe"  # the noised count's release, then the probe
    on_disk = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert list(result.ledger_entries) == on_disk[1:]  # every entry after the genesis
    untrained = dict(load_model(tiny_bert_dir, mode="head").named_parameters())
    state = result.trainable_state()
    assert set(state) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(state["classifier.weight"], untrained["classifier.weight"])
    report = ewtune.verify_ledger(ledger, public_key)
    assert report.ok and report.key_pinned and report.entries_verified == len(on_disk)


def test_a_dataframe_or_a_dataset_trains_as_the_same_records_in_a_file(tiny_bert_dir, mr_csv):
    import datasets
    import pandas as pd

    from_file = ewtune.train_private(tiny_bert_dir, mr_csv, epsilon=8, delta=1e-5, device="cpu", **TINY_RUN)
    frame = pd.read_csv(mr_csv)
    for data in (frame, datasets.Dataset.from_pandas(frame)):
        run = ewtune.train_private(tiny_bert_dir, data, epsilon=8, delta=1e-5, device="cpu", **TINY_RUN)
        assert run.summary["event"] == from_file.summary["event"]  # the same split, N, q and noise
        assert (run.accuracy, run.macro_f1, run.summary["eval"]["loss"]) == (from_file.accuracy, from_file.macro_f1, from_file.summary["eval"]["loss"])


def test_verify_ledger_reports_a_tampered_entry(tmp_path):
    from ewtune.accountant.events import PoissonGaussianEvent
    from ewtune.accountant.ledger import Ledger
    from ewtune.accountant.signing import SigningKey

    path, key_file, public_key = _ledger(tmp_path)
    event = PoissonGaussianEvent(0.01, 1.0, 100)
    with Ledger.open(path, SigningKey.load(key_file)) as ledger:
        ledger.commit(ledger.reserve("holder", "run", 0, event), event)
    assert ewtune.verify_ledger(path, public_key).ok
    lines = path.read_text().splitlines()
    commit = json.loads(lines[-1])
    commit["payload"]["event"]["event"]["steps"] = 10  # fewer steps charged than were signed
    path.write_text("\n".join([*lines[:-1], json.dumps(commit)]) + "\n")
    report = ewtune.verify_ledger(path, public_key)
    assert not report.ok and report.first_bad.seq == len(lines) - 1 and "FAILED" in report.summary()


def test_bad_train_private_input(tiny_bert_dir, mr_csv, tmp_path):
    with pytest.raises(TypeError, match="unknown train-local option"):
        ewtune.train_private(tiny_bert_dir, mr_csv, epsilon=8, delta=1e-5, probe_epoch=1)
    with pytest.raises(TypeError, match="a pandas DataFrame or a datasets.Dataset"):
        ewtune.train_private(tiny_bert_dir, [("a", 1)], epsilon=8, delta=1e-5)
    with pytest.raises(InvalidInputError, match="no such file"):
        ewtune.train_private(tiny_bert_dir, tmp_path / "none.csv", epsilon=8, delta=1e-5)
    with pytest.raises(InvalidInputError, match="--delta must be in"):
        ewtune.train_private(tiny_bert_dir, mr_csv, epsilon=8, delta=1.5)
