"""The agent daemon: the only process of a data holder that touches its data.

Long-lived: the model and the data are loaded once (:class:`ewtune.agent.training.LocalTrainer`); the daemon also
holds the holder's policy, its own ledger and its Ed25519 key. For every round plan it:

1. checks the plan against the policy (model, clip norm, steps, the floors on sigma and on the expected batch)
   and the weights against the model (names, shapes, each parameter's own dtype, finite values);
2. accounts the sampling rate the sampler will actually execute (the requested rate rounded up to the 2^-53
   grid, :mod:`ewtune.accountant.sampling`), never the one requested;
3. refuses a plan whose round alone exceeds the policy's per-round certified epsilon (its noise floor), or
   whose certified epsilon, composed with everything committed or reserved in its ledger, would exceed the
   lifetime budget;
4. reserves the planned event in its ledger, trains, commits the executed event, and returns the update
   with a receipt signed by its key. The update leaves only when it is finite.

What leaves the holder: the noised update, its receipt, the number of steps executed, and the public
metadata of Describe (the budget and spend; the data set size only as a noised count released once per data
set and charged to the ledger, :mod:`ewtune.agent.released_count`: N never leaves exactly). Nothing
measured from the data without noise leaves: not the training loss, not the sampled batch sizes, not the
time a round took (it tracks the batch sizes). Evaluation metrics leave only when the policy opts in to
private evaluation: a noised confusion matrix (a causal LM: its noised clipped loss sums, a perplexity), charged to
the ledger (:mod:`ewtune.agent.evaluation`).

A refusal raises :class:`ewtune.agent.policy.PlanRefused` before anything is written, so it charges nothing. A
failure after a step began (its sample drawn, records about to be read) charges every step that began, the
failing one included: charging follows data access, not success, since a data-dependent failure is itself an
answer about the data; only a failure before any record is touched is aborted free. It answers with a generic :class:`ewtune.agent.rpc.RequestFailed`; the detail stays in the holder's log,
since an error text can depend on the data. Requests are served one at a time. A crash between reserve and
commit (SIGKILL, power loss) is reconciled at the next start from the progress journal, which records each
step before it may run and the receipt before the commit (:mod:`ewtune.agent.recovery`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

import numpy as np
import torch

from ewtune.accountant.certified import CertifiedAccountant
from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.events import PoissonGaussianEvent
from ewtune.accountant.ledger import Ledger
from ewtune.accountant.ledger_payloads import AUDIT_PURPOSE, EVALUATION_PURPOSE
from ewtune.accountant.privacy_accountant import delta_too_large
from ewtune.accountant.receipts import Receipt, receipt_digest, sign_receipt, update_digest
from ewtune.accountant.sampling import executable_sampling_rate
from ewtune.accountant.signing import SigningKey
from ewtune.accountant.spend import mechanism_rows
from ewtune.agent.audit.holder import AuditHolderConfig, AuditTrainer
from ewtune.agent.distributed.launch import start_workers
from ewtune.agent.dpsgd.randomness import SecureRandom
from ewtune.agent.evaluation import private_metrics, private_perplexity
from ewtune.agent.ledger_history import evaluations_since, released_rounds
from ewtune.agent.policy import AgentConfig, HolderPolicy, PlanRefused
from ewtune.agent.recovery import ProgressJournal, journal_path, reconcile
from ewtune.agent.released_count import current_count, latest_count
from ewtune.agent.training import TrainingConfig
from ewtune.agent.dpsgd_run import StepPlan, TrainingFailed
from ewtune.agent.rpc import DaemonUnavailable, RequestFailed
from ewtune.agent.weights_wire import state_from_arrays, to_numpy, trainable_layout
from ewtune.federation.contract import EvaluationRequest, HolderDescription, RevealRequest, RoundPlan

log = logging.getLogger(__name__)

# What a train reply carries besides the noised update and its receipt. The steps executed are the plan's
# unless the daemon was stopping; the training loss, the sampled-record count and the training time are
# computed from the data without noise, so they stay in the holder's log.
RELEASED_TRAINING_METRICS = ("steps",)

# The window of the policy's max_evaluations_per_day.
EVALUATION_WINDOW = timedelta(days=1)

# Recorded in every commit: the randomness of the release, and the public metadata that left with it.
RANDOMNESS = SecureRandom.name


@dataclass(frozen=True)
class TrainReply:
    arrays: dict[str, np.ndarray]  # the noised trainable weights after the round
    receipt: dict[str, Any]  # the signed receipt document
    metrics: dict[str, float]  # RELEASED_TRAINING_METRICS


class Daemon:
    """Serves one holder. ``trainer`` is a :class:`ewtune.agent.training.LocalTrainer` (or anything with its
    ``model_id``, ``dataset_size``, ``record_count``, ``randomness``, ``device``, ``precision``,
    ``trainable_state``, ``load_trainable_state``, ``train``, ``confusion_matrix``)."""

    def __init__(self, holder_id: str, policy: HolderPolicy, trainer: Any, ledger: Ledger, key: SigningKey,
                 journal: str | os.PathLike | None = None):
        if ledger.writer_id != holder_id:
            raise InvalidInputError(f"ledger {ledger.path} belongs to {ledger.writer_id!r}, not {holder_id!r}")
        if ledger.public_key_text != key.public_key_text:
            raise InvalidInputError(f"the signing key is not the writer key of ledger {ledger.path}")
        if getattr(trainer, "randomness", None) != RANDOMNESS:
            raise InvalidInputError("the agent daemon draws batches and noise only from the operating system's secure source")
        _check_budget_matches(policy, ledger, holder_id)
        _check_delta(policy.budget_delta, trainer.record_count)
        policy.check_model(trainer.model_id)
        self.audit = callable(getattr(trainer, "reveal", None))  # an audit daemon (ewtune.agent.audit.holder.AuditTrainer)
        if self.audit and not policy.audit_runs:
            raise InvalidInputError("an audit daemon needs a policy that allows audit runs ([policy] audit_runs = true)")
        self.holder_id, self.policy, self.trainer, self.ledger, self.key = holder_id, policy, trainer, ledger, key
        self._parameters = trainable_layout(trainer.trainable_state())
        self._work = threading.Lock()  # one training or evaluation at a time
        self._ledger_lock = threading.Lock()  # describe reads while train writes
        self._stopping = threading.Event()
        self._started = time.monotonic()
        self._round_accountant = CertifiedAccountant()  # every round asks about the same planned event
        journal = journal_path(ledger.path) if journal is None else journal
        # A receipt recovered after a crash left with the count released before it: the ledger's latest.
        latest = latest_count(ledger.entries)
        self.released_dataset_size = None if latest is None else latest.value
        self.recovered = reconcile(ledger, holder_id, journal, self._release_facts())
        self._journal = ProgressJournal(journal)
        self._journal.finish(ledger)
        self.released_dataset_size = self._released_count()

    @classmethod
    def from_config(cls, config: AgentConfig) -> "Daemon":
        """Open the ledger made by ``ewtune agent init`` (a missing one is an error, never a fresh budget),
        then load model and data."""
        key = SigningKey.load(config.signing_key)
        if not config.ledger_path.exists():
            raise InvalidInputError(
                f"ledger {config.ledger_path} does not exist: create it once with `ewtune agent init --config "
                "agent.toml` (a missing ledger is never replaced by a new one, which would restore a full budget)"
            )
        ledger = Ledger.open(config.ledger_path, key, head_path=config.ledger_head)
        try:
            return cls(config.holder_id, config.policy, _trainer(config), ledger, key)
        except BaseException:
            ledger.close()
            raise

    # -- the API -------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        with self._ledger_lock:
            spend = self.ledger.spend(self.holder_id)
            open_reservations = len(self.ledger.open_reservations(self.holder_id))
        policy = self.policy
        return HolderDescription(
            holder_id=self.holder_id,
            dataset_size=self.released_dataset_size,
            dataset_size_noise=None if self.audit else policy.dataset_size_noise,
            budget_epsilon=spend.budget_epsilon,
            budget_delta=spend.budget_delta,
            spent_epsilon_certified=spend.epsilon_certified,
            spent_epsilon_edgeworth_estimate=spend.epsilon_edgeworth,
            # the ledger's events (committed and reserved), so the planner composes instead of subtracting
            spent_mechanisms=json.dumps(mechanism_rows(spend.event)),
            open_reservations=open_reservations,
            public_key=self.key.public_key_text,
            model_id=self.trainer.model_id,
            min_clip_norm=policy.min_clip_norm,
            max_clip_norm=policy.max_clip_norm,
            max_steps_per_round=policy.max_steps_per_round,
            min_expected_batch=policy.min_expected_batch,
            min_noise_multiplier=policy.min_noise_multiplier,
            evaluation=policy.evaluation,
        ).to_config()

    def health(self) -> dict[str, Any]:
        return {
            "status": "stopping" if self._stopping.is_set() else "ok",
            "holder_id": self.holder_id,
            "busy": self._work.locked(),
            "device": str(self.trainer.device),
            "precision": self.trainer.precision,
            "uptime_seconds": time.monotonic() - self._started,
        }

    def train(self, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainReply:
        with self._work:
            self._refuse_if_stopping()
            plan = RoundPlan.from_config(config)
            self.policy.check_plan(plan, self.trainer.model_id)
            self._check_purpose(plan)
            self._check_count_released()
            if plan.delta is not None:  # against the released count: the refusal reveals nothing more
                _check_delta(plan.delta, self.released_dataset_size)
            state = state_from_arrays(arrays, self._parameters)
            planned = self.planned_event(plan)
            self._check_round_epsilon(planned)
            with self._ledger_lock:
                self._refuse_replay(plan)
                self._check_budget(planned)
                reservation = self._reserve(plan.run_id, plan.round, planned)
            try:
                reply = self._train_reserved(plan, planned, state, reservation)
            finally:
                self._finish_journal()
            log.info("round %d of run %s: %d steps committed (reservation %d)", plan.round, plan.run_id,
                     reply.metrics["steps"], reservation)
            return reply

    def reveal_audit(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """An audit daemon's canaries and inclusion bits, for the run named in ``config`` once this holder has
        released at least one of its rounds; revealed once, after which the daemon trains no more (SECURITY.md,
        "The federated audit"). ``config["scores_sha256"]``, the digest of the scores the coordinator fixed
        before asking, is written to the holder's log."""
        if not self.audit:
            raise PlanRefused("this daemon runs no audit: it has no canaries to reveal")
        request = RevealRequest.from_config(config)
        run_id = request.run_id
        with self._work:
            with self._ledger_lock:
                released = released_rounds(self.ledger.entries, run_id)
            if not released:
                raise PlanRefused(f"this holder released no audit round of run {run_id!r}: nothing to reveal")
            revealed = self.trainer.reveal()
        log.info("audit run %s: canaries revealed after %d released round(s); the coordinator's scores have SHA-256 %s",
                 run_id, len(released), str(request.scores_sha256)[:64])
        return {"holder_id": self.holder_id, **revealed}

    def planned_event(self, plan: RoundPlan) -> PoissonGaussianEvent:
        """The event the plan will execute: the rate the sampler realises, checked against the batch floor."""
        rate = executable_sampling_rate(plan.sampling_rate)
        self.policy.check_sampling(rate, self.released_dataset_size)
        return PoissonGaussianEvent(rate, plan.noise_multiplier, plan.steps)

    def evaluate(self, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Private evaluation of ``arrays`` on the held-out split (policy ``evaluation = "private"``): the
        confusion matrix (a causal LM: its clipped loss sums) noised and charged to the ledger as one
        Gaussian-mechanism event; at most
        ``max_evaluations_per_day`` in any 24 hours, whatever the run ids. The trainer's own weights are
        restored afterwards."""
        if self.policy.evaluation != "private":
            raise PlanRefused('this holder releases no evaluation metrics (its policy has evaluation = "none")')
        request = EvaluationRequest.from_config(config)
        event = PoissonGaussianEvent(1.0, self.policy.evaluation_noise_multiplier, 1)
        with self._work:
            self._refuse_if_stopping()
            state = state_from_arrays(arrays, self._parameters)
            with self._ledger_lock:
                self._check_evaluations_left()
                self._check_budget(event)
                reservation = self._reserve(request.run_id, request.round, event)
            try:
                return self._evaluate_reserved(state, event, reservation)
            finally:
                self._finish_journal()

    def request_stop(self) -> None:
        """Refuse new work and end a running training at its next step (its executed steps are committed)."""
        self._stopping.set()

    def close(self) -> None:
        """Wait for the running request, then close the ledger (releases its writer lock)."""
        self.request_stop()
        with self._work, self._ledger_lock:
            self.ledger.close()
            self._journal.close()
            if hasattr(self.trainer, "group"):  # the worker processes of [training] processes > 1
                self.trainer.group.close()

    # -- the steps of a round ------------------------------------------------------------------------------

    def _reserve(self, run_id: str, round: int, event: PoissonGaussianEvent) -> int:
        """Reserve ``event`` in the ledger, its ``begin`` journaled first (:mod:`ewtune.agent.recovery`)."""
        expected = self.ledger.head.seq + 1
        self._journal.begin(expected)
        reservation = self.ledger.reserve(self.holder_id, run_id, round, event)
        if reservation != expected:
            raise EwtuneError(f"the ledger reserved seq {reservation}, where the journal expected {expected}")
        return reservation

    def _finish_journal(self) -> None:
        with self._ledger_lock:
            self._journal.finish(self.ledger)

    def _step_gate(self, reservation: int):
        """``should_stop`` for the trainer, asked before each step: a step is journaled before it may run."""
        started = 0

        def should_stop() -> bool:
            nonlocal started
            if self._stopping.is_set():
                return True
            started += 1
            self._journal.step(reservation, started)
            return False

        return should_stop

    def _check_purpose(self, plan: RoundPlan) -> None:
        """An audit run is a run kind of its own: an audit daemon trains only its plans, any other daemon none."""
        if self.audit and plan.purpose != AUDIT_PURPOSE:
            raise PlanRefused(f'this is an audit daemon: it trains only audit runs (purpose = "{AUDIT_PURPOSE}")')
        if self.audit and self.trainer.revealed:
            raise PlanRefused("this audit's canaries were revealed: the daemon trains no more (start it again for a new audit)")
        if not self.audit and plan.purpose is not None:
            raise PlanRefused(f"this daemon trains the holder's data for training runs only, not a run of purpose {plan.purpose!r}")

    def _check_count_released(self) -> None:
        if self.released_dataset_size is None:
            raise PlanRefused("this holder's budget could not fund the release of its noised count: it trains no round")

    def _check_round_epsilon(self, planned: PoissonGaussianEvent) -> None:
        """The daemon's own noise floor: this round alone within the policy's per-round certified epsilon.
        One epsilon evaluation, not a calibration: a sigma is above the floor exactly when the round's
        epsilon is within the cap (epsilon falls as sigma grows), and the cost stays bounded whatever q."""
        epsilon = self._round_accountant.epsilon_of(planned, self.policy.budget_delta)
        if epsilon > self.policy.round_epsilon:
            raise PlanRefused(
                f"noise multiplier {planned.noise_multiplier:.6g} is below this holder's own floor for "
                f"q={planned.sampling_rate:.6g}, {planned.steps} steps: this round alone would have certified "
                f"epsilon {epsilon:.6g} > {self.policy.round_epsilon:g} per round at delta {self.policy.budget_delta:g}"
            )

    def _refuse_replay(self, plan: RoundPlan) -> None:
        """A round of a run is trained once: a request for a round at or before one whose update this holder
        already released in that run is a replay (or a stale request) and is refused before anything runs."""
        released = released_rounds(self.ledger.entries, plan.run_id)
        if released and plan.round <= max(released):
            raise PlanRefused(
                f"run {plan.run_id!r} round {plan.round} is a replay: this holder already released its update for "
                f"round {max(released)} of that run"
            )

    def _check_budget(self, planned: PoissonGaussianEvent) -> None:
        spend = self.ledger.spend_with(self.holder_id, planned)
        if not spend.within_budget:
            raise PlanRefused(
                f"the plan would bring this holder's certified epsilon to {spend.epsilon_certified:.6g}, over its "
                f"budget {spend.budget_epsilon:g} (delta {spend.budget_delta:g}); spent so far "
                f"{self.ledger.spend(self.holder_id).epsilon_certified:.6g}"
            )

    def _train_reserved(self, plan: RoundPlan, planned: PoissonGaussianEvent, state: dict[str, torch.Tensor],
                        reservation: int) -> TrainReply:
        step_plan = StepPlan(plan.steps, planned.sampling_rate, plan.noise_multiplier, plan.clip_norm, plan.learning_rate,
                             expected_batch_size=planned.sampling_rate * self.released_dataset_size)
        try:
            self.trainer.load_trainable_state(state)
            result = self.trainer.train(step_plan, should_stop=self._step_gate(reservation))
        except TrainingFailed as failure:  # records were touched: every step that began is charged
            self._charge_failure(reservation, failure.event, failure.cause, failure.what_ran)
        except BaseException as failure:  # before any record was touched (loading the weights, the optimizer)
            self._charge_failure(reservation, None, failure, "failed before the first step: nothing was released")
        if result.event is None:
            with self._ledger_lock:
                self.ledger.abort(reservation, "the daemon stopped before the first step: nothing was released")
            raise DaemonUnavailable("the daemon is stopping: no step ran and nothing was released")
        update = {name: to_numpy(tensor) for name, tensor in result.trainable_state.items()}
        if not all(np.isfinite(array).all() for array in update.values()):
            self._charge_failure(reservation, result.event, ValueError("the update is not finite"),
                                 f"all {result.event.steps} step(s) ran; the update was not finite and was not released")
        receipt = Receipt(plan.run_id, plan.round, self.holder_id, result.event, update_digest(update))
        document = sign_receipt(self.key, receipt)
        self._journal.receipt(reservation, document)
        with self._ledger_lock:  # committed before the update leaves; a failed commit releases nothing
            self.ledger.commit(reservation, result.event, extra={
                "receipt_sha256": receipt_digest(document),
                **self._release_facts(),
                **self._audit_facts(),
            })
        log.info("round %s: local training loss %.4f over %d examples in %.1f s (kept local)", plan.round,
                 result.metrics.get("loss", math.nan), int(result.metrics.get("examples", 0)),
                 result.metrics.get("seconds", math.nan))
        released = {name: float(result.metrics[name]) for name in RELEASED_TRAINING_METRICS if name in result.metrics}
        return TrainReply(update, document, released)

    def _charge_failure(self, reservation: int, executed: PoissonGaussianEvent | None, cause: BaseException,
                        what_ran: str) -> NoReturn:
        """Close the reservation of a failed round and raise the generic error. Charging follows data access,
        not success: the steps that began are committed (spent, though nothing was released; a failure that
        depends on the data is an answer about it), and only a failure before any record was touched
        (``executed`` None) is aborted. ``what_ran`` is the ledger's reason, in words."""
        log.error("reservation %d failed (%s): %s: %s", reservation, what_ran, type(cause).__name__, cause, exc_info=cause)
        with self._ledger_lock:
            if executed is None:
                self.ledger.abort(reservation, what_ran)
            else:
                self.ledger.commit(reservation, executed, extra={"released": False, "reason": what_ran, "randomness": RANDOMNESS})
        raise RequestFailed(
            "the round failed; any steps that ran were charged to the holder's ledger (details in the holder's log)"
        ) from None

    def _evaluate_reserved(self, state: dict[str, torch.Tensor], event: PoissonGaussianEvent, reservation: int) -> dict[str, float]:
        saved = {name: tensor.detach().clone() for name, tensor in self.trainer.trainable_state().items()}
        records_read = False
        try:
            self.trainer.load_trainable_state(state)
            self._journal.step(reservation, 1)
            records_read = True
            metrics = self._released_evaluation(event.noise_multiplier)
        except BaseException as failure:  # once held-out records were read, a failure is charged like the release
            log.error("evaluation (reservation %d) failed: %s: %s", reservation, type(failure).__name__, failure)
            with self._ledger_lock:
                if records_read:
                    self.ledger.commit(reservation, event, extra={
                        "purpose": EVALUATION_PURPOSE, "released": False, "randomness": RANDOMNESS,
                        "reason": "the evaluation failed after it read the held-out records; charged"})
                else:
                    self.ledger.abort(reservation, "the evaluation failed before it read a record: nothing was released")
            raise RequestFailed("the evaluation failed; nothing was released (details in the holder's log)") from None
        finally:
            self.trainer.load_trainable_state(saved)
        with self._ledger_lock:
            self.ledger.commit(reservation, event, extra={"purpose": EVALUATION_PURPOSE, **self._release_facts()})
        return metrics

    def _released_evaluation(self, noise_multiplier: float) -> dict[str, float]:
        """The private evaluation of the held-out split (:mod:`ewtune.agent.evaluation`): a causal LM's perplexity
        from its noised clipped loss sums, a classifier's metrics from its noised confusion matrix; either is one
        Gaussian mechanism of sensitivity 1."""
        if getattr(getattr(self.trainer, "config", None), "task", "classification") == "causal_lm":
            return private_perplexity(self.trainer.clipped_loss_sums(), self.trainer.loss_bound, noise_multiplier)
        return private_metrics(self.trainer.confusion_matrix(), noise_multiplier)

    def _audit_facts(self) -> dict[str, Any]:
        """An audit round's commit says so, and names the engine breakage an audit test asked for."""
        if not self.audit:
            return {}
        breakage = self.trainer.config.breakage
        return {"purpose": AUDIT_PURPOSE, **({"engine_broken_on_purpose": breakage} if breakage else {})}

    def _release_facts(self) -> dict[str, Any]:
        """Recorded in a release's commit: its randomness, and the released count that left with it."""
        if self.released_dataset_size is None:  # before the first count release (recovery on a new ledger)
            return {"randomness": RANDOMNESS}
        return {"randomness": RANDOMNESS, "public": {"dataset_size": self.released_dataset_size}}

    def _released_count(self) -> int | None:
        """N as it leaves: the ledger's latest noised count while the data set is the same, else a new one,
        released and charged now (:mod:`ewtune.agent.released_count`); None when the budget left cannot fund that
        release (the daemon then describes no count, and the planner skips it). An audit daemon trains
        synthetic records whose number the audit's layout fixes: their exact count is public, charged nothing."""
        if self.audit:
            return int(self.trainer.dataset_size)
        exact, records = int(self.trainer.dataset_size), int(self.trainer.record_count)
        with self._ledger_lock:
            value = current_count(self.ledger, self.holder_id, (self.trainer.config.data_file, exact, records - exact),
                                  self.policy.dataset_size_noise, SecureRandom(), self._journal)
        if value is None:
            log.warning("the budget cannot fund the release of the training set's count (noise std %g): this daemon "
                        "describes no count and trains no round", self.policy.dataset_size_noise)
        else:
            log.info("the training set's count leaves as %d (Gaussian noise of std %g records, charged once per data set)",
                     value, self.policy.dataset_size_noise)
        return value

    def _check_evaluations_left(self) -> None:
        """At most ``max_evaluations_per_day`` private evaluations in the last 24 hours, counted from the ledger."""
        since = datetime.now(timezone.utc) - EVALUATION_WINDOW
        done = evaluations_since(self.ledger.entries, since)
        if done >= self.policy.max_evaluations_per_day:
            raise PlanRefused(
                f"this holder has released {done} private evaluation(s) in the last 24 hours and allows "
                f"{self.policy.max_evaluations_per_day} per day"
            )

    def _refuse_if_stopping(self) -> None:
        if self._stopping.is_set():
            raise DaemonUnavailable("the agent daemon is shutting down")


def _trainer(config: AgentConfig):
    """The daemon's trainer: the holder's data and model ([training]; with ``processes`` > 1, rank 0 of that many
    worker processes, :mod:`ewtune.agent.distributed`), or an audit's ([audit])."""
    try:
        if config.audit is not None:
            return AuditTrainer(AuditHolderConfig(**config.audit))
        return start_workers(TrainingConfig(**config.training))
    except TypeError as bad:
        raise InvalidInputError(f"[{'audit' if config.audit is not None else 'training'}] in agent.toml: {bad}") from None


def _check_delta(delta: float, records: int) -> None:
    """Refuse a delta of no meaning for the records this holder's guarantee covers (training and held out)."""
    too_large = delta_too_large(delta, records)
    if too_large:
        raise PlanRefused(f"{too_large} (N: the records this holder's guarantee covers)")


def _check_budget_matches(policy: HolderPolicy, ledger: Ledger, holder_id: str) -> None:
    """A lifetime budget never changes: agent.toml must state the budget the ledger's genesis recorded."""
    spend = ledger.spend(holder_id)
    if not (math.isclose(spend.budget_epsilon, policy.budget_epsilon) and math.isclose(spend.budget_delta, policy.budget_delta)):
        raise InvalidInputError(
            f"agent.toml's budget (epsilon {policy.budget_epsilon:g}, delta {policy.budget_delta:g}) differs from the "
            f"one recorded in ledger {ledger.path} (epsilon {spend.budget_epsilon:g}, delta {spend.budget_delta:g}); "
            "a lifetime budget cannot change"
        )
