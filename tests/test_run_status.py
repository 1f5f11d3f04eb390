"""status.json's schema (ewtune.coordinator.run_status): its one writer and tolerant reader, the fields absent
while they have no value, and the names the status page's script reads, which must be the schema's."""

from __future__ import annotations

import dataclasses
import json
import re

from ewtune.coordinator.run_progress import missing_evaluations
from ewtune.coordinator.run_status import (
    HolderOutcome,
    HolderStatus,
    PlanStatus,
    ResumeStatus,
    RoundRecord,
    RunStatus,
    read_status,
    status_path,
    write_status,
)
from ewtune.coordinator.status_view import SCRIPT


def _status():
    return RunStatus(
        run_id="t-7", flower_run_id=7, state="finished", rounds_planned=2, rounds_completed=1, ledger="ledger.jsonl",
        elapsed_seconds=3.5, plan=PlanStatus(2, 3, 10.0, 1.0, 0.1, 8.0, 1e-5, None, 2.5),
        holders={"a": HolderStatus(node_id="1", dataset_size=100, accuracy={"0": 0.5}, evaluation={"0": {"accuracy": 0.5}},
                                   evaluation_missing={"1": "refused: policy"}, budget_epsilon=8.0, epsilon_certified=1.2)},
        skipped={"node-9": "not in the holder registry"},
        rounds=[RoundRecord(1, 2.0, 1.5, holders={"a": HolderOutcome("committed", steps=3, update_norm=0.1, metrics={},
                                                                       weight_share=0.5, reply_seconds=1.4),
                                                  "b": HolderOutcome("aborted", reason="no reply within 60 s")})],
        checkpoints=["round-1.safetensors"], resumed=ResumeStatus(["t-6"], 0, []),
    )  # fmt: skip


def test_the_writer_and_the_reader_agree(tmp_path):
    status = _status()
    write_status(tmp_path, status)
    assert read_status(tmp_path) == status
    assert json.loads(status_path(tmp_path).read_text()) == status.to_json()
    assert not (tmp_path / "status.json.partial").exists()  # written beside, then replaced atomically


def test_a_field_without_a_value_is_absent_where_the_schema_says_so():
    document = _status().to_json()
    aborted, committed = document["rounds"][0]["holders"]["b"], document["rounds"][0]["holders"]["a"]
    assert aborted == {"status": "aborted", "reason": "no reply within 60 s"}  # no steps, share nor arrival
    assert committed["metrics"] == {} and "rebuilt_after_restart" not in document["rounds"][0]
    assert "epsilon_rdp" not in document["holders"]["a"] and document["holders"]["a"]["warning"] is None
    assert "audit" not in document and "adapter_error" not in document and document["adapter"] is None


def test_the_reader_takes_a_status_of_any_stage():
    early = RunStatus.from_json({"run_id": "t-7", "state": "querying", "holders": {}, "some_later_field": 1})
    assert early.state == "querying" and early.rounds == [] and early.plan is None and not early.final
    assert RunStatus.from_json(["not", "a", "status"]) == RunStatus()
    assert read_status("/nonexistent-directory") is None


def test_the_status_pages_script_reads_only_the_schemas_names():
    """The page's JavaScript cannot import the schema: every name it reads is checked against it instead."""
    kinds = {"status": RunStatus, "holder": HolderStatus, "record": RoundRecord, "o": HolderOutcome}
    read = set(re.findall(r"(?<![\"\w.])(status|holder|record|o)\.([a-z_]+)\b", SCRIPT))  # not in "status.json"
    assert len(read) > 15
    for name, field in sorted(read):
        assert field in {f.name for f in dataclasses.fields(kinds[name])}, f"{name}.{field} is not in the status schema"


def test_missing_evaluations_reads_a_typed_or_a_json_holder():
    holder = _status().holders["a"]
    assert missing_evaluations(holder) == missing_evaluations(_status().to_json()["holders"]["a"]) == (
        "no evaluation of round 1: refused: policy"
    )
