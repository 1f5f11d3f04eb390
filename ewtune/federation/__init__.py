"""The contract between a data holder and the coordinator: what they exchange over Flower.

- :mod:`ewtune.federation.contract`: the typed messages (round plan, holder description, train reply,
  evaluation request and reply, reveal request), each with the one encoder and decoder both sides use, and the
  SuperNode's node config keys;
- :mod:`ewtune.federation.messages`: the records of query, train and evaluate messages and their replies, how
  weights ride in them, the error codes of a refusal;
- :mod:`ewtune.federation.packing`: the named trainable weights as one buffer and a layout, and the dtypes
  weights may travel in;
- :mod:`ewtune.federation.cards`: the holder card (holder id, SuperNode key, ledger key) a holder hands the
  coordinator;
- :mod:`ewtune.federation.apps`: the Flower app bundle and its entry points, ``ewtune.coordinator.server_app:app`` and
  ``ewtune.agent.client_app:app``.
- :mod:`ewtune.federation.processes`: the environment of every Flower process both sides start, and stopping one
  with its process group.
- :mod:`ewtune.federation.progress`: the progress reporter of the holder's and the coordinator's commands (a live line
  on a terminal, plain lines otherwise, nothing with ``--quiet``, JSON lines with ``--json``).

``ewtune/agent/`` and ``ewtune/coordinator/`` import this package and never each other. It imports numpy, flwr,
cryptography and ``accountant`` only (never torch).
"""
