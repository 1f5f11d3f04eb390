"""Per-layer rules: a module's captured input and output gradient -> its parameters' per-example gradients.

Each rule returns ``{local parameter name: Use}`` (see ``ghost``): factored for linear layers, GPT-2
``Conv1D`` and embeddings (Gemma's scaled ones too), direct (``[B, *shape]``) for biases, LayerNorm and the
RMSNorm of Llama/Mistral/Qwen/Gemma-style decoders, whose per-example gradients are small. Under a bfloat16
autocast forward pass the direct gradients are formed in float32 here and the factors are upcast to float32 by
``ghost`` before any product, so no norm or sum is accumulated in bfloat16. A module without a rule falls back to
``torch.func``: ``vmap`` over the examples of ``grad`` of <module(x_i), g_i>, the module's own vector-Jacobian
product (as Opacus' functorch mode does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.dpsgd.ghost import Dense, Direct, OneHot, Outer, Use

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the engine itself
    Conv1D = None


@dataclass
class Call:
    """One forward call of a module, as seen by a forward hook."""

    module: nn.Module
    args: tuple
    kwargs: dict
    output: torch.Tensor
    output_version: int


def _rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, T, k] view: every dimension between the batch and the last one is a token."""
    return tensor.detach().reshape(batch, -1, tensor.shape[-1])


def _linear(call: Call, grad_out: torch.Tensor, batch: int) -> dict[str, Use]:
    module = call.module
    g, a = _rows(grad_out, batch), _rows(call.args[0], batch)
    uses: dict[str, Use] = {"weight": Outer(Dense(g), Dense(a), module.weight.shape)}
    if module.bias is not None:
        uses["bias"] = Direct(g.float().sum(dim=1))
    return uses


def _conv1d(call: Call, grad_out: torch.Tensor, batch: int) -> dict[str, Use]:
    """GPT-2's ``Conv1D`` is a linear layer y = x W + b with W stored as [d_in, d_out]."""
    module = call.module
    g, a = _rows(grad_out, batch), _rows(call.args[0], batch)
    return {"weight": Outer(Dense(a), Dense(g), module.weight.shape), "bias": Direct(g.float().sum(dim=1))}


def _embedding(call: Call, grad_out: torch.Tensor, batch: int) -> dict[str, Use]:
    module = call.module
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise InvalidInputError("embeddings with max_norm or scale_grad_by_freq have no per-example rule")
    ids = call.args[0].reshape(batch, -1)
    e = _rows(grad_out, batch)
    if _from_transformers(module, SCALED_EMBEDDINGS):  # y = E[id] * s, so dL/dE[id] = s * dL/dy
        e = e * module.embed_scale.to(module.weight.dtype)
    if module.padding_idx is not None:  # the padding row receives no gradient
        e = e * (ids != module.padding_idx).unsqueeze(-1).to(e.dtype)
    return {"weight": Outer(OneHot(ids, module.num_embeddings), Dense(e), module.weight.shape)}


def _layer_norm(call: Call, grad_out: torch.Tensor, batch: int) -> dict[str, Use]:
    module = call.module
    shape = module.normalized_shape
    x = call.args[0].detach()
    normalised = F.layer_norm(x.float(), shape, eps=module.eps).reshape(batch, -1, *shape)
    g = grad_out.float().reshape(batch, -1, *shape)
    uses: dict[str, Use] = {}
    if module.weight is not None:
        uses["weight"] = Direct((g * normalised).sum(dim=1))
    if module.bias is not None:
        uses["bias"] = Direct(g.sum(dim=1))
    return uses


def _rms_norm(call: Call, grad_out: torch.Tensor, batch: int) -> dict[str, Use]:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): n(x) = x / sqrt(mean(x^2) + eps) over the normalised
    dimensions, y = w * n(x) (Llama, Mistral, Qwen, ``torch.nn.RMSNorm``) or y = (1 + w) * n(x) (Gemma); in
    both dy/dw = n(x), so example i's weight gradient is sum_t g_{i,t} * n(x_{i,t}), formed in float32."""
    module = call.module
    shape = module.weight.shape
    eps = _rms_norm_eps(module, call.args[0].dtype)
    x = call.args[0].detach().float()
    dims = tuple(range(-len(shape), 0))
    normalised = (x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)).reshape(batch, -1, *shape)
    g = grad_out.float().reshape(batch, -1, *shape)
    return {"weight": Direct((g * normalised).sum(dim=1))}


def _rms_norm_eps(module: nn.Module, dtype: torch.dtype) -> float:
    """The epsilon of an RMSNorm: transformers' ``variance_epsilon`` or ``eps``; ``torch.nn.RMSNorm``'s ``None``
    means the machine epsilon of the input's dtype (its documented default)."""
    eps = getattr(module, RMS_NORMS.get(type(module).__name__, "eps"))
    return torch.finfo(dtype).eps if eps is None else float(eps)


def _functional(call: Call, grad_out: torch.Tensor, batch: int) -> dict[str, Use]:
    """Per-example gradients of the module's own parameters by ``vmap(grad(...))``."""
    module = call.module
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    args, kwargs = call.args, call.kwargs
    batched_args = tuple(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch for a in args)
    batched_kwargs = {k: isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch for k, v in kwargs.items()}

    def example_gradient(params, example_args, example_kwargs, g):
        def inner_product(params):
            call_args = tuple(a.unsqueeze(0) if b else a for a, b in zip(example_args, batched_args))
            call_kwargs = {k: v.unsqueeze(0) if batched_kwargs[k] else v for k, v in example_kwargs.items()}
            return (functional_call(module, params, call_args, call_kwargs) * g.unsqueeze(0)).sum()

        return grad(inner_product)(params)

    in_dims = (
        None,
        tuple(0 if b else None for b in batched_args),
        {k: 0 if b else None for k, b in batched_kwargs.items()},
        0,
    )
    detached_args = tuple(_detached_float32(a) for a in args)
    detached_kwargs = {k: _detached_float32(v) for k, v in kwargs.items()}
    per_example = vmap(example_gradient, in_dims=in_dims)(params, detached_args, detached_kwargs, grad_out.detach().float())
    return {name: Direct(values) for name, values in per_example.items()}


def _detached_float32(value):
    """A tensor argument detached, and in float32 when it is floating point (a bfloat16 activation of an autocast
    forward pass, which the float32 parameters would not take with autocast disabled); other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().float() if value.is_floating_point() else value.detach()


Rule = Callable[[Call, torch.Tensor, int], dict[str, Use]]

# transformers' RMSNorm classes whose forward is one of the two forms ``_rms_norm`` differentiates (checked
# against autograd per class in tests/test_causal_lm_rules.py), with the attribute holding their epsilon.
RMS_NORMS = {
    "LlamaRMSNorm": "variance_epsilon",
    "MistralRMSNorm": "variance_epsilon",
    "Qwen2RMSNorm": "variance_epsilon",
    "Qwen3RMSNorm": "variance_epsilon",
    "SmolLM3RMSNorm": "variance_epsilon",
    "GemmaRMSNorm": "eps",
    "Gemma2RMSNorm": "eps",
    "Gemma3RMSNorm": "eps",
}
# Gemma's token embeddings: an ``nn.Embedding`` whose output is multiplied by the buffer ``embed_scale``.
SCALED_EMBEDDINGS = ("GemmaTextScaledWordEmbedding", "Gemma2TextScaledWordEmbedding", "Gemma3TextScaledWordEmbedding")


def _from_transformers(module: nn.Module, names) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def rule_for(module: nn.Module) -> Rule:
    """The fastest exact rule for this module's own parameters; ``torch.func`` when there is none."""
    if type(module) is nn.Linear:
        return _linear
    if type(module) is nn.Embedding or _from_transformers(module, SCALED_EMBEDDINGS):
        return _embedding
    if type(module) is nn.LayerNorm:
        return _layer_norm
    if type(module) is nn.RMSNorm or _from_transformers(module, RMS_NORMS):
        return _rms_norm
    if Conv1D is not None and type(module) is Conv1D:
        return _conv1d
    return _functional


def has_layer_rule(module: nn.Module) -> bool:
    """Whether ``module``'s parameters have a per-layer rule (not the ``torch.func`` fallback)."""
    return rule_for(module) is not _functional
