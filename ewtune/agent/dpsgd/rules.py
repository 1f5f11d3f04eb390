"""Per-layer rules: a module's captured input and output gradient -> its parameters' per-example gradients.

Each rule returns ``{local parameter name: Use}`` (see ``ghost``): factored for linear layers, GPT-2
``Conv1D`` and embeddings, direct (``[B, *shape]``) for biases and LayerNorm, whose per-example gradients
are small. Under a bfloat16 autocast forward pass the direct gradients are formed in float32 here and the factors
are upcast to float32 by ``ghost`` before any product, so no norm or sum is accumulated in bfloat16. A module without a rule falls back to ``torch.func``: ``vmap`` over the examples of ``grad`` of
<module(x_i), g_i>, the module's own vector-Jacobian product (as Opacus' functorch mode does).
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


def rule_for(module: nn.Module) -> Rule:
    """The fastest exact rule for this module's own parameters; ``torch.func`` when there is none."""
    if type(module) is nn.Linear:
        return _linear
    if type(module) is nn.Embedding:
        return _embedding
    if type(module) is nn.LayerNorm:
        return _layer_norm
    if Conv1D is not None and type(module) is Conv1D:
        return _conv1d
    return _functional
