"""`ewtune agent keys init`: a holder generates its own SuperNode and ledger keys and a public card; the
private keys are owner-only, never overwritten, and the card is what the coordinator registers."""

import json
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.signing import SigningKey, verify_signature
from ewtune.agent.keys import init_holder_keys
from ewtune.cli import main


def test_keys_are_in_flower_s_format_and_the_card_matches_them(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    keys = init_holder_keys(tmp_path / "keys", "hospital-a")
    private = load_ssh_private_key(keys.supernode_private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_ssh_public_key(keys.supernode_public_key.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(keys.supernode_public_key)  # what `flwr supernode register` runs
    card = json.loads(keys.card.read_text())
    assert card == {"holder_id": "hospital-a", "supernode_public_key": keys.supernode_public_key_line, "ledger_public_key": keys.ledger_public_key}
    ledger = SigningKey.load(keys.ledger_key)
    assert verify_signature(card["ledger_public_key"], b"x", ledger.sign(b"x"))
    for path in (keys.supernode_private_key, keys.ledger_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert "PRIVATE" not in keys.card.read_text()


def test_existing_keys_are_never_overwritten(tmp_path):
    keys = init_holder_keys(tmp_path, "h")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(InvalidInputError, match="refusing to overwrite"):
        init_holder_keys(tmp_path, "h")
    keys.card.unlink()  # even with the card gone, the private keys stay
    with pytest.raises(InvalidInputError, match="supernode.key"):
        init_holder_keys(tmp_path, "h")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {k: v for k, v in before.items() if k != "holder.json"}


def test_cli_writes_the_card_and_refuses_bad_ids_with_one_line(tmp_path, capsys):
    assert main(["agent", "keys", "init", str(tmp_path / "k"), "--holder-id", "bank-b"]) == 0
    assert json.loads((tmp_path / "k" / "holder.json").read_text())["holder_id"] == "bank-b"
    assert "holder.json" in capsys.readouterr().out
    assert main(["agent", "keys", "init", str(tmp_path / "k2"), "--holder-id", "../evil"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "invalid holder id" in errors[0]
    assert not (tmp_path / "k2").exists()


def test_agent_keys_imports_neither_torch_nor_flwr_nor_the_cli():
    code = "import sys, ewtune.agent.keys, ewtune.agent.keys_cli; print(sorted(m for m in ('torch', 'flwr', 'ewtune.cli') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
