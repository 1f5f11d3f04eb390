"""Full DP fine-tuning with the parameters, gradients and optimizer state sharded across the N workers of a holder
(``--sharding fsdp``): PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) with the engine's per-example
clipping (Abadi et al. 2016, Algorithm 1; book-keeping, Bu et al. 2023, Algorithm 1) working on the shards.

For a run, each worker shards a copy of the model (:class:`ShardedRun`): every block of the model's layer lists,
then the whole, with ``fully_shard``, so that each worker keeps 1/N of every parameter (rows of dim 0, as
``torch.chunk``) and the full tensors of the model it loaded are released. A step, on every worker:

- FSDP2 all-gathers a block's parameters for its forward and again for the backward to the layer outputs, then
  frees them; the engine's forward hooks keep each layer's input and output, and the per-example norms and clipped
  sums ``S_k = sum_i c_i g_i`` of this worker's own Poisson-sampled records come from those alone, as in one process
  (:mod:`ewtune.agent.dpsgd.engine`), each record clipped to norm C over the whole model;
- each micro-batch's clipped sum is reduce-scattered (summed, not averaged) one parameter at a time as it is
  formed (:meth:`ewtune.agent.dpsgd.engine.ClippedSum.each`), so a worker holds one parameter's whole sum at a time
  and accumulates only its shard of ``sum_k S_k``;
- each worker adds the noise of the coordinates it owns: every coordinate gets exactly one N(0, sigma^2 C^2) draw,
  from the secure generator the operating system keys on the worker that owns it
  (:class:`ewtune.agent.dpsgd.randomness.SecureRandom`), and no worker ever holds another's un-noised shard;
- the shard is divided by the expected batch size q N and the optimizer steps on the shard, its state sharded.

Every worker must run the same collective operations in the same order, while each samples its own records: so
before a step the workers agree on the most micro-batches any of them has (an all-reduce), and one with fewer runs
placeholder passes (a data-free record, its result dropped); a part with a record whose loss or norm is not finite
is computed again on every worker (:meth:`ShardedClipper.all_usable`). A micro-batch that runs out of memory is not
split, as one process does (:mod:`ewtune.agent.dpsgd.step`): splitting on one worker would desynchronise the others;
the run fails, charged with the steps begun. The sampling, the steps and the ledger entries are those of one
process (:mod:`ewtune.agent.distributed`).

At the end of a run the shards are all-gathered back into the model's trainable parameters on every worker
(:meth:`ShardedWorkerGroup.check_in_sync`), so that rank 0 evaluates and saves a whole model, as after a
replicated run. A run that fails leaves the model's trainable parameters released; the trainer refuses another.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.distributed.group import BUCKET_ELEMENTS, WorkerFailed, WorkerGroup
from ewtune.agent.distributed.memory import start_run_peak
from ewtune.agent.dpsgd.engine import ClippedSum, PerExampleClipper, batch_size_of, in_batch_order
from ewtune.agent.dpsgd.noise import add_gaussian_noise_
from ewtune.agent.dpsgd.step import DPSGDStep, StepStats
from ewtune.agent.dpsgd.unpadded import own_padding_parts

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def shard_module(module: nn.Module, mesh) -> None:
    """``fully_shard`` every block of the module's layer lists (the transformer layers), then the module itself
    (the embeddings, norms and head): a block's parameters are whole only while it runs."""
    blocks = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and not any(_within(child, block) for block in blocks):
            blocks += [block for block in child if any(True for _ in block.parameters())]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh)


def _within(module: nn.Module, block: nn.Module) -> bool:
    return any(inner is module for inner in block.modules())


def _like(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class and settings over ``params`` (the settings its constructor takes)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return type(optimizer)(params, **{name: value for name, value in optimizer.defaults.items() if name in accepted})


class ShardedRun:
    """One run's sharded copy of ``model``: the copy shares the model's tensors until ``fully_shard`` has taken
    each worker's rows of them; then the model's trainable parameters are released (emptied), so that no worker
    holds a whole copy during the run. :meth:`write_back` gathers them back."""

    def __init__(self, model: nn.Module, mesh):
        shared = {id(param): nn.Parameter(param.data, requires_grad=param.requires_grad) for param in model.parameters()}
        self.module = copy.deepcopy(model, memo=shared)
        del shared
        shard_module(self.module, mesh)
        for param in model.parameters():
            if param.requires_grad:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def write_back(self, model: nn.Module) -> None:
        """Every worker: each trainable parameter of ``model`` becomes its whole trained value (an all-gather of
        the shards, in the same order on every worker)."""
        targets = dict(model.named_parameters())
        for name, sharded in self.module.named_parameters():
            if targets[name].requires_grad:
                targets[name].data = sharded.full_tensor().detach()


class ShardedClipper(PerExampleClipper):
    """The engine's clipper over a sharded module, in step with the other workers: a part with a record whose
    loss or gradient norm is not finite, on any worker, is computed again on every worker, and a worker left
    without records for such a part runs a placeholder pass instead (its result dropped)."""

    def __init__(self, module: nn.Module, group: ShardedWorkerGroup, clip_norm: float, loss_fn, autocast_dtype=None):
        super().__init__(module, clip_norm, loss_fn, autocast_dtype=autocast_dtype)
        self.group = group
        self._placeholder = False

    def all_usable(self, usable: torch.Tensor) -> bool:
        """Whether every worker's part is usable (an all-reduce: all take the same path); a placeholder pass
        counts as usable, its result being dropped."""
        flag = torch.tensor([1 if self._placeholder else int(bool(usable.all()))], device=self.group.device)
        self.group.collective(dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def zero_grads(self) -> dict[str, torch.Tensor]:
        """Full-size zeros (the parameters are sharded DTensors; these are reduce-scattered like any clipped sum)."""
        return {name: torch.zeros(p.shape, dtype=p.dtype, device=p.device) for name, p in self.params.items()}

    def _sum_of_usable(self, batch, usable: torch.Tensor, norms: torch.Tensor) -> ClippedSum:
        if bool(usable.any()):
            return super()._sum_of_usable(batch, usable, norms)
        self.placeholder_pass(batch)  # the others compute their usable records: the same collectives here
        return ClippedSum(self.zero_grads(), norms, 0.0, batch_size_of(batch))

    def placeholder_pass(self, template) -> None:
        """A forward and backward pass of one data-free record shaped like ``template``'s (token 0, attention on
        every position, label 0), which runs the collectives of a pass and whose result is dropped."""
        record = {key: (torch.ones if key == "attention_mask" else torch.zeros)((1, *value.shape[1:]), dtype=value.dtype,
                                                                               device=value.device)
                  for key, value in template.items()}  # fmt: skip
        self._placeholder = True
        try:
            self._same_padding_sum(record)
        finally:
            self._placeholder = False


class ShardedDPSGDStep(DPSGDStep):
    """:class:`DPSGDStep` on a sharded module (module docstring): the released update is a DTensor sharded like
    the parameters; ``step`` is the engine's, the optimizer stepping on the shards."""

    def __init__(self, group: ShardedWorkerGroup, **settings):
        super().__init__(**settings)
        self.group = group
        self._template = None  # a batch's keys and shapes, for placeholder passes

    def noisy_gradient(self, batch):
        """This worker's shard of (sum of every worker's clipped sums + N(0, sigma^2 C^2 I)) / B, as DTensors, and
        the step's statistics summed over the workers (the per-example norms stay this worker's)."""
        parts = own_padding_parts(batch, self.physical_batch_size) if batch_size_of(batch) else []
        if batch:
            self._template = {key: value[:0] for key, value in batch.items()}
        passes = self.group.most(len(parts))
        if passes > len(parts) and self._template is None:
            raise InvalidInputError("a sharded step with no batch keys on this worker cannot run the others' passes")
        params = self.clipper.params
        shards = {name: torch.zeros_like(param.to_local()) for name, param in params.items()}
        rows, norms, loss_sum = [], [], 0.0
        for index in range(passes):
            if index < len(parts):
                part_rows, part = parts[index]
                clipped = self.clipper.clipped_grad_sum(part)
                rows.append(part_rows)
                norms.append(clipped.per_example_norms)
                loss_sum += clipped.loss_sum
                self.group.reduce_scatter_add_(shards, clipped.each(), params)
                del clipped
            else:
                self.clipper.placeholder_pass(self._template)
                self.group.reduce_scatter_add_(shards, None, params)
        add_gaussian_noise_(shards, self.noise_multiplier * self.clip_norm, self.noise_source)  # each its own coordinates
        for shard in shards.values():
            shard.div_(self.expected_batch_size)
        released = {name: DTensor.from_local(shards[name], param.device_mesh, param.placements, shape=param.shape,
                                             stride=param.stride()) for name, param in params.items()}  # fmt: skip
        norms = in_batch_order(rows, norms) if norms else torch.zeros(0)
        totals = torch.tensor([batch_size_of(batch), loss_sum, int((norms > self.clip_norm).sum())], dtype=torch.float64,
                              device=self.group.device)  # fmt: skip
        self.group.sum_([totals])
        examples, loss_sum, clipped_count = totals.tolist()
        stats = StepStats(int(examples), len(parts), loss_sum, int(clipped_count), norms)
        return released, stats

    def step(self, batch):
        """The engine's step; when it fails on rank 0 because a worker ended (gloo reports a peer gone inside FSDP2's
        own all-gathers as a plain RuntimeError), a :class:`WorkerFailed` naming the worker and how it ended, as
        the group's own collective operations do; any other error as it is."""
        try:
            return super().step(batch)
        except RuntimeError:
            followers = self.group.followers
            reason = followers.exit_reason(wait_s=5.0) if followers is not None else None
            if reason is None:
                raise
            raise WorkerFailed(reason) from None


def map_large_buffers() -> bool:
    """Have glibc's malloc serve every allocation of 1 MiB or more with its own mmap, returned to the system when
    freed (mallopt(3), M_MMAP_THRESHOLD; setting it turns the dynamic threshold off). By default glibc raises the
    threshold to the largest block freed (up to 32 MiB), after which FSDP2's per-block all-gather buffers, freed and
    allocated again at every block, come from the heap and stay resident: measured on a random-init BERT-base,
    2 gloo workers, 4 records x 32 tokens a step, a worker's peak RSS over two steps was 2241 MiB by default and
    1510 MiB with this (1782 MiB replicated). Whether it was set (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


class ShardedWorkerGroup(WorkerGroup):
    """A :class:`WorkerGroup` whose runs shard the model with FSDP2 (module docstring); on the CPU with glibc,
    large buffers are mapped apart (:func:`map_large_buffers`)."""

    sharding = "fsdp"

    def __init__(self, rank: int, world_size: int, device: torch.device, followers=None):
        super().__init__(rank, world_size, device, followers)
        if self.device.type == "cpu":
            map_large_buffers()
        self.mesh = None
        self.run: ShardedRun | None = None

    @classmethod
    def of(cls, group: WorkerGroup) -> ShardedWorkerGroup:
        return cls(group.rank, group.world_size, group.device, group.followers)

    def engine(self, noise_source, model, clipper, optimizer, **settings) -> ShardedDPSGDStep:
        """This worker's engine over a sharded copy of ``model`` (:class:`ShardedRun`), with a clipper and an
        optimizer like ``clipper`` and ``optimizer`` over the shards; the noise of its own shard from
        ``noise_source`` (each worker's own secure source)."""
        if self.run is not None:
            raise WorkerFailed("an earlier sharded run failed and left the model's parameters released: start the training again")
        if self.mesh is None:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.run_peak_known = start_run_peak()
        clipper.close()  # the whole model does not run during a sharded run: its copy does
        self.run = ShardedRun(model, self.mesh)
        sharded = self.run.module
        trainable = [param for param in sharded.parameters() if param.requires_grad]
        sharded_clipper = ShardedClipper(sharded, self, clipper.clip_norm, clipper.loss_fn, clipper.autocast_dtype)
        return ShardedDPSGDStep(self, model=sharded, clipper=sharded_clipper, optimizer=_like(optimizer, trainable),
                                noise_source=noise_source, **settings)  # fmt: skip

    def check_in_sync(self, module) -> None:
        """The run's shards gathered back into ``module``'s trainable parameters on every worker
        (:meth:`ShardedRun.write_back`), then checked equal on every worker (:meth:`WorkerGroup.check_in_sync`). The
        group then lets the run go (its shards and optimizer state live on in its engine alone); a run that failed
        is never written back, and the group refuses another."""
        if self.run is not None:
            self.run.write_back(module)
            self.run = None
        super().check_in_sync(module)

    def most(self, count: int) -> int:
        """The largest ``count`` of any worker (an all-reduce)."""
        value = torch.tensor([count], dtype=torch.int64, device=self.device)
        self.collective(dist.all_reduce, value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def reduce_scatter_add_(self, shards: dict, sums, params: dict) -> None:
        """Add to each shard this worker's rows of the sum over the workers of ``sums``: every worker's full-size
        clipped sums as (name, sum) in the parameters' order, formed one at a time and dropped once copied
        (:meth:`ewtune.agent.dpsgd.engine.ClippedSum.each`); None: this worker adds zeros. Reduce-scattered in buckets
        of whole parameters."""
        given = None if sums is None else iter(sums)
        names, size = [], 0
        for name, param in params.items():
            if names and size + param.numel() > BUCKET_ELEMENTS:
                self._reduce_scatter_bucket(names, shards, given, params)
                names, size = [], 0
            names.append(name)
            size += param.numel()
        if names:
            self._reduce_scatter_bucket(names, shards, given, params)

    def _reduce_scatter_bucket(self, names, shards, given, params) -> None:
        """One reduce-scatter: row block r of every parameter (``torch.chunk``'s, as FSDP2 shards, zero-padded to
        equal blocks) goes to worker r."""
        rows = [math.ceil(params[name].shape[0] / self.world_size) for name in names]
        widths = [row * math.prod(params[name].shape[1:]) for name, row in zip(names, rows)]
        stacked = torch.zeros(self.world_size, sum(widths), dtype=torch.float32, device=shards[names[0]].device)
        offset = 0
        for name, row, width in zip(names, rows, widths):
            if given is not None:
                summed, full = next(given)
                if summed != name:
                    raise WorkerFailed(f"the clipped sums came in another order than the parameters: {summed!r} for {name!r}")
                blocks = stacked[:, offset : offset + width].view(self.world_size, row, -1)
                for rank, block in enumerate(full.reshape(params[name].shape[0], -1).split(row)):
                    blocks[rank, : block.shape[0]] = block
                del full
            offset += width
        mine = torch.empty(sum(widths), dtype=stacked.dtype, device=stacked.device)
        self.collective(dist.reduce_scatter_single, mine, stacked.reshape(-1))
        del stacked
        offset = 0
        for name, width in zip(names, widths):
            shard = shards[name]
            shard.add_(mine[offset : offset + shard.numel()].view_as(shard).to(shard.dtype))
            offset += width
