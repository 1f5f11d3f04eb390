"""Progress output (ewtune/federation/progress.py): plain lines when stderr is no terminal, one live line on a terminal,
nothing with --quiet, one JSON object per line with --json; the coordinator's round progress read from status.json
(ewtune/coordinator/run_progress.py); and `ewtune agent train-local`, whose result on stdout stays one JSON document
with --json while its progress goes to stderr."""

import argparse
import io
import json

import pytest

from ewtune.coordinator.run_progress import RunProgress
from ewtune.cli import main
from ewtune.federation.progress import Progress


class Clock:
    """A clock the test moves by hand (the live line's redraw interval is read from it)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _flags(quiet=False, json=False):
    return argparse.Namespace(quiet=quiet, json=json)


def test_off_a_terminal_events_are_plain_lines_and_updates_are_left_out():
    stream = io.StringIO()
    progress = Progress.from_args(_flags(), stream)
    assert progress.mode == "lines"
    progress.update("step", "DP-SGD probe: step 1/3")
    progress.event("phase", "probe: 3 steps", phase="probe")
    progress.update("step", "DP-SGD probe: step 2/3")
    progress.event("phase_end", "probe: 3 of 3 steps")
    progress.close()
    assert stream.getvalue() == "probe: 3 steps\nprobe: 3 of 3 steps\n"


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["pipe", "terminal"])
def test_quiet_prints_nothing_even_with_json(stream):
    progress = Progress.from_args(_flags(quiet=True, json=True), stream)
    progress.event("phase", "probe: 3 steps")
    progress.update("step", "step 1/3", step=1)
    progress.printer("demo")("a demo line")
    progress.close()
    assert stream.getvalue() == ""


def test_json_writes_one_parseable_object_per_event_and_update():
    stream, clock = Terminal(), Clock()  # --json wins over the terminal's live line
    progress = Progress(stream, "json", clock=clock)
    progress.event("phase", "probe: 2 steps", phase="probe", steps=2)
    clock.now += 1.5
    progress.update("step", "step 1/2", step=1, loss=float("nan"), examples_per_second=None)
    progress.update("step", "step 2/2", step=2, loss=0.5, holders={"a": 1.25})
    progress.printer("demo")("verifying the ledgers")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]  # strict JSON: no NaN
    assert records == [
        {"event": "phase", "elapsed_seconds": 0.0, "message": "probe: 2 steps", "phase": "probe", "steps": 2},
        {"event": "step", "elapsed_seconds": 1.5, "message": "step 1/2", "step": 1, "loss": None, "examples_per_second": None},
        {"event": "step", "elapsed_seconds": 1.5, "message": "step 2/2", "step": 2, "loss": 0.5, "holders": {"a": 1.25}},
        {"event": "demo", "elapsed_seconds": 1.5, "message": "verifying the ledgers"},
    ]


def test_a_terminal_gets_one_live_line_redrawn_at_most_ten_times_a_second():
    stream, clock = Terminal(), Clock()
    progress = Progress(stream, clock=clock)  # no mode given: the stream is a terminal
    assert progress.mode == "live"
    progress.update("step", "step 1/3, loss 0.700")
    clock.now += 0.05
    progress.update("step", "step 2/3, loss 0.650")  # too soon: not drawn
    clock.now += 0.2
    progress.update("step", "step 3/3")  # shorter: the rest of the previous line is blanked
    progress.event("phase_end", "probe: 3 of 3 steps")
    progress.close()
    live = "step 1/3, loss 0.700"
    assert stream.getvalue() == (
        "\r" + live + "\r" + "step 3/3".ljust(len(live)) + "\r" + " " * len(live) + "\r" + "probe: 3 of 3 steps\n"
    )


def _status(rounds, state="running", accuracy=None):
    holders = {
        holder: {
            "dataset_size": 100, "sampling_rate": 0.16, "noise_multiplier": 1.1, "planned_epsilon_certified": 7.9,
            "epsilon_certified": 0.5 * len(rounds), "accuracy": {}, "evaluation": {},
        }
        for holder in ("bank-b", "hospital-a")
    }  # fmt: skip
    holders["hospital-a"]["accuracy"] = accuracy or {}
    return {"state": state, "reason": None, "rounds_planned": 3, "holders": holders, "skipped": {"clinic-c": "no reply"}, "rounds": rounds}


def _round(number, aborted=()):
    outcomes = {h: {"status": "committed", "steps": 10} for h in ("bank-b", "hospital-a") if h not in aborted}
    outcomes.update({h: {"status": "aborted", "reason": "the receipt does not verify"} for h in aborted})
    return {"round": number, "seconds": 2.25, "holders": outcomes}


def test_round_progress_reports_commits_aborts_seconds_and_the_certified_spend_once_each():
    stream = io.StringIO()
    follow = RunProgress(Progress(stream, "json"))
    follow({"state": "querying", "reason": None, "rounds_planned": 3, "holders": {}, "rounds": []})
    first = _status([_round(1, aborted=("bank-b",))], accuracy={"1": 0.71})
    follow(first)
    follow(first)  # the same status again: nothing new
    # two rounds ended between two polls: the spend is known only as of the latest
    follow(_status([_round(1, aborted=("bank-b",)), _round(2), _round(3)], state="finished", accuracy={"1": 0.71}))
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == [
        "state", "plan", "plan", "skipped", "round", "accuracy", "state", "round", "round", "state",
    ]  # fmt: skip
    rounds = [r for r in records if r["event"] == "round"]
    assert rounds[0]["committed"] == ["hospital-a"]
    assert rounds[0]["aborted"] == {"bank-b": "the receipt does not verify"}
    assert rounds[0]["seconds"] == 2.25 and rounds[0]["rounds_planned"] == 3
    assert rounds[0]["epsilon_certified"] == {"bank-b": 0.5, "hospital-a": 0.5}
    assert "1 aborted (bank-b: the receipt does not verify)" in rounds[0]["message"]
    assert [r["epsilon_certified"] for r in rounds[1:]] == [None, {"bank-b": 1.5, "hospital-a": 1.5}]
    (accuracy,) = [r for r in records if r["event"] == "accuracy"]
    assert (accuracy["holder"], accuracy["round"], accuracy["accuracy"]) == ("hospital-a", 1, 0.71)
    assert [r["state"] for r in records if r["event"] == "state"] == ["querying", "running", "finished"]


def _train_local(model_dir, data_file, *extra):
    return main([
        "agent", "train-local", "--model", str(model_dir), "--data", str(data_file), "--epsilon", "8", "--delta", "1e-5",
        "--mode", "head", "--probe-epochs", "1", "--probe-batch", "16", "--max-examples", "80", "--max-length", "24",
        "--physical-batch-size", "16", "--insecure-seeded-randomness", *extra,
    ])  # fmt: skip


def test_train_local_json_keeps_stdout_one_document_and_logs_each_step_on_stderr(tiny_bert_dir, mr_csv, capsys):
    assert _train_local(tiny_bert_dir, mr_csv, "--json") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    (phase,) = summary["phases"]
    events = [json.loads(line) for line in captured.err.splitlines()]
    kinds = [event["event"] for event in events]
    steps = [event for event in events if event["event"] == "step"]
    assert kinds[:2] == ["phase", "embedding"] and kinds[-1] == "phase_end"
    assert [event["step"] for event in steps] == list(range(1, phase["planned_steps"] + 1))
    assert all(event["phase"] == "probe" and isinstance(event["loss"], float) for event in steps if event["batch"])
    assert steps[0]["examples_per_second"] is None  # the first step carries the one-off embedding pass
    end = events[-1]
    assert end["steps"] == phase["event"]["event"]["steps"] and end["examples"] == phase["train"]["examples"]
    assert end["loss"] == pytest.approx(phase["train"]["loss"])


def test_train_local_off_a_terminal_prints_phase_lines_and_with_quiet_nothing(tiny_bert_dir, mr_csv, capsys):
    assert _train_local(tiny_bert_dir, mr_csv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err  # no live line in a log
    lines = captured.err.splitlines()
    assert lines[0].startswith("probe: q = ") and lines[-1].startswith("probe: ") and " steps in " in lines[-1]
    assert "epsilon (certified)" in captured.out
    assert _train_local(tiny_bert_dir, mr_csv, "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "epsilon (certified)" in captured.out


def test_demo_json_keeps_stdout_one_document_with_its_phases_and_rounds_on_stderr(tmp_path, monkeypatch, capsys):
    """The demo's own wiring, with the federation replaced by one that reports a phase and a round (a real one
    takes minutes: `scripts/demo --json`)."""
    from ewtune import demo

    result = {"state": "finished", "ledger_verified": True, "rounds_completed": 1}

    def federation(work, args, reporter):
        reporter.printer("demo")("loading MiniLM and the data in each daemon")
        RunProgress(reporter)(_status([_round(1)], state="finished"))
        return dict(result)

    monkeypatch.setattr(demo, "run_federation", federation)
    assert main(["demo", "--json", "--rounds", "3", "--work-dir", str(tmp_path / "work")]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert {key: printed[key] for key in result} == result and printed["wall_seconds"] >= 0
    events = [json.loads(line) for line in captured.err.splitlines()]
    assert [event["event"] for event in events] == ["demo", "demo", "plan", "plan", "skipped", "round", "state"]
    assert events[0]["message"].startswith("ewtune demo: 3 holders, 3 rounds")
    assert main(["demo", "--json", "--quiet", "--work-dir", str(tmp_path / "quiet")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["state"] == "finished"
