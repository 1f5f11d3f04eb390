"""The on-device secure generator (ewtune.agent.dpsgd.chacha): RFC 8439's test vectors through the same code that draws
the noise, agreement with an independent ChaCha20 (the cryptography package's OpenSSL binding) over many blocks
and counters past 2^31, the known-answer guard, and the distributions of its uniforms and normals."""

import math
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from ewtune.agent.dpsgd import chacha
from ewtune.agent.dpsgd.chacha import ChaChaRandom, GeneratorSelfTestError, block_bytes, chacha20_blocks


def openssl_keystream(key: bytes, nonce: bytes, counter: int, blocks: int) -> bytes:
    cipher = Cipher(algorithms.ChaCha20(key, counter.to_bytes(4, "little") + nonce), mode=None)
    return cipher.encryptor().update(bytes(64 * blocks))


def test_rfc8439_block_function_vector():
    """RFC 8439, section 2.3.2."""
    words = chacha20_blocks(chacha.KNOWN_ANSWER_KEY, chacha.KNOWN_ANSWER_NONCE, 1, 1)
    assert block_bytes(words) == chacha.KNOWN_ANSWER_BLOCK


def test_rfc8439_encryption_vector():
    """RFC 8439, section 2.4.2: the keystream from counter 1 XOR the plaintext is the published ciphertext."""
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
        b"sunscreen would be it."
    )
    nonce = bytes.fromhex("000000000000004a00000000")
    stream = block_bytes(chacha20_blocks(bytes(range(32)), nonce, 1, 2))
    ciphertext = bytes(p ^ k for p, k in zip(plaintext, stream))
    assert ciphertext.hex() == (
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0bf91b65c5524733ab8f593dabcd62b357"
        "1639d624e65152ab8f530c359f0861d807ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )


def test_rfc8439_appendix_a1_zero_key_vectors():
    """RFC 8439, appendix A.1, test vectors #1 (counter 0) and #2 (counter 1), all-zero key and nonce."""
    first = block_bytes(chacha20_blocks(bytes(32), bytes(12), 0, 1)).hex()
    second = block_bytes(chacha20_blocks(bytes(32), bytes(12), 1, 1)).hex()
    assert first.startswith("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7")
    assert second.startswith("9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed")


@pytest.mark.parametrize("counter", [0, 7, (1 << 31) - 3, (1 << 32) - 5])
def test_agrees_with_openssl_over_many_blocks(counter):
    key, nonce = bytes(range(100, 132)), bytes(range(12))
    ours = block_bytes(chacha20_blocks(key, nonce, counter, 5))
    assert ours == openssl_keystream(key, nonce, counter, 5)


def test_the_counter_may_not_wrap():
    with pytest.raises(ValueError, match="counter"):
        chacha20_blocks(bytes(32), bytes(12), (1 << 32) - 1, 2)


def test_a_device_that_fails_the_known_answer_is_refused(monkeypatch):
    monkeypatch.setattr(chacha, "KNOWN_ANSWER_BLOCK", bytes(64))
    with pytest.raises(GeneratorSelfTestError, match="RFC 8439"):
        ChaChaRandom("cpu")


def test_draws_span_chunks_without_repeating(monkeypatch):
    """Chunks continue the counter under one key: words from a multi-chunk draw are the keystream in order."""
    monkeypatch.setattr(chacha, "_chunk_blocks", lambda device: 3)
    monkeypatch.setattr(chacha.os, "urandom", lambda n: bytes(range(n)))
    words = chacha._fresh_words(16 * 7 + 5, torch.device("cpu"))
    expected = openssl_keystream(bytes(range(32)), bytes(range(12)), 0, 8)[: 4 * words.numel()]
    assert words.numpy().astype("<i4").tobytes() == expected


def test_fresh_keys_give_different_draws():
    source = ChaChaRandom()
    assert not torch.equal(source.standard_normal(64), source.standard_normal(64))


@pytest.fixture
def replayed_keys(monkeypatch):
    """The keys and nonces ChaChaRandom takes from ``os.urandom``, replayed from a fixed stream. The distribution
    tests below check the arithmetic that turns ChaCha20's output into 53-bit uniforms and Box-Muller normals (the
    keystream itself is pinned by RFC 8439's vectors and OpenSSL above): under fresh keys their p-value thresholds
    of 1e-4 made each run fail by chance with probability 1e-4 apiece; replayed, the statistics are fixed numbers
    and a broken transform (a dropped bit, a wrong radius or angle) fails every run."""
    monkeypatch.setattr(chacha.os, "urandom", random.Random(8439).randbytes)


def test_uniform_bits_are_uniform_53_bit_integers(replayed_keys):
    bits = ChaChaRandom().uniform_bits(200_000)
    assert bits.dtype == torch.int64 and int(bits.min()) >= 0 and int(bits.max()) < 1 << 53
    uniforms = bits.double().numpy() / 2.0**53
    assert stats.kstest(uniforms, "uniform").pvalue > 1e-4
    top_bit = (bits >> 52) & 1
    assert abs(float(top_bit.double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(bits.numel())


def test_normals_are_standard_normal(replayed_keys):
    draws = ChaChaRandom().standard_normal(400_001)
    assert draws.dtype == torch.float32 and draws.numel() == 400_001
    values = draws.double().numpy()
    assert stats.kstest(values, "norm").pvalue > 1e-4
    assert abs(values.mean()) < 5 / math.sqrt(values.size)
    assert abs(values.var() - 1.0) < 5 * math.sqrt(2 / values.size)
    # tails: the share beyond 3 standard deviations is that of N(0, 1) within 5 binomial standard errors
    expected = 2 * stats.norm.sf(3)
    observed = float(np.mean(np.abs(values) > 3))
    assert abs(observed - expected) < 5 * math.sqrt(expected / values.size)
    # the two halves of each Box-Muller pair are uncorrelated
    half = values.size // 2
    assert abs(np.corrcoef(values[:half], values[half : 2 * half])[0, 1]) < 5 / math.sqrt(half)


def test_an_empty_draw_is_empty():
    source = ChaChaRandom()
    assert source.standard_normal(0).numel() == 0 and source.uniform_bits(0).numel() == 0


def test_secure_noise_for_a_gpu_tensor_is_drawn_on_its_device(monkeypatch):
    """SecureRandom routes a draw for any device but the CPU to ChaCha20 on that device (one generator per
    device, self-tested once), and the noise of a gradient is asked for on the gradient's device."""
    from ewtune.agent.dpsgd import noise, randomness

    built = []

    class OnDevice:
        def __init__(self, device):
            built.append(torch.device(device))

        def standard_normal(self, count):
            return torch.zeros(count)

    monkeypatch.setattr(randomness, "ChaChaRandom", OnDevice)
    source = randomness.SecureRandom()
    source.standard_normal(3, device="meta"), source.standard_normal(5, device="meta")
    assert built == [torch.device("meta")]
    assert source.standard_normal(3).device.type == "cpu" and built == [torch.device("meta")]

    asked = []

    class Recording:
        def standard_normal(self, count, device=None):
            asked.append(torch.device(device))
            return torch.ones(count)

    grads = {"w": torch.zeros(2, 3, dtype=torch.float64)}
    noisy = noise.gaussian_noise_like(grads, 0.5, Recording())
    assert asked == [torch.device("cpu")] and noisy["w"].dtype == torch.float64
    assert torch.equal(noisy["w"], torch.full((2, 3), 0.5, dtype=torch.float64))
