"""The Python API: private local fine-tuning, the accountant and ledger verification, for a notebook.

Each function runs the same code as its command, so that a figure from Python and one from the command line
are the same figure:

- :func:`train_private` runs ``ewtune agent train-local`` (:func:`ewtune.agent.train_cli.train_local`) and returns
  the trained model with the figures: the certified epsilon (the guarantee, PLD accounting composed over the
  phases), the Edgeworth estimate (arXiv 2206.04236, an estimate, not a guarantee) and the held-out accuracy
  and macro F1 beside the majority-class baseline.
- :func:`evaluate` runs ``ewtune evaluate`` (:mod:`ewtune.evaluate_cli`): exact figures, released nowhere.
- :func:`certified_epsilon` and :func:`noise_multiplier_for` run ``ewtune accountant epsilon`` and
  ``ewtune accountant sigma`` for the Poisson-subsampled Gaussian (DP-SGD; Abadi et al. 2016).
- :func:`verify_ledger` runs ``ewtune ledger verify`` (:func:`ewtune.accountant.verify.verify_ledger`).

Bad input raises :class:`ewtune.accountant.errors.InvalidInputError` with the message the command prints. torch is
imported only by :func:`train_private` and :func:`evaluate`, when called.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TrainResult", "certified_epsilon", "evaluate", "noise_multiplier_for", "train_private", "verify_ledger"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_private` returns.

    ``model`` is the trained torch module (a peft model in lora mode) and ``tokenizer`` its tokenizer;
    ``epsilon_certified`` is the guarantee at ``summary["delta"]`` for the steps that ran, and
    ``epsilon_edgeworth_estimate`` only an estimate; ``accuracy``, ``macro_f1`` and ``majority_baseline`` are
    exact figures on the held-out split (never released); ``summary`` is the document
    ``train-local --json`` prints; ``ledger_entries`` are the entries the run wrote to the ledger (empty
    without one)."""

    model: Any
    tokenizer: Any
    summary: dict
    ledger_entries: tuple[dict, ...] = field(default=())

    @property
    def epsilon_certified(self) -> float:
        return self.summary["epsilon_certified"]

    @property
    def epsilon_edgeworth_estimate(self) -> float:
        return self.summary["epsilon_edgeworth_estimate"]

    @property
    def accuracy(self) -> float | None:
        return self.summary["accuracy"]

    @property
    def macro_f1(self) -> float | None:
        return self.summary["macro_f1"]

    @property
    def majority_baseline(self) -> float:
        return self.summary["majority_baseline"]

    def trainable_state(self) -> dict:
        """Copies of the trainable parameters by name (what a federation exchanges)."""
        # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
        from ewtune.agent.models import trainable_state

        return trainable_state(self.model)


def train_private(
    model: str,
    data: "str | os.PathLike | pandas.DataFrame | datasets.Dataset",  # noqa: F821
    *,
    epsilon: float,
    delta: float,
    mode: str = "head",
    device: str = "auto",
    ledger: str | os.PathLike | None = None,
    signing_key: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> TrainResult:
    """Private (DP-SGD) fine-tuning of a local Hugging Face model, as ``ewtune agent train-local`` runs it.

    ``model``: a model directory, or ``"minilm"``. ``data``: a CSV, JSON Lines or Parquet file, ``"mr"`` or
    ``"sms_spam"``, or a pandas DataFrame or ``datasets.Dataset`` (written to a temporary Parquet file for the
    run, then deleted).
    ``mode``: ``"head"`` (linear probing), ``"lora"`` or ``"full"``. ``ledger`` and ``signing_key``: charge
    the run to a holder ledger. ``output``: save the model and run.json there. ``progress``: report the phases
    and steps on stderr. Every other train-local option goes by its attribute name (``probe_epochs=2``,
    ``max_examples=500``, ``seed=1``, ``eval_fraction=0.2``, ...)."""
    # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
    from ewtune.agent.train_cli import default_arguments, train_local

    with _data_file(data) as path:
        args = default_arguments(
            model=str(model), data=path, epsilon=float(epsilon), delta=float(delta), mode=mode, device=device,
            ledger=_optional_path(ledger), signing_key=_optional_path(signing_key), output=_optional_path(output),
            quiet=not progress, **options,
        )  # fmt: skip
        run = train_local(args)
    return TrainResult(run.trainer.model, run.trainer.tokenizer, run.summary, run.ledger_entries)


class _data_file:
    """A context giving the path of ``data``: itself, or a temporary Parquet file holding a pandas DataFrame
    or a Hugging Face ``datasets.Dataset`` (their rows, without pandas' index)."""

    def __init__(self, data):
        self.data, self.directory = data, None

    def __enter__(self) -> str:
        if isinstance(data := self.data, (str, os.PathLike)):
            return str(data)
        if not hasattr(data, "to_parquet"):
            raise TypeError(f"data must be a file path, a pandas DataFrame or a datasets.Dataset, not {type(data).__name__}")
        # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
        import pandas

        self.directory = tempfile.TemporaryDirectory(prefix="ewtune-data-")
        path = Path(self.directory.name) / "data.parquet"
        data.to_parquet(path, **({"index": False} if isinstance(data, pandas.DataFrame) else {}))
        return str(path)

    def __exit__(self, *exc) -> None:
        if self.directory is not None:
            self.directory.cleanup()


def evaluate(model: str, data: str | os.PathLike, **options: Any) -> dict:
    """The metrics of a model directory, or of ``adapter=`` / ``weights=`` on top of it, on a local file, as
    ``ewtune evaluate`` computes them (every record, or ``held_out=True`` for train-local's held-out split);
    nothing is released. Options by their attribute names (:class:`ewtune.evaluate_cli.EvaluationSpec`)."""
    # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
    from ewtune.evaluate_cli import EvaluationSpec
    from ewtune.evaluate_cli import evaluate as run_evaluation

    return run_evaluation(EvaluationSpec(model=str(model), data=str(data), **options))


def certified_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float, relation: str = "add_remove") -> float:
    """The certified epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (rate ``sampling_rate``,
    noise ``noise_multiplier`` times the clip norm), under the neighbouring ``relation`` ``"add_remove"`` or
    ``"replace_one"``: an upper bound on the true epsilon (the PLD accountant of :mod:`ewtune.accountant.certified`)."""
    # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
    from ewtune.accountant.certified import certified_epsilon as epsilon_of
    from ewtune.accountant.events import Neighbouring, PoissonGaussianEvent
    from ewtune.accountant.privacy_accountant import check_meaningful_delta

    return epsilon_of(PoissonGaussianEvent(sampling_rate, noise_multiplier, steps, Neighbouring(relation)), check_meaningful_delta(delta))


def noise_multiplier_for(epsilon: float, delta: float, sampling_rate: float, steps: int, relation: str = "add_remove") -> float:
    """The noise multiplier whose certified epsilon at ``delta`` after ``steps`` steps at ``sampling_rate`` meets
    the target ``epsilon`` (:func:`ewtune.accountant.calibration.calibrate_noise_multiplier`, certified policy)."""
    # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
    from ewtune.accountant.calibration import calibrate_noise_multiplier
    from ewtune.accountant.events import Neighbouring
    from ewtune.accountant.privacy_accountant import check_meaningful_delta

    phases = [(sampling_rate, steps)]
    return calibrate_noise_multiplier(epsilon, check_meaningful_delta(delta), phases, neighbouring=Neighbouring(relation)).noise_multiplier


def verify_ledger(path: str | os.PathLike, public_key: str | Mapping[str, str] | None = None):
    """The :class:`ewtune.accountant.verify.VerificationReport` of the ledger at ``path``: ``.ok``, ``.summary()``,
    the holders' certified spends. ``public_key`` pins the writer's key (base64, or writer id to key); without
    it, the signatures are checked against the ledger's own genesis key, which proves no authorship."""
    # deferred: 'import ewtune' stays light (tests/test_api.py): each helper loads only what it uses
    from ewtune.accountant.verify import verify_ledger as verify

    return verify(path, public_key)


def _optional_path(path) -> str | None:
    return None if path is None else str(path)
