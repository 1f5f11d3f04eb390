"""Poisson subsampling, the sampling scheme the DP-SGD accountants analyse (Abadi et al. 2016; Zhu & Wang
2019): at every step each example joins the batch independently with probability q, so batch sizes follow
Binomial(N, q) and a batch may be empty. Shuffled fixed-size batches accounted as Poisson understate epsilon
(Chua et al., ICML 2024), so this is the only sampler the trainer uses.

The rate executed is known to the bit: an example joins when its 53-bit uniform draw is below
T = ceil(q 2^53), which happens with probability exactly ``executed_rate`` = T / 2^53 >= q
(:mod:`ewtune.accountant.sampling`). That rate, never the one requested, is what the trainer accounts. The draws
come from the operating system's secure source unless a test passes its own seeded source, so nobody can
predict who was sampled.

A holder's training spread over several worker processes (:mod:`ewtune.agent.distributed`) gives each worker a
disjoint shard of the records, ``rank, rank + world_size, rank + 2 world_size, ...``, which it samples with its own
source: the shards cover every record once, so each record still joins each step's batch exactly once, with
probability ``executed_rate``, independently of every other record, and the union of the workers' batches is a
Poisson sample of the whole data set.
"""

from __future__ import annotations

import torch

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.sampling import executable_sampling_rate, sampling_threshold
from ewtune.agent.dpsgd.randomness import RandomSource, SecureRandom


class PoissonSampler:
    """Iterates ``steps`` index tensors (int64, sorted, possibly empty) over ``num_examples`` examples, or over
    the shard ``rank`` of ``world_size`` (``shard = (rank, world_size)``; see the module docstring)."""

    def __init__(self, num_examples: int, sampling_rate: float, steps: int, source: RandomSource | None = None,
                 shard: tuple[int, int] = (0, 1)):
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise InvalidInputError(f"num_examples must be an integer >= 1, got {num_examples!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InvalidInputError(f"steps must be an integer >= 0, got {steps!r}")
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise InvalidInputError(f"shard rank must be in [0, world size {world_size}), got {rank!r}")
        self.num_examples = num_examples
        self.threshold = sampling_threshold(sampling_rate)
        self.executed_rate = executable_sampling_rate(sampling_rate)
        self.steps = steps
        self.source = source or SecureRandom()
        self.members = torch.arange(rank, num_examples, world_size, dtype=torch.int64)  # the records this worker samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            joins = self.source.uniform_bits(len(self.members)) < self.threshold
            yield self.members[joins]
