"""Before the first round: which nodes connected, which holders they are, and their entries in the coordinator's
ledger. A node is kept only when the SuperLink's record of its SuperNode key is in the holder registry and the
holder id and ledger key it claims are the ones registered with that key (:mod:`ewtune.coordinator.registry`);
every node or holder left out is named with the reason (status.json's ``skipped``)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.serverapp import Grid

from ewtune.accountant.entries import registered_keys
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_payloads import Policy
from ewtune.accountant.signing import SigningKey
from ewtune.coordinator.config import FederationConfig
from ewtune.coordinator.exchange import exchange
from ewtune.coordinator.planner import HolderPlan
from ewtune.coordinator.registry import Registry
from ewtune.coordinator.round_messages import description_of, query_message
from ewtune.coordinator.run_log import log, reason
from ewtune.federation.contract import HolderDescription

NODE_POLL_SECONDS = 0.5


def wait_for_nodes(grid: Grid, config: FederationConfig) -> dict[int, bytes]:
    """The connected nodes, each with the SuperNode public key the SuperLink authenticated it with
    (``NodeInfo.public_key``: the key registered with ``flwr supernode register``), once the expected number
    connected or the wait ran out."""
    deadline = time.monotonic() + config.timeouts.nodes
    while True:
        nodes = {
            int(node.node_id): bytes(getattr(node, "public_key", b"") or b"")
            for node in grid.get_nodes()
            if getattr(node, "status", "online") in ("online", "")
        }
        if len(nodes) >= config.expected_holders or time.monotonic() >= deadline:
            log(f"{len(nodes)} node(s) connected ({config.expected_holders} expected)")
            return dict(sorted(nodes.items()))
        time.sleep(NODE_POLL_SECONDS)


def describe(grid: Grid, config: FederationConfig, registry: Registry, nodes: Mapping[int, bytes],
             skipped: dict[str, str]) -> list[HolderDescription]:
    """The descriptions of the registered holders among ``nodes``; each node left out goes to ``skipped``."""
    timeouts = config.timeouts
    messages = {node: query_message(node, timeouts.query) for node in nodes}
    replies = exchange(grid, list(messages.values()), timeouts.query, timeouts.poll_interval)
    descriptions = []
    for node, message in messages.items():
        try:
            description = description_of(node, replies.get(message.metadata.message_id))
            registry.check_node(node, nodes[node], description.holder_id, description.public_key)
        except Exception as failure:  # noqa: BLE001 - a node's bad description leaves out that node only
            skipped[f"node-{node}"] = reason(failure)
            log(f"node {node} left out: {reason(failure)}")
            continue
        descriptions.append(description)
    return descriptions


def registered_but_silent(registry: Registry, descriptions: list[HolderDescription], skipped: dict[str, str]) -> list[str]:
    """The registered holders that no connected node described: named, so an operator knows whom to call."""
    answered = {description.holder_id for description in descriptions}
    missing = sorted(card.holder_id for card in registry.holders if card.holder_id not in answered)
    for holder_id in missing:
        why = f"registered, but no node of {holder_id} connected and described itself in time"
        skipped.setdefault(holder_id, why)
        log(f"holder {holder_id} left out: {why}")
    return missing


def open_ledger(config: FederationConfig) -> Ledger:
    """The coordinator's ledger, created (with the federation's target as its policy) on the first run."""
    key = SigningKey.load(config.signing_key)
    path = config.ledger
    if path.exists():
        return Ledger.open(path, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Ledger.create(path, key, config.coordinator_id, Policy(config.settings.target_epsilon, config.settings.delta))


def register(ledger: Ledger, plans: Mapping[str, HolderPlan]) -> list[str]:
    """A holder entry per planned holder (once per ledger); the holders whose ledger key differs from the one
    registered earlier, which the run drops: their receipts could not be tied to their past entries."""
    registered = registered_keys(ledger.entries)
    rekeyed = []
    for holder_id, plan in plans.items():
        description = plan.holder
        if holder_id not in registered:
            ledger.register_holder(holder_id, description.public_key, description.budget_epsilon, description.budget_delta)
        elif registered[holder_id] != description.public_key:
            rekeyed.append(holder_id)
    return rekeyed
