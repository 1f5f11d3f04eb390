"""Device and precision settings (ewtune.agent.device): names checked without torch, a device that is not here is a
one-line error (never a silent fall back to the CPU), auto picks CUDA only when torch sees it."""

import pytest
import torch
from support.training import ON_GPU

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.device import check_device_name, check_precision, resolve_device

DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "", "mps", 3])
def test_device_names_refused_in_one_line(name):
    with pytest.raises(InvalidInputError, match="device must be auto") as error:
        check_device_name(name)
    assert "\n" not in str(error.value)


def test_precision_names():
    assert check_precision("bf16") == "bf16"
    with pytest.raises(InvalidInputError, match="precision must be one of fp32, bf16"):
        check_precision("fp16")


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_cuda_when_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1", "bf16") == torch.device("cuda:1")
    with pytest.raises(InvalidInputError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="sees no CUDA device"):
        resolve_device(name)


def test_bf16_on_the_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="bf16 needs a CUDA device"):
        resolve_device("auto", "bf16")


def test_batch_to_moves_every_tensor_to_the_device():
    from ewtune.agent.device import batch_to

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
    moved = batch_to(batch, torch.device("meta"))  # a device other than the CPU that every torch build has
    assert set(moved) == set(batch)
    assert all(value.device.type == "meta" for value in moved.values())
    assert all(moved[key].shape == batch[key].shape and moved[key].dtype == batch[key].dtype for key in batch)
    assert all(value.device.type == "cpu" for value in batch.values())  # the CPU batch is left as it was


def test_autocast_is_bfloat16_for_bf16_only():
    from ewtune.agent.device import autocast

    linear = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert linear(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert linear(torch.ones(1, 4)).dtype == torch.float32
    with pytest.raises(InvalidInputError, match="precision must be one of"):
        autocast(torch.device("cpu"), "fp16")


def test_module_device():
    from ewtune.agent.device import module_device

    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


class _Scale(torch.nn.Module):
    """A layer without a per-example rule (the engine's torch.func fallback)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, hidden):
        return hidden * self.weight


class _TinyClassifier(torch.nn.Module):
    """Every per-example rule of the engine: embedding, linear, layer norm, the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 16)
        self.inner = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.scale = _Scale(32)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, input_ids):
        from types import SimpleNamespace

        hidden = self.scale(self.norm(torch.relu(self.inner(self.embedding(input_ids)))))
        return SimpleNamespace(logits=self.head(hidden.mean(dim=1)))


def _tiny_batch(device):
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 50, (6, 5), generator=generator), "labels": torch.randint(0, 3, (6,), generator=generator)}
    return {key: value.to(device) for key, value in batch.items()}


def _clipped_sum(model, clip_norm, batch, how):
    """The engine's clipped sum in float32 (``how = None``), under its own bfloat16 autocast (``engine``), or under
    the caller's (``caller``), on the batch's device."""
    from ewtune.agent.dpsgd import PerExampleClipper, classification_loss

    clipper = PerExampleClipper(model, clip_norm, classification_loss, autocast_dtype=torch.bfloat16 if how == "engine" else None)
    device_type = batch["input_ids"].device.type
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=how == "caller"):
            return clipper.clipped_grad_sum(batch)
    finally:
        clipper.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["engine", "caller"])
def test_bf16_autocast_keeps_per_example_norms_and_sums_float32(how, device):
    """Under bfloat16 autocast (CPU autocast in CI; CUDA autocast with a GPU) the forward pass is bfloat16, while
    the per-example norms and the clipped sums stay float32 and equal the float32 run's within the bfloat16 forward
    pass's error."""
    torch.manual_seed(0)
    model, batch = _TinyClassifier().to(device), _tiny_batch(device)
    seen = []
    hook = model.inner.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    exact = _clipped_sum(model, 1e6, batch, None)  # a clip norm no gradient reaches: the plain per-example sums
    mixed = _clipped_sum(model, 1e6, batch, how)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the second forward pass did run in bfloat16
    assert exact.per_example_norms.dtype == mixed.per_example_norms.dtype == torch.float32
    assert all(grad.dtype == torch.float32 and grad.device.type == device for grad in mixed.grads.values())
    assert set(mixed.grads) == {name for name, _ in model.named_parameters()}
    torch.testing.assert_close(mixed.per_example_norms, exact.per_example_norms, rtol=3e-2, atol=0)
    for name, grad in exact.grads.items():
        assert (mixed.grads[name] - grad).norm() <= 5e-2 * grad.norm(), name
    assert not torch.equal(mixed.per_example_norms, exact.per_example_norms)  # bfloat16 rounding did change them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["engine", "caller"])
def test_bf16_autocast_keeps_each_records_clipped_contribution_within_the_clip_norm(how, device):
    """Sensitivity: a record alone contributes a clipped gradient of norm at most C (float32 rounding aside), its
    bfloat16 forward pass notwithstanding."""
    torch.manual_seed(0)
    model, batch, clip_norm = _TinyClassifier().to(device), _tiny_batch(device), 1e-3
    for row in range(6):
        alone = _clipped_sum(model, clip_norm, {key: value[row : row + 1] for key, value in batch.items()}, how)
        norm = torch.sqrt(sum(grad.double().pow(2).sum() for grad in alone.grads.values()))
        assert alone.per_example_norms.item() > clip_norm  # clipping did act
        assert clip_norm * (1 - 1e-3) < norm <= clip_norm * (1 + 1e-6)
