"""docs/DESIGN.md's "A round as data flows" in the order the ServerApp's round runs (issue 21: docs that cannot
drift): the coordinator's steps named in the document appear in the same order as their calls in ``_round``."""

import inspect
import re
from pathlib import Path

from ewtune.coordinator.server_app import Federation

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md"

# The document's step title -> the call that performs it in Federation._round, in the order the document gives.
STEPS = {
    "Message": "self._send(",
    "Verify and keep": "self._receive(",
    "Commit": "self._commit(",
    "Aggregate, record, checkpoint": "self._aggregate(",
}


def design_steps() -> list[str]:
    text = DESIGN.read_text()
    section = text.split("## A round as data flows", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. \*\*(.+?)\*\*", section, flags=re.MULTILINE)


def test_the_documents_round_order_is_the_codes():
    titles = [title for title in design_steps() if title in STEPS]
    assert titles == list(STEPS), f"docs/DESIGN.md names the coordinator's steps as {titles}"
    source = inspect.getsource(Federation._round)
    positions = [source.index(call) for call in STEPS.values()]
    assert positions == sorted(positions), "Federation._round calls its steps in another order than docs/DESIGN.md"
    assert source.index("self.ledger.reserve(") < positions[0] and source.index("self._checkpoint(") > positions[-1]


def test_the_check_reads_the_numbered_steps():
    assert design_steps()[:2] == ["Plan", "Message"] and len(design_steps()) == 10
