"""Gaussian noise N(0, std^2) for every gradient tensor, from a seeded or a cryptographically secure source.

Seeded (``secure=False``): ``torch.randn`` with the given generator (or torch's global one). Reproducible
and fast, but the stream of a Mersenne Twister or Philox generator is predictable from its seed, which is
not acceptable in production (notes on DP-SGD, pitfall 11).

Secure (``secure=True``): every call draws a fresh 256-bit key from ``os.urandom`` and expands it with
AES-256 in counter mode (``cryptography``; a block-cipher keystream, the core of NIST SP 800-90A's
CTR_DRBG, here without its reseeding since every call is freshly keyed); the Box-Muller transform (Box &
Muller 1958) turns it into normals, with the radius from 53-bit uniforms in float64, so the tails are
exact up to 8.6 standard deviations (mass beyond: 1e-17), and the angle from 32-bit uniforms. The draws
are rounded to float32, then to the parameter's dtype. This protects the noise from being predicted;
it is no defence against floating-point attacks on the rounded samples
(Mironov 2012; Jin et al. 2022, "Are we there yet? Timing and floating-point attacks on DP systems"), which
no mainstream DP-SGD library addresses either.
"""

from __future__ import annotations

import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_UNIFORM_SCALE = 2.0**-53
_ANGLE_SCALE = 2.0 * math.pi / 2.0**32


def _secure_bytes(count: int) -> bytearray:
    """``count`` bytes of AES-256-CTR keystream under a fresh key from os.urandom."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    return bytearray(encryptor.update(bytes(count)))


def secure_standard_normal(count: int) -> torch.Tensor:
    """``count`` float32 standard normals from a CSPRNG, by Box-Muller.

    Per pair: a 53-bit uniform u in (0, 1) gives the radius sqrt(-2 ln u) in float64 (exact tails to 8.6
    standard deviations), a 32-bit uniform gives the angle; cos and sin of the angle give two normals.
    """
    if count == 0:
        return torch.zeros(0)
    pairs = (count + 1) // 2
    raw = _secure_bytes(12 * pairs)
    words = torch.frombuffer(raw, dtype=torch.int64, count=pairs)
    uniforms = ((words >> 11) & ((1 << 53) - 1)).double().add_(0.5).mul_(_UNIFORM_SCALE)
    radius = uniforms.log_().mul_(-2.0).sqrt_().float()
    angle = torch.frombuffer(raw, dtype=torch.int32, offset=8 * pairs).float().mul_(_ANGLE_SCALE)
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
