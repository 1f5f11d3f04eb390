"""DP-SGD: per-example losses, clipped per-example gradient sums (book-keeping), Gaussian noise, the step."""

from ewtune.agent.dpsgd.engine import ClippedSum, PerExampleClipper, PerExampleGradientError
from ewtune.agent.dpsgd.losses import causal_lm_loss, classification_loss
from ewtune.agent.dpsgd.noise import gaussian_noise_like
from ewtune.agent.dpsgd.step import DPSGDStep, StepStats

__all__ = [
    "ClippedSum",
    "DPSGDStep",
    "PerExampleClipper",
    "PerExampleGradientError",
    "StepStats",
    "causal_lm_loss",
    "classification_loss",
    "gaussian_noise_like",
]
