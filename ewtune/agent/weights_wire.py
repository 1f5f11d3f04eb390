"""The trainable weights as they travel between the coordinator and a holder's daemon: numpy arrays, each in its
parameter's own dtype (bfloat16, which numpy lacks, as float32), and the checks that turn arrays received into
the trainer's state (:class:`ewtune.agent.daemon.Daemon`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ewtune.accountant.errors import InvalidInputError

Layout = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # each trainable parameter's shape and wire dtype


def trainable_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """Each trainable parameter's shape and the dtype it travels in."""
    return {name: (tuple(t.shape), wire_dtype(t.dtype)) for name, t in state.items()}


def state_from_arrays(arrays: Mapping[str, np.ndarray], parameters: Layout) -> dict[str, torch.Tensor]:
    """The global weights as tensors, refused unless they are exactly the trainable parameters: the same
    names and shapes, each parameter's own dtype (a float64 1e300 would become inf in a float32
    parameter), finite values."""
    names = set(arrays)
    if names != set(parameters):
        missing, unknown = sorted(set(parameters) - names), sorted(names - set(parameters))
        raise InvalidInputError(
            f"the weights do not match this holder's trainable parameters (missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unknown {unknown[:3]}{'...' if len(unknown) > 3 else ''})"
        )
    state = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        shape, dtype = parameters[name]
        if tuple(array.shape) != shape:
            raise InvalidInputError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shape}")
        if array.dtype != dtype:
            raise InvalidInputError(f"weight {name!r} has dtype {array.dtype}, expected {dtype}")
        if not np.isfinite(array).all():
            raise InvalidInputError(f"weight {name!r} must hold finite values")
        state[name] = torch.from_numpy(np.array(array, copy=True))
    return state


def wire_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a parameter travels in (bfloat16, which numpy lacks, as float32, see :func:`to_numpy`)."""
    return np.dtype(np.float32) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A copy of ``tensor`` on the CPU as it travels (bfloat16 as float32)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().copy()
