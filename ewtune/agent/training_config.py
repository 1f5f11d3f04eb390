"""What a holder trains on and how (:class:`TrainingConfig`, agent.toml's ``[training]``, train-local's options),
apart from the trainer (:class:`ewtune.agent.training.LocalTrainer`) so that ``ewtune config check`` validates
the table against the very dataclass the daemon builds without loading torch.

Imports neither torch, transformers, datasets nor flwr.
"""

from __future__ import annotations

from dataclasses import dataclass

from ewtune.accountant.errors import InvalidInputError
from ewtune.agent.device import check_device_name, check_precision
from ewtune.agent.distributed.sharding import check_sharding


@dataclass(frozen=True)
class TrainingConfig:
    """What a holder trains on and how; fixed for the life of a :class:`ewtune.agent.training.LocalTrainer`."""

    model_dir: str
    data_file: str
    task: str = "classification"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    num_labels: int | None = None  # None: inferred from the labels (max label + 1, at least 2)
    max_length: int = 128
    mode: str = "lora"  # "lora", "full" or "head" (the classification head only): see ewtune.agent.models.load_model
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: tuple[str, ...] | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    physical_batch_size: int = 32
    # Tests and benchmarks only: batches and noise from generators seeded with ``seed`` (predictable, so no
    # privacy against anyone who knows or guesses the seed). The agent daemon refuses it.
    insecure_seeded_randomness: bool = False
    max_examples: int | None = None
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9): see ewtune.agent.dpsgd_run.make_optimizer
    tune_layers: int = 0  # lora/full: k > 0 trains only the top k encoder layers and the head (ewtune.agent.top_layers)
    # The holder's secret key of the record-by-record split (ewtune.agent.data.split_key; the daemon's default is
    # <ledger dir>/<data file name>.split-key); None: a public key derived from ``seed`` (train-local, tests, benchmarks).
    split_key_file: str | None = None
    device: str = "auto"  # auto (CUDA when present, else the CPU), cpu, cuda or cuda:N (ewtune.agent.device)
    precision: str = "fp32"  # or bf16: bfloat16 autocast for the forward passes, on a CUDA device only
    # Worker processes (ewtune.agent.distributed.launch.start_workers: train-local --nproc, agent.toml's
    # [training] processes); a LocalTrainer itself is one of them.
    processes: int = 1
    # "none": each worker holds the whole model; "fsdp": parameters, gradients and optimizer state sharded across
    # the workers with FSDP2 (ewtune.agent.distributed.sharded: train-local --sharding, [training] sharding)
    sharding: str = "none"

    def __post_init__(self) -> None:
        check_device_name(self.device)
        check_precision(self.precision)
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1:
            raise InvalidInputError(f"processes must be an integer >= 1, got {self.processes!r}")
        check_sharding(self.sharding, self.processes, self.mode, self.tune_layers)

    def data_spec(self) -> "DataSpec":  # noqa: F821
        """Where the examples are and how to read and split them."""
        # deferred: ewtune.agent.data loads torch, transformers and datasets (7 s), and `ewtune config check` reads
        # this class to validate [training] at once
        from ewtune.agent.data import DataSpec, split_key

        return DataSpec(
            path=self.data_file,
            task=self.task,
            text_column=self.text_column,
            text_pair_column=self.text_pair_column,
            label_column=self.label_column,
            num_labels=self.num_labels,
            max_length=self.max_length,
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            max_examples=self.max_examples,
            split_key=split_key(self.split_key_file) if self.split_key_file else None,
        )
