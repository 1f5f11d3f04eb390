"""Standard normals from uniform bits, the transform both secure sources share (Box & Muller 1958).

Per pair of normals: a 53-bit uniform integer b gives u = (b + 1/2) / 2^53 in (0, 1) and the radius sqrt(-2 ln u)
in float64, so the tails are exact to 8.6 standard deviations (mass beyond: 1e-17); a 32-bit word w gives the
angle 2 pi w / 2^32; the pair (r cos, r sin) is rounded to float32.
"""

from __future__ import annotations

import math

import torch

_UNIFORM_SCALE = 2.0**-53
_ANGLE_SCALE = 2.0 * math.pi / 2.0**32


def box_muller(bits53: torch.Tensor, angle_words: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` N(0, 1) draws (float32, on the inputs' device) from ``pairs`` 53-bit integers (int64) and as many
    32-bit words (int32), ``count <= 2 pairs``."""
    pairs = bits53.numel()
    radius = bits53.double().add_(0.5).mul_(_UNIFORM_SCALE).log_().mul_(-2.0).sqrt_().float()
    angle = angle_words.float().mul_(_ANGLE_SCALE)
    normals = torch.empty(2 * pairs, device=bits53.device)
    torch.mul(radius, torch.cos(angle), out=normals[:pairs])
    torch.mul(radius, angle.sin_(), out=normals[pairs:])
    return normals[:count]
