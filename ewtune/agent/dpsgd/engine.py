"""Per-example clipping by book-keeping: one forward, one backward to the layer outputs, no second backward.

``PerExampleClipper.clipped_grad_sum(batch)`` returns sum_i c_i g_i over the examples of a micro-batch,
where g_i is example i's gradient of the trainable parameters and c_i = min(1, C / (||g_i|| + 1e-6)) (the
Opacus convention; Abadi et al. 2016, Algorithm 1, clip step, with a guard against division by zero); an
example whose loss or gradient norm is not finite has c_i = 0 and contributes nothing.

How (Bu et al. 2023, "Differentially private optimization on large model at small cost", Algorithm 1):
1. Forward hooks keep every call of a module that owns trainable parameters: its input and its output.
2. ``torch.autograd.grad(sum_i loss_i, outputs)`` gives the gradients of the layer outputs only; autograd
   forms no weight gradient ("ghost differentiation").
3. Per layer, a rule (``rules``) turns (input, output gradient) into factored or direct per-example
   gradients; ``ghost`` computes the squared norms (Gram matrices or instantiation, whichever is cheaper)
   and, once the clip factors c_i are known, the clipped sum as one weighted matrix product per layer, formed
   on demand (:class:`ClippedSum`): in fresh tensors, or added in place into a step's running sum over earlier
   micro-batches (``addmm_``, ``index_add_``), which then needs no gradient-sized buffer per micro-batch.

Exactness needs each example's output to depend on that example only, and privacy needs each example's loss
and gradient to depend on that example and the weights only: a padded batch breaks both when weights make the
padded positions non-finite, so every record is padded to a length fixed by its own length and computed in a
group of records of that padded length (:mod:`ewtune.agent.dpsgd.unpadded`), and batch normalisation in training mode
(batch statistics) is refused. Two ways this silently fails are
caught: a module called with a batch of 1 broadcast over B (HF's default ``position_ids``, which this class
therefore passes as [B, T] when the model takes them) raises, and so does an output changed in place after
its module returned. Dropout is applied once in the forward pass, so every example keeps its own mask.
Activation checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=False``, transformers' default for
``gradient_checkpointing_enable``) gives the same sums: the hooks keep the first forward pass's layer inputs and
outputs, and the backward pass to those outputs recomputes the rest, so what is saved is the memory of what
lies between parametrised layers (attention scores and probabilities, activation functions). Reentrant
checkpointing runs the forward pass without autograd, so the layer outputs have no gradient: it is refused.

Mixed precision (``autocast_dtype=torch.bfloat16``, or the caller's own autocast): the forward pass runs under
autocast, so layer inputs and output gradients may be bfloat16; everything the sensitivity bound rests on runs in
float32 with autocast disabled: the rules upcast the activations and output gradients they read
(:mod:`ewtune.agent.dpsgd.rules`, :mod:`ewtune.agent.dpsgd.ghost`), so the per-example squared norms, the clip factors c_i and the
weighted sums sum_i c_i g_i are float32 and the summed gradients have the parameters' dtype (float32: autocast
leaves parameters in float32), as the noise added to them (:mod:`ewtune.agent.dpsgd.noise`). The norm ||g_i|| is computed
from the same float32 factors the clipped sum is formed from, so the clipped contribution c_i g_i has norm at most
C up to float32 rounding, whatever rounding the bfloat16 forward pass introduced into g_i itself. Whether a
micro-batch's sum is formed in fresh tensors or added in place into a running sum, each record's c_i g_i enters it
through the same float32 products (same factors, same c_i); only the order of the float32 additions differs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.agent.dpsgd.ghost import RecentCache, Use, squared_norms, weighted_sum
from ewtune.agent.dpsgd.rules import Call, has_layer_rule, rule_for
from ewtune.agent.dpsgd.unpadded import own_padding_parts

CLIP_EPSILON = 1e-6

LossFn = Callable[[object, Mapping[str, torch.Tensor]], torch.Tensor]


class PerExampleGradientError(EwtuneError):
    """The model mixes examples or changes a layer output in place, so per-example gradients are unsound."""


@dataclass
class PendingSums:
    """One micro-batch's clipped sums sum_i c_i g_i, not formed yet: each parameter's uses (the layers' kept inputs
    and output gradients, or per-example gradients ``squared_norms`` instantiated) and the clip factors c_i."""

    params: dict[str, nn.Parameter]
    uses: dict[str, list[Use]]
    instantiated: dict[str, torch.Tensor | None]
    factors: torch.Tensor

    def form(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The sums in fresh tensors, or added in place into ``into`` (and ``into`` returned). The uses are
        consumed: each layer's activations and output gradients are freed once summed."""
        sums, scaled = ({} if into is None else into), RecentCache()
        with torch.no_grad(), torch.autocast(self.factors.device.type, enabled=False):  # sums stay in float32
            for name, p in self.params.items():
                if name in self.uses:
                    out = None if into is None else into[name]
                    sums[name] = weighted_sum(self.uses.pop(name), self.factors, p.dtype, self.instantiated.pop(name), scaled, out)
                elif into is None:
                    sums[name] = torch.zeros_like(p)
        return sums

    def each(self):
        """(name, sum) one parameter at a time, in the parameters' order, each formed only when asked for, so that
        a caller that hands each on (a sharded step reduce-scatters it: :mod:`ewtune.agent.distributed.sharded`)
        holds one parameter's sum at a time; the uses are consumed as by :meth:`form`."""
        scaled = RecentCache()
        for name, p in self.params.items():
            if name not in self.uses:
                yield name, torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                continue
            with torch.no_grad(), torch.autocast(self.factors.device.type, enabled=False):  # sums stay in float32
                total = weighted_sum(self.uses.pop(name), self.factors, p.dtype, self.instantiated.pop(name), scaled, None)
            yield name, total


class ClippedSum:
    """The sum over a micro-batch of per-example gradients, each clipped to norm C (``grads``, a tensor per
    trainable parameter), with the examples' gradient norms, summed loss and count.

    The engine hands the sum over unformed (:class:`PendingSums`) and it is formed once, on demand: reading
    ``grads`` forms it in fresh tensors; ``add_to(sums)`` adds it in place into a running sum over micro-batches,
    so that a step over several micro-batches allocates, fills and adds no gradient-sized buffer per micro-batch
    (MiniLM's word-embedding gradient alone is 47 MB). Both compute the same products (ghost.weighted_sum); only
    the order of the float32 additions differs. After ``add_to`` the sum lives in ``sums`` alone.
    """

    def __init__(self, grads, per_example_norms: torch.Tensor, loss_sum: float, count: int, pending: PendingSums | None = None):
        self._grads = grads
        self._pending = pending
        self.per_example_norms = per_example_norms
        self.loss_sum = loss_sum
        self.count = count

    def form(self) -> dict[str, torch.Tensor]:
        """The clipped sums, formed now if they were not yet."""
        if self._grads is None:
            if self._pending is None:
                raise EwtuneError("this clipped sum was added into a running sum; it has no gradients of its own")
            self._grads, self._pending = self._pending.form(), None
        return self._grads

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        return self.form()

    def each(self):
        """(name, sum) one parameter at a time (:meth:`PendingSums.each`); a sum already formed, from its tensors."""
        if self._pending is None:
            yield from self.form().items()
            return
        pending, self._pending = self._pending, None
        yield from pending.each()

    def add_to(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sums`` (every parameter's running sum) with this clipped sum added in place; returns ``sums``."""
        if self._pending is None:
            for name, grad in self.form().items():
                sums[name].add_(grad)
            return sums
        pending, self._pending = self._pending, None
        return pending.form(into=sums)


def running_sum(sums: dict[str, torch.Tensor] | None, clipped: ClippedSum) -> dict[str, torch.Tensor]:
    """``clipped`` added into the running sum ``sums``, or ``clipped``'s own gradients when there is none yet."""
    return clipped.form() if sums is None else clipped.add_to(sums)


def batch_size_of(batch: Mapping[str, torch.Tensor]) -> int:
    """Number of examples in a batch: the first dimension of its ``input_ids`` (or of any tensor); 0 if empty."""
    if not batch:
        return 0
    tensor = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
    return tensor.shape[0]


def in_batch_order(rows: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """The per-example ``values`` of the parts whose batch rows are ``rows``, put back in batch order."""
    values = torch.cat(values)
    ordered = torch.empty_like(values)
    ordered[torch.cat(rows).to(values.device)] = values
    return ordered


def _takes_position_ids(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "position_ids" in inspect.signature(base.forward).parameters


class PerExampleClipper:
    """Clipped per-example gradient sums of ``model``'s trainable parameters under ``loss_fn``.

    ``loss_fn(outputs, batch)`` returns one loss per example (see ``losses``). The model is called with
    every entry of the batch except ``labels``, under autocast to ``autocast_dtype`` when one is given (module
    docstring: norms and sums stay float32). Parameters are those with ``requires_grad`` at
    construction time; the model's train/eval mode is left as it is.
    """

    def __init__(self, model: nn.Module, clip_norm: float, loss_fn: LossFn, autocast_dtype: torch.dtype | None = None):
        if not clip_norm > 0:
            raise InvalidInputError(f"clip_norm must be positive, got {clip_norm}")
        self.model = model
        self.clip_norm = float(clip_norm)
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._names = {id(p): name for name, p in self.params.items()}
        self._position_ids = _takes_position_ids(model)
        self._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._calls: list[Call] | None = None
        self._batch = 0
        self._handles = []
        for module in model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_hook(self._record, with_kwargs=True))

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def modules_without_layer_rule(self) -> list[str]:
        """Names of the modules with trainable parameters whose per-example gradients come from the generic
        ``torch.func`` fallback (exact, but a ``vmap`` per call and the per-example gradients in full)."""
        return [
            name
            for name, module in self.model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False)) and not has_layer_rule(module)
        ]

    def _record(self, module, args, kwargs, output):
        if self._calls is None:
            return
        if not isinstance(output, torch.Tensor):
            raise PerExampleGradientError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")
        if output.dim() == 0 or output.shape[0] != self._batch:
            raise PerExampleGradientError(
                f"{type(module).__name__} ran on a batch of {tuple(output.shape)[:1]} for {self._batch} examples: "
                "an input is broadcast across the batch (pass position_ids as [B, T])"
            )
        self._calls.append(Call(module, args, kwargs, output, output._version))

    def _model_inputs(self, batch: Mapping[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        if self._position_ids and "position_ids" not in inputs and "input_ids" in inputs:
            length = inputs["input_ids"].shape[1]
            inputs["position_ids"] = torch.arange(length, device=inputs["input_ids"].device).expand(size, length)
        return inputs

    def _autocast(self, batch: Mapping[str, torch.Tensor]):
        """Autocast to ``autocast_dtype`` on the batch's device; without one, the caller's autocast (if any) holds."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(iter(batch.values())).device.type, dtype=self.autocast_dtype)

    def _forward(self, batch: Mapping[str, torch.Tensor], size: int) -> tuple[torch.Tensor, list[Call]]:
        if any(norm.training for norm in self._batch_norms):
            raise PerExampleGradientError("batch normalisation in training mode mixes the records of a batch")
        self._calls, self._batch = [], size
        try:
            with self._autocast(batch):
                losses = self.loss_fn(self.model(**self._model_inputs(batch, size)), batch)
            calls = self._calls
        finally:
            self._calls = None
        if losses.shape != (size,):
            raise PerExampleGradientError(f"the loss function returned shape {tuple(losses.shape)}, not ({size},)")
        for call in calls:
            if call.output._version != call.output_version:
                raise PerExampleGradientError(f"the output of {type(call.module).__name__} is modified in place")
            if losses.requires_grad and not call.output.requires_grad:
                raise PerExampleGradientError(
                    f"{type(call.module).__name__} ran without autograd (reentrant activation checkpointing?): "
                    "its per-example gradients cannot be formed; checkpoint with use_reentrant=False"
                )
        return losses, calls

    def _per_example_uses(self, calls: list[Call], output_grads, size: int) -> dict[str, list[Use]]:
        uses: dict[str, list[Use]] = {}
        for call, grad_out in zip(calls, output_grads):
            if grad_out is None:
                continue
            local = dict(call.module.named_parameters(recurse=False))
            for local_name, use in rule_for(call.module)(call, grad_out, size).items():
                name = self._names.get(id(local[local_name]))
                if name is not None:
                    uses.setdefault(name, []).append(use)
        return uses

    def zero_grads(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(p) for name, p in self.params.items()}

    def clipped_grad_sum(self, batch: Mapping[str, torch.Tensor]) -> ClippedSum:
        """sum_i c_i g_i over the batch's examples, with their gradient norms ||g_i|| (float32, in batch order).
        A right-padded batch is computed one group of records of one padded length at a time, each record
        padded by its own length alone (:mod:`ewtune.agent.dpsgd.unpadded`)."""
        parts = own_padding_parts(batch)
        if len(parts) <= 1:
            return self._same_padding_sum(parts[0][1] if parts else batch)
        grads, rows, norms, loss_sum = None, [], [], 0.0
        for part_rows, part in parts:
            clipped = self._same_padding_sum(part)
            grads = running_sum(grads, clipped)
            rows.append(part_rows)
            norms.append(clipped.per_example_norms)
            loss_sum += clipped.loss_sum
        return ClippedSum(grads, in_batch_order(rows, norms), loss_sum, batch_size_of(batch))

    def _same_padding_sum(self, batch: Mapping[str, torch.Tensor]) -> ClippedSum:
        """``clipped_grad_sum`` of a batch whose records all carry their own padding."""
        size = batch_size_of(batch)
        if size == 0:
            return ClippedSum(self.zero_grads(), torch.zeros(0), 0.0, 0)
        losses, calls = self._forward(batch, size)
        output_grads = torch.autograd.grad(losses.sum(), [call.output for call in calls], allow_unused=True)
        device = losses.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # norms stay in float32
            uses = self._per_example_uses(calls, output_grads, size)
            del calls, output_grads
            norms_squared, instantiated, grams = torch.zeros(size, device=device), {}, RecentCache()
            for name, name_uses in uses.items():
                squares, instantiated[name] = squared_norms(name_uses, size, grams)
                norms_squared += squares
            del grams
            norms = norms_squared.sqrt()
            usable = torch.isfinite(norms) & torch.isfinite(losses.detach())
            pending = self._weighted_sums(uses, instantiated, norms) if self.all_usable(usable) else None
        if pending is None:
            del uses, instantiated
            return self._sum_of_usable(batch, usable, norms)
        return ClippedSum(None, norms, float(losses.detach().sum()), size, pending)

    def all_usable(self, usable: torch.Tensor) -> bool:
        """Whether every example of the part has a finite loss and gradient norm (else the usable ones are computed
        again, :meth:`_sum_of_usable`); a sharded clipper asks every worker, so that all take the same path
        (:mod:`ewtune.agent.distributed.sharded`)."""
        return bool(usable.all())

    def _weighted_sums(self, uses, instantiated, norms: torch.Tensor) -> PendingSums:
        """sum_i c_i g_i per parameter, with c_i = min(1, C / (||g_i|| + 1e-6)), to be formed by the caller."""
        factors = (self.clip_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        return PendingSums(self.params, uses, instantiated, factors)

    def _sum_of_usable(self, batch: Mapping[str, torch.Tensor], usable: torch.Tensor, norms: torch.Tensor) -> ClippedSum:
        """The clipped sum over the examples whose loss and gradient norm are finite; the others contribute
        zero, as if clipped to norm 0. Multiplying a NaN gradient by a zero factor would still give NaN, and one
        NaN makes the whole noised sum NaN, a release that says whether that record is present (weights chosen
        by a coordinator can arrange it). So the usable examples are recomputed on their own, and the sum's
        sensitivity stays at most C per record whatever the weights."""
        keep = usable.nonzero(as_tuple=True)[0]
        if keep.numel() == 0:
            return ClippedSum(self.zero_grads(), norms, 0.0, batch_size_of(batch))
        inner = self._same_padding_sum({key: value[keep] for key, value in batch.items()})
        return ClippedSum(inner.grads, norms, inner.loss_sum, batch_size_of(batch))
