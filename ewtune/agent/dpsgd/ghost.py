"""Per-example gradients kept in factored form: norms by ghost norm or instantiation, clipped sums by book-keeping.

A layer whose weight gradient is a sum of outer products (linear, GPT-2 ``Conv1D``, embedding) gives
example i the gradient G_i = sum_t l_{i,t} r_{i,t}^T, with l and r the rows of two factors (for a linear
layer: output gradient and input activation). Then

    ||G_i||^2 = sum_{t,s} <l_{i,t}, l_{i,s}> <r_{i,t}, r_{i,s}>            (ghost norm, Li et al. 2021, eq. 4;
                                                                          Goodfellow 2015 for T = 1)

needs two T x T Gram matrices instead of G_i itself. Bu, Mao & Xu (2022, "Scalable and efficient training
of large convolutional neural networks with DP", mixed ghost norm) pick, per layer, whichever is cheaper:
the Gram matrices (2 T^2 numbers per example) or G_i (d_in d_out numbers). Book-keeping (Bu et al. 2023,
"Differentially private optimization on large model at small cost", Algorithm 1) then forms the clipped
sum sum_i c_i G_i from the same factors as one weighted matrix product, with no second backward pass.

An embedding's left factor is one-hot (the token ids), so its Gram matrix is [id_t == id_s] and its sums
are ``index_add``. A parameter used several times (tied input and output embeddings) has
G_i = sum_u G_i^u, whose squared norm sums the Gram products over every pair of uses.

All norms are sums of squares in float32 (``torch.linalg.vector_norm`` loses accuracy on long fp32 rows).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ewtune.accountant.errors import InvalidInputError


@dataclass(frozen=True)
class Dense:
    """A factor given by its rows: ``values[B, T, k]``."""

    values: torch.Tensor


@dataclass(frozen=True)
class OneHot:
    """A factor whose row t is the unit vector e_{ids[b, t]} in R^size."""

    ids: torch.Tensor
    size: int


Factor = Dense | OneHot


@dataclass(frozen=True)
class Outer:
    """Per-example gradient sum_t left_t right_t^T, viewed as ``shape``."""

    left: Factor
    right: Factor
    shape: torch.Size


@dataclass(frozen=True)
class Direct:
    """Per-example gradient given outright: ``values[B, *shape]``."""

    values: torch.Tensor


Use = Outer | Direct


class RecentCache:
    """The few most recently used results, keyed by tensor storage.

    Layers that read the same input (a transformer's query, key and value projections) run one after the
    other, so a small least-recently-used window finds the repeats without holding every layer's result.
    """

    def __init__(self, size: int = 2):
        self._items: OrderedDict = OrderedDict()
        self._size = size

    def get(self, values: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (values.data_ptr(), values.shape, values.stride(), values.dtype)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][1]
        result = compute()
        self._items[key] = (values, result)  # holding values keeps its address from being reused
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return result


def _width(factor: Factor) -> int:
    return factor.size if isinstance(factor, OneHot) else factor.values.shape[-1]


def _length(factor: Factor) -> int:
    return factor.ids.shape[1] if isinstance(factor, OneHot) else factor.values.shape[1]


def _gram(a: Factor, b: Factor, cache: RecentCache | None = None) -> torch.Tensor:
    """[B, T_a, T_b] inner products <a_t, b_s> per example, in float32 (``cache``: for a dense a = b)."""
    if a is b and isinstance(a, Dense) and cache is not None:
        return cache.get(a.values, lambda: _gram(a, b))
    if isinstance(a, Dense) and isinstance(b, Dense):
        return torch.bmm(a.values.float(), b.values.float().transpose(1, 2))
    if isinstance(a, OneHot) and isinstance(b, OneHot):
        return (a.ids[:, :, None] == b.ids[:, None, :]).float()
    if isinstance(a, Dense):
        return _gram(b, a).transpose(1, 2)
    # <e_{id_t}, b_s> = b_s[id_t]
    index = a.ids[:, None, :].expand(-1, b.values.shape[1], -1)
    return b.values.float().gather(2, index).transpose(1, 2)


def _instantiate(use: Use, batch: int) -> torch.Tensor:
    """The per-example gradients [B, *shape] in float32."""
    if isinstance(use, Direct):
        return use.values.float()
    left, right = use.left, use.right
    if isinstance(left, OneHot) and isinstance(right, OneHot):
        raise InvalidInputError("a gradient with two one-hot factors has no rule")
    # bmm is fastest with the narrow factor transposed; a one-hot factor goes left (scatter)
    if isinstance(right, OneHot) or (isinstance(left, Dense) and _width(left) > _width(right)):
        swapped = Outer(right, left, torch.Size((_width(right), _width(left))))
        return _instantiate(swapped, batch).transpose(1, 2).reshape(batch, *use.shape)
    if isinstance(left, Dense):
        grads = torch.bmm(left.values.float().transpose(1, 2), right.values.float())
    else:
        values = right.values.float()
        grads = values.new_zeros(batch, left.size, values.shape[-1])
        grads.scatter_add_(1, left.ids[:, :, None].expand_as(values), values)
    return grads.reshape(batch, *use.shape)


def _prefers_ghost(use: Outer) -> bool:
    """Mixed ghost norm rule: Gram matrices when 2 T^2 < d_left * d_right, or when a factor is one-hot."""
    if isinstance(use.left, OneHot) or isinstance(use.right, OneHot):
        return True
    length = _length(use.left)
    return 2 * length * length < _width(use.left) * _width(use.right)


def _ghost_inner(u: Outer, v: Outer, cache: RecentCache | None) -> torch.Tensor:
    """<G_i^u, G_i^v> for every example from Gram matrices, [B]."""
    return (_gram(u.left, v.left, cache) * _gram(u.right, v.right, cache)).sum(dim=(1, 2))


def squared_norms(uses: list[Use], batch: int, cache: RecentCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """||sum_u G_i^u||^2 for every example i ([B], float32), and the instantiated G_i when that was cheaper.

    Pass the instantiation back to ``weighted_sum``, which then needs no second matrix product.
    """
    if all(isinstance(use, Outer) for use in uses) and (len(uses) > 1 or _prefers_ghost(uses[0])):
        pairs = [(j, k) for j in range(len(uses)) for k in range(j, len(uses))]
        return sum((1 if j == k else 2) * _ghost_inner(uses[j], uses[k], cache) for j, k in pairs), None
    grads = _instantiate(uses[0], batch)
    for use in uses[1:]:
        grads = grads + _instantiate(use, batch)
    return grads.reshape(batch, -1).pow(2).sum(dim=1), grads


def _weighted_outer(
    left: Factor, right: Factor, weights: torch.Tensor, cache: RecentCache | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_i w_i sum_t left_{i,t} right_{i,t}^T as a [d_left, d_right] matrix, or added in place into ``out``
    (a float32 [d_left, d_right] matrix: the running sum of a step, which then needs no buffer of its own).

    The narrower factor is scaled, in float32 (a clip factor rounded to bfloat16 could let a gradient
    exceed C); ``cache`` finds the scaled factor of an input shared with the previous layer.
    """
    if isinstance(right, OneHot) or (isinstance(left, Dense) and _width(left) < _width(right)):
        return _weighted_outer(right, left, weights, cache, None if out is None else out.T).T
    values = right.values

    def scale() -> torch.Tensor:
        return (values.float() * weights.view(-1, *([1] * (values.dim() - 1)))).reshape(-1, values.shape[-1])

    scaled = cache.get(values, scale) if cache is not None else scale()
    if isinstance(left, OneHot):
        if out is None:
            out = scaled.new_zeros(left.size, scaled.shape[-1])
        return out.index_add_(0, left.ids.reshape(-1), scaled)
    rows = left.values.float().reshape(-1, left.values.shape[-1]).T
    return rows @ scaled if out is None else out.addmm_(rows, scaled)


def weighted_sum(
    uses: list[Use],
    weights: torch.Tensor,
    dtype: torch.dtype,
    instantiated: torch.Tensor | None = None,
    cache: RecentCache | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i w_i sum_u G_i^u, the book-keeping clipped sum when w_i is example i's clip factor.

    ``instantiated`` is what ``squared_norms`` returned; ``cache`` is shared by all parameters of one batch
    (same weights). With ``out`` (the parameter's running sum over earlier micro-batches) the sum is added into
    it in place and ``out`` is returned: a float32 ``out`` receives every product directly (``addmm_``,
    ``index_add_``: the products are formed in float32 as without ``out``, only the order of the float32
    additions differs); any other dtype receives the float32 sum rounded once, as a fresh sum would be.
    """
    if out is not None and out.dtype != torch.float32:
        return out.add_(weighted_sum(uses, weights, dtype, instantiated, cache))
    if instantiated is not None:
        total = torch.einsum("b,b...->...", weights, instantiated)
        return total.to(dtype) if out is None else out.add_(total)
    if out is not None:
        for use in uses:
            if isinstance(use, Direct):
                out.add_(torch.einsum("b,b...->...", weights, use.values.float()))
            else:
                _weighted_outer(use.left, use.right, weights, cache, _as_matrix(out, use))
        return out
    total = None
    for use in uses:
        if isinstance(use, Direct):
            part = torch.einsum("b,b...->...", weights, use.values.float())
        else:
            part = _weighted_outer(use.left, use.right, weights, cache).reshape(use.shape)
        part = part.to(dtype)
        total = part if total is None else total + part
    return total


def _as_matrix(out: torch.Tensor, use: Outer) -> torch.Tensor:
    """``out`` (shaped like the parameter) viewed as the [d_left, d_right] matrix of ``use``'s outer products."""
    return out.view(_width(use.left), _width(use.right))
