"""Shared fixtures: tiny random Hugging Face models (with the real MiniLM WordPiece tokenizer) and a small MR
CSV, all built once per test session in seconds and offline."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ("pytester",)  # tests/test_suite_rules.py runs inner pytest sessions


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped because something failed to import is a failure: a missing install step must not pass
    as a skipped test in CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VOCAB_SIZE = 30522  # the MiniLM (bert-base-uncased) WordPiece vocabulary


def _copy_minilm_tokenizer(target) -> None:
    from ewtune.agent.assets import minilm_model_dir

    source = minilm_model_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


def _save_tiny(model, directory):
    model.save_pretrained(directory, safe_serialization=True)
    _copy_minilm_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A randomly initialised 1-layer BERT (hidden 32) for 2-way sequence classification, with the MiniLM
    tokenizer, saved in Hugging Face format."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    return _save_tiny(BertForSequenceClassification(config), tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A randomly initialised 1-layer GPT-2 (hidden 32) causal LM over the MiniLM vocabulary (pad id 0)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    return _save_tiny(GPT2LMHeadModel(config), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def mr_csv(tmp_path_factory):
    """400 MR sentences (columns text,label), shuffled with seed 0."""
    from ewtune.agent.assets import write_mr_csv

    return write_mr_csv(tmp_path_factory.mktemp("mr") / "mr.csv", max_rows=400, seed=0)


@pytest.fixture(scope="session")
def minilm_1layer_dir(tmp_path_factory):
    """The real all-MiniLM-L6-v2 weights cut to the first encoder layer (embeddings and pooler kept), with
    its tokenizer: a pretrained model small enough for a private training run in CI."""
    from transformers import AutoModel

    from ewtune.agent.assets import minilm_model_dir

    directory = tmp_path_factory.mktemp("minilm_1layer")
    AutoModel.from_pretrained(minilm_model_dir(), num_hidden_layers=1).save_pretrained(directory)
    _copy_minilm_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_pooled_dir(tmp_path_factory):
    """A randomly initialised 1-layer BERT encoder saved as a sentence-transformers checkpoint: modules.json
    with mean pooling and normalisation, as all-MiniLM-L6-v2 ships them."""
    return _tiny_pooled(tmp_path_factory.mktemp("tiny_pooled"), layers=1)


@pytest.fixture(scope="session")
def tiny_pooled_3layer_dir(tmp_path_factory):
    """As ``tiny_pooled_dir`` with 3 encoder layers: the top ones can be tuned on the states of the others."""
    return _tiny_pooled(tmp_path_factory.mktemp("tiny_pooled_3layer"), layers=3)


def _tiny_pooled(directory, layers: int):
    import json

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    directory = _save_tiny(BertModel(config), directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return directory
