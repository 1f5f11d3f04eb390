"""The ``sharding`` setting of a holder's training (train-local ``--sharding``, agent.toml's ``[training] sharding``),
checked without torch, so that a combination that cannot work is refused in one line before anything loads:
``none``, the replicated workers of :mod:`ewtune.agent.distributed.group`, or ``fsdp``, parameters, gradients and
optimizer state sharded across the workers (:mod:`ewtune.agent.distributed.sharded`)."""

from __future__ import annotations

from ewtune.accountant.errors import InvalidInputError

SHARDINGS = ("none", "fsdp")


def check_sharding(sharding: str, processes: int, mode: str, tune_layers: int | None = 0) -> None:
    """Refuse, in one line, a sharding that is unknown or cannot work with these settings: fsdp needs N >= 2
    workers (one process has nothing to shard across) and full fine-tuning of the whole model (a LoRA adapter's, a
    head's or the top layers' parameters, gradients and optimizer state are small; the replicated workers train
    them); ``tune_layers`` None: not chosen yet (the recipe chooses it)."""
    if sharding not in SHARDINGS:
        raise InvalidInputError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if sharding == "none":
        return
    if processes < 2:
        raise InvalidInputError(f"sharding fsdp shards across N >= 2 worker processes, got {processes}: give --nproc 2 or more "
                                "(agent.toml: [training] processes), or sharding none")
    if mode != "full":
        raise InvalidInputError(f"sharding fsdp is for full fine-tuning (mode full), got mode {mode!r}: a LoRA adapter's or a "
                                "head's parameters, gradients and optimizer state are small; use sharding none")
    if tune_layers:
        raise InvalidInputError(f"sharding fsdp trains the whole model, got tune_layers {tune_layers}: give --tune-layers 0 "
                                "(agent.toml: [training] tune_layers = 0), or sharding none")
