"""Standard normals from uniform bits, the transform both secure sources share (Box & Muller 1958).

Per pair of normals: a 53-bit uniform integer b gives u = (b + 1/2) / 2^53 in (0, 1], never 0 (u = 1 only where
b + 1/2 rounds up to 2^53 in float64, giving the radius 0), and the radius sqrt(-2 ln u) in float64, so the
tails are exact to 8.6 standard deviations (mass beyond: 1e-17) and no radius is inf or nan; a 32-bit word w,
read as a signed integer, gives the angle 2 pi w / 2^32 in [-pi, pi) in float32 (w rounded to 24 significant
bits, which moves the angle by at most 2^-24 of a half turn); the pair is (r cos, r sin), the radius rounded to
float32 before the product. The normals are thus N(0, 1) pairs up to float32 rounding: a few units in the last
place of float32 (the radius's rounding, the float32 cosine's and sine's, and the product's).

:func:`box_muller_into` writes one chunk of pairs into caller buffers, so a source that draws in cache-sized
chunks allocates nothing per chunk; :func:`box_muller` is the same arithmetic on whole tensors, allocating.
"""

from __future__ import annotations

import math

import torch

_UNIFORM_SCALE = 2.0**-53
_ANGLE_SCALE = 2.0 * math.pi / 2.0**32


def box_muller_into(
    bits53: torch.Tensor,
    angle_words: torch.Tensor,
    cos_out: torch.Tensor,
    sin_out: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Normals from ``pairs`` 53-bit integers (int64) and as many 32-bit words (int32): r cos into ``cos_out``
    (``pairs`` float32), r sin into ``sin_out`` (``pairs`` or ``pairs - 1``: a draw of an odd count drops the
    last sine). ``scratch`` is a float64, a float32 and a float32 tensor of at least ``pairs`` elements on the
    inputs' device; nothing else is allocated."""
    pairs, sines = bits53.numel(), sin_out.numel()
    wide, radius, angle = (buffer[:pairs] for buffer in scratch)
    wide.copy_(bits53).add_(0.5).mul_(_UNIFORM_SCALE).log_().mul_(-2.0).sqrt_()
    radius.copy_(wide)
    angle.copy_(angle_words).mul_(_ANGLE_SCALE)
    torch.mul(radius, torch.cos(angle[:pairs], out=cos_out), out=cos_out)
    torch.mul(radius[:sines], angle[:sines].sin_(), out=sin_out)


def box_muller(bits53: torch.Tensor, angle_words: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` N(0, 1) draws (float32, on the inputs' device) from ``pairs`` 53-bit integers (int64) and as many
    32-bit words (int32), ``count`` being ``2 pairs`` or ``2 pairs - 1``: r cos of every pair, then r sin of every
    pair, cut at ``count``."""
    pairs, device = bits53.numel(), bits53.device
    normals = torch.empty(count, device=device)
    scratch = (torch.empty(pairs, dtype=torch.float64, device=device), torch.empty(pairs, device=device),
               torch.empty(pairs, device=device))
    box_muller_into(bits53, angle_words, normals[:pairs], normals[pairs:], scratch)
    return normals
