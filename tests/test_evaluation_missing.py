"""Why a holder's evaluation is missing reaches the coordinator's status: the ServerApp (fake holders of
tests/test_server_app.py, one refusing every evaluation as a holder's default policy does) records the reason per
holder and round in status.json's "evaluation_missing", and `ewtune coordinator status`'s table and the run's
progress lines show it in place of a bare "-"."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, MessageType
from support.fake_grid import Node, _directory, _federation, fake_task_identity

from ewtune.coordinator.cli import status_table
from ewtune.coordinator.run_progress import RunProgress, missing_evaluations
from ewtune.federation.messages import REFUSED

REFUSED_INSIDE_TRAIN = "refused: evaluation metrics are not released"  # the text the fake holder's train reply carries
REFUSED_AFTER_LAST_ROUND = "failed (code 0): evaluation metrics are not released"  # its evaluate reply's error (code 0: none of a holder's)
DAILY_LIMIT = "this holder has released 10 private evaluation(s) in the last 24 hours and allows 10 per day"  # ewtune.agent.daemon's


class DailyLimited(Node):
    """A holder whose daemon refuses the evaluation after the last round with its daily-limit reason and the
    holder's REFUSED code, as ewtune.agent.client_app sends a PlanRefused."""

    def reply(self, message):
        if message.metadata.message_type == MessageType.EVALUATE:
            return Message(Error(code=REFUSED, reason=DAILY_LIMIT), reply_to=message)
        return super().reply(message)


@pytest.fixture(scope="module")
def status(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_task_identity(monkeypatch)
        directory = tmp_path_factory.mktemp("evaluation_missing")
        _directory(directory, expected=3)
        nodes = [Node(1, "open", step=1.0), Node(2, "mute", "no evaluation", step=1.0), DailyLimited(3, "limited", step=1.0)]
        federation = _federation(directory, nodes)
        federation.run()
        return federation.status


def test_the_reason_of_each_missing_evaluation_is_kept_per_round(status):
    assert status["state"] == "finished" and status["rounds_completed"] == 2
    mute, open_ = status["holders"]["mute"], status["holders"]["open"]
    # rounds 0 and 1 were asked inside the next train message, round 2 (the final model) by an evaluate message
    assert mute["evaluation_missing"] == {"0": REFUSED_INSIDE_TRAIN, "1": REFUSED_INSIDE_TRAIN, "2": REFUSED_AFTER_LAST_ROUND}
    assert mute["evaluation"] == {} and mute["active"] and mute["rounds_committed"] == 2
    assert open_["evaluation_missing"] == {} and open_["accuracy"] == {"0": 0.5, "1": 0.5, "2": 0.5}
    limited = status["holders"]["limited"]
    assert limited["evaluation_missing"] == {"2": f"refused: {DAILY_LIMIT}"} and set(limited["accuracy"]) == {"0", "1"}


def test_the_status_table_shows_the_reason_instead_of_a_dash(status):
    rows = {line.split(" | ")[0].lstrip("| "): line for line in status_table(status).splitlines() if line.startswith("| mute") or line.startswith("| open")}
    assert rows["mute"].endswith(
        f"| no evaluation of rounds 0, 1: {REFUSED_INSIDE_TRAIN}; no evaluation of round 2: {REFUSED_AFTER_LAST_ROUND} |"
    )
    assert rows["open"].endswith("| 0:0.500 1:0.500 2:0.500 |")


def test_the_run_progress_reports_each_missing_evaluation_once(status):
    class Recorder:
        def __init__(self):
            self.events = []

        def event(self, kind, text, **fields):
            self.events.append((kind, text, fields))

    recorder = Recorder()
    progress = RunProgress(recorder)
    progress(status)
    progress(status)  # a second poll of the same status reports nothing again
    missing = [(fields["holder"], fields["round"], fields["reason"]) for kind, _, fields in recorder.events if kind == "evaluation_missing"]
    assert missing == [("limited", 2, f"refused: {DAILY_LIMIT}"),
                       ("mute", 0, REFUSED_INSIDE_TRAIN), ("mute", 1, REFUSED_INSIDE_TRAIN), ("mute", 2, REFUSED_AFTER_LAST_ROUND)]


def test_missing_evaluations_groups_rounds_by_reason():
    holder = {"evaluation_missing": {"10": "daily evaluation limit reached", "2": "refused: policy", "9": "daily evaluation limit reached"}}
    assert missing_evaluations(holder) == "no evaluation of round 2: refused: policy; no evaluation of rounds 9, 10: daily evaluation limit reached"
    assert missing_evaluations({}) == ""
