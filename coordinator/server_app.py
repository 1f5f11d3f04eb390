"""The Flower ServerApp (Message API): one federated DP fine-tuning run, recorded in the coordinator's ledger.

Flow (DESIGN.md, one round, as data flows):
1. query every connected node for its description (holder id, dataset size, budget left, ledger key);
2. plan: one schedule, one sigma per holder (:mod:`coordinator.planner`); holders that cannot fund it are
   skipped; every planned holder is registered in the ledger with its key and budget;
3. per round: pre-flight every holder's round event against its budget (the run stops cleanly before a round
   that would exceed one), reserve, send train messages, verify each receipt, aggregate the verified updates
   (weighted FedAvg), commit each verified holder's executed event (the ledger states the certified epsilon so
   far with the Edgeworth estimate beside it) and abort every other reservation with the reason, save a
   checkpoint. A holder that fails, refuses or does not answer within the round timeout is aborted and
   dropped from later rounds.
4. evaluation of round r's global model rides with round r+1's train messages (same weights), so a node
   runs both back to back instead of paying Flower's polling twice.

Progress and results go to ``output_dir/status.json`` (rewritten atomically after every step), which
``ewtune coordinator status`` and ``ewtune demo`` read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from accountant.errors import InvalidInputError
from accountant.ledger import Ledger, Policy
from accountant.signing import SigningKey, canonical_json
from coordinator.aggregation import check_update, weighted_average
from coordinator.checkpoints import load_weights, round_checkpoint, save_peft_adapter, save_weights
from coordinator.config import RUN_CONFIG_KEY, FederationConfig, load_federation_config
from coordinator.exchange import exchange
from coordinator.packing import weight_records, weights_of
from coordinator.planner import FederationPlan, HolderDescription, HolderPlan, plan_federation
from coordinator.receipts_check import ReceiptRejected, check_receipt

STATUS_FILE = "status.json"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = context.run_config.get(RUN_CONFIG_KEY)
    if not path:
        raise InvalidInputError(f"run config lacks {RUN_CONFIG_KEY!r}: submit with `ewtune coordinator run --config federation.toml`")
    Federation(grid, load_federation_config(str(path)), flower_run_id=context.run_id).run()


@dataclass
class HolderState:
    plan: HolderPlan
    active: bool = True
    reason: str | None = None
    rounds_committed: int = 0
    accuracy: dict[int, float] = field(default_factory=dict)
    evaluation: dict[int, dict[str, float]] = field(default_factory=dict)
    train_seconds: dict[int, float] = field(default_factory=dict)


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
            if self.ledger is not None:
                self.ledger.close()

    def _run(self) -> None:
        config = self.config
        nodes = self._wait_for_nodes()
        descriptions = self._query(nodes)
        plan = plan_federation(config.settings, descriptions)
        self._record_plan(plan)
        self.ledger = self._open_ledger()
        self._register(plan)
        weights = load_weights(config.model.initial_weights)
        evaluate_each = config.model.evaluate == "every_round"
        for round in range(1, config.settings.rounds + 1):
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
        self._finish(weights)

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.config.timeouts.nodes
        while True:
            nodes = sorted(node.node_id for node in self.grid.get_nodes() if getattr(node, "status", "online") in ("online", ""))
            if len(nodes) >= self.config.expected_holders or time.monotonic() >= deadline:
                _log(f"{len(nodes)} node(s) connected ({self.config.expected_holders} expected)")
                return nodes
            time.sleep(0.5)

    def _query(self, nodes: list[int]) -> list[HolderDescription]:
        self.status["state"] = "querying"
        self._write_status()
        messages = {node: Message(RecordDict(), node, MessageType.QUERY, ttl=self.config.timeouts.query + 30) for node in nodes}
        replies = exchange(self.grid, list(messages.values()), self.config.timeouts.query, self.config.timeouts.poll_interval)
        descriptions = []
        for node, message in messages.items():
            reply = replies.get(message.metadata.message_id)
            try:
                descriptions.append(_description(node, reply))
            except InvalidInputError as failure:
                self.status["skipped"][f"node-{node}"] = str(failure)
                _log(f"node {node} left out: {failure}")
        return descriptions

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
        }
        for skipped in plan.skipped:
            self.status["skipped"][skipped.holder.holder_id] = skipped.reason
            _log(f"holder {skipped.holder.holder_id} skipped: {skipped.reason}")
        for holder_plan in plan.holders:
            self.holders[holder_plan.holder_id] = HolderState(holder_plan)
            _log(
                f"holder {holder_plan.holder_id}: N={holder_plan.holder.dataset_size}, q={holder_plan.sampling_rate:.4g}, "
                f"sigma={holder_plan.noise_multiplier:.4f}, planned certified epsilon {holder_plan.epsilon_certified:.3f} "
                f"(Edgeworth estimate {_number(holder_plan.epsilon_edgeworth)}) at delta {holder_plan.delta:g}"
            )

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
        arrays = weight_records(weights, self.config.model.pack_weights)
        evaluations = {
            holder_id: Message(RecordDict(arrays), state.plan.holder.node_id, MessageType.EVALUATE, ttl=timeouts.round, group_id=str(round - 1))
            for holder_id, state in active.items()
        } if evaluate_previous else {}
        trains = {holder_id: self._train_message(round, state, arrays) for holder_id, state in active.items()}
        _log(f"round {round}: training on {', '.join(active)}")
        arrivals: dict[str, float] = {}
        try:
            replies = exchange(self.grid, [*evaluations.values(), *trains.values()], timeouts.round, timeouts.poll_interval, arrivals)
        except Exception as failure:  # the SuperLink failed us: nothing of this round was received
            for holder_id, seq in reservations.items():
                self.ledger.abort(seq, f"round {round} not received: {type(failure).__name__}: {failure}"[:500])
            raise
        exchanged = time.monotonic()
        for holder_id, message in evaluations.items():
            self._record_evaluation(holder_id, round - 1, replies.get(message.metadata.message_id))
        verified, outcomes = [], {}
        for holder_id, message in trains.items():
            state = active[holder_id]
            try:
                update, receipt_document, receipt, metrics = self._verified_update(round, state, replies.get(message.metadata.message_id), weights)
            except (ReceiptRejected, InvalidInputError) as failure:
                self.ledger.abort(reservations[holder_id], str(failure)[:500])
                self._drop(holder_id, str(failure))
                outcomes[holder_id] = {"status": "aborted", "reason": str(failure)}
                continue
            verified.append((holder_id, update, receipt_document, receipt, metrics))
        if verified:
            weights = weighted_average([(update, active[h].plan.holder.dataset_size) for h, update, *_ in verified], weights)
        for holder_id, update, receipt_document, receipt, metrics in verified:
            # The coordinator commits only what it aggregated; a commit states the epsilon so far itself.
            self.ledger.commit(
                reservations[holder_id],
                receipt.event,
                extra={
                    "receipt_sha256": hashlib.sha256(canonical_json(receipt_document)).hexdigest(),
                    "update_sha256": receipt.update_sha256,
                    "node_id": str(active[holder_id].plan.holder.node_id),
                },
            )
            state = active[holder_id]
            state.rounds_committed += 1
            if "seconds" in metrics:
                state.train_seconds[round] = float(metrics["seconds"])
            outcomes[holder_id] = {"status": "committed", "steps": receipt.event.steps, **metrics}
        for holder_id, message in trains.items():
            outcomes[holder_id]["reply_seconds"] = arrivals.get(message.metadata.message_id)
            if holder_id in evaluations:
                outcomes[holder_id]["evaluation_reply_seconds"] = arrivals.get(evaluations[holder_id].metadata.message_id)
        checkpoint = round_checkpoint(self.config.output_dir, round, weights, self.run_id)
        self.status["checkpoints"].append(str(checkpoint))
        finished = time.monotonic()
        self._record_round(round, started, exchanged, finished, outcomes, bool(evaluations))
        if not verified:
            raise InvalidInputError(f"round {round}: no holder returned a verified update")
        return weights

    def _train_message(self, round: int, state: HolderState, arrays: dict) -> Message:
        settings = self.config.settings
        plan = {
            "run_id": self.run_id,
            "round": round,
            "steps": settings.local_steps,
            "sampling_rate": state.plan.sampling_rate,
            "noise_multiplier": state.plan.noise_multiplier,
            "clip_norm": float(settings.clip_norm),
            "learning_rate": float(settings.learning_rate),
            "delta": state.plan.delta,
        }
        if state.plan.holder.model_id:
            plan["model_id"] = state.plan.holder.model_id
        content = RecordDict({**arrays, "config": ConfigRecord(plan)})
        return Message(content, state.plan.holder.node_id, MessageType.TRAIN, ttl=self.config.timeouts.round, group_id=str(round))

    def _verified_update(self, round: int, state: HolderState, reply: Message | None, weights: dict[str, np.ndarray]):
        if reply is None:
            raise InvalidInputError(f"no reply within {self.config.timeouts.round:g} s")
        if reply.has_error():
            raise InvalidInputError(f"refused or failed (code {reply.error.code}): {reply.error.reason}")
        content = reply.content
        if "receipt" not in content:
            raise InvalidInputError("train reply lacks 'receipt'")
        update = weights_of(content)
        document = content["receipt"].get("document")
        receipt = check_receipt(
            document,
            update,
            public_key=state.plan.holder.public_key,
            run_id=self.run_id,
            round=round,
            holder_id=state.plan.holder_id,
            planned=state.plan.round_event(self.config.settings.local_steps),
        )
        check_update(update, weights)
        metrics = dict(content["metrics"]) if "metrics" in content else {}
        return update, json.loads(document), receipt, {k: float(v) for k, v in metrics.items()}

    def _evaluate(self, round: int, weights: dict[str, np.ndarray]) -> None:
        arrays = weight_records(weights, self.config.model.pack_weights)
        messages = {
            holder_id: Message(RecordDict(arrays), state.plan.holder.node_id, MessageType.EVALUATE, ttl=self.config.timeouts.evaluate, group_id=str(round))
            for holder_id, state in self._active().items()
        }
        replies = exchange(self.grid, list(messages.values()), self.config.timeouts.evaluate, self.config.timeouts.poll_interval)
        for holder_id, message in messages.items():
            self._record_evaluation(holder_id, round, replies.get(message.metadata.message_id))

    def _record_evaluation(self, holder_id: str, round: int, reply: Message | None) -> None:
        state = self.holders[holder_id]
        if reply is None or reply.has_error() or "metrics" not in reply.content:
            _log(f"holder {holder_id}: no evaluation of round {round} ({reply.error.reason if reply is not None and reply.has_error() else 'no reply'})")
            return
        metrics = {name: float(value) for name, value in reply.content["metrics"].items()}
        state.evaluation[round] = metrics
        if "accuracy" in metrics:
            state.accuracy[round] = metrics["accuracy"]
        _log(f"holder {holder_id}: global model after round {round}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

    # -- book-keeping --------------------------------------------------------------------------------------

    def _active(self) -> dict[str, HolderState]:
        return {holder_id: state for holder_id, state in self.holders.items() if state.active}

    def _drop(self, holder_id: str, reason: str) -> None:
        state = self.holders[holder_id]
        state.active, state.reason = False, reason
        _log(f"holder {holder_id} dropped: {reason}")

    def _record_round(self, round: int, started: float, exchanged: float, finished: float, outcomes: dict, evaluated: bool) -> None:
        seconds = finished - started
        local = [self.holders[h].train_seconds[round] for h in outcomes if round in self.holders[h].train_seconds]
        slowest = max(local) if local else None
        record = {
            "round": round,
            "seconds": seconds,
            "exchange_seconds": exchanged - started,
            "slowest_train_seconds": slowest,
            "overhead_seconds": None if slowest is None else seconds - slowest,
            "evaluation_included": evaluated,
            "holders": outcomes,
        }
        self.status["rounds"].append(record)
        committed = sum(1 for outcome in outcomes.values() if outcome["status"] == "committed")
        _log(
            f"round {round}: {committed}/{len(outcomes)} update(s) verified and aggregated in {seconds:.1f} s"
            + (f" (slowest local training {slowest:.1f} s)" if slowest is not None else "")
        )

    def _finish(self, weights: dict[str, np.ndarray]) -> None:
        output = self.config.output_dir
        save_weights(output / "final.safetensors", weights, {"run_id": self.run_id})
        model = self.config.model
        if model.mode == "lora" and model.base_model_dir is not None:
            self.status["adapter"] = str(save_peft_adapter(weights, model.base_model_dir, output / "adapter", model.task, model.lora_alpha))
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
            "active": state.active,
            "reason": state.reason,
            "rounds_committed": state.rounds_committed,
            "accuracy": {str(k): v for k, v in sorted(state.accuracy.items())},
            "evaluation": {str(k): v for k, v in sorted(state.evaluation.items())},
            "train_seconds": {str(k): v for k, v in sorted(state.train_seconds.items())},
        }
        if self.ledger is not None:
            spend = self.ledger.spend(holder_id)
            record.update(
                budget_epsilon=spend.budget_epsilon,
                budget_delta=spend.budget_delta,
                epsilon_certified=spend.epsilon_certified,
                epsilon_edgeworth_estimate=spend.epsilon_edgeworth,
                epsilon_rdp=_rdp(spend),
            )
        return record


def _description(node: int, reply: Message | None) -> HolderDescription:
    if reply is None:
        raise InvalidInputError("no description within the query timeout")
    if reply.has_error():
        raise InvalidInputError(f"query failed (code {reply.error.code}): {reply.error.reason}")
    if "description" not in reply.content:
        raise InvalidInputError("query reply lacks 'description'")
    return HolderDescription.from_mapping(node, dict(reply.content["description"]))


def _rdp(spend) -> float | None:
    """The RDP epsilon of the holder's composed events, shown beside the certified one (a looser baseline)."""
    if not spend.committed_events and not spend.open_reservations:
        return 0.0
    from accountant.rdp import rdp_epsilon

    try:
        return float(rdp_epsilon(spend.event, spend.budget_delta))
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
