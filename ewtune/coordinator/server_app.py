"""The Flower ServerApp (Message API): one federated DP fine-tuning run, recorded in the coordinator's ledger.

The protocol of a run (docs/DESIGN.md, "A round as data flows"), as :meth:`Federation.run` reads:

1. **Describe**: query every connected node for its description (:mod:`ewtune.coordinator.round_messages`); a
   node is kept only when the SuperLink's record of its SuperNode key is in the holder registry and the holder
   id and ledger key it claims are the ones registered with that key (:mod:`ewtune.coordinator.registry`).
2. **Plan**: one schedule, one sigma per holder (:mod:`ewtune.coordinator.planner`); holders that cannot fund it
   are skipped; every planned holder is registered in the ledger with its key and budget. A federation killed
   at any point resumes from its last committed round with the recorded plan (:mod:`ewtune.coordinator.resume`).
3. **Rounds**: before each, every holder's round event is pre-flighted against its budget (the run stops
   cleanly before a round that would exceed one). A round: reserve each holder's event; send the train
   messages (the global weights and each holder's plan, :class:`~ewtune.federation.contract.RoundPlan`);
   verify each reply's receipt and update and keep it in the inbox; commit each verified holder's executed
   event (the ledger states the certified epsilon so far, the Edgeworth estimate beside it) and abort every
   other reservation with the reason; aggregate the committed updates (FedAvg with capped shares); record
   the round and save a checkpoint. A holder that fails, refuses, does not answer within the round timeout,
   or whose reply is malformed in any way (any exception while reading it) is aborted and dropped from
   later rounds; the round goes on with the others.
4. **Evaluate**: round r's global model is evaluated inside round r+1's train message (same weights, one
   message per holder per round): the plan's ``evaluate_round`` asks for it, and the reply carries the
   metrics or the refusal (a holder releases none unless it opts in). The model after the last round is
   evaluated with evaluate messages. A refusal is logged and changes nothing else.
5. **Audit** (a run with ``[audit]``): score the canaries observed in each update as received, then ask for
   the reveals and record the bounds (:mod:`ewtune.coordinator.federated_audit`).

Holders' train replies carry no training time (it would leak the Poisson batch sizes), so the per-round
``slowest_train_seconds`` and ``overhead_seconds`` of the status are None; ``ewtune bench federation``
derives them from the holders' ledgers. Progress and results go to ``output_dir/status.json``
(:mod:`ewtune.coordinator.run_status`, rewritten atomically after every step).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ewtune.accountant.errors import InvalidInputError
from ewtune.accountant.events import total_steps
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.rdp import RdpAccountant
from ewtune.accountant.spend import check_within
from ewtune.coordinator.aggregation import capped_fedavg, check_update, check_update_norm, default_update_norm_bound
from ewtune.coordinator.canary_audit import CanaryObserver
from ewtune.coordinator.checkpoints import load_weights, round_checkpoint, save_peft_adapter, save_weights
from ewtune.coordinator.config import FederationConfig, load_federation_config
from ewtune.coordinator.crash_points import reach
from ewtune.coordinator.exchange import exchange
from ewtune.coordinator.enrolment import describe, open_ledger, register, registered_but_silent, wait_for_nodes
from ewtune.coordinator.federated_audit import AuditRun, audit
from ewtune.coordinator.holder_state import HolderState
from ewtune.coordinator.planner import FederationPlan, plan_federation
from ewtune.coordinator.receipts_check import check_receipt
from ewtune.coordinator.recovery import Inbox, RunRecord, check_resumable, commit_extra, load_run_record, save_run_record, settings_record
from ewtune.coordinator.registry import Registry
from ewtune.coordinator.resume import Resumption, resumed_plan
from ewtune.coordinator.round_messages import evaluate_message, round_plan, train_message, train_reply_of
from ewtune.coordinator.run_log import REASON_CHARACTERS, log, number, reason
from ewtune.coordinator.run_status import (
    HolderOutcome,
    PlanStatus,
    RoundRecord,
    RunStatus,
    read_status,
    write_status,
)
from ewtune.federation.apps import RUN_CONFIG_KEY
from ewtune.federation.contract import EvaluationRequest, HolderDescription
from ewtune.federation.flower_internals import shorten_serverapp_object_backoff
from ewtune.federation.messages import weight_records

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


@dataclass(frozen=True)
class Received:
    """A holder's verified train reply: its update, signed receipt (document and parsed), metrics, update norm."""

    update: dict[str, np.ndarray]
    receipt_document: dict[str, Any]
    receipt: Any
    metrics: dict[str, float]
    norm: float


class Federation:
    def __init__(self, grid: Grid, config: FederationConfig, flower_run_id: int):
        self.grid, self.config = grid, config
        self.run_id = f"{config.name}-{flower_run_id}"
        self.started = time.monotonic()
        self.run_status = RunStatus(run_id=self.run_id, flower_run_id=flower_run_id, rounds_planned=config.settings.rounds,
                                    ledger=str(config.ledger))  # fmt: skip
        self.holders: dict[str, HolderState] = {}
        self.ledger: Ledger | None = None
        self.registry: Registry | None = None
        self.max_update_norm: float | None = None
        self.rdp_accountant = RdpAccountant()  # the status's RDP figures, its curves kept across rounds
        self.record: RunRecord | None = None
        self.inbox = Inbox(config.output_dir)
        self.canaries = CanaryObserver(config.audit.parameter) if config.audit is not None else None
        self.earlier_status = read_status(config.output_dir)  # before this run rewrites it: a resumed run carries it over

    @property
    def status(self) -> dict[str, Any]:
        """status.json as last written (:class:`~ewtune.coordinator.run_status.RunStatus`, as JSON)."""
        return self.run_status.to_json()

    # -- the protocol --------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as failure:
            self.run_status.state, self.run_status.reason = "failed", f"{type(failure).__name__}: {failure}"
            log(f"run failed: {failure}\n{traceback.format_exc()}")
            raise
        finally:
            self._write_status()
            if self.record is not None:
                self.record.state = self.run_status.state  # a failed or interrupted run stays resumable; finished or stopped closes it
                save_run_record(self.config.output_dir, self.record)
            if self.ledger is not None:
                self.ledger.close()

    def _run(self) -> None:
        weights = self._initial_weights()
        self._plan(self._describe())
        self.ledger = open_ledger(self.config)
        self._register()
        first_round = 1
        if len(self.record.segments) > 1:
            first_round, weights = self._resume(weights)
        weights = self._rounds(first_round, weights)
        if self.run_status.state == "interrupted":
            return  # resumable: no final model, no evaluation, no audit until the federation has run its rounds
        if self.config.model.evaluate != "never" and self._active():
            self._evaluate(self.run_status.rounds_completed, weights)
        if self.canaries is not None:
            self._audit()
        self._finish(weights)

    def _initial_weights(self) -> dict[str, np.ndarray]:
        """The initial global weights; they fix the default bound on an update's norm."""
        config = self.config
        self.registry = Registry.load(config.registry)
        weights = load_weights(config.model.initial_weights)
        if self.canaries is not None and self.canaries.parameter not in weights:
            raise InvalidInputError(f"[audit] parameter {self.canaries.parameter!r} is not in the initial weights")
        self.max_update_norm = config.settings.max_update_norm or default_update_norm_bound(
            config.settings.learning_rate, config.settings.local_steps, sum(int(np.size(array)) for array in weights.values())
        )
        return weights

    def _rounds(self, first_round: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        evaluate_each = self.config.model.evaluate == "every_round"
        for round in range(first_round, self.config.settings.rounds + 1):
            if len(self._active()) < self.config.settings.min_holders:
                self._interrupt(round)
                break
            stop = self._reason_to_stop_before(round)
            if stop:
                self.run_status.reason = stop
                log(f"stopping before round {round}: {stop}")
                break
            weights = self._round(round, weights, evaluate_previous=evaluate_each)
            self.run_status.rounds_completed = round
            self._write_status()
        return weights

    def _interrupt(self, round: int) -> None:
        """Too few holders left for round ``round``: the run stops resumable (``interrupted``), its committed rounds
        and checkpoints kept; started again with the same federation.toml, it resumes at this round."""
        dropped = sorted(holder_id for holder_id, state in self.holders.items() if holder_id not in self._active())
        self.run_status.state = "interrupted"
        self.run_status.reason = (
            f"{len(self._active())} active holder(s) left before round {round}, {self.config.settings.min_holders} needed "
            f"(dropped: {', '.join(dropped) or 'none'}); once they are back, run `ewtune coordinator run` again with "
            f"the same federation.toml: it resumes at round {round}"
        )
        log(f"run interrupted: {self.run_status.reason}")

    # -- describe and plan ---------------------------------------------------------------------------------

    def _describe(self) -> list[HolderDescription]:
        nodes = wait_for_nodes(self.grid, self.config)
        self.run_status.state = "querying"
        self._write_status()
        return describe(self.grid, self.config, self.registry, nodes, self.run_status.skipped)

    def _plan(self, descriptions: list[HolderDescription]) -> None:
        """A new plan, or the recorded one of an unfinished run (resumed); the run record names this run."""
        config = self.config
        missing = registered_but_silent(self.registry, descriptions, self.run_status.skipped)
        previous = load_run_record(config.output_dir)
        if previous is not None and previous.resumable:
            check_resumable(previous, config.name, config.settings)
            self.record = previous
            plan = resumed_plan(previous, descriptions, config.settings)
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

    def _record_plan(self, plan: FederationPlan) -> None:
        settings = plan.settings
        self.run_status.plan = PlanStatus(
            rounds=settings.rounds, local_steps=settings.local_steps, expected_batch_size=settings.expected_batch_size,
            clip_norm=settings.clip_norm, learning_rate=settings.learning_rate, target_epsilon=settings.target_epsilon,
            delta=settings.delta, max_weight_share=settings.max_weight_share, max_update_norm=self.max_update_norm,
        )
        for skipped in plan.skipped:
            self.run_status.skipped[skipped.holder.holder_id] = skipped.reason
            log(f"holder {skipped.holder.holder_id} skipped: {skipped.reason}")
        for holder_plan in plan.holders:
            self.holders[holder_plan.holder_id] = HolderState(holder_plan)
            log(
                f"holder {holder_plan.holder_id}: N_noisy={holder_plan.holder.dataset_size}, q={holder_plan.sampling_rate:.4g}, "
                f"sigma={holder_plan.noise_multiplier:.4f}, planned certified epsilon {holder_plan.epsilon_certified:.3f} "
                f"(Edgeworth estimate {number(holder_plan.epsilon_edgeworth)}) at delta {holder_plan.delta:g}"
            )
            if holder_plan.warning:
                log(f"WARNING: {holder_plan.warning}")

    def _register(self) -> None:
        """Every planned holder in the ledger; one whose ledger key changed is dropped (enrolment.register)."""
        for holder_id in register(self.ledger, {holder_id: state.plan for holder_id, state in self.holders.items()}):
            self.holders[holder_id].drop("its ledger key differs from the one registered in the coordinator ledger")
        self.run_status.state = "running"
        self._write_status()

    # -- one round -----------------------------------------------------------------------------------------

    def _reason_to_stop_before(self, round: int) -> str | None:
        deadline = self.config.timeouts.run_deadline
        if deadline > 0 and time.monotonic() - self.started >= deadline:
            return f"the run deadline ({deadline:g} s) has passed"
        for holder_id, state in self._active().items():
            spend = self.ledger.spend_with(holder_id, state.plan.round_event(self.config.settings.local_steps))
            if not spend.within_budget:
                return (
                    f"holder {holder_id}'s round {round} would bring its certified epsilon to "
                    f"{spend.epsilon_certified:.4g} > budget {spend.budget_epsilon:g}"
                )
        return None

    def _round(self, round: int, weights: dict[str, np.ndarray], evaluate_previous: bool) -> dict[str, np.ndarray]:
        """Reserve, send, verify and keep, commit, aggregate, record and checkpoint one round."""
        started = time.monotonic()
        active = self._active()
        reservations = {
            holder_id: self.ledger.reserve(holder_id, self.run_id, round, state.plan.round_event(self.config.settings.local_steps))
            for holder_id, state in active.items()
        }
        reach(f"reserved:{round}")
        evaluated_round = round - 1 if evaluate_previous else None
        replies, arrivals = self._send(round, active, weights, evaluated_round, reservations)
        exchanged = time.monotonic()
        if evaluated_round is not None:
            for holder_id, reply in replies.items():
                self.holders[holder_id].record_evaluation(evaluated_round, reply, inside_train=True)
        outcomes: dict[str, HolderOutcome] = {}
        received = self._receive(round, replies, weights, reservations, outcomes)
        committed = self._commit(round, received, weights, reservations, outcomes)
        kept = None
        if committed:
            weights, shares, kept = self._aggregate(committed, weights)
            for holder_id, share in shares.items():
                outcomes[holder_id].weight_share = share
        for holder_id in replies:
            outcomes[holder_id].reply_seconds = arrivals.get(holder_id)
        self._record_round(round, started, exchanged, outcomes, evaluate_previous, kept)
        self._write_status()  # the round's record survives a crash while its checkpoint is written
        self._checkpoint(round, weights)
        if not committed:
            raise InvalidInputError(f"round {round}: no holder returned a verified update")
        return weights

    def _send(self, round: int, active: dict[str, HolderState], weights: dict[str, np.ndarray], evaluated_round: int | None,
              reservations: dict[str, int]) -> tuple[dict[str, Message | None], dict[str, float]]:
        """Each active holder's reply to its train message (None: none in time) and when it arrived."""
        settings, timeouts = self.config.settings, self.config.timeouts
        records = weight_records(weights, self.config.model.pack_weights)  # the same records for every holder
        trains = {
            holder_id: train_message(round_plan(self.run_id, round, state.plan, settings, self.canaries is not None, evaluated_round),
                                     state.plan.holder.node_id, records, timeouts.round)
            for holder_id, state in active.items()
        }
        log(f"round {round}: training on {', '.join(active)}")
        arrivals: dict[str, float] = {}
        try:
            replies = exchange(self.grid, list(trains.values()), timeouts.round, timeouts.poll_interval, arrivals)
        except Exception as failure:  # the SuperLink failed us: nothing of this round was received
            for seq in reservations.values():
                self.ledger.abort(seq, f"round {round} not received: {type(failure).__name__}: {failure}"[:REASON_CHARACTERS])
            raise
        ids = {holder_id: message.metadata.message_id for holder_id, message in trains.items()}
        return ({holder_id: replies.get(i) for holder_id, i in ids.items()},
                {holder_id: arrivals[i] for holder_id, i in ids.items() if i in arrivals})  # fmt: skip

    def _receive(self, round: int, replies: dict[str, Message | None], weights: dict[str, np.ndarray],
                 reservations: dict[str, int], outcomes: dict[str, HolderOutcome]) -> dict[str, Received]:
        """The verified updates, each kept in the inbox before any commit: a crash from here on loses none."""
        received = {}
        for holder_id, reply in replies.items():
            try:
                verified = self._verified_update(round, self.holders[holder_id], reply, weights)
                self.inbox.keep(self.run_id, round, holder_id, verified.update, verified.receipt_document)
                received[holder_id] = verified
            except Exception as failure:  # noqa: BLE001 - any failure of one holder's reply aborts that holder only
                self._abort(holder_id, reservations[holder_id], failure, outcomes)
        return received

    def _verified_update(self, round: int, state: HolderState, reply: Message | None, weights: dict[str, np.ndarray]) -> Received:
        """A train reply whose receipt and update pass every check, or an exception saying what is wrong with
        it (the caller aborts the holder whatever the exception)."""
        train, update = train_reply_of(reply, self.config.timeouts.round)
        planned = state.plan.round_event(self.config.settings.local_steps)
        receipt = check_receipt(
            train.receipt,
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
        metrics = {} if train.steps is None else {"steps": train.steps}  # the one training figure a holder releases
        return Received(update, train.receipt_document(), receipt, metrics, norm)

    def _commit(self, round: int, received: dict[str, Received], weights: dict[str, np.ndarray], reservations: dict[str, int],
                outcomes: dict[str, HolderOutcome]) -> list[tuple[str, dict[str, np.ndarray]]]:
        """Commit each verified holder's executed event (the coordinator commits only what it aggregates; a
        commit states the epsilon so far itself); (holder id, update) of those committed."""
        settings, committed = self.config.settings, []
        for holder_id, verified in received.items():
            state = self.holders[holder_id]
            try:
                extra = commit_extra(verified.receipt_document, verified.receipt, state.plan.holder.node_id)
                self.ledger.commit(reservations[holder_id], verified.receipt.event, extra=extra)
            except Exception as failure:  # noqa: BLE001 - a refused commit aborts that holder only
                self._abort(holder_id, reservations[holder_id], failure, outcomes)
                continue
            state.rounds_committed += 1
            committed.append((holder_id, verified.update))
            if self.canaries is not None:  # what this holder released, as received, before aggregation
                self.canaries.observe(holder_id, verified.update, weights, state.plan.sampling_rate, state.plan.holder.dataset_size,
                                      settings.learning_rate, settings.clip_norm)
            outcomes[holder_id] = HolderOutcome("committed", steps=total_steps(verified.receipt.event), update_norm=verified.norm,
                                                metrics=verified.metrics)  # fmt: skip
            reach(f"committed:{round}:{len(committed)}")
        return committed

    def _abort(self, holder_id: str, reservation: int, failure: BaseException, outcomes: dict[str, HolderOutcome]) -> None:
        why = reason(failure)
        self.ledger.abort(reservation, why[:REASON_CHARACTERS])
        self.holders[holder_id].drop(why)
        outcomes[holder_id] = HolderOutcome("aborted", reason=why)

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
        self.run_status.checkpoints.append(str(checkpoint))
        reach(f"checkpointed:{round}")
        self.inbox.discard_round(self.record.segments, round)

    def _record_round(self, round: int, started: float, exchanged: float, outcomes: dict[str, HolderOutcome], evaluated: bool,
                      kept: float | None) -> None:
        seconds = time.monotonic() - started
        self.run_status.rounds.append(RoundRecord(
            round=round, seconds=seconds, exchange_seconds=exchanged - started, evaluation_included=evaluated,
            holders=outcomes, global_weights_share=kept,
        ))  # fmt: skip
        committed = sum(1 for outcome in outcomes.values() if outcome.status == "committed")
        log(
            f"round {round}: {committed}/{len(outcomes)} update(s) verified and aggregated in {seconds:.1f} s"
            + (f" (max_weight_share caps each holder: the update was scaled by {1 - kept:.3g})" if kept else "")
        )

    # -- a resumed federation --------------------------------------------------------------------------------

    def _resume(self, initial: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Close the earlier runs' open reservations, restore the last checkpoint, rebuild a round whose updates
        were committed but not checkpointed; returns (the next round to train, its incoming weights)."""
        resumption = Resumption(self.ledger, self.record, self.inbox, self.config.output_dir, self.registry)
        point = resumption.reconcile({holder_id: state.plan.holder.node_id for holder_id, state in self.holders.items()})
        weights, completed = point.weights if point.weights is not None else initial, point.completed
        self.run_status.checkpoints = resumption.checkpoints(completed)
        self.run_status.rounds = resumption.earlier_rounds(self.earlier_status, completed)
        if point.interrupted:
            completed += 1
            rebuilding = time.monotonic()
            weights, shares, kept = self._aggregate(sorted(point.interrupted.items()), weights)
            self._checkpoint(completed, weights)
            self.run_status.rounds.append(resumption.rebuilt_round(completed, time.monotonic() - rebuilding, shares, kept))
        elif completed:
            self.inbox.discard_round(self.record.segments, completed)
        for holder_id, count in resumption.committed_rounds().items():
            if holder_id in self.holders:
                self.holders[holder_id].rounds_committed = count
        self.run_status.rounds_completed = completed
        self.run_status.resumed = resumption.status(completed)
        self._write_status()
        return completed + 1, weights

    # -- evaluation and the audit --------------------------------------------------------------------------

    def _evaluate(self, round: int, weights: dict[str, np.ndarray]) -> None:
        records, timeouts = weight_records(weights, self.config.model.pack_weights), self.config.timeouts
        messages = {
            holder_id: evaluate_message(EvaluationRequest(self.run_id, round), state.plan.holder.node_id, records, timeouts.evaluate)
            for holder_id, state in self._active().items()
        }
        replies = exchange(self.grid, list(messages.values()), timeouts.evaluate, timeouts.poll_interval)
        for holder_id, message in messages.items():
            self.holders[holder_id].record_evaluation(round, replies.get(message.metadata.message_id))

    def _audit(self) -> None:
        run = AuditRun(self.grid, self.config, self.run_id, self.ledger, self.canaries,
                       {holder_id: state.plan for holder_id, state in self.holders.items()})  # fmt: skip
        self.run_status.audit = audit(run, resumed=len(self.record.segments) > 1)

    # -- book-keeping --------------------------------------------------------------------------------------

    def _active(self) -> dict[str, HolderState]:
        return {holder_id: state for holder_id, state in self.holders.items() if state.active}

    def _finish(self, weights: dict[str, np.ndarray]) -> None:
        output, model = self.config.output_dir, self.config.model
        save_weights(output / "final.safetensors", weights, {"run_id": self.run_id})
        if model.mode == "lora" and model.base_model_dir is not None:
            try:
                self.run_status.adapter = str(save_peft_adapter(weights, model.base_model_dir, output / "adapter", model.task, model.lora_alpha))
            except InvalidInputError as failure:  # the final weights are saved: the adapter is a convenience
                self.run_status.adapter_error = str(failure)
                log(f"no PEFT adapter written ({failure}); the final weights are in {output / 'final.safetensors'}")
        self.run_status.state = "finished" if self.run_status.reason is None else "stopped"
        log(f"run {self.run_id} {self.run_status.state} after {self.run_status.rounds_completed} round(s)")

    def _write_status(self) -> None:
        self.run_status.elapsed_seconds = time.monotonic() - self.started
        self.run_status.holders = {holder_id: state.status(self.ledger, self.rdp_accountant) for holder_id, state in self.holders.items()}
        write_status(self.config.output_dir, self.run_status)
