"""Property-based fuzzing of every parser of hostile bytes: ledger lines, whole ledgers (open and verify), head
files and head texts, signed receipts, packed weights, the daemon's wire messages, ``agent.toml`` and
``federation.toml``, and safetensors checkpoints. Each input is either read or refused with the project's
one-line error (:class:`ewtune.accountant.errors.EwtuneError`); nothing else escapes (no traceback, no
RecursionError, no crash in a library). A ledger that opens after damage still holds every anchored entry.

The example budget is fixed and reproducible (``tests/fuzzing.py``)."""

from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from fuzzing import fuzz_settings, json_values, mutated
from hypothesis import assume, example, given
from hypothesis import strategies as st
from support.ledgers import build_ledger

from ewtune.accountant.errors import EwtuneError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_head import Head, default_head_path, parse_head
from ewtune.accountant.ledger_lines import parse_line, split_lines
from ewtune.accountant.receipts import Receipt, sign_receipt, update_digest, verify_receipt
from ewtune.accountant.signing import SigningKey, canonical_json
from ewtune.accountant.verify import verify_ledger
from ewtune.agent.policy import load_agent_config
from ewtune.agent.rpc import MAGIC, decode, encode
from ewtune.coordinator.checkpoints import load_weights, save_weights
from ewtune.coordinator.config import load_federation_config
from ewtune.federation.packing import pack, unpack

REPO = Path(__file__).resolve().parents[1]
DEEP = b"[" * 3000  # json.loads raises RecursionError, not ValueError, on deep nesting


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A holder's ledger (genesis, reserve, commit, reserve, abort, reserve), its head file and key."""
    path = tmp_path_factory.mktemp("fuzz-ledger") / "ledger.jsonl"
    key = build_ledger(path)
    return path.read_bytes(), default_head_path(path).read_bytes(), key


def refused_cleanly(call, *args):
    """Run ``call``: it returns, or raises EwtuneError; anything else fails the test."""
    try:
        return call(*args)
    except EwtuneError:
        return None


# -- the ledger ----------------------------------------------------------------------------------------------


@fuzz_settings()
@given(st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()))
@example(DEEP)
@example(b'{"seq": 1e400}')
def test_a_ledger_line_parses_or_is_refused(line):
    refused_cleanly(parse_line, line)


@fuzz_settings()
@given(st.data())
def test_a_damaged_ledger_is_refused_or_opens_with_every_anchored_entry(pristine, data):
    ledger_bytes, head_bytes, key = pristine
    damaged = data.draw(mutated(ledger_bytes))
    original = split_lines(ledger_bytes).lines
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ledger.jsonl"
        path.write_bytes(damaged)
        default_head_path(path).write_bytes(head_bytes)
        report = refused_cleanly(verify_ledger, path, key.public_key_text)
        if report is not None and report.ok:  # what verifies is every anchored entry, unaltered
            verified = split_lines(damaged).lines[: report.entries_verified]
            assert [canonical_json(parse_line(line)) for line in verified] == list(original)
        ledger = refused_cleanly(Ledger.open, path, key)
        if ledger is not None:
            with ledger:
                kept = [canonical_json(entry) for entry in ledger.entries[: len(original)]]
            assert kept == list(original)  # the head anchors the last entry: nothing anchored was lost


@fuzz_settings()
@given(st.data())
def test_a_damaged_head_file_is_refused_or_read(pristine, data):
    _, head_bytes, key = pristine
    refused_cleanly(parse_head, data.draw(mutated(head_bytes) | st.binary(max_size=200)), key.public_key_text, "head")
    refused_cleanly(parse_head, DEEP, key.public_key_text, "head")


@fuzz_settings()
@given(st.text(max_size=80) | st.builds(lambda seq, digest: f"{seq}:{digest}", st.text(max_size=4), st.text("0123456789abcdef", min_size=64, max_size=64)))
@example("\u00b2:" + "a" * 64)  # str.isdigit() holds for a superscript two; int() refuses it
def test_a_head_text_parses_or_is_refused(text):
    refused_cleanly(Head.parse, text)


# -- receipts -------------------------------------------------------------------------------------------------

RECEIPT_KEY = SigningKey.generate()
RECEIPT = sign_receipt(RECEIPT_KEY, Receipt("run", 2, "holder", PoissonGaussianEvent(0.01, 1.0, 5), "ab" * 32))


@fuzz_settings()
@given(json_values | st.binary(max_size=200) | mutated(json.dumps(RECEIPT).encode()).map(lambda b: b.decode("utf-8", "replace")))
@example(DEEP.decode())
def test_a_receipt_document_verifies_or_is_refused(document):
    refused_cleanly(verify_receipt, document, RECEIPT_KEY.public_key_text)


@fuzz_settings()
@given(st.dictionaries(st.sampled_from(("kind", "schema", "run_id", "round", "holder_id", "event", "update_sha256", "x")), json_values))
def test_a_hostile_body_signed_by_the_right_key_is_refused_or_read(changes):
    """The signature holds, so only the body's own checks stand between it and the coordinator."""
    body = {**RECEIPT["receipt"], **changes}
    signable = refused_cleanly(canonical_json, body)
    assume(signable is not None)  # a holder cannot sign what canonical JSON refuses (NaN, infinities)
    document = {"receipt": body, "signature": RECEIPT_KEY.sign(signable)}
    receipt = refused_cleanly(verify_receipt, document, RECEIPT_KEY.public_key_text)
    if receipt is not None:  # every field the coordinator reads is the one signed (unknown fields are ignored)
        assert all(body[name] == value for name, value in receipt.to_json().items())


# -- weights on the wire ----------------------------------------------------------------------------------------

LAYOUT_ENTRY = st.lists(st.text(max_size=6) | json_values, min_size=0, max_size=4) | st.tuples(
    st.text(max_size=6), st.sampled_from(("<f4", ">f8", "<f2", "|O", "<i8", "V3", "S0", "<U2", "bogus")),
    st.lists(st.integers(-3, 10**12), max_size=3),
).map(list)


@fuzz_settings()
@given(st.binary(max_size=256), st.lists(LAYOUT_ENTRY, max_size=4).map(json.dumps) | st.text(max_size=40))
@example(b"", DEEP.decode())
def test_packed_weights_unpack_or_are_refused(buffer, layout):
    arrays = refused_cleanly(unpack, np.frombuffer(buffer, np.uint8), layout)
    if arrays is not None:  # what unpacks is the same bytes again
        repacked, _ = pack(arrays)
        assert repacked.tobytes() == buffer


WIRE = encode({"config": {"run_id": "r", "round": 1}}, {"w": np.ones((2, 3), np.float32)})


@fuzz_settings()
@given(mutated(WIRE) | st.binary(max_size=120).map(lambda tail: MAGIC + tail))
@example(MAGIC + len(DEEP).to_bytes(4, "big") + DEEP)
def test_a_daemon_wire_message_decodes_or_is_refused(message):
    refused_cleanly(decode, message)


# -- configuration files and checkpoints -------------------------------------------------------------------------

toml_values = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _configuration_cases(example_path: Path):
    """A valid document with one value replaced, removed or added (as TOML), or the file's bytes damaged."""
    text = example_path.read_bytes()
    document = tomllib.loads(text.decode())

    @st.composite
    def edited(draw):
        table = draw(st.sampled_from(sorted(document)))
        changed = {name: dict(values) if isinstance(values, dict) else values for name, values in document.items()}
        section = changed[table]
        action = draw(st.sampled_from(("replace", "remove", "add")))
        if action != "add" and isinstance(section, dict) and section:
            key = draw(st.sampled_from(sorted(section)))
            if action == "remove":
                del section[key]
            else:
                section[key] = draw(toml_values)
        elif isinstance(section, dict):
            section[draw(st.text(max_size=10))] = draw(toml_values)
        return tomli_w.dumps(changed).encode()

    return edited() | mutated(text)


def _load_from(loader, content: bytes):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_bytes(content)
        return refused_cleanly(loader, path)


@fuzz_settings()
@given(_configuration_cases(REPO / "deploy" / "agent.toml.example"))
@example(b"[holder]\nid = \"\xff\"\n")  # not UTF-8
def test_agent_toml_loads_or_is_refused(content):
    _load_from(load_agent_config, content)


@fuzz_settings()
@given(_configuration_cases(REPO / "ewtune" / "coordinator" / "federation.toml.example"))
@example(b"\xfe[federation]\n")
def test_federation_toml_loads_or_is_refused(content):
    _load_from(load_federation_config, content)


@fuzz_settings()
@given(st.data())
def test_a_damaged_checkpoint_loads_or_is_refused(tmp_path, data):
    path = tmp_path / "weights.safetensors"
    save_weights(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16)})
    original = path.read_bytes()
    path.write_bytes(data.draw(mutated(original)))
    weights = refused_cleanly(load_weights, path)
    if weights is not None:
        assert update_digest(weights) is not None and all(isinstance(a, np.ndarray) for a in weights.values())
