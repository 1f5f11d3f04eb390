"""A data holder's policy and the daemon's configuration file (``agent.toml``).

The policy is the holder's, not the coordinator's: its lifetime (epsilon, delta) budget, the clip norms and
models it accepts, and the most DP-SGD steps it runs in one round. The daemon checks every round plan against
it before any step runs, whatever the ClientApp (code shipped by the coordinator) asks.

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.tomlfiles import optional_table, read_toml, required, resolve, strings, table
from ewtune.agent.device import check_device_name, check_precision
from ewtune.agent.distributed.sharding import check_sharding
from ewtune.federation.contract import RoundPlan, integer, positive


class PlanRefused(EwtuneError):
    """A round plan breaks the holder's policy or budget; nothing was charged."""

    exit_code = 3


EVALUATION_MODES = ("none", "private")


@dataclass(frozen=True)
class HolderPolicy:
    """The holder's rules; the daemon checks every plan against them before any step runs.

    - ``max_epsilon_per_round`` (default: the whole budget): one round of the plan alone must stay within this
      certified epsilon; it is the daemon's own noise floor.
    - ``min_expected_batch`` and ``min_noise_multiplier``: floors a plan must meet whatever the budget says. A
      plan with a vanishing sampling rate makes any sigma look affordable to an accountant, and with tiny
      expected batches the sampler's rounding and the accountant's numerics decide the guarantee; a sigma far
      below 1 buys nothing at practical epsilons.
    - ``evaluation``: ``"none"`` (default) releases no evaluation metrics at all; ``"private"`` releases the
      confusion matrix of the held-out split with Gaussian noise of std ``evaluation_noise_multiplier`` per
      cell (sensitivity 1 under add/remove-one; a causal LM: its two clipped loss sums, a perplexity, with the
      same noise and sensitivity, :mod:`ewtune.agent.evaluation`), charged to the ledger as an event, at most
      ``max_evaluations_per_day`` times in any 24 hours, counted from the ledger's own evaluation commits (a
      limit per run would be no limit: the coordinator chooses the run ids; a restart does not reset it).
    - ``dataset_size_noise``: N never leaves exactly (add/remove neighbours differ in N); the daemon releases
      once, per data set, N + Gaussian noise of this std (records), charged to the ledger
      (:mod:`ewtune.agent.released_count`). The coordinator plans (q = B / N_noisy) and weights FedAvg with it.
    - ``audit_runs``: whether this holder takes part in empirical privacy audits (``false`` by default). An
      audit run is a separate kind of run: its plans say ``purpose = "audit"``, and only a daemon started for
      an audit (agent.toml's ``[audit]`` table, synthetic records and canaries, :mod:`ewtune.agent.audit.holder`)
      trains them; every other daemon refuses them, and an audit daemon refuses every other plan.
    """

    budget_epsilon: float
    budget_delta: float
    min_clip_norm: float = 1e-3
    max_clip_norm: float = 100.0
    allowed_models: tuple[str, ...] = ()  # empty: any model the holder itself configured
    max_steps_per_round: int = 10_000
    max_epsilon_per_round: float | None = None
    min_expected_batch: float = 8.0
    min_noise_multiplier: float = 0.5
    evaluation: str = "none"
    evaluation_noise_multiplier: float = 20.0
    max_evaluations_per_day: int = 10
    dataset_size_noise: float = 20.0
    audit_runs: bool = False

    def __post_init__(self) -> None:
        positive("budget epsilon", self.budget_epsilon)
        if not _number(self.budget_delta) or not 0 < self.budget_delta < 1:
            raise InvalidInputError(f"budget delta must be in (0, 1), got {self.budget_delta!r}")
        positive("min clip norm", self.min_clip_norm)
        positive("max clip norm", self.max_clip_norm)
        if self.min_clip_norm > self.max_clip_norm:
            raise InvalidInputError(f"min clip norm {self.min_clip_norm} exceeds max clip norm {self.max_clip_norm}")
        integer(1)("max steps per round", self.max_steps_per_round)
        if self.max_epsilon_per_round is not None:
            positive("max epsilon per round", self.max_epsilon_per_round)
        positive("min expected batch", self.min_expected_batch)
        positive("min noise multiplier", self.min_noise_multiplier)
        if self.evaluation not in EVALUATION_MODES:
            raise InvalidInputError(f"evaluation must be one of {', '.join(EVALUATION_MODES)}, got {self.evaluation!r}")
        positive("evaluation noise multiplier", self.evaluation_noise_multiplier)
        integer(0)("max evaluations per day", self.max_evaluations_per_day)
        positive("dataset size noise", self.dataset_size_noise)
        if not isinstance(self.audit_runs, bool):
            raise InvalidInputError(f"audit_runs must be true or false, got {self.audit_runs!r}")
        object.__setattr__(self, "allowed_models", tuple(self.allowed_models))

    @property
    def round_epsilon(self) -> float:
        """The certified epsilon one round alone may reach (the noise floor's target)."""
        cap = self.max_epsilon_per_round
        return self.budget_epsilon if cap is None else min(cap, self.budget_epsilon)

    def check_model(self, model_id: str) -> None:
        if self.allowed_models and model_id not in self.allowed_models:
            raise PlanRefused(f"model {model_id!r} is not allowed by this holder's policy {list(self.allowed_models)}")

    def check_plan(self, plan: RoundPlan, model_id: str) -> None:
        """Refuse a plan outside the policy's static limits (the budget is checked against the ledger)."""
        if plan.model_id is not None and plan.model_id != model_id:
            raise PlanRefused(f"the plan is for model {plan.model_id!r} but this holder trains {model_id!r}")
        self.check_model(model_id)
        if not self.min_clip_norm <= plan.clip_norm <= self.max_clip_norm:
            raise PlanRefused(
                f"clip norm {plan.clip_norm} is outside this holder's allowed range "
                f"[{self.min_clip_norm}, {self.max_clip_norm}]"
            )
        if plan.steps > self.max_steps_per_round:
            raise PlanRefused(f"{plan.steps} steps exceed this holder's maximum of {self.max_steps_per_round} per round")
        if plan.noise_multiplier < self.min_noise_multiplier:
            raise PlanRefused(
                f"noise multiplier {plan.noise_multiplier:g} is below this holder's minimum {self.min_noise_multiplier:g}"
            )

    def check_sampling(self, sampling_rate: float, released_size: int) -> None:
        """Refuse an expected batch q*N_noisy below the policy's floor (q: the rate the sampler will execute;
        N_noisy: the released count, so that the refusal is a function of released values only)."""
        expected = sampling_rate * released_size
        if expected < self.min_expected_batch:
            raise PlanRefused(
                f"expected batch q*N = {sampling_rate:.6g} * {released_size} (the released count) = {expected:.6g} "
                f"is below this holder's minimum of {self.min_expected_batch:g} records"
            )


SUPERNODE_ISOLATIONS = ("warm", "subprocess")


@dataclass(frozen=True)
class SuperNodeConfig:
    """The holder's Flower SuperNode, started and supervised by the daemon (see :mod:`ewtune.agent.supernode`)."""

    superlink: str
    root_certificates: Path | None
    auth_private_key: Path | None
    port: int = 9094
    insecure: bool = False
    executable: str | None = None
    extra_node_config: dict[str, Any] = field(default_factory=dict)
    # "warm": one long-lived task loop serves every message (ewtune.agent.warm_supernode); "subprocess": Flower's
    # default, a fresh ClientApp process per message.
    isolation: str = "warm"

    def __post_init__(self) -> None:
        if self.isolation not in SUPERNODE_ISOLATIONS:
            raise InvalidInputError(f"isolation must be one of {', '.join(SUPERNODE_ISOLATIONS)}, not {self.isolation!r}")


@dataclass(frozen=True)
class AgentConfig:
    holder_id: str
    policy: HolderPolicy
    ledger_path: Path
    signing_key: Path
    rpc_address: str
    training: dict[str, Any]  # the fields of ewtune.agent.training.TrainingConfig
    supernode: SuperNodeConfig | None = None
    rpc_max_message_bytes: int = 256 * 2**20  # the largest request or reply the daemon's gRPC accepts
    ledger_head: Path | None = None  # the ledger's anchored head file (None: beside the ledger)
    audit: dict[str, Any] | None = None  # an audit daemon's [audit] (ewtune.agent.audit.holder.AuditHolderConfig); no [training]


def load_agent_config(path: str | os.PathLike) -> AgentConfig:
    """Read ``agent.toml``; relative paths are resolved against the file's directory."""
    document, path = read_toml(path)
    base = path.parent
    holder_id = table(document, "holder", path).get("id")
    if not isinstance(holder_id, str) or not holder_id:
        raise InvalidInputError(f"{path}: [holder] needs id = \"...\"")
    budget = table(document, "budget", path)
    policy_table = dict(optional_table(document, "policy", path))
    if "release_evaluation_metrics" in policy_table:
        raise InvalidInputError(
            f"{path}: [policy] release_evaluation_metrics is gone: exact metrics are never released; "
            'use evaluation = "none" (default) or evaluation = "private" (noised and charged to the ledger)'
        )
    if "dataset_size_granularity" in policy_table:
        raise InvalidInputError(
            f"{path}: [policy] dataset_size_granularity is gone: a rounded N is no DP release; N now leaves only as a "
            "noised count charged to the ledger (dataset_size_noise, default 20 records)"
        )
    if "max_evaluations_per_run" in policy_table:
        raise InvalidInputError(
            f"{path}: [policy] max_evaluations_per_run is gone: the coordinator chooses run ids, so the limit is per "
            "holder and day; use max_evaluations_per_day"
        )
    if "allowed_models" in policy_table:
        policy_table["allowed_models"] = strings(policy_table["allowed_models"], "[policy] allowed_models", path)
    try:
        policy = HolderPolicy(budget_epsilon=budget.get("epsilon"), budget_delta=budget.get("delta"), **policy_table)
    except TypeError as bad:
        raise InvalidInputError(f"{path}: [policy] {bad}") from None
    ledger = table(document, "ledger", path)
    ledger_path = resolve(base, required(ledger, "path", "ledger", path))
    audit = _audit_table(document, policy, path)
    training = {} if audit is not None else _training_table(document, base, path, ledger_path.parent)
    rpc = table(document, "rpc", path)
    return AgentConfig(
        holder_id=holder_id,
        policy=policy,
        ledger_path=ledger_path,
        signing_key=resolve(base, required(ledger, "signing_key", "ledger", path)),
        ledger_head=None if ledger.get("head") is None else resolve(base, ledger["head"]),
        rpc_address=_rpc_address(base, rpc.get("address", "unix:agent.sock")),
        rpc_max_message_bytes=int(positive("[rpc] max_message_mb", rpc.get("max_message_mb", 256)) * 2**20),
        training=training,
        audit=audit,
        supernode=_supernode_config(base, optional_table(document, "supernode", path), path),
    )


def _training_table(document: Mapping[str, Any], base: Path, path: Path, state_dir: Path) -> dict[str, Any]:
    """The ``[training]`` table, paths resolved. The daemon's split key is secret and lives with the holder's
    state, beside the ledger (``<ledger dir>/<data file name>.split-key``), not beside the data, whose folder a
    deployment mounts read-only."""
    training = dict(table(document, "training", path))
    for key in ("model_dir", "data_file"):
        if key not in training:
            raise InvalidInputError(f"{path}: [training] needs {key}")
        training[key] = str(resolve(base, training[key]))
    key_file = training.get("split_key_file", str(state_dir / (Path(training["data_file"]).name + ".split-key")))
    if isinstance(key_file, str):
        training["split_key_file"] = str(resolve(base, key_file))
    if "lora_target_modules" in training:
        training["lora_target_modules"] = strings(training["lora_target_modules"], "[training] lora_target_modules", path)
    _refuse_insecure_randomness(training, path)
    _check_device_settings(training, path)
    _check_sharding(training, path)
    return training


def _check_device_settings(training: Mapping[str, Any], path: Path) -> None:
    """``device`` and ``precision`` named as :mod:`ewtune.agent.device` accepts (whether this machine has the device is
    known only once torch loads, when the daemon starts)."""
    for key, check in (("device", check_device_name), ("precision", check_precision)):
        if key in training:
            try:
                check(training[key])
            except InvalidInputError as bad:
                raise InvalidInputError(f"{path}: [training] {bad}") from None


def _check_sharding(training: Mapping[str, Any], path: Path) -> None:
    """``sharding`` (:mod:`ewtune.agent.distributed.sharding`) with the ``processes``, ``mode`` and ``tune_layers`` it
    needs (the types of those are checked with the rest of the table, by the trainer's configuration)."""
    settings = (training.get("sharding", "none"), training.get("processes", 1), training.get("mode", "lora"),
                training.get("tune_layers", 0))  # the defaults of ewtune.agent.training.TrainingConfig
    if isinstance(settings[1], int) and isinstance(settings[3], int):
        try:
            check_sharding(*settings)
        except InvalidInputError as bad:
            raise InvalidInputError(f"{path}: [training] {bad}") from None


def _audit_table(document: Mapping[str, Any], policy: HolderPolicy, path: Path) -> dict[str, Any] | None:
    """An audit daemon's ``[audit]``: only with ``[policy] audit_runs = true`` and without ``[training]`` (it
    trains synthetic records, never the holder's data)."""
    if "audit" not in document:
        return None
    audit = table(document, "audit", path)
    if not policy.audit_runs:
        raise InvalidInputError(f"{path}: [audit] starts an audit daemon, which needs [policy] audit_runs = true")
    if "training" in document:
        raise InvalidInputError(f"{path}: an audit daemon ([audit]) trains synthetic records only: remove [training]")
    return dict(audit)


def _supernode_config(base: Path, section: Mapping[str, Any] | None, path: Path) -> SuperNodeConfig | None:
    if not section:
        return None
    insecure = bool(section.get("insecure", False))
    root, key = section.get("root_certificates"), section.get("auth_private_key")
    if not insecure and (root is None or key is None):
        raise InvalidInputError(f"{path}: [supernode] needs root_certificates and auth_private_key (or insecure = true)")
    settings = dict(
        superlink=required(section, "superlink", "supernode", path),
        root_certificates=None if root is None else resolve(base, root),
        auth_private_key=None if key is None else resolve(base, key),
        port=integer(1)("supernode port", section.get("port", 9094)),
        insecure=insecure,
        executable=section.get("executable"),
        extra_node_config=dict(optional_table(section, "node_config", path)),
        isolation=section.get("isolation", "warm"),
    )
    try:
        return SuperNodeConfig(**settings)
    except InvalidInputError as bad:
        raise InvalidInputError(f"{path}: [supernode] {bad}") from None


def _refuse_insecure_randomness(training: Mapping[str, Any], path: Path) -> None:
    """The daemon draws batches and noise only from the operating system's secure source."""
    if "secure_noise" in training:
        raise InvalidInputError(
            f"{path}: [training] secure_noise is gone: the agent daemon always draws noise and batches from the "
            "operating system's secure source; remove the line"
        )
    if training.get("insecure_seeded_randomness"):
        raise InvalidInputError(
            f"{path}: [training] insecure_seeded_randomness is for tests and benchmarks only: the agent daemon "
            "refuses predictable noise and batches"
        )


def _rpc_address(base: Path, address: Any) -> str:
    if not isinstance(address, str):
        raise InvalidInputError(f"[rpc] address must be a string, got {address!r}")
    if address.startswith("unix:"):
        socket = address[len("unix:") :]
        socket = socket[2:] if socket.startswith("//") else socket
        return f"unix://{resolve(base, socket)}"
    return address


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))
