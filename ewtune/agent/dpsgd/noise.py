"""Gaussian noise N(0, std^2) for every gradient tensor, drawn from a :class:`ewtune.agent.dpsgd.randomness.RandomSource`
(the operating system's secure source unless a test or benchmark passes its own seeded one), drawn on the device
each tensor lives on."""

from __future__ import annotations

import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.dpsgd.randomness import RandomSource, SecureRandom


def _noise_like(tensor: torch.Tensor, std: float, source: RandomSource) -> torch.Tensor:
    standard = source.standard_normal(tensor.numel(), device=tensor.device).reshape(tensor.shape)
    return standard.mul_(std).to(dtype=tensor.dtype)


def _check_std(std: float) -> None:
    if not std >= 0:
        raise InvalidInputError(f"the noise standard deviation must be non-negative, got {std}")


def gaussian_noise_like(
    grads: dict[str, torch.Tensor], std: float, source: RandomSource | None = None
) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) noise shaped, typed and placed like each tensor of ``grads``."""
    _check_std(std)
    source = source or SecureRandom()
    return {name: _noise_like(g, std, source) for name, g in grads.items()}


def add_gaussian_noise_(grads: dict[str, torch.Tensor], std: float, source: RandomSource | None = None) -> None:
    """Add independent N(0, std^2) noise in place, one tensor at a time (to bound memory): g + std z in one
    pass over g, rounded once to g's dtype."""
    _check_std(std)
    source = source or SecureRandom()
    for g in grads.values():
        if isinstance(source, SecureRandom):
            source.add_standard_normal_(g, std)  # on the CPU without storing the normals (SecureRandom's docstring)
        else:
            g.add_(source.standard_normal(g.numel(), device=g.device).view(g.shape), alpha=std)
