"""Helpers that several test modules share (fixtures, fakes, constants), so that no test module imports another.

- ``support.ledgers``: a holder's ledger built the same way every time, and the forger's tools (rewrite, re-sign,
  anchor the head back) that the tamper, head, cross-check, fuzz and CLI tests share;
- ``support.daemon``: the agent daemon's holder, budget, plan, tiny-BERT trainer and agent.toml;
- ``support.fake_grid``: a Flower Grid of fake holders (honest, forging or silent) for the ServerApp's round logic;
- ``support.training``: ``ewtune agent train-local``'s arguments, a holder ledger for it, and the GPU marker.
- ``support.dpsgd``: a padded token batch and the check of the engine's clipped sum against a per-example loop;
- ``support.distributed``: the launcher whose workers are killed as a chosen step begins.

Real Flower federations have their own helper module, ``tiny_federation``.
"""
