"""Poisson subsampling, the sampling scheme the DP-SGD accountants analyse (Abadi et al. 2016; Zhu & Wang
2019): at every step each example joins the batch independently with probability q, so batch sizes follow
Binomial(N, q) and a batch may be empty. Shuffled fixed-size batches accounted as Poisson understate epsilon
(Chua et al., ICML 2024), so this is the only sampler the trainer uses."""

from __future__ import annotations

import torch

from accountant.errors import InvalidInputError


class PoissonSampler:
    """Iterates ``steps`` index tensors (int64, sorted, possibly empty) over ``num_examples`` examples."""

    def __init__(self, num_examples: int, sampling_rate: float, steps: int, generator: torch.Generator | None = None):
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise InvalidInputError(f"num_examples must be an integer >= 1, got {num_examples!r}")
        if not 0.0 < sampling_rate <= 1.0:
            raise InvalidInputError(f"sampling rate must be in (0, 1], got {sampling_rate!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InvalidInputError(f"steps must be an integer >= 0, got {steps!r}")
        self.num_examples = num_examples
        self.sampling_rate = float(sampling_rate)
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            joins = torch.rand(self.num_examples, generator=self.generator) < self.sampling_rate
            yield joins.nonzero(as_tuple=True)[0]
