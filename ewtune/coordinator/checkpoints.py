"""Checkpoints of the global model: the trainable parameters after every round in safetensors (numpy only,
no torch), and at the end of a LoRA run a PEFT adapter directory that ``peft.PeftModel.from_pretrained``
loads on top of the base model (torch, transformers and peft are imported only for that)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from ewtune.accountant.errors import InvalidInputError

CHECKPOINTS = "checkpoints"  # output_dir/checkpoints/round-NNN.safetensors
_LORA_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as failure:  # noqa: BLE001 - safetensors raises several unrelated types
        raise InvalidInputError(f"cannot read weights {path}: {failure}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The text metadata of a safetensors file (its header only)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except Exception as failure:  # noqa: BLE001 - safetensors raises several unrelated types
        raise InvalidInputError(f"cannot read weights {path}: {failure}") from None


def save_weights(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``arrays`` atomically and durably (:func:`write_durably`)."""
    data = save({name: np.ascontiguousarray(array) for name, array in arrays.items()}, metadata=dict(metadata or {}))
    return write_durably(path, data)


def write_durably(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file, fsync it, rename it over ``path`` and fsync the directory: after a
    crash, ``path`` holds either the old or the new content, whole (the coordinator's crash recovery relies on
    a checkpoint or an inbox update that was written before a ledger entry being there after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def checkpoint_path(output_dir: str | Path, round: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"round-{round:03d}.safetensors"


def round_checkpoint(output_dir: str | Path, round: int, arrays: Mapping[str, np.ndarray], run_id: str) -> Path:
    return save_weights(checkpoint_path(output_dir, round), arrays, {"run_id": run_id, "round": str(round)})


def lora_layout(arrays: Mapping[str, np.ndarray]) -> tuple[list[str], int]:
    """(target module names, rank) read off the LoRA parameter names and shapes of a peft model."""
    targets, ranks = set(), set()
    for name, array in arrays.items():
        match = _LORA_A.match(name)
        if match:
            targets.add(match["module"].rsplit(".", 1)[-1])
            ranks.add(int(np.shape(array)[0]))
    if not targets:
        raise InvalidInputError("the weights hold no LoRA parameters (no '*.lora_A.*.weight')")
    if len(ranks) != 1:
        raise InvalidInputError(f"LoRA parameters of mixed ranks {sorted(ranks)}")
    return sorted(targets), ranks.pop()


def save_peft_adapter(
    arrays: Mapping[str, np.ndarray], base_model_dir: str | Path, output_dir: str | Path, task: str = "classification", lora_alpha: float = 16.0
) -> Path:
    """A PEFT LoRA adapter directory for ``arrays`` (the trainable parameters of the holders' peft model:
    LoRA factors and, for classification, the head), built on the base model in ``base_model_dir``."""
    # torch, transformers, peft: 5.7 s; the ServerApp and recovery import this module for the arrays only
    import torch
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    targets, rank = lora_layout(arrays)
    if task == "classification" and (Path(base_model_dir) / "modules.json").is_file():
        raise InvalidInputError(
            f"{base_model_dir} is a sentence-transformers checkpoint: the holders classify on its pooled embedding, "
            "which transformers' sequence-classification head does not reproduce"
        )
    if task == "classification":
        heads = [np.shape(a)[0] for n, a in arrays.items() if n.endswith(".weight") and ".modules_to_save." in n]
        auto, extra, task_type = transformers.AutoModelForSequenceClassification, {"num_labels": heads[0] if heads else 2}, TaskType.SEQ_CLS
    else:
        auto, extra, task_type = transformers.AutoModelForCausalLM, {}, TaskType.CAUSAL_LM
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a fresh head is expected: it is overwritten below
    try:
        base = auto.from_pretrained(str(base_model_dir), local_files_only=True, dtype=torch.float32, **extra)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = get_peft_model(base, LoraConfig(task_type=task_type, r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets))
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if set(trainable) != set(arrays):
        missing, unknown = sorted(set(trainable) - set(arrays)), sorted(set(arrays) - set(trainable))
        raise InvalidInputError(f"the weights do not fit {base_model_dir} with LoRA on {targets}: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(torch.from_numpy(np.array(arrays[name], copy=True)))
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    return output_dir
