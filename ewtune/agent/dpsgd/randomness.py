"""Where the randomness of a private release comes from: the operating system's secure source, or, for tests
and benchmarks only, a seeded generator whose name says that it is insecure.

Both the batches (who is sampled) and the noise must be unpredictable: whoever can predict the noise subtracts
it, and whoever knows who was sampled loses the amplification by subsampling that the accountant credits.

:class:`SecureRandom` draws every call's bytes from AES-256 in counter mode under a fresh 256-bit key and nonce
from ``os.urandom`` (a block-cipher keystream, the core of NIST SP 800-90A's CTR_DRBG, here without reseeding
since every call is freshly keyed). Normals come from the Box-Muller transform (Box & Muller 1958), with the
radius from 53-bit uniforms in float64, so the tails are exact to 8.6 standard deviations (mass beyond: 1e-17),
and the angle from 32-bit uniforms; they are rounded to float32. Noise wanted on a GPU is drawn there, by ChaCha20 under a fresh key from
``os.urandom`` (:mod:`ewtune.agent.dpsgd.chacha`), instead of on one CPU core and copied. This protects the noise from being predicted;
it is no defence against floating-point attacks on the rounded samples (Mironov 2012; Jin et al. 2022, "Are we
there yet? Timing and floating-point attacks on DP systems"), which no mainstream DP-SGD library addresses either.

:class:`InsecureSeededRandom` is reproducible from its seed, and therefore predictable: the agent daemon refuses
it, and a local run that uses it says so in its results.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ewtune.accountant.sampling import RATE_BITS
from ewtune.agent.dpsgd.box_muller import box_muller
from ewtune.agent.dpsgd.chacha import ChaChaRandom

_BITS_MASK = (1 << RATE_BITS) - 1


class RandomSource(Protocol):
    """What the sampler and the noise draw from."""

    name: str  # recorded with every run: "os-secure" or "insecure-seeded"
    secure: bool

    def uniform_bits(self, count: int) -> torch.Tensor:
        """``count`` independent uniform integers in [0, 2^53), int64."""

    def standard_normal(self, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``count`` independent N(0, 1) draws, float32, on ``device`` (the CPU when None)."""


def _keystream(count: int) -> bytearray:
    """``count`` bytes of AES-256-CTR keystream under a fresh key and nonce from os.urandom."""
    return aes_ctr_keystream(os.urandom(32), os.urandom(16), count)


def aes_ctr_keystream(key: bytes, nonce: bytes, count: int) -> bytearray:
    """``count`` bytes of AES-CTR keystream: zeros encrypted in place (one buffer, no copy; OpenSSL's CTR
    mode allows the output to be the input, and a test checks the bytes against a separate-buffer encryption)."""
    buffer = bytearray(count + 15)  # update_into wants room for a block less one beyond the input
    view = memoryview(buffer)
    written = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update_into(view[:count], buffer)
    if written != count:
        raise RuntimeError(f"AES-CTR wrote {written} bytes of keystream, {count} were asked for")
    del view
    del buffer[count:]
    return buffer


def _bits53(words: torch.Tensor) -> torch.Tensor:
    return (words >> 11) & _BITS_MASK


class SecureRandom:
    """Randomness from the operating system's secure source (see the module docstring)."""

    name = "os-secure"
    secure = True

    def __init__(self) -> None:
        self._device_sources: dict[torch.device, ChaChaRandom] = {}

    def uniform_bits(self, count: int) -> torch.Tensor:
        if count == 0:
            return torch.zeros(0, dtype=torch.int64)
        return _bits53(torch.frombuffer(_keystream(8 * count), dtype=torch.int64, count=count))

    def standard_normal(self, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Box-Muller (:func:`ewtune.agent.dpsgd.box_muller.box_muller`) on 12 keystream bytes per pair. On a device
        other than the CPU, :class:`ewtune.agent.dpsgd.chacha.ChaChaRandom` draws them there (the same transform)."""
        device = torch.device(device or "cpu")
        if device.type != "cpu":
            if device not in self._device_sources:
                self._device_sources[device] = ChaChaRandom(device)  # runs RFC 8439's known answer there
            return self._device_sources[device].standard_normal(count)
        if count == 0:
            return torch.zeros(0)
        pairs = (count + 1) // 2
        raw = _keystream(12 * pairs)
        bits = _bits53(torch.frombuffer(raw, dtype=torch.int64, count=pairs))
        return box_muller(bits, torch.frombuffer(raw, dtype=torch.int32, offset=8 * pairs), count)


class InsecureSeededRandom:
    """A seeded torch generator: reproducible, hence predictable. For tests and benchmarks only."""

    name = "insecure-seeded"
    secure = False

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def uniform_bits(self, count: int) -> torch.Tensor:
        return torch.randint(0, 1 << RATE_BITS, (count,), generator=self.generator, dtype=torch.int64)

    def standard_normal(self, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.randn(count, generator=self.generator, dtype=torch.float32).to(device or "cpu")
