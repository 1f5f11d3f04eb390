"""Loading a Hugging Face model and its tokenizer from a local directory (never the hub), wrapping it for LoRA
(Hu et al. 2021, through ``peft``), full fine-tuning or head-only training (linear probing, a strong DP
baseline: Tramer & Boneh 2021; De et al. 2022), and exchanging only its trainable parameters.

A classifier on a sentence-transformers checkpoint sits on the pooled sentence embedding the checkpoint was
trained for (:mod:`ewtune.agent.heads`); other checkpoints use transformers' own sequence-classification head."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.heads import PooledClassifier, copy_pooling_files, read_pooling
from ewtune.agent.top_layers import LAYER_PATTERN, encoder_layers, top_layer_indices
from ewtune.federation.contract import TASKS

MODES = ("lora", "full", "head")

# Where transformers' *ForSequenceClassification models keep their classification head: BERT, RoBERTa, ELECTRA,
# DistilBERT ("classifier"); GPT-2, Llama, Mistral, Qwen2, Gemma ("score").
CLASSIFIER_HEAD_NAMES = ("classifier", "score")

# LoRA on every attention projection, the setting of Yu et al. (ICLR 2022) for DP fine-tuning; model types not
# listed fall back to peft's own defaults.
DEFAULT_LORA_TARGETS = {
    "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
    "xlm-roberta": ("query", "key", "value"),
    "electra": ("query", "key", "value"),
    "mpnet": ("q", "k", "v"),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "smollm3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def load_tokenizer(model_dir):
    """The tokenizer in ``model_dir``; a pad token is set to EOS when the tokenizer has none (GPT-2)."""
    model_dir = _checked_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot load a tokenizer from {model_dir}: {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidInputError(f"the tokenizer in {model_dir} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir,
    task: str = "classification",
    num_labels: int = 2,
    mode: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_target_modules=None,
    pad_token_id: int | None = None,
    tune_layers: int = 0,
):
    """The model in ``model_dir`` for ``task``, with LoRA adapters (``mode="lora"``; the classifier head stays
    trainable), every parameter trainable (``mode="full"``) or only the classification head (``mode="head"``,
    classification only). ``tune_layers = k > 0`` (lora and full, a pooled classifier): only the top k encoder
    layers (their LoRA adapters, or their weights) and the head are trainable (:mod:`ewtune.agent.top_layers`).
    Eager attention: per-example gradient hooks see plain linear layers and softmax."""
    if task not in TASKS:
        raise InvalidInputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "head" and task != "classification":
        raise InvalidInputError(f"mode 'head' trains a classification head: it needs task classification, not {task!r}")
    model_dir = _checked_model_dir(model_dir)
    model = _load_base_model(model_dir, task, num_labels)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if mode == "head":
        return _with_only_head_trainable(model)
    layers = top_layer_indices(model, tune_layers) if tune_layers else None
    if mode == "full":
        model.requires_grad_(layers is None)
        if layers is not None:
            for index in layers:
                encoder_layers(model)[index].requires_grad_(True)
            model.classifier.requires_grad_(True)
        return model
    return with_lora(model, task, lora_rank, lora_alpha, lora_target_modules, layers)


def _load_base_model(model_dir: Path, task: str, num_labels: int):
    if task == "classification" and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2):
        raise InvalidInputError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    pooling = read_pooling(model_dir) if task == "classification" else None
    if pooling is not None:
        return _pooled_classifier(model_dir, pooling, num_labels)
    auto_class, extra = (
        (transformers.AutoModelForSequenceClassification, {"num_labels": num_labels})
        if task == "classification"
        else (transformers.AutoModelForCausalLM, {})
    )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a freshly initialised classifier head is expected here
    transformers.logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="eager", dtype=torch.float32, **extra
        )
    except (OSError, ValueError, KeyError) as error:
        raise InvalidInputError(f"cannot load a {task} model from {model_dir}: {_first_line(error)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _pooled_classifier(model_dir: Path, pooling, num_labels: int):
    """The encoder of ``model_dir`` with a linear head on its pooled embedding (the saved head, if any)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a checkpoint saved with a pooler or a head loads without them
    transformers.logging.disable_progress_bar()
    try:
        encoder = transformers.AutoModel.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="eager", dtype=torch.float32, add_pooling_layer=False
        )
    except TypeError:  # encoders without a pooler take no add_pooling_layer
        encoder = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise InvalidInputError(f"cannot load an encoder from {model_dir}: {_first_line(error)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model = PooledClassifier(encoder, pooling, num_labels)
    model.source_dir = Path(model_dir)
    model.load_head(model_dir)
    return model


def _with_only_head_trainable(model):
    """Freeze ``model`` except its classification head (the first of ``CLASSIFIER_HEAD_NAMES`` it has)."""
    head = next((getattr(model, name) for name in CLASSIFIER_HEAD_NAMES if hasattr(model, name)), None)
    if not isinstance(head, torch.nn.Module):
        raise InvalidInputError(
            f"no classification head ({' or '.join(CLASSIFIER_HEAD_NAMES)}) in {type(model).__name__}: "
            "use --mode lora or full"
        )
    model.requires_grad_(False)
    head.requires_grad_(True)
    return model


def with_lora(model, task: str, rank: int, alpha: float, target_modules, layers: list[int] | None = None):
    """``model`` under peft LoRA adapters of ``rank`` and ``alpha`` on ``target_modules`` (the architecture's defaults
    when None), restricted to ``layers`` when given (Hu et al. 2021, LoRA)."""
    # deferred: peft costs ~4 s to import on top of torch and transformers (measured) and only LoRA runs use it
    from peft import LoraConfig, TaskType, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    targets = list(target_modules) if target_modules else default_lora_targets(model.config.model_type)
    if isinstance(model, PooledClassifier):  # a plain module: peft's generic model, the head trained in full
        task_settings = {"modules_to_save": ["classifier"]}
    else:
        task_settings = {"task_type": TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM}
    if layers is not None:  # only these encoder layers get adapters
        task_settings.update(layers_to_transform=layers, layers_pattern=LAYER_PATTERN)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, **task_settings)
    try:
        with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:
        raise InvalidInputError(f"cannot add LoRA adapters to {targets}: {_first_line(error)}") from None


def default_lora_targets(model_type: str) -> list[str]:
    """The attention projections LoRA adapts for ``model_type``, or peft's defaults for other types."""
    if model_type in DEFAULT_LORA_TARGETS:
        return list(DEFAULT_LORA_TARGETS[model_type])
    # deferred: peft costs ~4 s to import on top of torch and transformers (measured) and only LoRA runs use it
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise InvalidInputError(f"no default LoRA target modules for model type {model_type!r}: name them explicitly")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, keyed by their names in ``model`` (stable for a given config)."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model, state) -> None:
    """Copy ``state`` into the trainable parameters; the names and shapes must match exactly."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise InvalidInputError(
            f"trainable state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(state[name])
            if tuple(value.shape) != tuple(param.shape):
                raise InvalidInputError(f"{name}: shape {tuple(value.shape)} != model's {tuple(param.shape)}")
            param.copy_(value)


def save_model(model, tokenizer, output_dir) -> Path:
    """Save the LoRA adapter (loadable with :func:`load_adapter`, or ``peft.PeftModel.from_pretrained`` on the
    base model) or, in full and head mode, the whole model (loadable with :func:`load_model`), in safetensors,
    with the tokenizer beside it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PooledClassifier):
        model.save(output_dir, model.source_dir)
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if isinstance(base, PooledClassifier):  # the adapter says nothing of the pooling: keep its files beside it
            copy_pooling_files(base.source_dir, output_dir, base.pooling)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def load_adapter(base_model_dir, adapter_dir, num_labels: int = 2, task: str = "classification"):
    """A classifier (or, for ``task="causal_lm"``, a causal LM) with the LoRA adapter (and head) saved by
    :func:`save_model` in ``adapter_dir``."""
    # deferred: peft costs ~4 s to import on top of torch and transformers (measured) and only LoRA runs use it
    from peft import PeftModel

    model = _load_base_model(_checked_model_dir(base_model_dir), task, num_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, Path(adapter_dir))


def model_id(model_dir) -> str:
    """``<directory name>-<first 12 hex of SHA-256 of config.json>``: names the base model a holder serves."""
    config = _checked_model_dir(model_dir) / "config.json"
    canonical = json.dumps(json.loads(config.read_text()), sort_keys=True).encode()
    return f"{config.parent.name}-{hashlib.sha256(canonical).hexdigest()[:12]}"


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _checked_model_dir(model_dir) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidInputError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
