"""``ewtune ledger report --accuracy FILE`` reads every accuracy document ewtune writes (a coordinator's
status.json, ``ewtune evaluate --json``, ``train-local --json``; the demo's is in tests/test_ledger_report.py) and
says in one line what is wrong with any other."""

from __future__ import annotations

import json

import pytest

from ewtune.accountant.ledger import Ledger
from ewtune.accountant.signing import SigningKey
from ewtune.cli import main
from ewtune.coordinator.run_status import HolderStatus, RunStatus

REFUSAL = 'refused: this holder releases no evaluation metrics (its policy has evaluation = "none")'


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    path = tmp_path_factory.mktemp("ledger") / "holder.jsonl"
    Ledger.create(path, SigningKey.generate(), "holder", {"budget_epsilon": 8.0, "budget_delta": 1e-5}).close()
    return path


def status_document(private_accuracy: dict[str, float]) -> dict:
    """A coordinator's status.json as its one writer (ewtune.coordinator.run_status) writes it: one holder releasing
    its noised evaluations (or none), one refusing every one."""
    evaluation = {r: {"accuracy": a, "f1": a, "majority_baseline": 0.52} for r, a in private_accuracy.items()}
    return RunStatus(state="finished", holders={
        "hospital-a": HolderStatus(accuracy=private_accuracy, evaluation=evaluation),
        "hospital-b": HolderStatus(evaluation_missing={r: REFUSAL for r in ("0", "1", "2")}),
    }).to_json()  # fmt: skip


def report_json(tmp_path, ledger, document, capsys) -> tuple[int, dict | None, str]:
    accuracy = tmp_path / "accuracy.json"
    accuracy.write_text(json.dumps(document))
    code = main(["ledger", "report", str(ledger), "--out", str(tmp_path / "out"), "--accuracy", str(accuracy), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code != 2 else None, captured.err


def test_a_status_json_gives_each_releasing_holder_a_series_and_each_refusing_one_its_reason(ledger, tmp_path, capsys):
    code, result, _ = report_json(tmp_path, ledger, status_document({"0": 0.48, "1": 0.61, "2": 0.7}), capsys)
    assert code in (0, 1)  # an unpinned key: intact, not verified
    released, refused = result["accuracy"]
    assert released["rounds"] == [0, 1, 2] and released["values"] == [0.48, 0.61, 0.7] and released["baseline"] == 0.52
    assert refused["values"] == [] and refused["missing"] == f"rounds 0, 1, 2: {REFUSAL}"
    page = (tmp_path / "out" / "report.html").read_text()
    assert (tmp_path / "out" / "accuracy.png").is_file() and "No accuracy records were given" not in page
    assert "hospital-b (private, noised by the holder): no accuracy released (rounds 0, 1, 2: refused: " in page


def test_a_status_json_in_which_no_holder_released_an_accuracy_says_why_in_one_line(ledger, tmp_path, capsys):
    code, _, err = report_json(tmp_path, ledger, status_document({}), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a coordinator status in which no holder released an accuracy (hospital-a: no evaluation recorded" in err
    assert f"hospital-b: rounds 0, 1, 2: {REFUSAL})" in err


def test_an_evaluate_json_is_one_exact_figure_drawn_beside_its_baseline(ledger, tmp_path, capsys):
    evaluated = {"model": "minilm", "adapter": None, "weights": "run/final.safetensors", "data": "test.csv", "records": "every",
                 "task": "classification", "accuracy": 0.71, "macro_f1": 0.7, "majority_baseline": 0.51, "loss": 0.6,
                 "perplexity": None, "num_examples": 300, "device": "cpu", "released": False}  # fmt: skip
    code, result, _ = report_json(tmp_path, ledger, evaluated, capsys)
    assert code in (0, 1)
    assert result["accuracy"] == [{"name": "run/final.safetensors on test.csv (exact, never released)", "rounds": None,
                                   "values": [0.71], "baseline": 0.51}]  # fmt: skip
    assert (tmp_path / "out" / "accuracy.png").is_file()


def test_a_train_local_json_is_read_by_its_model_id(ledger, tmp_path, capsys):
    trained = {"model_id": "model-691fb282dff1", "mode": "head", "accuracy": 0.66, "macro_f1": 0.66, "majority_baseline": 0.55}
    code, result, _ = report_json(tmp_path, ledger, trained, capsys)
    assert code in (0, 1) and result["accuracy"][0]["name"] == "model-691fb282dff1 (exact, never released)"


@pytest.mark.parametrize("document, message", [
    ({"rounds": 3, "state": "finished"}, "holds none of accuracy_by_round (ewtune demo --json), holders (a coordinator's "
                                         "status.json) or a top-level accuracy (ewtune evaluate --json, train-local --json); "
                                         "its keys: rounds, state"),
    ({"task": "causal_lm", "accuracy": None, "perplexity": 40.0}, "holds no accuracy (a causal_lm evaluation: perplexity only)"),
    ({"holders": {"a": {"accuracy": {"1": "high"}}}}, "unexpected accuracy records (ValueError: could not convert string to float: 'high')"),
    ({"accuracy_by_round": [{"round": 0, "accuracy": float("nan"), "majority_baseline": 0.5}]},
     "unexpected accuracy records (ValueError: round 0: accuracy nan is not a finite number)"),
])  # fmt: skip
def test_a_file_ewtune_did_not_write_is_one_line_saying_what_it_holds(ledger, tmp_path, capsys, document, message):
    code, _, err = report_json(tmp_path, ledger, document, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
