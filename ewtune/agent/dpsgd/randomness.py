"""Where the randomness of a private release comes from: the operating system's secure source, or, for tests
and benchmarks only, a seeded generator whose name says that it is insecure.

Both the batches (who is sampled) and the noise must be unpredictable: whoever can predict the noise subtracts
it, and whoever knows who was sampled loses the amplification by subsampling that the accountant credits.

:class:`SecureRandom` draws every call's bytes from AES-256 in counter mode under a fresh 256-bit key and nonce
from ``os.urandom`` (a block-cipher keystream, the core of NIST SP 800-90A's CTR_DRBG, here without reseeding
since every call is freshly keyed). Normals come from the Box-Muller transform (Box & Muller 1958), with the
radius from 53-bit uniforms in float64, so the tails are exact to 8.6 standard deviations (mass beyond: 1e-17),
and the angle from 32-bit uniforms; they are rounded to float32 (:mod:`ewtune.agent.dpsgd.box_muller` states
the precision). The keystream and the transform run chunk by chunk (:func:`aes_ctr_normals`): each chunk's
keystream is written into a buffer that stays in the core's cache and transformed there, straight into the
output tensor, so memory is crossed once instead of once per operation; with torch's intra-op threads above
one, that many threads each draw a contiguous range of pairs, seeking the keystream by its counter, and the
normals do not depend on the chunk size or the thread count. A DP step's noise is added to the gradient the same
way, chunk by chunk, and never stored (:func:`aes_ctr_add_normals_`). Noise wanted on a GPU is drawn there, by
ChaCha20 under a fresh key from ``os.urandom`` (:mod:`ewtune.agent.dpsgd.chacha`), instead of on one CPU core and
copied. This protects the noise from being predicted; it is no defence against floating-point attacks on the
rounded samples (Mironov 2012; Jin et al. 2022, "Are we there yet? Timing and floating-point attacks on DP
systems"), which no mainstream DP-SGD library addresses either.

:class:`InsecureSeededRandom` is reproducible from its seed, and therefore predictable: the agent daemon refuses
it, and a local run that uses it says so in its results.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ewtune.accountant.sampling import RATE_BITS
from ewtune.agent.dpsgd.box_muller import box_muller_into
from ewtune.agent.dpsgd.chacha import ChaChaRandom

_BITS_MASK = (1 << RATE_BITS) - 1
_AES_BLOCK = 16
_CHUNK_PAIRS = 1 << 14  # a chunk's keystream (192 KiB) and scratch (512 KiB) stay in a core's L2 cache


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


def _counter_after(nonce: bytes, blocks: int) -> bytes:
    """The CTR counter block ``blocks`` blocks after ``nonce``: a 128-bit big-endian integer modulo 2^128, as
    OpenSSL's CTR mode increments it (NIST SP 800-38A, appendix B.1, the whole block as the counter)."""
    return ((int.from_bytes(nonce, "big") + blocks) % (1 << 128)).to_bytes(_AES_BLOCK, "big")


class _KeystreamCursor:
    """The AES-256-CTR keystream under (key, nonce) from byte ``start`` on, read piece after piece into one
    reused buffer of ``capacity`` bytes (zeros encrypted into it: the input stays zero, the output is the stream)."""

    def __init__(self, key: bytes, nonce: bytes, start: int, capacity: int):
        blocks, skip = divmod(start, _AES_BLOCK)
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_counter_after(nonce, blocks))).encryptor()
        self._encryptor.update(bytes(skip))  # CTR is a stream: the first block's bytes before ``start``
        self._zeros = memoryview(bytes(capacity))
        self.buffer = bytearray(capacity + _AES_BLOCK - 1)  # update_into wants room for a block less one beyond

    def advance(self, count: int) -> None:
        """Put the next ``count`` keystream bytes at the start of ``buffer``."""
        written = self._encryptor.update_into(self._zeros[:count], self.buffer)
        if written != count:
            raise RuntimeError(f"AES-CTR wrote {written} bytes of keystream, {count} were asked for")


def _normals_range(
    key: bytes, nonce: bytes, out: torch.Tensor, std: float | None, first: int, last: int, chunk: int
) -> None:
    """Pairs ``first .. last - 1`` of :func:`aes_ctr_normals`, ``chunk`` pairs at a time: written into ``out``
    (``std`` None), or times ``std`` added to it, each chunk's normals staying in cache."""
    pairs, chunk = (out.numel() + 1) // 2, max(1, min(chunk, last - first))
    radii = _KeystreamCursor(key, nonce, 8 * first, 8 * chunk)
    angles = _KeystreamCursor(key, nonce, 8 * pairs + 4 * first, 4 * chunk)
    radius_words = torch.frombuffer(radii.buffer, dtype=torch.int64, count=chunk)
    angle_words = torch.frombuffer(angles.buffer, dtype=torch.int32, count=chunk)
    bits = torch.empty(chunk, dtype=torch.int64)
    scratch = (torch.empty(chunk, dtype=torch.float64), torch.empty(chunk), torch.empty(chunk))
    staged = None if std is None else torch.empty(2 * chunk)
    for start in range(first, last, chunk):
        size = min(chunk, last - start)
        radii.advance(8 * size)
        angles.advance(4 * size)
        torch.bitwise_right_shift(radius_words[:size], 11, out=bits[:size]).bitwise_and_(_BITS_MASK)
        # the sines' slice is one short at the end of an odd count
        cosines, sines = out[start : start + size], out[pairs + start : pairs + start + size]
        if staged is None:
            box_muller_into(bits[:size], angle_words[:size], cosines, sines, scratch)
            continue
        staged_cosines, staged_sines = staged[:size], staged[chunk : chunk + sines.numel()]
        box_muller_into(bits[:size], angle_words[:size], staged_cosines, staged_sines, scratch)
        cosines.add_(staged_cosines, alpha=std)
        sines.add_(staged_sines, alpha=std)


def _draw_ranges(
    key: bytes, nonce: bytes, out: torch.Tensor, std: float | None, chunk_pairs: int, workers: int
) -> None:
    """:func:`_normals_range` over all of ``out``'s pairs, split into ``workers`` contiguous ranges of chunks."""
    if chunk_pairs < 1 or workers < 1:
        raise ValueError(f"chunk_pairs and workers must be at least 1, got {chunk_pairs} and {workers}")
    pairs = (out.numel() + 1) // 2
    chunks = -(-pairs // chunk_pairs)
    workers = min(workers, chunks)
    with _one_intra_op_thread():
        if workers <= 1:
            _normals_range(key, nonce, out, std, 0, pairs, chunk_pairs)
            return
        bounds = [min(pairs, (chunks * w // workers) * chunk_pairs) for w in range(workers + 1)]
        with ThreadPoolExecutor(workers) as pool:
            ranges = [
                pool.submit(_normals_range, key, nonce, out, std, first, last, chunk_pairs)
                for first, last in zip(bounds, bounds[1:])
            ]
            for finished in ranges:
                finished.result()  # re-raises a worker's error


@contextlib.contextmanager
def _one_intra_op_thread():
    """Each chunk's operations on one thread while the draw runs (the parallelism is over chunks): torch splits a
    float64 log of 16,384 elements over its threads (MKL VML, grain 2,048), and on a machine whose other cores are
    busy every such split waits for a thread that is not running (measured: 6.5 ms a chunk instead of 15 us, with
    2 threads at load 3). New threads, the workers included, start with the setting in force when they start."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def aes_ctr_normals(
    key: bytes, nonce: bytes, count: int, chunk_pairs: int = _CHUNK_PAIRS, workers: int = 1
) -> torch.Tensor:
    """``count`` N(0, 1) draws (float32, CPU) from the AES-256-CTR keystream under (key, nonce), 12 bytes a pair
    for ``pairs = ceil(count / 2)`` pairs: pair i's radius from the 53 high bits of the little-endian int64 at byte
    8i, its angle from the int32 at byte 8 pairs + 4i (:func:`ewtune.agent.dpsgd.box_muller.box_muller`); normal i
    is pair i's r cos, normal pairs + i its r sin. Computed ``chunk_pairs`` pairs at a time by ``workers`` threads
    over contiguous ranges of pairs (torch's operations release the GIL); neither changes a bit of the result."""
    out = torch.empty(count)
    _draw_ranges(key, nonce, out, None, chunk_pairs, workers)
    return out


def aes_ctr_add_normals_(
    key: bytes, nonce: bytes, target: torch.Tensor, std: float, chunk_pairs: int = _CHUNK_PAIRS, workers: int = 1
) -> None:
    """``target += std z`` in place, z being ``aes_ctr_normals(key, nonce, target.numel())`` in the order of the
    flattened ``target`` (float32, contiguous, CPU), without forming z: each chunk's normals are added while
    they are in cache."""
    if target.dtype != torch.float32 or not target.is_contiguous() or target.device.type != "cpu":
        raise ValueError("adding normals in place needs a contiguous float32 tensor on the CPU")
    _draw_ranges(key, nonce, target.view(-1), float(std), chunk_pairs, workers)


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
        """:func:`aes_ctr_normals` under a fresh key and nonce, with torch's intra-op thread count as workers. On a
        device other than the CPU, :class:`ewtune.agent.dpsgd.chacha.ChaChaRandom` draws them there (the same
        transform)."""
        device = torch.device(device or "cpu")
        if device.type != "cpu":
            if device not in self._device_sources:
                self._device_sources[device] = ChaChaRandom(device)  # runs RFC 8439's known answer there
            return self._device_sources[device].standard_normal(count)
        return aes_ctr_normals(os.urandom(32), os.urandom(16), count, workers=torch.get_num_threads())

    def add_standard_normal_(self, tensor: torch.Tensor, std: float) -> None:
        """``tensor += std z`` in place, z distributed as ``standard_normal(tensor.numel())``: on the CPU for a
        contiguous float32 tensor by :func:`aes_ctr_add_normals_` (no normal is stored outside the tensor), else
        by adding that draw."""
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous():
            aes_ctr_add_normals_(os.urandom(32), os.urandom(16), tensor, std, workers=torch.get_num_threads())
        else:
            tensor.add_(self.standard_normal(tensor.numel(), device=tensor.device).view(tensor.shape), alpha=std)


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
