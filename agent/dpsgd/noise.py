"""Gaussian noise N(0, std^2) for every gradient tensor, from a seeded or a cryptographically secure source.

Seeded (``secure=False``): ``torch.randn`` with the given generator (or torch's global one). Reproducible
and fast, but the stream of a Mersenne Twister or Philox generator is predictable from its seed, which is
not acceptable in production (notes on DP-SGD, pitfall 11).

Secure (``secure=True``): every call draws a fresh 256-bit key from ``os.urandom`` and expands it with
AES-256 in counter mode (``cryptography``; a block-cipher keystream, the core of NIST SP 800-90A's
CTR_DRBG, here without its reseeding since every call is freshly keyed) into 64-bit words; each pair of words gives two standard normals by the Box-Muller transform (Box & Muller
1958) in float64, with 53-bit uniforms in (0, 1), so the tails are exact up to 8.6 standard deviations
(mass beyond: 1e-17). The draws are rounded to the parameter's dtype at the end. This protects the noise
from being predicted; it is no defence against floating-point attacks on the rounded samples
(Mironov 2012; Jin et al. 2022, "Are we there yet? Timing and floating-point attacks on DP systems"), which
no mainstream DP-SGD library addresses either.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_UNIFORM_SCALE = 2.0**-53


def _secure_uniforms(count: int) -> torch.Tensor:
    """``count`` float64 uniforms in (0, 1) from AES-256-CTR keyed by os.urandom."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)
    return (torch.from_numpy((words >> np.uint64(11)).astype(np.float64)) + 0.5) * _UNIFORM_SCALE


def secure_standard_normal(count: int) -> torch.Tensor:
    """``count`` float64 standard normals from a CSPRNG (Box-Muller on AES-CTR uniforms)."""
    pairs = (count + 1) // 2
    uniforms = _secure_uniforms(2 * pairs)
    radius = torch.sqrt(-2.0 * torch.log(uniforms[:pairs]))
    angle = (2.0 * math.pi) * uniforms[pairs:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]


def _noise_like(tensor: torch.Tensor, std: float, generator: torch.Generator | None, secure: bool) -> torch.Tensor:
    if secure:
        standard = secure_standard_normal(tensor.numel()).reshape(tensor.shape)
        return (standard * std).to(device=tensor.device, dtype=tensor.dtype)
    device = generator.device if generator is not None else tensor.device
    standard = torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float32)
    return standard.mul_(std).to(device=tensor.device, dtype=tensor.dtype)


def _check_std(std: float) -> None:
    if not std >= 0:
        raise ValueError(f"the noise standard deviation must be non-negative, got {std}")


def gaussian_noise_like(
    grads: dict[str, torch.Tensor],
    std: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) noise shaped, typed and placed like each tensor of ``grads``."""
    _check_std(std)
    return {name: _noise_like(g, std, generator, secure) for name, g in grads.items()}


def add_gaussian_noise_(
    grads: dict[str, torch.Tensor],
    std: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> None:
    """Add the noise of ``gaussian_noise_like`` in place, one tensor at a time (to bound memory)."""
    _check_std(std)
    for g in grads.values():
        g.add_(_noise_like(g, std, generator, secure))
