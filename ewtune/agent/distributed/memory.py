"""What a worker holds in memory, for the run's output (train-local's JSON, ``train.workers`` of each phase): the
process's peak resident set size (``getrusage``: the whole process's life so far, the model's loading included), on a
CUDA device the peak of ``torch.cuda.max_memory_allocated``, and the bytes of the trainable parameters and of the
optimizer state this worker holds itself (with ``--sharding fsdp`` its shards, else the whole model's)."""

from __future__ import annotations

import resource
import sys

import torch
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tensor_bytes(tensors) -> int:
    """The bytes this process holds of ``tensors`` (of a DTensor, its own shard)."""
    return sum(_local(tensor).numel() * _local(tensor).element_size() for tensor in tensors)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker_memory(rank: int, engine) -> dict:
    """Rank ``rank``'s figures for a run of ``engine`` (:class:`ewtune.agent.dpsgd.step.DPSGDStep` or a subclass)."""
    state = [value for per_param in engine.optimizer.state.values() for value in per_param.values()
             if isinstance(value, torch.Tensor)]  # fmt: skip
    device = next(iter(engine.clipper.params.values())).device if engine.clipper.params else torch.device("cpu")
    return {
        "rank": rank,
        "peak_rss_bytes": peak_rss_bytes(),
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "parameter_bytes": tensor_bytes(engine.clipper.params.values()),
        "optimizer_state_bytes": tensor_bytes(state),
    }
