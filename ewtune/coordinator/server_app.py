"""The Flower ServerApp (Message API): one federated DP fine-tuning run, recorded in the coordinator's ledger.

Flow of a run:
1. query every connected node for its description (holder id, dataset size, budget left, ledger key); a node
   is kept only when the SuperLink's record of its SuperNode key is in the holder registry and the holder id
   and ledger key it claims are the ones registered with that key (:mod:`ewtune.coordinator.registry`);
2. plan: one schedule, one sigma per holder (:mod:`ewtune.coordinator.planner`); holders that cannot fund it are
   skipped; every planned holder is registered in the ledger with its key and budget;
3. per round: pre-flight every holder's round event against its budget (the run stops cleanly before a round
   that would exceed one), reserve, send train messages, verify each receipt, aggregate the verified updates
   (FedAvg with capped shares), commit each verified holder's executed event (the ledger states the certified
   epsilon so far with the Edgeworth estimate beside it) and abort every other reservation with the reason,
   save a checkpoint. A holder that fails, refuses, does not answer within the round timeout, or whose reply
   is malformed in any way (a hostile or broken holder: any exception while reading its reply) is aborted
   and dropped from later rounds; the round goes on with the others.
4. evaluation of round r's global model rides inside round r+1's train message (same weights, one message
   per holder per round): "evaluate_round" in the plan asks the holder to evaluate the incoming weights
   first, and the reply's "result" carries "evaluation" (metrics) or "evaluation_refused" (the default: a
   holder releases none unless it opts in, and its daemon ties what it releases to the run). The model
   after the last round is evaluated with evaluate messages. A refusal is logged and changes nothing else.

Holders' train replies carry no training time (it would leak the Poisson batch sizes), so the per-round
``slowest_train_seconds`` and ``overhead_seconds`` of the status are None; ``ewtune bench federation``
derives them from the holders' ledgers.

A run with ``[audit]`` in federation.toml is an empirical privacy audit (:mod:`ewtune.coordinator.canary_audit`): its
plans say ``purpose = "audit"`` (only audit daemons train them), each update received is observed on the audit
block before aggregation, and after the last round the coordinator scores the canaries, asks each holder to
reveal its own, and records the lower bounds per holder and pooled in its ledger (an ``audit`` entry).

A federation killed at any point and started again resumes from its last committed round
(:mod:`ewtune.coordinator.recovery`: the run record and the inbox of received updates in ``output_dir``).

Progress and results go to ``output_dir/status.json`` (rewritten atomically after every step), which
``ewtune coordinator status`` and ``ewtune demo`` read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ewtune.accountant.certified import certified_epsilon
from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import total_steps
from ewtune.accountant.ledger import Ledger, Policy
from ewtune.accountant.rdp import RdpAccountant
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.spend import check_within
from ewtune.coordinator.aggregation import capped_fedavg, check_update, check_update_norm, default_update_norm_bound
from ewtune.coordinator.canary_audit import VIEW, Canaries, CanaryObserver, audit_bounds, scores_digest, secure_tie_break
from ewtune.coordinator.checkpoints import checkpoint_path, load_weights, round_checkpoint, save_peft_adapter, save_weights
from ewtune.coordinator.config import FederationConfig, load_federation_config
from ewtune.coordinator.crash_points import reach
from ewtune.coordinator.exchange import exchange
from ewtune.coordinator.planner import FederationPlan, HolderPlan, SkippedHolder, plan_federation
from ewtune.coordinator.receipts_check import check_receipt
from ewtune.coordinator.recovery import (
    Inbox,
    RunRecord,
    check_resumable,
    commit_extra,
    committed_rounds,
    load_run_record,
    reconcile,
    resume_point,
    save_run_record,
    settings_record,
)
from ewtune.coordinator.registry import Registry
from ewtune.federation.apps import RUN_CONFIG_KEY
from ewtune.federation.flower_internals import shorten_serverapp_object_backoff
from ewtune.coordinator.round_messages import (
    EvaluationMissing,
    description_of,
    evaluate_message,
    query_message,
    released_metrics,
    reveal_message,
    revealed_canaries,
    round_plan,
    train_message,
    train_reply_of,
)
from ewtune.federation.contract import EvaluationRequest, HolderDescription, RevealRequest
from ewtune.federation.messages import weight_records

STATUS_FILE = "status.json"
MISSING_REASON_CHARACTERS = 200  # the longest reason for a missing evaluation kept in status.json

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get(RUN_CONFIG_KEY)
    if not path:
        raise InvalidInputError(f"run config lacks {RUN_CONFIG_KEY!r}: submit with `ewtune coordinator run --config federation.toml`")
    config = load_federation_config(str(path))
    if config.timeouts.short_waits:
        shorten_serverapp_object_backoff()
    Federation(grid, config, flower_run_id=context.run_id).run()


@dataclass
class HolderState:
    plan: HolderPlan
    active: bool = True
    reason: str | None = None
    rounds_committed: int = 0
    accuracy: dict[int, float] = field(default_factory=dict)
    evaluation: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluation_missing: dict[int, str] = field(default_factory=dict)  # round -> why no evaluation came back


class Federation:
    def __init__(self, grid: Grid, config: FederationConfig, flower_run_id: int):
        self.grid, self.config = grid, config
        self.run_id = f"{config.name}-{flower_run_id}"
        self.started = time.monotonic()
        self.status: dict[str, Any] = {
            "run_id": self.run_id,
            "flower_run_id": flower_run_id,
            "state": "starting",
            "reason": None,
            "rounds_planned": config.settings.rounds,
            "rounds_completed": 0,
            "ledger": str(config.ledger),
            "holders": {},
            "skipped": {},
            "rounds": [],
            "checkpoints": [],
            "adapter": None,
        }
        self.holders: dict[str, HolderState] = {}
        self.ledger: Ledger | None = None
        self.registry: Registry | None = None
        self.max_update_norm: float | None = None
        self.rdp_accountant = RdpAccountant()  # the status's RDP figures, its curves kept across rounds
        self.record: RunRecord | None = None
        self.inbox = Inbox(config.output_dir)
        self.canaries = CanaryObserver(config.audit.parameter) if config.audit is not None else None
        self.earlier_status = _read_status(config.output_dir)  # before this run rewrites it: a resumed run carries it over

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as failure:
            self.status.update(state="failed", reason=f"{type(failure).__name__}: {failure}")
            _log(f"run failed: {failure}\n{traceback.format_exc()}")
            raise
        finally:
            self._write_status()
            if self.record is not None:
                self.record.state = self.status["state"]  # a failed run stays resumable; finished or stopped closes it
                save_run_record(self.config.output_dir, self.record)
            if self.ledger is not None:
                self.ledger.close()

    def _run(self) -> None:
        config = self.config
        self.registry = Registry.load(config.registry)
        weights = load_weights(config.model.initial_weights)
        if self.canaries is not None and self.canaries.parameter not in weights:
            raise InvalidInputError(f"[audit] parameter {self.canaries.parameter!r} is not in the initial weights")
        self.max_update_norm = config.settings.max_update_norm or default_update_norm_bound(
            config.settings.learning_rate, config.settings.local_steps, sum(int(np.size(array)) for array in weights.values())
        )
        nodes = self._wait_for_nodes()
        descriptions = self._query(nodes)
        missing = self._registered_but_silent(descriptions)
        previous = load_run_record(config.output_dir)
        if previous is not None and previous.resumable:
            check_resumable(previous, config.name, config.settings)
            self.record = previous
            plan = self._resumed_plan(previous, descriptions)
        else:
            try:
                plan = plan_federation(config.settings, descriptions)
            except InvalidInputError as failure:
                if not missing:
                    raise
                raise InvalidInputError(f"{failure}; registered holders that did not answer: {', '.join(missing)}") from None
            self.record = RunRecord(config.name, settings_record(config.settings), list(plan.holders))
        self.record.segments.append(self.run_id)
        self.record.state = "running"
        save_run_record(config.output_dir, self.record)
        self._record_plan(plan)
        self.ledger = self._open_ledger()
        self._register(plan)
        first_round = 1
        if len(self.record.segments) > 1:
            first_round, weights = self._resume(weights)
        evaluate_each = config.model.evaluate == "every_round"
        for round in range(first_round, config.settings.rounds + 1):
            stop = self._reason_to_stop_before(round)
            if stop:
                self.status["reason"] = stop
                _log(f"stopping before round {round}: {stop}")
                break
            weights = self._round(round, weights, evaluate_previous=evaluate_each)
            self.status["rounds_completed"] = round
            self._write_status()
        completed = self.status["rounds_completed"]
        if config.model.evaluate != "never" and self._active():
            self._evaluate(completed, weights)
        if self.canaries is not None:
            self._audit()
        self._finish(weights)

    def _wait_for_nodes(self) -> dict[int, bytes]:
        """The connected nodes, each with the SuperNode public key the SuperLink authenticated it with
        (``NodeInfo.public_key``: the key registered with ``flwr supernode register``)."""
        deadline = time.monotonic() + self.config.timeouts.nodes
        while True:
            nodes = {
                int(node.node_id): bytes(getattr(node, "public_key", b"") or b"")
                for node in self.grid.get_nodes()
                if getattr(node, "status", "online") in ("online", "")
            }
            if len(nodes) >= self.config.expected_holders or time.monotonic() >= deadline:
                _log(f"{len(nodes)} node(s) connected ({self.config.expected_holders} expected)")
                return dict(sorted(nodes.items()))
            time.sleep(0.5)

    def _query(self, nodes: dict[int, bytes]) -> list[HolderDescription]:
        self.status["state"] = "querying"
        self._write_status()
        messages = {node: query_message(node, self.config.timeouts.query) for node in nodes}
        replies = exchange(self.grid, list(messages.values()), self.config.timeouts.query, self.config.timeouts.poll_interval)
        descriptions = []
        for node, message in messages.items():
            try:
                description = description_of(node, replies.get(message.metadata.message_id))
                self.registry.check_node(node, nodes[node], description.holder_id, description.public_key)
            except Exception as failure:  # noqa: BLE001 - a node's bad description leaves out that node only
                reason = _reason(failure)
                self.status["skipped"][f"node-{node}"] = reason
                _log(f"node {node} left out: {reason}")
                continue
            descriptions.append(description)
        return descriptions

    def _registered_but_silent(self, descriptions: list[HolderDescription]) -> list[str]:
        """The registered holders that no connected node described: named, so an operator knows whom to call."""
        answered = {description.holder_id for description in descriptions}
        missing = sorted(card.holder_id for card in self.registry.holders if card.holder_id not in answered)
        for holder_id in missing:
            reason = f"registered, but no node of {holder_id} connected and described itself in time"
            self.status["skipped"].setdefault(holder_id, reason)
            _log(f"holder {holder_id} left out: {reason}")
        return missing

    def _record_plan(self, plan: FederationPlan) -> None:
        settings = plan.settings
        self.status["plan"] = {
            "rounds": settings.rounds,
            "local_steps": settings.local_steps,
            "expected_batch_size": settings.expected_batch_size,
            "clip_norm": settings.clip_norm,
            "learning_rate": settings.learning_rate,
            "target_epsilon": settings.target_epsilon,
            "delta": settings.delta,
            "max_weight_share": settings.max_weight_share,
            "max_update_norm": self.max_update_norm,
        }
        for skipped in plan.skipped:
            self.status["skipped"][skipped.holder.holder_id] = skipped.reason
            _log(f"holder {skipped.holder.holder_id} skipped: {skipped.reason}")
        for holder_plan in plan.holders:
            self.holders[holder_plan.holder_id] = HolderState(holder_plan)
            _log(
                f"holder {holder_plan.holder_id}: N_noisy={holder_plan.holder.dataset_size}, q={holder_plan.sampling_rate:.4g}, "
                f"sigma={holder_plan.noise_multiplier:.4f}, planned certified epsilon {holder_plan.epsilon_certified:.3f} "
                f"(Edgeworth estimate {_number(holder_plan.epsilon_edgeworth)}) at delta {holder_plan.delta:g}"
            )
            if holder_plan.warning:
                _log(f"WARNING: {holder_plan.warning}")

    def _open_ledger(self) -> Ledger:
        key = SigningKey.load(self.config.signing_key)
        path = self.config.ledger
        if path.exists():
            return Ledger.open(path, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        policy = Policy(self.config.settings.target_epsilon, self.config.settings.delta)
        return Ledger.create(path, key, self.config.coordinator_id, policy)

    def _register(self, plan: FederationPlan) -> None:
        """A holder entry per planned holder (once per ledger); a holder whose key differs from the one
        registered earlier is dropped: its receipts could not be tied to its past entries."""
        registered = {
            entry["payload"]["holder"]: entry["payload"]["public_key"]
            for entry in self.ledger.entries
            if entry["kind"] == "holder"
        }
        for holder_id, state in self.holders.items():
            description = state.plan.holder
            if holder_id not in registered:
                self.ledger.register_holder(holder_id, description.public_key, description.budget_epsilon, description.budget_delta)
            elif registered[holder_id] != description.public_key:
                self._drop(holder_id, "its ledger key differs from the one registered in the coordinator ledger")
        self.status["state"] = "running"
        self._write_status()

    # -- one round -----------------------------------------------------------------------------------------

    def _reason_to_stop_before(self, round: int) -> str | None:
        deadline = self.config.timeouts.run_deadline
        if deadline > 0 and time.monotonic() - self.started >= deadline:
            return f"the run deadline ({deadline:g} s) has passed"
        if len(self._active()) < self.config.settings.min_holders:
            return f"{len(self._active())} active holder(s) left, {self.config.settings.min_holders} needed"
        for holder_id, state in self._active().items():
            spend = self.ledger.spend_with(holder_id, state.plan.round_event(self.config.settings.local_steps))
            if not spend.within_budget:
                return (
                    f"holder {holder_id}'s round {round} would bring its certified epsilon to "
                    f"{spend.epsilon_certified:.4g} > budget {spend.budget_epsilon:g}"
                )
        return None

    def _round(self, round: int, weights: dict[str, np.ndarray], evaluate_previous: bool) -> dict[str, np.ndarray]:
        settings, timeouts = self.config.settings, self.config.timeouts
        started = time.monotonic()
        active = self._active()
        reservations = {
            holder_id: self.ledger.reserve(holder_id, self.run_id, round, state.plan.round_event(settings.local_steps))
            for holder_id, state in active.items()
        }
        reach(f"reserved:{round}")
        arrays = weight_records(weights, self.config.model.pack_weights)
        evaluated_round = round - 1 if evaluate_previous else None
        trains = {
            holder_id: train_message(round_plan(self.run_id, round, state.plan, settings, self.canaries is not None, evaluated_round),
                                     state.plan.holder.node_id, arrays, timeouts.round)
            for holder_id, state in active.items()
        }
        _log(f"round {round}: training on {', '.join(active)}")
        arrivals: dict[str, float] = {}
        try:
            replies = exchange(self.grid, list(trains.values()), timeouts.round, timeouts.poll_interval, arrivals)
        except Exception as failure:  # the SuperLink failed us: nothing of this round was received
            for holder_id, seq in reservations.items():
                self.ledger.abort(seq, f"round {round} not received: {type(failure).__name__}: {failure}"[:500])
            raise
        exchanged = time.monotonic()
        if evaluated_round is not None:
            for holder_id, message in trains.items():
                self._record_evaluation(holder_id, evaluated_round, replies.get(message.metadata.message_id), inside_train=True)
        outcomes: dict[str, dict[str, Any]] = {}
        received = {}
        for holder_id, message in trains.items():
            try:
                received[holder_id] = self._verified_update(round, active[holder_id], replies.get(message.metadata.message_id), weights)
                # Received = kept in the inbox, before any commit: a crash from here on loses no update.
                self.inbox.keep(self.run_id, round, holder_id, received[holder_id][0], received[holder_id][1])
            except Exception as failure:  # noqa: BLE001 - any failure of one holder's reply aborts that holder only
                received.pop(holder_id, None)
                self._abort(holder_id, reservations[holder_id], failure, outcomes)
        committed = []
        for holder_id, (update, receipt_document, receipt, metrics, norm) in received.items():
            state = active[holder_id]
            try:
                # The coordinator commits only what it aggregates (below); a commit states the epsilon so far itself.
                self.ledger.commit(reservations[holder_id], receipt.event, extra=commit_extra(receipt_document, receipt, state.plan.holder.node_id))
            except Exception as failure:  # noqa: BLE001 - a refused commit aborts that holder only
                self._abort(holder_id, reservations[holder_id], failure, outcomes)
                continue
            state.rounds_committed += 1
            committed.append((holder_id, update))
            if self.canaries is not None:  # what this holder released, as received, before aggregation
                self.canaries.observe(holder_id, update, weights, state.plan.sampling_rate, state.plan.holder.dataset_size,
                                      settings.learning_rate, settings.clip_norm)
            outcomes[holder_id] = {"status": "committed", "steps": total_steps(receipt.event), "update_norm": norm, "metrics": metrics}
            reach(f"committed:{round}:{len(committed)}")
        kept = None
        if committed:
            weights, shares, kept = self._aggregate(committed, weights)
            for holder_id, share in shares.items():
                outcomes[holder_id]["weight_share"] = share
        for holder_id, message in trains.items():
            outcomes[holder_id]["reply_seconds"] = arrivals.get(message.metadata.message_id)
        finished = time.monotonic()
        self._record_round(round, started, exchanged, finished, outcomes, evaluate_previous, kept)
        self._write_status()  # the round's record survives a crash while its checkpoint is written
        self._checkpoint(round, weights)
        if not committed:
            raise InvalidInputError(f"round {round}: no holder returned a verified update")
        return weights

    def _abort(self, holder_id: str, reservation: int, failure: BaseException, outcomes: dict) -> None:
        reason = _reason(failure)
        self.ledger.abort(reservation, reason[:500])
        self._drop(holder_id, reason)
        outcomes[holder_id] = {"status": "aborted", "reason": reason}

    def _aggregate(self, committed: list[tuple[str, dict[str, np.ndarray]]], weights: dict[str, np.ndarray]):
        """(the FedAvg of the committed updates with capped shares, holder id -> share, the share the global
        weights keep: > 0 when too few holders replied for their capped shares to sum to 1)."""
        averaged, shares, kept = capped_fedavg(
            [update for _, update in committed], [self.holders[h].plan.holder.dataset_size for h, _ in committed],
            weights, self.config.settings.max_weight_share,
        )
        return averaged, {holder_id: share for (holder_id, _), share in zip(committed, shares)}, kept

    def _checkpoint(self, round: int, weights: dict[str, np.ndarray]) -> None:
        """Save round ``round``'s global model, then forget the round's received updates (the average holds them)."""
        checkpoint = round_checkpoint(self.config.output_dir, round, weights, self.run_id)
        self.status["checkpoints"].append(str(checkpoint))
        reach(f"checkpointed:{round}")
        self.inbox.discard_round(self.record.segments, round)

    # -- a resumed federation --------------------------------------------------------------------------------

    def _resumed_plan(self, record: RunRecord, descriptions: list[HolderDescription]) -> FederationPlan:
        """The recorded plan (the same q and sigma for the whole federation) for the holders that described
        themselves again; fewer than ``min_holders`` of them is a failure, which a later start may resume."""
        described = {description.holder_id: description for description in descriptions}
        plans, skipped = [], []
        for plan in record.plans:
            description = described.get(plan.holder_id)
            if description is None:
                skipped.append(SkippedHolder(plan.holder, "planned, but it did not describe itself after the restart"))
            else:
                plans.append(dataclasses.replace(plan, holder=dataclasses.replace(plan.holder, node_id=description.node_id)))
        if len(plans) < self.config.settings.min_holders:
            raise InvalidInputError(
                f"resuming {', '.join(record.segments)}: {len(plans)} planned holder(s) answered, {self.config.settings.min_holders} needed"
            )
        return FederationPlan(self.config.settings, tuple(plans), tuple(skipped))

    def _resume(self, initial: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Close the earlier runs' open reservations, restore the last checkpoint, rebuild a round whose updates
        were committed but not checkpointed; returns (the next round to train, its incoming weights)."""
        earlier = self.record.segments[:-1]
        outcomes = reconcile(
            self.ledger, earlier, self.inbox,
            public_keys={card.holder_id: card.ledger_public_key for card in self.registry.holders},
            node_ids={holder_id: state.plan.holder.node_id for holder_id, state in self.holders.items()},
        )
        point = resume_point(self.ledger, self.record, self.config.output_dir, self.inbox)
        weights, completed = point.weights if point.weights is not None else initial, point.completed
        self._carry_over_status(earlier, completed)
        if point.interrupted:
            completed += 1
            rebuilding = time.monotonic()
            committed = sorted(point.interrupted.items())
            weights, shares, kept = self._aggregate(committed, weights)
            self._checkpoint(completed, weights)
            self.status["rounds"].append({  # seconds: the rebuild's (its exchange happened before the restart)
                "round": completed, "rebuilt_after_restart": True, "seconds": time.monotonic() - rebuilding,
                "exchange_seconds": None, "slowest_train_seconds": None,
                "overhead_seconds": None, "evaluation_included": False,
                "holders": {holder_id: {"status": "committed", "weight_share": share} for holder_id, share in shares.items()},
                "global_weights_share": kept,
            })
        elif completed:
            self.inbox.discard_round(self.record.segments, completed)
        for holder_id, count in committed_rounds(self.ledger.entries, self.record.segments).items():
            if holder_id in self.holders:
                self.holders[holder_id].rounds_committed = count
        self.status["rounds_completed"] = completed
        self.status["resumed"] = {"from_runs": earlier, "rounds_completed": completed, "reconciled": [o.to_json() for o in outcomes]}
        for outcome in outcomes:
            _log(f"reservation {outcome.reservation} ({outcome.holder_id}, run {outcome.run_id}, round {outcome.round}): {outcome.action}, {outcome.reason}")
        _log(f"resumed {', '.join(earlier)} after {completed} round(s)")
        self._write_status()
        return completed + 1, weights

    def _carry_over_status(self, earlier: list[str], completed: int) -> None:
        """The round records of the status the earlier runs wrote, and the checkpoints, up to round ``completed``."""
        self.status["checkpoints"] = [str(checkpoint_path(self.config.output_dir, r)) for r in range(1, completed + 1)]
        previous = self.earlier_status
        if previous.get("run_id") in earlier:
            self.status["rounds"] = [r for r in previous.get("rounds", []) if isinstance(r, dict) and r.get("round", 0) <= completed]

    def _verified_update(self, round: int, state: HolderState, reply: Message | None, weights: dict[str, np.ndarray]):
        """(update, receipt document, receipt, numeric metrics, update norm) of a train reply, or an exception
        saying what is wrong with it (the caller aborts the holder whatever the exception)."""
        train, update = train_reply_of(reply, self.config.timeouts.round)
        document = train.receipt
        planned = state.plan.round_event(self.config.settings.local_steps)
        receipt = check_receipt(
            document,
            update,
            public_key=self.registry.holder(state.plan.holder_id).ledger_public_key,  # the pinned key
            run_id=self.run_id,
            round=round,
            holder_id=state.plan.holder_id,
            planned=planned,
        )
        check_within(receipt.event, planned)  # what Ledger.commit will demand, checked before anything is written
        check_update(update, weights)
        norm = check_update_norm(update, weights, self.max_update_norm)
        metrics = {} if train.steps is None else {"steps": train.steps}
        return update, train.receipt_document(), receipt, metrics, norm

    def _evaluate(self, round: int, weights: dict[str, np.ndarray]) -> None:
        arrays = weight_records(weights, self.config.model.pack_weights)
        messages = {
            holder_id: evaluate_message(EvaluationRequest(self.run_id, round), state.plan.holder.node_id, arrays, self.config.timeouts.evaluate)
            for holder_id, state in self._active().items()
        }
        replies = exchange(self.grid, list(messages.values()), self.config.timeouts.evaluate, self.config.timeouts.poll_interval)
        for holder_id, message in messages.items():
            self._record_evaluation(holder_id, round, replies.get(message.metadata.message_id))

    def _record_evaluation(self, holder_id: str, round: int, reply: Message | None, inside_train: bool = False) -> None:
        """Keep the numeric metrics of an evaluation: an evaluate reply's "metrics", or the "evaluation" in a
        train reply's "result" (``inside_train``). A holder releases none by default (its daemon refuses): no reply, a
        refusal, an error or anything malformed changes nothing else (the holder is neither dropped nor aborted
        for it); its short reason is logged and kept per round (status.json's "evaluation_missing")."""
        state = self.holders[holder_id]
        try:
            metrics = released_metrics(reply, inside_train)
        except EvaluationMissing as missing:
            return self._evaluation_missing(holder_id, round, str(missing))
        except Exception as failure:  # noqa: BLE001 - a malformed evaluation reply is ignored, not fatal
            return self._evaluation_missing(holder_id, round, f"reply ignored: {_reason(failure)}")
        state.evaluation[round] = metrics
        if "accuracy" in metrics:
            state.accuracy[round] = metrics["accuracy"]
        _log(f"holder {holder_id}: global model after round {round}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

    # -- an audit run -------------------------------------------------------------------------------------

    def _audit(self) -> None:
        """Score every observed holder's canaries, fix the scores, ask for the reveals, and record the bounds
        (:mod:`ewtune.coordinator.canary_audit`); a failure is stated in the status and changes nothing else."""
        self.status["audit"] = audit = {"view": VIEW, "parameter": self.canaries.parameter}
        try:
            if len(self.record.segments) > 1:
                raise InvalidInputError("a resumed audit run is not scored (its canaries' rounds span several runs)")
            self._score_and_reveal(audit)
        except Exception as failure:  # noqa: BLE001 - the run's training is done; the audit says why it has no bound
            audit.update(state="failed", reason=_reason(failure))
            _log(f"audit not scored: {_reason(failure)}")

    def _score_and_reveal(self, audit: dict[str, Any]) -> None:
        settings, observed = self.config.settings, self.canaries.observations
        plans = {holder_id: self.holders[holder_id].plan for holder_id in observed}
        scores = {h: self.canaries.scores(h, p.sampling_rate, p.noise_multiplier, settings.local_steps) for h, p in plans.items()}
        digest = scores_digest(scores)
        tie_break = secure_tie_break(len(next(iter(scores.values()))))
        np.savez(self.config.output_dir / "audit-scores.npz", **{f"scores:{h}": s for h, s in scores.items()},
                 **{f"observations:{h}": np.stack(o) for h, o in observed.items()})
        _log(f"audit: {len(scores)} holder(s) scored, scores SHA-256 {digest}; asking for the reveals")
        messages = {
            holder_id: reveal_message(RevealRequest(self.run_id, digest), plan.holder.node_id, self.config.timeouts.query)
            for holder_id, plan in plans.items()
        }
        replies = exchange(self.grid, list(messages.values()), self.config.timeouts.query, self.config.timeouts.poll_interval)
        block = len(tie_break)
        revealed = {holder_id: Canaries.from_reveal(holder_id, revealed_canaries(replies.get(m.metadata.message_id)), block)
                    for holder_id, m in messages.items()}
        holders, pooled = audit_bounds(scores, revealed, settings.delta, tie_break)
        np.savez(self.config.output_dir / "audit-canaries.npz", tie_break=tie_break,
                 **{f"included:{h}": c.included for h, c in revealed.items()}, **{f"first:{h}": c.first for h, c in revealed.items()})
        seq = self.ledger.record_audit(
            self.run_id, {h: b.to_json() for h, b in holders.items()}, pooled.to_json(),
            facts={"view": VIEW, "parameter": self.canaries.parameter, "scores_sha256": digest},
        )
        certified = {
            holder_id: certified_epsilon(plans[holder_id].round_event(settings.local_steps * len(observed[holder_id])), settings.delta)
            for holder_id in holders
        }
        audit.update(
            state="scored", ledger_seq=seq, scores_sha256=digest,
            holders={h: {**holders[h].to_json(), "epsilon_certified_run": certified[h], "rounds_observed": len(observed[h]),
                         "engine_broken_on_purpose": revealed[h].breakage or None} for h in holders},
            pooled={**pooled.to_json(), "epsilon_certified_run": max(certified.values())},
        )
        audit["passed"] = pooled.epsilon <= max(certified.values()) and all(holders[h].epsilon <= certified[h] for h in holders)
        _log("audit: lower bound " + ", ".join(f"{h} {b.epsilon:.3f} (certified {certified[h]:.3f})" for h, b in holders.items())
             + f"; pooled {pooled.epsilon:.3f}" + ("" if audit["passed"] else "  AUDIT ALARM: above the certified epsilon"))

    # -- book-keeping --------------------------------------------------------------------------------------

    def _active(self) -> dict[str, HolderState]:
        return {holder_id: state for holder_id, state in self.holders.items() if state.active}

    def _drop(self, holder_id: str, reason: str) -> None:
        state = self.holders[holder_id]
        state.active, state.reason = False, reason
        _log(f"holder {holder_id} dropped: {reason}")

    def _evaluation_missing(self, holder_id: str, round: int, reason: str) -> None:
        """Why ``holder_id`` sent no evaluation of the model after ``round``: logged, and kept (one line, at most
        :data:`MISSING_REASON_CHARACTERS` characters: holders write it) for status.json, the status page and the report."""
        short = " ".join(reason.split())[:MISSING_REASON_CHARACTERS]
        self.holders[holder_id].evaluation_missing[round] = short
        _log(f"holder {holder_id}: no evaluation of round {round} ({short})")

    def _record_round(self, round: int, started: float, exchanged: float, finished: float, outcomes: dict, evaluated: bool,
                      kept: float | None) -> None:
        seconds = finished - started
        record = {
            "round": round,
            "seconds": seconds,
            "exchange_seconds": exchanged - started,
            # Holders no longer release their training time; `ewtune bench federation` reads their ledgers.
            "slowest_train_seconds": None,
            "overhead_seconds": None,
            "evaluation_included": evaluated,
            "holders": outcomes,
            # The share of the average the previous global weights keep (capped_fedavg); None: nothing aggregated.
            "global_weights_share": kept,
        }
        self.status["rounds"].append(record)
        committed = sum(1 for outcome in outcomes.values() if outcome["status"] == "committed")
        _log(
            f"round {round}: {committed}/{len(outcomes)} update(s) verified and aggregated in {seconds:.1f} s"
            + (f" (max_weight_share caps each holder: the update was scaled by {1 - kept:.3g})" if kept else "")
        )

    def _finish(self, weights: dict[str, np.ndarray]) -> None:
        output = self.config.output_dir
        save_weights(output / "final.safetensors", weights, {"run_id": self.run_id})
        model = self.config.model
        if model.mode == "lora" and model.base_model_dir is not None:
            try:
                self.status["adapter"] = str(save_peft_adapter(weights, model.base_model_dir, output / "adapter", model.task, model.lora_alpha))
            except InvalidInputError as failure:  # the final weights are saved: the adapter is a convenience
                self.status["adapter_error"] = str(failure)
                _log(f"no PEFT adapter written ({failure}); the final weights are in {output / 'final.safetensors'}")
        if self.status["reason"] is None:
            self.status["state"] = "finished"
        else:
            self.status["state"] = "stopped"
        _log(f"run {self.run_id} {self.status['state']} after {self.status['rounds_completed']} round(s)")

    def _write_status(self) -> None:
        self.status["elapsed_seconds"] = time.monotonic() - self.started
        self.status["holders"] = {holder_id: self._holder_status(holder_id, state) for holder_id, state in self.holders.items()}
        output = self.config.output_dir
        output.mkdir(parents=True, exist_ok=True)
        partial = output / (STATUS_FILE + ".partial")
        partial.write_text(json.dumps(self.status, indent=2, sort_keys=True, default=_jsonable))
        os.replace(partial, output / STATUS_FILE)

    def _holder_status(self, holder_id: str, state: HolderState) -> dict[str, Any]:
        plan = state.plan
        record: dict[str, Any] = {
            "node_id": str(plan.holder.node_id),
            "dataset_size": plan.holder.dataset_size,
            "sampling_rate": plan.sampling_rate,
            "noise_multiplier": plan.noise_multiplier,
            "planned_epsilon_certified": plan.epsilon_certified,
            "warning": plan.warning,  # its budget left makes its updates mostly noise (ewtune.coordinator.planner)
            "active": state.active,
            "reason": state.reason,
            "rounds_committed": state.rounds_committed,
            "accuracy": {str(k): v for k, v in sorted(state.accuracy.items())},
            "evaluation": {str(k): v for k, v in sorted(state.evaluation.items())},
            "evaluation_missing": {str(k): v for k, v in sorted(state.evaluation_missing.items())},
        }
        if self.ledger is not None:
            spend = self.ledger.spend(holder_id)
            record.update(
                budget_epsilon=spend.budget_epsilon,
                budget_delta=spend.budget_delta,
                epsilon_certified=spend.epsilon_certified,
                epsilon_edgeworth_estimate=spend.epsilon_edgeworth,
                epsilon_rdp=_rdp(spend, self.rdp_accountant),
            )
        return record


def _read_status(output_dir: Path) -> dict[str, Any]:
    try:
        status = json.loads((output_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _reason(failure: BaseException) -> str:
    """A one-line reason: the message of an InvalidInputError, the type and message of anything else."""
    if isinstance(failure, InvalidInputError):
        return str(failure)
    return f"{type(failure).__name__}: {failure}".splitlines()[0][:500] if str(failure) else type(failure).__name__


def _rdp(spend, accountant: RdpAccountant) -> float | None:
    """The RDP epsilon of the holder's composed events, shown beside the certified one (a looser baseline);
    ``accountant`` keeps each mechanism's RDP curve from one status to the next."""
    if not spend.committed_events and not spend.open_reservations:
        return 0.0
    try:
        return float(accountant.epsilon_of(spend.event, spend.budget_delta))
    except InvalidInputError:
        return None


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _log(text: str) -> None:
    print(f"[ewtune coordinator] {text}", flush=True)
