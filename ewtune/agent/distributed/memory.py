"""What a worker holds in memory, for the run's output (train-local's JSON, ``train.workers`` of each phase):

- ``run_peak_rss_bytes``: the peak resident set size since the run's engine was built (Linux: ``VmHWM`` of
  /proc/self/status, reset by writing 5 to /proc/self/clear_refs when the run begins; None elsewhere);
- ``peak_rss_bytes``: the process's peak over its whole life (``getrusage``: the model's loading included);
- ``max_memory_allocated_bytes``: on a CUDA device, ``torch.cuda.max_memory_allocated`` since the run began;
- ``parameter_bytes`` and ``optimizer_state_bytes``: the trainable parameters and the optimizer state this worker
  holds itself (with ``--sharding fsdp`` its shards, else the whole model's)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def start_run_peak() -> bool:
    """Reset the peaks a run's figures are read from (CUDA's statistics; Linux's ``VmHWM``); whether the RSS peak
    could be reset."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or /proc not writable: the run's own RSS peak is unknown (reported as None)
        return False
    return True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tensor_bytes(tensors) -> int:
    """The bytes this process holds of ``tensors`` (of a DTensor, its own shard)."""
    return sum(_local(tensor).numel() * _local(tensor).element_size() for tensor in tensors)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_peak_rss_bytes() -> int:
    """``VmHWM`` of /proc/self/status, in bytes: the peak RSS since :func:`start_run_peak` reset it."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{STATUS} has no VmHWM line")


def worker_memory(rank: int, engine, run_peak_known: bool) -> dict:
    """Rank ``rank``'s figures for a run of ``engine`` (:class:`ewtune.agent.dpsgd.step.DPSGDStep` or a subclass);
    ``run_peak_known``: what :func:`start_run_peak` returned when the run began."""
    state = [value for per_param in engine.optimizer.state.values() for value in per_param.values()
             if isinstance(value, torch.Tensor)]  # fmt: skip
    device = next(iter(engine.clipper.params.values())).device if engine.clipper.params else torch.device("cpu")
    return {
        "rank": rank,
        "run_peak_rss_bytes": run_peak_rss_bytes() if run_peak_known else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "parameter_bytes": tensor_bytes(engine.clipper.params.values()),
        "optimizer_state_bytes": tensor_bytes(state),
    }
