"""Gaussian noise: scale sigma*C, normal shape, seeded reproducibility, fresh draws in secure mode."""

from __future__ import annotations

import math

import pytest
import torch

from ewtune.agent.dpsgd.noise import gaussian_noise_like
from ewtune.agent.dpsgd.randomness import InsecureSeededRandom, SecureRandom

DRAWS = 100_000
STD = 0.7


def _check_gaussian(sample: torch.Tensor, std: float) -> None:
    """Std within 2% (about 4.5 standard errors at 1e5 draws), mean and the one-sigma mass as N(0, std^2)."""
    sample = sample.double()
    assert sample.std().item() == pytest.approx(std, rel=0.02)
    assert abs(sample.mean().item()) < 5 * std / math.sqrt(sample.numel())
    inside = (sample.abs() < std).double().mean().item()
    assert inside == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.01)


def _grads():
    return {"a": torch.zeros(DRAWS // 2), "b": torch.zeros(50, DRAWS // 100)}


@pytest.mark.parametrize("source", [InsecureSeededRandom(0), SecureRandom()], ids=["seeded", "secure"])
def test_noise_has_the_requested_scale_and_shape(source):
    noise = gaussian_noise_like(_grads(), STD, source)
    assert noise["a"].shape == (DRAWS // 2,) and noise["b"].shape == (50, DRAWS // 100)
    assert all(n.dtype == torch.float32 for n in noise.values())
    _check_gaussian(torch.cat([n.reshape(-1) for n in noise.values()]), STD)


def test_the_scale_test_can_fail():
    noise = gaussian_noise_like(_grads(), STD * 1.03, InsecureSeededRandom(0))
    with pytest.raises(AssertionError):
        _check_gaussian(torch.cat([n.reshape(-1) for n in noise.values()]), STD)


def test_seeded_noise_is_reproducible():
    first = gaussian_noise_like(_grads(), STD, InsecureSeededRandom(5))
    second = gaussian_noise_like(_grads(), STD, InsecureSeededRandom(5))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_secure_noise_is_the_default_and_differs_across_calls():
    first = gaussian_noise_like(_grads(), STD)
    second = gaussian_noise_like(_grads(), STD)
    assert not torch.equal(first["a"], second["a"])
    # independent draws: their difference has std sqrt(2) * STD
    _check_gaussian(first["a"] - second["a"], math.sqrt(2) * STD)


def test_secure_standard_normal_tails_and_odd_counts():
    sample = SecureRandom().standard_normal(200_001)
    assert sample.shape == (200_001,) and sample.dtype == torch.float32
    beyond_two = (sample.abs() > 2).double().mean().item()
    assert beyond_two == pytest.approx(math.erfc(2 / math.sqrt(2)), abs=0.003)


def test_noise_follows_the_gradient_dtype_and_zero_std_is_zero():
    grads = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
    assert gaussian_noise_like(grads, 1.0)["w"].dtype == torch.bfloat16
    assert not gaussian_noise_like(grads, 0.0)["w"].any()
    assert gaussian_noise_like({"empty": torch.zeros(0, 3)}, 1.0)["empty"].shape == (0, 3)
    with pytest.raises(ValueError):
        gaussian_noise_like(grads, -1.0)


def test_the_in_place_aes_ctr_keystream_is_the_standard_one():
    """NIST SP 800-38A, F.5.5 (CTR-AES256), blocks 1 and 2; and, over a megabyte at an odd length, the same bytes
    as an encryption of zeros into a separate buffer."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from ewtune.agent.dpsgd.randomness import aes_ctr_keystream

    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    stream = aes_ctr_keystream(key, counter, 32)
    assert bytes(p ^ k for p, k in zip(plain, stream)).hex() == (
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
    )
    count = (1 << 20) + 7
    separate = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor().update(bytes(count))
    assert aes_ctr_keystream(key, counter, count) == separate


def _one_pass_normals(key: bytes, nonce: bytes, count: int) -> torch.Tensor:
    """The transform on the whole keystream at once: box_muller's layout, 12 bytes a pair, no chunks, no threads."""
    from ewtune.agent.dpsgd.box_muller import box_muller
    from ewtune.agent.dpsgd.randomness import aes_ctr_keystream

    pairs = (count + 1) // 2
    raw = aes_ctr_keystream(key, nonce, 12 * pairs)
    bits53 = (torch.frombuffer(raw, dtype=torch.int64, count=pairs) >> 11) & ((1 << 53) - 1)
    return box_muller(bits53, torch.frombuffer(raw, dtype=torch.int32, offset=8 * pairs), count)


@pytest.mark.parametrize(
    "nonce",
    [bytes(range(16)), bytes(12) + b"\xff" * 4, b"\xff" * 16],
    ids=["plain", "carry-past-32-bits", "wrap-at-2^128"],
)
def test_chunks_and_threads_give_the_one_pass_stream(nonce):
    """Chunk boundaries (1, 3, 64 pairs and the default) and 1 to 3 threads, each seeking its range by the CTR
    counter, at odd and even counts (the angle stream starting inside an AES block, the last sine dropped), give
    bit for bit the normals of one pass over the whole keystream, also where the counter carries or wraps."""
    from ewtune.agent.dpsgd.randomness import aes_ctr_normals

    key = bytes(range(100, 132))
    for count in (1, 2, 7, 130, 20_001):
        expected = _one_pass_normals(key, nonce, count)
        for chunk_pairs, workers in ((1, 1), (3, 2), (64, 3), (1 << 14, 1), (1 << 14, 2)):
            if chunk_pairs < 64 and count > 130:
                continue  # thousands of one-pair chunks: slow, and the boundaries are tested at the small counts
            drawn = aes_ctr_normals(key, nonce, count, chunk_pairs=chunk_pairs, workers=workers)
            assert torch.equal(drawn, expected), (count, chunk_pairs, workers)


def test_chunked_normals_depend_on_the_key():
    from ewtune.agent.dpsgd.randomness import aes_ctr_normals

    nonce = bytes(16)
    assert not torch.equal(aes_ctr_normals(bytes(32), nonce, 1000), aes_ctr_normals(bytes(31) + b"\x01", nonce, 1000))


def test_extreme_uniforms_give_finite_normals():
    """u = (b + 1/2) / 2^53 is never 0: the smallest b gives the largest radius sqrt(106 ln 2 + 2 ln 2) ~ 8.65,
    the largest b rounds to u = 1 and the radius 0; the extreme angle words stay finite too."""
    from ewtune.agent.dpsgd.box_muller import box_muller

    bits53 = torch.tensor([0, 0, (1 << 53) - 1, 1 << 52], dtype=torch.int64)
    angles = torch.tensor([0, -(1 << 31), (1 << 31) - 1, 1 << 30], dtype=torch.int32)
    normals = box_muller(bits53, angles, 8)
    assert torch.isfinite(normals).all()
    assert normals[0].item() == pytest.approx(math.sqrt(108 * math.log(2)), rel=1e-6)
    assert normals[4].item() == 0.0 and normals[2].item() == 0.0 and normals[6].item() == 0.0
    assert normals[1].item() == pytest.approx(-math.sqrt(108 * math.log(2)), rel=1e-6)  # angle -pi


def test_noise_added_in_place_has_the_scale_and_keeps_each_dtype():
    from ewtune.agent.dpsgd.noise import add_gaussian_noise_

    grads = {**_grads(), "half": torch.full((1000,), 3.0, dtype=torch.bfloat16)}
    add_gaussian_noise_(grads, STD, SecureRandom())
    _check_gaussian(torch.cat([grads["a"], grads["b"].reshape(-1)]), STD)
    assert grads["half"].dtype == torch.bfloat16 and grads["b"].shape == (50, DRAWS // 100)
    assert (grads["half"].float() - 3.0).std().item() == pytest.approx(STD, rel=0.15)


def test_normals_added_in_place_are_the_drawn_normals_times_std():
    """aes_ctr_add_normals_ (the CPU noise of a DP step, never stored outside the gradient) adds std z with z bit
    for bit aes_ctr_normals' draw under the same key, through chunks and threads, at an odd count."""
    from ewtune.agent.dpsgd.randomness import aes_ctr_add_normals_, aes_ctr_normals

    key, nonce, std = bytes(range(32)), bytes(range(16, 32)), 0.37
    base = torch.linspace(-2.0, 2.0, 3 * 7001).reshape(3, 7001)
    expected = base.clone().add_(aes_ctr_normals(key, nonce, base.numel()).view(base.shape), alpha=std)
    for chunk_pairs, workers in ((5, 1), (64, 3), (1 << 14, 2)):
        target = base.clone()
        aes_ctr_add_normals_(key, nonce, target, std, chunk_pairs=chunk_pairs, workers=workers)
        assert torch.equal(target, expected), (chunk_pairs, workers)
    with pytest.raises(ValueError, match="contiguous float32"):
        aes_ctr_add_normals_(key, nonce, base.t(), std)


def test_a_draw_leaves_torchs_thread_count_as_it_found_it(monkeypatch):
    """The draw runs each chunk's operations on one thread (randomness._one_intra_op_thread) and restores the
    setting afterwards, also when a draw fails inside."""
    from ewtune.agent.dpsgd import randomness
    from ewtune.agent.dpsgd.randomness import aes_ctr_normals

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        SecureRandom().add_standard_normal_(torch.zeros(100_001), 1.0)
        assert torch.get_num_threads() == 2
        def failing_range(*args):
            raise MemoryError("a chunk failed")

        with monkeypatch.context() as patched:
            patched.setattr(randomness, "_normals_range", failing_range)
            with pytest.raises(MemoryError):
                aes_ctr_normals(bytes(32), bytes(16), 10)
        assert torch.get_num_threads() == 2
        assert torch.equal(
            aes_ctr_normals(bytes(32), bytes(16), 70_001, workers=2), aes_ctr_normals(bytes(32), bytes(16), 70_001)
        )
    finally:
        torch.set_num_threads(threads)
