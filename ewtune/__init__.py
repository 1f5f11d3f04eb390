"""The ``ewtune`` command line, the one-machine demo that wires the parts together, and the Python API
(:mod:`ewtune.api`): ``ewtune.train_private``, ``ewtune.evaluate``, ``ewtune.certified_epsilon``,
``ewtune.noise_multiplier_for`` and ``ewtune.verify_ledger``, imported on first use so that ``import ewtune``
loads neither torch nor the accountant."""

__version__ = "0.1.0"

_API = ("TrainResult", "certified_epsilon", "evaluate", "noise_multiplier_for", "train_private", "verify_ledger")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """``ewtune.<name>`` for the names of :mod:`ewtune.api` (PEP 562), importing it on first use."""
    if name in _API:
        from ewtune import api  # deferred: 'import ewtune' stays light (tests/test_api.py)

        return getattr(api, name)
    raise AttributeError(f"module 'ewtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
