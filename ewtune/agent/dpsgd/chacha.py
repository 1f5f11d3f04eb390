"""Secure randomness computed where the tensors live: the ChaCha20 block function (RFC 8439, section 2.3) as
32-bit add-rotate-xor on torch tensors, so that on a GPU the noise of a DP-SGD step is drawn on the GPU at its
speed instead of on one CPU core and copied.

*The generator.* Every draw takes a fresh 256-bit key and 96-bit nonce from ``os.urandom`` and runs ChaCha20
from block counter 0: block ``i`` is the 16-word block function of (constants, key, counter ``i``, nonce), all
blocks of a draw computed at once as the columns of one [16, blocks] tensor. ChaCha20 is a PRF under its key
(Bernstein 2008; RFC 8439 is the IETF's specification), so a draw is computationally indistinguishable from
uniform bits to whoever does not know the key, which never leaves this process. One key and nonce cover at most
2^32 blocks (256 GiB) per RFC 8439; a larger draw is split into draws with fresh keys.

*Arithmetic.* Words are held in int32 tensors. XOR and the masks are exact on any bit pattern; addition mod 2^32
is the two's-complement wrap-around that torch's CPU kernels and CUDA's integer units both perform; a left
rotation by n is ``(x << n) | ((x >> (32 - n)) & (2^n - 1))``, the mask undoing the sign extension of torch's
arithmetic right shift. Because the wrap-around is a property of the hardware and kernels rather than a language
guarantee, :class:`ChaChaRandom` runs RFC 8439's known-answer block (section 2.3.2) on its device when it is
built and refuses to exist if the answer differs: it never falls back silently to another generator.

*Normals.* :func:`ewtune.agent.dpsgd.box_muller.box_muller` on the device, as :class:`ewtune.agent.dpsgd.randomness.SecureRandom`:
per pair of normals, a 53-bit uniform from two words for the radius and a third word for the angle. Poisson
inclusion bits use 53-bit uniforms from two words, as ``SecureRandom.uniform_bits``.
"""

from __future__ import annotations

import os

import torch

from ewtune.accountant.sampling import RATE_BITS
from ewtune.agent.dpsgd.box_muller import box_muller

_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k", little-endian words
_MAX_BLOCKS = 1 << 32  # the 32-bit block counter of RFC 8439
_WORDS_PER_BLOCK = 16
_LOW21 = (1 << 21) - 1

# RFC 8439, section 2.3.2: key 00..1f, nonce 00 00 00 09 00 00 00 4a 00 00 00 00, block counter 1.
KNOWN_ANSWER_KEY = bytes(range(32))
KNOWN_ANSWER_NONCE = bytes.fromhex("000000090000004a00000000")
KNOWN_ANSWER_COUNTER = 1
KNOWN_ANSWER_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


class GeneratorSelfTestError(RuntimeError):
    """The ChaCha20 known-answer test failed on a device: its integer arithmetic is not what the generator needs."""


def _signed(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _words(data: bytes) -> list[int]:
    return [_signed(int.from_bytes(data[i : i + 4], "little")) for i in range(0, len(data), 4)]


def _rotl_(x: torch.Tensor, n: int, spare: torch.Tensor) -> None:
    """x <- x rotated left by n bits, in place (``spare`` is scratch of x's shape)."""
    torch.bitwise_right_shift(x, 32 - n, out=spare)
    spare.bitwise_and_((1 << n) - 1)
    x.bitwise_left_shift_(n).bitwise_or_(spare)


def _quarter_round_(s: torch.Tensor, a: int, b: int, c: int, d: int, spare: torch.Tensor) -> None:
    """RFC 8439, section 2.1, on rows of the state [16, blocks], in place (fresh buffers for every operation
    would cost more than the arithmetic on a CPU)."""
    s[a].add_(s[b]), s[d].bitwise_xor_(s[a]), _rotl_(s[d], 16, spare)
    s[c].add_(s[d]), s[b].bitwise_xor_(s[c]), _rotl_(s[b], 12, spare)
    s[a].add_(s[b]), s[d].bitwise_xor_(s[a]), _rotl_(s[d], 8, spare)
    s[c].add_(s[d]), s[b].bitwise_xor_(s[c]), _rotl_(s[b], 7, spare)


_DOUBLE_ROUND = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),  # columns
                 (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))  # diagonals


def chacha20_blocks(key: bytes, nonce: bytes, first_counter: int, blocks: int, device="cpu") -> torch.Tensor:
    """The keystream blocks ``first_counter .. first_counter + blocks - 1`` as int32 words [blocks, 16], word ``j``
    of a block being bytes 4j..4j+3 of its serialisation, little-endian (RFC 8439, section 2.3)."""
    if len(key) != 32 or len(nonce) != 12:
        raise ValueError("ChaCha20 takes a 32-byte key and a 12-byte nonce")
    if first_counter < 0 or first_counter + blocks > _MAX_BLOCKS:
        raise ValueError(f"ChaCha20's 32-bit block counter cannot cover blocks {first_counter}..+{blocks}")
    fixed = [_signed(c) for c in _CONSTANTS] + _words(key) + [0] + _words(nonce)
    initial = torch.tensor(fixed, dtype=torch.int32, device=device).unsqueeze(1).repeat(1, blocks)
    counters = torch.arange(first_counter, first_counter + blocks, dtype=torch.int64, device=device)
    initial[12] = torch.where(counters >= 1 << 31, counters - (1 << 32), counters).to(torch.int32)
    state, spare = initial.clone(), torch.empty(blocks, dtype=torch.int32, device=device)
    for _ in range(10):  # 20 rounds: a column round and a diagonal round each time (RFC 8439, section 2.3)
        for a, b, c, d in _DOUBLE_ROUND:
            _quarter_round_(state, a, b, c, d, spare)
    return state.add_(initial).t()


def block_bytes(words: torch.Tensor) -> bytes:
    """The serialisation of keystream words [blocks, 16] (little-endian words, blocks in order)."""
    return words.cpu().numpy().astype("<i4").tobytes()


def _self_test(device: torch.device) -> None:
    words = chacha20_blocks(KNOWN_ANSWER_KEY, KNOWN_ANSWER_NONCE, KNOWN_ANSWER_COUNTER, 1, device)
    if block_bytes(words) != KNOWN_ANSWER_BLOCK:
        raise GeneratorSelfTestError(f"ChaCha20 failed RFC 8439's known-answer block on {device}; refusing to draw")


def _chunk_blocks(device: torch.device) -> int:
    """Blocks computed at once: on a CPU few enough that the state stays in cache (64 KiB a row); on a GPU many,
    since each of the 1,920 tensor operations of a chunk costs a kernel launch (16 MiB a row)."""
    return 1 << 14 if device.type == "cpu" else 1 << 22


def _fresh_words(count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniform int32 words from ChaCha20 under fresh keys and nonces from os.urandom, computed
    :func:`_chunk_blocks` blocks at a time to bound the working memory."""
    out = torch.empty(count, dtype=torch.int32, device=device)
    blocks = -(-count // _WORDS_PER_BLOCK)
    for key_start in range(0, blocks, _MAX_BLOCKS):
        key, nonce = os.urandom(32), os.urandom(12)
        chunk = _chunk_blocks(device)
        for first in range(0, min(blocks - key_start, _MAX_BLOCKS), chunk):
            size = min(chunk, blocks - key_start - first)
            words = chacha20_blocks(key, nonce, first, size, device).reshape(-1)
            offset = (key_start + first) * _WORDS_PER_BLOCK
            take = min(words.numel(), count - offset)
            out[offset : offset + take] = words[:take]
    return out


def _uniform53(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """53-bit integers in [0, 2^53) from two words: 32 bits of ``high`` above 21 bits of ``low``, int64."""
    return ((high.to(torch.int64) & 0xFFFFFFFF) << 21) | (low.to(torch.int64) & _LOW21)


class ChaChaRandom:
    """A :class:`ewtune.agent.dpsgd.randomness.RandomSource` on ``device`` (module docstring): secure, keyed per draw."""

    name = "os-secure-chacha20"
    secure = True

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        _self_test(self.device)

    def uniform_bits(self, count: int) -> torch.Tensor:
        """``count`` independent uniform integers in [0, 2^RATE_BITS), int64, on the device."""
        if count == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        words = _fresh_words(2 * count, self.device).reshape(2, count)
        return _uniform53(words[0], words[1]) & ((1 << RATE_BITS) - 1)

    def standard_normal(self, count: int) -> torch.Tensor:
        """``count`` independent N(0, 1) draws, float32, on the device (Box-Muller, module docstring)."""
        if count == 0:
            return torch.zeros(0, device=self.device)
        pairs = (count + 1) // 2
        words = _fresh_words(3 * pairs, self.device).reshape(3, pairs)
        return box_muller(_uniform53(words[0], words[1]), words[2], count)
