"""A holder's DP-SGD run as N torch.distributed worker processes on one machine (gloo on the CPU, NCCL on GPUs),
with the privacy semantics of one process (Abadi et al. 2016, Algorithm 1, computed data-parallel):

- each worker Poisson-samples its own disjoint shard of the records with its own secure source
  (:class:`ewtune.agent.sampler.PoissonSampler` with ``shard``), so every record joins a step's batch exactly
  once, with probability q;
- each worker computes its shard's clipped per-example gradient sum; rank 0 alone draws the Gaussian noise, from
  the secure source, and adds it to its own sum; the sums are then all-reduced, so every worker holds the same
  noised update, (sum of all clipped gradients + N(0, sigma^2 C^2)) / (q N), and no worker ever holds the
  un-noised total (:mod:`ewtune.agent.distributed.group`);
- before each step rank 0 says whether the step runs (a broadcast), so no worker begins a step that rank 0 has
  not counted; rank 0 counts the steps, writes the ledger and the outputs, and a worker that dies fails the run
  with the steps begun charged, as a failure of one process is (:mod:`ewtune.agent.distributed.launch`).

With ``sharding = "fsdp"`` (:mod:`ewtune.agent.distributed.sharding`) the workers hold 1/N each of the parameters,
gradients and optimizer state (FSDP2); each then noises the coordinates it owns instead of rank 0 noising them all
(:mod:`ewtune.agent.distributed.sharded`).
"""
