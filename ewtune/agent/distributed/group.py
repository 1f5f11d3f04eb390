"""What each worker of a holder's training does together with the others (torch.distributed collectives), and the
single-process stand-in the trainer uses when it runs alone.

A step of N workers computes what one process computes (Abadi et al. 2016, Algorithm 1):

    released = (sum_k S_k + Z) / (q N_records),   S_k = sum over worker k's sampled records of clip_C(g_i),
                                                   Z ~ N(0, sigma^2 C^2 I) drawn once, by rank 0

Each worker's :class:`DistributedDPSGDStep` forms (S_k + [k = 0] Z) / (q N_records) with the engine's own code
(:class:`ewtune.agent.dpsgd.step.DPSGDStep`; ranks other than 0 get :class:`NoNoise`, which draws nothing), and the
all-reduce (sum) of those gives every worker the released update; no worker ever holds sum_k S_k without Z. In
exact arithmetic this is the single process's update; in floating point the additions happen in another order
(a few float32 ulps). Every worker then takes the same optimizer step on the same update, so the parameters stay
equal; :meth:`WorkerGroup.check_in_sync` verifies it (a SHA-256 of the trainable parameters) after every phase.

Before every step rank 0 broadcasts whether the step runs (:meth:`WorkerGroup.stop_signal`) and, once the broadcast
has gone out, counts the step as begun (:func:`ewtune.agent.dpsgd_run.run_steps`): a worker begins no step that rank 0,
which charges the run, has not counted, and a broadcast that fails (a worker gone) begins nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
import torch.distributed as dist

from ewtune.accountant.errors import EwtuneError
from ewtune.agent.distributed.memory import start_run_peak, worker_memory
from ewtune.agent.dpsgd.step import DPSGDStep
from ewtune.agent.sampler import PoissonSampler

# Tensors are summed or broadcast in buckets of at most this many elements (16 MiB of float32), copied into one
# flat buffer each: few collective calls, and a bounded extra buffer (DDP buckets its gradients the same way).
BUCKET_ELEMENTS = 1 << 22


class WorkerFailed(EwtuneError):
    """A worker of the group ended, or a collective operation between the workers failed."""


class NoNoise:
    """The noise source of the ranks other than 0: zeros, drawing no randomness (rank 0 draws the step's noise)."""

    name = "no noise on this rank (rank 0 draws it)"
    secure = True

    def uniform_bits(self, count: int) -> torch.Tensor:
        raise RuntimeError("NoNoise is a noise source; a worker samples its shard with its own secure source")

    def standard_normal(self, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(count, device=device)


class SingleProcess:
    """The trainer alone: the plain engine and sampler, no collective operation."""

    rank = 0
    world_size = 1
    is_leader = True
    run_peak_known = False  # whether the run's own RSS peak could be reset when its engine was built

    def sampler(self, num_examples: int, sampling_rate: float, steps: int, source) -> PoissonSampler:
        return PoissonSampler(num_examples, sampling_rate, steps, source)

    def engine(self, **settings) -> DPSGDStep:
        self.run_peak_known = start_run_peak()
        return DPSGDStep(**settings)

    def stop_signal(self, should_stop):
        return should_stop

    def announce(self, plan, features_current: bool) -> None:
        """Nothing to tell: no other worker."""

    def sync_parameters(self, module) -> None:
        """Nothing to copy: no other worker."""

    def barrier(self) -> None:
        """Nothing to wait for: no other worker."""

    def check_in_sync(self, module) -> None:
        """Nothing to compare: no other worker."""

    def close(self, finished: bool = True) -> None:
        """Nothing to stop: no other worker."""

    def memory_report(self, engine) -> list[dict]:
        """This process's memory figures for the run of ``engine`` (:func:`ewtune.agent.distributed.memory.worker_memory`)."""
        return [worker_memory(0, engine, self.run_peak_known)]


SINGLE_PROCESS = SingleProcess()


class DistributedDPSGDStep(DPSGDStep):
    """:class:`DPSGDStep` whose update is summed over the workers (module docstring); ``step`` is the engine's."""

    def __init__(self, group: WorkerGroup, **settings):
        super().__init__(**settings)
        self.group = group

    def noisy_gradient(self, batch):
        """The released update, the same on every worker, and the step's statistics with the realised batch size,
        the loss sum and the clipped count summed over the workers (the per-example norms stay this worker's)."""
        grads, stats = super().noisy_gradient(batch)
        self.group.sum_(list(grads.values()))
        totals = torch.tensor([stats.examples, stats.loss_sum, stats.clipped], dtype=torch.float64, device=self.group.device)
        self.group.sum_([totals])
        examples, loss_sum, clipped = totals.tolist()
        return grads, replace(stats, examples=int(examples), loss_sum=loss_sum, clipped=int(clipped))


class WorkerGroup:
    """This process's place among the ``world_size`` workers of a holder's training (torch.distributed, already
    initialised). ``followers`` (rank 0 only, :class:`ewtune.agent.distributed.launch.Followers`): the processes it
    started, asked why a collective operation failed."""

    def __init__(self, rank: int, world_size: int, device: torch.device, followers=None):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)  # where collective operations' tensors live (the CPU for gloo)
        self.followers = followers
        self.run_peak_known = False  # whether the run's own RSS peak could be reset when its engine was built

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def sampler(self, num_examples: int, sampling_rate: float, steps: int, source) -> PoissonSampler:
        """This worker's Poisson sampler over its shard of the records (:mod:`ewtune.agent.sampler`)."""
        return PoissonSampler(num_examples, sampling_rate, steps, source, shard=(self.rank, self.world_size))

    def engine(self, noise_source, **settings) -> DistributedDPSGDStep:
        """The engine of this worker: the noise from ``noise_source`` on rank 0, none elsewhere."""
        self.run_peak_known = start_run_peak()
        return DistributedDPSGDStep(self, noise_source=noise_source if self.is_leader else NoNoise(), **settings)

    def stop_signal(self, should_stop):
        """The check before each step: rank 0 asks ``should_stop`` and broadcasts the answer, which every worker
        returns, so that all begin the step or none does."""

        def stopping() -> bool:
            flag = torch.tensor([int(self.is_leader and should_stop is not None and bool(should_stop()))], device=self.device)
            self.collective(dist.broadcast, flag, src=0)
            return bool(flag.item())

        return stopping

    def announce(self, plan, features_current: bool) -> None:
        """Rank 0 tells the other workers to train ``plan`` (they wait for it in :meth:`receive`), and whether its
        cached embeddings are still those of the current encoder (:meth:`ewtune.agent.training.LocalTrainer.follow`)."""
        if self.is_leader:
            self.send(("train", plan, features_current))

    def send(self, message) -> None:
        """Rank 0 sends a picklable ``message`` to every other worker."""
        self.collective(dist.broadcast_object_list, [message], src=0, device=self.device)

    def receive(self):
        """The next message of rank 0 (:meth:`send`)."""
        box = [None]
        self.collective(dist.broadcast_object_list, box, src=0, device=self.device)
        return box[0]

    def sync_parameters(self, module) -> None:
        """Every worker takes rank 0's trainable parameters (as DDP does at its start)."""
        with torch.no_grad():
            self._in_buckets([p for p in module.parameters() if p.requires_grad], lambda flat: dist.broadcast(flat, src=0))

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its sum over the workers (all-reduce), in place."""
        self._in_buckets(tensors, dist.all_reduce)

    def barrier(self) -> None:
        """Return once every worker has got here (a one-element all-reduce)."""
        self.sum_([torch.zeros(1, device=self.device)])

    def check_in_sync(self, module) -> None:
        """Raise :class:`WorkerFailed` unless every worker holds the same trainable parameters, bit for bit."""
        digest = hashlib.sha256()
        for param in module.parameters():
            if param.requires_grad:
                digest.update(param.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        digests = [None] * self.world_size
        self.collective(dist.all_gather_object, digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise WorkerFailed(f"the {self.world_size} workers' trainable parameters differ after the phase")

    def memory_report(self, engine) -> list[dict]:
        """Every worker's memory figures for the run of ``engine``, by rank (an all-gather; every worker calls it)."""
        reports = [None] * self.world_size
        self.collective(dist.all_gather_object, reports, worker_memory(self.rank, engine, self.run_peak_known))
        return reports

    def close(self, finished: bool = True) -> None:
        """Rank 0: when ``finished`` (the others wait for a message), tell the other workers to end and wait for
        them; otherwise (they may be inside a step) kill them. Then leave the group."""
        try:
            if self.followers is not None:
                if finished:
                    self.send(("finish",))
                self.followers.stop(grace_s=10.0 if finished else 0.0)
        except WorkerFailed:
            self.followers.stop(grace_s=0.0)
        finally:
            dist.destroy_process_group()

    def _in_buckets(self, tensors: list[torch.Tensor], operation) -> None:
        for bucket in _buckets(tensors):
            if len(bucket) == 1 and bucket[0].is_contiguous():
                self.collective(operation, bucket[0])
                continue
            flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
            self.collective(operation, flat)
            offset = 0
            for tensor in bucket:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def collective(self, operation, *args, **kwargs):
        """``operation(*args, **kwargs)``, a collective operation of the workers; its failure (a worker gone) a
        :class:`WorkerFailed` naming why."""
        try:
            return operation(*args, **kwargs)
        except RuntimeError as error:  # gloo and NCCL report a worker gone as a RuntimeError (DistBackendError)
            raise self._failure(error) from None

    def _failure(self, error: RuntimeError) -> WorkerFailed:
        reason = self.followers.exit_reason(wait_s=5.0) if self.followers is not None else None
        if reason is None:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = f"a collective operation of the {self.world_size} workers failed on rank {self.rank}: {first_line}"
        return WorkerFailed(reason)


def _buckets(tensors: list[torch.Tensor]):
    """Consecutive tensors of one dtype and device, up to :data:`BUCKET_ELEMENTS` elements a bucket."""
    bucket, size = [], 0
    for tensor in tensors:
        if bucket and (tensor.dtype != bucket[0].dtype or tensor.device != bucket[0].device
                       or size + tensor.numel() > BUCKET_ELEMENTS):  # fmt: skip
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket
