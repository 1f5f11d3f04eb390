"""The agent daemon: the only process of a data holder that touches its data.

Long-lived: the model and the data are loaded once (:class:`agent.training.LocalTrainer`); the daemon also
holds the holder's policy, its own ledger and its Ed25519 key. For every round plan it (DESIGN.md, one round):

1. checks the plan against the policy (model, clip norm, steps per round);
2. computes its own noise floor for the plan's (q, steps) with the certified calibration, and refuses a
   smaller sigma;
3. refuses a plan whose certified epsilon, composed with everything committed or reserved in its ledger,
   would exceed its lifetime budget;
4. reserves the planned event in its ledger, trains, commits the executed event (or aborts when nothing was
   released), and returns the update with a receipt signed by its key.

Requests are served one at a time. A refusal raises :class:`agent.policy.PlanRefused` before anything is
written, so a refused plan charges nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from accountant.errors import InvalidInputError
from accountant.events import PoissonGaussianEvent
from accountant.ledger import Ledger
from accountant.receipts import Receipt, sign_receipt, update_digest
from accountant.signing import SigningKey, canonical_json
from agent.policy import AgentConfig, HolderPolicy, PlanRefused, RoundPlan
from agent.rpc import DaemonUnavailable

log = logging.getLogger(__name__)

# What a train reply may carry besides the noised update: figures that do not depend on the records. The
# training loss and the number of records Poisson-sampled are computed from the data without noise, so they
# stay in the holder's log and never leave with the update.
RELEASED_TRAINING_METRICS = ("steps", "seconds")


@dataclass(frozen=True)
class TrainReply:
    arrays: dict[str, np.ndarray]  # the noised trainable weights after the round
    receipt: dict[str, Any]  # the signed receipt document
    metrics: dict[str, float]  # RELEASED_TRAINING_METRICS and daemon_seconds


class Daemon:
    """Serves one holder. ``trainer`` is a :class:`agent.training.LocalTrainer` (or anything with its
    ``model_id``, ``dataset_size``, ``trainable_state``, ``load_trainable_state``, ``train``, ``evaluate``)."""

    def __init__(self, holder_id: str, policy: HolderPolicy, trainer: Any, ledger: Ledger, key: SigningKey):
        if ledger.writer_id != holder_id:
            raise InvalidInputError(f"ledger {ledger.path} belongs to {ledger.writer_id!r}, not {holder_id!r}")
        if ledger.public_key_text != key.public_key_text:
            raise InvalidInputError(f"the signing key is not the writer key of ledger {ledger.path}")
        _check_budget_matches(policy, ledger, holder_id)
        policy.check_model(trainer.model_id)
        self.holder_id, self.policy, self.trainer, self.ledger, self.key = holder_id, policy, trainer, ledger, key
        self._shapes = {name: tuple(tensor.shape) for name, tensor in trainer.trainable_state().items()}
        self._work = threading.Lock()  # one training or evaluation at a time
        self._ledger_lock = threading.Lock()  # describe reads while train writes
        self._stopping = threading.Event()
        self._started = time.monotonic()
        for seq, reservation in ledger.open_reservations(holder_id).items():
            log.warning(
                "open reservation %d (run %s, round %d) from an earlier crash stays counted as spent",
                seq, reservation.run_id, reservation.round,
            )

    @classmethod
    def from_config(cls, config: AgentConfig) -> "Daemon":
        """Open (or create, with a genesis recording the budget) the ledger, then load model and data."""
        from agent.training import LocalTrainer, TrainingConfig

        key = SigningKey.load(config.signing_key)
        if config.ledger_path.exists():
            ledger = Ledger.open(config.ledger_path, key)
        else:
            config.ledger_path.parent.mkdir(parents=True, exist_ok=True)
            budget = {"budget_epsilon": config.policy.budget_epsilon, "budget_delta": config.policy.budget_delta}
            ledger = Ledger.create(config.ledger_path, key, config.holder_id, budget)
        try:
            try:
                training = TrainingConfig(**config.training)
            except TypeError as bad:
                raise InvalidInputError(f"[training] in agent.toml: {bad}") from None
            return cls(config.holder_id, config.policy, LocalTrainer(training), ledger, key)
        except BaseException:
            ledger.close()
            raise

    # -- the API -------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        with self._ledger_lock:
            spend = self.ledger.spend(self.holder_id)
            open_reservations = len(self.ledger.open_reservations(self.holder_id))
        description = {
            "holder_id": self.holder_id,
            "dataset_size": int(self.trainer.dataset_size),
            "budget_epsilon": spend.budget_epsilon,
            "budget_delta": spend.budget_delta,
            "spent_epsilon_certified": spend.epsilon_certified,
            "budget_left_epsilon": spend.budget_left_epsilon,
            "open_reservations": open_reservations,
            "public_key": self.key.public_key_text,
            "model_id": self.trainer.model_id,
            "min_clip_norm": self.policy.min_clip_norm,
            "max_clip_norm": self.policy.max_clip_norm,
            "max_steps_per_round": self.policy.max_steps_per_round,
        }
        if spend.epsilon_edgeworth is not None:
            description["spent_epsilon_edgeworth_estimate"] = spend.epsilon_edgeworth
        return description

    def health(self) -> dict[str, Any]:
        return {
            "status": "stopping" if self._stopping.is_set() else "ok",
            "holder_id": self.holder_id,
            "busy": self._work.locked(),
            "uptime_seconds": time.monotonic() - self._started,
        }

    def train(self, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainReply:
        with self._work:
            started = time.perf_counter()
            self._refuse_if_stopping()
            plan = RoundPlan.from_config(config)
            self.policy.check_plan(plan, self.trainer.model_id)
            state = self._state_from_arrays(arrays)
            planned = PoissonGaussianEvent(plan.sampling_rate, plan.noise_multiplier, plan.steps)
            self._check_noise_floor(plan)
            with self._ledger_lock:
                self._check_budget(planned)
                reservation = self.ledger.reserve(self.holder_id, plan.run_id, plan.round, planned)
            reply = self._train_reserved(plan, state, reservation)
            reply.metrics["daemon_seconds"] = time.perf_counter() - started
            log.info(
                "round %d of run %s: %d steps committed (reservation %d); %.2f s training, %.2f s in the daemon",
                plan.round, plan.run_id, reply.metrics["steps"], reservation,
                reply.metrics.get("seconds", math.nan), reply.metrics["daemon_seconds"],
            )
            return reply

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics of ``arrays`` on the held-out split; the trainer's own weights are restored afterwards."""
        if not self.policy.release_evaluation_metrics:
            raise PlanRefused("this holder's policy does not release evaluation metrics")
        with self._work:
            self._refuse_if_stopping()
            state = self._state_from_arrays(arrays)
            saved = {name: tensor.detach().clone() for name, tensor in self.trainer.trainable_state().items()}
            try:
                self.trainer.load_trainable_state(state)
                metrics = self.trainer.evaluate()
            finally:
                self.trainer.load_trainable_state(saved)
        return {name: float(value) for name, value in metrics.items()}

    def request_stop(self) -> None:
        """Refuse new work and end a running training at its next step (its executed steps are committed)."""
        self._stopping.set()

    def close(self) -> None:
        """Wait for the running request, then close the ledger (releases its writer lock)."""
        self.request_stop()
        with self._work, self._ledger_lock:
            self.ledger.close()

    # -- the steps of a round ------------------------------------------------------------------------------

    def noise_floor(self, sampling_rate: float, steps: int) -> float:
        """The daemon's own sigma for one round of (q, steps): the certified calibration of that round alone
        to the policy's per-round epsilon (default: the whole budget) at the budget's delta."""
        return _calibrated_sigma(self.policy.round_epsilon, self.policy.budget_delta, sampling_rate, steps)

    def _check_noise_floor(self, plan: RoundPlan) -> None:
        floor = self.noise_floor(plan.sampling_rate, plan.steps)
        if plan.noise_multiplier < floor:
            raise PlanRefused(
                f"noise multiplier {plan.noise_multiplier:.6g} is below this holder's own {floor:.6g} for "
                f"q={plan.sampling_rate:g}, {plan.steps} steps (certified epsilon {self.policy.round_epsilon:g} "
                f"per round at delta {self.policy.budget_delta:g})"
            )

    def _check_budget(self, planned: PoissonGaussianEvent) -> None:
        spend = self.ledger.spend_with(self.holder_id, planned)
        if not spend.within_budget:
            raise PlanRefused(
                f"the plan would bring this holder's certified epsilon to {spend.epsilon_certified:.6g}, over its "
                f"budget {spend.budget_epsilon:g} (delta {spend.budget_delta:g}); spent so far "
                f"{self.ledger.spend(self.holder_id).epsilon_certified:.6g}"
            )

    def _train_reserved(self, plan: RoundPlan, state: dict[str, torch.Tensor], reservation: int) -> TrainReply:
        from agent.training import StepPlan

        step_plan = StepPlan(plan.steps, plan.sampling_rate, plan.noise_multiplier, plan.clip_norm, plan.learning_rate)
        try:
            self.trainer.load_trainable_state(state)
            result = self.trainer.train(step_plan, should_stop=self._stopping.is_set)
            if result.event is None:
                raise DaemonUnavailable("the daemon is stopping: no step ran and nothing was released")
            update = {name: _to_numpy(tensor) for name, tensor in result.trainable_state.items()}
            receipt = Receipt(plan.run_id, plan.round, self.holder_id, result.event, update_digest(update))
            document = sign_receipt(self.key, receipt)
        except BaseException as failure:
            with self._ledger_lock:
                self.ledger.abort(reservation, f"no update released: {type(failure).__name__}: {failure}"[:500])
            raise
        with self._ledger_lock:  # committed before the update leaves; a failed commit releases nothing
            self.ledger.commit(
                reservation,
                result.event,
                extra={"receipt_sha256": hashlib.sha256(canonical_json(document)).hexdigest()},
            )
        log.info("round %s: local training loss %.4f over %d examples (kept local)",
                 plan.round, result.metrics.get("loss", math.nan), int(result.metrics.get("examples", 0)))
        released = {name: float(result.metrics[name]) for name in RELEASED_TRAINING_METRICS if name in result.metrics}
        return TrainReply(update, document, released)

    def _state_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The global weights as tensors, refused unless they are exactly the trainable parameters."""
        names = set(arrays)
        if names != set(self._shapes):
            missing, unknown = sorted(set(self._shapes) - names), sorted(names - set(self._shapes))
            raise InvalidInputError(
                f"the weights do not match this holder's trainable parameters (missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unknown {unknown[:3]}{'...' if len(unknown) > 3 else ''})"
            )
        state = {}
        for name, array in arrays.items():
            array = np.asarray(array)
            if tuple(array.shape) != self._shapes[name]:
                raise InvalidInputError(f"weight {name!r} has shape {tuple(array.shape)}, expected {self._shapes[name]}")
            if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
                raise InvalidInputError(f"weight {name!r} must hold finite floating-point values")
            state[name] = torch.from_numpy(np.array(array, copy=True))
        return state

    def _refuse_if_stopping(self) -> None:
        if self._stopping.is_set():
            raise DaemonUnavailable("the agent daemon is shutting down")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().copy()


@functools.lru_cache(maxsize=256)
def _calibrated_sigma(epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """The certified calibration; where even the calibration's smallest sane sigma keeps the round within
    ``epsilon``, that smallest sigma is the floor (a sigma below it is refused, whatever the budget)."""
    from accountant.calibration import MIN_SIGMA, calibrate_noise_multiplier
    from accountant.certified import certified_epsilon

    try:
        return float(calibrate_noise_multiplier(epsilon, delta, [(sampling_rate, steps)], policy="certified").noise_multiplier)
    except InvalidInputError:
        if certified_epsilon(PoissonGaussianEvent(sampling_rate, MIN_SIGMA, steps), delta) <= epsilon:
            return MIN_SIGMA
        raise


def _check_budget_matches(policy: HolderPolicy, ledger: Ledger, holder_id: str) -> None:
    """A lifetime budget never changes: agent.toml must state the budget the ledger's genesis recorded."""
    spend = ledger.spend(holder_id)
    if not (math.isclose(spend.budget_epsilon, policy.budget_epsilon) and math.isclose(spend.budget_delta, policy.budget_delta)):
        raise InvalidInputError(
            f"agent.toml's budget (epsilon {policy.budget_epsilon:g}, delta {policy.budget_delta:g}) differs from the "
            f"one recorded in ledger {ledger.path} (epsilon {spend.budget_epsilon:g}, delta {spend.budget_delta:g}); "
            "a lifetime budget cannot change"
        )
