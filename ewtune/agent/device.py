"""Where a holder's training and evaluation run, and in what precision: ``--device`` on train-local and the
benchmarks, ``device`` and ``precision`` in agent.toml.

- ``auto``: the first CUDA device when torch sees one, else the CPU;
- ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``: exactly that, or a one-line error when this machine
  has no such device (never a silent fall back to the CPU: a holder who asked for its GPU is told it is not used).

Precision: ``fp32`` (everything in float32) or ``bf16`` (the forward and backward passes under bfloat16
autocast on a CUDA device; per-example norms, clipping, sums and the noise stay in float32, see
:mod:`ewtune.agent.dpsgd.engine`). ``bf16`` on the CPU is refused: it is slower there, and the tested CPU path is fp32.

The names are checked without importing torch (:func:`check_device_name`, :func:`check_precision`), so that a
configuration check answers at once; only :func:`resolve_device` looks at the hardware.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ewtune.accountant.errors import InvalidInputError

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """``name`` if it names a device the way this module accepts, else a one-line error."""
    if not isinstance(name, str) or not _DEVICE_PATTERN.fullmatch(name):
        raise InvalidInputError(f"device must be {DEVICE_HELP}, got {name!r}")
    return name


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_device(name: str, precision: str = "fp32") -> "torch.device":  # noqa: F821
    """The torch device that ``name`` stands for on this machine (module docstring), checked against
    ``precision``."""
    import torch  # here, not at the top: the name checks above must not pay for torch's import

    check_device_name(name)
    check_precision(precision)
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        device = torch.device("cuda" if has_cuda else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        if not has_cuda:
            raise InvalidInputError(f"device {name!r} was asked for, but torch {torch.__version__} sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {name!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if precision == "bf16" and device.type != "cuda":
        raise InvalidInputError("precision bf16 needs a CUDA device (on the CPU use fp32)")
    return device


def batch_to(batch: Mapping[str, "torch.Tensor"], device: "torch.device") -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Every tensor of ``batch`` on ``device``: batches are built on the CPU (the Poisson sampler chooses indices
    there) and copied with ``non_blocking`` (asynchronous from pinned memory, an ordinary copy otherwise)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def autocast(device: "torch.device", precision: str):  # noqa: F821
    """The context a forward pass runs in: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    # deferred: device names and precisions are checked before torch loads (train-local's one-line errors)
    import torch

    check_precision(precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def module_device(module) -> "torch.device":  # noqa: F821
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    # deferred: device names and precisions are checked before torch loads (train-local's one-line errors)
    import torch

    first = next(module.parameters(), None)
    return torch.device("cpu") if first is None else first.device
