"""``ewtune accountant epsilon|sigma``: output, JSON keys, one-line errors with exit 2, light imports."""

import json
import subprocess
import sys

import pytest

from ewtune.cli import main

SST2 = ["--sampling-rate", "0.029696060817532555", "--steps", "660", "--delta", "1e-5"]


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_epsilon_json_has_every_accountant_with_its_time(capsys):
    code, out, _ = _run(capsys, ["accountant", "epsilon", *SST2, "--noise-multiplier", "0.7865", "--rdp", "--json"])
    assert code == 0
    document = json.loads(out)
    assert abs(document["epsilon_edgeworth"] - 7.9929) < 5e-4  # EW-Tune's logged estimate
    assert document["epsilon_edgeworth_order2"] > 0 and document["epsilon_edgeworth_order3"] > 0
    assert document["epsilon_edgeworth_bound"] is None  # vacuous at delta = 1e-5
    # the guarantee lies above the estimate here (true epsilon ~8.29) and RDP above the guarantee
    assert document["epsilon_edgeworth"] < document["epsilon_certified"] < document["epsilon_rdp"]
    every = {"epsilon_certified", "epsilon_edgeworth", "epsilon_edgeworth_order2", "epsilon_edgeworth_order3", "epsilon_edgeworth_bound", "epsilon_rdp"}
    assert set(document["seconds"]) == every
    assert document["certified_accountant"]["name"]


def test_epsilon_without_rdp_never_imports_dp_accounting():
    probe = (
        "import sys, json, io, contextlib; from ewtune.cli import main; out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out): main(['accountant', 'epsilon', '--sampling-rate', '0.01', "
        "'--noise-multiplier', '1', '--steps', '1000', '--delta', '1e-5', '--json'])\n"
        "print(sorted(json.loads(out.getvalue())['seconds']), 'dp_accounting' in sys.modules, 'scipy.signal' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    keys = "'epsilon_certified', 'epsilon_edgeworth', 'epsilon_edgeworth_bound', 'epsilon_edgeworth_order2', 'epsilon_edgeworth_order3'"
    assert result.stdout.strip() == f"[{keys}] False False"


def test_epsilon_text_labels_estimates_and_the_vacuous_bound(capsys):
    code, out, _ = _run(capsys, ["accountant", "epsilon", *SST2, "--noise-multiplier", "0.7865"])
    assert code == 0
    assert "the guarantee" in out
    assert out.count("not a guarantee") == 3
    assert "vacuous" in out


def test_epsilon_under_replace_one_reports_rdp_as_not_available(capsys):
    argv = ["accountant", "epsilon", *SST2, "--noise-multiplier", "0.7865", "--neighbouring", "replace_one", "--rdp", "--json"]
    code, out, _ = _run(capsys, argv)
    assert code == 0
    document = json.loads(out)
    assert document["neighbouring"] == "replace_one"
    assert document["epsilon_rdp"] is None and "replace-one" in document["notes"]["epsilon_rdp"]
    assert document["epsilon_certified"] > 8.29  # substitution costs more than add/remove


@pytest.mark.parametrize(
    "argv",
    [
        ["epsilon", "--sampling-rate", "abc", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "0", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "0", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "inf", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "ten", "--delta", "1e-5"],
        ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"],
        ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "0"],
        ["sigma", "--epsilon", "0", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "10"],
        ["sigma", "--epsilon", "x", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "10"],
        ["sigma", "--epsilon", "1", "--delta", "2", "--sampling-rate", "0.1", "--steps", "10"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv):
    code, out, err = _run(capsys, ["accountant", *argv])
    assert code == 2
    assert out == ""
    assert err.startswith("ewtune: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("command", [
    ["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "100"],
    ["sigma", "--epsilon", "1", "--sampling-rate", "0.01", "--steps", "100"],
], ids=["epsilon", "sigma"])  # fmt: skip
@pytest.mark.parametrize("delta", ["0.5", "0.1"])
def test_a_delta_that_guarantees_nothing_is_refused_with_the_reason(capsys, command, delta):
    """At delta 0.5 the certified epsilon is 0 (a mechanism publishing each record with probability 0.5 is
    (0, 0.5)-DP): printing it with exit 0 reads as perfect privacy. It is refused, one line, exit 2."""
    code, out, err = _run(capsys, ["accountant", *command, "--delta", delta])
    assert (code, out) == (2, "")
    assert err == f"ewtune: error: delta {delta} is not below 0.1: (epsilon, delta)-DP then allows publishing each record outright with probability delta, so its epsilon guarantees nothing; use a delta below 1/N (N records), e.g. 1e-5\n"
    code, out, _ = _run(capsys, ["accountant", *command, "--delta", "0.09", "--json"])
    assert code == 0 and json.loads(out)["delta"] == 0.09


def test_accountant_cli_imports_no_heavy_module():
    probe = (
        "import sys, ewtune.accountant_cli; "
        "heavy = {'torch', 'flwr', 'transformers', 'scipy', 'dp_accounting'} & {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture
def calibration():
    import ewtune.accountant.calibration

    return ewtune.accountant.calibration


def test_sigma_certified_meets_the_target(capsys, calibration):
    argv = ["accountant", "sigma", "--epsilon", "8", *SST2, "--json"]
    code, out, _ = _run(capsys, argv)
    assert code == 0
    document = json.loads(out)
    assert document["epsilon_certified"] <= 8.0
    assert document["certified_meets_target"] is True
    assert document["noise_multiplier"] == pytest.approx(0.7982, abs=2e-3)  # tight PLD needs 0.7982 for epsilon 8


def test_sigma_edgeworth_policy_reproduces_ew_tune_and_says_the_certified_epsilon_is_above(capsys, calibration):
    code, out, _ = _run(capsys, ["accountant", "sigma", "--epsilon", "8", *SST2, "--policy", "edgeworth"])
    assert code == 0
    assert "ABOVE the target" in out and "NOT" in out
    code, out, _ = _run(capsys, ["accountant", "sigma", "--epsilon", "8", *SST2, "--policy", "edgeworth", "--json"])
    document = json.loads(out)
    assert document["noise_multiplier"] == pytest.approx(0.7865, abs=1e-3)  # EW-Tune's logged sigma
    assert document["epsilon_certified"] > 8.0 and document["certified_meets_target"] is False


def test_bench_bisection_finds_the_smallest_sigma_to_the_stated_width():
    from ewtune.bench.accountant import BISECTION_RELATIVE_WIDTH, bisection

    sigma, evaluations = bisection(lambda s: 10.0 / s, 5.0)
    assert 2.0 <= sigma <= 2.0 * (1 + BISECTION_RELATIVE_WIDTH)
    assert 5 < evaluations < 20


def test_bench_reference_cache_is_keyed_on_everything_the_reference_depends_on(tmp_path):
    from ewtune.bench.accountant import cached_references, reference_key

    key = reference_key(((0.01, 1.0, 100),), 1e-5)
    assert key != reference_key(((0.01, 1.0, 101),), 1e-5)
    assert key != reference_key(((0.01, 1.0, 100),), 1e-6)
    report = tmp_path / "accountant.json"
    report.write_text(json.dumps({"cases": [{"reference_key": key, "reference": {"epsilon": 1.5}}]}))
    assert cached_references(report) == {key: 1.5}
    assert cached_references(tmp_path / "missing.json") == {}
